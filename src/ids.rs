//! Identifiers that travel between agent and receiver.
//!
//! Tenant and application ids end up in signed tokens, URL paths and (for the
//! tenant) a PostgreSQL schema name, so they are validated once, here, with a
//! strict rule: lowercase ASCII letters, digits and `_`, starting with a letter
//! or digit, at most 48 characters. Anything else is refused rather than
//! escaped, so no id can ever smuggle SQL or path syntax.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} id {value:?}: use 1-48 characters of a-z, 0-9 and _, starting with a letter or digit")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
}

fn check(what: &'static str, value: &str) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= 48
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !value.starts_with('_');
    if ok {
        Ok(())
    } else {
        Err(IdError { what, value: value.chars().take(64).collect() })
    }
}

macro_rules! strict_id {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($what, &value)?;
                Ok(Self(value))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

strict_id!(TenantId, "tenant");
strict_id!(AppId, "application");

impl TenantId {
    /// The receiver's PostgreSQL schema for this tenant's mirror tables.
    /// The id rule above guarantees the result is a plain identifier, and
    /// the prefix keeps tenant schemas apart from anything else in the
    /// partner's database.
    pub fn mirror_schema(&self) -> String {
        format!("mirror_{}", self.0)
    }

    /// Where the receiver builds shadow tables for this tenant's reloads.
    /// A separate schema keeps half-loaded tables out of the partner's view
    /// and lets a shadow carry the live table's exact name (and so its
    /// constraint names) when it is moved in. At most 14 + 48 = 62 bytes,
    /// and it cannot collide with a mirror schema.
    pub fn load_schema(&self) -> String {
        format!("ctmirror_load_{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        assert!(TenantId::new("acme").is_ok());
        assert!(TenantId::new("t_42").is_ok());
        assert!(AppId::new("0crm").is_ok());
    }

    #[test]
    fn refuses_anything_that_could_escape() {
        for bad in [
            "", "Acme", "a-b", "a b", "a;drop", "_x", "a\"b", "é", "a/b", "../x",
            &"x".repeat(49),
        ] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mirror_schema_is_prefixed() {
        assert_eq!(TenantId::new("acme").unwrap().mirror_schema(), "mirror_acme");
        let longest = TenantId::new("x".repeat(48)).unwrap();
        assert!(longest.load_schema().len() <= 63 && longest.mirror_schema().len() <= 63);
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<TenantId>("\"ok_1\"").is_ok());
        assert!(serde_json::from_str::<TenantId>("\"NOPE\"").is_err());
    }
}

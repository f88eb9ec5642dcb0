//! Versions and cursors.
//!
//! A cursor is a position in the source's change stream that the receiver
//! stores in the same transaction as the rows it covers. Because one source
//! transaction (one version) can change more rows than one batch holds, a
//! cursor is a version *and* the primary key of the last row applied within
//! it: everything at or before (version, key) in (version, key) order is in
//! the mirror.

use super::value::Key;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A change-tracking version of the source: a SQL Server change tracking
/// version, or a PostgreSQL transaction id (xid8) for the trigger backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub i64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a table's mirror stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub enum Cursor {
    /// A full load in progress: rows up to `after_key` (in primary-key order)
    /// of the table as of `version` are loaded. Changes after `version` are
    /// sent once the scan ends.
    Snapshot {
        version: Version,
        after_key: Option<Key>,
    },
    /// Every change at or before (`version`, `after_key`) is applied; no key
    /// means the whole version is applied.
    Changes {
        version: Version,
        after_key: Option<Key>,
    },
}

impl Cursor {
    pub fn version(&self) -> Version {
        match self {
            Cursor::Snapshot { version, .. } | Cursor::Changes { version, .. } => *version,
        }
    }

    pub fn is_snapshot(&self) -> bool {
        matches!(self, Cursor::Snapshot { .. })
    }

    /// Whether a batch may move a table from `from` to `to`. Key order within
    /// a version is the source's collation order, which only the source can
    /// judge, so this checks phases and versions; the receiver's
    /// compare-and-set on `from` keeps keys from going backward.
    pub fn may_advance(from: Option<&Cursor>, to: &Cursor) -> Result<(), String> {
        match (from, to) {
            (None, _) => Ok(()),
            (Some(Cursor::Snapshot { version: a, .. }), Cursor::Snapshot { version: b, .. }) => {
                if a == b {
                    Ok(())
                } else {
                    Err(format!("a full load cannot switch from version {a} to {b} midway"))
                }
            }
            (Some(Cursor::Snapshot { version: a, .. }), Cursor::Changes { version: b, .. })
            | (Some(Cursor::Changes { version: a, .. }), Cursor::Changes { version: b, .. }) => {
                if b >= a {
                    Ok(())
                } else {
                    Err(format!("cursor would move backward from version {a} to {b}"))
                }
            }
            (Some(Cursor::Changes { .. }), Cursor::Snapshot { .. }) => Err(
                "a table past its full load cannot return to a snapshot without a reload".into(),
            ),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (phase, version, key) = match self {
            Cursor::Snapshot { version, after_key } => ("snapshot", version, after_key),
            Cursor::Changes { version, after_key } => ("changes", version, after_key),
        };
        match key {
            None => write!(f, "{phase}@{version}"),
            Some(k) => write!(f, "{phase}@{version}/{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::value::Value;

    fn changes(v: i64) -> Cursor {
        Cursor::Changes { version: Version(v), after_key: None }
    }

    #[test]
    fn cursor_round_trips_through_json() {
        let c = Cursor::Snapshot {
            version: Version(7),
            after_key: Some(Key(vec![Value::Int(3), Value::Text("a".into())])),
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"phase":"snapshot","version":7,"after_key":[3,"a"]}"#);
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
    }

    #[test]
    fn cursor_never_moves_backward() {
        assert!(Cursor::may_advance(Some(&changes(5)), &changes(4)).is_err());
        assert!(Cursor::may_advance(Some(&changes(5)), &changes(5)).is_ok());
        assert!(Cursor::may_advance(None, &changes(1)).is_ok());
        let snap = Cursor::Snapshot { version: Version(5), after_key: None };
        assert!(Cursor::may_advance(Some(&changes(5)), &snap).is_err());
        assert!(Cursor::may_advance(Some(&snap), &changes(9)).is_ok());
        let other_snap = Cursor::Snapshot { version: Version(6), after_key: None };
        assert!(Cursor::may_advance(Some(&snap), &other_snap).is_err());
    }

    #[test]
    fn unknown_phase_is_refused() {
        assert!(serde_json::from_str::<Cursor>(r#"{"phase":"later","version":1,"after_key":null}"#).is_err());
        assert!(serde_json::from_str::<Cursor>(r#"{"phase":"changes","version":"x","after_key":null}"#).is_err());
    }
}

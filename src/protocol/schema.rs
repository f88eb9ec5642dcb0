//! Table schemas as the agent describes them and the receiver creates them.
//!
//! The schema sent is the *projection* the schema map allows, not the source
//! table: unmapped columns never appear here, so the receiver cannot even
//! learn their names.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Source-independent column types. Each backend maps its native types here;
/// the receiver maps these to PostgreSQL (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ColumnType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// Exact decimal; no precision means unconstrained.
    Decimal { precision: Option<u16>, scale: Option<u16> },
    /// Variable-length text, optionally limited in characters.
    Text { max_length: Option<u32> },
    /// Blank-padded fixed-length text.
    FixedText { length: u32 },
    Bytes { max_length: Option<u32> },
    Date,
    Time { precision: Option<u8> },
    Timestamp { precision: Option<u8> },
    TimestampTz { precision: Option<u8> },
    Uuid,
    Json,
}

impl ColumnType {
    /// The PostgreSQL type a mirror column of this type has, without its
    /// modifier. COPY batches carry values in this type's binary receive
    /// format, so a source must cast to exactly this type; and casts to it
    /// never truncate (a cast to `varchar(n)` would), leaving the column's
    /// own modifier to refuse a value that does not fit.
    pub fn postgres_base_type(&self) -> &'static str {
        use ColumnType as T;
        match self {
            T::Bool => "boolean",
            T::Int16 => "smallint",
            T::Int32 => "integer",
            T::Int64 => "bigint",
            T::Float32 => "real",
            T::Float64 => "double precision",
            T::Decimal { .. } => "numeric",
            T::Text { .. } | T::FixedText { .. } => "text",
            T::Bytes { .. } => "bytea",
            T::Date => "date",
            T::Time { .. } => "time",
            T::Timestamp { .. } => "timestamp",
            T::TimestampTz { .. } => "timestamptz",
            T::Uuid => "uuid",
            T::Json => "jsonb",
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            ColumnType::Decimal { precision, scale } => {
                match (precision, scale) {
                    (None, Some(_)) => return Err("decimal scale without precision".into()),
                    (Some(p), s) if *p == 0 || *p > 1000 || s.unwrap_or(0) > *p => {
                        return Err(format!("decimal({p},{}) is out of range", s.unwrap_or(0)))
                    }
                    _ => {}
                }
                Ok(())
            }
            ColumnType::Text { max_length: Some(n) } | ColumnType::Bytes { max_length: Some(n) }
                if *n == 0 || *n > 10_485_760 =>
            {
                Err(format!("length {n} is out of range"))
            }
            ColumnType::FixedText { length } if *length == 0 || *length > 10_485_760 => {
                Err(format!("length {length} is out of range"))
            }
            ColumnType::Time { precision: Some(p) }
            | ColumnType::Timestamp { precision: Some(p) }
            | ColumnType::TimestampTz { precision: Some(p) }
                if *p > 6 =>
            {
                Err(format!("fractional second precision {p} is above 6"))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSchema {
    pub name: String,
    pub data_type: ColumnType,
    pub nullable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSchema {
    /// The mirror table's name.
    pub name: String,
    /// Mapped columns in source order.
    pub columns: Vec<ColumnSchema>,
    /// Primary-key column names in key order; all of them are mapped.
    pub primary_key: Vec<String>,
}

/// PostgreSQL silently truncates longer identifiers, which would make two
/// names collide, so longer names are refused instead.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Checks a table or column name: quoting makes any character safe in SQL,
/// but empty names, NUL and over-long names cannot be represented at all.
pub fn check_identifier(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "{what} name {:?} is longer than {MAX_IDENTIFIER_BYTES} bytes",
            name.chars().take(80).collect::<String>()
        ));
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return Err(format!("{what} name {name:?} contains control characters"));
    }
    Ok(())
}

impl TableSchema {
    /// A stable fingerprint: the receiver stores it and every batch names it,
    /// so rows are never applied to a table shaped differently than the
    /// agent thinks.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("schema serializes");
        hex::encode(Sha256::digest(&bytes))
    }

    /// Positions of the primary-key columns within `columns`.
    pub fn key_positions(&self) -> Vec<usize> {
        self.primary_key
            .iter()
            .map(|k| self.columns.iter().position(|c| &c.name == k).expect("validated key"))
            .collect()
    }

    /// Everything the receiver relies on before it touches its database.
    pub fn validate(&self) -> Result<(), String> {
        check_identifier("table", &self.name)?;
        if self.columns.is_empty() {
            return Err(format!("table {:?} has no columns", self.name));
        }
        if self.columns.len() > 1600 {
            return Err(format!("table {:?} has more than 1600 columns", self.name));
        }
        let mut seen = HashSet::new();
        for c in &self.columns {
            check_identifier("column", &c.name)?;
            if !seen.insert(c.name.as_str()) {
                return Err(format!("column {:?} appears twice in table {:?}", c.name, self.name));
            }
            c.data_type
                .check()
                .map_err(|e| format!("column {:?} of table {:?}: {e}", c.name, self.name))?;
        }
        if self.primary_key.is_empty() {
            return Err(format!("table {:?} has no primary key", self.name));
        }
        let mut key_seen = HashSet::new();
        for k in &self.primary_key {
            let col = self.columns.iter().find(|c| &c.name == k).ok_or_else(|| {
                format!("primary key column {k:?} is not among the columns of table {:?}", self.name)
            })?;
            if col.nullable {
                return Err(format!("primary key column {k:?} of table {:?} is nullable", self.name));
            }
            if !key_seen.insert(k.as_str()) {
                return Err(format!("primary key column {k:?} appears twice"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> TableSchema {
        TableSchema {
            name: "contact".into(),
            columns: vec![
                ColumnSchema { name: "id".into(), data_type: ColumnType::Int64, nullable: false },
                ColumnSchema {
                    name: "name".into(),
                    data_type: ColumnType::Text { max_length: Some(200) },
                    nullable: true,
                },
            ],
            primary_key: vec!["id".into()],
        }
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = sample();
        let mut b = sample();
        assert_eq!(a.hash(), b.hash());
        b.columns[1].nullable = false;
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn json_shape_is_documented_shape() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["columns"][1]["data_type"]["type"], "text");
        assert_eq!(json["columns"][1]["data_type"]["max_length"], 200);
    }

    #[test]
    fn validation_refuses_broken_schemas() {
        let mut s = sample();
        s.primary_key = vec!["nope".into()];
        assert!(s.validate().is_err());
        let mut s = sample();
        s.columns.push(s.columns[0].clone());
        assert!(s.validate().unwrap_err().contains("twice"));
        let mut s = sample();
        s.name = "x".repeat(64);
        assert!(s.validate().is_err());
        let mut s = sample();
        s.columns[1].name = "a\0b".into();
        assert!(s.validate().is_err());
        let mut s = sample();
        s.columns[0].nullable = true;
        assert!(s.validate().is_err());
        let mut s = sample();
        s.columns[1].data_type = ColumnType::Decimal { precision: Some(5), scale: Some(9) };
        assert!(s.validate().is_err());
    }

    #[test]
    fn odd_but_legal_names_pass() {
        let mut s = sample();
        s.name = "Order Lines \"2024\"; drop".into();
        s.columns[1].name = "select".into();
        assert!(s.validate().is_ok());
    }
}

//! Schema maps: per application, which tables and columns may leave the source.
//!
//! Deny by default: only columns named here are ever read, so a column added
//! to the source later (or a password hash that was always there) stays home
//! until someone names it. One TOML file per application lives in
//! `schema-maps/`; see `schema-maps/crm_insights.toml` for the format.

use crate::ids::AppId;
use crate::protocol::schema::check_identifier;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaMap {
    pub application: AppId,
    #[serde(rename = "table")]
    pub tables: Vec<TableMap>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMap {
    /// Source schema; the backend's default (`public`, `dbo`) when omitted.
    #[serde(default)]
    pub schema: Option<String>,
    /// Source table name.
    pub table: String,
    /// Mirror table name; the source table name when omitted.
    #[serde(default)]
    pub mirror: Option<String>,
    /// The columns that may leave the source. Primary-key columns must be
    /// among them.
    pub columns: Vec<String>,
}

impl TableMap {
    pub fn mirror_name(&self) -> &str {
        self.mirror.as_deref().unwrap_or(&self.table)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaMapError {
    #[error("cannot read schema map {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("schema map {path} is not valid TOML for a schema map: {message}")]
    Parse { path: String, message: String },
    #[error("schema map {path}: {message}")]
    Invalid { path: String, message: String },
}

impl SchemaMap {
    pub fn load(path: &Path) -> Result<Self, SchemaMapError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchemaMapError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, SchemaMapError> {
        let map: SchemaMap = toml::from_str(text)
            .map_err(|e| SchemaMapError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        map.validate()
            .map_err(|message| SchemaMapError::Invalid { path: origin.to_owned(), message })?;
        Ok(map)
    }

    fn validate(&self) -> Result<(), String> {
        if self.tables.is_empty() {
            return Err("maps no tables".into());
        }
        let mut mirrors = HashSet::new();
        let mut sources = HashSet::new();
        for t in &self.tables {
            if let Some(s) = &t.schema {
                check_identifier("schema", s)?;
            }
            check_identifier("table", &t.table)?;
            check_identifier("mirror table", t.mirror_name())?;
            if !mirrors.insert(t.mirror_name()) {
                return Err(format!("mirror table {:?} is mapped twice", t.mirror_name()));
            }
            if !sources.insert((t.schema.as_deref(), t.table.as_str())) {
                return Err(format!("source table {:?} is mapped twice", t.table));
            }
            if t.columns.is_empty() {
                return Err(format!("table {:?} maps no columns", t.table));
            }
            let mut cols = HashSet::new();
            for c in &t.columns {
                check_identifier("column", c)?;
                if !cols.insert(c.as_str()) {
                    return Err(format!("column {c:?} of table {:?} is listed twice", t.table));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
application = "crm"
[[table]]
table = "contact"
columns = ["id", "name"]
[[table]]
schema = "sales"
table = "order lines"
mirror = "order_lines"
columns = ["id"]
"#;

    #[test]
    fn parses_a_valid_map() {
        let m = SchemaMap::parse(GOOD, "test").unwrap();
        assert_eq!(m.tables.len(), 2);
        assert_eq!(m.tables[1].mirror_name(), "order_lines");
        assert_eq!(m.tables[0].mirror_name(), "contact");
    }

    #[test]
    fn refuses_garbage_with_a_clear_error() {
        let cases = [
            ("", "missing field"),
            ("application = \"crm\"\ntable = []", "maps no tables"),
            ("application = \"CRM\"\n[[table]]\ntable=\"a\"\ncolumns=[\"x\"]", "invalid application id"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=[]", "maps no columns"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=[\"x\",\"x\"]", "listed twice"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=[\"x\"]\nsecret=1", "unknown field"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=[\"x\"]\n[[table]]\ntable=\"b\"\nmirror=\"a\"\ncolumns=[\"x\"]", "mapped twice"),
            ("application = \"crm\"\n[[table]]\ntable=\"\"\ncolumns=[\"x\"]", "empty"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=[\"x\\u0000\"]", "control"),
            ("application = [", "not valid TOML"),
            ("application = \"crm\"\n[[table]]\ntable=\"a\"\ncolumns=\"x\"", "invalid type"),
        ];
        for (text, expected) in cases {
            let err = SchemaMap::parse(text, "m.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn shipped_sample_maps_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema-maps");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                SchemaMap::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}

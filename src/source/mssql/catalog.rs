//! The physical schema of a table, read from `sys.columns`, `sys.types`
//! and the primary-key index, projected onto the mapped columns.

use super::client::{MsClient, SqlParam, SqlValue};
use super::sql::{self, display, schema_of, MsColumn};
use super::types::{check_key_type, map_type, read_as_for, CatalogColumn, MsType};
use crate::protocol::ColumnSchema;
use crate::source::{SourceColumn, SourceError, SourceErrorKind, SourceSchema, SourceTable};

/// Every column of the table in column order; empty when the table does not
/// exist or the login cannot see it.
pub async fn table_columns(client: &mut MsClient, table: &SourceTable) -> Result<Vec<CatalogColumn>, SourceError> {
    let shown = display(table);
    let rows = client
        .query(
            sql::COLUMNS,
            &[SqlParam::Text(schema_of(table).to_owned()), SqlParam::Text(table.name.clone())],
            &format!("reading the columns of table {shown}"),
            &format!("VIEW DEFINITION on {shown}"),
        )
        .await?;
    rows.into_iter().map(|r| catalog_row(r).map_err(|m| malformed(&shown, &m))).collect()
}

fn malformed(shown: &str, m: &str) -> SourceError {
    SourceError::new(SourceErrorKind::Fatal, format!("unexpected catalog answer for table {shown}: {m}"))
}

fn catalog_row(row: Vec<SqlValue>) -> Result<CatalogColumn, String> {
    let mut it = row.into_iter();
    let mut next = || it.next().ok_or_else(|| "too few columns".to_string());
    let text = |v: SqlValue| match v {
        SqlValue::Text(s) => Ok(s),
        other => Err(format!("expected text, got {other:?}")),
    };
    let opt_text = |v: SqlValue| match v {
        SqlValue::Null => Ok(None),
        SqlValue::Text(s) => Ok(Some(s)),
        other => Err(format!("expected text, got {other:?}")),
    };
    let int = |v: SqlValue| match v {
        SqlValue::Int(i) => Ok(Some(i)),
        SqlValue::Null => Ok(None),
        other => Err(format!("expected an integer, got {other:?}")),
    };
    let name = text(next()?)?;
    let system_type = opt_text(next()?)?.unwrap_or_default();
    let declared_type = text(next()?)?;
    let is_assembly_type = int(next()?)? == Some(1);
    let max_length = int(next()?)?.unwrap_or(0) as i16;
    let precision = int(next()?)?.unwrap_or(0) as u8;
    let scale = int(next()?)?.unwrap_or(0) as u8;
    let nullable = int(next()?)? == Some(1);
    let is_computed = int(next()?)? == Some(1);
    let default = opt_text(next()?)?;
    let key_ordinal = int(next()?)?.map(|k| k as u8);
    Ok(CatalogColumn {
        name,
        system_type,
        declared_type,
        is_assembly_type,
        max_length,
        precision,
        scale,
        nullable,
        is_computed,
        default,
        key_ordinal,
    })
}

/// Projects the catalog onto the mapped columns. Every refusal is a
/// `Config` error naming the column and what the operator can do.
pub fn project(
    table: &SourceTable,
    catalog: &[CatalogColumn],
    mapped: &[String],
) -> Result<SourceSchema, SourceError> {
    let shown = display(table);
    if catalog.is_empty() {
        return Err(SourceError::config(format!(
            "table {shown} not found (or the agent's login lacks VIEW DEFINITION on it)"
        )));
    }
    let mut keys: Vec<&CatalogColumn> = catalog.iter().filter(|c| c.key_ordinal.is_some()).collect();
    if keys.is_empty() {
        return Err(SourceError::config(format!(
            "table {shown} has no primary key; SQL Server change tracking requires one"
        )));
    }
    keys.sort_by_key(|c| c.key_ordinal);
    for name in mapped {
        if !catalog.iter().any(|c| &c.name == name) {
            return Err(SourceError::config(format!("column {name} of table {shown} named in the schema map does not exist")));
        }
    }
    for k in &keys {
        if !mapped.contains(&k.name) {
            return Err(SourceError::config(format!(
                "primary-key column {} of table {shown} must be in the schema map",
                k.name
            )));
        }
    }
    let mut columns = Vec::new();
    for c in catalog.iter().filter(|c| mapped.contains(&c.name)) {
        let ty = map_type(c).map_err(|m| SourceError::config(format!("table {shown}: {m}")))?;
        if c.key_ordinal.is_some() {
            check_key_type(c, &ty).map_err(|m| SourceError::config(format!("table {shown}: {m}")))?;
        }
        tracing::debug!(column = %c.name, native = %ty.native, default = ?c.default, computed = c.is_computed, "mapped column");
        columns.push(SourceColumn {
            column: ColumnSchema { name: c.name.clone(), data_type: ty.protocol, nullable: c.nullable },
            native_type: ty.native,
        });
    }
    Ok(SourceSchema { table: table.clone(), columns, primary_key: keys.iter().map(|k| k.name.clone()).collect() })
}

/// The mapping of a column of a schema this backend produced.
pub fn ms_column(c: &SourceColumn) -> MsColumn {
    MsColumn {
        name: c.column.name.clone(),
        ty: MsType {
            protocol: c.column.data_type.clone(),
            native: c.native_type.clone(),
            read_as: read_as_for(&c.native_type),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(name: &str, sys: &str, key: Option<u8>) -> CatalogColumn {
        CatalogColumn {
            name: name.into(),
            system_type: sys.into(),
            declared_type: sys.into(),
            is_assembly_type: false,
            max_length: if sys == "nvarchar" { 100 } else { 8 },
            precision: 0,
            scale: 0,
            nullable: key.is_none(),
            is_computed: false,
            default: None,
            key_ordinal: key,
        }
    }

    fn t() -> SourceTable {
        SourceTable { schema: None, name: "orders".into() }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn projection_keeps_source_order_and_key_order() {
        let catalog =
            vec![cat("b", "bigint", Some(2)), cat("note", "nvarchar", None), cat("a", "int", Some(1)), cat("x", "bigint", None)];
        let s = project(&t(), &catalog, &names(&["a", "b", "note"])).unwrap();
        let cols: Vec<&str> = s.columns.iter().map(|c| c.column.name.as_str()).collect();
        assert_eq!(cols, ["b", "note", "a"]);
        assert_eq!(s.primary_key, ["a", "b"]);
        assert_eq!(s.columns[1].native_type, "nvarchar(50)");
    }

    #[test]
    fn a_table_without_a_key_is_refused() {
        let err = project(&t(), &[cat("a", "int", None)], &names(&["a"])).unwrap_err();
        assert!(err.message.contains("no primary key"), "{}", err.message);
    }

    #[test]
    fn missing_tables_columns_and_unmapped_keys_are_named() {
        assert!(project(&t(), &[], &names(&["a"])).unwrap_err().message.contains("not found"));
        let catalog = vec![cat("id", "int", Some(1)), cat("v", "int", None)];
        assert!(project(&t(), &catalog, &names(&["id", "nope"])).unwrap_err().message.contains("nope"));
        assert!(project(&t(), &catalog, &names(&["v"])).unwrap_err().message.contains("primary-key column id"));
    }

    #[test]
    fn an_unsupported_column_is_refused_by_name() {
        let catalog = vec![cat("id", "int", Some(1)), cat("shape", "geography", None)];
        let err = project(&t(), &catalog, &names(&["id", "shape"])).unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Config);
        assert!(err.message.contains("column shape") && err.message.contains("leave the column out"), "{}", err.message);
        // Left out of the map, the same table is fine.
        assert!(project(&t(), &catalog, &names(&["id"])).is_ok());
    }

    #[test]
    fn catalog_rows_decode_from_the_columns_query() {
        let row = vec![
            SqlValue::Text("price".into()),
            SqlValue::Text("decimal".into()),
            SqlValue::Text("decimal".into()),
            SqlValue::Int(0),
            SqlValue::Int(9),
            SqlValue::Int(12),
            SqlValue::Int(2),
            SqlValue::Int(1),
            SqlValue::Int(0),
            SqlValue::Text("((0))".into()),
            SqlValue::Null,
        ];
        let c = catalog_row(row).unwrap();
        assert_eq!((c.precision, c.scale, c.nullable, c.key_ordinal), (12, 2, true, None));
        assert_eq!(c.default.as_deref(), Some("((0))"));
        assert!(catalog_row(vec![SqlValue::Int(1)]).is_err());
    }
}

//! Catalog reads: finding a table, its primary key, and the mapped columns
//! with their protocol types.

use super::errors::pg_error;
use super::sql::{qualified, quote_ident};
use crate::protocol::{ColumnSchema, ColumnType};
use crate::source::{SourceColumn, SourceError, SourceSchema, SourceTable};
use super::statements::Statements;
use tokio_postgres::GenericClient;

/// A source table resolved in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableRef {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// A partitioned table (relkind `p`), tracked through its parent.
    pub partitioned: bool,
}

impl TableRef {
    /// The quoted, schema-qualified name for SQL text.
    pub fn sql_name(&self) -> String {
        qualified(&self.schema, &self.name)
    }
    /// `schema.name` for messages.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The schema a [`SourceTable`] lives in (`public` when unspecified).
pub(crate) fn schema_of(table: &SourceTable) -> &str {
    table.schema.as_deref().unwrap_or("public")
}

/// `schema.name` for messages about a table that may not exist.
pub(crate) fn display(table: &SourceTable) -> String {
    format!("{}.{}", schema_of(table), table.name)
}

/// Resolves a table by name. Missing tables and non-tables (views, ...) are
/// configuration errors: the schema map names something that cannot be
/// tracked.
pub(crate) async fn find_table<C: GenericClient + Sync>(
    client: &C,
    stmts: &Statements,
    table: &SourceTable,
) -> Result<TableRef, SourceError> {
    const SQL: &str = "SELECT c.oid, c.relkind::text
                         FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = $1 AND c.relname = $2";
    let shown = display(table);
    let err = |e| pg_error(e, &format!("looking up table {shown}"), "USAGE on its schema");
    let statement = stmts.get(client, SQL).await.map_err(err)?;
    let row = client.query_opt(&statement, &[&schema_of(table), &table.name]).await.map_err(err)?;
    let Some(row) = row else {
        return Err(SourceError::config(format!("table {shown} not found")));
    };
    let oid: u32 = row.try_get(0).map_err(|e| pg_error(e, &format!("looking up table {shown}"), ""))?;
    let relkind: String =
        row.try_get(1).map_err(|e| pg_error(e, &format!("looking up table {shown}"), ""))?;
    if relkind != "r" && relkind != "p" {
        return Err(SourceError::config(format!(
            "{shown} is not a table (relkind {relkind}); only tables can be change-tracked"
        )));
    }
    Ok(TableRef {
        oid,
        schema: schema_of(table).to_owned(),
        name: table.name.clone(),
        partitioned: relkind == "p",
    })
}

/// A primary-key column as the side table must copy it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyColumn {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    pub collation: u32,
    /// `format_type` spelling, usable in DDL and casts.
    pub native_type: String,
    /// `"schema"."collation"` when the type is collatable.
    pub collation_sql: Option<String>,
}

/// The primary-key columns in key order; empty when there is none.
pub(crate) async fn primary_key<C: GenericClient + Sync>(
    client: &C,
    stmts: &Statements,
    table: &TableRef,
) -> Result<Vec<KeyColumn>, SourceError> {
    const SQL: &str = "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attcollation,
                              pg_catalog.format_type(a.atttypid, a.atttypmod),
                              cn.nspname::text, co.collname::text
                         FROM pg_catalog.pg_index i
                        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
                         LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                        WHERE i.indrelid = $1 AND i.indisprimary
                        ORDER BY k.ord";
    let doing = format!("reading the primary key of table {}", table.display());
    let statement = stmts.get(client, SQL).await.map_err(|e| pg_error(e, &doing, ""))?;
    let rows = client.query(&statement, &[&table.oid]).await.map_err(|e| pg_error(e, &doing, ""))?;
    rows.iter()
        .map(|r| {
            let collation_schema: Option<String> = r.try_get(5)?;
            let collation_name: Option<String> = r.try_get(6)?;
            Ok(KeyColumn {
                name: r.try_get(0)?,
                type_oid: r.try_get(1)?,
                typmod: r.try_get(2)?,
                collation: r.try_get(3)?,
                native_type: r.try_get(4)?,
                collation_sql: match (collation_schema, collation_name) {
                    (Some(s), Some(n)) => Some(qualified(&s, &n)),
                    _ => None,
                },
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| pg_error(e, &doing, ""))
}

/// Whether the primary key's uniqueness check can wait for the end of the
/// statement or transaction (DEFERRABLE): then a statement can leave a key
/// twice in the table, and in its transition tables.
pub(crate) async fn primary_key_is_deferrable<C: GenericClient + Sync>(
    client: &C,
    stmts: &Statements,
    table: &TableRef,
) -> Result<bool, SourceError> {
    const SQL: &str = "SELECT NOT i.indimmediate FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisprimary";
    let doing = format!("reading the primary key of table {}", table.display());
    let statement = stmts.get(client, SQL).await.map_err(|e| pg_error(e, &doing, ""))?;
    let row = client.query_opt(&statement, &[&table.oid]).await.map_err(|e| pg_error(e, &doing, ""))?;
    match row {
        Some(r) => r.try_get(0).map_err(|e| pg_error(e, &doing, "")),
        None => Err(no_primary_key(table)),
    }
}

/// The error for a table without a primary key.
pub(crate) fn no_primary_key(table: &TableRef) -> SourceError {
    SourceError::config(format!("table {} has no primary key; change tracking needs one", table.display()))
}

/// One column of the table as the catalog describes it.
struct CatalogColumn {
    name: String,
    type_oid: u32,
    typmod: i32,
    not_null: bool,
    native_type: String,
    typtype: String,
}

/// Reads the named columns of a table: only those, in the table's column
/// order, each with its protocol type. Refuses missing columns, unmapped
/// primary-key columns and types the protocol cannot carry, naming them.
pub(crate) async fn read_schema<C: GenericClient + Sync>(
    client: &C,
    stmts: &Statements,
    table: &SourceTable,
    columns: &[String],
) -> Result<SourceSchema, SourceError> {
    const SQL: &str = "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnotnull,
                              pg_catalog.format_type(a.atttypid, a.atttypmod), t.typtype::text
                         FROM pg_catalog.pg_attribute a
                         JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                        WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                        ORDER BY a.attnum";
    let tref = find_table(client, stmts, table).await?;
    let shown = tref.display();
    let doing = format!("reading the columns of table {shown}");
    let statement = stmts.get(client, SQL).await.map_err(|e| pg_error(e, &doing, ""))?;
    let rows = client.query(&statement, &[&tref.oid]).await.map_err(|e| pg_error(e, &doing, ""))?;
    let catalog = rows
        .iter()
        .map(|r| {
            Ok(CatalogColumn {
                name: r.try_get(0)?,
                type_oid: r.try_get(1)?,
                typmod: r.try_get(2)?,
                not_null: r.try_get(3)?,
                native_type: r.try_get(4)?,
                typtype: r.try_get(5)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| pg_error(e, &doing, ""))?;

    if let Some(missing) = columns.iter().find(|c| !catalog.iter().any(|k| &k.name == *c)) {
        return Err(SourceError::config(format!(
            "column {} of table {shown} does not exist",
            quote_ident(missing)
        )));
    }
    let key = primary_key(client, stmts, &tref).await?;
    if key.is_empty() {
        return Err(no_primary_key(&tref));
    }
    if let Some(k) = key.iter().find(|k| !columns.contains(&k.name)) {
        return Err(SourceError::config(format!(
            "primary key column {} of table {shown} must be mapped",
            quote_ident(&k.name)
        )));
    }

    let mut out = Vec::new();
    for col in catalog.iter().filter(|c| columns.contains(&c.name)) {
        let (base_oid, base_typmod, base_typtype) =
            resolve_domain(client, col.type_oid, col.typmod, &col.typtype, &doing).await?;
        let data_type = map_type(base_oid, base_typmod, &base_typtype).ok_or_else(|| {
            SourceError::config(format!(
                "column {} of table {shown} has type {}, which ctmirror cannot mirror; \
                 leave it out of the schema map",
                quote_ident(&col.name),
                col.native_type
            ))
        })?;
        out.push(SourceColumn {
            column: ColumnSchema { name: col.name.clone(), data_type, nullable: !col.not_null },
            native_type: col.native_type.clone(),
        });
    }
    Ok(SourceSchema {
        table: table.clone(),
        columns: out,
        primary_key: key.into_iter().map(|k| k.name).collect(),
    })
}

/// Follows a domain to its base type (a domain's own typmod applies when
/// the column has none), so a domain over a supported type is supported.
async fn resolve_domain<C: GenericClient + Sync>(
    client: &C,
    mut oid: u32,
    mut typmod: i32,
    typtype: &str,
    doing: &str,
) -> Result<(u32, i32, String), SourceError> {
    let mut typtype = typtype.to_owned();
    // Domains over domains are legal; ten levels is far beyond real use.
    for _ in 0..10 {
        if typtype != "d" {
            break;
        }
        let row = client
            .query_one(
                "SELECT d.typbasetype, d.typtypmod, b.typtype::text
                   FROM pg_catalog.pg_type d JOIN pg_catalog.pg_type b ON b.oid = d.typbasetype
                  WHERE d.oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| pg_error(e, doing, ""))?;
        let domain_typmod: i32 = row.try_get(1).map_err(|e| pg_error(e, doing, ""))?;
        oid = row.try_get(0).map_err(|e| pg_error(e, doing, ""))?;
        typtype = row.try_get(2).map_err(|e| pg_error(e, doing, ""))?;
        if typmod < 0 {
            typmod = domain_typmod;
        }
    }
    Ok((oid, typmod, typtype))
}

/// PostgreSQL's `VARHDRSZ`, the offset stored in length typmods.
const VARHDRSZ: i32 = 4;

/// The protocol type of a (non-domain) PostgreSQL type, by its fixed
/// built-in oid; `None` when ctmirror cannot mirror it.
pub(crate) fn map_type(oid: u32, typmod: i32, typtype: &str) -> Option<ColumnType> {
    use ColumnType as T;
    if typtype == "e" {
        return Some(T::Text { max_length: None });
    }
    let length = || (typmod >= VARHDRSZ).then(|| (typmod - VARHDRSZ) as u32);
    let precision = || match typmod {
        -1 => Some(None),
        p @ 0..=6 => Some(Some(p as u8)),
        _ => None,
    };
    Some(match oid {
        16 => T::Bool,
        21 => T::Int16,
        23 => T::Int32,
        20 => T::Int64,
        700 => T::Float32,
        701 => T::Float64,
        1700 => numeric(typmod)?,
        25 => T::Text { max_length: None },
        1043 => T::Text { max_length: length() },
        1042 => match length() {
            Some(n) => T::FixedText { length: n },
            None => T::Text { max_length: None },
        },
        17 => T::Bytes { max_length: None },
        1082 => T::Date,
        1083 => T::Time { precision: precision()? },
        1114 => T::Timestamp { precision: precision()? },
        1184 => T::TimestampTz { precision: precision()? },
        2950 => T::Uuid,
        114 | 3802 => T::Json,
        _ => return None,
    })
}

/// Decodes `numeric(p,s)`'s typmod. Negative scales and scales above the
/// precision (both legal since PostgreSQL 15) have no protocol form.
fn numeric(typmod: i32) -> Option<ColumnType> {
    if typmod < VARHDRSZ {
        return Some(ColumnType::Decimal { precision: None, scale: None });
    }
    let t = typmod - VARHDRSZ;
    let precision = (t >> 16) & 0xffff;
    let scale = ((t & 0x7ff) ^ 1024) - 1024;
    if scale < 0 || scale > precision {
        return None;
    }
    Some(ColumnType::Decimal { precision: Some(precision as u16), scale: Some(scale as u16) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType as T;

    #[test]
    fn numeric_typmods_decode_to_precision_and_scale() {
        let typmod = ((38 << 16) | 10) + VARHDRSZ;
        assert_eq!(map_type(1700, typmod, "b"), Some(T::Decimal { precision: Some(38), scale: Some(10) }));
        assert_eq!(map_type(1700, -1, "b"), Some(T::Decimal { precision: None, scale: None }));
        let negative_scale = ((5 << 16) | (0x7ff & -2i32)) + VARHDRSZ;
        assert_eq!(map_type(1700, negative_scale, "b"), None);
    }

    #[test]
    fn length_and_precision_typmods_decode() {
        assert_eq!(map_type(1043, 24, "b"), Some(T::Text { max_length: Some(20) }));
        assert_eq!(map_type(1043, -1, "b"), Some(T::Text { max_length: None }));
        assert_eq!(map_type(1042, 7, "b"), Some(T::FixedText { length: 3 }));
        assert_eq!(map_type(1184, 3, "b"), Some(T::TimestampTz { precision: Some(3) }));
        assert_eq!(map_type(1083, -1, "b"), Some(T::Time { precision: None }));
    }

    #[test]
    fn enums_are_text_and_unknown_types_are_refused() {
        assert_eq!(map_type(99999, -1, "e"), Some(T::Text { max_length: None }));
        assert_eq!(map_type(1186, -1, "b"), None); // interval
        assert_eq!(map_type(1007, -1, "b"), None); // int4[]
    }
}

//! Reading chunks: keyset snapshot pages and net-change pages, each in one
//! REPEATABLE READ READ ONLY transaction, fetched through a portal so a
//! chunk of wide rows stops at its byte bound instead of filling memory.
//!
//! Every column is read as `::text` and decoded by [`crate::pgtext`]; key
//! parameters go the other way and are cast back with `$n::text::<type>`,
//! so one text path serves every supported type.

use super::catalog::{display, schema_of};
use super::errors::pg_error;
use super::sql::{column_list, qualified, quote_ident, quote_literal, CT_SCHEMA, DELETED_COL, VERSION_COL};
use super::tracking::{tracked, Tracked};
use crate::pgtext::{from_pg_text, to_pg_text};
use crate::protocol::{ColumnType, Key, Value, Version};
use crate::source::{
    ChangePosition, ChangeRow, ChunkLimits, RowOp, SourceColumn, SourceError, SourceErrorKind, SourceSchema,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Row, Transaction};

/// The first portal fetch is small (rows may be megabytes wide); later
/// fetches are sized from the rows seen so far, up to this many.
const FIRST_FETCH: usize = 16;
const MAX_FETCH: usize = 200;

/// Rows in primary-key order strictly after `after`, values in schema order.
pub(crate) async fn snapshot_chunk(
    client: &mut Client,
    schema: &SourceSchema,
    after: Option<&Key>,
    limits: ChunkLimits,
) -> Result<Vec<Vec<Value>>, SourceError> {
    let shown = display(&schema.table);
    let doing = format!("reading a snapshot chunk of table {shown}");
    let grant = format!("SELECT on table {shown}");
    let err = |e| pg_error(e, &doing, &grant);
    let key_cols = schema.key_columns();
    let key_params = match after {
        Some(k) => key_texts(&shown, &key_cols, k)?,
        None => Vec::new(),
    };
    let limit = limits.max_rows.max(1) as i64;
    let sql = snapshot_sql(schema, &key_cols, after.is_some());

    let tx = read_transaction(client).await.map_err(err)?;
    let statement = tx.prepare(&sql).await.map_err(err)?;
    let mut params: Vec<&(dyn ToSql + Sync)> = key_params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    params.push(&limit);
    let positions = schema.key_positions();
    let rows = fetch_bounded(&tx, &statement, &params, limits, (&doing, &grant), |row| {
        let values = decode_columns(row, 0, &schema.columns, &shown, &positions)?;
        let size = values.iter().map(Value::wire_size).sum();
        Ok((values, size))
    })
    .await?;
    tx.commit().await.map_err(err)?;
    Ok(rows)
}

fn snapshot_sql(schema: &SourceSchema, key_cols: &[&SourceColumn], has_after: bool) -> String {
    let table = qualified(schema_of(&schema.table), &schema.table.name);
    let values = text_exprs("t", &schema.columns.iter().collect::<Vec<_>>());
    let key_names: Vec<String> = key_cols.iter().map(|c| c.column.name.clone()).collect();
    let keys = column_list(Some("t"), &key_names);
    let filter =
        if has_after { format!("WHERE ({keys}) > ({})", key_casts(key_cols, 1)) } else { String::new() };
    let limit = if has_after { key_cols.len() + 1 } else { 1 };
    format!("SELECT {values} FROM {table} AS t {filter} ORDER BY {keys} LIMIT ${limit}::bigint")
}

/// Net changes after `after` up to `upper`, ordered by (version, key).
pub(crate) async fn changes_chunk(
    client: &mut Client,
    stmts: &super::statements::Statements,
    schema: &SourceSchema,
    expected: Option<&str>,
    after: &ChangePosition,
    upper: Version,
    limits: ChunkLimits,
) -> Result<Vec<ChangeRow>, SourceError> {
    let shown = display(&schema.table);
    let doing = format!("reading changes of table {shown}");
    let grant = format!("SELECT on table {shown}, USAGE on schema ctmirror_ct and SELECT on its tables");
    let err = |e| pg_error(e, &doing, &grant);
    let key_cols = schema.key_columns();
    let key_params = match &after.after_key {
        Some(k) => key_texts(&shown, &key_cols, k)?,
        None => Vec::new(),
    };
    let limit = limits.max_rows.max(1) as i64;

    let tx = read_transaction(client).await.map_err(err)?;
    let registry = tracked(&tx, stmts, &schema.table).await?;
    let guard = guard_sql(&registry, expected, after);
    let sql = changes_sql(schema, &key_cols, &registry.side_table, after.after_key.is_some(), &guard);
    let statement = tx.prepare(&sql).await.map_err(err)?;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after.version.0];
    params.extend(key_params.iter().map(|p| p as &(dyn ToSql + Sync)));
    params.push(&upper.0);
    params.push(&limit);
    let positions = schema.key_positions();
    let n_keys = key_cols.len();
    let key_columns: Vec<SourceColumn> = key_cols.iter().map(|c| (*c).clone()).collect();
    let all_key: Vec<usize> = (0..n_keys).collect();
    let rows = fetch_bounded(&tx, &statement, &params, limits, (&doing, &grant), |row| {
        let version: i64 = row.try_get(0).map_err(|e| pg_error(e, &doing, ""))?;
        let deleted: bool = row.try_get(1).map_err(|e| pg_error(e, &doing, ""))?;
        let present: bool = row.try_get(2).map_err(|e| pg_error(e, &doing, ""))?;
        let key = Key(decode_columns(row, 3, &key_columns, &shown, &all_key)?);
        let op = if present && !deleted {
            RowOp::Upsert(decode_columns(row, 3 + n_keys, &schema.columns, &shown, &positions)?)
        } else {
            RowOp::Delete
        };
        let change = ChangeRow { version: Version(version), key, op };
        let size = change.wire_size();
        Ok((change, size))
    })
    .await?;
    tx.commit().await.map_err(err)?;
    Ok(rows)
}

/// The names both change readers (values here, binary COPY in
/// `copy_read`) build their query from: the source table as `t`, its side
/// table as `s`, joined on the key.
pub(super) struct SideJoin {
    pub table: String,
    pub side: String,
    /// `s."ctmirror_version"`.
    pub version: String,
    pub key_names: Vec<String>,
    /// `s."k1", s."k2"`.
    pub side_keys: String,
    /// `t."k1" = s."k1" AND …`.
    pub join: String,
}

impl SideJoin {
    pub(super) fn new(schema: &SourceSchema, key_cols: &[&SourceColumn], side_table: &str) -> SideJoin {
        let key_names: Vec<String> = key_cols.iter().map(|c| c.column.name.clone()).collect();
        SideJoin {
            table: qualified(schema_of(&schema.table), &schema.table.name),
            side: qualified(CT_SCHEMA, side_table),
            version: format!("s.{}", quote_ident(VERSION_COL)),
            side_keys: column_list(Some("s"), &key_names),
            join: key_names
                .iter()
                .map(|k| format!("t.{q} = s.{q}", q = quote_ident(k)))
                .collect::<Vec<_>>()
                .join(" AND "),
            key_names,
        }
    }
}

/// `ctmirror_ct.readable(…)` for a change read from `after`: evaluated once
/// per statement, in the statement's snapshot, before any row is read (a
/// constant condition becomes the plan's one-time filter). It raises when
/// the table's tracking is no longer the lifetime `expected` (reinstalled
/// since the cycle began) or retention removed changes the read needs, so a
/// read can never silently return less than what follows its cursor.
pub(super) fn guard_sql(registry: &Tracked, expected: Option<&str>, after: &ChangePosition) -> String {
    format!(
        "ctmirror_ct.readable({}::oid, {}::uuid, {}::bigint, {})",
        registry.table_oid,
        quote_literal(expected.unwrap_or(&registry.generation)),
        after.version.0,
        after.after_key.is_some(),
    )
}

fn changes_sql(
    schema: &SourceSchema,
    key_cols: &[&SourceColumn],
    side_table: &str,
    has_after: bool,
    guard: &str,
) -> String {
    let SideJoin { table, side, version, key_names, side_keys, join } = SideJoin::new(schema, key_cols, side_table);
    let side_key_texts = text_exprs("s", key_cols);
    let values = text_exprs("t", &schema.columns.iter().collect::<Vec<_>>());
    let present = format!("t.{} IS NOT NULL", quote_ident(&key_names[0]));
    let (lower, next) = if has_after {
        (format!("({version}, {side_keys}) > ($1::bigint, {})", key_casts(key_cols, 2)), key_cols.len() + 2)
    } else {
        (format!("{version} > $1::bigint"), 2)
    };
    // The LIMIT sits on the side table alone, so the chunk is one range
    // scan of its (version, key) index and the live table is probed by
    // key for those rows only. With the LIMIT over the join, the planner
    // may join every pending change first and sort: each chunk of a large
    // transaction then costs as much as the whole transaction.
    format!(
        "SELECT {version}, s.{deleted}, {present}, {side_key_texts}, {values} \
           FROM (SELECT * FROM {side} AS s \
                  WHERE {lower} AND {version} <= ${next}::bigint \
                  ORDER BY {version}, {side_keys} LIMIT ${}::bigint) AS s \
           LEFT JOIN {table} AS t ON {join} \
          WHERE {guard} \
          ORDER BY {version}, {side_keys}",
        next + 1,
        deleted = quote_ident(DELETED_COL),
    )
}

/// Each column as its output text. A plain `::text` cast uses the type's
/// output function for every supported type except boolean, whose cast
/// spells `true`/`false` where the output function (and `pgtext`) use
/// `t`/`f`.
pub(super) fn text_exprs(alias: &str, columns: &[&SourceColumn]) -> String {
    columns
        .iter()
        .map(|c| {
            let col = format!("{alias}.{}", quote_ident(&c.column.name));
            match c.column.data_type {
                ColumnType::Bool => format!("CASE WHEN {col} THEN 't' WHEN NOT {col} THEN 'f' END"),
                _ => format!("{col}::text"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first::text::<type>, ...`: key parameters travel as text and are cast
/// to the column's own type, so comparisons use the column's operators and
/// collation.
fn key_casts(key_cols: &[&SourceColumn], first: usize) -> String {
    key_cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::text::{}", first + i, c.native_type))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A cursor key as PostgreSQL text, checked against the key's types. A bad
/// key means a corrupt cursor, which retrying cannot fix.
pub(super) fn key_texts(shown: &str, key_cols: &[&SourceColumn], key: &Key) -> Result<Vec<Option<String>>, SourceError> {
    if key.0.len() != key_cols.len() {
        return Err(SourceError::new(
            SourceErrorKind::Fatal,
            format!(
                "cursor key {key} of table {shown} has {} values; the primary key has {} columns",
                key.0.len(),
                key_cols.len()
            ),
        ));
    }
    key.0
        .iter()
        .zip(key_cols)
        .map(|(v, c)| match to_pg_text(v, &c.column.data_type) {
            Ok(Some(text)) => Ok(Some(text)),
            Ok(None) => Err(format!("key column {} is null", quote_ident(&c.column.name))),
            Err(e) => Err(format!("key column {}: {e}", quote_ident(&c.column.name))),
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| {
            SourceError::new(
                SourceErrorKind::Fatal,
                format!("cursor key {key} of table {shown} is invalid: {e}"),
            )
        })
}

/// Decodes `columns.len()` text columns starting at `offset`. A value the
/// protocol cannot carry is a `Data` error naming table, column and key
/// (`key_positions` index into `columns`).
fn decode_columns(
    row: &Row,
    offset: usize,
    columns: &[SourceColumn],
    shown: &str,
    key_positions: &[usize],
) -> Result<Vec<Value>, SourceError> {
    let texts = (0..columns.len())
        .map(|i| row.try_get::<_, Option<&str>>(offset + i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pg_error(e, &format!("decoding a row of table {shown}"), ""))?;
    texts
        .iter()
        .zip(columns)
        .map(|(text, col)| {
            from_pg_text(*text, &col.column.data_type).map_err(|e| {
                let key: Vec<&str> = key_positions.iter().map(|&p| texts[p].unwrap_or("NULL")).collect();
                SourceError::new(
                    SourceErrorKind::Data,
                    format!("table {shown}, column {}, key {key:?}: {e}", quote_ident(&col.column.name)),
                )
            })
        })
        .collect()
}

pub(super) async fn read_transaction(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await
}

/// Runs `statement` through a portal and converts rows until the row or
/// byte bound is reached. A row that would push the chunk past
/// `max_bytes` is left for the next chunk, unless it is the first: a chunk
/// always holds at least one row when one exists.
async fn fetch_bounded<T, F>(
    tx: &Transaction<'_>,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
    limits: ChunkLimits,
    (doing, grant): (&str, &str),
    mut convert: F,
) -> Result<Vec<T>, SourceError>
where
    F: FnMut(&Row) -> Result<(T, usize), SourceError>,
{
    let err = |e| pg_error(e, doing, grant);
    let max_rows = limits.max_rows.max(1);
    let portal = tx.bind(statement, params).await.map_err(err)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut fetch = FIRST_FETCH.min(max_rows);
    loop {
        let rows = tx.query_portal(&portal, fetch as i32).await.map_err(err)?;
        let exhausted = rows.len() < fetch;
        for row in &rows {
            let (item, size) = convert(row)?;
            if !out.is_empty() && bytes + size > limits.max_bytes {
                return Ok(out);
            }
            bytes += size;
            out.push(item);
            if out.len() >= max_rows || bytes >= limits.max_bytes {
                return Ok(out);
            }
        }
        if exhausted {
            return Ok(out);
        }
        let average = (bytes / out.len().max(1)).max(1);
        fetch = ((limits.max_bytes - bytes) / average).clamp(1, MAX_FETCH).min(max_rows - out.len());
    }
}

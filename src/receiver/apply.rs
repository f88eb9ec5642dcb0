//! The RowData call: apply one batch and its cursor in one transaction.
//!
//! The receiver owns the cursor, so the batch is a compare-and-set: it is
//! applied only if the table stands exactly at the batch's `from`, and a
//! batch that was already applied (its answer got lost) is acknowledged
//! without writing anything. Every value is checked against the stored
//! schema before the first write, so a bad batch is refused whole with a
//! message naming the row, and PostgreSQL's own refusals (precision, CHECK
//! constraints the partner added) roll the whole batch back.

use super::copy;
use super::ddl;
use super::error::{ErrorKind, ReceiverError};
use super::sql::{ident_list, qualified, quote_ident};
use super::reload;
use super::store;
use crate::ids::TenantId;
use crate::pgtext::to_pg_text;
use crate::protocol::{ChangeCounts, Cursor, Key, RowBatch, RowBatchResponse, RowChange, TableSchema, Value};
use std::collections::HashSet;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

/// A batch checked against its schema and turned into one text array per
/// column, the shape the `unnest` statements take.
#[derive(Debug, Default, PartialEq)]
pub struct Prepared {
    /// One array per column, one element per upserted row.
    pub upserts: Vec<Vec<Option<String>>>,
    /// One array per key column, one element per deleted row.
    pub deletes: Vec<Vec<Option<String>>>,
    /// The keys of the upserted rows, in array order, for error messages.
    pub upsert_keys: Vec<Key>,
    /// The keys of the deleted rows, in array order.
    pub delete_keys: Vec<Key>,
}

impl Prepared {
    pub fn upsert_count(&self) -> usize {
        self.upserts.first().map_or(0, Vec::len)
    }
    pub fn delete_count(&self) -> usize {
        self.deletes.first().map_or(0, Vec::len)
    }
}

/// The `i`th element of every array: one row in the statements' shape.
fn single(arrays: &[Vec<Option<String>>], i: usize) -> Vec<Vec<Option<String>>> {
    arrays.iter().map(|a| vec![a[i].clone()]).collect()
}

/// Checks every row of the batch against the table's schema: value counts,
/// each value's wire form for its column type, NULLs where the schema has
/// none, keys that appear twice, and versions past the batch's cursor.
pub fn prepare(schema: &TableSchema, batch: &RowBatch) -> Result<Prepared, ReceiverError> {
    let key_pos = schema.key_positions();
    let to_version = batch.to.version();
    let mut out = Prepared {
        upserts: vec![Vec::new(); schema.columns.len()],
        deletes: vec![Vec::new(); key_pos.len()],
        ..Prepared::default()
    };
    let mut seen_keys: HashSet<Vec<Option<String>>> = HashSet::new();
    let refuse = |i: usize, key: Option<&Key>, msg: String| {
        let at = match key {
            Some(k) => format!("row {i} (key {k})"),
            None => format!("row {i}"),
        };
        ReceiverError::bad_request(format!("table {:?}, {at}: {msg}", schema.name))
            .with_table(&schema.name)
            .with_key(key.cloned())
    };

    for (i, change) in batch.rows.iter().enumerate() {
        match change {
            RowChange::Upsert { version, values } => {
                let key = (values.len() == schema.columns.len())
                    .then(|| Key(key_pos.iter().map(|&p| values[p].clone()).collect()));
                if *version > to_version {
                    return Err(refuse(
                        i,
                        key.as_ref(),
                        format!("version {version} is past the batch's cursor {}", batch.to),
                    ));
                }
                if values.len() != schema.columns.len() {
                    return Err(refuse(
                        i,
                        None,
                        format!("expected {} values, one per column, got {}", schema.columns.len(), values.len()),
                    ));
                }
                let mut texts = Vec::with_capacity(values.len());
                for (col, value) in schema.columns.iter().zip(values) {
                    texts.push(column_text(col, value).map_err(|m| refuse(i, key.as_ref(), m))?);
                }
                let key_texts: Vec<Option<String>> = key_pos.iter().map(|&p| texts[p].clone()).collect();
                if !seen_keys.insert(key_texts) {
                    return Err(refuse(i, key.as_ref(), "the key appears twice in this batch".into()));
                }
                for (array, text) in out.upserts.iter_mut().zip(texts) {
                    array.push(text);
                }
                out.upsert_keys.push(key.expect("value count checked above"));
            }
            RowChange::Delete { version, key } => {
                if *version > to_version {
                    return Err(refuse(
                        i,
                        Some(key),
                        format!("version {version} is past the batch's cursor {}", batch.to),
                    ));
                }
                if key.0.len() != key_pos.len() {
                    return Err(refuse(
                        i,
                        Some(key),
                        format!("expected a key of {} values, got {}", key_pos.len(), key.0.len()),
                    ));
                }
                let mut texts = Vec::with_capacity(key_pos.len());
                for (&p, value) in key_pos.iter().zip(&key.0) {
                    texts.push(column_text(&schema.columns[p], value).map_err(|m| refuse(i, Some(key), m))?);
                }
                if !seen_keys.insert(texts.clone()) {
                    return Err(refuse(i, Some(key), "the key appears twice in this batch".into()));
                }
                for (array, text) in out.deletes.iter_mut().zip(texts) {
                    array.push(text);
                }
                out.delete_keys.push(key.clone());
            }
        }
    }
    Ok(out)
}

/// One value as PostgreSQL text, refusing NULL where the schema says the
/// column cannot hold it (key columns never can).
fn column_text(col: &crate::protocol::ColumnSchema, value: &Value) -> Result<Option<String>, String> {
    let text = to_pg_text(value, &col.data_type).map_err(|e| format!("column {:?}: {e}", col.name))?;
    if text.is_none() && !col.nullable {
        return Err(format!("column {:?} is not nullable but the value is null", col.name));
    }
    Ok(text)
}

/// `unnest($1::text[], $2::text[], ...) AS s(c0, c1, ...)`, with parameters
/// numbered from `first`.
fn unnest_source(count: usize, first: usize) -> String {
    let arrays: Vec<String> = (0..count).map(|i| format!("${}::text[]", first + i)).collect();
    let names: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    format!("unnest({}) AS s({})", arrays.join(", "), names.join(", "))
}

/// The DELETE of a batch's deleted keys. Keys are cast to the columns'
/// declared types so they compare exactly as stored values do.
pub fn delete_sql(mirror: &str, schema: &TableSchema) -> String {
    let key_cols: Vec<&str> = schema.primary_key.iter().map(String::as_str).collect();
    let casts: Vec<String> = schema
        .key_positions()
        .iter()
        .enumerate()
        .map(|(i, &p)| format!("s.c{i}::{}", ddl::pg_type(&schema.columns[p].data_type)))
        .collect();
    format!(
        "DELETE FROM {} WHERE ({}) IN (SELECT {} FROM {})",
        qualified(mirror, &schema.name),
        ident_list(key_cols.iter().copied()),
        casts.join(", "),
        unnest_source(key_cols.len(), 1)
    )
}

/// The upsert of a batch's rows. `RETURNING (xmax = 0)` is true for a
/// freshly inserted row and false for one the conflict clause updated.
pub fn upsert_sql(mirror: &str, schema: &TableSchema) -> String {
    let cols = ident_list(schema.columns.iter().map(|c| c.name.as_str()));
    let casts: Vec<String> =
        schema.columns.iter().enumerate().map(|(i, c)| format!("s.c{i}::{}", ddl::input_type(&c.data_type))).collect();
    let non_key: Vec<String> = schema
        .columns
        .iter()
        .filter(|c| !schema.primary_key.contains(&c.name))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
        .collect();
    let on_conflict =
        if non_key.is_empty() { "DO NOTHING".to_owned() } else { format!("DO UPDATE SET {}", non_key.join(", ")) };
    format!(
        "INSERT INTO {} ({cols}) SELECT {} FROM {} ON CONFLICT ({}) {on_conflict} RETURNING (xmax = 0)",
        qualified(mirror, &schema.name),
        casts.join(", "),
        unnest_source(schema.columns.len(), 1),
        ident_list(schema.primary_key.iter().map(String::as_str))
    )
}

fn params(arrays: &[Vec<Option<String>>]) -> Vec<&(dyn ToSql + Sync)> {
    arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

async fn write(
    tx: &Transaction<'_>,
    mirror: &str,
    schema: &TableSchema,
    prepared: &Prepared,
    snapshot: bool,
) -> Result<ChangeCounts, tokio_postgres::Error> {
    let mut counts = ChangeCounts::default();
    if snapshot && prepared.delete_count() == 0 && prepared.upsert_count() > 0 {
        // A key the table already holds would mean the scan repeated
        // itself; then the upsert below settles it rather than failing.
        tx.batch_execute("SAVEPOINT ctmirror_copy").await?;
        match copy::copy_in(tx, mirror, schema, &prepared.upserts).await {
            Ok(n) => {
                tx.batch_execute("RELEASE SAVEPOINT ctmirror_copy").await?;
                counts.inserted = n;
                return Ok(counts);
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tracing::warn!("a full-load batch repeats keys the table holds; applying it as upserts");
                tx.batch_execute("ROLLBACK TO SAVEPOINT ctmirror_copy").await?;
            }
            Err(e) => return Err(e),
        }
    }
    if prepared.delete_count() > 0 {
        counts.deleted = tx.execute(&delete_sql(mirror, schema), &params(&prepared.deletes)).await?;
    }
    if prepared.upsert_count() > 0 {
        let rows = tx.query(&upsert_sql(mirror, schema), &params(&prepared.upserts)).await?;
        let inserted = rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
        counts.inserted = inserted;
        // With DO NOTHING an existing row returns nothing; it was upserted
        // to the values it already had, which counts as an update.
        counts.updated = prepared.upsert_count() as u64 - inserted;
    }
    Ok(counts)
}

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    batch: &RowBatch,
) -> Result<RowBatchResponse, ReceiverError> {
    let table = batch.table.as_str();
    let tx = client.transaction().await?;
    let row = store::lock_table(&tx, tenant, table).await?.ok_or_else(|| {
        ReceiverError::new(
            ErrorKind::UnknownTable,
            format!("table {table:?} is not in the mirror; send its schema first"),
        )
        .with_table(table)
    })?;
    if row.schema_hash != batch.schema_hash {
        return Err(ReceiverError::new(
            ErrorKind::SchemaMismatch,
            format!(
                "batch for table {table:?} follows schema {}, but the mirror table has schema {}",
                batch.schema_hash, row.schema_hash
            ),
        )
        .with_table(table));
    }
    if row.cursor.as_ref() == Some(&batch.to) {
        tracing::info!(cursor = %batch.to, "batch already applied; nothing written");
        return Ok(RowBatchResponse { cursor: batch.to.clone(), applied: false, counts: ChangeCounts::default() });
    }
    if row.cursor != batch.from {
        return Err(ReceiverError::new(
            ErrorKind::Conflict,
            format!(
                "batch for table {table:?} starts at {}, but the mirror holds {}",
                show(batch.from.as_ref()),
                show(row.cursor.as_ref())
            ),
        )
        .with_table(table)
        .with_cursor(row.cursor));
    }
    Cursor::may_advance(row.cursor.as_ref(), &batch.to)
        .map_err(|e| ReceiverError::bad_request(format!("table {table:?}: {e}")).with_table(table))?;
    let prepared = prepare(&row.schema, batch)?;
    let target = reload::target_schema(tenant, &row);
    let counts = match write(&tx, &target, &row.schema, &prepared, batch.to.is_snapshot()).await {
        Ok(counts) => counts,
        Err(e) => {
            let e = write_error(e, table);
            drop(tx);
            if e.kind == ErrorKind::Unprocessable {
                return Err(locate(client, &target, &row.schema, &prepared).await.unwrap_or(e));
            }
            return Err(e);
        }
    };
    // The batch that ends a reload's snapshot moves the loaded shadow in,
    // in the same transaction as its rows and cursor.
    let swapped = row.reloading && !batch.to.is_snapshot();
    if swapped {
        reload::swap(&tx, tenant, table).await?;
    }
    store::set_cursor(&tx, tenant, table, Some(&batch.to)).await?;
    tx.commit().await.map_err(|e| ReceiverError::from(e).with_table(table))?;
    tracing::info!(
        inserted = counts.inserted,
        updated = counts.updated,
        deleted = counts.deleted,
        cursor = %batch.to,
        shadow = row.reloading && !swapped,
        "batch applied"
    );
    Ok(RowBatchResponse { cursor: batch.to.clone(), applied: true, counts })
}

/// SQLSTATEs of a mirror table that no longer has the shape its
/// bookkeeping says (the partner dropped the table, a column or the key,
/// or changed a type): a reload rebuilds it.
fn is_drift(code: &str) -> bool {
    matches!(code, "42P01" | "42703" | "42P10" | "42804" | "42883")
}

fn write_error(e: tokio_postgres::Error, table: &str) -> ReceiverError {
    let drift = e.code().is_some_and(|c| is_drift(c.code()));
    let base = ReceiverError::from(e).with_table(table);
    if drift {
        ReceiverError::new(
            ErrorKind::NeedsReload,
            format!("mirror table {table:?} no longer matches its schema ({}); it needs a reload", base.message),
        )
        .with_table(table)
    } else {
        base
    }
}

/// Rows tried one by one at most, to name the row PostgreSQL refused.
const LOCATE_LIMIT: usize = 20_000;

/// After PostgreSQL refused a batch, finds the first row it refuses by
/// applying the rows one at a time (in the batch's order, each under a
/// savepoint) in a transaction that is always rolled back. Costs one
/// statement per row, and only when a batch already failed. `None` when no
/// single row fails (a deferred constraint, say) or the batch is too large.
async fn locate(
    client: &mut tokio_postgres::Client,
    target: &str,
    schema: &TableSchema,
    prepared: &Prepared,
) -> Option<ReceiverError> {
    if prepared.delete_count() + prepared.upsert_count() > LOCATE_LIMIT {
        return None;
    }
    let mut tx = client.transaction().await.ok()?;
    let steps = [
        (delete_sql(target, schema), &prepared.deletes, &prepared.delete_keys),
        (upsert_sql(target, schema), &prepared.upserts, &prepared.upsert_keys),
    ];
    for (sql, arrays, keys) in steps {
        if keys.is_empty() {
            continue;
        }
        let statement = tx.prepare(&sql).await.ok()?;
        for (i, key) in keys.iter().enumerate() {
            let one = single(arrays, i);
            let sp = tx.transaction().await.ok()?;
            if let Err(e) = sp.query(&statement, &params(&one)).await {
                let e = ReceiverError::from(e);
                return Some(
                    ReceiverError::new(
                        e.kind,
                        format!("table {:?}, key {key}: {}; nothing of the batch was applied", schema.name, e.message),
                    )
                    .with_table(&schema.name)
                    .with_key(Some(key.clone())),
                );
            }
            sp.commit().await.ok()?;
        }
    }
    None
}

fn show(c: Option<&Cursor>) -> String {
    c.map_or_else(|| "no cursor".to_owned(), Cursor::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ColumnSchema, ColumnType, Version};

    fn schema() -> TableSchema {
        TableSchema {
            name: "t".into(),
            columns: vec![
                ColumnSchema { name: "id".into(), data_type: ColumnType::Int32, nullable: false },
                ColumnSchema { name: "v".into(), data_type: ColumnType::Text { max_length: None }, nullable: true },
            ],
            primary_key: vec!["id".into()],
        }
    }

    fn batch(rows: Vec<RowChange>) -> RowBatch {
        RowBatch {
            table: "t".into(),
            schema_hash: schema().hash(),
            from: None,
            to: Cursor::Changes { version: Version(5), after_key: None },
            rows,
        }
    }

    fn up(values: Vec<Value>) -> RowChange {
        RowChange::Upsert { version: Version(1), values }
    }

    #[test]
    fn a_valid_batch_becomes_column_arrays() {
        let p = prepare(
            &schema(),
            &batch(vec![
                up(vec![Value::Int(1), Value::Text("a".into())]),
                up(vec![Value::Int(2), Value::Null]),
                RowChange::Delete { version: Version(2), key: Key(vec![Value::Int(3)]) },
            ]),
        )
        .unwrap();
        assert_eq!(p.upserts, vec![vec![Some("1".into()), Some("2".into())], vec![Some("a".into()), None]]);
        assert_eq!(p.deletes, vec![vec![Some("3".into())]]);
    }

    #[test]
    fn contradictions_name_the_row() {
        let cases = [
            (vec![up(vec![Value::Int(1)])], "row 0: expected 2 values"),
            (vec![up(vec![Value::Null, Value::Null])], "not nullable"),
            (vec![up(vec![Value::Text("x".into()), Value::Null])], "column \"id\""),
            (
                vec![
                    up(vec![Value::Int(1), Value::Null]),
                    RowChange::Delete { version: Version(1), key: Key(vec![Value::Int(1)]) },
                ],
                "row 1 (key [1]): the key appears twice",
            ),
            (vec![RowChange::Delete { version: Version(9), key: Key(vec![Value::Int(1)]) }], "past the batch's cursor"),
            (vec![RowChange::Delete { version: Version(1), key: Key(vec![]) }], "key of 1 values"),
        ];
        for (rows, expected) in cases {
            let e = prepare(&schema(), &batch(rows)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(expected), "{} does not contain {expected}", e.message);
        }
    }

    #[test]
    fn statements_use_unnest_and_quote_names() {
        let s = schema();
        assert_eq!(
            upsert_sql("mirror_a", &s),
            "INSERT INTO \"mirror_a\".\"t\" (\"id\", \"v\") SELECT s.c0::integer, s.c1::text FROM unnest($1::text[], $2::text[]) AS s(c0, c1) ON CONFLICT (\"id\") DO UPDATE SET \"v\" = EXCLUDED.\"v\" RETURNING (xmax = 0)"
        );
        assert_eq!(
            delete_sql("mirror_a", &s),
            "DELETE FROM \"mirror_a\".\"t\" WHERE (\"id\") IN (SELECT s.c0::integer FROM unnest($1::text[]) AS s(c0))"
        );
        let mut keys_only = s.clone();
        keys_only.columns.truncate(1);
        assert!(upsert_sql("m", &keys_only).contains("DO NOTHING"));
    }
}

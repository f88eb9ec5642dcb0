//! The RowData call: apply one batch and its cursor in one transaction.
//!
//! The receiver owns the cursor, so the batch is a compare-and-set: it is
//! applied only if the table stands exactly at the batch's `from`, and a
//! batch that was already applied (its answer got lost) is acknowledged
//! without writing anything. A batch comes as JSON ([`RowBatch`], every
//! value checked against the stored schema here, then turned into COPY
//! text) or as COPY data ([`CopyBatch`], checked by PostgreSQL's own
//! receive functions); both are written by [`copy`], and PostgreSQL's
//! refusals (precision, CHECK constraints the partner added) roll the whole
//! batch back.

use super::copy::{self, Rows, WriteError};
use super::error::{ErrorKind, ReceiverError};
use super::reload;
use super::store;
use crate::ids::TenantId;
use crate::pgtext::to_pg_text;
use crate::protocol::copy::{CopyBatch, CopyFormat, Layout, TextRows};
use crate::protocol::{ChangeCounts, Cursor, Key, RowBatch, RowBatchResponse, RowChange, TableSchema};
use std::collections::HashSet;

/// Checks every row of a JSON batch against the table's schema (value
/// counts, each value's wire form for its column type, NULLs where the
/// schema has none, keys that appear twice, versions past the batch's
/// cursor) and turns it into COPY text in the batch's layout.
pub fn prepare(schema: &TableSchema, batch: &RowBatch) -> Result<Rows, ReceiverError> {
    let key_pos = schema.key_positions();
    let to_version = batch.to.version();
    let layout = Layout::of(&batch.to);
    let mut out = TextRows::new();
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
        let (version, key, values) = match change {
            RowChange::Upsert { version, values } => {
                if values.len() != schema.columns.len() {
                    return Err(refuse(
                        i,
                        None,
                        format!("expected {} values, one per column, got {}", schema.columns.len(), values.len()),
                    ));
                }
                (version, Key(key_pos.iter().map(|&p| values[p].clone()).collect()), Some(values))
            }
            RowChange::Delete { version, key } => {
                if layout == Layout::Rows {
                    return Err(refuse(i, Some(key), "a full-load batch holds rows, not deletes".into()));
                }
                if key.0.len() != key_pos.len() {
                    return Err(refuse(
                        i,
                        Some(key),
                        format!("expected a key of {} values, got {}", key_pos.len(), key.0.len()),
                    ));
                }
                (version, key.clone(), None)
            }
        };
        if *version > to_version {
            return Err(refuse(i, Some(&key), format!("version {version} is past the batch's cursor {}", batch.to)));
        }
        let mut key_texts = Vec::with_capacity(key_pos.len());
        for (&p, value) in key_pos.iter().zip(&key.0) {
            let col = &schema.columns[p];
            match to_pg_text(value, &col.data_type) {
                Ok(Some(t)) => key_texts.push(Some(t)),
                Ok(None) => return Err(refuse(i, Some(&key), format!("column {:?} is not nullable but the value is null", col.name))),
                Err(e) => return Err(refuse(i, Some(&key), format!("column {:?}: {e}", col.name))),
            }
        }
        if !seen_keys.insert(key_texts) {
            return Err(refuse(i, Some(&key), "the key appears twice in this batch".into()));
        }
        let pushed = match (layout, values) {
            (Layout::Rows, Some(values)) => out.push_row(schema, values),
            (Layout::Changes, Some(values)) => out.push_upsert(schema, version.0, values),
            (_, None) => out.push_delete(schema, version.0, &key.0),
        };
        pushed.map_err(|m| refuse(i, Some(&key), m))?;
    }
    Ok(Rows {
        format: CopyFormat::Text,
        layout,
        count: out.rows(),
        payload: out.into_bytes().into(),
        to_version,
        staged: false,
    })
}

/// The parts of a batch the transaction needs, whichever its encoding.
pub struct Batch<'a> {
    pub table: &'a str,
    pub schema_hash: &'a str,
    pub from: Option<&'a Cursor>,
    pub to: &'a Cursor,
    /// Rows of a COPY batch; a JSON batch's are prepared once its schema
    /// is known.
    rows: Source<'a>,
}

enum Source<'a> {
    Json(&'a RowBatch),
    Copy(Rows),
}

impl<'a> Batch<'a> {
    pub fn json(b: &'a RowBatch) -> Self {
        Batch { table: &b.table, schema_hash: &b.schema_hash, from: b.from.as_ref(), to: &b.to, rows: Source::Json(b) }
    }

    pub fn copy(b: &'a CopyBatch) -> Self {
        let h = &b.header;
        Batch {
            table: &h.table,
            schema_hash: &h.schema_hash,
            from: h.from.as_ref(),
            to: &h.to,
            rows: Source::Copy(Rows {
                format: h.format,
                layout: b.layout(),
                payload: b.payload.clone(),
                count: h.rows,
                to_version: h.to.version(),
                staged: false,
            }),
        }
    }

    pub(super) fn rows(&self, schema: &TableSchema) -> Result<Rows, ReceiverError> {
        match &self.rows {
            Source::Json(b) => prepare(schema, b),
            Source::Copy(rows) => Ok(rows.clone()),
        }
    }
}

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    batch: &Batch<'_>,
) -> Result<RowBatchResponse, ReceiverError> {
    match apply_once(client, tenant, batch, false).await {
        Err(Retry::Staged) => {
            tracing::warn!("a full-load batch repeats keys the table holds; applying it as upserts");
            apply_once(client, tenant, batch, true).await.map_err(Retry::into_error)
        }
        other => other.map_err(Retry::into_error),
    }
}

/// Why one attempt at a batch ended without an answer.
enum Retry {
    /// The straight COPY met a key the table holds: go again through staging.
    Staged,
    Failed(ReceiverError),
}

impl Retry {
    fn into_error(self) -> ReceiverError {
        match self {
            Retry::Failed(e) => e,
            Retry::Staged => ReceiverError::internal("a batch repeated keys even when staged"),
        }
    }
}

impl From<ReceiverError> for Retry {
    fn from(e: ReceiverError) -> Self {
        Retry::Failed(e)
    }
}

impl From<tokio_postgres::Error> for Retry {
    fn from(e: tokio_postgres::Error) -> Self {
        Retry::Failed(e.into())
    }
}

async fn apply_once(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    batch: &Batch<'_>,
    staged: bool,
) -> Result<RowBatchResponse, Retry> {
    let table = batch.table;
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
        .with_table(table)
        .into());
    }
    if row.cursor.as_ref() == Some(batch.to) {
        tracing::info!(cursor = %batch.to, "batch already applied; nothing written");
        return Ok(RowBatchResponse { cursor: batch.to.clone(), applied: false, counts: ChangeCounts::default() });
    }
    if row.cursor.as_ref() != batch.from {
        return Err(ReceiverError::new(
            ErrorKind::Conflict,
            format!(
                "batch for table {table:?} starts at {}, but the mirror holds {}",
                show(batch.from),
                show(row.cursor.as_ref())
            ),
        )
        .with_table(table)
        .with_cursor(row.cursor)
        .into());
    }
    Cursor::may_advance(row.cursor.as_ref(), batch.to)
        .map_err(|e| ReceiverError::bad_request(format!("table {table:?}: {e}")).with_table(table))?;
    let mut rows = batch.rows(&row.schema).map_err(|e| e.with_table(table))?;
    rows.staged = staged;
    let target = reload::target_schema(tenant, &row);
    let counts = match copy::write(&tx, &target, &row.schema, &rows).await {
        Ok(counts) => counts,
        Err(WriteError::Refused(e)) => {
            return Err(ReceiverError::new(e.kind, format!("table {table:?}: {}", e.message))
                .with_table(table)
                .with_key(e.key)
                .into())
        }
        Err(WriteError::RepeatedKeys) if !staged => return Err(Retry::Staged),
        Err(WriteError::RepeatedKeys) => return Err(ReceiverError::internal("a staged batch repeated keys").into()),
        Err(WriteError::Database(e)) => {
            let e = write_error(e, table);
            drop(tx);
            if e.kind == ErrorKind::Unprocessable {
                return Err(copy::locate(client, &target, &row.schema, &rows).await.unwrap_or(e).into());
            }
            return Err(e.into());
        }
    };
    // The batch that ends a reload's snapshot moves the loaded shadow in,
    // in the same transaction as its rows and cursor.
    let swapped = row.reloading && !batch.to.is_snapshot();
    if swapped {
        reload::swap(&tx, tenant, table).await?;
    }
    store::set_cursor(&tx, tenant, table, Some(batch.to)).await?;
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

fn show(c: Option<&Cursor>) -> String {
    c.map_or_else(|| "no cursor".to_owned(), Cursor::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ColumnSchema, ColumnType, Value, Version};

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
    fn a_valid_json_batch_becomes_copy_text_in_the_changes_layout() {
        let p = prepare(
            &schema(),
            &batch(vec![
                up(vec![Value::Int(1), Value::Text("a".into())]),
                up(vec![Value::Int(2), Value::Null]),
                RowChange::Delete { version: Version(2), key: Key(vec![Value::Int(3)]) },
            ]),
        )
        .unwrap();
        assert_eq!((p.format, p.layout, p.count, p.to_version), (CopyFormat::Text, Layout::Changes, 3, Version(5)));
        assert_eq!(String::from_utf8(p.payload.to_vec()).unwrap(), "1\tf\t1\ta\n1\tf\t2\t\\N\n2\tt\t3\t\\N\n");
    }

    #[test]
    fn a_full_load_batch_holds_rows_only() {
        let mut b = batch(vec![up(vec![Value::Int(1), Value::Null])]);
        b.to = Cursor::Snapshot { version: Version(5), after_key: Some(Key(vec![Value::Int(1)])) };
        let p = prepare(&schema(), &b).unwrap();
        assert_eq!((p.layout, String::from_utf8(p.payload.to_vec()).unwrap()), (Layout::Rows, "1\t\\N\n".to_owned()));
        b.rows.push(RowChange::Delete { version: Version(1), key: Key(vec![Value::Int(2)]) });
        assert!(prepare(&schema(), &b).unwrap_err().message.contains("holds rows, not deletes"));
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
}

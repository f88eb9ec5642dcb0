//! Writing a batch's rows: `COPY … FROM STDIN`, straight into the table or
//! through a staging table.
//!
//! Every batch reaches the database as COPY data (JSON batches are turned
//! into COPY text first), so there is one write path:
//!
//! - a full-load batch ([`Layout::Rows`]) only adds rows the table cannot
//!   hold yet (the keyset scan sends keys past the cursor, and batch and
//!   cursor commit together), so it is copied straight into the table. If a
//!   key is there after all (a repeated scan), the caller rolls back and
//!   applies the batch again through staging, as upserts. (Not a savepoint:
//!   rows written under one carry subtransaction ids that every later
//!   reader of the table pays to resolve.);
//! - a changes batch ([`Layout::Changes`]) is copied into a temporary
//!   staging table, checked there with a few set-based queries, and applied
//!   with one `DELETE … USING` and one `INSERT … ON CONFLICT DO UPDATE`.
//!
//! COPY applies each column's input or receive function with its type
//! modifier, and the INSERT from staging assigns to the typed columns, so a
//! value too long, too precise or NULL where it cannot be is refused by
//! PostgreSQL exactly as an assignment would refuse it.

use super::ddl;
use super::error::ReceiverError;
use super::sql::{ident_list, qualified, quote_ident};
use crate::pgtext::from_pg_text;
use crate::protocol::copy::{CopyFormat, Layout, BINARY_HEADER, BINARY_TRAILER};
use crate::protocol::{ChangeCounts, ColumnType, Key, TableSchema, Value, Version};
use bytes::Bytes;
use futures_util::SinkExt;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Transaction};

/// A batch's rows, still in COPY format.
#[derive(Debug, Clone)]
pub struct Rows {
    pub format: CopyFormat,
    pub layout: Layout,
    pub payload: Bytes,
    /// How many rows the sender says the payload holds.
    pub count: u64,
    /// Upsert through staging even when the layout allows a straight COPY.
    pub staged: bool,
    /// The batch's `to` version: no change may be newer.
    pub to_version: Version,
}

/// Why a write failed: the batch contradicts itself (refused whole, no
/// point in looking further), or the database refused it.
#[derive(Debug)]
pub enum WriteError {
    Refused(ReceiverError),
    Database(tokio_postgres::Error),
    /// A full-load batch holds a key the table already has; the transaction
    /// is spoilt and the batch must go again with `staged` set.
    RepeatedKeys,
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Database(e)
    }
}

/// Writes the rows into `target`.`schema.name` within `tx`.
pub async fn write(
    tx: &Transaction<'_>,
    target: &str,
    schema: &TableSchema,
    rows: &Rows,
) -> Result<ChangeCounts, WriteError> {
    if rows.count == 0 {
        return Ok(ChangeCounts::default());
    }
    check_text(rows)?;
    if rows.layout == Layout::Rows && !rows.staged {
        return match copy_in(tx, &direct_copy_sql(target, schema, rows.format), rows).await {
            Ok(n) => {
                check_count(rows, n)?;
                Ok(ChangeCounts { inserted: n, ..ChangeCounts::default() })
            }
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(WriteError::RepeatedKeys),
            Err(e) => Err(e.into()),
        };
    }
    let stage = Stage::new(target, schema);
    stage.load(tx, rows).await?;
    let mix = stage.check(tx, rows).await?;
    stage.apply(tx, None, mix).await.map_err(WriteError::from)
}

/// Sends the payload (framed as a whole binary COPY stream when binary);
/// returns the number of rows PostgreSQL read.
async fn copy_in(tx: &Transaction<'_>, sql: &str, rows: &Rows) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    if rows.format == CopyFormat::Binary {
        sink.feed(Bytes::from_static(BINARY_HEADER)).await?;
        sink.feed(rows.payload.clone()).await?;
        sink.feed(Bytes::from_static(BINARY_TRAILER)).await?;
    } else {
        sink.feed(rows.payload.clone()).await?;
    }
    sink.finish().await
}

/// Text COPY stops at a line `\.` and silently ignores what follows, so a
/// payload holding one would have part of it dropped without a word. Data
/// never needs that line: a backslash in a value is always escaped.
pub(super) fn check_text(rows: &Rows) -> Result<(), WriteError> {
    if rows.format == CopyFormat::Text
        && rows.payload.split(|b| *b == b'\n').any(|line| line == b"\\." || line == b"\\.\r")
    {
        return Err(WriteError::Refused(ReceiverError::bad_request(
            "the rows hold an end-of-data line (\\.); COPY would ignore what follows it",
        )));
    }
    Ok(())
}

fn check_count(rows: &Rows, copied: u64) -> Result<(), WriteError> {
    if copied == rows.count {
        return Ok(());
    }
    Err(WriteError::Refused(ReceiverError::bad_request(format!(
        "the batch announces {} rows but its data holds {copied}",
        rows.count
    ))))
}

pub fn direct_copy_sql(target: &str, schema: &TableSchema, format: CopyFormat) -> String {
    format!(
        "COPY {} ({}) FROM STDIN (FORMAT {})",
        qualified(target, &schema.name),
        ident_list(schema.columns.iter().map(|c| c.name.as_str())),
        format.sql()
    )
}

/// The temporary table a batch is staged in. One per connection, target
/// and schema, created on first use and emptied at every commit, so a
/// batch costs no catalog writes once its connection has seen the table.
pub struct Stage<'a> {
    target: &'a str,
    schema: &'a TableSchema,
    name: String,
}

impl<'a> Stage<'a> {
    pub fn new(target: &'a str, schema: &'a TableSchema) -> Self {
        let mut h = Sha256::new();
        for part in [target, &schema.name, &schema.hash()] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let name = format!("ctmirror_stage_{}", &hex::encode(h.finalize())[..20]);
        Stage { target, schema, name }
    }

    fn table(&self) -> String {
        quote_ident(&self.name)
    }

    fn column(i: usize) -> String {
        format!("c{i}")
    }

    /// Columns without their modifiers and without NOT NULL: staging takes
    /// anything the receive functions take, and the assignment to the real
    /// table is where lengths, precision and NULLs are judged.
    pub fn create_sql(&self) -> String {
        let cols: Vec<String> = self
            .schema
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} {}", Self::column(i), ddl::input_type(&c.data_type)))
            .collect();
        format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} (ctm_version bigint, ctm_deleted boolean NOT NULL DEFAULT false, {}) \
             ON COMMIT DELETE ROWS",
            self.table(),
            cols.join(", ")
        )
    }

    pub fn copy_sql(&self, layout: Layout, format: CopyFormat) -> String {
        let mut cols: Vec<String> = (0..self.schema.columns.len()).map(Self::column).collect();
        if layout == Layout::Changes {
            cols.splice(0..0, ["ctm_version".to_owned(), "ctm_deleted".to_owned()]);
        }
        format!("COPY {} ({}) FROM STDIN (FORMAT {})", self.table(), cols.join(", "), format.sql())
    }

    async fn load(&self, tx: &Transaction<'_>, rows: &Rows) -> Result<(), WriteError> {
        tx.batch_execute(&format!("SET LOCAL client_min_messages = warning; {}", self.create_sql())).await?;
        let n = copy_in(tx, &self.copy_sql(rows.layout, rows.format), rows).await?;
        check_count(rows, n)
    }

    /// `s.c<k> = t.<key>` for every key column.
    fn key_match(&self) -> String {
        self.schema
            .key_positions()
            .iter()
            .map(|&p| format!("t.{} = s.{}", quote_ident(&self.schema.columns[p].name), Self::column(p)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// What the database cannot see from the table's constraints: versions
    /// past the batch's cursor, changes without a version, deleted keys
    /// with a NULL, and a key both deleted and upserted in one batch.
    async fn check(&self, tx: &Transaction<'_>, rows: &Rows) -> Result<Mix, WriteError> {
        if rows.layout == Layout::Rows {
            return Ok(Mix { deletes: false, upserts: true });
        }
        let null_key = self
            .schema
            .key_positions()
            .iter()
            .map(|&p| format!("{} IS NULL", Self::column(p)))
            .collect::<Vec<_>>()
            .join(" OR ");
        let sql = format!(
            "SELECT max(ctm_version), coalesce(bool_or(ctm_version IS NULL), false), \
                    coalesce(bool_or(ctm_deleted AND ({null_key})), false), \
                    count(*) FILTER (WHERE ctm_deleted) > 0, count(*) FILTER (WHERE NOT ctm_deleted) > 0 \
               FROM {}",
            self.table()
        );
        let row = tx.query_one(&sql, &[]).await?;
        let (max, null_version, null_key): (Option<i64>, bool, bool) = (row.get(0), row.get(1), row.get(2));
        let mix = Mix { deletes: row.get(3), upserts: row.get(4) };
        let mixed = mix.deletes && mix.upserts;
        let refuse = |m: String| Err(WriteError::Refused(ReceiverError::bad_request(m)));
        if null_version {
            return refuse("a change in the batch has no version".into());
        }
        if let Some(max) = max.filter(|m| *m > rows.to_version.0) {
            return refuse(format!("a change has version {max}, past the batch's cursor version {}", rows.to_version));
        }
        if null_key {
            return refuse("a deleted row's key has a NULL".into());
        }
        if mixed {
            let both = format!(
                "SELECT {} FROM {} AS s JOIN {} AS t ON {} WHERE s.ctm_deleted AND NOT t.ctm_deleted LIMIT 1",
                self.key_texts("s"),
                self.table(),
                self.table(),
                self.stage_key_match(),
            );
            if let Some(row) = tx.query_opt(&both, &[]).await? {
                let key = self.key_of(&row, 0);
                return Err(WriteError::Refused(
                    ReceiverError::bad_request(format!("key {key} is both deleted and upserted in this batch"))
                        .with_key(Some(key)),
                ));
            }
        }
        Ok(mix)
    }

    /// Key equality between two aliases of the staging table.
    fn stage_key_match(&self) -> String {
        self.schema
            .key_positions()
            .iter()
            .map(|&p| format!("t.{c} = s.{c}", c = Self::column(p)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The key columns of staging alias `alias` as text (booleans spelled
    /// as `pgtext` reads them).
    fn key_texts(&self, alias: &str) -> String {
        self.schema
            .key_positions()
            .iter()
            .map(|&p| {
                let c = format!("{alias}.{}", Self::column(p));
                match self.schema.columns[p].data_type {
                    ColumnType::Bool => format!("CASE WHEN {c} THEN 't' WHEN NOT {c} THEN 'f' END"),
                    _ => format!("{c}::text"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key in columns `first..` of `row`, as protocol values (text when
    /// a value does not decode, which only an error message sees).
    fn key_of(&self, row: &tokio_postgres::Row, first: usize) -> Key {
        Key(self
            .schema
            .key_positions()
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let text: Option<String> = row.get(first + i);
                from_pg_text(text.as_deref(), &self.schema.columns[p].data_type)
                    .unwrap_or_else(|_| text.map_or(Value::Null, Value::Text))
            })
            .collect())
    }

    fn delete_sql(&self, only: &str) -> String {
        format!(
            "DELETE FROM {} AS t USING {} AS s WHERE s.ctm_deleted AND {}{only}",
            qualified(self.target, &self.schema.name),
            self.table(),
            self.key_match()
        )
    }

    fn upsert_sql(&self, only: &str) -> String {
        let cols = ident_list(self.schema.columns.iter().map(|c| c.name.as_str()));
        let values: Vec<String> = (0..self.schema.columns.len()).map(|i| format!("s.{}", Self::column(i))).collect();
        let non_key: Vec<String> = self
            .schema
            .columns
            .iter()
            .filter(|c| !self.schema.primary_key.contains(&c.name))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect();
        let on_conflict =
            if non_key.is_empty() { "DO NOTHING".to_owned() } else { format!("DO UPDATE SET {}", non_key.join(", ")) };
        // `xmax = 0` is true for a freshly inserted row and false for one
        // the conflict clause updated.
        format!(
            "WITH w AS (INSERT INTO {} ({cols}) SELECT {} FROM {} AS s WHERE NOT s.ctm_deleted{only} \
             ON CONFLICT ({}) {on_conflict} RETURNING (xmax = 0) AS fresh) \
             SELECT count(*) FILTER (WHERE fresh), (SELECT count(*) FROM {} AS s WHERE NOT s.ctm_deleted{only}) FROM w",
            qualified(self.target, &self.schema.name),
            values.join(", "),
            self.table(),
            ident_list(self.schema.primary_key.iter().map(String::as_str)),
            self.table(),
        )
    }

    /// Deletes, then upserts, the staged rows (only the one at `ctid` when
    /// given); a statement with nothing to do is not run.
    async fn apply(
        &self,
        tx: &impl GenericClient,
        ctid: Option<&str>,
        mix: Mix,
    ) -> Result<ChangeCounts, tokio_postgres::Error> {
        let only = if ctid.is_some() { " AND s.ctid = $1::text::tid" } else { "" };
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match &ctid {
            Some(c) => vec![c],
            None => vec![],
        };
        let deleted = if mix.deletes { tx.execute(&self.delete_sql(only), &params).await? } else { 0 };
        if !mix.upserts {
            return Ok(ChangeCounts { deleted, ..ChangeCounts::default() });
        }
        let row = tx.query_one(&self.upsert_sql(only), &params).await?;
        let (inserted, upserts): (i64, i64) = (row.get(0), row.get(1));
        // With DO NOTHING an existing row returns nothing; it was upserted
        // to the values it already had, which counts as an update.
        Ok(ChangeCounts { inserted: inserted as u64, updated: (upserts - inserted) as u64, deleted })
    }
}

/// Which kinds of rows a staged batch holds.
#[derive(Debug, Clone, Copy)]
struct Mix {
    deletes: bool,
    upserts: bool,
}

/// Rows tried one by one at most, to name the row PostgreSQL refused.
const LOCATE_LIMIT: i64 = 20_000;

/// After PostgreSQL refused a batch, finds the first row it refuses: the
/// batch is staged again in a transaction that is always rolled back, and
/// its rows are applied one at a time, each under a savepoint. Costs one
/// statement per row, and only when a batch already failed. `None` when no
/// single row fails (a deferred constraint, say), the batch is too large,
/// or staging itself fails (the COPY error already names the line).
pub async fn locate(
    client: &mut tokio_postgres::Client,
    target: &str,
    schema: &TableSchema,
    rows: &Rows,
) -> Option<ReceiverError> {
    if rows.count as i64 > LOCATE_LIMIT {
        return None;
    }
    let mut tx = client.transaction().await.ok()?;
    let stage = Stage::new(target, schema);
    stage.load(&tx, rows).await.ok()?;
    let list = format!("SELECT ctid::text, {} FROM {} AS s ORDER BY ctid", stage.key_texts("s"), stage.table());
    let staged = tx.query(&list, &[]).await.ok()?;
    for row in &staged {
        let ctid: String = row.get(0);
        let sp = tx.transaction().await.ok()?;
        if let Err(e) = stage.apply(&sp, Some(&ctid), Mix { deletes: true, upserts: true }).await {
            let key = stage.key_of(row, 1);
            let e = ReceiverError::from(e);
            return Some(
                ReceiverError::new(
                    e.kind,
                    format!("table {:?}, key {key}: {}; nothing of the batch was applied", schema.name, e.message),
                )
                .with_table(&schema.name)
                .with_key(Some(key)),
            );
        }
        sp.commit().await.ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ColumnSchema;

    fn schema() -> TableSchema {
        TableSchema {
            name: "a\"b".into(),
            columns: vec![
                ColumnSchema { name: "select".into(), data_type: ColumnType::Int32, nullable: false },
                ColumnSchema { name: "v".into(), data_type: ColumnType::Text { max_length: Some(3) }, nullable: true },
            ],
            primary_key: vec!["select".into()],
        }
    }

    #[test]
    fn direct_copy_names_every_column_quoted() {
        assert_eq!(
            direct_copy_sql("m", &schema(), CopyFormat::Binary),
            "COPY \"m\".\"a\"\"b\" (\"select\", \"v\") FROM STDIN (FORMAT binary)"
        );
    }

    #[test]
    fn staging_has_unmodified_nullable_types_and_a_name_per_schema() {
        let s = schema();
        let stage = Stage::new("m", &s);
        assert!(stage.create_sql().contains("(ctm_version bigint, ctm_deleted boolean NOT NULL DEFAULT false, c0 integer, c1 text) ON COMMIT DELETE ROWS"));
        assert_eq!(stage.copy_sql(Layout::Changes, CopyFormat::Text), format!("COPY {} (ctm_version, ctm_deleted, c0, c1) FROM STDIN (FORMAT text)", stage.table()));
        assert_eq!(stage.copy_sql(Layout::Rows, CopyFormat::Binary), format!("COPY {} (c0, c1) FROM STDIN (FORMAT binary)", stage.table()));
        let mut other = s.clone();
        other.columns[1].nullable = false;
        assert_ne!(Stage::new("m", &other).name, stage.name);
        assert_ne!(Stage::new("n", &s).name, stage.name);
    }

    #[test]
    fn apply_statements_match_keys_and_quote_names() {
        let s = schema();
        let stage = Stage::new("m", &s);
        let t = stage.table();
        assert_eq!(
            stage.delete_sql(""),
            format!("DELETE FROM \"m\".\"a\"\"b\" AS t USING {t} AS s WHERE s.ctm_deleted AND t.\"select\" = s.c0")
        );
        let up = stage.upsert_sql("");
        assert!(up.starts_with(&format!("WITH w AS (INSERT INTO \"m\".\"a\"\"b\" (\"select\", \"v\") SELECT s.c0, s.c1 FROM {t} AS s WHERE NOT s.ctm_deleted ON CONFLICT (\"select\") DO UPDATE SET \"v\" = EXCLUDED.\"v\" RETURNING (xmax = 0) AS fresh)")), "{up}");
        let mut keys_only = s.clone();
        keys_only.columns.truncate(1);
        assert!(Stage::new("m", &keys_only).upsert_sql("").contains("DO NOTHING"));
    }
}

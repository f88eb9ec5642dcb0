//! Sources: the tenant databases whose changes the agent mirrors.
//!
//! One trait with exactly what a cycle needs, so the cycle never learns which
//! database it reads. Both backends follow SQL Server Change Tracking's
//! semantics: a table's changes are *net* changes per primary key (the latest
//! version and whether the row is gone), versions only grow, and changes older
//! than the table's min valid version are no longer available.

pub mod mssql;
pub mod postgres;

use crate::protocol::copy::{CopyFormat, TextRows};
use crate::protocol::{ColumnSchema, Key, TableSchema, Value, Version};
use std::future::Future;

/// The database server (`host:port`) a tenant's connection string names:
/// tenants on one server share its per-server limits.
pub fn server_address(kind: crate::config::SourceKind, conn: &str) -> Result<String, SourceError> {
    match kind {
        crate::config::SourceKind::Postgres => postgres::PostgresSource::server_address(conn),
        crate::config::SourceKind::Sqlserver => mssql::client::server_address(conn),
    }
}

/// A table in the source database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceTable {
    /// `None` means the backend's default schema (`public`, `dbo`).
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A mapped column as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub column: ColumnSchema,
    /// The backend's own spelling of the type (`character varying(20)`,
    /// `nvarchar(50)`), used where the backend must cast key parameters.
    pub native_type: String,
}

/// The projection of a source table that the schema map allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSchema {
    pub table: SourceTable,
    /// Mapped columns in source order.
    pub columns: Vec<SourceColumn>,
    /// Primary-key column names in key order.
    pub primary_key: Vec<String>,
}

impl SourceSchema {
    /// The schema as sent to the receiver under the mirror table's name.
    pub fn to_protocol(&self, mirror_name: &str) -> TableSchema {
        TableSchema {
            name: mirror_name.to_owned(),
            columns: self.columns.iter().map(|c| c.column.clone()).collect(),
            primary_key: self.primary_key.clone(),
        }
    }

    pub fn key_positions(&self) -> Vec<usize> {
        self.primary_key
            .iter()
            .map(|k| self.columns.iter().position(|c| &c.column.name == k).expect("key column is mapped"))
            .collect()
    }

    pub fn key_columns(&self) -> Vec<&SourceColumn> {
        self.key_positions().into_iter().map(|i| &self.columns[i]).collect()
    }

    /// The key of a full row (values in column order).
    pub fn key_of(&self, values: &[Value]) -> Key {
        Key(self.key_positions().into_iter().map(|i| values[i].clone()).collect())
    }
}

/// What enabling change tracking found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingState {
    /// Tracking was off and has just been turned on: no earlier cursor can be
    /// trusted for this table.
    pub newly_enabled: bool,
    /// The table's tracking lifetime, where the backend tells them apart:
    /// it changes whenever tracking is reinstalled, so a cursor stored
    /// with another generation belongs to an earlier lifetime and the
    /// table must reload. Part of the per-table source identity the
    /// receiver stores ([`table_identity`]).
    pub generation: Option<String>,
    /// Why the current generation replaced an earlier one (the capture was
    /// damaged: a trigger reset, a rewrite, a key change), for the reload's
    /// reason; `None` when tracking was simply enabled.
    pub installed_because: Option<String>,
}

/// The identity the receiver stores with a table's rows: the source's
/// identity, plus the table's tracking generation where there is one.
/// The source part changes when the database is restored or replaced (every
/// table reloads); the generation when only this table's tracking was
/// reinstalled (this table reloads, for every application).
pub fn table_identity(source_identity: &str, generation: Option<&str>) -> String {
    match generation {
        Some(g) => format!("{source_identity}/{g}"),
        None => source_identity.to_owned(),
    }
}

/// The source part of a stored table identity (see [`table_identity`]).
pub fn source_part(table_identity: &str) -> &str {
    table_identity.split_once('/').map_or(table_identity, |(s, _)| s)
}

/// How much one chunk may hold. The byte bound is what keeps memory flat on
/// wide rows; at least one row is always returned if one exists.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// A position in a table's change stream: every change at or before
/// (`version`, `after_key`) is consumed; no key means the whole version is.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePosition {
    pub version: Version,
    pub after_key: Option<Key>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RowOp {
    /// The row exists; its mapped values in column order.
    Upsert(Vec<Value>),
    Delete,
}

/// One net change: the latest version of a key and what the row is now.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub version: Version,
    pub key: Key,
    pub op: RowOp,
}

impl ChangeRow {
    pub fn wire_size(&self) -> usize {
        let values = match &self.op {
            RowOp::Upsert(v) => v.iter().map(Value::wire_size).sum(),
            RowOp::Delete => self.key.0.iter().map(Value::wire_size).sum::<usize>(),
        };
        values + 40
    }
}

/// A transaction that holds back the readable version of a whole server.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OldestTransaction {
    /// How long it has been running (prepared: since it was prepared).
    pub age_secs: f64,
    /// Its database, where visible.
    pub database: Option<String>,
    /// The backend's process id; `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// `active`, `idle in transaction`, `prepared` (as `gid`), …, where
    /// visible.
    pub state: Option<String>,
}

impl std::fmt::Display for OldestTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a transaction running for {:.0} s", self.age_secs)?;
        if let Some(d) = &self.database {
            write!(f, " in database {d}")?;
        }
        if let Some(p) = self.pid {
            write!(f, ", pid {p}")?;
        }
        if let Some(s) = &self.state {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

/// What a cycle learns about a table up front (see [`Source::survey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSurvey {
    /// `None`: not known here; the table asks [`Source::min_valid_version`].
    pub min_valid: Option<Version>,
    /// `false` only when the source knows no change waits after the
    /// version given: the table's cursor just moves to the cycle's end.
    pub may_have_changes: bool,
}

impl TableSurvey {
    pub const UNKNOWN: TableSurvey = TableSurvey { min_valid: None, may_have_changes: true };
}

/// A chunk of rows already in the wire's COPY encoding (see
/// [`crate::protocol::copy`]), with where the next chunk starts.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyChunk {
    pub format: CopyFormat,
    /// The rows, in the layout of the batch they go into: mapped columns
    /// for a snapshot chunk; version, deleted flag and mapped columns for a
    /// changes chunk.
    pub payload: Vec<u8>,
    pub rows: u64,
    /// The key of the last row; `None` when the chunk is empty.
    pub last_key: Option<Key>,
    /// The version of the last change (changes chunks only).
    pub last_version: Option<Version>,
}

impl CopyChunk {
    /// No rows: the batch that only moves a cursor.
    pub fn empty() -> CopyChunk {
        CopyChunk { format: CopyFormat::Binary, payload: Vec::new(), rows: 0, last_key: None, last_version: None }
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Values read by a backend that does not speak COPY, as text rows.
    pub fn from_rows(schema: &SourceSchema, rows: Vec<Vec<Value>>) -> Result<CopyChunk, SourceError> {
        let mirror = schema.to_protocol("");
        let mut text = TextRows::new();
        let mut last_key = None;
        for values in &rows {
            let key = schema.key_of(values);
            text.push_row(&mirror, values).map_err(|e| data_error(schema, &key, e))?;
            last_key = Some(key);
        }
        Ok(CopyChunk { format: CopyFormat::Text, rows: text.rows(), payload: text.into_bytes(), last_key, last_version: None })
    }

    /// Net changes read by a backend that does not speak COPY, as text rows.
    pub fn from_changes(schema: &SourceSchema, changes: Vec<ChangeRow>) -> Result<CopyChunk, SourceError> {
        let mirror = schema.to_protocol("");
        let mut text = TextRows::new();
        let mut last = None;
        for c in changes {
            let pushed = match &c.op {
                RowOp::Upsert(values) => text.push_upsert(&mirror, c.version.0, values),
                RowOp::Delete => text.push_delete(&mirror, c.version.0, &c.key.0),
            };
            pushed.map_err(|e| data_error(schema, &c.key, e))?;
            last = Some((c.version, c.key));
        }
        let (last_version, last_key) = last.map_or((None, None), |(v, k)| (Some(v), Some(k)));
        Ok(CopyChunk { format: CopyFormat::Text, rows: text.rows(), payload: text.into_bytes(), last_key, last_version })
    }
}

fn data_error(schema: &SourceSchema, key: &Key, e: String) -> SourceError {
    SourceError::new(SourceErrorKind::Data, format!("table {}, key {key}: {e}", schema.table))
}

/// Whether retrying can help. Drives what the agent does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceErrorKind {
    /// Connection lost, timeout, serialization failure: try again later.
    Transient,
    /// The table or its mapping cannot be mirrored as configured (missing
    /// table or column, no primary key, unsupported type, permission):
    /// an operator must act.
    Config,
    /// A value that the protocol cannot carry.
    Data,
    /// The changes after the cursor are no longer complete at the source
    /// (retention cleanup ran past it): the table needs a full reload.
    Expired,
    /// Anything else; not retried automatically.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: SourceErrorKind,
    pub message: String,
}

impl SourceError {
    pub fn new(kind: SourceErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(SourceErrorKind::Config, message)
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == SourceErrorKind::Transient
    }
}

/// One tenant database. Methods take `&mut self` because a backend holds one
/// connection and runs one statement at a time.
pub trait Source: Send {
    /// Changes when the database is replaced by a restore; stored by the
    /// receiver so a replaced source can be detected.
    fn identity(&mut self) -> impl Future<Output = Result<String, SourceError>> + Send;

    /// Turns change tracking on for a table (idempotent). A table without a
    /// primary key is refused with a `Config` error.
    fn ensure_tracking(
        &mut self,
        table: &SourceTable,
    ) -> impl Future<Output = Result<TrackingState, SourceError>> + Send;

    /// Reads the physical schema of the named columns only. A named column
    /// that does not exist, an unmapped primary-key column or an unsupported
    /// type is a `Config` error naming the column.
    fn read_schema(
        &mut self,
        table: &SourceTable,
        columns: &[String],
    ) -> impl Future<Output = Result<SourceSchema, SourceError>> + Send;

    /// The newest version whose changes are all final: no transaction that
    /// could still commit a change at or below it is running.
    fn current_version(&mut self) -> impl Future<Output = Result<Version, SourceError>> + Send;

    /// The oldest version from which this table's changes are still complete.
    /// A cursor below it must reload the table.
    fn min_valid_version(
        &mut self,
        table: &SourceTable,
    ) -> impl Future<Output = Result<Version, SourceError>> + Send;

    /// Housekeeping the backend needs before a cycle (retention cleanup for
    /// the PostgreSQL backend; nothing where the server does it itself).
    fn maintain(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Records that `application` reads exactly `tables` now. A backend that
    /// installs its own capture untracks a table once no application reads
    /// it any more; the default records nothing.
    fn record_readers(
        &mut self,
        application: &str,
        tables: &[SourceTable],
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = (application, tables);
        async { Ok(()) }
    }

    /// Turns change tracking off for a table on an operator's request,
    /// removing what the backend installed for it. `Ok(false)` when it was
    /// not tracked.
    fn untrack(&mut self, table: &SourceTable) -> impl Future<Output = Result<bool, SourceError>> + Send {
        let shown = table.to_string();
        async move {
            Err(SourceError::config(format!(
                "this source cannot untrack {shown} itself; turn its change tracking off in the database"
            )))
        }
    }

    /// The oldest transaction on the server that holds back the readable
    /// version (see [`Source::current_version`]): while it runs, no change
    /// after it reaches any mirror of any tenant on the server. `None` when
    /// none does, or the backend cannot tell.
    fn oldest_transaction(&mut self) -> impl Future<Output = Result<Option<OldestTransaction>, SourceError>> + Send {
        async { Ok(None) }
    }

    /// Rows in primary-key order strictly after `after` (from the start when
    /// `None`), values in schema column order.
    fn snapshot_chunk(
        &mut self,
        schema: &SourceSchema,
        after: Option<&Key>,
        limits: ChunkLimits,
    ) -> impl Future<Output = Result<Vec<Vec<Value>>, SourceError>> + Send;

    /// Net changes strictly after `after` with version ≤ `upper`, ordered by
    /// (version, key).
    fn changes_chunk(
        &mut self,
        schema: &SourceSchema,
        after: &ChangePosition,
        upper: Version,
        limits: ChunkLimits,
    ) -> impl Future<Output = Result<Vec<ChangeRow>, SourceError>> + Send;

    /// For each table, with the version its changes cursor stands at (when
    /// it ends a version): the min valid version and whether changes wait
    /// past it up to `upper`. One round for all tables where the backend
    /// can; the default knows nothing and lets each table ask.
    fn survey(
        &mut self,
        tables: &[(SourceTable, Option<Version>)],
        upper: Version,
    ) -> impl Future<Output = Result<Vec<TableSurvey>, SourceError>> + Send {
        let _ = upper;
        let n = tables.len();
        async move { Ok(vec![TableSurvey::UNKNOWN; n]) }
    }

    /// [`Source::snapshot_chunk`] encoded for the wire. The default encodes
    /// the values as COPY text; a backend that can have its server produce
    /// the encoding (PostgreSQL's binary COPY) does so instead, which is
    /// what makes a full load cost about as much as a raw COPY.
    fn snapshot_copy(
        &mut self,
        schema: &SourceSchema,
        after: Option<&Key>,
        limits: ChunkLimits,
    ) -> impl Future<Output = Result<CopyChunk, SourceError>> + Send {
        async move {
            let rows = self.snapshot_chunk(schema, after, limits).await?;
            CopyChunk::from_rows(schema, rows)
        }
    }

    /// [`Source::changes_chunk`] encoded for the wire (see
    /// [`Source::snapshot_copy`]).
    fn changes_copy(
        &mut self,
        schema: &SourceSchema,
        after: &ChangePosition,
        upper: Version,
        limits: ChunkLimits,
    ) -> impl Future<Output = Result<CopyChunk, SourceError>> + Send {
        async move {
            let changes = self.changes_chunk(schema, after, upper, limits).await?;
            CopyChunk::from_changes(schema, changes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ColumnType;

    fn schema() -> SourceSchema {
        let col = |name: &str, data_type, nullable| SourceColumn {
            column: ColumnSchema { name: name.into(), data_type, nullable },
            native_type: String::new(),
        };
        SourceSchema {
            table: SourceTable { schema: Some("dbo".into()), name: "t".into() },
            columns: vec![
                col("name", ColumnType::Text { max_length: None }, true),
                col("id", ColumnType::Int32, false),
                col("raw", ColumnType::Bytes { max_length: None }, true),
            ],
            primary_key: vec!["id".into()],
        }
    }

    #[test]
    fn values_of_other_backends_become_copy_text_with_the_last_key() {
        let rows = vec![
            vec![Value::Text("a\tb".into()), Value::Int(1), Value::Text("AAE=".into())],
            vec![Value::Null, Value::Int(2), Value::Null],
        ];
        let chunk = CopyChunk::from_rows(&schema(), rows).unwrap();
        assert_eq!((chunk.format, chunk.rows), (CopyFormat::Text, 2));
        assert_eq!(String::from_utf8(chunk.payload).unwrap(), "a\\tb\t1\t\\\\x0001\n\\N\t2\t\\N\n");
        assert_eq!(chunk.last_key, Some(Key(vec![Value::Int(2)])));

        let changes = vec![
            ChangeRow { version: Version(7), key: Key(vec![Value::Int(3)]), op: RowOp::Delete },
            ChangeRow {
                version: Version(8),
                key: Key(vec![Value::Int(4)]),
                op: RowOp::Upsert(vec![Value::Text("x".into()), Value::Int(4), Value::Null]),
            },
        ];
        let chunk = CopyChunk::from_changes(&schema(), changes).unwrap();
        assert_eq!(String::from_utf8(chunk.payload).unwrap(), "7\tt\t\\N\t3\t\\N\n8\tf\tx\t4\t\\N\n");
        assert_eq!((chunk.last_version, chunk.last_key), (Some(Version(8)), Some(Key(vec![Value::Int(4)]))));
    }

    #[test]
    fn a_value_the_wire_cannot_carry_names_table_and_key() {
        let rows = vec![vec![Value::Null, Value::Int(9), Value::Text("not base64!".into())]];
        let e = CopyChunk::from_rows(&schema(), rows).unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Data);
        assert!(e.message.contains("dbo.t") && e.message.contains("[9]") && e.message.contains("\"raw\""), "{}", e.message);
    }
}

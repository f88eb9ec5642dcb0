//! PostgreSQL source backend: trigger-based change tracking with SQL Server
//! Change Tracking's semantics.
//!
//! Everything lives in the tenant database's `ctmirror_ct` schema: a
//! registry of tracked tables, one side table per tracked table holding one
//! row per changed primary key (the version of its latest change and
//! whether the key is gone), capture triggers (statement-level, plus a
//! row-level one for primary-key changes), and a clock of versions for
//! retention.
//!
//! A version is the writing transaction's 64-bit id (`pg_current_xact_id`).
//! Transaction ids are assigned when a transaction starts writing, not when
//! it commits, so a reader must never move past a transaction that is still
//! running: [`Source::current_version`] is the snapshot's `xmin - 1`, below
//! every running transaction, and a late commit is never skipped.
//!
//! Known limits: a partitioned table is tracked through its parent, so
//! `TRUNCATE` of a single partition (which fires no trigger on the parent)
//! is not captured; changing a primary-key column's type or name makes
//! [`Source::ensure_tracking`] reinstall tracking, which forces a reload.
//!
//! Files: `session` (connect), `errors` (error kinds), `sql` (quoting),
//! `install` (schema, identity), `statements` (prepared once per
//! connection), `catalog` (tables, keys, types),
//! `triggers` (side-table DDL), `tracking` (enable), `read` (chunks as
//! values), `copy_read` (chunks as binary COPY for the wire),
//! `survey` (every table's state in two queries), `maintain` (retention).

mod catalog;
mod copy_read;
mod errors;
mod install;
mod maintain;
mod read;
mod session;
mod statements;
mod survey;
mod sql;
mod tracking;
mod triggers;

use crate::protocol::{Key, Value, Version};
use crate::source::{
    ChangePosition, ChangeRow, ChunkLimits, CopyChunk, OldestTransaction, Source, TableSurvey, SourceError, SourceErrorKind, SourceSchema, SourceTable,
    TrackingState,
};
use errors::pg_error;
use std::time::Duration;
use tokio_postgres::Client;

/// One tenant PostgreSQL database, through one connection.
pub struct PostgresSource {
    client: Client,
    retention: Duration,
    /// Whether `ctmirror_ct` is known to be installed on this connection.
    installed: bool,
    widths: copy_read::RowWidths,
    stmts: statements::Statements,
    /// The tracking generation [`Source::ensure_tracking`] found per table:
    /// every change read checks it is still the registered one.
    generations: std::collections::HashMap<SourceTable, String>,
}

impl PostgresSource {
    /// Connects (without TLS) and prepares the session. `retention` is how
    /// long changes are kept for a lagging receiver before it must reload.
    /// `host:port` of the server a URL names (no secrets), for the agent's
    /// per-server limits.
    pub fn server_address(url: &str) -> Result<String, SourceError> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|_| SourceError::config("the PostgreSQL source URL cannot be parsed"))?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.to_lowercase(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        Ok(format!("{host}:{port}"))
    }

    pub async fn connect(url: &str, retention: Duration) -> Result<PostgresSource, SourceError> {
        let client = session::open(url).await?;
        Ok(PostgresSource {
            client,
            retention,
            installed: false,
            widths: Default::default(),
            stmts: Default::default(),
            generations: Default::default(),
        })
    }

    async fn ensure_installed(&mut self) -> Result<(), SourceError> {
        if !self.installed {
            install::install(&mut self.client).await?;
            self.installed = true;
        }
        Ok(())
    }

    /// A configuration error may mean `ctmirror_ct` was dropped under us;
    /// the next call then installs it again instead of failing forever.
    fn recheck_on_config_error<T>(&mut self, result: Result<T, SourceError>) -> Result<T, SourceError> {
        if matches!(&result, Err(e) if e.kind == SourceErrorKind::Config) {
            self.installed = false;
        }
        result
    }
}

impl Source for PostgresSource {
    async fn identity(&mut self) -> Result<String, SourceError> {
        self.ensure_installed().await?;
        let result = install::identity(&self.client).await;
        self.recheck_on_config_error(result)
    }

    async fn ensure_tracking(&mut self, table: &SourceTable) -> Result<TrackingState, SourceError> {
        self.ensure_installed().await?;
        let result = tracking::ensure_tracking(&mut self.client, &self.stmts, table).await;
        if let Ok(TrackingState { generation: Some(g), .. }) = &result {
            self.generations.insert(table.clone(), g.clone());
        }
        self.recheck_on_config_error(result)
    }

    async fn read_schema(
        &mut self,
        table: &SourceTable,
        columns: &[String],
    ) -> Result<SourceSchema, SourceError> {
        catalog::read_schema(&self.client, &self.stmts, table, columns).await
    }

    /// `pg_snapshot_xmin(pg_current_snapshot()) - 1`: xmin is the oldest
    /// transaction still running (or the next id when none is), so every
    /// version at or below the result is final: no transaction that could
    /// still commit a change with such a version is running. Versions of
    /// running transactions are all above it, so a cursor at this version
    /// never passes a transaction that commits later.
    async fn current_version(&mut self) -> Result<Version, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint - 1",
                &[],
            )
            .await
            .map_err(|e| pg_error(e, "reading the current version", ""))?;
        let v: i64 = row.try_get(0).map_err(|e| pg_error(e, "reading the current version", ""))?;
        Ok(Version(v))
    }

    async fn min_valid_version(&mut self, table: &SourceTable) -> Result<Version, SourceError> {
        self.ensure_installed().await?;
        let result = tracking::tracked(&self.client, &self.stmts, table).await.map(|t| t.min_valid_version);
        self.recheck_on_config_error(result)
    }

    async fn maintain(&mut self) -> Result<(), SourceError> {
        self.ensure_installed().await?;
        let result = maintain::maintain(&mut self.client, &self.stmts, self.retention).await;
        self.recheck_on_config_error(result)
    }

    async fn record_readers(&mut self, application: &str, tables: &[SourceTable]) -> Result<(), SourceError> {
        self.ensure_installed().await?;
        let result = maintain::record_readers(&mut self.client, application, tables).await;
        self.recheck_on_config_error(result)
    }

    async fn untrack(&mut self, table: &SourceTable) -> Result<bool, SourceError> {
        self.ensure_installed().await?;
        let result = maintain::untrack(&mut self.client, &self.stmts, table).await;
        self.generations.remove(table);
        self.recheck_on_config_error(result)
    }

    async fn oldest_transaction(&mut self) -> Result<Option<OldestTransaction>, SourceError> {
        survey::oldest_transaction(&self.client).await
    }

    async fn snapshot_chunk(
        &mut self,
        schema: &SourceSchema,
        after: Option<&Key>,
        limits: ChunkLimits,
    ) -> Result<Vec<Vec<Value>>, SourceError> {
        read::snapshot_chunk(&mut self.client, schema, after, limits).await
    }

    async fn changes_chunk(
        &mut self,
        schema: &SourceSchema,
        after: &ChangePosition,
        upper: Version,
        limits: ChunkLimits,
    ) -> Result<Vec<ChangeRow>, SourceError> {
        let expected = self.generations.get(&schema.table).map(String::as_str);
        read::changes_chunk(&mut self.client, &self.stmts, schema, expected, after, upper, limits).await
    }

    async fn survey(
        &mut self,
        tables: &[(SourceTable, Option<Version>)],
        upper: Version,
    ) -> Result<Vec<TableSurvey>, SourceError> {
        self.ensure_installed().await?;
        survey::survey(&self.client, &self.stmts, &self.generations, tables, upper).await
    }

    async fn snapshot_copy(
        &mut self,
        schema: &SourceSchema,
        after: Option<&Key>,
        limits: ChunkLimits,
    ) -> Result<CopyChunk, SourceError> {
        copy_read::snapshot_copy(&mut self.client, &mut self.widths, schema, after, limits).await
    }

    async fn changes_copy(
        &mut self,
        schema: &SourceSchema,
        after: &ChangePosition,
        upper: Version,
        limits: ChunkLimits,
    ) -> Result<CopyChunk, SourceError> {
        let expected = self.generations.get(&schema.table).map(String::as_str);
        copy_read::changes_copy(&mut self.client, &self.stmts, &mut self.widths, schema, expected, after, upper, limits)
            .await
    }
}

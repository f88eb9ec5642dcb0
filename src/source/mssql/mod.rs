//! SQL Server source backend: native Change Tracking, read over tiberius.
//!
//! Follows Microsoft's "Work with change tracking": tracking is turned on
//! for the database (with our retention) and per table, versions come from
//! `CHANGE_TRACKING_CURRENT_VERSION()` and
//! `CHANGE_TRACKING_MIN_VALID_VERSION()`, changes from
//! `CHANGETABLE(CHANGES ...)` joined to the table for current values, and
//! every read runs in a SNAPSHOT transaction so change rows and row values
//! agree. SQL Server cleans up expired changes itself, so
//! [`Source::maintain`] has nothing to do.
//!
//! Versions: the cycle's upper version is read before the chunk
//! transactions start, and every chunk is filtered to versions at or below
//! it. `CHANGE_TRACKING_CURRENT_VERSION()` is the version of the last
//! committed transaction, so every change at or below it is visible to a
//! snapshot that starts afterwards: a cursor never passes a change it has
//! not read.
//!
//! Files: `client` (tiberius behind our own types), `types` (type mapping),
//! `decode` (cells to wire values), `sql` (every statement), `catalog`
//! (schema), `tracking` (enable, versions, identity), `read` (chunks).

pub mod client;
mod catalog;
mod decode;
mod read;
mod sql;
mod tracking;
mod types;

use crate::protocol::{Key, Value, Version};
use crate::source::{
    ChangePosition, ChangeRow, ChunkLimits, Source, SourceError, SourceSchema, SourceTable, TrackingState,
};
use client::MsClient;
use std::time::Duration;

/// One tenant SQL Server database, through one connection.
pub struct SqlServerSource {
    client: MsClient,
    retention: Duration,
    /// Database-level tracking and snapshot isolation are known to be on.
    database_ready: bool,
}

impl SqlServerSource {
    /// Connects with an ADO.NET connection string or a JDBC URL.
    /// `retention` is the change retention set when this agent turns
    /// tracking on for the database (an existing setting is kept).
    pub async fn connect(conn: &str, retention: Duration) -> Result<SqlServerSource, SourceError> {
        let client = MsClient::connect(conn).await?;
        Ok(SqlServerSource { client, retention, database_ready: false })
    }

    /// The underlying client, for tests and ops tools that run their own
    /// statements against the tenant database.
    pub fn client(&mut self) -> &mut MsClient {
        &mut self.client
    }
}

impl Source for SqlServerSource {
    async fn identity(&mut self) -> Result<String, SourceError> {
        tracking::identity(&mut self.client).await
    }

    async fn ensure_tracking(&mut self, table: &SourceTable) -> Result<TrackingState, SourceError> {
        if !self.database_ready {
            tracking::ensure_database(&mut self.client, self.retention).await?;
            self.database_ready = true;
        }
        tracking::ensure_table(&mut self.client, table).await
    }

    async fn read_schema(&mut self, table: &SourceTable, columns: &[String]) -> Result<SourceSchema, SourceError> {
        let catalog = catalog::table_columns(&mut self.client, table).await?;
        catalog::project(table, &catalog, columns)
    }

    async fn current_version(&mut self) -> Result<Version, SourceError> {
        tracking::current_version(&mut self.client).await
    }

    async fn min_valid_version(&mut self, table: &SourceTable) -> Result<Version, SourceError> {
        tracking::min_valid_version(&mut self.client, table).await
    }

    /// SQL Server's own auto cleanup removes expired changes.
    async fn maintain(&mut self) -> Result<(), SourceError> {
        Ok(())
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
        read::changes_chunk(&mut self.client, schema, after, upper, limits).await
    }
}

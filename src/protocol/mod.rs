//! The wire contract between agent and receiver (`docs/protocol.md`).
//!
//! Five operations, after SuperOffice's mirroring client: Authenticate,
//! TableSchema, RowData, Reload (SuperOffice's Wipe, made non-destructive)
//! and ReplicationCompleted. Every request is a
//! JSON `POST` under a versioned path and carries a signed token in the
//! `Authorization` header (see [`crate::auth`]).

pub mod copy;
pub mod cursor;
pub mod schema;
pub mod value;

pub use cursor::{Cursor, Version};
pub use schema::{ColumnSchema, ColumnType, TableSchema};
pub use value::{Key, Value};

use crate::ids::TenantId;
use serde::{Deserialize, Serialize};

/// Path prefix of this protocol version; a breaking change gets `/v2`.
pub const PREFIX: &str = "/v1";

/// The `Authorization` scheme name.
pub const AUTH_SCHEME: &str = "CtMirror";

pub fn authenticate_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/authenticate")
}
pub fn schema_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/schema")
}
pub fn rows_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/rows")
}
pub fn advance_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/advance")
}
pub fn reload_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/reload")
}
pub fn completed_path(tenant: &TenantId) -> String {
    format!("{PREFIX}/tenants/{tenant}/completed")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticateRequest {
    /// Free-form agent software name and version, for the partner's logs.
    pub agent: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticateResponse {
    /// `false` asks the agent to pause this tenant (the receiver is in
    /// maintenance, say); the agent ends the cycle without error.
    pub replicate: bool,
    /// The receiver's signed token over the agent's nonce.
    pub token: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSchemaRequest {
    /// Changes when the source database is replaced (restored from a backup);
    /// the receiver stores it with each table.
    pub source_identity: String,
    /// Every table the application maps. A mirror table not listed here
    /// (nor in `skipped`) counts as dropped.
    pub tables: Vec<TableSchema>,
    /// Mapped tables the agent could not read this cycle (source error). They
    /// are still mapped: the receiver must not drop them.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Per mirror table, the identity to store with its rows when this call
    /// creates or rebuilds it: `source_identity` plus the table's tracking
    /// lifetime, where the source has one. A table not listed stores
    /// `source_identity`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub table_identities: std::collections::BTreeMap<String, String>,
}

impl TableSchemaRequest {
    /// The identity stored with `table`'s rows when this call creates or
    /// rebuilds it.
    pub fn identity_of(&self, table: &str) -> &str {
        self.table_identities.get(table).map_or(&self.source_identity, String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableStatus {
    /// The mirror table was created by this call.
    Created,
    /// The mirror table exists with this exact schema.
    Unchanged,
    /// The schema changed compatibly (a column dropped, widened or made
    /// nullable, columns reordered) and the table was altered in place; its
    /// cursor stands. `message` lists what changed.
    Altered,
    /// A reload into a shadow table is in progress (it was just started for
    /// an incompatible schema change, or an earlier one is not finished):
    /// `cursor` is the shadow's, and the live table stays readable until
    /// the load completes and replaces it. `message` says why.
    Rebuilding,
    /// The receiver cannot take this schema; `message` says why. Rows for
    /// this table will be refused until the schema is acceptable.
    Refused,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableState {
    pub name: String,
    pub status: TableStatus,
    /// The position the receiver holds; `None` means it holds no rows and
    /// needs a full load.
    pub cursor: Option<Cursor>,
    pub schema_hash: String,
    #[serde(default)]
    pub message: Option<String>,
    /// The identity of the source the table's rows came from. `None` when
    /// the answer carries no cursor to judge: a table just created, or one
    /// whose rebuild this call started. A different identity than the agent's
    /// source has now means the source was replaced (restored).
    #[serde(default)]
    pub source_identity: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSchemaResponse {
    pub tables: Vec<TableState>,
    /// Mirror tables the receiver dropped because the map no longer names them.
    pub dropped: Vec<String>,
}

/// One row change. Upserts carry every mapped column in schema order (the key
/// is among them); deletes carry only the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RowChange {
    Upsert { version: Version, values: Vec<Value> },
    Delete { version: Version, key: Key },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowBatch {
    pub table: String,
    /// The schema the rows follow; must equal the receiver's.
    pub schema_hash: String,
    /// The cursor the agent believes the receiver holds. The receiver applies
    /// the batch only if it holds exactly this (compare-and-set).
    pub from: Option<Cursor>,
    /// The cursor the receiver holds once the batch is applied.
    pub to: Cursor,
    pub rows: Vec<RowChange>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeCounts {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
}

impl ChangeCounts {
    pub fn is_empty(&self) -> bool {
        self.inserted + self.updated + self.deleted == 0
    }

    pub fn add(&mut self, other: ChangeCounts) {
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.deleted += other.deleted;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowBatchResponse {
    /// The cursor now committed. The agent continues from here, never from
    /// what it sent.
    pub cursor: Cursor,
    /// `false` when the batch had already been applied (a re-send after a
    /// lost answer); nothing was written.
    pub applied: bool,
    pub counts: ChangeCounts,
}

/// Moves the cursors of tables that have nothing to send to the end of the
/// cycle's change stream, all in one call and one transaction. Without it an
/// idle tenant of many tables costs one RowData call per table per cycle;
/// the cursors still must move, or an idle table would fall behind the
/// source's retention and need a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvanceRequest {
    pub tables: Vec<Advance>,
}

/// One table's move: a RowData batch without rows, limited to the change
/// stream (`from` and `to` are changes cursors, `to` ends a version).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advance {
    pub table: String,
    pub schema_hash: String,
    pub from: Cursor,
    pub to: Cursor,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvanceResponse {
    /// One answer per requested table, in request order.
    pub tables: Vec<AdvanceResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvanceResult {
    pub table: String,
    /// The cursor the receiver holds now (moved or not).
    pub cursor: Option<Cursor>,
    /// `true` when this call moved it.
    pub applied: bool,
    /// Why it did not move (`conflict`, `schema_mismatch`, `unknown_table`,
    /// `bad_request`); the other tables are not affected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Starts a full reload of one table: the receiver prepares an empty shadow
/// table and forgets the cursor, so the next batches (from no cursor) fill
/// the shadow while partners keep reading the live table. The batch that
/// moves the cursor from the snapshot to the change stream swaps the shadow
/// in. Sending Reload again restarts the reload from nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    pub table: String,
    /// Why (retention expired, source restored, operator request), for the
    /// partner's bookkeeping and logs.
    pub reason: String,
    /// The source the new rows come from; stored with the table.
    pub source_identity: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadResponse {
    pub table: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    Full,
    Incremental,
    Idle,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableReport {
    pub name: String,
    pub mode: SyncMode,
    pub counts: ChangeCounts,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedRequest {
    pub tables: Vec<TableReport>,
}

impl CompletedRequest {
    /// Names of the tables whose mirror changed in the cycle.
    pub fn changed_tables(&self) -> Vec<&str> {
        self.tables.iter().filter(|t| !t.counts.is_empty()).map(|t| t.name.as_str()).collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedResponse {
    /// What the receiver's completion hooks did, for the agent's log.
    pub hooks: Vec<String>,
}

/// Every non-2xx answer has this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable: `unauthorized`, `bad_request`, `conflict`,
    /// `schema_mismatch`, `unprocessable`, `needs_reload`, `internal`,
    /// `unavailable` (the full list is in `docs/receiver.md`).
    pub kind: String,
    pub message: String,
    /// Whether sending the same request again may succeed.
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// On `conflict`: what the receiver holds, so the agent can continue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_changes_have_readable_json() {
        let r = RowChange::Delete { version: Version(9), key: Key(vec![Value::Int(1)]) };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"delete","version":9,"key":[1]}"#);
        let r: RowChange =
            serde_json::from_str(r#"{"op":"upsert","version":3,"values":[1,"x",null]}"#).unwrap();
        assert!(matches!(r, RowChange::Upsert { .. }));
    }

    #[test]
    fn garbage_batches_fail_to_decode() {
        for bad in [
            r#"{}"#,
            r#"{"table":"t","schema_hash":"h","from":null,"to":{"phase":"changes","version":1,"after_key":null},"rows":[{"op":"merge","version":1}]}"#,
            r#"{"table":"t","schema_hash":"h","from":null,"to":{"phase":"changes","version":1,"after_key":null},"rows":[],"extra":1}"#,
            r#"{"table":"t","schema_hash":"h","from":null,"to":{"phase":"changes","version":1,"after_key":null},"rows":[{"op":"upsert","version":1,"values":[[1]]}]}"#,
        ] {
            assert!(serde_json::from_str::<RowBatch>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_versioned() {
        let t = TenantId::new("acme").unwrap();
        assert_eq!(rows_path(&t), "/v1/tenants/acme/rows");
    }
}

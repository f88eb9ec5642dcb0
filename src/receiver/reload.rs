//! Reloads that keep the mirror readable.
//!
//! A full reload (an incompatible schema change, retention expiry, a
//! restored source, an operator's resync) never empties the live table.
//! It creates a shadow table of the same name in `ctmirror_load_<tenant>`,
//! the batches of the full load fill the shadow, and the batch that ends the
//! snapshot (the cursor moves to the change stream) drops the live table
//! and moves the shadow into the mirror schema in the same transaction as
//! its rows and cursor. A partner's query sees the old table or the new
//! one, never an empty or half-loaded one. The price is room for two
//! copies of the table while it reloads.

use super::ddl;
use super::error::{ErrorKind, ReceiverError};
use super::sql::{qualified, quote_ident};
use super::store::{self, TableRow};
use crate::ids::TenantId;
use crate::protocol::{ReloadRequest, ReloadResponse, TableSchema};
use tokio_postgres::Transaction;

/// How long the swap waits for partner queries on the live table to end.
/// Waiting longer would queue every new reader behind the swap; giving up
/// is harmless, since the agent re-sends the batch.
const SWAP_LOCK_TIMEOUT: &str = "10s";

/// The schema a batch for this table writes to.
pub fn target_schema(tenant: &TenantId, row: &TableRow) -> String {
    if row.reloading {
        tenant.load_schema()
    } else {
        tenant.mirror_schema()
    }
}

/// The Reload call: restart the table from nothing, into a shadow table.
pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    req: &ReloadRequest,
) -> Result<ReloadResponse, ReceiverError> {
    let table = req.table.as_str();
    if req.reason.len() > 2000 || req.source_identity.len() > 500 {
        return Err(ReceiverError::bad_request("reason or source identity is too long").with_table(table));
    }
    let tx = client.transaction().await?;
    let row = store::lock_table(&tx, tenant, table).await?.ok_or_else(|| {
        ReceiverError::new(ErrorKind::UnknownTable, format!("table {table:?} is not in the mirror")).with_table(table)
    })?;
    begin(&tx, tenant, &row.schema, &req.source_identity, &req.reason).await?;
    tx.commit().await?;
    tracing::info!(reason = %req.reason, "reload started into a shadow table");
    Ok(ReloadResponse { table: req.table.clone() })
}

/// Creates an empty shadow table with `schema` (replacing an unfinished
/// one) and records the reload. The table's bookkeeping row must exist.
pub async fn begin(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    schema: &TableSchema,
    source_identity: &str,
    reason: &str,
) -> Result<(), ReceiverError> {
    let load = tenant.load_schema();
    store::ensure_schema(tx, &load).await.map_err(|e| e.with_table(&schema.name))?;
    tx.batch_execute(&format!(
        "{}; {}",
        ddl::drop_table(&load, &schema.name),
        ddl::create_table(&load, schema)
    ))
    .await
    .map_err(|e| ReceiverError::from(e).with_table(&schema.name))?;
    store::start_reload(tx, tenant, schema, source_identity, reason).await
}

/// Replaces the live table with the loaded shadow, inside the transaction
/// of the batch that completed the snapshot.
pub async fn swap(tx: &Transaction<'_>, tenant: &TenantId, table: &str) -> Result<(), ReceiverError> {
    let mirror = tenant.mirror_schema();
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'; {}; ALTER TABLE {} SET SCHEMA {}",
        ddl::drop_table(&mirror, table),
        qualified(&tenant.load_schema(), table),
        quote_ident(&mirror)
    ))
    .await
    .map_err(|e| swap_error(e, table))?;
    store::finish_reload(tx, tenant, table).await?;
    tracing::info!("reload complete; shadow table swapped in");
    Ok(())
}

fn swap_error(e: tokio_postgres::Error, table: &str) -> ReceiverError {
    let code = e.code().map(|c| c.code().to_owned());
    let base = ReceiverError::from(e).with_table(table);
    match code.as_deref() {
        // Partner objects (views, foreign keys) depend on the live table.
        // Dropping them silently would break the partner's own work, so
        // the reload waits for the partner instead.
        Some("2BP01") => ReceiverError::new(
            ErrorKind::Unprocessable,
            format!(
                "the reloaded table {table:?} cannot replace the live one because other objects depend on it; \
                 drop them (a completion hook can recreate them): {}",
                base.message
            ),
        )
        .with_table(table),
        Some("55P03") => ReceiverError::new(
            ErrorKind::Unavailable,
            format!(
                "the live table {table:?} stayed locked by other queries for {SWAP_LOCK_TIMEOUT}; the swap is \
                 retried with the batch"
            ),
        )
        .with_table(table),
        _ => base,
    }
}

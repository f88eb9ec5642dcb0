//! The Wipe call: empty a mirror table and forget its cursor, so the agent's
//! next batches start a full load from nothing (a restored source, a
//! changed source identity).

use super::error::{ErrorKind, ReceiverError};
use super::sql::qualified;
use super::store;
use crate::ids::TenantId;
use crate::protocol::{WipeRequest, WipeResponse};

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    req: &WipeRequest,
) -> Result<WipeResponse, ReceiverError> {
    let table = req.table.as_str();
    let tx = client.transaction().await?;
    store::lock_table(&tx, tenant, table).await?.ok_or_else(|| {
        ReceiverError::new(ErrorKind::UnknownTable, format!("table {table:?} is not in the mirror")).with_table(table)
    })?;
    let mirror = tenant.mirror_schema();
    // The partner may have dropped the table by hand; then there is nothing
    // to empty, and the next schema call recreates it.
    let rows_removed = if store::physical_tables(&tx, &mirror).await?.contains(table) {
        let name = qualified(&mirror, table);
        // TRUNCATE takes an exclusive lock first, so the count is exact.
        tx.batch_execute(&format!("LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")).await?;
        let count: i64 = tx.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await?.get(0);
        tx.batch_execute(&format!("TRUNCATE {name}")).await?;
        count as u64
    } else {
        0
    };
    store::set_cursor(&tx, tenant, table, None).await?;
    tx.commit().await?;
    tracing::info!(rows_removed, "table wiped");
    Ok(WipeResponse { table: req.table.clone(), rows_removed })
}

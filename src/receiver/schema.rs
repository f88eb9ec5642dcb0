//! The TableSchema call: create mirror tables, report the cursor of each,
//! and retire tables the application no longer maps.
//!
//! Everything happens in one transaction (PostgreSQL DDL is transactional),
//! so a failure leaves neither half-created tables nor bookkeeping rows
//! that point at nothing.

use super::ddl;
use super::error::ReceiverError;
use super::sql::quote_ident;
use super::store::{self, TableRow};
use crate::ids::TenantId;
use crate::protocol::{TableSchema, TableSchemaRequest, TableSchemaResponse, TableState, TableStatus};
use std::collections::{HashMap, HashSet};

/// Checks every table before anything is written: a request with one bad
/// table is refused whole, so the mirror never holds half a schema call.
pub fn validate(req: &TableSchemaRequest) -> Result<(), ReceiverError> {
    let mut names = HashSet::new();
    for t in &req.tables {
        t.validate().map_err(|e| ReceiverError::bad_request(e).with_table(&t.name))?;
        if !names.insert(t.name.as_str()) {
            return Err(ReceiverError::bad_request(format!("table {:?} appears twice", t.name)).with_table(&t.name));
        }
    }
    if let Some(both) = req.skipped.iter().find(|s| names.contains(s.as_str())) {
        return Err(ReceiverError::bad_request(format!("table {both:?} is both sent and skipped")).with_table(both));
    }
    Ok(())
}

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    req: &TableSchemaRequest,
    drop_unmapped: bool,
) -> Result<TableSchemaResponse, ReceiverError> {
    validate(req)?;
    let mirror = tenant.mirror_schema();
    let tx = client.transaction().await?;
    store::lock_tenant(&tx, tenant).await?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&mirror))).await?;
    let known: HashMap<String, TableRow> =
        store::lock_all(&tx, tenant).await?.into_iter().map(|r| (r.name.clone(), r)).collect();
    let physical = store::physical_tables(&tx, &mirror).await?;

    let mut states = Vec::with_capacity(req.tables.len());
    for table in &req.tables {
        let state = match known.get(&table.name) {
            None => {
                // A same-named table without a bookkeeping row is a leftover
                // (of a crashed receiver or a hand-made copy): its rows have
                // no cursor, so they cannot be trusted.
                if physical.contains(&table.name) {
                    tx.batch_execute(&ddl::drop_table(&mirror, &table.name)).await.map_err(|e| db(e, table))?;
                }
                create(&tx, tenant, &mirror, table, &req.source_identity).await?
            }
            Some(row) if row.schema_hash == table.hash() => {
                if physical.contains(&table.name) {
                    store::set_source_identity(&tx, tenant, &table.name, &req.source_identity).await?;
                    state(table, TableStatus::Unchanged, row.cursor.clone(), None)
                } else {
                    // The partner dropped the mirror table: start it over.
                    create(&tx, tenant, &mirror, table, &req.source_identity).await?
                }
            }
            Some(row) => {
                store::set_source_identity(&tx, tenant, &table.name, &req.source_identity).await?;
                let message = format!(
                    "schema of table {:?} changed ({}); schema evolution is not supported yet",
                    table.name,
                    ddl::describe_change(&row.schema, table)
                );
                let mut s = state(table, TableStatus::Refused, row.cursor.clone(), Some(message));
                // Report the hash the receiver holds: the one batches must name.
                s.schema_hash = row.schema_hash.clone();
                s
            }
        };
        tracing::info!(table = %table.name, status = ?state.status, "table schema");
        states.push(state);
    }

    // Skipped tables are still mapped (the agent could not read them this
    // cycle): they are neither dropped nor touched.
    let listed: HashSet<&str> =
        req.tables.iter().map(|t| t.name.as_str()).chain(req.skipped.iter().map(String::as_str)).collect();
    let mut dropped: Vec<String> = known.keys().filter(|n| !listed.contains(n.as_str())).cloned().collect();
    dropped.sort();
    for name in &dropped {
        if drop_unmapped {
            tx.batch_execute(&ddl::drop_table(&mirror, name)).await?;
            store::forget_table(&tx, tenant, name).await?;
            tracing::info!(table = %name, "dropped unmapped mirror table");
        } else {
            tracing::info!(table = %name, "kept unmapped mirror table (drop_unmapped_tables = false)");
        }
    }
    tx.commit().await?;
    Ok(TableSchemaResponse { tables: states, dropped })
}

async fn create(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &TenantId,
    mirror: &str,
    table: &TableSchema,
    source_identity: &str,
) -> Result<TableState, ReceiverError> {
    tx.batch_execute(&ddl::create_table(mirror, table)).await.map_err(|e| db(e, table))?;
    store::upsert_created(tx, tenant, table, source_identity).await?;
    Ok(state(table, TableStatus::Created, None, None))
}

fn state(
    table: &TableSchema,
    status: TableStatus,
    cursor: Option<crate::protocol::Cursor>,
    message: Option<String>,
) -> TableState {
    TableState { name: table.name.clone(), status, cursor, schema_hash: table.hash(), message }
}

fn db(e: tokio_postgres::Error, table: &TableSchema) -> ReceiverError {
    ReceiverError::from(e).with_table(&table.name)
}

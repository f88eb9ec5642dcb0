//! The TableSchema call: create mirror tables, evolve them when the source
//! schema changed (`evolve` decides in place or rebuild), report the cursor
//! of each, and retire tables the application no longer maps.
//!
//! Everything happens in one transaction (PostgreSQL DDL is transactional),
//! so a failure leaves neither half-created tables nor bookkeeping rows
//! that point at nothing.

use super::ddl;
use super::error::{ErrorKind, ReceiverError};
use super::evolve::{self, Evolution, Step};
use super::reload;
use super::store::{self, TableRow};
use crate::config::ReceiverConfig;
use crate::ids::TenantId;
use crate::protocol::{TableSchema, TableSchemaRequest, TableSchemaResponse, TableState, TableStatus};
use std::collections::{HashMap, HashSet};
use tokio_postgres::Transaction;

/// Checks every table before anything is written: a request with one bad
/// table is refused whole, so the mirror never holds half a schema call.
pub fn validate(req: &TableSchemaRequest) -> Result<(), ReceiverError> {
    // The same bound a Reload puts on it: the identity is stored with every
    // table and compared on every call.
    if req.source_identity.is_empty() || req.source_identity.len() > 500 {
        return Err(ReceiverError::bad_request("source_identity must be 1 to 500 bytes"));
    }
    if let Some((table, id)) = req.table_identities.iter().find(|(_, id)| id.is_empty() || id.len() > 500) {
        return Err(ReceiverError::bad_request(format!("the identity of table {table:?} must be 1 to 500 bytes, not {}", id.len()))
            .with_table(table));
    }
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
    if let Some(stray) = req.table_identities.keys().find(|t| !names.contains(t.as_str())) {
        return Err(ReceiverError::bad_request(format!("table_identities names table {stray:?}, which is not sent"))
            .with_table(stray));
    }
    Ok(())
}

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    req: &TableSchemaRequest,
    cfg: &ReceiverConfig,
) -> Result<TableSchemaResponse, ReceiverError> {
    validate(req)?;
    let mirror = tenant.mirror_schema();
    let mut tx = client.transaction().await?;
    store::lock_tenant(&tx, tenant).await?;
    // An ALTER waits for partner queries on its table; rather than hold the
    // tenant's schema call (and queue the partner's readers behind it)
    // indefinitely, that table is refused for this cycle and retried.
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    store::ensure_schema(&tx, &mirror).await?;
    let known: HashMap<String, TableRow> =
        store::lock_all(&tx, tenant).await?.into_iter().map(|r| (r.name.clone(), r)).collect();
    let physical = Physical {
        live: store::physical_tables(&tx, &mirror).await?,
        shadow: store::physical_tables(&tx, &tenant.load_schema()).await?,
    };

    let mut states = Vec::with_capacity(req.tables.len());
    for table in &req.tables {
        // Each table under its own savepoint: a change PostgreSQL refuses
        // (a partner's view on a column being altered) refuses that table
        // only, and leaves nothing of it behind.
        let sp = tx.transaction().await?;
        let result = evolve_table(&sp, tenant, table, known.get(&table.name), &physical, req, cfg).await;
        let state = match result {
            Ok(state) => {
                sp.commit().await?;
                state
            }
            Err(e) if e.kind == ErrorKind::Unavailable => return Err(e),
            Err(e) => {
                sp.rollback().await?;
                tracing::warn!(table = %table.name, error = %e, "schema change refused");
                let row = known.get(&table.name);
                let mut s = state(table, TableStatus::Refused, row.and_then(|r| r.cursor.clone()), Some(e.message));
                if let Some(row) = row {
                    // Report the hash batches must still name.
                    s.schema_hash = row.schema_hash.clone();
                    s.source_identity = Some(row.source_identity.clone());
                }
                s
            }
        };
        tracing::info!(table = %table.name, status = ?state.status, message = state.message.as_deref().unwrap_or(""), "table schema");
        states.push(state);
    }

    // Skipped tables are still mapped (the agent could not read them this
    // cycle): they are neither dropped nor touched.
    let listed: HashSet<&str> =
        req.tables.iter().map(|t| t.name.as_str()).chain(req.skipped.iter().map(String::as_str)).collect();
    let mut dropped: Vec<String> = known.keys().filter(|n| !listed.contains(n.as_str())).cloned().collect();
    dropped.sort();
    for name in &dropped {
        if cfg.drop_unmapped_tables {
            tx.batch_execute(&ddl::drop_table(&mirror, name)).await?;
            tx.batch_execute(&ddl::drop_table(&tenant.load_schema(), name)).await?;
            store::forget_table(&tx, tenant, name).await?;
            tracing::info!(table = %name, "dropped unmapped mirror table");
        } else {
            tracing::info!(table = %name, "kept unmapped mirror table (drop_unmapped_tables = false)");
        }
    }
    tx.commit().await?;
    Ok(TableSchemaResponse { tables: states, dropped })
}

/// Which tables exist in the mirror schema and in the load schema.
struct Physical {
    live: HashSet<String>,
    shadow: HashSet<String>,
}

/// Brings one mirror table to the schema the agent sent and says where it
/// stands.
async fn evolve_table(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    table: &TableSchema,
    row: Option<&TableRow>,
    physical: &Physical,
    req: &TableSchemaRequest,
    cfg: &ReceiverConfig,
) -> Result<TableState, ReceiverError> {
    let mirror = tenant.mirror_schema();
    let Some(row) = row else {
        // A same-named table without a bookkeeping row is a leftover (of a
        // crashed receiver or a hand-made copy): its rows have no cursor,
        // so they cannot be trusted.
        if physical.live.contains(&table.name) {
            tx.batch_execute(&ddl::drop_table(&mirror, &table.name)).await.map_err(|e| db(e, table))?;
        }
        return create(tx, tenant, &mirror, table, req.identity_of(&table.name)).await;
    };
    let present = if row.reloading { &physical.shadow } else { &physical.live };
    if !present.contains(&table.name) {
        if row.reloading {
            let reason = "the shadow table of an unfinished reload was missing; the reload starts over";
            reload::begin(tx, tenant, table, req.identity_of(&table.name), reason).await?;
            return Ok(rebuilding(table, reason));
        }
        // The partner dropped the mirror table (or its whole schema): start
        // it over. Rows deleted meanwhile cannot linger in a new table.
        tracing::warn!(table = %table.name, "mirror table is missing; recreating it for a full load");
        return create(tx, tenant, &mirror, table, req.identity_of(&table.name)).await;
    }
    // A table that stays as it is answers the identity its rows came from.
    let held = |status, message| TableState {
        source_identity: Some(row.source_identity.clone()),
        ..state(table, status, row.cursor.clone(), message)
    };
    if row.schema_hash == table.hash() {
        return Ok(match row.reloading {
            true => held(TableStatus::Rebuilding, row.reload_reason.clone()),
            false => held(TableStatus::Unchanged, None),
        });
    }
    match evolve::plan(&row.schema, table, cfg.keep_dropped_columns) {
        Evolution::InPlace(steps) => {
            let target = reload::target_schema(tenant, row);
            for step in &steps {
                if let Some(sql) = step.sql(&target, &table.name) {
                    tx.batch_execute(&sql).await.map_err(|e| db(e, table))?;
                }
            }
            store::set_schema(tx, tenant, table).await?;
            let described: Vec<String> = steps.iter().map(Step::describe).collect();
            tracing::info!(table = %table.name, changes = %described.join("; "), "schema altered in place");
            let status = if row.reloading { TableStatus::Rebuilding } else { TableStatus::Altered };
            Ok(held(status, Some(described.join("; "))))
        }
        Evolution::Rebuild(reason) => {
            tracing::info!(table = %table.name, %reason, "schema change needs a rebuild; loading a shadow table");
            reload::begin(tx, tenant, table, req.identity_of(&table.name), &reason).await?;
            Ok(rebuilding(table, &reason))
        }
    }
}

async fn create(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    mirror: &str,
    table: &TableSchema,
    source_identity: &str,
) -> Result<TableState, ReceiverError> {
    tx.batch_execute(&ddl::create_table(mirror, table)).await.map_err(|e| db(e, table))?;
    store::upsert_created(tx, tenant, table, source_identity).await?;
    Ok(state(table, TableStatus::Created, None, None))
}

fn rebuilding(table: &TableSchema, reason: &str) -> TableState {
    state(table, TableStatus::Rebuilding, None, Some(reason.to_owned()))
}

fn state(
    table: &TableSchema,
    status: TableStatus,
    cursor: Option<crate::protocol::Cursor>,
    message: Option<String>,
) -> TableState {
    TableState { name: table.name.clone(), status, cursor, schema_hash: table.hash(), message, source_identity: None }
}

fn db(e: tokio_postgres::Error, table: &TableSchema) -> ReceiverError {
    ReceiverError::from(e).with_table(&table.name)
}

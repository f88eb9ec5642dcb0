//! The receiver's bookkeeping in schema `ctmirror` of the partner database:
//! which mirror tables exist, the schema each was created with, and the
//! cursor each holds. The cursor lives here, not with the agent, and is
//! written in the same transaction as the rows it covers.

use super::error::ReceiverError;
use crate::ids::TenantId;
use crate::protocol::{Cursor, TableSchema};
use std::collections::HashSet;
use tokio_postgres::{GenericClient, Transaction};

/// Serializes migrations of receivers that start at the same time; the
/// value is arbitrary but fixed ("ctmirror" in ASCII).
const MIGRATION_LOCK: i64 = 0x6374_6d69_7272_6f72;

/// Schema migrations in order; each runs once, in the transaction that
/// records it. Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: bookkeeping of mirror tables and completed cycles.
    "CREATE TABLE ctmirror.tables (
        tenant text NOT NULL,
        table_name text NOT NULL,
        schema jsonb NOT NULL,
        schema_hash text NOT NULL,
        source_identity text NOT NULL,
        cursor jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant, table_name)
    );
    CREATE TABLE ctmirror.completions (
        id bigserial PRIMARY KEY,
        tenant text NOT NULL,
        completed_at timestamptz NOT NULL DEFAULT now(),
        report jsonb NOT NULL
    );
    CREATE INDEX completions_tenant ON ctmirror.completions (tenant, completed_at);",
    // 2: reloads into shadow tables. While `reloading`, `schema`, `cursor`
    // and `source_identity` describe the shadow table being loaded in
    // ctmirror_load_<tenant>; the live table keeps serving reads.
    "ALTER TABLE ctmirror.tables
        ADD COLUMN reloading boolean NOT NULL DEFAULT false,
        ADD COLUMN reload_reason text,
        ADD COLUMN reload_started_at timestamptz,
        ADD COLUMN last_reload_at timestamptz;",
];

/// Brings schema `ctmirror` up to date. Idempotent, and safe when several
/// receivers start together: the transaction-scoped advisory lock makes
/// them take turns, and each sees what the one before it recorded.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), ReceiverError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS ctmirror;
         CREATE TABLE IF NOT EXISTS ctmirror.migrations (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let applied: HashSet<i32> =
        tx.query("SELECT version FROM ctmirror.migrations", &[]).await?.iter().map(|r| r.get(0)).collect();
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        if !applied.contains(&version) {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO ctmirror.migrations (version) VALUES ($1)", &[&version]).await?;
            tracing::info!(version, "applied receiver migration");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// One row of `ctmirror.tables`.
#[derive(Debug, Clone)]
pub struct TableRow {
    pub name: String,
    /// The schema batches follow (the shadow's while reloading).
    pub schema: TableSchema,
    pub schema_hash: String,
    pub cursor: Option<Cursor>,
    pub source_identity: String,
    /// A reload into the shadow table is in progress.
    pub reloading: bool,
    pub reload_reason: Option<String>,
}

const SELECT_ROW: &str = "SELECT table_name, schema::text, schema_hash, cursor::text, source_identity, reloading, \
                          reload_reason FROM ctmirror.tables";

fn decode_row(row: &tokio_postgres::Row) -> Result<TableRow, ReceiverError> {
    let name: String = row.get(0);
    let schema_text: String = row.get(1);
    let cursor_text: Option<String> = row.get(3);
    let schema = serde_json::from_str(&schema_text)
        .map_err(|e| ReceiverError::internal(format!("stored schema of table {name:?} is unreadable: {e}")))?;
    let cursor = cursor_text
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| ReceiverError::internal(format!("stored cursor of table {name:?} is unreadable: {e}")))?;
    Ok(TableRow {
        schema,
        schema_hash: row.get(2),
        cursor,
        name,
        source_identity: row.get(4),
        reloading: row.get(5),
        reload_reason: row.get(6),
    })
}

/// The table's bookkeeping row, locked until the transaction ends so that
/// concurrent batches for one table apply one after the other.
pub async fn lock_table(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    table: &str,
) -> Result<Option<TableRow>, ReceiverError> {
    let sql = format!("{SELECT_ROW} WHERE tenant = $1 AND table_name = $2 FOR UPDATE");
    tx.query_opt(&sql, &[&tenant.as_str(), &table]).await?.as_ref().map(decode_row).transpose()
}

/// Every bookkeeping row of the tenant, locked.
pub async fn lock_all(tx: &Transaction<'_>, tenant: &TenantId) -> Result<Vec<TableRow>, ReceiverError> {
    let sql = format!("{SELECT_ROW} WHERE tenant = $1 ORDER BY table_name FOR UPDATE");
    tx.query(&sql, &[&tenant.as_str()]).await?.iter().map(decode_row).collect()
}

/// Makes schema calls of one tenant take turns, so two of them never race
/// to create the same mirror table.
pub async fn lock_tenant(tx: &Transaction<'_>, tenant: &TenantId) -> Result<(), ReceiverError> {
    let key = format!("ctmirror.tenant:{tenant}");
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key]).await?;
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ReceiverError> {
    serde_json::to_string(v).map_err(|e| ReceiverError::internal(format!("cannot encode JSON: {e}")))
}

/// Records a newly created (or recreated) mirror table with no cursor.
pub async fn upsert_created(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    schema: &TableSchema,
    source_identity: &str,
) -> Result<(), ReceiverError> {
    tx.execute(
        "INSERT INTO ctmirror.tables (tenant, table_name, schema, schema_hash, source_identity, cursor)
         VALUES ($1, $2, $3::text::jsonb, $4, $5, NULL)
         ON CONFLICT (tenant, table_name) DO UPDATE
         SET schema = EXCLUDED.schema, schema_hash = EXCLUDED.schema_hash,
             source_identity = EXCLUDED.source_identity, cursor = NULL, reloading = false,
             reload_reason = NULL, reload_started_at = NULL, updated_at = now()",
        &[&tenant.as_str(), &schema.name, &to_json(schema)?, &schema.hash(), &source_identity],
    )
    .await?;
    Ok(())
}

/// Records a compatible schema change applied in place; the cursor stands.
pub async fn set_schema(tx: &Transaction<'_>, tenant: &TenantId, schema: &TableSchema) -> Result<(), ReceiverError> {
    tx.execute(
        "UPDATE ctmirror.tables SET schema = $3::text::jsonb, schema_hash = $4, updated_at = now()
         WHERE tenant = $1 AND table_name = $2",
        &[&tenant.as_str(), &schema.name, &to_json(schema)?, &schema.hash()],
    )
    .await?;
    Ok(())
}

/// Records the start of a reload: from now on the row describes the empty
/// shadow table.
pub async fn start_reload(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    schema: &TableSchema,
    source_identity: &str,
    reason: &str,
) -> Result<(), ReceiverError> {
    tx.execute(
        "UPDATE ctmirror.tables SET schema = $3::text::jsonb, schema_hash = $4, source_identity = $5,
                cursor = NULL, reloading = true, reload_reason = $6, reload_started_at = now(), updated_at = now()
         WHERE tenant = $1 AND table_name = $2",
        &[&tenant.as_str(), &schema.name, &to_json(schema)?, &schema.hash(), &source_identity, &reason],
    )
    .await?;
    Ok(())
}

/// Records that the shadow table replaced the live one.
pub async fn finish_reload(tx: &Transaction<'_>, tenant: &TenantId, table: &str) -> Result<(), ReceiverError> {
    tx.execute(
        "UPDATE ctmirror.tables SET reloading = false, reload_started_at = NULL, last_reload_at = now(),
                updated_at = now()
         WHERE tenant = $1 AND table_name = $2",
        &[&tenant.as_str(), &table],
    )
    .await?;
    Ok(())
}

pub async fn set_cursor(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    table: &str,
    cursor: Option<&Cursor>,
) -> Result<(), ReceiverError> {
    let json = cursor.map(to_json).transpose()?;
    tx.execute(
        "UPDATE ctmirror.tables SET cursor = $3::text::jsonb, updated_at = now()
         WHERE tenant = $1 AND table_name = $2",
        &[&tenant.as_str(), &table, &json],
    )
    .await?;
    Ok(())
}

/// [`set_cursor`] for many tables in one statement.
pub async fn set_cursors(tx: &Transaction<'_>, tenant: &TenantId, moves: &[(&str, &Cursor)]) -> Result<(), ReceiverError> {
    if moves.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = moves.iter().map(|(n, _)| *n).collect();
    let cursors: Vec<String> = moves.iter().map(|(_, c)| to_json(c)).collect::<Result<_, _>>()?;
    tx.execute(
        "UPDATE ctmirror.tables AS t SET cursor = u.cursor::jsonb, updated_at = now()
           FROM unnest($2::text[], $3::text[]) AS u(name, cursor)
          WHERE t.tenant = $1 AND t.table_name = u.name",
        &[&tenant.as_str(), &names, &cursors],
    )
    .await?;
    Ok(())
}

pub async fn forget_table(tx: &Transaction<'_>, tenant: &TenantId, table: &str) -> Result<(), ReceiverError> {
    tx.execute("DELETE FROM ctmirror.tables WHERE tenant = $1 AND table_name = $2", &[&tenant.as_str(), &table])
        .await?;
    Ok(())
}

/// Creates `schema` unless it exists. Not `CREATE SCHEMA IF NOT EXISTS`:
/// PostgreSQL checks the database's CREATE privilege before it looks for
/// the schema, and a tenant role (docs/receiver.md, "Tenant isolation")
/// owns its schemas without holding that privilege.
pub async fn ensure_schema(client: &impl GenericClient, schema: &str) -> Result<(), ReceiverError> {
    let exists = client.query_opt("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1", &[&schema]).await?;
    if exists.is_none() {
        client.batch_execute(&format!("CREATE SCHEMA {}", super::sql::quote_ident(schema))).await?;
    }
    Ok(())
}

/// Names of the ordinary (and partitioned) tables in a schema.
pub async fn physical_tables(client: &impl GenericClient, schema: &str) -> Result<HashSet<String>, ReceiverError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
            &[&schema],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records a completed cycle's report; returns its id.
pub async fn record_completion(
    client: &impl GenericClient,
    tenant: &TenantId,
    report: &impl serde::Serialize,
) -> Result<i64, ReceiverError> {
    let row = client
        .query_one(
            "INSERT INTO ctmirror.completions (tenant, report) VALUES ($1, $2::text::jsonb) RETURNING id",
            &[&tenant.as_str(), &to_json(report)?],
        )
        .await?;
    Ok(row.get(0))
}

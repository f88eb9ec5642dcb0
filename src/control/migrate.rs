//! The control database's schema, as numbered migrations applied at connect.
//!
//! Every object lives in schema `ctmirror_control`, so the control data can
//! share a database with anything else (even the receiver's `ctmirror`
//! schema). Migrations run in one transaction that first takes a
//! transaction-scoped advisory lock on a fixed key: agent processes that
//! start together take turns, and each sees what the one before recorded.
//! A database already migrated by a newer ctmirror is refused rather than
//! used with rules this binary does not know.
//!
//! Append only: a released migration never changes; a change is a new one.

use super::errors::pg;
use crate::schedule::store::{StoreError, StoreErrorKind};
use tokio_postgres::Client;

/// Serializes migrations of agents that start at the same time. Arbitrary
/// but fixed ("ctmctrl1" in ASCII), and distinct from the receiver's key.
const MIGRATION_LOCK: i64 = 0x6374_6d63_7472_6c31;

/// One schema change.
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

/// All migrations, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "pairs, leases, run history, table state, tenant flags, resync requests",
    sql: r#"
    -- One row per (tenant, application): its schedule and its lease. The
    -- lease is owner + expiry + a token that grows with every claim, so a
    -- process whose lease was taken over cannot write as if it still held it.
    CREATE TABLE ctmirror_control.pairs (
        tenant          text NOT NULL,
        app             text NOT NULL,
        server          text NOT NULL,
        next_due        timestamptz NOT NULL,
        lease_owner     text,
        lease_token     bigint NOT NULL DEFAULT 0,
        lease_expires   timestamptz,
        -- The run in progress, closed as lease_lost when the lease is taken
        -- over. No foreign key: it would tie pruning to lease locks.
        current_run     bigint,
        last_start      timestamptz,
        last_end        timestamptz,
        last_outcome    text,
        last_error_kind text,
        last_error      text,
        last_success    timestamptz,
        failures        integer NOT NULL DEFAULT 0,
        source_version  bigint,
        PRIMARY KEY (tenant, app),
        CHECK ((lease_owner IS NULL) = (lease_expires IS NULL))
    );
    CREATE INDEX pairs_next_due ON ctmirror_control.pairs (next_due);

    -- History: one row per run, 'running' until it ends.
    CREATE TABLE ctmirror_control.runs (
        id              bigserial PRIMARY KEY,
        tenant          text NOT NULL,
        app             text NOT NULL,
        owner           text NOT NULL,
        lease_token     bigint NOT NULL,
        started         timestamptz NOT NULL,
        ended           timestamptz,
        outcome         text NOT NULL DEFAULT 'running' CHECK (outcome IN
                        ('running', 'succeeded', 'failed', 'paused', 'interrupted', 'maintenance')),
        error_kind      text,
        error_message   text,
        rows            bigint NOT NULL DEFAULT 0,
        bytes           bigint NOT NULL DEFAULT 0,
        source_version  bigint,
        CHECK ((outcome = 'running') = (ended IS NULL))
    );
    CREATE INDEX runs_pair_started ON ctmirror_control.runs (tenant, app, started);
    CREATE INDEX runs_started ON ctmirror_control.runs (started);

    -- What each run did to each table.
    CREATE TABLE ctmirror_control.table_runs (
        run_id          bigint NOT NULL REFERENCES ctmirror_control.runs (id) ON DELETE CASCADE,
        table_name      text NOT NULL,
        mode            text NOT NULL,
        rows            bigint NOT NULL,
        bytes           bigint NOT NULL,
        batches         bigint NOT NULL,
        from_cursor     jsonb,
        to_cursor       jsonb,
        from_version    bigint,
        to_version      bigint,
        duration_ms     bigint NOT NULL,
        error_kind      text,
        error_message   text,
        reloaded        boolean NOT NULL,
        PRIMARY KEY (run_id, table_name)
    );

    -- Live progress of running runs; replaced wholesale, deleted at finish.
    CREATE TABLE ctmirror_control.progress (
        run_id          bigint NOT NULL REFERENCES ctmirror_control.runs (id) ON DELETE CASCADE,
        table_name      text NOT NULL,
        mode            text NOT NULL,
        rows            bigint NOT NULL,
        bytes           bigint NOT NULL,
        batches         bigint NOT NULL,
        cursor          jsonb,
        updated         timestamptz NOT NULL,
        PRIMARY KEY (run_id, table_name)
    );

    -- Where each table stood after its last run (for status).
    CREATE TABLE ctmirror_control.table_state (
        tenant          text NOT NULL,
        app             text NOT NULL,
        table_name      text NOT NULL,
        cursor          jsonb,
        mode            text NOT NULL,
        last_run_id     bigint,
        last_run        timestamptz NOT NULL,
        last_success    timestamptz,
        last_error_kind text,
        last_error      text,
        PRIMARY KEY (tenant, app, table_name)
    );

    -- Operator switches per tenant.
    CREATE TABLE ctmirror_control.tenant_flags (
        tenant          text PRIMARY KEY,
        maintenance     boolean NOT NULL DEFAULT false,
        reason          text,
        set_at          timestamptz NOT NULL
    );

    -- Operator requests to reload a pair (all tables when table_name is null).
    CREATE TABLE ctmirror_control.resync_requests (
        id              bigserial PRIMARY KEY,
        tenant          text NOT NULL,
        app             text NOT NULL,
        table_name      text,
        requested_at    timestamptz NOT NULL,
        done_at         timestamptz
    );
    CREATE INDEX resync_requests_pending ON ctmirror_control.resync_requests (tenant, app)
        WHERE done_at IS NULL;
    "#,
}, Migration {
    version: 2,
    description: "why a table was reloaded (retention, restore, schema change, operator)",
    sql: r#"
    ALTER TABLE ctmirror_control.table_runs ADD COLUMN reload_reason text;
    ALTER TABLE ctmirror_control.table_state ADD COLUMN last_reload timestamptz,
                                             ADD COLUMN last_reload_reason text;
    "#,
}];

/// The newest schema version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Brings schema `ctmirror_control` up to date; idempotent and safe to run
/// from several processes at once.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    // The lock comes first: even CREATE SCHEMA IF NOT EXISTS races otherwise.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS ctmirror_control;
         CREATE TABLE IF NOT EXISTS ctmirror_control.schema_migrations (
            version     integer PRIMARY KEY,
            description text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(pg)?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM ctmirror_control.schema_migrations", &[])
        .await
        .map_err(pg)?
        .get(0);
    let known = latest();
    if current > known {
        // Displayed as "control database: schema is at version …".
        return Err(StoreError::new(
            StoreErrorKind::Fatal,
            format!("schema is at version {current}; this ctmirror knows up to {known}: upgrade ctmirror"),
        ));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            let e = pg(e);
            StoreError::new(e.kind, format!("migration {} ({}): {}", m.version, m.description, e.message))
        })?;
        // applied_at is the database's clock on purpose: it records when
        // the schema changed, not a scheduling time.
        tx.execute(
            "INSERT INTO ctmirror_control.schema_migrations (version, description) VALUES ($1, $2)",
            &[&m.version, &m.description],
        )
        .await
        .map_err(pg)?;
        tracing::info!(version = m.version, description = m.description, "applied control database migration");
    }
    tx.commit().await.map_err(pg)?;
    Ok(())
}

/// The schema version recorded in the database.
pub async fn current_version(client: &Client) -> Result<i32, StoreError> {
    Ok(client
        .query_one("SELECT coalesce(max(version), 0) FROM ctmirror_control.schema_migrations", &[])
        .await
        .map_err(pg)?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.description);
        }
    }

    #[test]
    fn every_object_is_in_the_control_schema() {
        for m in MIGRATIONS {
            for line in m.sql.lines().map(str::trim) {
                if line.starts_with("CREATE TABLE") || line.starts_with("CREATE INDEX") {
                    assert!(line.contains("ctmirror_control."), "{line}");
                }
            }
        }
    }
}

//! Retention: the side tables would grow forever, so changes older than the
//! retention period are deleted and the tables' min valid version raised,
//! as SQL Server's change-tracking cleanup does.
//!
//! Versions are transaction ids, not times, so a clock table records which
//! version was current when; the retention horizon is the newest version
//! recorded at least `retention` ago.

use super::catalog::display;
use super::errors::pg_error;
use super::install::INSTALL_LOCK;
use super::sql::{qualified, quote_ident, CT_SCHEMA, VERSION_COL};
use super::statements::Statements;
use super::tracking;
use super::triggers::drop_sql;
use crate::source::{SourceError, SourceErrorKind, SourceTable};
use std::time::Duration;
use tokio_postgres::Client;

const GRANT: &str = "ownership of the objects in schema ctmirror_ct (the role that installed them)";

/// Samples the clock more often than this only when retention is shorter.
const SAMPLE_GAP: Duration = Duration::from_secs(60);

/// A tracked table that no application has read for this long (or for the
/// retention period, when that is longer) is untracked: its writers stop
/// paying for the capture, and DDL on it can no longer trip over it.
const UNREAD_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Retention cleanup and upkeep of every tracked table, mapped or not:
/// registry rows whose table is gone (or whose oid now names a table that
/// does not carry our capture) are forgotten; tables no application reads
/// any more are untracked; damaged captures (a key column renamed, a
/// trigger reset, a rewrite) are reinstalled, so tenant writes that the
/// old capture would fail work again and the table reloads; the rest
/// lose their changes older than the retention horizon.
pub(crate) async fn maintain(client: &mut Client, stmts: &Statements, retention: Duration) -> Result<(), SourceError> {
    let retention = request_retention(client, retention).await?;
    record_sample(client, retention).await?;
    let horizon = horizon(client, retention).await?;
    let doing = "listing tracked tables for upkeep";
    let grace = retention.max(UNREAD_GRACE).as_secs_f64();
    let rows = client
        .query(
            "SELECT t.table_oid, t.side_table, t.schema_name || '.' || t.table_name,
                    c.oid IS NOT NULL AND EXISTS (
                        SELECT 1 FROM pg_catalog.pg_trigger g
                          JOIN pg_catalog.pg_proc f ON f.oid = g.tgfoid
                          JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
                         WHERE g.tgrelid = t.table_oid AND fn.nspname = 'ctmirror_ct'
                           AND pg_catalog.starts_with(f.proname::text, 'capture_' || t.table_oid::text || '_')),
                    n.nspname::text, c.relname::text,
                    CASE WHEN c.oid IS NOT NULL THEN ctmirror_ct.damage(t.table_oid) END,
                    t.enabled_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                    AND NOT EXISTS (SELECT 1 FROM ctmirror_ct.readers r
                                     WHERE r.table_oid = t.table_oid
                                       AND r.last_read > pg_catalog.now() - pg_catalog.make_interval(secs => $1))
               FROM ctmirror_ct.tracked t
               LEFT JOIN pg_catalog.pg_class c ON c.oid = t.table_oid
               LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              ORDER BY t.table_oid",
            &[&grace],
        )
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    for row in rows {
        let get = |e| pg_error(e, doing, "");
        let oid: u32 = row.try_get(0).map_err(get)?;
        let side: String = row.try_get(1).map_err(get)?;
        let registered: String = row.try_get(2).map_err(get)?;
        let ours: bool = row.try_get(3).map_err(get)?;
        let current = match (row.try_get::<_, Option<String>>(4).map_err(get)?, row.try_get::<_, Option<String>>(5).map_err(get)?) {
            (Some(schema), Some(name)) => Some(SourceTable { schema: Some(schema), name }),
            _ => None,
        };
        let damage: Option<String> = row.try_get(6).map_err(get)?;
        let unread: bool = row.try_get(7).map_err(get)?;
        let shown = current.as_ref().map(display).unwrap_or(registered);
        match (ours, current) {
            (false, _) => forget_table(client, oid, &shown, "the table no longer exists or no longer carries the capture").await?,
            (true, _) if unread => forget_table(client, oid, &shown, "no application has read the table for a day or the retention period").await?,
            (true, Some(table)) if damage.is_some() => repair(client, stmts, oid, &table, damage.as_deref().unwrap_or("")).await?,
            (true, _) => {
                if let Some(h) = horizon {
                    match trim_table(client, oid, &side, &shown, h).await {
                        Err(e) if e.kind == SourceErrorKind::Transient => {
                            tracing::warn!(table = %shown, error = %e, "retention cleanup of a table skipped this time");
                        }
                        other => other?,
                    }
                }
            }
        }
    }
    Ok(())
}

/// Records this agent's retention and answers the longest retention any
/// agent asked for within its own length: several agents (or
/// applications with different settings) share one `ctmirror_ct`, and the
/// cleanup must keep what the most patient of them needs.
async fn request_retention(client: &Client, retention: Duration) -> Result<Duration, SourceError> {
    let doing = "recording the retention this agent needs";
    let secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "WITH mine AS (
                 INSERT INTO ctmirror_ct.retention_requests (retention_secs, last_requested)
                 VALUES ($1, pg_catalog.now())
                 ON CONFLICT (retention_secs) DO UPDATE SET last_requested = EXCLUDED.last_requested)
             SELECT pg_catalog.max(retention_secs) FROM (
                 SELECT retention_secs FROM ctmirror_ct.retention_requests
                  WHERE last_requested > pg_catalog.now() - pg_catalog.make_interval(secs => retention_secs)
                 UNION ALL SELECT $1) AS r",
            &[&secs],
        )
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    let longest: Option<i64> = row.try_get(0).map_err(|e| pg_error(e, doing, ""))?;
    Ok(Duration::from_secs(longest.unwrap_or(secs).max(0) as u64).max(retention))
}

/// Reinstalls a damaged capture. When that is impossible (the table lost
/// its primary key, say), the capture is removed instead: a capture that
/// names columns the table no longer has fails every write of the tenant,
/// and the applications that map the table get the reason as an error
/// naming it in their next cycle.
async fn repair(client: &mut Client, stmts: &Statements, oid: u32, table: &SourceTable, damage: &str) -> Result<(), SourceError> {
    let shown = display(table);
    tracing::warn!(table = %shown, %damage, "change tracking of a table is damaged; reinstalling it");
    match tracking::ensure_tracking(client, stmts, table).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind == SourceErrorKind::Config => {
            tracing::error!(table = %shown, error = %e, "the damaged change tracking cannot be reinstalled; removing it");
            forget_table(client, oid, &shown, &format!("its tracking is damaged ({damage}) and cannot be reinstalled: {e}")).await
        }
        Err(e) => Err(e),
    }
}

/// Records (current version, now), at most one sample per minute (or per
/// retention period when that is shorter). The version is computed like
/// `current_version`: every version at or below it is final.
async fn record_sample(client: &Client, retention: Duration) -> Result<(), SourceError> {
    let gap = retention.min(SAMPLE_GAP).as_secs_f64();
    client
        .execute(
            "INSERT INTO ctmirror_ct.version_clock (version, recorded_at)
             SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint - 1,
                    pg_catalog.now()
              WHERE NOT EXISTS (
                    SELECT 1 FROM ctmirror_ct.version_clock
                     WHERE recorded_at > pg_catalog.now() - pg_catalog.make_interval(secs => $1))",
            &[&gap],
        )
        .await
        .map_err(|e| pg_error(e, "recording the version clock", GRANT))?;
    Ok(())
}

/// The newest version recorded at or before now - retention, pruning the
/// samples older than it (they can never be the horizon again).
async fn horizon(client: &mut Client, retention: Duration) -> Result<Option<i64>, SourceError> {
    let doing = "computing the retention horizon";
    let tx = client.transaction().await.map_err(|e| pg_error(e, doing, GRANT))?;
    let row = tx
        .query_opt(
            "SELECT version FROM ctmirror_ct.version_clock
              WHERE recorded_at <= pg_catalog.now() - pg_catalog.make_interval(secs => $1)
              ORDER BY recorded_at DESC, version DESC LIMIT 1",
            &[&retention.as_secs_f64()],
        )
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    let Some(row) = row else {
        return Ok(None); // no sample old enough yet
    };
    let version: i64 = row.try_get(0).map_err(|e| pg_error(e, doing, ""))?;
    tx.execute(
        "DELETE FROM ctmirror_ct.version_clock
          WHERE recorded_at < (SELECT recorded_at FROM ctmirror_ct.version_clock
                                WHERE recorded_at <= pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                                ORDER BY recorded_at DESC, version DESC LIMIT 1)",
        &[&retention.as_secs_f64()],
    )
    .await
    .map_err(|e| pg_error(e, doing, GRANT))?;
    tx.commit().await.map_err(|e| pg_error(e, doing, GRANT))?;
    Ok(Some(version))
}

/// Deletes a table's side rows at or below the horizon and raises its min
/// valid version to it, in one transaction: a cursor below the horizon
/// needs deleted changes and must reload.
async fn trim_table(
    client: &mut Client,
    oid: u32,
    side: &str,
    shown: &str,
    horizon: i64,
) -> Result<(), SourceError> {
    let doing = format!("removing expired changes of table {shown}");
    let err = |e| pg_error(e, &doing, GRANT);
    let tx = client.transaction().await.map_err(err)?;
    // A tenant transaction that truncated the table holds its registry row
    // (the capture records the new storage there) until it ends; the
    // cleanup of this table waits for the next cycle rather than for it.
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await.map_err(err)?;
    tx.execute(
        &format!("DELETE FROM {} WHERE {} <= $1", qualified(CT_SCHEMA, side), quote_ident(VERSION_COL)),
        &[&horizon],
    )
    .await
    .map_err(err)?;
    tx.execute(
        "UPDATE ctmirror_ct.tracked SET min_valid_version = GREATEST(min_valid_version, $1)
          WHERE table_oid = $2",
        &[&horizon, &oid],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)
}

/// Drops the side table, capture functions (their triggers go with them,
/// `CASCADE`), registry row and readers of a tracked table.
pub(crate) async fn forget_table(client: &mut Client, oid: u32, shown: &str, why: &str) -> Result<(), SourceError> {
    let doing = format!("removing change tracking of table {shown}");
    let err = |e| pg_error(e, &doing, GRANT);
    let tx = client.transaction().await.map_err(err)?;
    tx.batch_execute("SET LOCAL lock_timeout = '30s'").await.map_err(err)?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&INSTALL_LOCK]).await.map_err(err)?;
    for statement in drop_sql(oid, None) {
        tx.batch_execute(&statement).await.map_err(err)?;
    }
    tx.execute("DELETE FROM ctmirror_ct.tracked WHERE table_oid = $1", &[&oid]).await.map_err(err)?;
    tx.execute("DELETE FROM ctmirror_ct.readers WHERE table_oid = $1", &[&oid]).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    tracing::info!(table = %shown, reason = %why, "removed change tracking");
    Ok(())
}

/// Records that `application` reads exactly `tables` (renewing their
/// reader rows), and untracks every table this application stopped
/// reading that no other application reads.
pub(crate) async fn record_readers(client: &mut Client, application: &str, tables: &[SourceTable]) -> Result<(), SourceError> {
    let doing = format!("recording the tables application {application} reads");
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_deref().unwrap_or("public")).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = client
        .query(
            "WITH mine AS (
                 SELECT c.oid
                   FROM unnest($2::text[], $3::text[]) AS u(schema_name, table_name)
                   JOIN pg_catalog.pg_namespace n ON n.nspname = u.schema_name
                   JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.table_name
                   JOIN ctmirror_ct.tracked r ON r.table_oid = c.oid),
             renewed AS (
                 INSERT INTO ctmirror_ct.readers (table_oid, application, last_read)
                 SELECT oid, $1, pg_catalog.now() FROM mine
                 ON CONFLICT (table_oid, application) DO UPDATE SET last_read = EXCLUDED.last_read),
             left_behind AS (
                 DELETE FROM ctmirror_ct.readers d
                  WHERE d.application = $1 AND d.table_oid NOT IN (SELECT oid FROM mine)
              RETURNING d.table_oid)
             SELECT l.table_oid, t.schema_name || '.' || t.table_name
               FROM left_behind l JOIN ctmirror_ct.tracked t ON t.table_oid = l.table_oid
              WHERE NOT EXISTS (SELECT 1 FROM ctmirror_ct.readers x
                                 WHERE x.table_oid = l.table_oid AND x.application <> $1)",
            &[&application, &schemas, &names],
        )
        .await
        .map_err(|e| pg_error(e, &doing, GRANT))?;
    for row in rows {
        let oid: u32 = row.try_get(0).map_err(|e| pg_error(e, &doing, ""))?;
        let shown: String = row.try_get(1).map_err(|e| pg_error(e, &doing, ""))?;
        forget_table(client, oid, &shown, &format!("application {application} no longer maps it and no other application reads it")).await?;
    }
    Ok(())
}

/// `ctmirror untrack`: removes the tracking of one table now, whoever
/// reads it. `false` when the table was not tracked.
pub(crate) async fn untrack(client: &mut Client, stmts: &Statements, table: &SourceTable) -> Result<bool, SourceError> {
    let tref = super::catalog::find_table(&*client, stmts, table).await?;
    let doing = format!("looking up the change tracking of table {}", tref.display());
    let tracked = client
        .query_opt("SELECT 1 FROM ctmirror_ct.tracked WHERE table_oid = $1", &[&tref.oid])
        .await
        .map_err(|e| pg_error(e, &doing, GRANT))?
        .is_some();
    if tracked {
        forget_table(client, tref.oid, &tref.display(), "an operator asked for it (ctmirror untrack)").await?;
    }
    Ok(tracked)
}

//! Retention: the side tables would grow forever, so changes older than the
//! retention period are deleted and the tables' min valid version raised,
//! as SQL Server's change-tracking cleanup does.
//!
//! Versions are transaction ids, not times, so a clock table records which
//! version was current when; the retention horizon is the newest version
//! recorded at least `retention` ago.

use super::errors::pg_error;
use super::install::INSTALL_LOCK;
use super::sql::{qualified, quote_ident, CT_SCHEMA, VERSION_COL};
use super::triggers::drop_sql;
use crate::source::SourceError;
use std::time::Duration;
use tokio_postgres::Client;

const GRANT: &str = "ownership of the objects in schema ctmirror_ct (the role that installed them)";

/// Samples the clock more often than this only when retention is shorter.
const SAMPLE_GAP: Duration = Duration::from_secs(60);

pub(crate) async fn maintain(client: &mut Client, retention: Duration) -> Result<(), SourceError> {
    record_sample(client, retention).await?;
    let horizon = horizon(client, retention).await?;
    let doing = "listing tracked tables for retention cleanup";
    let rows = client
        .query(
            "SELECT t.table_oid, t.side_table, t.schema_name || '.' || t.table_name,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = t.table_oid)
               FROM ctmirror_ct.tracked t ORDER BY t.table_oid",
            &[],
        )
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    for row in rows {
        let oid: u32 = row.try_get(0).map_err(|e| pg_error(e, doing, ""))?;
        let side: String = row.try_get(1).map_err(|e| pg_error(e, doing, ""))?;
        let shown: String = row.try_get(2).map_err(|e| pg_error(e, doing, ""))?;
        let exists: bool = row.try_get(3).map_err(|e| pg_error(e, doing, ""))?;
        match (exists, horizon) {
            (false, _) => forget_table(client, oid, &shown).await?,
            (true, Some(h)) => trim_table(client, oid, &side, &shown, h).await?,
            (true, None) => {} // no sample is old enough yet
        }
    }
    Ok(())
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

/// Drops the side table and capture functions of a table that no longer
/// exists (its triggers went with it) and its registry row.
async fn forget_table(client: &mut Client, oid: u32, shown: &str) -> Result<(), SourceError> {
    let doing = format!("removing change tracking of dropped table {shown}");
    let err = |e| pg_error(e, &doing, GRANT);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&INSTALL_LOCK]).await.map_err(err)?;
    for statement in drop_sql(oid, None) {
        tx.batch_execute(&statement).await.map_err(err)?;
    }
    tx.execute("DELETE FROM ctmirror_ct.tracked WHERE table_oid = $1", &[&oid]).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    tracing::info!(table = %shown, "dropped change tracking of a table that no longer exists");
    Ok(())
}

//! Turning SQL Server Change Tracking on (database, snapshot isolation,
//! table), and reading versions and the database's identity. Every step
//! checks the catalog first, so enabling is idempotent and needs ALTER
//! permission only the first time.

use super::client::{MsClient, SqlParam, SqlValue};
use super::sql::{self, display, qualified, schema_of};
use crate::protocol::Version;
use crate::source::{SourceError, SourceErrorKind, SourceTable, TrackingState};
use std::time::Duration;

/// "Change tracking is already enabled for table": another agent won a race.
const ALREADY_ENABLED: &str = "(error 4996)";

/// Database-level change tracking (with our retention when we turn it on)
/// and snapshot isolation, which every read uses.
pub async fn ensure_database(client: &mut MsClient, retention: Duration) -> Result<(), SourceError> {
    let hours = retention.as_secs().div_ceil(3600).max(1);
    let tracking = client
        .query(sql::DATABASE_TRACKING, &[], "checking whether change tracking is on", "VIEW DATABASE STATE")
        .await?;
    match tracking.first().map(|r| r.as_slice()) {
        None => {
            tracing::info!(retention_hours = hours, "turning change tracking on for the database");
            client
                .execute_as(
                    &sql::enable_database(hours),
                    &[],
                    "turning change tracking on for the database",
                    "ALTER permission on the database (or run ALTER DATABASE ... SET CHANGE_TRACKING = ON as an administrator)",
                )
                .await?;
        }
        Some([SqlValue::Int(period), SqlValue::Text(units), ..]) => {
            let have_hours = match units.as_str() {
                "MINUTES" => period / 60,
                "HOURS" => *period,
                "DAYS" => period * 24,
                _ => *period,
            };
            if (have_hours as u64) < hours {
                tracing::warn!(
                    database_retention_hours = have_hours,
                    configured_hours = hours,
                    "the database keeps changes for less time than configured; a receiver that lags longer must reload"
                );
            }
        }
        Some(_) => {}
    }
    let state = client
        .query(sql::SNAPSHOT_STATE, &[], "checking snapshot isolation", "VIEW DATABASE STATE")
        .await?;
    let on = matches!(state.first().and_then(|r| r.first()), Some(SqlValue::Text(s)) if s == "ON");
    if !on {
        tracing::info!("turning ALLOW_SNAPSHOT_ISOLATION on for the database");
        client.execute(sql::ENABLE_SNAPSHOT, &[], "turning snapshot isolation on").await.map_err(|e| {
            SourceError::config(format!(
                "snapshot isolation is off and the agent could not turn it on ({}); \
                 as an administrator run: ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON",
                e.message
            ))
        })?;
    }
    Ok(())
}

/// Table-level change tracking. A table without a primary key is refused.
pub async fn ensure_table(client: &mut MsClient, table: &SourceTable) -> Result<TrackingState, SourceError> {
    let shown = display(table);
    let rows = client
        .query(
            sql::FIND_TABLE,
            &[SqlParam::Text(schema_of(table).to_owned()), SqlParam::Text(table.name.clone())],
            &format!("looking up table {shown}"),
            &format!("VIEW DEFINITION on {shown}"),
        )
        .await?;
    let Some(row) = rows.first() else {
        return Err(SourceError::config(format!(
            "table {shown} not found (or the agent's login lacks VIEW DEFINITION on it)"
        )));
    };
    if row.get(2) != Some(&SqlValue::Int(1)) {
        return Err(SourceError::config(format!(
            "table {shown} has no primary key; SQL Server change tracking requires one"
        )));
    }
    if row.get(1) == Some(&SqlValue::Int(1)) {
        return Ok(TrackingState { newly_enabled: false, generation: None, installed_because: None });
    }
    tracing::info!(table = %shown, "turning change tracking on for the table");
    match client
        .execute_as(
            &sql::enable_table(table),
            &[],
            &format!("turning change tracking on for table {shown}"),
            &format!("ALTER permission on table {shown}"),
        )
        .await
    {
        Ok(()) => Ok(TrackingState { newly_enabled: true, generation: None, installed_because: None }),
        Err(e) if e.message.contains(ALREADY_ENABLED) => Ok(TrackingState { newly_enabled: true, generation: None, installed_because: None }),
        Err(e) => Err(e),
    }
}

/// `CHANGE_TRACKING_CURRENT_VERSION()`. 0 is a real version (a database
/// where tracking is on and nothing has changed yet); NULL means tracking
/// is off.
pub async fn current_version(client: &mut MsClient) -> Result<Version, SourceError> {
    let rows = client.query(sql::CURRENT_VERSION, &[], "reading the current version", "").await?;
    match rows.first().and_then(|r| r.first()) {
        Some(SqlValue::Int(v)) => Ok(Version(*v)),
        _ => Err(SourceError::config("change tracking is not enabled on the database")),
    }
}

pub async fn min_valid_version(client: &mut MsClient, table: &SourceTable) -> Result<Version, SourceError> {
    let shown = display(table);
    let rows = client
        .query(
            sql::MIN_VALID_VERSION,
            &[SqlParam::Text(qualified(table))],
            &format!("reading the min valid version of table {shown}"),
            "",
        )
        .await?;
    match rows.first().and_then(|r| r.first()) {
        Some(SqlValue::Int(v)) => Ok(Version(*v)),
        _ => Err(SourceError::config(format!("change tracking is not enabled on table {shown}"))),
    }
}

/// `mssql:<database_guid>:<recovery_fork_guid>`; see [`sql::IDENTITY`].
pub async fn identity(client: &mut MsClient) -> Result<String, SourceError> {
    let rows = client.query(sql::IDENTITY, &[], "reading the database identity", "").await?;
    match rows.first().map(|r| r.as_slice()) {
        Some([SqlValue::Text(db), SqlValue::Text(fork)]) => Ok(format!("mssql:{}:{}", db.to_lowercase(), fork.to_lowercase())),
        _ => Err(SourceError::new(
            SourceErrorKind::Config,
            "cannot read the database's GUIDs from sys.database_recovery_status; the agent's login must own \
             the database or hold VIEW ANY DATABASE",
        )),
    }
}

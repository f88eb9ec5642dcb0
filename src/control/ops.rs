//! What operators see and switch: `ctmirror status` (pairs, leases, running
//! runs with live progress, last outcomes, per-table state), run history,
//! `ctmirror resync` and `ctmirror maintenance`; plus the agent's side of
//! those switches (is a tenant in maintenance, which resyncs are pending).
//!
//! Operator commands take "now" like everything else, so a resync asked
//! "at once" is due by the same clock the agents schedule with.

use super::codec::{count, from_ts, key, opt_ts, parse_cursor, ts};
use super::errors::{corrupt, pg};
use super::ControlDb;
use crate::ids::TenantId;
use crate::protocol::Cursor;
use crate::schedule::store::{
    Outcome, PairKey, ResyncRequest, RunId, StoreError, StoreErrorKind, StoreResult, TableProgress, TableRun,
};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tokio_postgres::{Client, IsolationLevel, Row};

/// One pair as `ctmirror status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PairStatus {
    pub key: PairKey,
    /// The source server (`host:port`) the pair reads from.
    pub server: String,
    /// When the pair is next due (in the past while it runs or waits for a
    /// free slot).
    pub next_due: DateTime<Utc>,
    /// The agent process holding the lease, if any, and until when.
    pub lease_owner: Option<String>,
    pub lease_expires: Option<DateTime<Utc>>,
    /// The run in progress under the current lease.
    pub running: Option<RunningRun>,
    pub last_start: Option<DateTime<Utc>>,
    pub last_end: Option<DateTime<Utc>>,
    pub last_outcome: Option<Outcome>,
    pub last_error_kind: Option<String>,
    pub last_error: Option<String>,
    /// When a run last succeeded.
    pub last_success: Option<DateTime<Utc>>,
    /// Failed runs in a row (drives the backoff).
    pub failures: u32,
    /// The source version the last run synced up to.
    pub source_version: Option<i64>,
    /// The reason when the tenant is in maintenance.
    pub maintenance: Option<String>,
    /// Per-table state after the last run that touched each table, by name.
    pub tables: Vec<TableStatus>,
}

/// Where one table of a pair stands after its last run.
#[derive(Debug, Clone, PartialEq)]
pub struct TableStatus {
    pub table: String,
    /// The receiver's cursor as last reported.
    pub cursor: Option<Cursor>,
    /// What the last run did: full, incremental, idle, failed, interrupted.
    pub mode: String,
    /// The run that last touched the table, and when it ended.
    pub last_run_id: Option<RunId>,
    pub last_run: DateTime<Utc>,
    /// When a run last left the table up to date without error.
    pub last_success: Option<DateTime<Utc>>,
    pub last_error_kind: Option<String>,
    pub last_error: Option<String>,
    /// The end of the run that last started a full reload of the table,
    /// and why it did.
    pub last_reload: Option<DateTime<Utc>>,
    pub last_reload_reason: Option<String>,
}

/// A run in progress, with the live progress its agent last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningRun {
    pub id: RunId,
    /// The agent process running it.
    pub owner: String,
    pub started: DateTime<Utc>,
    /// Per table, by name.
    pub progress: Vec<TableProgress>,
    /// When progress was last reported.
    pub progress_updated: Option<DateTime<Utc>>,
}

/// One run of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: RunId,
    pub key: PairKey,
    /// The agent process that ran it.
    pub owner: String,
    pub started: DateTime<Utc>,
    /// None while running.
    pub ended: Option<DateTime<Utc>>,
    /// `running`, or an [`Outcome`] as text.
    pub outcome: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub source_version: Option<i64>,
    /// Per table, by name (empty from [`ControlDb::all_runs`]).
    pub tables: Vec<TableRun>,
}

impl ControlDb {
    /// Records an operator's request to reload a pair (one table, or all
    /// when `table` is None) and returns its id. With `at_once`, the pair
    /// becomes due at `now` if it was due later. The pair must be known:
    /// the agent registers its pairs when it starts.
    pub async fn request_resync(
        &self,
        pair: &PairKey,
        table: Option<&str>,
        now: DateTime<Utc>,
        at_once: bool,
    ) -> Result<i64, StoreError> {
        if table.is_some_and(|t| t.trim().is_empty()) {
            return Err(StoreError::new(StoreErrorKind::Fatal, "resync: the table name is empty"));
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let tenant = pair.tenant.as_str();
        let app = pair.app.as_str();
        let known = tx
            .query_opt(
                "SELECT 1 FROM ctmirror_control.pairs WHERE tenant = $1 AND app = $2 FOR UPDATE",
                &[&tenant, &app],
            )
            .await
            .map_err(pg)?;
        if known.is_none() {
            return Err(StoreError::new(
                StoreErrorKind::Fatal,
                format!("pair {pair} is not known to the control database yet: start the agent once"),
            ));
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO ctmirror_control.resync_requests (tenant, app, table_name, requested_at)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&tenant, &app, &table, &ts(now)],
            )
            .await
            .map_err(pg)?
            .get(0);
        if at_once {
            tx.execute(
                "UPDATE ctmirror_control.pairs SET next_due = $3
                 WHERE tenant = $1 AND app = $2 AND next_due > $3",
                &[&tenant, &app, &ts(now)],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(id)
    }

    /// Puts a tenant in maintenance (its pairs are skipped) or takes it out.
    pub async fn set_maintenance(
        &self,
        tenant: &TenantId,
        on: bool,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO ctmirror_control.tenant_flags (tenant, maintenance, reason, set_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant) DO UPDATE SET
                     maintenance = EXCLUDED.maintenance, reason = EXCLUDED.reason, set_at = EXCLUDED.set_at",
                &[&tenant.as_str(), &on, &reason, &ts(now)],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Every pair (of one tenant, or all), sorted by tenant and app, with
    /// tables sorted by name; read from one snapshot.
    pub async fn status(&self, tenant: Option<&TenantId>) -> Result<Vec<PairStatus>, StoreError> {
        let tenant = tenant.map(TenantId::as_str);
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let pairs = tx
            .query(
                "SELECT p.tenant, p.app, p.server, p.next_due, p.lease_owner, p.lease_expires,
                        r.id, r.owner, r.started,
                        p.last_start, p.last_end, p.last_outcome, p.last_error_kind, p.last_error,
                        p.last_success, p.failures, p.source_version,
                        CASE WHEN f.maintenance THEN coalesce(nullif(f.reason, ''), 'maintenance') END
                 FROM ctmirror_control.pairs p
                 LEFT JOIN ctmirror_control.runs r ON r.id = p.current_run AND r.outcome = 'running'
                 LEFT JOIN ctmirror_control.tenant_flags f ON f.tenant = p.tenant
                 WHERE $1::text IS NULL OR p.tenant = $1
                 ORDER BY p.tenant, p.app",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        let tables = tx
            .query(
                "SELECT tenant, app, table_name, cursor::text, mode, last_run_id, last_run,
                        last_success, last_error_kind, last_error, last_reload, last_reload_reason
                 FROM ctmirror_control.table_state
                 WHERE $1::text IS NULL OR tenant = $1
                 ORDER BY tenant, app, table_name",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        let progress = tx
            .query(
                "SELECT pr.run_id, pr.table_name, pr.mode, pr.rows, pr.bytes, pr.batches,
                        pr.cursor::text, pr.updated
                 FROM ctmirror_control.progress pr
                 JOIN ctmirror_control.pairs p ON p.current_run = pr.run_id
                 WHERE $1::text IS NULL OR p.tenant = $1
                 ORDER BY pr.run_id, pr.table_name",
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;

        let mut tables_of: HashMap<(String, String), Vec<TableStatus>> = HashMap::new();
        for row in tables {
            let (t, a): (String, String) = (row.get(0), row.get(1));
            let name: String = row.get(2);
            let cursor = parse_cursor(row.get(3), &format!("table {name} of {t}/{a}"))?;
            tables_of.entry((t, a)).or_default().push(TableStatus {
                table: name,
                cursor,
                mode: row.get(4),
                last_run_id: row.get::<_, Option<i64>>(5).map(RunId),
                last_run: from_ts(row.get(6)),
                last_success: opt_ts(row.get(7)),
                last_error_kind: row.get(8),
                last_error: row.get(9),
                last_reload: opt_ts(row.get(10)),
                last_reload_reason: row.get(11),
            });
        }
        let mut progress_of: HashMap<i64, (Vec<TableProgress>, Option<DateTime<Utc>>)> = HashMap::new();
        for row in progress {
            let run: i64 = row.get(0);
            let name: String = row.get(1);
            let cursor = parse_cursor(row.get(6), &format!("progress of table {name} in run {run}"))?;
            let updated = from_ts(row.get(7));
            let entry = progress_of.entry(run).or_default();
            entry.1 = entry.1.max(Some(updated));
            entry.0.push(TableProgress {
                table: name,
                mode: row.get(2),
                rows: count(row.get(3)),
                bytes: count(row.get(4)),
                batches: count(row.get(5)),
                cursor,
            });
        }

        pairs
            .into_iter()
            .map(|row| {
                let (t, a): (String, String) = (row.get(0), row.get(1));
                let tables = tables_of.remove(&(t.clone(), a.clone())).unwrap_or_default();
                let running = match row.get::<_, Option<i64>>(6) {
                    Some(id) => {
                        let (progress, progress_updated) = progress_of.remove(&id).unwrap_or_default();
                        Some(RunningRun {
                            id: RunId(id),
                            owner: row.get(7),
                            started: from_ts(row.get(8)),
                            progress,
                            progress_updated,
                        })
                    }
                    None => None,
                };
                let last_outcome = row
                    .get::<_, Option<String>>(11)
                    .map(|o| Outcome::parse(&o).ok_or_else(|| corrupt(format!("outcome {o:?} of {t}/{a}"))))
                    .transpose()?;
                let failures: i32 = row.get(15);
                Ok(PairStatus {
                    key: key(t, a)?,
                    server: row.get(2),
                    next_due: from_ts(row.get(3)),
                    lease_owner: row.get(4),
                    lease_expires: opt_ts(row.get(5)),
                    running,
                    last_start: opt_ts(row.get(9)),
                    last_end: opt_ts(row.get(10)),
                    last_outcome,
                    last_error_kind: row.get(12),
                    last_error: row.get(13),
                    last_success: opt_ts(row.get(14)),
                    failures: u32::try_from(failures).unwrap_or(0),
                    source_version: row.get(16),
                    maintenance: row.get(17),
                    tables,
                })
            })
            .collect()
    }

    /// The last `limit` runs of a pair, newest first, with their tables.
    pub async fn runs(&self, pair: &PairKey, limit: i64) -> Result<Vec<RunSummary>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("{RUN_COLUMNS} WHERE tenant = $1 AND app = $2 ORDER BY started DESC, id DESC LIMIT $3"),
                &[&pair.tenant.as_str(), &pair.app.as_str(), &limit.max(0)],
            )
            .await
            .map_err(pg)?;
        let mut runs = rows.iter().map(run_summary).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<i64> = runs.iter().map(|r| r.id.0).collect();
        let tables = client
            .query(
                "SELECT run_id, table_name, mode, rows, bytes, batches, from_cursor::text, to_cursor::text,
                        duration_ms, error_kind, error_message, reloaded, reload_reason
                 FROM ctmirror_control.table_runs WHERE run_id = ANY($1)
                 ORDER BY run_id, table_name",
                &[&ids],
            )
            .await
            .map_err(pg)?;
        let mut tables_of: HashMap<i64, Vec<TableRun>> = HashMap::new();
        for row in tables {
            let run: i64 = row.get(0);
            let name: String = row.get(1);
            let whose = format!("table {name} in run {run}");
            tables_of.entry(run).or_default().push(TableRun {
                mode: row.get(2),
                rows: count(row.get(3)),
                bytes: count(row.get(4)),
                batches: count(row.get(5)),
                from_cursor: parse_cursor(row.get(6), &whose)?,
                to_cursor: parse_cursor(row.get(7), &whose)?,
                duration: Duration::from_millis(count(row.get(8))),
                error_kind: row.get(9),
                error_message: row.get(10),
                reloaded: row.get(11),
                reload_reason: row.get(12),
                table: name,
            });
        }
        for run in &mut runs {
            run.tables = tables_of.remove(&run.id.0).unwrap_or_default();
        }
        Ok(runs)
    }

    /// Every run of every pair, by pair then start, without tables: for
    /// checks over the whole history (no pair ever ran twice at once).
    pub async fn all_runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(&format!("{RUN_COLUMNS} ORDER BY tenant, app, started, id"), &[])
            .await
            .map_err(pg)?;
        rows.iter().map(run_summary).collect()
    }
}

const RUN_COLUMNS: &str = "SELECT id, tenant, app, owner, started, ended, outcome, error_kind, error_message,
        rows, bytes, source_version
 FROM ctmirror_control.runs";

fn run_summary(row: &Row) -> Result<RunSummary, StoreError> {
    Ok(RunSummary {
        id: RunId(row.get(0)),
        key: key(row.get(1), row.get(2))?,
        owner: row.get(3),
        started: from_ts(row.get(4)),
        ended: opt_ts(row.get(5)),
        outcome: row.get(6),
        error_kind: row.get(7),
        error_message: row.get(8),
        rows: count(row.get(9)),
        bytes: count(row.get(10)),
        source_version: row.get(11),
        tables: Vec::new(),
    })
}

/// The maintenance reason when the tenant is in maintenance.
pub(crate) async fn maintenance(client: &Client, tenant: &TenantId) -> StoreResult<Option<String>> {
    let row = client
        .query_opt(
            "SELECT coalesce(nullif(reason, ''), 'maintenance') FROM ctmirror_control.tenant_flags
             WHERE tenant = $1 AND maintenance",
            &[&tenant.as_str()],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|r| r.get(0)))
}

/// Requests not done yet, oldest first.
pub(crate) async fn pending_resyncs(client: &Client, pair: &PairKey) -> StoreResult<Vec<ResyncRequest>> {
    let rows = client
        .query(
            "SELECT id, table_name, requested_at FROM ctmirror_control.resync_requests
             WHERE tenant = $1 AND app = $2 AND done_at IS NULL
             ORDER BY requested_at, id",
            &[&pair.tenant.as_str(), &pair.app.as_str()],
        )
        .await
        .map_err(pg)?;
    Ok(rows
        .into_iter()
        .map(|r| ResyncRequest { id: r.get(0), table: r.get(1), requested_at: from_ts(r.get::<_, SystemTime>(2)) })
        .collect())
}

/// Marks requests done (once: a second call keeps the first time).
pub(crate) async fn resync_done(client: &Client, ids: &[i64], now: DateTime<Utc>) -> StoreResult<()> {
    client
        .execute(
            "UPDATE ctmirror_control.resync_requests SET done_at = $2 WHERE id = ANY($1) AND done_at IS NULL",
            &[&ids, &ts(now)],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// See [`PairStore::narrow_resync`](crate::schedule::PairStore::narrow_resync).
/// A request already done (another process got there first) is left alone.
pub(crate) async fn narrow_resync(
    client: &mut Client,
    id: i64,
    tables: &[String],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(pg)?;
    let done = tx
        .execute(
            "UPDATE ctmirror_control.resync_requests SET done_at = $2 WHERE id = $1 AND done_at IS NULL",
            &[&id, &ts(now)],
        )
        .await
        .map_err(pg)?;
    if done == 1 {
        tx.execute(
            "INSERT INTO ctmirror_control.resync_requests (tenant, app, table_name, requested_at)
             SELECT r.tenant, r.app, t, r.requested_at
               FROM ctmirror_control.resync_requests r, unnest($2::text[]) AS t
              WHERE r.id = $1",
            &[&id, &tables],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

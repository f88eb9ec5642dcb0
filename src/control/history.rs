//! What every run did: its row in `runs` (marked running while it runs), the
//! live progress of its tables, and at its end the per-table record, the
//! pair's schedule state and the per-table state that `status` shows.
//!
//! History is written even when the lease was lost meanwhile: it records
//! what happened, and a run that overlapped another one is exactly what an
//! operator needs to see. Schedule and table state are only written under a
//! lease that still matches (fencing), so a late process never moves a
//! pair's schedule that another one now owns.
//!
//! Lock order is always the pair's row first, then runs rows, the order
//! `claim` uses, so a late finish and a takeover cannot deadlock.

use super::codec::{big, cursor_json, ts};
use super::errors::pg;
use crate::schedule::store::{Lease, Outcome, RunId, RunRecord, StoreResult, TableProgress, TableRun};
use chrono::{DateTime, Utc};
use std::time::SystemTime;
use tokio_postgres::{Client, Transaction};

/// Inserts a running run and links it to the pair when the lease still
/// matches. The row is written either way, so the caller's `finish` closes
/// it in the history.
pub(crate) async fn start_run(client: &Client, lease: &Lease, started: DateTime<Utc>) -> StoreResult<RunId> {
    let row = client
        .query_one(
            "WITH mine AS (
                 SELECT tenant, app FROM ctmirror_control.pairs
                 WHERE tenant = $1 AND app = $2 AND lease_owner = $3 AND lease_token = $4
                 FOR UPDATE
             ), run AS (
                 INSERT INTO ctmirror_control.runs (tenant, app, owner, lease_token, started)
                 VALUES ($1, $2, $3, $4, $5)
                 RETURNING id
             ), linked AS (
                 UPDATE ctmirror_control.pairs p SET current_run = run.id
                 FROM run, mine WHERE p.tenant = mine.tenant AND p.app = mine.app
                 RETURNING 1
             )
             SELECT id, EXISTS (SELECT 1 FROM linked) FROM run",
            &[&lease.key.tenant.as_str(), &lease.key.app.as_str(), &lease.owner, &lease.token, &ts(started)],
        )
        .await
        .map_err(pg)?;
    let id = RunId(row.get(0));
    if !row.get::<_, bool>(1) {
        tracing::warn!(pair = %lease.key, run = %id, "run started after its lease was taken over");
    }
    Ok(id)
}

/// Replaces the live progress of a run that is still running; progress
/// arriving after the run ended is dropped.
pub(crate) async fn progress(
    client: &mut Client,
    run: RunId,
    tables: &[TableProgress],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let names: Vec<&str> = tables.iter().map(|t| t.table.as_str()).collect();
    let modes: Vec<&str> = tables.iter().map(|t| t.mode.as_str()).collect();
    let rows: Vec<i64> = tables.iter().map(|t| big(t.rows)).collect();
    let bytes: Vec<i64> = tables.iter().map(|t| big(t.bytes)).collect();
    let batches: Vec<i64> = tables.iter().map(|t| big(t.batches)).collect();
    let cursors: Vec<Option<String>> = tables.iter().map(|t| cursor_json(&t.cursor)).collect();
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("DELETE FROM ctmirror_control.progress WHERE run_id = $1", &[&run.0]).await.map_err(pg)?;
    if !tables.is_empty() {
        tx.execute(
            "INSERT INTO ctmirror_control.progress
                 (run_id, table_name, mode, rows, bytes, batches, cursor, updated)
             SELECT DISTINCT ON (t.table_name)
                    $1, t.table_name, t.mode, t.rows, t.bytes, t.batches, t.cursor::jsonb, $8
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[])
                  WITH ORDINALITY AS t(table_name, mode, rows, bytes, batches, cursor, n)
             WHERE EXISTS (SELECT 1 FROM ctmirror_control.runs WHERE id = $1 AND outcome = 'running')
             ORDER BY t.table_name, t.n DESC",
            &[&run.0, &names, &modes, &rows, &bytes, &batches, &cursors, &ts(now)],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

/// Ends a run in one transaction; true when the lease still matched and the
/// pair's schedule was written (see the module docs).
pub(crate) async fn finish(
    client: &mut Client,
    lease: &Lease,
    run: Option<RunId>,
    record: &RunRecord,
    next_due: DateTime<Utc>,
    failures: u32,
) -> StoreResult<bool> {
    let tenant = lease.key.tenant.as_str();
    let app = lease.key.app.as_str();
    let tx = client.transaction().await.map_err(pg)?;
    let pair = tx
        .query_opt(
            "SELECT lease_owner IS NOT DISTINCT FROM $3 AND lease_token = $4, current_run
             FROM ctmirror_control.pairs WHERE tenant = $1 AND app = $2
             FOR UPDATE",
            &[&tenant, &app, &lease.owner, &lease.token],
        )
        .await
        .map_err(pg)?;
    let (matched, current_run) = match pair {
        Some(row) => (row.get::<_, bool>(0), row.get::<_, Option<i64>>(1)),
        None => (false, None),
    };

    if let Some(run) = run {
        write_run(&tx, lease, run, record).await?;
    }
    if matched {
        if let Some(stale) = current_run.filter(|c| Some(RunId(*c)) != run) {
            // A run started under this lease but not the one being finished:
            // close it rather than leave it running forever.
            tx.execute(
                "UPDATE ctmirror_control.runs
                 SET outcome = 'interrupted', error_kind = 'abandoned',
                     error_message = 'superseded by another run of the same lease', ended = greatest(started, $2)
                 WHERE id = $1 AND outcome = 'running'",
                &[&stale, &ts(record.ended)],
            )
            .await
            .map_err(pg)?;
        }
        write_pair(&tx, lease, record, next_due, failures).await?;
        write_table_state(&tx, lease, run, record).await?;
    } else {
        tracing::warn!(pair = %lease.key, owner = %lease.owner, "finish after the lease was lost: history only");
    }
    tx.commit().await.map_err(pg)?;
    Ok(matched)
}

/// Closes the run's row and records its tables. The row must belong to this
/// lease, so a wrong id cannot rewrite another process's run.
async fn write_run(tx: &Transaction<'_>, lease: &Lease, run: RunId, record: &RunRecord) -> StoreResult<()> {
    let n = tx
        .execute(
            "UPDATE ctmirror_control.runs
             SET ended = $6, outcome = $7, error_kind = $8, error_message = $9,
                 rows = $10, bytes = $11, source_version = $12
             WHERE id = $1 AND tenant = $2 AND app = $3 AND owner = $4 AND lease_token = $5",
            &[
                &run.0,
                &lease.key.tenant.as_str(),
                &lease.key.app.as_str(),
                &lease.owner,
                &lease.token,
                &ts(record.ended),
                &record.outcome.as_str(),
                &record.error_kind,
                &record.error_message,
                &big(record.rows()),
                &big(record.bytes()),
                &record.source_version,
            ],
        )
        .await
        .map_err(pg)?;
    if n == 0 {
        tracing::warn!(pair = %lease.key, run = %run, "finish names a run of another lease: its history is not written");
        return Ok(());
    }
    tx.execute("DELETE FROM ctmirror_control.progress WHERE run_id = $1", &[&run.0]).await.map_err(pg)?;
    if record.tables.is_empty() {
        return Ok(());
    }
    let t = &record.tables;
    let names: Vec<&str> = t.iter().map(|t| t.table.as_str()).collect();
    let modes: Vec<&str> = t.iter().map(|t| t.mode.as_str()).collect();
    let rows: Vec<i64> = t.iter().map(|t| big(t.rows)).collect();
    let bytes: Vec<i64> = t.iter().map(|t| big(t.bytes)).collect();
    let batches: Vec<i64> = t.iter().map(|t| big(t.batches)).collect();
    let from: Vec<Option<String>> = t.iter().map(|t| cursor_json(&t.from_cursor)).collect();
    let to: Vec<Option<String>> = t.iter().map(|t| cursor_json(&t.to_cursor)).collect();
    let from_v: Vec<Option<i64>> = t.iter().map(|t| t.from_cursor.as_ref().map(|c| c.version().0)).collect();
    let to_v: Vec<Option<i64>> = t.iter().map(|t| t.to_cursor.as_ref().map(|c| c.version().0)).collect();
    let ms: Vec<i64> = t.iter().map(|t| i64::try_from(t.duration.as_millis()).unwrap_or(i64::MAX)).collect();
    let kinds: Vec<Option<&str>> = t.iter().map(|t| t.error_kind.as_deref()).collect();
    let messages: Vec<Option<&str>> = t.iter().map(|t| t.error_message.as_deref()).collect();
    let reloaded: Vec<bool> = t.iter().map(|t| t.reloaded).collect();
    let reasons: Vec<Option<&str>> = t.iter().map(|t| t.reload_reason.as_deref()).collect();
    // ON CONFLICT: a finish retried after a lost reply writes the same rows.
    tx.execute(
        "INSERT INTO ctmirror_control.table_runs AS tr
             (run_id, table_name, mode, rows, bytes, batches, from_cursor, to_cursor,
              from_version, to_version, duration_ms, error_kind, error_message, reloaded, reload_reason)
         SELECT DISTINCT ON (t.table_name)
                $1, t.table_name, t.mode, t.rows, t.bytes, t.batches, t.from_cursor::jsonb, t.to_cursor::jsonb,
                t.from_version, t.to_version, t.duration_ms, t.error_kind, t.error_message, t.reloaded,
                t.reload_reason
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[], $8::text[],
                     $9::bigint[], $10::bigint[], $11::bigint[], $12::text[], $13::text[], $14::bool[], $15::text[])
              WITH ORDINALITY AS t(table_name, mode, rows, bytes, batches, from_cursor, to_cursor,
                                   from_version, to_version, duration_ms, error_kind, error_message, reloaded,
                                   reload_reason, n)
         ORDER BY t.table_name, t.n DESC
         ON CONFLICT (run_id, table_name) DO UPDATE SET
             mode = EXCLUDED.mode, rows = EXCLUDED.rows, bytes = EXCLUDED.bytes, batches = EXCLUDED.batches,
             from_cursor = EXCLUDED.from_cursor, to_cursor = EXCLUDED.to_cursor,
             from_version = EXCLUDED.from_version, to_version = EXCLUDED.to_version,
             duration_ms = EXCLUDED.duration_ms, error_kind = EXCLUDED.error_kind,
             error_message = EXCLUDED.error_message, reloaded = EXCLUDED.reloaded,
             reload_reason = EXCLUDED.reload_reason",
        &[
            &run.0, &names, &modes, &rows, &bytes, &batches, &from, &to, &from_v, &to_v, &ms, &kinds, &messages,
            &reloaded, &reasons,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// The pair's schedule state after the run; the lease is cleared.
async fn write_pair(
    tx: &Transaction<'_>,
    lease: &Lease,
    record: &RunRecord,
    next_due: DateTime<Utc>,
    failures: u32,
) -> StoreResult<()> {
    let failures = i32::try_from(failures).unwrap_or(i32::MAX);
    let succeeded = record.outcome == Outcome::Succeeded;
    tx.execute(
        "UPDATE ctmirror_control.pairs
         SET next_due = $3, last_start = $4, last_end = $5, last_outcome = $6,
             last_error_kind = $7, last_error = $8,
             last_success = CASE WHEN $9::bool THEN $5 ELSE last_success END,
             failures = $10, source_version = coalesce($11, source_version),
             current_run = NULL, lease_owner = NULL, lease_expires = NULL
         WHERE tenant = $1 AND app = $2",
        &[
            &lease.key.tenant.as_str(),
            &lease.key.app.as_str(),
            &ts(next_due),
            &ts(record.started),
            &ts(record.ended),
            &record.outcome.as_str(),
            &record.error_kind,
            &record.error_message,
            &succeeded,
            &failures,
            &record.source_version,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Whether a table is up to date after the run: no error, and neither
/// failed nor stopped midway (an interrupted full load is not a success).
fn table_ok(t: &TableRun) -> bool {
    t.error_kind.is_none() && t.error_message.is_none() && !matches!(t.mode.as_str(), "failed" | "interrupted")
}

/// Where each table of the run now stands. A failed table whose cursor the
/// run did not learn keeps its previous cursor, unless a reload of it
/// started in this run (then its old cursor is certainly wrong).
async fn write_table_state(
    tx: &Transaction<'_>,
    lease: &Lease,
    run: Option<RunId>,
    record: &RunRecord,
) -> StoreResult<()> {
    if record.tables.is_empty() {
        return Ok(());
    }
    let t = &record.tables;
    let names: Vec<&str> = t.iter().map(|t| t.table.as_str()).collect();
    let modes: Vec<&str> = t.iter().map(|t| t.mode.as_str()).collect();
    let cursors: Vec<Option<String>> = t.iter().map(|t| cursor_json(&t.to_cursor)).collect();
    let ok: Vec<bool> = t.iter().map(table_ok).collect();
    let keep: Vec<bool> = t.iter().map(|t| !table_ok(t) && t.to_cursor.is_none() && !t.reloaded).collect();
    let kinds: Vec<Option<&str>> = t.iter().map(|t| t.error_kind.as_deref()).collect();
    let messages: Vec<Option<&str>> = t.iter().map(|t| t.error_message.as_deref()).collect();
    let reloaded: Vec<bool> = t.iter().map(|t| t.reloaded).collect();
    let reasons: Vec<Option<&str>> = t.iter().map(|t| t.reload_reason.as_deref()).collect();
    let ended: SystemTime = ts(record.ended);
    tx.execute(
        "INSERT INTO ctmirror_control.table_state AS s
             (tenant, app, table_name, cursor, mode, last_run_id, last_run, last_success, last_error_kind, last_error,
              last_reload, last_reload_reason)
         SELECT DISTINCT ON (t.table_name)
                $1, $2, t.table_name,
                CASE WHEN t.keep THEN old.cursor ELSE t.cursor::jsonb END,
                t.mode, $3, $4,
                CASE WHEN t.ok THEN $4 ELSE old.last_success END,
                t.error_kind, t.error_message,
                CASE WHEN t.reloaded THEN $4 ELSE old.last_reload END,
                CASE WHEN t.reloaded THEN t.reload_reason ELSE old.last_reload_reason END
         FROM unnest($5::text[], $6::text[], $7::text[], $8::bool[], $9::bool[], $10::text[], $11::text[],
                     $12::bool[], $13::text[])
              WITH ORDINALITY AS t(table_name, mode, cursor, ok, keep, error_kind, error_message, reloaded,
                                   reload_reason, n)
         LEFT JOIN ctmirror_control.table_state old
                ON old.tenant = $1 AND old.app = $2 AND old.table_name = t.table_name
         ORDER BY t.table_name, t.n DESC
         ON CONFLICT (tenant, app, table_name) DO UPDATE SET
             cursor = EXCLUDED.cursor, mode = EXCLUDED.mode, last_run_id = EXCLUDED.last_run_id,
             last_run = EXCLUDED.last_run, last_success = EXCLUDED.last_success,
             last_error_kind = EXCLUDED.last_error_kind, last_error = EXCLUDED.last_error,
             last_reload = EXCLUDED.last_reload, last_reload_reason = EXCLUDED.last_reload_reason",
        &[
            &lease.key.tenant.as_str(),
            &lease.key.app.as_str(),
            &run.map(|r| r.0),
            &ended,
            &names,
            &modes,
            &cursors,
            &ok,
            &keep,
            &kinds,
            &messages,
            &reloaded,
            &reasons,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Deletes finished runs that started before `before` (their tables and
/// progress go with them); running runs are kept whatever their age.
pub(crate) async fn prune(client: &Client, before: DateTime<Utc>) -> StoreResult<u64> {
    // Done resync requests are history too; pending ones are kept however old.
    client
        .execute("DELETE FROM ctmirror_control.resync_requests WHERE done_at < $1", &[&ts(before)])
        .await
        .map_err(pg)?;
    client
        .execute("DELETE FROM ctmirror_control.runs WHERE started < $1 AND ended IS NOT NULL", &[&ts(before)])
        .await
        .map_err(pg)
}

//! `ctmirror status`: every pair, its tables and its running cycle, as text.

use super::{ago, columns, compact_cursor, error_text, human_bytes, human_duration, message, sanitize};
use crate::control::{ControlDb, PairStatus, RunningRun, TableStatus};
use crate::ids::TenantId;
use crate::schedule::store::{Outcome, StoreError};
use chrono::{DateTime, TimeDelta, Utc};
use std::io::Write;

/// How long past its due time a pair that is not running counts as due
/// "now" rather than "overdue": agents pick due pairs up within moments, so
/// beyond this a pair waits for a free slot or for an agent at all.
const DUE_SLACK: TimeDelta = TimeDelta::seconds(10);

/// Shown instead of an empty screen.
pub(super) const NO_PAIRS: &str = "no pairs known to the control database yet (has an agent started?)";

/// Prints the status of every pair (of one tenant, or all) to stdout.
pub async fn print_status(control: &ControlDb, tenant: Option<&TenantId>) -> Result<(), StoreError> {
    let statuses = control.status(tenant).await?;
    let text = match tenant {
        Some(t) if statuses.is_empty() => format!(
            "no pairs of tenant {t} known to the control database (is it configured, and has an agent started since?)\n"
        ),
        _ => render(&statuses, Utc::now()),
    };
    // Nothing sensible to do when stdout is gone (`| head`): not an error
    // of the control database, and no panic either.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(())
}

/// The status screen: per pair a header line (state, what it does, last
/// success, next due, source), its last error when it matters, its tables
/// with cursor and lag, and for a running pair the live progress.
pub fn render(statuses: &[PairStatus], now: DateTime<Utc>) -> String {
    if statuses.is_empty() {
        return format!("{NO_PAIRS}\n");
    }
    let headers = columns(&statuses.iter().map(|p| header(p, now)).collect::<Vec<_>>(), "", 3);
    let mut out = String::new();
    for (i, (pair, head)) in statuses.iter().zip(headers).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&head);
        out.push('\n');
        for line in notes(pair) {
            out.push_str(&line);
            out.push('\n');
        }
        for line in tables(pair, now) {
            out.push_str(&line);
            out.push('\n');
        }
        for line in reloads(pair, now) {
            out.push_str(&line);
            out.push('\n');
        }
        if let Some(run) = &pair.running {
            for line in progress(run, now) {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

/// The pair's state in one word (first match wins), with the failure count
/// when failing.
pub(super) fn state(p: &PairStatus) -> String {
    if p.running.is_some() {
        return "running".into();
    }
    // The control database's flag, or the configuration's (which only
    // shows as the outcome of the turn it made the agent skip).
    if p.maintenance.is_some() || p.last_outcome == Some(Outcome::Maintenance) {
        return "maintenance".into();
    }
    match p.last_outcome {
        Some(Outcome::Failed) if p.failures > 0 => format!("failing ({} in a row)", p.failures),
        Some(Outcome::Failed) => "failing".into(),
        Some(Outcome::Paused) => "paused".into(),
        Some(Outcome::Interrupted) => "interrupted".into(),
        Some(Outcome::Succeeded) => "idle".into(),
        Some(Outcome::Maintenance) | None => "new".into(),
    }
}

fn header(p: &PairStatus, now: DateTime<Utc>) -> Vec<String> {
    let doing = match &p.running {
        Some(run) => {
            let mut s = format!(
                "since {} on {} (run {})",
                human_duration((now - run.started).num_seconds()),
                sanitize(&run.owner, 80),
                run.id
            );
            if let Some(exp) = p.lease_expires.filter(|e| *e < now) {
                s.push_str(&format!(", lease expired {} ago", human_duration((now - exp).num_seconds())));
            }
            s
        }
        None => match (&p.lease_owner, p.lease_expires) {
            (Some(owner), Some(exp)) if exp > now => format!("claimed by {}", sanitize(owner, 80)),
            _ => match (p.last_start, p.last_end) {
                (Some(start), Some(end)) if end >= start => format!(
                    "last run {} (took {})",
                    ago(Some(end), now),
                    human_duration((end - start).num_seconds())
                ),
                (_, Some(end)) => format!("last run {}", ago(Some(end), now)),
                _ => "never ran".into(),
            },
        },
    };
    let next = if p.running.is_some() {
        "-".to_owned()
    } else {
        let until = p.next_due - now;
        if until > TimeDelta::zero() {
            format!("in {}", human_duration(until.num_seconds().max(1)))
        } else if -until <= DUE_SLACK {
            "now".to_owned()
        } else {
            format!("overdue {}", human_duration((-until).num_seconds()))
        }
    };
    let source = match p.source_version {
        Some(v) => format!("source {} v{v}", sanitize(&p.server, 80)),
        None => format!("source {}", sanitize(&p.server, 80)),
    };
    vec![
        p.key.to_string(),
        state(p),
        doing,
        format!("last success {}", ago(p.last_success, now)),
        format!("next due {next}"),
        source,
    ]
}

/// The pair's last error, or why it does not run, on lines of their own.
fn notes(p: &PairStatus) -> Vec<String> {
    let kind = p.last_error_kind.as_deref().map(|k| format!(" ({})", sanitize(k, 40))).unwrap_or_default();
    let msg = |fallback: &str| p.last_error.as_deref().map(message).unwrap_or_else(|| fallback.to_owned());
    let mut lines = Vec::new();
    if let Some(reason) = &p.maintenance {
        lines.push(format!("    in maintenance: {}", message(reason)));
    }
    match p.last_outcome {
        Some(Outcome::Failed) => lines.push(format!("    last error{kind}: {}", msg("(no message recorded)"))),
        Some(Outcome::Paused) => {
            lines.push(format!("    paused by the partner{kind}: {}", msg("it answered \"do not replicate\"")))
        }
        Some(Outcome::Maintenance) if p.maintenance.is_none() => {
            lines.push(format!("    in maintenance: {}", msg("(no reason recorded)")))
        }
        Some(Outcome::Interrupted) if p.last_error.is_some() => {
            lines.push(format!("    last run interrupted{kind}: {}", msg("")))
        }
        _ => {}
    }
    lines
}

/// Lag in versions behind the source as the last cycle saw it, and a note
/// when the cursor is ahead of that.
fn lag(p: &PairStatus, t: &TableStatus) -> (String, Option<String>) {
    let (Some(source), Some(cursor)) = (p.source_version, &t.cursor) else {
        return ("-".into(), None);
    };
    let at = cursor.version().0;
    match source.checked_sub(at) {
        Some(d) if d >= 0 => (d.to_string(), None),
        _ => ("-".into(), Some(format!("cursor ahead of source ({at} > {source})"))),
    }
}

fn tables(p: &PairStatus, now: DateTime<Utc>) -> Vec<String> {
    if p.tables.is_empty() {
        return vec!["    no table state recorded yet".into()];
    }
    let mut rows = vec![["table", "cursor", "lag", "mode", "last success", "error"].map(String::from).to_vec()];
    for t in &p.tables {
        let (lag, note) = lag(p, t);
        let error = error_text(t.last_error_kind.as_deref(), t.last_error.as_deref());
        let error = match (note, error.as_str()) {
            (Some(n), "-") => n,
            (Some(n), _) => format!("{n}; {error}"),
            (None, _) => error,
        };
        rows.push(vec![
            sanitize(&t.table, 80),
            compact_cursor(t.cursor.as_ref()),
            lag,
            sanitize(&t.mode, 20),
            ago(t.last_success, now),
            error,
        ]);
    }
    columns(&rows, "    ", 2)
}

/// When and why each table was last reloaded: a reload costs a full copy,
/// so an operator wants to see what caused it (retention expired, a
/// restored source, a schema change, a request).
fn reloads(p: &PairStatus, now: DateTime<Utc>) -> Vec<String> {
    p.tables
        .iter()
        .filter_map(|t| {
            let when = t.last_reload?;
            let why = t.last_reload_reason.as_deref().unwrap_or("no reason recorded");
            Some(format!("    {} reloaded {}: {}", sanitize(&t.table, 80), ago(Some(when), now), sanitize(why, 200)))
        })
        .collect()
}

fn progress(run: &RunningRun, now: DateTime<Utc>) -> Vec<String> {
    let Some(updated) = run.progress_updated.filter(|_| !run.progress.is_empty()) else {
        return vec!["    live progress: none reported yet".into()];
    };
    let mut lines = vec![format!("    live progress (updated {}):", ago(Some(updated), now))];
    let mut rows = vec![["table", "mode", "rows", "batches", "bytes", "cursor"].map(String::from).to_vec()];
    for t in &run.progress {
        rows.push(vec![
            sanitize(&t.table, 80),
            sanitize(&t.mode, 20),
            t.rows.to_string(),
            t.batches.to_string(),
            human_bytes(t.bytes),
            compact_cursor(t.cursor.as_ref()),
        ]);
    }
    lines.extend(columns(&rows, "      ", 2));
    lines
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::ids::{AppId, TenantId};
    use crate::protocol::{Cursor, Key, Value, Version};
    use crate::schedule::store::{PairKey, RunId, TableProgress};
    use chrono::TimeZone;

    pub(crate) fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
    }

    pub(crate) fn secs_ago(s: i64) -> DateTime<Utc> {
        now() - TimeDelta::seconds(s)
    }

    pub(crate) fn changes(v: i64) -> Option<Cursor> {
        Some(Cursor::Changes { version: Version(v), after_key: None })
    }

    /// A pair that last succeeded 3 minutes ago and is due in 4.
    pub(crate) fn idle(tenant: &str, app: &str) -> PairStatus {
        PairStatus {
            key: PairKey { tenant: TenantId::new(tenant).unwrap(), app: AppId::new(app).unwrap() },
            server: "db1:1433".into(),
            next_due: now() + TimeDelta::minutes(4),
            lease_owner: None,
            lease_expires: None,
            running: None,
            last_start: Some(secs_ago(190)),
            last_end: Some(secs_ago(180)),
            last_outcome: Some(Outcome::Succeeded),
            last_error_kind: None,
            last_error: None,
            last_success: Some(secs_ago(180)),
            failures: 0,
            source_version: Some(1234),
            maintenance: None,
            tables: vec![table("contact", changes(1234)), table("deal", changes(1200))],
        }
    }

    pub(crate) fn table(name: &str, cursor: Option<Cursor>) -> TableStatus {
        TableStatus {
            table: name.into(),
            cursor,
            mode: "incremental".into(),
            last_run_id: Some(RunId(41)),
            last_run: secs_ago(180),
            last_success: Some(secs_ago(180)),
            last_error_kind: None,
            last_error: None,
            last_reload: None,
            last_reload_reason: None,
        }
    }

    pub(crate) fn running(mut p: PairStatus, run: i64, progress: Vec<TableProgress>) -> PairStatus {
        p.lease_owner = Some("host-123".into());
        p.lease_expires = Some(now() + TimeDelta::seconds(60));
        p.next_due = secs_ago(12);
        p.running = Some(RunningRun {
            id: RunId(run),
            owner: "host-123".into(),
            started: secs_ago(12),
            progress_updated: Some(secs_ago(2)),
            progress,
        });
        p
    }

    pub(crate) fn prog(table: &str, rows: u64, cursor: Option<Cursor>) -> TableProgress {
        TableProgress { table: table.into(), mode: "full".into(), rows, bytes: rows * 100, batches: rows / 1000 + 1, cursor }
    }

    const HOSTILE: &str = "receiver answered 503:\n\x1b[31mService Unavailable\x1b[0m\r\n\x1b]0;pwned\x07retry later";

    fn failing() -> PairStatus {
        let mut p = idle("acme", "billing");
        p.last_outcome = Some(Outcome::Failed);
        p.failures = 3;
        p.last_error_kind = Some("transient".into());
        p.last_error = Some(HOSTILE.into());
        p.last_success = Some(secs_ago(2 * 3600 + 5 * 60));
        p.next_due = secs_ago(150);
        p.tables[1].last_error_kind = Some("transient".into());
        p.tables[1].last_error = Some(format!("{HOSTILE} {}", "x".repeat(400)));
        p.tables[1].mode = "failed".into();
        p
    }

    #[test]
    fn empty_list_says_so() {
        assert_eq!(render(&[], now()), format!("{NO_PAIRS}\n"));
    }

    #[test]
    fn running_idle_and_failing_pairs() {
        let snapshot = Cursor::Snapshot { version: Version(1300), after_key: Some(Key(vec![Value::Int(9876)])) };
        let run = running(
            idle("acme", "crm_insights"),
            42,
            vec![prog("contact", 0, changes(1234)), prog("deal", 12_345, Some(snapshot))],
        );
        let out = render(&[run, idle("acme", "erp"), failing()], now());
        let expected = "\
acme/crm_insights   running                since 12s on host-123 (run 42)   last success 3m ago      next due -            source db1:1433 v1234
    table    cursor        lag  mode         last success  error
    contact  changes@1234  0    incremental  3m ago        -
    deal     changes@1200  34   incremental  3m ago        -
    live progress (updated 2s ago):
      table    mode  rows   batches  bytes    cursor
      contact  full  0      1        0 B      changes@1234
      deal     full  12345  13       1.2 MiB  snapshot@1300+[9876]

acme/erp            idle                   last run 3m ago (took 10s)       last success 3m ago      next due in 4m        source db1:1433 v1234
    table    cursor        lag  mode         last success  error
    contact  changes@1234  0    incremental  3m ago        -
    deal     changes@1200  34   incremental  3m ago        -

acme/billing        failing (3 in a row)   last run 3m ago (took 10s)       last success 2h 5m ago   next due overdue 2m   source db1:1433 v1234
    last error (transient): receiver answered 503: [31mService Unavailable [0m ]0;pwned retry later
    table    cursor        lag  mode         last success  error
    contact  changes@1234  0    incremental  3m ago        -
    deal     changes@1200  34   failed       3m ago        transient: receiver answered 503: [31mService Unavailable [0m ]0;pwned retry later ";
        assert!(out.starts_with(expected), "{out}");
        assert!(out.ends_with("xxx…\n"), "{out}");
    }

    #[test]
    fn hostile_messages_are_sanitised_and_cut() {
        let out = render(&[failing()], now());
        assert!(!out.contains('\x1b') && !out.contains('\x07') && !out.contains('\r'), "{out:?}");
        assert!(out.contains("last error (transient): receiver answered 503: [31mService Unavailable"));
        let deal = out.lines().find(|l| l.trim_start().starts_with("deal")).unwrap();
        assert!(deal.contains("failed") && deal.contains("transient: receiver answered 503"), "{deal}");
        assert!(deal.ends_with('…'), "{deal}");
        let error = &deal[deal.find("transient").unwrap()..];
        assert!(error.chars().count() < 260, "{}", error.chars().count());
        // Every line is one line: no newline smuggled inside.
        assert_eq!(out.lines().count(), 5, "{out}");
    }

    #[test]
    fn table_without_cursor_and_unknown_source() {
        let mut p = idle("acme", "crm");
        p.tables.push(table("fresh", None));
        p.tables[2].last_success = None;
        p.tables[2].mode = "full".into();
        let out = render(&[p.clone()], now());
        let fresh = out.lines().find(|l| l.trim_start().starts_with("fresh")).unwrap();
        assert_eq!(fresh.split_whitespace().collect::<Vec<_>>(), ["fresh", "-", "-", "full", "never", "-"]);

        p.source_version = None;
        let out = render(&[p], now());
        let contact = out.lines().find(|l| l.trim_start().starts_with("contact")).unwrap();
        assert_eq!(contact.split_whitespace().nth(2), Some("-"), "{contact}");
        assert!(out.lines().next().unwrap().ends_with("source db1:1433"));
    }

    #[test]
    fn the_last_reload_of_a_table_says_when_and_why() {
        let mut p = idle("acme", "crm");
        p.tables[1].last_reload = Some(secs_ago(7200));
        p.tables[1].last_reload_reason = Some("retention expired: \x1b[2Jversion 5 < 9".into());
        let out = render(&[p], now());
        assert!(out.contains("\n    deal reloaded 2h ago: retention expired: [2Jversion 5 < 9\n"), "{out}");
        assert_eq!(out.matches("reloaded").count(), 1, "{out}");
    }

    #[test]
    fn lag_is_source_minus_cursor_and_never_negative() {
        let mut p = idle("acme", "crm");
        p.tables[0].cursor = Some(Cursor::Changes { version: Version(1000), after_key: Some(Key(vec![Value::Int(5)])) });
        p.tables[1].cursor = changes(1300);
        let out = render(&[p], now());
        let contact = out.lines().find(|l| l.trim_start().starts_with("contact")).unwrap();
        assert_eq!(contact.split_whitespace().take(3).collect::<Vec<_>>(), ["contact", "changes@1000+[5]", "234"]);
        let deal = out.lines().find(|l| l.trim_start().starts_with("deal")).unwrap();
        assert_eq!(deal.split_whitespace().nth(2), Some("-"));
        assert!(deal.ends_with("cursor ahead of source (1300 > 1234)"), "{deal}");
    }

    #[test]
    fn maintenance_paused_new_and_interrupted() {
        let mut m = idle("acme", "crm");
        m.maintenance = Some("upgrade\x1b[2J of the source".into());
        m.last_outcome = Some(Outcome::Maintenance);
        m.last_error = Some("tenant in maintenance".into());
        let out = render(&[m.clone()], now());
        assert_eq!(state(&m), "maintenance");
        assert!(out.contains("\n    in maintenance: upgrade [2J of the source\n"), "{out}");
        assert_eq!(out.matches("in maintenance").count(), 1, "{out}");

        // Maintenance from the configuration: only the skipped turn tells.
        m.maintenance = None;
        m.last_error = Some("maintenance = true in the configuration".into());
        assert_eq!(state(&m), "maintenance");
        assert!(render(&[m], now()).contains("\n    in maintenance: maintenance = true in the configuration\n"));

        let mut p = idle("acme", "crm");
        p.last_outcome = Some(Outcome::Paused);
        p.last_error = Some("partner: do not replicate (contract ended)".into());
        assert_eq!(state(&p), "paused");
        assert!(render(&[p], now()).contains("    paused by the partner: partner: do not replicate (contract ended)"));

        let mut n = idle("acme", "crm");
        n.last_outcome = None;
        n.last_start = None;
        n.last_end = None;
        n.last_success = None;
        n.tables.clear();
        n.next_due = now();
        let out = render(&[n.clone()], now());
        assert_eq!(state(&n), "new");
        assert!(out.contains("never ran") && out.contains("last success never") && out.contains("next due now"));
        assert!(out.contains("no table state recorded yet"), "{out}");

        let mut i = idle("acme", "crm");
        i.last_outcome = Some(Outcome::Interrupted);
        i.last_error_kind = Some("lease".into());
        i.last_error = Some("lease lost".into());
        assert_eq!(state(&i), "interrupted");
        assert!(render(&[i], now()).contains("    last run interrupted (lease): lease lost"));
    }

    #[test]
    fn running_pair_shows_last_failure_and_dead_lease() {
        let mut p = running(failing(), 7, vec![]);
        p.lease_expires = Some(secs_ago(90));
        let out = render(&[p], now());
        let head = out.lines().next().unwrap();
        assert!(head.contains("running ") && !head.contains("failing"), "{head}");
        assert!(head.contains("since 12s on host-123 (run 7), lease expired 1m ago"), "{head}");
        assert!(out.contains("    last error (transient): receiver answered 503"), "{out}");
        assert!(out.contains("    live progress: none reported yet"), "{out}");
    }

    #[test]
    fn claimed_pair_names_its_claimant() {
        let mut p = idle("acme", "crm");
        p.lease_owner = Some("host-9".into());
        p.lease_expires = Some(now() + TimeDelta::seconds(30));
        p.next_due = secs_ago(3);
        let head = render(&[p], now()).lines().next().unwrap().to_owned();
        assert!(head.contains("claimed by host-9") && head.contains("next due now"), "{head}");
    }
}

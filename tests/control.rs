//! The control database against a real PostgreSQL (`CTMIRROR_TEST_PG`):
//! migrations, leases and fencing, history, operator switches and status.
//! Every test gets its own database; every time is a chosen instant, as the
//! agent's clock would pass it.

mod support;

use chrono::{DateTime, TimeZone, Utc};
use ctmirror::control::ControlDb;
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::{Cursor, Version};
use ctmirror::schedule::store::{
    Claim, Lease, Outcome, PairKey, PairRegistration, PairStore, RunRecord, StoreErrorKind, TableProgress, TableRun,
};
use std::collections::HashSet;
use std::time::Duration;
use support::TestDb;

const MINUTE: Duration = Duration::from_secs(60);

/// A fixed instant plus `secs` seconds.
fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(secs)
}

fn key(tenant: &str, app: &str) -> PairKey {
    PairKey { tenant: TenantId::new(tenant).unwrap(), app: AppId::new(app).unwrap() }
}

fn reg(tenant: &str, app: &str, server: &str, first_due: DateTime<Utc>) -> PairRegistration {
    PairRegistration { key: key(tenant, app), server: server.into(), first_due }
}

fn changes(v: i64) -> Option<Cursor> {
    Some(Cursor::Changes { version: Version(v), after_key: None })
}

fn table(name: &str, rows: u64, to: Option<Cursor>, error: Option<&str>) -> TableRun {
    TableRun {
        table: name.into(),
        mode: if error.is_some() { "failed" } else { "incremental" }.into(),
        rows,
        bytes: rows * 10,
        batches: 1,
        from_cursor: None,
        to_cursor: to,
        duration: Duration::from_millis(1500),
        error_kind: error.map(|_| "source".to_owned()),
        error_message: error.map(str::to_owned),
        reloaded: false,
        reload_reason: None,
    }
}

fn record(started: i64, ended: i64, outcome: Outcome, tables: Vec<TableRun>) -> RunRecord {
    let failed = outcome == Outcome::Failed;
    RunRecord {
        started: t(started),
        ended: t(ended),
        outcome,
        error_kind: failed.then(|| "source".to_owned()),
        error_message: failed.then(|| "source database refused the read".to_owned()),
        source_version: Some(ended),
        tables,
    }
}

async fn fresh(label: &str) -> (TestDb, ControlDb) {
    let db = TestDb::create(label).await;
    let control = ControlDb::connect(&db.url).await.expect("connect to a fresh control database");
    (db, control)
}

/// Claims exactly one pair and returns its claim.
async fn claim_one(control: &ControlDb, owner: &str, pair: &PairKey, now: DateTime<Utc>) -> Claim {
    let mut claims = control.claim(owner, std::slice::from_ref(pair), now, MINUTE, 1, &[]).await.unwrap();
    assert_eq!(claims.len(), 1, "{owner} could not claim {pair} at {now}");
    claims.remove(0)
}

async fn pair_status(control: &ControlDb, pair: &PairKey) -> ctmirror::control::PairStatus {
    control.status(Some(&pair.tenant)).await.unwrap().into_iter().find(|s| &s.key == pair).expect("pair in status")
}

#[tokio::test]
async fn migrations_apply_once_and_reconnect_is_idempotent() {
    let (db, control) = fresh("migrations_apply_once").await;
    let latest = ctmirror::control::migrate::latest();
    assert_eq!(control.schema_version().await.unwrap(), latest);
    control.register(&[reg("acme", "crm", "db1:1433", t(0))]).await.unwrap();

    let again = ControlDb::connect(&db.url).await.expect("reconnect");
    assert_eq!(again.schema_version().await.unwrap(), latest);
    let client = db.client().await;
    let applied: i64 =
        client.query_one("SELECT count(*) FROM ctmirror_control.schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(applied, latest as i64, "each migration recorded once");
    assert_eq!(again.next_due(&[key("acme", "crm")], t(0)).await.unwrap(), Some(t(0)), "data survives a reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_migrate_without_error() {
    let db = TestDb::create("concurrent_connects_migrate").await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { ControlDb::connect(&url).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("every concurrent connect succeeds");
    }
    let client = db.client().await;
    let applied: i64 =
        client.query_one("SELECT count(*) FROM ctmirror_control.schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(applied, ctmirror::control::migrate::latest() as i64);
}

#[tokio::test]
async fn newer_schema_version_is_refused() {
    let (db, _control) = fresh("newer_schema_version_refused").await;
    let future = ctmirror::control::migrate::latest() + 5;
    db.client()
        .await
        .execute(
            "INSERT INTO ctmirror_control.schema_migrations (version, description) VALUES ($1, 'from the future')",
            &[&future],
        )
        .await
        .unwrap();
    let err = ControlDb::connect(&db.url).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Fatal);
    let expected = format!(
        "control database: schema is at version {future}; this ctmirror knows up to {}: upgrade ctmirror",
        ctmirror::control::migrate::latest()
    );
    assert!(err.to_string().contains(&expected), "{err}");
}

#[tokio::test]
async fn bad_url_gives_clear_error() {
    let err = ControlDb::connect("this is not a url at all").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Fatal);
    assert!(err.message.contains("not a valid PostgreSQL URL"), "{err}");

    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = ControlDb::connect(&format!("postgres://postgres@127.0.0.1:{port}/control")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Transient, "{err}");
    assert!(err.message.contains("unreachable") && err.message.contains("connect"), "{err}");
    assert!(err.message.to_lowercase().contains("refused"), "the cause is named: {err}");

    // The server answers but refuses: an operator must act.
    let admin = support::admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let err = ControlDb::connect(&format!("{base}/no_such_control_db")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Fatal, "{err}");
    assert!(err.message.contains("no_such_control_db") && err.message.contains("[SQLSTATE 3D000]"), "{err}");
}

#[tokio::test]
async fn register_keeps_existing_schedule_state() {
    let (_db, control) = fresh("register_keeps_existing_state").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "db1:1433", t(100))]).await.unwrap();
    let claim = claim_one(&control, "agent-a", &pair, t(100)).await;
    let run = control.start_run(&claim.lease, t(101)).await.unwrap();
    let ok =
        control.finish(&claim.lease, Some(run), &record(101, 110, Outcome::Failed, vec![]), t(500), 2).await.unwrap();
    assert!(ok);

    // The agent restarts with another first_due and a moved server.
    control.register(&[reg("acme", "crm", "db2:1433", t(0)), reg("acme", "hr", "db1:1433", t(7))]).await.unwrap();
    let s = pair_status(&control, &pair).await;
    assert_eq!(s.server, "db2:1433", "server follows the configuration");
    assert_eq!(s.next_due, t(500), "next_due kept");
    assert_eq!(s.failures, 2, "failures kept");
    assert_eq!(s.last_outcome, Some(Outcome::Failed));
    assert_eq!(control.next_due(&[key("acme", "hr")], t(0)).await.unwrap(), Some(t(7)), "new pair due at first_due");
}

#[tokio::test]
async fn claim_takes_only_due_unleased_non_busy_pairs_oldest_first() {
    let (_db, control) = fresh("claim_due_unleased_non_busy").await;
    control
        .register(&[
            reg("t1", "a", "s1", t(10)),
            reg("t1", "b", "s1", t(5)),
            reg("t1", "c", "s2", t(1)),    // busy server
            reg("t1", "d", "s1", t(1000)), // not due
            reg("t1", "e", "s1", t(2)),    // leased by someone alive
            reg("t1", "f", "s1", t(0)),    // not among the keys
            reg("t1", "g", "s3", t(20)),
        ])
        .await
        .unwrap();
    claim_one(&control, "other", &key("t1", "e"), t(50)).await;
    let among: Vec<_> = ["a", "b", "c", "d", "e", "g"].iter().map(|a| key("t1", a)).collect();

    let claims = control.claim("me", &among, t(100), MINUTE, 2, &["s2".to_owned()]).await.unwrap();
    let got: Vec<_> = claims.iter().map(|c| c.lease.key.app.as_str().to_owned()).collect();
    assert_eq!(got, ["b", "a"], "oldest due first, limit honoured");
    assert_eq!(claims[0].due, t(5));
    assert_eq!(claims[0].server, "s1");
    assert_eq!(claims[0].failures, 0);
    assert!(claims.iter().all(|c| c.lease.owner == "me" && c.lease.token == 1));

    let rest = control.claim("me", &among, t(100), MINUTE, 10, &["s2".to_owned()]).await.unwrap();
    let got: Vec<_> = rest.iter().map(|c| c.lease.key.app.as_str().to_owned()).collect();
    assert_eq!(got, ["g"], "c is on a busy server, d not due, e leased, a and b taken");

    assert!(control.claim("me", &among, t(100), MINUTE, 0, &[]).await.unwrap().is_empty());
    assert!(control.claim("me", &[], t(100), MINUTE, 5, &[]).await.unwrap().is_empty());
    let c = control.claim("me", &among, t(100), MINUTE, 5, &[]).await.unwrap();
    assert_eq!(c.len(), 1, "c once its server is free");
    assert_eq!(c[0].lease.key, key("t1", "c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_claimers_never_get_the_same_pair() {
    let db = TestDb::create("concurrent_claimers").await;
    let setup = ControlDb::connect(&db.url).await.unwrap();
    let regs: Vec<_> = (0..50).map(|i| reg("t1", &format!("p{i:02}"), &format!("s{}", i % 7), t(i))).collect();
    setup.register(&regs).await.unwrap();
    let among: Vec<PairKey> = regs.iter().map(|r| r.key.clone()).collect();

    // 20 claimers, each with its own pool, connected first and then let go
    // together, racing until nothing is left.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for n in 0..20 {
        let control = ControlDb::connect(&db.url).await.unwrap();
        control.next_due(&among, t(0)).await.unwrap(); // the pool's connection is open
        let among = among.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("agent-{n}");
            let mut mine = Vec::new();
            start.wait().await;
            loop {
                let claims = control.claim(&owner, &among, t(100), MINUTE, 3, &[]).await.unwrap();
                if claims.is_empty() {
                    break;
                }
                mine.extend(claims.into_iter().map(|c| c.lease));
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    let mut owners = HashSet::new();
    for task in tasks {
        for lease in task.await.unwrap() {
            owners.insert(lease.owner.clone());
            assert!(seen.insert(lease.key.clone()), "{} claimed twice", lease.key);
        }
    }
    assert_eq!(seen.len(), 50, "every due pair claimed once");
    assert!(owners.len() > 1, "the claimers really raced");
    for s in setup.status(None).await.unwrap() {
        assert!(s.lease_owner.is_some(), "{} leased", s.key);
    }
}

#[tokio::test]
async fn renewed_lease_is_not_taken_over() {
    let (_db, control) = fresh("renewed_lease_kept").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();
    let a = claim_one(&control, "agent-a", &pair, t(0)).await;
    assert!(control.renew(&a.lease, t(50), MINUTE).await.unwrap());
    assert!(control.claim("agent-b", std::slice::from_ref(&pair), t(100), MINUTE, 1, &[]).await.unwrap().is_empty());
    assert_eq!(pair_status(&control, &pair).await.lease_expires, Some(t(110)));
}

#[tokio::test]
async fn expired_lease_is_taken_over_and_the_old_owner_is_fenced() {
    let (_db, control) = fresh("expired_lease_taken_over").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();
    let a = claim_one(&control, "agent-a", &pair, t(0)).await;
    let run_a = control.start_run(&a.lease, t(1)).await.unwrap();
    control.progress(run_a, &[progress("orders", 10)], t(30)).await.unwrap();

    // agent-a stops renewing; its lease expires at t(60).
    let b = claim_one(&control, "agent-b", &pair, t(100)).await;
    assert!(b.lease.token > a.lease.token, "a takeover raises the token");
    assert_eq!(b.failures, 0, "a lost lease is not a failure of the pair");

    let runs = control.all_runs().await.unwrap();
    let dead = runs.iter().find(|r| r.id == run_a).unwrap();
    assert_eq!(dead.outcome, "failed");
    assert_eq!(dead.error_kind.as_deref(), Some("lease_lost"));
    assert_eq!(dead.error_message.as_deref(), Some("agent process agent-a stopped renewing its lease"));
    assert_eq!(dead.ended, Some(t(60)), "ended when its lease expired");

    // The old owner can no longer renew, release or finish the pair.
    assert!(!control.renew(&a.lease, t(101), MINUTE).await.unwrap());
    control.release(&a.lease, t(9999)).await.unwrap();
    let late = record(1, 102, Outcome::Interrupted, vec![table("orders", 10, changes(7), None)]);
    assert!(!control.finish(&a.lease, Some(run_a), &late, t(9999), 0).await.unwrap());
    let s = pair_status(&control, &pair).await;
    assert_eq!(s.lease_owner.as_deref(), Some("agent-b"));
    assert_eq!(s.lease_expires, Some(t(160)));
    assert_eq!(s.next_due, t(0), "schedule untouched by the old owner");
    assert_eq!(s.last_outcome, None);
    assert_eq!(s.failures, 0);
    assert!(s.tables.is_empty(), "no table state from a lost lease");
    // History still records what agent-a did.
    let runs = control.runs(&pair, 10).await.unwrap();
    let late_run = runs.iter().find(|r| r.id == run_a).unwrap();
    assert_eq!(late_run.outcome, "interrupted");
    assert_eq!(late_run.ended, Some(t(102)));
    assert_eq!(late_run.tables.len(), 1);

    // The new owner works normally.
    assert!(control.renew(&b.lease, t(110), MINUTE).await.unwrap());
    let run_b = control.start_run(&b.lease, t(110)).await.unwrap();
    let done = record(110, 120, Outcome::Succeeded, vec![table("orders", 3, changes(9), None)]);
    assert!(control.finish(&b.lease, Some(run_b), &done, t(1320), 0).await.unwrap());
    let s = pair_status(&control, &pair).await;
    assert_eq!((s.lease_owner, s.next_due, s.last_outcome), (None, t(1320), Some(Outcome::Succeeded)));
}

fn progress(name: &str, rows: u64) -> TableProgress {
    TableProgress { table: name.into(), mode: "full".into(), rows, bytes: rows * 8, batches: 2, cursor: changes(3) }
}

#[tokio::test]
async fn finish_writes_history_table_state_and_schedule() {
    let (db, control) = fresh("finish_writes_history_state").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();

    // Run 1 succeeds on both tables.
    let c = claim_one(&control, "agent-a", &pair, t(0)).await;
    let run1 = control.start_run(&c.lease, t(1)).await.unwrap();
    control.progress(run1, &[progress("orders", 5), progress("users", 1)], t(2)).await.unwrap();
    let r1 = record(
        1,
        10,
        Outcome::Succeeded,
        vec![
            table("orders", 5, changes(40), None),
            TableRun {
                reloaded: true,
                reload_reason: Some("retention expired".into()),
                ..table("users", 1, changes(40), None)
            },
        ],
    );
    assert!(control.finish(&c.lease, Some(run1), &r1, t(1200), 0).await.unwrap());

    // Run 2 fails on orders without learning its cursor.
    let c = claim_one(&control, "agent-a", &pair, t(1200)).await;
    let run2 = control.start_run(&c.lease, t(1201)).await.unwrap();
    let r2 = record(
        1201,
        1210,
        Outcome::Failed,
        vec![table("orders", 0, None, Some("timeout reading orders")), table("users", 2, changes(55), None)],
    );
    assert!(control.finish(&c.lease, Some(run2), &r2, t(1500), 1).await.unwrap());

    let s = pair_status(&control, &pair).await;
    assert_eq!(s.next_due, t(1500));
    assert_eq!((s.last_start, s.last_end), (Some(t(1201)), Some(t(1210))));
    assert_eq!(s.last_outcome, Some(Outcome::Failed));
    assert_eq!(s.last_error_kind.as_deref(), Some("source"));
    assert_eq!(s.last_success, Some(t(10)), "last success is run 1's end");
    assert_eq!(s.failures, 1);
    assert_eq!(s.source_version, Some(1210));
    assert!(s.lease_owner.is_none() && s.lease_expires.is_none() && s.running.is_none());

    let names: Vec<_> = s.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(names, ["orders", "users"]);
    let orders = &s.tables[0];
    assert_eq!(orders.cursor, changes(40), "a failed table keeps its previous cursor");
    assert_eq!(orders.mode, "failed");
    assert_eq!(orders.last_success, Some(t(10)));
    assert_eq!(orders.last_run, t(1210));
    assert_eq!(orders.last_run_id, Some(run2));
    assert_eq!(orders.last_error.as_deref(), Some("timeout reading orders"));
    let users = &s.tables[1];
    assert_eq!(users.cursor, changes(55));
    assert_eq!(users.last_success, Some(t(1210)));
    assert_eq!(users.last_error, None);
    assert_eq!(
        (users.last_reload, users.last_reload_reason.as_deref()),
        (Some(t(10)), Some("retention expired")),
        "the last reload and its reason outlive later runs that did not reload"
    );
    assert_eq!((orders.last_reload, orders.last_reload_reason.as_deref()), (None, None));

    let runs = control.runs(&pair, 10).await.unwrap();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [run2, run1], "newest first");
    assert_eq!(runs[0].outcome, "failed");
    assert_eq!(runs[0].error_message.as_deref(), Some("source database refused the read"));
    assert_eq!((runs[0].rows, runs[0].bytes), (2, 20));
    assert_eq!(runs[1].tables, r1.tables, "table runs round-trip");
    assert_eq!(control.runs(&pair, 1).await.unwrap().len(), 1);

    let progress_rows: i64 =
        db.client().await.query_one("SELECT count(*) FROM ctmirror_control.progress", &[]).await.unwrap().get(0);
    assert_eq!(progress_rows, 0, "progress is deleted at finish");

    // A finish without a run (a skipped turn) still moves the schedule.
    let c = claim_one(&control, "agent-a", &pair, t(1500)).await;
    let skipped = RunRecord { tables: vec![], ..record(1500, 1500, Outcome::Maintenance, vec![]) };
    assert!(control.finish(&c.lease, None, &skipped, t(2700), 1).await.unwrap());
    let s = pair_status(&control, &pair).await;
    assert_eq!((s.next_due, s.last_outcome), (t(2700), Some(Outcome::Maintenance)));
    assert_eq!(control.all_runs().await.unwrap().len(), 2, "no history row without a run");
}

#[tokio::test]
async fn release_gives_the_pair_back() {
    let (_db, control) = fresh("release_gives_pair_back").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();
    let c = claim_one(&control, "agent-a", &pair, t(0)).await;
    control.release(&c.lease, t(30)).await.unwrap();
    let s = pair_status(&control, &pair).await;
    assert_eq!((s.lease_owner, s.next_due), (None, t(30)));
    let again = claim_one(&control, "agent-b", &pair, t(30)).await;
    assert_eq!(again.lease.token, c.lease.token + 1);
}

#[tokio::test]
async fn prune_deletes_only_old_finished_runs_and_done_resync_requests() {
    let (db, control) = fresh("prune_old_finished_runs").await;
    control
        .register(&[reg("t1", "a", "s1", t(0)), reg("t1", "b", "s1", t(0)), reg("t1", "c", "s1", t(0))])
        .await
        .unwrap();
    // Old and finished.
    let a = claim_one(&control, "x", &key("t1", "a"), t(0)).await;
    let old = control.start_run(&a.lease, t(0)).await.unwrap();
    let rec = record(0, 5, Outcome::Succeeded, vec![table("orders", 1, changes(1), None)]);
    control.finish(&a.lease, Some(old), &rec, t(1000), 0).await.unwrap();
    // Old but still running.
    let b = claim_one(&control, "x", &key("t1", "b"), t(10)).await;
    let running = control.start_run(&b.lease, t(10)).await.unwrap();
    // Recent and finished.
    let c = claim_one(&control, "x", &key("t1", "c"), t(1000)).await;
    let recent = control.start_run(&c.lease, t(1000)).await.unwrap();
    control.finish(&c.lease, Some(recent), &record(1000, 1005, Outcome::Succeeded, vec![]), t(2000), 0).await.unwrap();

    assert_eq!(control.prune(t(500)).await.unwrap(), 1);
    let left: HashSet<_> = control.all_runs().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(left, HashSet::from([running, recent]));
    let table_runs: i64 =
        db.client().await.query_one("SELECT count(*) FROM ctmirror_control.table_runs", &[]).await.unwrap().get(0);
    assert_eq!(table_runs, 0, "table runs go with their run");
    assert_eq!(control.prune(t(500)).await.unwrap(), 0);

    // Done resync requests older than the cutoff go too; pending ones stay.
    let done = control.request_resync(&key("t1", "a"), None, t(0), false).await.unwrap();
    let pending = control.request_resync(&key("t1", "a"), Some("orders"), t(0), false).await.unwrap();
    control.resync_done(&[done], t(100)).await.unwrap();
    control.prune(t(500)).await.unwrap();
    let ids: Vec<i64> =
        db.client().await.query("SELECT id FROM ctmirror_control.resync_requests", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![pending]);
}

#[tokio::test]
async fn resync_requests_pending_done_and_at_once() {
    let (_db, control) = fresh("resync_requests").await;
    let pair = key("acme", "crm");
    let err = control.request_resync(&pair, None, t(0), false).await.unwrap_err();
    assert!(err.message.contains("acme/crm is not known to the control database yet: start the agent once"), "{err}");

    control.register(&[reg("acme", "crm", "s1", t(1000))]).await.unwrap();
    let first = control.request_resync(&pair, Some("orders"), t(10), false).await.unwrap();
    let second = control.request_resync(&pair, None, t(20), false).await.unwrap();
    assert_eq!(
        control.next_due(std::slice::from_ref(&pair), t(0)).await.unwrap(),
        Some(t(1000)),
        "not at once: schedule kept"
    );
    let pending = control.pending_resyncs(&pair).await.unwrap();
    assert_eq!(pending.iter().map(|r| r.id).collect::<Vec<_>>(), [first, second], "oldest first");
    assert_eq!(pending[0].table.as_deref(), Some("orders"));
    assert_eq!(pending[0].requested_at, t(10));
    assert_eq!(pending[1].table, None);
    assert!(control.pending_resyncs(&key("acme", "hr")).await.unwrap().is_empty());

    control.resync_done(&[first], t(30)).await.unwrap();
    let pending = control.pending_resyncs(&pair).await.unwrap();
    assert_eq!(pending.iter().map(|r| r.id).collect::<Vec<_>>(), [second]);

    // A whole-pair request a run carried out in part becomes one request
    // per table still to do, with the original request time; twice is once.
    control.narrow_resync(second, &["deals".to_owned(), "users".to_owned()], t(40)).await.unwrap();
    control.narrow_resync(second, &["deals".to_owned()], t(41)).await.unwrap();
    let pending = control.pending_resyncs(&pair).await.unwrap();
    let narrowed: Vec<_> = pending.iter().map(|r| (r.table.as_deref(), r.requested_at)).collect();
    assert_eq!(narrowed, [(Some("deals"), t(20)), (Some("users"), t(20))]);
    control.resync_done(&pending.iter().map(|r| r.id).collect::<Vec<_>>(), t(42)).await.unwrap();

    control.request_resync(&pair, Some("users"), t(50), true).await.unwrap();
    assert_eq!(control.next_due(std::slice::from_ref(&pair), t(0)).await.unwrap(), Some(t(50)), "at once: due now");
    control.request_resync(&pair, None, t(80), true).await.unwrap();
    assert_eq!(
        control.next_due(std::slice::from_ref(&pair), t(0)).await.unwrap(),
        Some(t(50)),
        "an earlier due time is kept"
    );
}

#[tokio::test]
async fn maintenance_on_and_off() {
    let (_db, control) = fresh("maintenance_on_off").await;
    let acme = TenantId::new("acme").unwrap();
    let other = TenantId::new("other").unwrap();
    assert_eq!(control.maintenance(&acme).await.unwrap(), None);
    control.set_maintenance(&acme, true, Some("database upgrade"), t(0)).await.unwrap();
    assert_eq!(control.maintenance(&acme).await.unwrap().as_deref(), Some("database upgrade"));
    assert_eq!(control.maintenance(&other).await.unwrap(), None, "other tenants unaffected");

    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();
    assert_eq!(pair_status(&control, &key("acme", "crm")).await.maintenance.as_deref(), Some("database upgrade"));

    control.set_maintenance(&acme, true, None, t(1)).await.unwrap();
    assert_eq!(control.maintenance(&acme).await.unwrap().as_deref(), Some("maintenance"));
    control.set_maintenance(&acme, false, None, t(2)).await.unwrap();
    assert_eq!(control.maintenance(&acme).await.unwrap(), None);
    assert_eq!(pair_status(&control, &key("acme", "crm")).await.maintenance, None);
}

#[tokio::test]
async fn status_shows_running_run_with_progress_and_last_error() {
    let (_db, control) = fresh("status_running_and_failed").await;
    control
        .register(&[reg("acme", "hr", "s1", t(0)), reg("acme", "crm", "s1", t(0)), reg("beta", "crm", "s2", t(0))])
        .await
        .unwrap();
    // acme/crm failed last time.
    let c = claim_one(&control, "agent-a", &key("acme", "crm"), t(0)).await;
    let run = control.start_run(&c.lease, t(1)).await.unwrap();
    let failed = record(1, 4, Outcome::Failed, vec![table("orders", 0, None, Some("permission denied"))]);
    control.finish(&c.lease, Some(run), &failed, t(300), 1).await.unwrap();
    // acme/hr is running now.
    let h = claim_one(&control, "agent-b", &key("acme", "hr"), t(5)).await;
    let running = control.start_run(&h.lease, t(6)).await.unwrap();
    control.progress(running, &[progress("staff", 100), progress("depts", 4)], t(7)).await.unwrap();
    control.progress(running, &[progress("staff", 250), progress("depts", 4)], t(8)).await.unwrap();

    let all = control.status(None).await.unwrap();
    let keys: Vec<_> = all.iter().map(|s| s.key.to_string()).collect();
    assert_eq!(keys, ["acme/crm", "acme/hr", "beta/crm"], "sorted by tenant and app");

    let crm = &all[0];
    assert!(crm.running.is_none());
    assert_eq!(crm.last_outcome, Some(Outcome::Failed));
    assert_eq!(crm.last_error_kind.as_deref(), Some("source"));
    assert_eq!(crm.last_error.as_deref(), Some("source database refused the read"));
    assert_eq!(crm.failures, 1);
    assert_eq!(crm.tables[0].last_error.as_deref(), Some("permission denied"));

    let hr = &all[1];
    assert_eq!(hr.lease_owner.as_deref(), Some("agent-b"));
    assert_eq!(hr.lease_expires, Some(t(65)));
    let r = hr.running.as_ref().expect("running run shown");
    assert_eq!((r.id, r.owner.as_str(), r.started), (running, "agent-b", t(6)));
    assert_eq!(r.progress_updated, Some(t(8)));
    let p: Vec<_> = r.progress.iter().map(|p| (p.table.as_str(), p.rows)).collect();
    assert_eq!(p, [("depts", 4), ("staff", 250)], "latest progress, by table name");
    assert_eq!(r.progress[1], progress("staff", 250));

    assert!(all[2].running.is_none() && all[2].last_outcome.is_none());

    let beta = control.status(Some(&TenantId::new("beta").unwrap())).await.unwrap();
    assert_eq!(beta.len(), 1);
    assert_eq!(beta[0].key, key("beta", "crm"));

    let hr_runs = control.runs(&key("acme", "hr"), 5).await.unwrap();
    assert_eq!(hr_runs.len(), 1);
    assert_eq!((hr_runs[0].outcome.as_str(), hr_runs[0].ended), ("running", None));
}

#[tokio::test]
async fn next_due_is_the_earliest_claimable_time_among_the_keys() {
    let (_db, control) = fresh("next_due_earliest").await;
    control
        .register(&[reg("t1", "a", "s1", t(30)), reg("t1", "b", "s1", t(20)), reg("t1", "c", "s1", t(10))])
        .await
        .unwrap();
    claim_one(&control, "x", &key("t1", "b"), t(25)).await;
    let ab = [key("t1", "a"), key("t1", "b")];
    assert_eq!(control.next_due(&ab, t(26)).await.unwrap(), Some(t(30)), "a live lease defers its pair");
    assert_eq!(control.next_due(&ab[1..], t(26)).await.unwrap(), Some(t(85)), "claimable when the lease expires");
    assert_eq!(control.next_due(&ab, t(90)).await.unwrap(), Some(t(20)), "an expired lease does not defer");
    assert_eq!(control.next_due(&[key("t1", "zz")], t(0)).await.unwrap(), None);
    assert_eq!(control.next_due(&[], t(0)).await.unwrap(), None);
}

#[tokio::test]
async fn lease_lost_before_start_still_records_the_run() {
    let (_db, control) = fresh("start_run_after_takeover").await;
    let pair = key("acme", "crm");
    control.register(&[reg("acme", "crm", "s1", t(0))]).await.unwrap();
    let a = claim_one(&control, "agent-a", &pair, t(0)).await;
    let b = claim_one(&control, "agent-b", &pair, t(100)).await;
    let late = control.start_run(&a.lease, t(101)).await.unwrap();
    let s = pair_status(&control, &pair).await;
    assert!(s.running.is_none(), "a run under a lost lease is not the pair's running run");
    assert!(!control
        .finish(&a.lease, Some(late), &record(101, 102, Outcome::Interrupted, vec![]), t(0), 0)
        .await
        .unwrap());
    let runs = control.runs(&pair, 5).await.unwrap();
    assert_eq!(runs[0].outcome, "interrupted", "closed by its own finish");
    let lease_b: &Lease = &b.lease;
    assert!(control.renew(lease_b, t(101), MINUTE).await.unwrap());
}

//! `ctmirror agent` as a hosting operator runs it: real agent processes, a
//! real control database, real receivers over HTTP, real source databases.
//! Short intervals and leases (seconds) keep each test under a minute.

mod harness;

use ctmirror::auth::Keypair;
use ctmirror::config::{HookConfig, ReceiverConfig};
use ctmirror::control::ControlDb;
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::Cursor;
use ctmirror::receiver::ReceiverService;
use ctmirror::schedule::{Outcome, PairKey};
use harness::support::TestDb;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctmirror"))
}

fn pair(t: &str, a: &str) -> PairKey {
    PairKey { tenant: TenantId::new(t).unwrap(), app: AppId::new(a).unwrap() }
}

/// A child process that is killed if the test ends early.
struct Proc {
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigterm(&self) {
        // The shell's builtin kill: no procps package needed on a bare machine.
        let ok = Command::new("sh").args(["-c", &format!("kill -TERM {}", self.pid())]).status().unwrap().success();
        assert!(ok, "kill -TERM");
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the exit; the exit code, or None after `limit`.
    fn wait_for(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything one test needs: keys, a control database, receivers,
/// sources and a config file written from them.
struct Fleet {
    dir: PathBuf,
    control: TestDb,
    agent_key: Keypair,
    partner_key: Keypair,
    tenants: Vec<(String, String, String)>,
    apps: Vec<(String, String, Vec<String>)>,
    settings: String,
    servers: Vec<tokio::task::JoinHandle<()>>,
    procs: usize,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

const ITEM_MAP: &str = "[[table]]\ntable = \"item\"\ncolumns = [\"id\", \"v\"]\n";

impl Fleet {
    async fn new(label: &str) -> Fleet {
        let dir = std::env::temp_dir().join(format!("ctm-hosting-{label}-{}", ctmirror::auth::new_nonce()));
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        let agent_key = Keypair::generate();
        let partner_key = Keypair::generate();
        agent_key.write_files(&dir.join("keys/agent")).unwrap();
        partner_key.write_files(&dir.join("keys/partner")).unwrap();
        Fleet {
            dir,
            control: TestDb::create(&format!("{label}_ctl")).await,
            agent_key,
            partner_key,
            tenants: Vec::new(),
            apps: Vec::new(),
            settings: String::new(),
            servers: Vec::new(),
            procs: 0,
        }
    }

    /// A source database with `item(id, v)` holding `rows` rows.
    async fn source(&self, label: &str, rows: i64) -> TestDb {
        let db = TestDb::create(label).await;
        db.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE item (id bigint PRIMARY KEY, v text NOT NULL);
                 INSERT INTO item SELECT g, repeat('x', 40) || g FROM generate_series(1, {rows}) g;"
            ))
            .await
            .unwrap();
        db
    }

    /// Starts a receiver for `app` writing into a new mirror database;
    /// returns its URL and the mirror.
    async fn receiver(&mut self, app: &str) -> (String, TestDb) {
        self.receiver_with(app, None).await
    }

    /// A receiver that answers "do not replicate" when `paused` is set.
    async fn receiver_with(&mut self, app: &str, paused: Option<&str>) -> (String, TestDb) {
        let mirror = TestDb::create(&format!("{app}_mirror")).await;
        let cfg = ReceiverConfig {
            max_body_bytes: 64 << 20,
            paused_reason: paused.map(str::to_owned),
            hooks: HookConfig { analyze: false, notify_channel: None, sql: vec![] },
            ..ReceiverConfig::new("127.0.0.1:0", mirror.url.clone(), AppId::new(app).unwrap(), "unused", "unused")
        };
        let svc = ReceiverService::with_keys(cfg, self.partner_key.clone(), self.agent_key.public()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = svc.router();
        self.servers.push(tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        }));
        (format!("http://{addr}"), mirror)
    }

    fn tenant(&mut self, id: &str, url: &str) {
        self.tenants.push((id.to_owned(), url.to_owned(), String::new()));
    }

    /// A tenant with extra `[[agent.tenant]]` lines (e.g. maintenance).
    fn tenant_with(&mut self, id: &str, url: &str, extra: &str) {
        self.tenants.push((id.to_owned(), url.to_owned(), extra.to_owned()));
    }

    fn app(&mut self, id: &str, receiver_url: &str, tenants: &[&str]) {
        std::fs::write(self.dir.join(format!("{id}.map.toml")), format!("application = \"{id}\"\n{ITEM_MAP}")).unwrap();
        self.apps.push((id.to_owned(), receiver_url.to_owned(), tenants.iter().map(|t| t.to_string()).collect()));
    }

    fn config(&self) -> PathBuf {
        let mut cfg = format!(
            "[agent]\nprivate_key = \"keys/agent.key\"\nbatch_rows = 500\nrequest_timeout_secs = 10\n\
             control_database_url = \"{}\"\n{}\n",
            self.control.url, self.settings
        );
        for (id, url, extra) in &self.tenants {
            cfg.push_str(&format!(
                "[[agent.tenant]]\nid = \"{id}\"\nsource = \"postgres\"\nurl = \"{url}\"\n{extra}\n"
            ));
        }
        for (id, url, tenants) in &self.apps {
            let list = tenants.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
            cfg.push_str(&format!(
                "[[agent.application]]\nid = \"{id}\"\nreceiver_url = \"{url}\"\nallow_plain_http = true\n\
                 partner_public_key = \"keys/partner.pub\"\nschema_map = \"{id}.map.toml\"\ntenants = [{list}]\n"
            ));
        }
        let path = self.dir.join("ctmirror.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    fn agent(&mut self, args: &[&str]) -> Proc {
        self.procs += 1;
        let log = self.dir.join(format!("agent-{}.log", self.procs));
        let child = bin()
            .arg("agent")
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env("CTMIRROR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let o = bin().args(args).arg("--config").arg(self.config()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.success(), text)
    }

    async fn control(&self) -> ControlDb {
        ControlDb::connect(&self.control.url).await.unwrap()
    }
}

/// Schedule settings for tests: seconds instead of minutes, no blackout.
fn fast_schedule(interval: u64, lease: u64, extra: &str) -> String {
    format!(
        "[agent.schedule]\ninterval_secs = {interval}\nlease_secs = {lease}\npoll_secs = 1\n\
         backoff_base_secs = 1\nbackoff_max_secs = 8\ndefinite_failure_retry_secs = 30\n\
         shutdown_grace_secs = 20\nmax_cycles = 8\n{extra}\n[agent.schedule.blackout]\nenabled = false\n"
    )
}

async fn mirror_rows(mirror: &TestDb, tenant: &str) -> i64 {
    let c = mirror.client().await;
    match c.query_one(&format!("SELECT count(*) FROM mirror_{tenant}.item"), &[]).await {
        Ok(r) => r.get(0),
        Err(_) => -1,
    }
}

async fn mirror_cursor(mirror: &TestDb, tenant: &str) -> Option<Cursor> {
    let c = mirror.client().await;
    let row = c
        .query_opt(
            "SELECT cursor::text FROM ctmirror.tables WHERE tenant = $1 AND table_name = 'item'",
            &[&tenant],
        )
        .await
        .ok()??;
    row.get::<_, Option<String>>(0).map(|t| serde_json::from_str(&t).unwrap())
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_fifty_pairs_never_run_one_twice_at_once_and_take_over_from_a_dead_one() {
    let mut fleet = Fleet::new("two_agents").await;
    let (url, mirror) = fleet.receiver("crm").await;
    let mut tenant_ids = Vec::new();
    for s in 0..5 {
        let src = fleet.source(&format!("two_agents_src{s}"), 20).await;
        for t in 0..10 {
            let id = format!("t{s}{t}");
            fleet.tenant(&id, &src.url);
            tenant_ids.push(id);
        }
    }
    let refs: Vec<&str> = tenant_ids.iter().map(String::as_str).collect();
    fleet.app("crm", &url, &refs);
    let lease = 3;
    fleet.settings = fast_schedule(4, lease, "max_cycles_per_server = 4");

    let mut a = fleet.agent(&[]);
    let mut b = fleet.agent(&[]);
    let control = fleet.control().await;
    // Progress, not wall time, decides when to kill and when to stop, so a
    // loaded machine slows the test down instead of failing it.
    let done = |runs: &[ctmirror::control::RunSummary], id: &str, after: Option<chrono::DateTime<chrono::Utc>>| {
        runs.iter().filter(|r| r.key == pair(id, "crm") && r.ended.is_some() && after.is_none_or(|t| r.started > t)).count()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let runs = control.all_runs().await.unwrap();
        let owners: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.owner.as_str()).collect();
        if owners.len() == 2 && tenant_ids.iter().all(|id| done(&runs, id, None) >= 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the two agents did not run every pair within 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed_at = chrono::Utc::now();
    a.sigkill();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let runs = control.all_runs().await.unwrap();
        if tenant_ids.iter().all(|id| done(&runs, id, Some(killed_at)) >= 2 && done(&runs, id, None) >= 3) {
            break;
        }
        assert!(Instant::now() < deadline, "the survivor did not take over every pair within 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.sigterm();
    assert_eq!(b.wait_for(Duration::from_secs(30)), Some(0), "{}", b.log());

    let runs = control.all_runs().await.unwrap();
    let owners: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.owner.as_str()).collect();
    assert_eq!(owners.len(), 2, "both processes did work: {owners:?}");
    let survivor = runs.iter().filter(|r| r.started > killed_at).map(|r| r.owner.clone()).next().unwrap();
    for id in &tenant_ids {
        let key = pair(id, "crm");
        let mut mine: Vec<_> = runs.iter().filter(|r| r.key == key).collect();
        mine.sort_by_key(|r| r.started);
        assert!(mine.len() >= 3, "{key}: {} runs", mine.len());
        for w in mine.windows(2) {
            let ended = w[0].ended.unwrap_or_else(|| panic!("{key}: run {} never ended", w[0].id));
            assert!(w[1].started >= ended, "{key} ran twice at once: {:?} and {:?}", w[0], w[1]);
        }
        // The survivor picks up every pair after the kill, within the lease
        // timeout plus one interval (and some slack for a loaded machine).
        let first_after = mine.iter().find(|r| r.started > killed_at).unwrap_or_else(|| panic!("{key} abandoned"));
        assert_eq!(first_after.owner, survivor);
        let delay = (first_after.started - killed_at).num_milliseconds();
        assert!(delay < (lease as i64 + 4 + 4) * 1000, "{key} taken over after {delay} ms");
        assert_eq!(mirror_rows(&mirror, id).await, 20, "{key} mirrored");
    }
    // The dead process's cycles in flight are closed in the history.
    let lost = runs.iter().filter(|r| r.error_kind.as_deref() == Some("lease_lost")).count();
    let still_running = runs.iter().filter(|r| r.ended.is_none()).count();
    assert_eq!(still_running, 0, "every run is closed");
    eprintln!("{} runs, {lost} closed as lease_lost", runs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_cycle_exits_zero_and_the_next_start_resumes_from_the_committed_cursor() {
    let mut fleet = Fleet::new("sigterm").await;
    let (url, mirror) = fleet.receiver("crm").await;
    let src = fleet.source("sigterm_src", 30_000).await;
    fleet.tenant("acme", &src.url);
    fleet.app("crm", &url, &["acme"]);
    // 5,000 rows a second: the 30,000-row load takes about six seconds.
    fleet.settings = fast_schedule(1, 5, "\n[agent.limits]\nsource_rows_per_sec = 5000");

    let mut agent = fleet.agent(&[]);
    wait_until("the full load to be under way", Duration::from_secs(30), || async {
        matches!(mirror_cursor(&mirror, "acme").await, Some(Cursor::Snapshot { after_key: Some(_), .. }))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    agent.sigterm();
    assert_eq!(agent.wait_for(Duration::from_secs(15)), Some(0), "{}", agent.log());
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?} to stop", t.elapsed());
    assert!(agent.log().contains("shutdown requested"), "{}", agent.log());

    let loaded = mirror_rows(&mirror, "acme").await;
    assert!(loaded > 0 && loaded < 30_000, "stopped mid-load with {loaded} rows");
    let Some(Cursor::Snapshot { .. }) = mirror_cursor(&mirror, "acme").await else { panic!("cursor is a snapshot") };
    let control = fleet.control().await;
    let first = control.runs(&pair("acme", "crm"), 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].outcome, "interrupted");

    // The next start resumes: it sends only what was missing.
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(60)), Some(0), "{}", once.log());
    assert_eq!(mirror_rows(&mirror, "acme").await, 30_000);
    let runs = control.runs(&pair("acme", "crm"), 10).await.unwrap();
    let resumed = &runs[0];
    assert_eq!(resumed.outcome, "succeeded", "{resumed:?}");
    let table = &resumed.tables[0];
    assert!(matches!(table.from_cursor, Some(Cursor::Snapshot { .. })), "{table:?}");
    assert_eq!(table.rows as i64, 30_000 - loaded, "sent exactly the rows not yet committed");
    assert!(!table.reloaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_partner_backs_off_while_another_partner_keeps_its_cadence() {
    let mut fleet = Fleet::new("partner_down").await;
    let (url, mirror) = fleet.receiver("up").await;
    let src = fleet.source("partner_down_src", 10).await;
    fleet.tenant("acme", &src.url);
    fleet.app("up", &url, &["acme"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    fleet.app("down", &format!("http://127.0.0.1:{dead}"), &["acme"]);
    fleet.settings = fast_schedule(1, 5, "");

    let mut agent = fleet.agent(&[]);
    tokio::time::sleep(Duration::from_secs(12)).await;
    agent.sigterm();
    assert_eq!(agent.wait_for(Duration::from_secs(30)), Some(0), "{}", agent.log());

    let control = fleet.control().await;
    let mut up = control.runs(&pair("acme", "up"), 100).await.unwrap();
    up.reverse();
    assert!(up.len() >= 6, "the healthy pair kept running: {}", up.len());
    // The SIGTERM may land inside the last run, which then stops at a
    // batch boundary ("interrupted"); every earlier run succeeded.
    let (last, earlier) = up.split_last().expect("runs");
    assert!(earlier.iter().all(|r| r.outcome == "succeeded"), "{up:#?}");
    assert!(matches!(last.outcome.as_str(), "succeeded" | "interrupted"), "{last:#?}");
    for w in up.windows(2) {
        let gap = (w[1].started - w[0].started).num_milliseconds();
        assert!(gap < 2_500, "the healthy pair was delayed: {gap} ms between starts");
    }
    assert_eq!(mirror_rows(&mirror, "acme").await, 10);

    let down = control.runs(&pair("acme", "down"), 100).await.unwrap();
    assert!(!down.is_empty());
    assert!(down.iter().all(|r| r.outcome == "failed" && r.error_kind.as_deref() == Some("transient")), "{down:?}");
    assert!(down.len() < up.len(), "the failing pair is retried less often: {} vs {}", down.len(), up.len());
    let status = control.status(None).await.unwrap();
    let d = status.iter().find(|s| s.key == pair("acme", "down")).unwrap();
    assert_eq!(d.failures as usize, down.len(), "the failure streak drives the backoff");
    assert_eq!(d.last_outcome, Some(Outcome::Failed));
    // Full jitter: the next attempt is never later than the cap after the
    // last failure (1 s doubling, at most 8 s).
    let cap = (1i64 << (d.failures - 1).min(3)).min(8);
    let wait = (d.next_due - d.last_end.unwrap()).num_milliseconds();
    assert!((0..=cap * 1000).contains(&wait), "next attempt {wait} ms after the last, cap {cap} s");
}

/// A partner that answers every call with 429 and a Retry-After.
async fn busy_partner(retry_after: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Instant>>>) {
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(Instant::now());
            (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", retry_after)], "slow down")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (format!("http://{addr}"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_after_is_waited_out_and_a_long_one_reschedules_the_pair() {
    // Short: the client waits it out between attempts.
    let (url, hits) = busy_partner("1").await;
    let signer = ctmirror::auth::RequestSigner {
        key: Keypair::generate(),
        tenant: TenantId::new("acme").unwrap(),
        app: AppId::new("crm").unwrap(),
    };
    let trust = ctmirror::agent::TlsTrust::allowing_plain_http();
    let partner_key = Keypair::generate().public();
    let client =
        ctmirror::agent::PartnerClient::new(&url, signer, partner_key, Duration::from_secs(5), &trust).unwrap();
    let err = client.authenticate().await.unwrap_err();
    assert_eq!(err.kind, ctmirror::agent::AgentErrorKind::Transient);
    assert_eq!(err.retry_after, Some(Duration::from_secs(1)));
    let times = hits.lock().unwrap().clone();
    assert_eq!(times.len(), 3, "three attempts");
    for w in times.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(990), "Retry-After honoured: {:?}", w[1] - w[0]);
    }

    // Long: the cycle gives up at once and the scheduler comes back no
    // sooner than asked.
    let mut fleet = Fleet::new("retry_after").await;
    let (url, hits) = busy_partner("3600").await;
    let src = fleet.source("retry_after_src", 5).await;
    fleet.tenant("acme", &src.url);
    fleet.app("crm", &url, &["acme"]);
    fleet.settings = fast_schedule(1, 5, "");
    let before = chrono::Utc::now();
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(30)), Some(0), "{}", once.log());
    assert_eq!(hits.lock().unwrap().len(), 1, "no retry within the cycle");
    let status = fleet.control().await.status(None).await.unwrap();
    let wait = (status[0].next_due - before).num_seconds();
    assert!(wait >= 3590, "next attempt in {wait} s, Retry-After was 3600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_reloads_a_damaged_table_or_a_whole_tenant_end_to_end() {
    let mut fleet = Fleet::new("resync").await;
    let (url, mirror) = fleet.receiver("crm").await;
    let src = fleet.source("resync_src", 300).await;
    fleet.tenant("acme", &src.url);
    fleet.app("crm", &url, &["acme"]);
    fleet.settings = fast_schedule(1, 5, "");
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(30)), Some(0), "{}", once.log());
    assert_eq!(mirror_rows(&mirror, "acme").await, 300);

    // Someone damages the mirror behind the receiver's back.
    mirror.client().await.batch_execute("DELETE FROM mirror_acme.item WHERE id % 3 = 0").await.unwrap();
    assert_eq!(mirror_rows(&mirror, "acme").await, 200);

    // Garbage first: nothing is written.
    let (ok, out) = fleet.cli(&["resync", "--tenant", "acme", "--table", "nope"]);
    assert!(!ok && out.contains("mapped tables: crm.item"), "{out}");
    let (ok, out) = fleet.cli(&["resync", "--tenant", "ghost"]);
    assert!(!ok && out.contains("tenant ghost is not configured"), "{out}");
    let (ok, out) = fleet.cli(&["resync", "--tenant", "acme", "--app", "other"]);
    assert!(!ok && out.contains("application other is not configured"), "{out}");

    let (ok, out) = fleet.cli(&["resync", "--tenant", "acme", "--table", "item", "--now"]);
    assert!(ok, "{out}");
    assert!(out.contains("acme/crm table item reloads now"), "{out}");
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(30)), Some(0), "{}", once.log());
    assert_eq!(mirror_rows(&mirror, "acme").await, 300, "reloaded");
    let control = fleet.control().await;
    let last = &control.runs(&pair("acme", "crm"), 1).await.unwrap()[0];
    assert!(last.tables[0].reloaded && last.tables[0].mode == "full", "{last:?}");

    // A request is done once: the next pass is incremental again.
    let (ok, out) = fleet.cli(&["resync", "--tenant", "acme"]);
    assert!(ok && out.contains("every table reloads at its next cycle"), "{out}");
    mirror.client().await.batch_execute("DELETE FROM mirror_acme.item WHERE id < 50").await.unwrap();
    // Not --now: make it due by waiting out the 1 s interval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(30)), Some(0), "{}", once.log());
    assert_eq!(mirror_rows(&mirror, "acme").await, 300);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut once = fleet.agent(&["--once"]);
    assert_eq!(once.wait_for(Duration::from_secs(30)), Some(0), "{}", once.log());
    let last = &control.runs(&pair("acme", "crm"), 1).await.unwrap()[0];
    assert_eq!(last.tables[0].mode, "idle", "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_running_idle_failing_paused_and_maintenance_pairs() {
    let mut fleet = Fleet::new("status").await;
    let (url, _mirror) = fleet.receiver("crm").await;
    let (quiet_url, _quiet_mirror) = fleet.receiver_with("quiet", Some("partner database upgrade")).await;
    let small = fleet.source("status_small", 10).await;
    let big = fleet.source("status_big", 40_000).await;
    fleet.tenant("idle", &small.url);
    fleet.tenant("busy", &big.url);
    fleet.tenant("broken", &small.url);
    fleet.tenant("resting", &small.url);
    fleet.tenant_with("frozen", &small.url, "maintenance = true");
    fleet.app("crm", &url, &["idle", "busy", "resting", "frozen"]);
    fleet.app("quiet", &quiet_url, &["idle"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    fleet.app("gone", &format!("http://127.0.0.1:{dead}"), &["broken"]);
    fleet.settings = fast_schedule(2, 5, "\n[agent.limits]\nsource_rows_per_sec = 4000");

    let (ok, out) = fleet.cli(&["maintenance", "--tenant", "resting", "on", "--reason", "moving to new hardware"]);
    assert!(ok, "{out}");
    let (ok, out) = fleet.cli(&["maintenance", "--tenant", "ghost", "on"]);
    assert!(!ok && out.contains("tenant ghost is not configured"), "{out}");
    let mut agent = fleet.agent(&[]);
    let control = fleet.control().await;
    wait_until("the busy pair to be running and the others to have run", Duration::from_secs(30), || async {
        let s = control.status(None).await.unwrap();
        let by = |t: &str| s.iter().find(|p| p.key.tenant.as_str() == t).cloned();
        by("busy").is_some_and(|p| p.running.as_ref().is_some_and(|r| !r.progress.is_empty()))
            && by("idle").is_some_and(|p| p.last_outcome == Some(Outcome::Succeeded))
            && by("broken").is_some_and(|p| p.last_outcome == Some(Outcome::Failed))
            && s.iter().any(|p| p.key == pair("idle", "quiet") && p.last_outcome == Some(Outcome::Paused))
    })
    .await;

    let (ok, out) = fleet.cli(&["status"]);
    assert!(ok, "{out}");
    eprintln!("{out}");
    let line = |prefix: &str| out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {out}"));
    assert!(line("busy/crm").contains("running"), "{out}");
    assert!(line("idle/crm").contains("idle"), "{out}");
    // The failing pair retries often (1 s backoff base): it may be in one
    // of its attempts right now; either way its last error is shown.
    assert!(line("broken/gone").contains("failing") || line("broken/gone").contains("running"), "{out}");
    assert!(out.contains("last error (transient)"), "{out}");
    assert!(line("resting/crm").contains("maintenance"), "{out}");
    assert!(out.contains("moving to new hardware"), "{out}");
    assert!(line("frozen/crm").contains("maintenance"), "the config flag: {out}");
    assert!(line("idle/quiet").contains("paused"), "{out}");
    assert!(out.contains("partner database upgrade"), "the partner's reason: {out}");
    assert!(out.contains(&format!("127.0.0.1:{dead}")), "the failing pair's error names the receiver: {out}");
    assert!(out.contains("snapshot@"), "the running pair's cursor: {out}");

    let (ok, one) = fleet.cli(&["status", "--tenant", "idle"]);
    assert!(ok && one.contains("idle/crm") && !one.contains("busy/crm"), "{one}");

    // --follow on a pipe: plain progress lines.
    let follow = bin()
        .args(["status", "--follow", "--tenant", "busy", "--config"])
        .arg(fleet.config())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut follow = Proc { child: follow, log: PathBuf::new() };
    tokio::time::sleep(Duration::from_secs(3)).await;
    follow.sigterm();
    let out = follow.child.wait_with_output_ref();
    assert!(out.contains("busy/crm item") && out.contains("rows="), "{out}");

    agent.sigterm();
    assert_eq!(agent.wait_for(Duration::from_secs(30)), Some(0), "{}", agent.log());
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut out) = self.stdout.take() {
            out.read_to_string(&mut s).unwrap();
        }
        let _ = self.wait();
        s
    }
}

#[tokio::test]
async fn the_agent_without_a_control_database_says_what_is_missing() {
    let mut fleet = Fleet::new("no_control").await;
    fleet.tenant("acme", "postgres://127.0.0.1:1/x");
    fleet.app("crm", "http://127.0.0.1:1", &["acme"]);
    let path = fleet.config();
    let text = std::fs::read_to_string(&path).unwrap();
    let without: String = text.lines().filter(|l| !l.starts_with("control_database_url")).collect::<Vec<_>>().join("\n");
    std::fs::write(&path, without).unwrap();
    let o = bin().args(["agent", "--once", "--config"]).arg(&path).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("control_database_url is not set"));

    let unreachable = text.replace(&fleet.control.url, "postgres://postgres@127.0.0.1:1/nope");
    std::fs::write(&path, unreachable).unwrap();
    let o = bin().args(["status", "--config"]).arg(&path).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("control database"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_caught_by_the_blackout_stops_at_a_batch_boundary_and_resumes_after_it_without_loss() {
    let mut fleet = Fleet::new("blackout").await;
    let (url, mirror) = fleet.receiver("crm").await;
    let src = fleet.source("blackout_src", 30_000).await;
    fleet.tenant("acme", &src.url);
    fleet.app("crm", &url, &["acme"]);
    // A window of a few seconds, opening while the throttled load runs.
    // Whole seconds: the window is configured as HH:MM:SS.
    let opens = chrono::DurationRound::duration_trunc(chrono::Utc::now(), chrono::Duration::seconds(1)).unwrap()
        + chrono::Duration::seconds(4);
    let closes = opens + chrono::Duration::seconds(5);
    fleet.settings = fast_schedule(1, 5, "\n[agent.limits]\nsource_rows_per_sec = 3000")
        .replace("[agent.schedule.blackout]\nenabled = false\n", "")
        + &format!(
            "[agent.schedule.blackout]\nstart = \"{}\"\nend = \"{}\"\ntime_zone = \"UTC\"\n",
            opens.format("%H:%M:%S"),
            closes.format("%H:%M:%S")
        );
    let mut agent = fleet.agent(&[]);
    wait_until("the window to open", Duration::from_secs(20), || async { chrono::Utc::now() >= opens }).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = mirror_rows(&mirror, "acme").await;
    assert!(during > 0 && during < 30_000, "{during}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mirror_rows(&mirror, "acme").await, during, "nothing is sent inside the window");
    wait_until("the load to finish after the window", Duration::from_secs(40), || async {
        mirror_rows(&mirror, "acme").await == 30_000
    })
    .await;
    agent.sigterm();
    assert_eq!(agent.wait_for(Duration::from_secs(30)), Some(0), "{}", agent.log());
    assert!(agent.log().contains("blackout window opened"), "{}", agent.log());

    let control = fleet.control().await;
    let mut runs = control.runs(&pair("acme", "crm"), 100).await.unwrap();
    runs.reverse();
    assert_eq!(runs[0].outcome, "interrupted", "{runs:?}");
    let resumed = &runs[1];
    assert!(resumed.started >= closes, "resumed at {} before the window closed at {closes}", resumed.started);
    assert!(matches!(resumed.tables[0].from_cursor, Some(Cursor::Snapshot { .. })), "{resumed:?}");
    let sent: u64 = runs.iter().map(|r| r.tables.first().map_or(0, |t| t.rows)).sum();
    assert_eq!(sent, 30_000, "every row sent exactly once across the interruption");
    let (ok, out) = fleet.cli(&["verify", "--tenant", "acme", "--app", "crm", "--mirror-url", &mirror.url]);
    assert!(ok, "{out}");
}

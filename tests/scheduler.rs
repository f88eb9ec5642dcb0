//! The scheduler's decisions on tokio's paused clock: hours of cadence,
//! blackout nights (including DST changes), backoff and shutdown run in
//! milliseconds. The store is the in-memory one (real I/O would let tokio
//! skip time under a query's feet) and cycles are scripted: each one works
//! through "batches" of a fixed length and honours the stop signal at batch
//! boundaries like the real cycle does. The control database and real
//! cycles are covered by `tests/hosting.rs`.

use chrono::{DateTime, TimeZone, Utc};
use ctmirror::agent::service::{CycleRunner, Mode, RunResult, Service, ServiceSettings, ServiceSummary};
use ctmirror::agent::{CycleControl, Reload};
use ctmirror::ids::{AppId, TenantId};
use ctmirror::schedule::{
    Backoff, Blackout, Cadence, Clock, MemoryStore, Outcome, PairKey, RunRecord, TableRun, TokioClock,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

fn pair(t: &str) -> PairKey {
    PairKey { tenant: TenantId::new(t).unwrap(), app: AppId::new("app").unwrap() }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

/// How a scripted pair behaves.
#[derive(Clone)]
struct Behaviour {
    /// Work per cycle, in batches; `None`: a fixed amount per cycle.
    batches_per_cycle: u32,
    batch: Duration,
    /// Total work that must be done exactly once (for resume checks); when
    /// set, a cycle works until the total is done.
    total: Option<u32>,
    fail: Option<(&'static str, Option<Duration>)>,
    /// The first cycle panics (a bug in a cycle must not stop the agent).
    panic_first: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self { batches_per_cycle: 1, batch: MIN, total: None, fail: None, panic_first: false }
    }
}

#[derive(Debug, Clone)]
struct Call {
    pair: PairKey,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Wall-clock time of every batch done.
    batches: Vec<DateTime<Utc>>,
    interrupted: bool,
}

struct Script {
    clock: TokioClock,
    behaviour: HashMap<PairKey, Behaviour>,
    default: Behaviour,
    calls: Mutex<Vec<Call>>,
    done: Mutex<HashMap<PairKey, u32>>,
    running: Mutex<HashMap<String, usize>>,
    max_seen_per_server: Mutex<usize>,
    servers: HashMap<PairKey, String>,
}

impl Script {
    fn new(clock: TokioClock) -> Self {
        Self {
            clock,
            behaviour: HashMap::new(),
            default: Behaviour::default(),
            calls: Mutex::new(Vec::new()),
            done: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            max_seen_per_server: Mutex::new(0),
            servers: HashMap::new(),
        }
    }

    fn calls_of(&self, p: &PairKey) -> Vec<Call> {
        self.calls.lock().unwrap().iter().filter(|c| &c.pair == p).cloned().collect()
    }
}

impl CycleRunner for Script {
    async fn run(&self, pair: &PairKey, control: CycleControl) -> RunResult {
        let b = self.behaviour.get(pair).cloned().unwrap_or_else(|| self.default.clone());
        let server = self.servers.get(pair).cloned().unwrap_or_default();
        {
            let mut r = self.running.lock().unwrap();
            let n = r.entry(server.clone()).or_default();
            *n += 1;
            let mut m = self.max_seen_per_server.lock().unwrap();
            *m = (*m).max(*n);
        }
        let start = self.clock.now();
        if b.panic_first && self.calls_of(pair).is_empty() {
            self.calls.lock().unwrap().push(Call {
                pair: pair.clone(),
                start,
                end: start,
                batches: Vec::new(),
                interrupted: false,
            });
            *self.running.lock().unwrap().get_mut(&server).unwrap() -= 1;
            panic!("scripted panic in a cycle");
        }
        let mut batches = Vec::new();
        let mut interrupted = false;
        let planned = match b.total {
            Some(total) => total - *self.done.lock().unwrap().get(pair).unwrap_or(&0),
            None => b.batches_per_cycle,
        };
        for _ in 0..planned {
            if control.stop.reason().is_some() {
                interrupted = true;
                break;
            }
            tokio::time::sleep(b.batch).await;
            batches.push(self.clock.now());
            *self.done.lock().unwrap().entry(pair.clone()).or_default() += 1;
        }
        *self.running.lock().unwrap().get_mut(&server).unwrap() -= 1;
        let end = self.clock.now();
        self.calls.lock().unwrap().push(Call { pair: pair.clone(), start, end, batches, interrupted });
        let (outcome, kind, retry_after) = match (interrupted, b.fail) {
            (true, _) => (Outcome::Interrupted, None, None),
            (false, Some((kind, retry))) => (Outcome::Failed, Some(kind.to_owned()), retry),
            (false, None) => (Outcome::Succeeded, None, None),
        };
        RunResult {
            record: RunRecord {
                started: start,
                ended: end,
                outcome,
                error_kind: kind.clone(),
                error_message: kind.map(|k| format!("scripted {k} failure")),
                source_version: None,
                tables: Vec::new(),
            },
            retry_after,
        }
    }

    fn maintenance(&self, _pair: &PairKey) -> Option<String> {
        None
    }
}

fn settings(blackout: Option<Blackout>) -> ServiceSettings {
    ServiceSettings {
        owner: "test".into(),
        cadence: Cadence { interval: 20 * MIN, blackout },
        backoff: Backoff { base: 30 * Duration::from_secs(1), max: 60 * MIN },
        definite_retry: 60 * MIN,
        max_cycles: 1000,
        max_per_server: 1000,
        lease_for: 2 * MIN,
        poll: Duration::from_secs(5),
        history_keep: Duration::from_secs(30 * 86_400),
        shutdown_grace: MIN,
        progress_every: MIN,
    }
}

/// Runs the service for `for_how_long` of simulated time.
async fn simulate(
    script: Arc<Script>,
    settings: ServiceSettings,
    pairs: Vec<PairKey>,
    for_how_long: Duration,
) -> (ServiceSummary, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    simulate_with(script, settings, pairs, for_how_long, store).await
}

async fn simulate_with(
    script: Arc<Script>,
    settings: ServiceSettings,
    pairs: Vec<PairKey>,
    for_how_long: Duration,
    store: Arc<MemoryStore>,
) -> (ServiceSummary, Arc<MemoryStore>) {
    let servers = pairs
        .iter()
        .map(|p| (p.clone(), script.servers.get(p).cloned().unwrap_or_else(|| "db1:5432".into())))
        .collect();
    let service = Service::new(store.clone(), script.clone(), script.clock, settings, servers);
    let summary = service.run(Mode::Forever, tokio::time::sleep(for_how_long)).await.unwrap();
    (summary, store)
}

fn starts(calls: &[Call]) -> Vec<DateTime<Utc>> {
    calls.iter().map(|c| c.start).collect()
}

#[tokio::test(start_paused = true)]
async fn a_pair_runs_every_interval_measured_from_the_previous_start() {
    let t0 = utc(2026, 6, 1, 8, 0);
    let clock = TokioClock::starting_at(t0);
    let script = Arc::new(Script::new(clock));
    let p = pair("acme");
    let st = settings(None);
    let phase = st.cadence.phase(&p);
    simulate(script.clone(), st, vec![p.clone()], Duration::from_secs(3 * 3600)).await;
    let s = starts(&script.calls_of(&p));
    assert!(s.len() >= 8, "{s:?}");
    assert_eq!(s[0], t0 + chrono::Duration::from_std(phase).unwrap(), "first start is at the pair's phase");
    for w in s.windows(2) {
        assert_eq!(w[1] - w[0], chrono::Duration::minutes(20), "{s:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_cycle_never_overlaps_its_successor() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    script.default = Behaviour { batches_per_cycle: 30, batch: MIN, ..Default::default() };
    let script = Arc::new(script);
    let p = pair("slow");
    simulate(script.clone(), settings(None), vec![p.clone()], Duration::from_secs(4 * 3600)).await;
    let calls = script.calls_of(&p);
    assert!(calls.len() >= 6);
    for w in calls.windows(2) {
        assert!(w[1].start >= w[0].end, "overlap: {:?} then {:?}", w[0], w[1]);
        assert_eq!(w[1].start - w[0].start, chrono::Duration::minutes(30), "starts right after the late end");
    }
}

#[tokio::test(start_paused = true)]
async fn first_starts_are_spread_over_the_interval() {
    let t0 = utc(2026, 6, 1, 8, 0);
    let clock = TokioClock::starting_at(t0);
    let mut script = Script::new(clock);
    script.default = Behaviour { batches_per_cycle: 1, batch: Duration::from_secs(1), ..Default::default() };
    let script = Arc::new(script);
    let pairs: Vec<_> = (0..200).map(|i| pair(&format!("tenant{i}"))).collect();
    simulate(script.clone(), settings(None), pairs.clone(), 21 * MIN).await;
    let mut per_minute = [0u32; 20];
    for p in &pairs {
        let first = script.calls_of(p)[0].start;
        let offset = (first - t0).num_seconds();
        assert!((0..1200).contains(&offset), "{p}: first start {offset}s after start");
        per_minute[(offset / 60) as usize] += 1;
    }
    // 200 pairs over 20 minutes: about 10 a minute, and never a stampede.
    assert!(per_minute.iter().all(|&n| n <= 25), "{per_minute:?}");
    assert!(per_minute.iter().filter(|&&n| n > 0).count() >= 18, "{per_minute:?}");
}

fn berlin() -> Blackout {
    Blackout::parse("01:30", "03:00", "Europe/Berlin").unwrap()
}

/// No start inside any window, and every pair starts again within one
/// interval after the window closes.
fn assert_respects_window(script: &Script, pairs: &[PairKey], from: DateTime<Utc>, to: DateTime<Utc>) {
    for p in pairs {
        let calls = script.calls_of(p);
        for c in &calls {
            assert!(!(c.start >= from && c.start < to), "{p} started at {} inside [{from}, {to})", c.start);
            for b in &c.batches {
                assert!(!(*b > from && *b <= to), "{p} did a batch at {b} inside the window");
            }
        }
        let resumed = calls.iter().map(|c| c.start).find(|s| *s >= to).expect("runs after the window");
        assert!(resumed - to < chrono::Duration::minutes(20), "{p} resumed at {resumed}, window closed {to}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_blackout_holds_on_the_night_clocks_go_back() {
    // 2026-10-25 in Berlin: 03:00 CEST becomes 02:00 CET. The window runs
    // from 01:30 CEST (23:30 UTC) to 03:00 CET (02:00 UTC): 2.5 hours.
    let clock = TokioClock::starting_at(utc(2026, 10, 24, 22, 0));
    let script = Arc::new(Script::new(clock));
    let pairs: Vec<_> = (0..10).map(|i| pair(&format!("t{i}"))).collect();
    simulate(script.clone(), settings(Some(berlin())), pairs.clone(), Duration::from_secs(6 * 3600)).await;
    assert_respects_window(&script, &pairs, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 0));
    // And it was not shifted by an hour either way: runs happen right up to
    // the window's opening.
    let before = script.calls.lock().unwrap().iter().filter(|c| c.start >= utc(2026, 10, 24, 23, 10)).count();
    assert!(before > 0);
}

#[tokio::test(start_paused = true)]
async fn the_blackout_holds_on_the_night_clocks_go_forward() {
    // 2026-03-29 in Berlin: 02:00 CET becomes 03:00 CEST. The window runs
    // from 01:30 CET (00:30 UTC) to 03:00 CEST (01:00 UTC): 30 minutes.
    let clock = TokioClock::starting_at(utc(2026, 3, 28, 23, 0));
    let script = Arc::new(Script::new(clock));
    let pairs: Vec<_> = (0..10).map(|i| pair(&format!("t{i}"))).collect();
    simulate(script.clone(), settings(Some(berlin())), pairs.clone(), Duration::from_secs(4 * 3600)).await;
    assert_respects_window(&script, &pairs, utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_cycle_caught_by_the_window_stops_at_a_batch_boundary_and_resumes_after_it_without_loss() {
    // A long full load: 200 one-minute batches, started at 00:50 UTC on a
    // winter night in Berlin (window 00:30-02:00 UTC).
    let clock = TokioClock::starting_at(utc(2026, 1, 14, 0, 0));
    let mut script = Script::new(clock);
    script.default = Behaviour { batch: MIN, total: Some(200), ..Default::default() };
    let script = Arc::new(script);
    let p = pair("bigload");
    simulate(script.clone(), settings(Some(berlin())), vec![p.clone()], Duration::from_secs(8 * 3600)).await;
    let calls = script.calls_of(&p);
    let interrupted: Vec<_> = calls.iter().filter(|c| c.interrupted).collect();
    assert_eq!(interrupted.len(), 1, "{calls:?}");
    let window = (utc(2026, 1, 14, 0, 30), utc(2026, 1, 14, 2, 0));
    // It stopped at the first boundary after the window opened.
    let last = *interrupted[0].batches.last().unwrap();
    assert!(last >= window.0 && last - window.0 < chrono::Duration::minutes(1), "last batch {last}");
    assert_respects_window(&script, std::slice::from_ref(&p), window.0 + chrono::Duration::minutes(1), window.1);
    // Nothing lost, nothing done twice.
    let total: usize = calls.iter().map(|c| c.batches.len()).sum();
    assert_eq!(total, 200);
    assert_eq!(script.done.lock().unwrap()[&p], 200);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_while_other_pairs_keep_their_cadence() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    let down = pair("down");
    let up = pair("up");
    script.behaviour.insert(
        down.clone(),
        Behaviour { batches_per_cycle: 0, fail: Some(("transient", None)), ..Default::default() },
    );
    let script = Arc::new(script);
    let (_, store) =
        simulate(script.clone(), settings(None), vec![down.clone(), up.clone()], Duration::from_secs(6 * 3600)).await;
    let up_starts = starts(&script.calls_of(&up));
    for w in up_starts.windows(2) {
        assert_eq!(w[1] - w[0], chrono::Duration::minutes(20));
    }
    let down_calls = script.calls_of(&down);
    let gaps: Vec<i64> = down_calls.windows(2).map(|w| (w[1].start - w[0].end).num_seconds()).collect();
    // Full jitter: each gap is at most its cap (30 s doubling, at most 1 h).
    for (i, g) in gaps.iter().enumerate() {
        let cap = (30i64 << i.min(20)).min(3600);
        assert!(*g <= cap, "gap {i} was {g}s, cap {cap}s: {gaps:?}");
    }
    assert!(store.pair(&down).unwrap().failures as usize == down_calls.len());
    assert!(down_calls.len() < 40, "backoff must thin out attempts: {}", down_calls.len());
}

#[tokio::test(start_paused = true)]
async fn a_partners_retry_after_is_honoured() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    let busy = pair("busy");
    script.behaviour.insert(
        busy.clone(),
        Behaviour { batches_per_cycle: 0, fail: Some(("transient", Some(45 * MIN))), ..Default::default() },
    );
    let script = Arc::new(script);
    simulate(script.clone(), settings(None), vec![busy.clone()], Duration::from_secs(4 * 3600)).await;
    let calls = script.calls_of(&busy);
    assert!(calls.len() >= 3);
    for w in calls.windows(2) {
        assert!(w[1].start - w[0].end >= chrono::Duration::minutes(45), "{:?}", (w[0].end, w[1].start));
    }
}

#[tokio::test(start_paused = true)]
async fn definite_failures_are_not_hammered() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    let refused = pair("refused");
    script.behaviour.insert(
        refused.clone(),
        Behaviour { batches_per_cycle: 0, fail: Some(("auth", None)), ..Default::default() },
    );
    let script = Arc::new(script);
    simulate(script.clone(), settings(None), vec![refused.clone()], Duration::from_secs(5 * 3600)).await;
    let s = starts(&script.calls_of(&refused));
    assert!(s.len() >= 4 && s.len() <= 6, "{s:?}");
    for w in s.windows(2) {
        assert!(w[1] - w[0] >= chrono::Duration::minutes(60));
    }
}

#[tokio::test(start_paused = true)]
async fn a_busy_source_server_gets_at_most_its_share_of_cycles() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    script.default = Behaviour { batches_per_cycle: 5, batch: MIN, ..Default::default() };
    let pairs: Vec<_> = (0..12).map(|i| pair(&format!("t{i}"))).collect();
    for (i, p) in pairs.iter().enumerate() {
        script.servers.insert(p.clone(), if i < 8 { "busy:1433".into() } else { "quiet:1433".into() });
    }
    let script = Arc::new(script);
    let mut st = settings(None);
    st.max_per_server = 2;
    st.max_cycles = 3;
    simulate(script.clone(), st, pairs.clone(), Duration::from_secs(2 * 3600)).await;
    assert!(*script.max_seen_per_server.lock().unwrap() <= 2);
    // Every pair still got its turns.
    for p in &pairs {
        assert!(script.calls_of(p).len() >= 3, "{p}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_tenant_in_maintenance_is_skipped_and_says_so() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let script = Arc::new(Script::new(clock));
    let p = pair("migrating");
    let store = Arc::new(MemoryStore::new());
    store.set_maintenance(&p.tenant, Some("schema migration"));
    simulate_with(script.clone(), settings(None), vec![p.clone()], Duration::from_secs(3600), store.clone()).await;
    assert!(script.calls_of(&p).is_empty());
    assert_eq!(store.pair(&p).unwrap().last_outcome, Some(Outcome::Maintenance));
    store.set_maintenance(&p.tenant, None);
    simulate_with(script.clone(), settings(None), vec![p.clone()], Duration::from_secs(3600), store.clone()).await;
    assert!(!script.calls_of(&p).is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_a_running_cycle_at_a_batch_boundary_and_leaves_it_due() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    script.default = Behaviour { batch: MIN, total: Some(500), ..Default::default() };
    let script = Arc::new(script);
    let p = pair("long");
    let phase = settings(None).cadence.phase(&p);
    let stop_after = phase + 10 * MIN + Duration::from_secs(30);
    let t_stop = utc(2026, 6, 1, 8, 0) + chrono::Duration::from_std(stop_after).unwrap();
    let (summary, store) = simulate(script.clone(), settings(None), vec![p.clone()], stop_after).await;
    assert_eq!(summary.aborted, 0);
    let calls = script.calls_of(&p);
    assert_eq!(calls.len(), 1);
    assert!(calls[0].interrupted);
    assert_eq!(calls[0].batches.len(), 11, "finished the batch in flight, then stopped");
    assert!(calls[0].end - t_stop <= chrono::Duration::minutes(1));
    let state = store.pair(&p).unwrap();
    assert_eq!(state.last_outcome, Some(Outcome::Interrupted));
    assert!(state.lease.is_none());
    assert_eq!(state.next_due, calls[0].end, "due at once for whoever runs next");
}

#[tokio::test(start_paused = true)]
async fn a_pass_with_once_runs_every_due_pair_once_and_returns() {
    let t0 = utc(2026, 6, 1, 8, 0);
    let clock = TokioClock::starting_at(t0);
    let script = Arc::new(Script::new(clock));
    let pairs: Vec<_> = (0..5).map(|i| pair(&format!("t{i}"))).collect();
    let store = Arc::new(MemoryStore::new());
    let servers = pairs.iter().map(|p| (p.clone(), "db:5432".to_owned())).collect();
    let st = settings(None);
    let service = Service::new(store.clone(), script.clone(), clock, st, servers);
    let summary = service.run(Mode::Once, std::future::pending()).await.unwrap();
    assert_eq!(summary.cycles, 5);
    for p in &pairs {
        assert_eq!(script.calls_of(p).len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_cycle_gives_its_pair_back_and_the_agent_goes_on() {
    let clock = TokioClock::starting_at(utc(2026, 6, 1, 8, 0));
    let mut script = Script::new(clock);
    let buggy = pair("buggy");
    let fine = pair("fine");
    script.behaviour.insert(buggy.clone(), Behaviour { panic_first: true, ..Default::default() });
    let script = Arc::new(script);
    let (summary, store) =
        simulate(script.clone(), settings(None), vec![buggy.clone(), fine.clone()], Duration::from_secs(2 * 3600)).await;
    let calls = script.calls_of(&buggy);
    assert!(calls.len() >= 4, "the pair runs again after the panic: {}", calls.len());
    assert!(calls[1].start - calls[0].start >= chrono::Duration::minutes(20), "not at once: no spinning");
    assert!(script.calls_of(&fine).len() >= 5);
    assert!(summary.failed >= 1);
    assert!(store.pair(&buggy).unwrap().lease.is_none());
}

/// Reloads what the scheduler asks, but the first run only gets through
/// table `a` before table `b` fails.
struct HalfReload {
    clock: TokioClock,
    asked: Mutex<Vec<Reload>>,
}

impl CycleRunner for HalfReload {
    async fn run(&self, _pair: &PairKey, control: CycleControl) -> RunResult {
        let first = {
            let mut asked = self.asked.lock().unwrap();
            asked.push(control.reload.clone());
            asked.len() == 1
        };
        let now = self.clock.now();
        let table = |name: &str, reloaded: bool, failed: bool| TableRun {
            table: name.into(),
            mode: if failed { "failed" } else { "full" }.into(),
            rows: 1,
            bytes: 1,
            batches: 1,
            from_cursor: None,
            to_cursor: None,
            duration: Duration::ZERO,
            error_kind: failed.then(|| "transient".to_owned()),
            error_message: failed.then(|| "source went away".to_owned()),
            reloaded,
            reload_reason: reloaded.then(|| "reload requested by an operator".to_owned()),
        };
        let tables = match &control.reload {
            Reload::All if first => vec![table("a", true, false), table("b", false, true)],
            Reload::Nothing => vec![table("a", false, false), table("b", false, false)],
            reload => vec![table("a", reload.covers("a"), false), table("b", reload.covers("b"), false)],
        };
        let outcome = if first { Outcome::Failed } else { Outcome::Succeeded };
        RunResult {
            record: RunRecord {
                started: now,
                ended: now,
                outcome,
                error_kind: None,
                error_message: None,
                source_version: None,
                tables,
            },
            retry_after: None,
        }
    }

    fn maintenance(&self, _pair: &PairKey) -> Option<String> {
        None
    }
}

#[tokio::test(start_paused = true)]
async fn a_whole_pair_resync_cut_short_continues_with_the_tables_it_missed() {
    let t0 = utc(2026, 6, 1, 8, 0);
    let clock = TokioClock::starting_at(t0);
    let runner = Arc::new(HalfReload { clock, asked: Mutex::new(Vec::new()) });
    let store = Arc::new(MemoryStore::new());
    let p = pair("acme");
    store.request_resync(&p, None, t0);
    let servers = [(p.clone(), "db:5432".to_owned())].into_iter().collect();
    let service = Service::new(store.clone(), runner.clone(), clock, settings(None), servers);
    service.run(Mode::Forever, tokio::time::sleep(Duration::from_secs(3 * 3600))).await.unwrap();
    let asked = runner.asked.lock().unwrap().clone();
    assert!(asked.len() >= 3, "{asked:?}");
    assert_eq!(asked[0], Reload::All);
    assert_eq!(asked[1], Reload::Tables(["b".to_owned()].into_iter().collect()), "table a is not reloaded twice");
    assert!(asked[2..].iter().all(|r| *r == Reload::Nothing), "{asked:?}");
}

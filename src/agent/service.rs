//! `ctmirror agent`: the hosted background service that drives every
//! configured (tenant, application) pair on its cadence.
//!
//! One loop claims due pairs from the shared store (leases, so several agent
//! processes share the work without running a pair twice), starts each as
//! its own task within the global and per-server limits, and sleeps until a
//! pair falls due, a cycle ends, the blackout opens, or SIGTERM arrives. A
//! running cycle renews its lease and publishes its progress on a heartbeat;
//! when it ends, the next start is decided from its outcome (cadence,
//! backoff, the partner's Retry-After) and written with the history in one
//! transaction.
//!
//! The loop is generic over the store, the cycle runner and the clock, so
//! its decisions are tested on tokio's paused clock with an in-memory store
//! and a scripted runner, and run for real with the control database.

use super::cycle::{CycleControl, Reload};
use super::report::TableOutcome;
use super::stop::{StopReason, StopSignal};
use crate::schedule::store::{PairStore, StoreResult};
use crate::schedule::{
    Backoff, Cadence, Claim, Clock, Lease, Outcome, PairKey, PairRegistration, ResyncRequest, RunId, RunRecord,
    TableProgress,
};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{error, info, info_span, warn, Instrument};

/// What the scheduler needs from whoever runs a cycle.
pub trait CycleRunner: Send + Sync + 'static {
    /// Runs one cycle of `pair` under `control`. Never fails: failures are
    /// in the record (the service fills in the start and end times).
    fn run(&self, pair: &PairKey, control: CycleControl) -> impl Future<Output = RunResult> + Send;

    /// The maintenance reason when configuration puts the tenant in
    /// maintenance.
    fn maintenance(&self, pair: &PairKey) -> Option<String>;
}

/// A cycle's record plus what the scheduler needs to plan the next one.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub record: RunRecord,
    /// The partner asked us to come back no sooner than this.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// This process's name in leases and history (host and pid by default).
    pub owner: String,
    pub cadence: Cadence,
    pub backoff: Backoff,
    pub definite_retry: Duration,
    pub max_cycles: usize,
    pub max_per_server: usize,
    pub lease_for: Duration,
    pub poll: Duration,
    pub history_keep: Duration,
    pub shutdown_grace: Duration,
    /// How often live progress is written for `status --follow`.
    pub progress_every: Duration,
}

/// Whether the service runs until told to stop or makes one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forever,
    /// Every pair due now runs once, then the service returns.
    Once,
}

/// What a service run did, for the exit message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSummary {
    pub cycles: u64,
    pub failed: u64,
    /// Cycles still running at the end of the shutdown grace, aborted.
    pub aborted: u64,
}

struct Shared<S, R, C> {
    store: S,
    runner: R,
    clock: C,
    settings: ServiceSettings,
}

struct Running {
    stop: StopSignal,
    server: String,
    lease: Lease,
}

pub struct Service<S, R, C> {
    shared: Arc<Shared<S, R, C>>,
    /// Configured pairs and their source servers.
    pairs: Vec<(PairKey, String)>,
}

impl<S: PairStore, R: CycleRunner, C: Clock> Service<S, R, C> {
    /// `pairs` are the configured pairs with their source servers.
    pub fn new(store: S, runner: R, clock: C, settings: ServiceSettings, pairs: Vec<(PairKey, String)>) -> Self {
        Self { shared: Arc::new(Shared { store, runner, clock, settings }), pairs }
    }

    /// Pairs never seen before are spread over the interval by the service;
    /// a `--once` pass runs them now (cron decides when passes happen, and a
    /// first pass that does nothing would only puzzle).
    fn registrations(&self, mode: Mode) -> Vec<PairRegistration> {
        let now = self.shared.clock.now();
        self.pairs
            .iter()
            .map(|(key, server)| PairRegistration {
                first_due: match mode {
                    Mode::Forever => self.shared.settings.cadence.first_due(key, now),
                    Mode::Once => now,
                },
                key: key.clone(),
                server: server.clone(),
            })
            .collect()
    }

    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// Runs until `shutdown` resolves (or one pass in [`Mode::Once`]).
    /// Returns an error only when the store cannot be reached at start.
    pub async fn run(&self, mode: Mode, shutdown: impl Future<Output = ()>) -> StoreResult<ServiceSummary> {
        let sh = &self.shared;
        let st = &sh.settings;
        let registrations = self.registrations(mode);
        retrying("register pairs", || sh.store.register(&registrations)).await?;
        info!(
            pairs = self.pairs.len(),
            owner = %st.owner,
            interval_s = st.cadence.interval.as_secs(),
            blackout = %st.cadence.blackout.map(|b| b.to_string()).unwrap_or_else(|| "none".into()),
            "agent started"
        );
        let mut keys: Vec<PairKey> = self.pairs.iter().map(|p| p.0.clone()).collect();
        let mut running: HashMap<PairKey, Running> = HashMap::new();
        let mut tasks: JoinSet<(PairKey, Outcome)> = JoinSet::new();
        // Which pair a task runs, to give its lease back should it panic.
        let mut task_pairs: HashMap<tokio::task::Id, PairKey> = HashMap::new();
        let mut summary = ServiceSummary::default();
        let mut last_prune: Option<DateTime<Utc>> = None;
        let mut shutdown = std::pin::pin!(shutdown);
        if mode == Mode::Once {
            if let Some(b) = st.cadence.blackout.filter(|b| b.contains(sh.clock.now())) {
                info!(window = %b, "inside the blackout window: no cycle starts");
                return Ok(summary);
            }
        }

        loop {
            let now = sh.clock.now();
            let in_blackout = st.cadence.blackout.is_some_and(|b| b.contains(now));
            if in_blackout {
                for (key, r) in &running {
                    if r.stop.reason().is_none() {
                        info!(pair = %key, "blackout window opened; the cycle stops at its next batch boundary");
                    }
                    r.stop.stop(StopReason::Blackout);
                }
            }
            if last_prune.is_none_or(|t| now - t > chrono::Duration::hours(1)) {
                last_prune = Some(now);
                let before = now - chrono::Duration::from_std(st.history_keep).unwrap_or(chrono::Duration::days(30));
                match sh.store.prune(before).await {
                    Ok(0) => {}
                    Ok(n) => info!(runs = n, "pruned old run history"),
                    Err(e) => warn!(error = %e, "pruning run history failed; trying again later"),
                }
            }

            let free = st.max_cycles.saturating_sub(running.len());
            let mut claimed = 0;
            if free > 0 && !in_blackout {
                let busy = busy_servers(&running, st.max_per_server);
                match sh.store.claim(&st.owner, &keys, now, st.lease_for, free, &busy).await {
                    Ok(claims) => {
                        claimed = claims.len();
                        for claim in claims {
                            let on_server = running.values().filter(|r| r.server == claim.server).count();
                            if on_server >= st.max_per_server {
                                // Claimed together with others on the same
                                // server: give it back, still due.
                                let _ = sh.store.release(&claim.lease, claim.due).await;
                                continue;
                            }
                            let stop = StopSignal::new();
                            let key = claim.lease.key.clone();
                            if mode == Mode::Once {
                                // One pass: a pair that ran is not claimed
                                // again, even when its backoff makes it due.
                                keys.retain(|k| k != &key);
                            }
                            running.insert(
                                key.clone(),
                                Running { stop: stop.clone(), server: claim.server.clone(), lease: claim.lease.clone() },
                            );
                            let handle = tasks.spawn(run_pair(sh.clone(), claim, stop));
                            task_pairs.insert(handle.id(), key);
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot claim due pairs; trying again"),
                }
            }

            if mode == Mode::Once && claimed == 0 && tasks.is_empty() {
                break;
            }

            // Sleep until something can change: a pair falls due (when a
            // slot is free), the blackout opens or closes, a cycle ends.
            let mut wake = now + chrono::Duration::from_std(st.poll).expect("poll fits");
            if running.len() < st.max_cycles && !in_blackout {
                if let Ok(Some(due)) = sh.store.next_due(&keys, now).await {
                    wake = wake.min(due.max(now + chrono::Duration::milliseconds(10)));
                }
            }
            if let Some(b) = st.cadence.blackout {
                wake = wake.min(if in_blackout { b.next_open(now) } else { b.next_start(now) });
            }
            let nap = (wake - now).to_std().unwrap_or(Duration::ZERO).max(Duration::from_millis(10));
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    if let Some(lease) = settle(done, &mut running, &mut task_pairs, &mut summary) {
                        release_after_panic(sh, &lease).await;
                    }
                }
                _ = &mut shutdown => {
                    info!(running = running.len(), "shutdown requested; no new cycles start");
                    break;
                }
            }
        }

        for r in running.values() {
            r.stop.stop(StopReason::Shutdown);
        }
        let grace = tokio::time::sleep(st.shutdown_grace);
        tokio::pin!(grace);
        while !tasks.is_empty() {
            tokio::select! {
                Some(done) = tasks.join_next_with_id() => {
                    if let Some(lease) = settle(done, &mut running, &mut task_pairs, &mut summary) {
                        release_after_panic(sh, &lease).await;
                    }
                }
                _ = &mut grace => {
                    warn!(running = tasks.len(), "shutdown grace elapsed; aborting the cycles still running");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    let now = sh.clock.now();
                    for r in running.values() {
                        summary.aborted += 1;
                        let _ = sh.store.release(&r.lease, now).await;
                    }
                    running.clear();
                }
            }
        }
        info!(cycles = summary.cycles, failed = summary.failed, "agent stopped");
        Ok(summary)
    }
}

/// Books a finished task; returns the lease of a task that panicked, which
/// nobody else will release.
fn settle(
    done: Result<(tokio::task::Id, (PairKey, Outcome)), tokio::task::JoinError>,
    running: &mut HashMap<PairKey, Running>,
    task_pairs: &mut HashMap<tokio::task::Id, PairKey>,
    summary: &mut ServiceSummary,
) -> Option<Lease> {
    match done {
        Ok((id, (key, outcome))) => {
            task_pairs.remove(&id);
            running.remove(&key);
            summary.cycles += 1;
            if outcome == Outcome::Failed {
                summary.failed += 1;
            }
            None
        }
        Err(e) => {
            let key = task_pairs.remove(&e.id());
            error!(pair = ?key.as_ref().map(|k| k.to_string()), error = %e, "a cycle task panicked");
            summary.cycles += 1;
            summary.failed += 1;
            key.and_then(|k| running.remove(&k)).map(|r| r.lease)
        }
    }
}

/// A panicked cycle recorded nothing; its pair is given back, due after
/// one interval so a cycle that panics every time does not spin.
async fn release_after_panic<S: PairStore, R: CycleRunner, C: Clock>(sh: &Arc<Shared<S, R, C>>, lease: &Lease) {
    let st = &sh.settings;
    let next = st.cadence.not_in_blackout(
        &lease.key,
        sh.clock.now() + chrono::Duration::from_std(st.cadence.interval).unwrap_or(chrono::Duration::minutes(20)),
    );
    if let Err(e) = sh.store.release(lease, next).await {
        warn!(error = %e, "cannot release the panicked cycle's lease; it expires on its own");
    }
}

fn busy_servers(running: &HashMap<PairKey, Running>, max_per_server: usize) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in running.values() {
        *counts.entry(&r.server).or_default() += 1;
    }
    counts.into_iter().filter(|(_, n)| *n >= max_per_server).map(|(s, _)| s.to_owned()).collect()
}

/// One pair's turn: maintenance check, run with heartbeat, plan the next.
async fn run_pair<S: PairStore, R: CycleRunner, C: Clock>(
    sh: Arc<Shared<S, R, C>>,
    claim: Claim,
    stop: StopSignal,
) -> (PairKey, Outcome) {
    let key = claim.lease.key.clone();
    let span = info_span!("pair", tenant = %key.tenant, app = %key.app);
    let outcome = turn(&sh, &claim, &stop).instrument(span).await;
    (key, outcome)
}

async fn turn<S: PairStore, R: CycleRunner, C: Clock>(
    sh: &Arc<Shared<S, R, C>>,
    claim: &Claim,
    stop: &StopSignal,
) -> Outcome {
    let st = &sh.settings;
    let key = &claim.lease.key;
    let started = sh.clock.now();

    let maintenance = match sh.runner.maintenance(key) {
        Some(r) => Some(r),
        None => sh.store.maintenance(&key.tenant).await.unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the maintenance flag; running anyway");
            None
        }),
    };
    if let Some(reason) = maintenance {
        info!(%reason, "tenant is in maintenance; cycle skipped");
        let record = RunRecord {
            started,
            ended: started,
            outcome: Outcome::Maintenance,
            error_kind: None,
            error_message: Some(reason),
            source_version: None,
            tables: Vec::new(),
        };
        let next = st.cadence.after_run(key, started, started);
        finish(sh, &claim.lease, None, &record, next, claim.failures).await;
        return Outcome::Maintenance;
    }

    let run = match retrying("record the run's start", || sh.store.start_run(&claim.lease, started)).await {
        Ok(id) => id,
        Err(e) => {
            error!(error = %e, "cannot record the run's start; the pair is given back");
            let _ = sh.store.release(&claim.lease, started + chrono::Duration::from_std(st.poll).unwrap()).await;
            return Outcome::Failed;
        }
    };
    let resyncs = sh.store.pending_resyncs(key).await.unwrap_or_else(|e| {
        warn!(error = %e, "cannot read resync requests; they wait for the next cycle");
        Vec::new()
    });
    let reload = reload_of(&resyncs);
    if reload != Reload::Nothing {
        info!(?reload, "operator requested a reload");
    }

    let progress = Arc::new(Progress::default());
    let sink = progress.clone();
    let control = CycleControl {
        stop: stop.clone(),
        reload,
        progress: Some(Arc::new(move |o: &TableOutcome| sink.update(o))),
        source_rows: None,
    };

    let heartbeat = heartbeat(sh, &claim.lease, run, stop, &progress);
    let result = tokio::select! {
        r = sh.runner.run(key, control) => r,
        _ = heartbeat => unreachable!("the heartbeat never ends"),
    };
    let ended = sh.clock.now();
    let mut record = result.record;
    record.started = started;
    record.ended = ended;
    if record.outcome == Outcome::Interrupted && stop.reason().is_none() {
        // Only the scheduler interrupts; anything else is a failure.
        record.outcome = Outcome::Failed;
    }

    let (next, failures) = plan_next(st, key, &record, result.retry_after, claim.failures, stop.reason());
    log_outcome(&record, next, failures);

    let done: Vec<i64> = resyncs.iter().filter(|r| resync_satisfied(r, &record)).map(|r| r.id).collect();
    if !done.is_empty() {
        if let Err(e) = sh.store.resync_done(&done, ended).await {
            warn!(error = %e, "cannot mark resync requests done; the reload may repeat");
        }
    }
    for r in resyncs.iter().filter(|r| r.table.is_none() && !done.contains(&r.id)) {
        if !record.tables.iter().any(|t| t.reloaded) {
            continue;
        }
        let rest: Vec<String> = record.tables.iter().filter(|t| !t.reloaded).map(|t| t.table.clone()).collect();
        if let Err(e) = sh.store.narrow_resync(r.id, &rest, ended).await {
            warn!(error = %e, "cannot narrow the resync request; its reloads may repeat");
        }
    }
    finish(sh, &claim.lease, Some(run), &record, next, failures).await;
    record.outcome
}

/// Renews the lease and publishes progress until dropped.
async fn heartbeat<S: PairStore, R: CycleRunner, C: Clock>(
    sh: &Arc<Shared<S, R, C>>,
    lease: &Lease,
    run: RunId,
    stop: &StopSignal,
    progress: &Progress,
) {
    let st = &sh.settings;
    let renew_every = st.lease_for / 3;
    let tick = renew_every.min(st.progress_every).max(Duration::from_millis(50));
    let mut last_renew = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if last_renew.elapsed() >= renew_every {
            last_renew = tokio::time::Instant::now();
            match sh.store.renew(lease, sh.clock.now(), st.lease_for).await {
                Ok(true) => {}
                Ok(false) => {
                    if stop.reason().is_none() {
                        warn!("the pair's lease was taken over; stopping at the next batch boundary");
                    }
                    stop.stop(StopReason::LeaseLost);
                }
                Err(e) => warn!(error = %e, "cannot renew the lease; retrying"),
            }
        }
        if let Some(tables) = progress.take_if_changed() {
            if let Err(e) = sh.store.progress(run, &tables, sh.clock.now()).await {
                warn!(error = %e, "cannot publish progress");
            }
        }
    }
}

/// The latest progress per table, written by the cycle, read by the
/// heartbeat.
#[derive(Default)]
struct Progress {
    inner: Mutex<(BTreeMap<String, TableProgress>, bool)>,
}

impl Progress {
    fn update(&self, o: &TableOutcome) {
        let mut g = self.inner.lock().expect("progress lock");
        g.0.insert(
            o.table.clone(),
            TableProgress {
                table: o.table.clone(),
                mode: mode_name(o),
                rows: o.rows_sent,
                bytes: o.bytes_sent,
                batches: o.batches,
                cursor: o.cursor.clone(),
            },
        );
        g.1 = true;
    }

    fn take_if_changed(&self) -> Option<Vec<TableProgress>> {
        let mut g = self.inner.lock().expect("progress lock");
        if !g.1 {
            return None;
        }
        g.1 = false;
        Some(g.0.values().cloned().collect())
    }
}

/// The history's name for what a table did.
pub fn mode_name(o: &TableOutcome) -> String {
    match &o.error {
        Some(e) if e.kind == super::AgentErrorKind::Interrupted => "interrupted".into(),
        _ => format!("{:?}", o.mode).to_lowercase(),
    }
}

fn reload_of(requests: &[ResyncRequest]) -> Reload {
    if requests.is_empty() {
        return Reload::Nothing;
    }
    if requests.iter().any(|r| r.table.is_none()) {
        return Reload::All;
    }
    Reload::Tables(requests.iter().filter_map(|r| r.table.clone()).collect())
}

/// A request is done once every table it names had its reload started in
/// this run: if the load itself is interrupted later, the receiver's
/// snapshot cursor makes the next cycle resume it rather than start over.
fn resync_satisfied(request: &ResyncRequest, record: &RunRecord) -> bool {
    match &request.table {
        Some(t) => record.tables.iter().any(|r| &r.table == t && r.reloaded),
        None => !record.tables.is_empty() && record.tables.iter().all(|r| r.reloaded),
    }
}

/// When the pair runs next and its failure streak.
///
/// - success, "do not replicate", maintenance: the cadence, from this start;
/// - stopped by the blackout: the cadence, which moves out of the window;
/// - stopped by shutdown: due at once, so another process (or this one
///   after a restart) resumes from the receiver's cursor;
/// - the cycle failed transiently: full-jitter backoff, never sooner than
///   the partner's Retry-After;
/// - the cycle failed definitely (auth, refused, config): not before
///   `definite_retry`, so an operator's fix is picked up without hammering;
/// - only some tables failed: the cadence (the others keep their pace).
pub fn plan_next(
    st: &ServiceSettings,
    key: &PairKey,
    record: &RunRecord,
    retry_after: Option<Duration>,
    failures: u32,
    stopped: Option<StopReason>,
) -> (DateTime<Utc>, u32) {
    let cadence = &st.cadence;
    let ended = record.ended;
    let regular = cadence.after_run(key, record.started, ended);
    let at = |d: Duration| ended + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1));
    match record.outcome {
        Outcome::Succeeded | Outcome::Paused | Outcome::Maintenance => (regular, 0),
        Outcome::Interrupted => match stopped {
            Some(StopReason::Shutdown) => (ended, failures),
            _ => (regular, failures),
        },
        Outcome::Failed => {
            let failures = failures.saturating_add(1);
            let next = match record.error_kind.as_deref() {
                None => regular,
                Some("transient") => {
                    let mut b = [0u8; 8];
                    getrandom::fill(&mut b).ok();
                    let wait = st.backoff.delay(failures, u64::from_le_bytes(b)).max(retry_after.unwrap_or_default());
                    cadence.not_in_blackout(key, at(wait))
                }
                Some(_) => regular.max(cadence.not_in_blackout(key, at(st.definite_retry))),
            };
            (next, failures)
        }
    }
}

fn log_outcome(record: &RunRecord, next: DateTime<Utc>, failures: u32) {
    let seconds = (record.ended - record.started).num_milliseconds() as f64 / 1000.0;
    match record.outcome {
        Outcome::Failed => warn!(
            kind = record.error_kind.as_deref().unwrap_or("table"),
            error = record.error_message.as_deref().unwrap_or("a table failed"),
            failures,
            next = %next,
            rows = record.rows(),
            seconds,
            "cycle failed"
        ),
        o => info!(outcome = o.as_str(), rows = record.rows(), bytes = record.bytes(), seconds, next = %next, "cycle ended"),
    }
}

async fn finish<S: PairStore, R: CycleRunner, C: Clock>(
    sh: &Arc<Shared<S, R, C>>,
    lease: &Lease,
    run: Option<RunId>,
    record: &RunRecord,
    next: DateTime<Utc>,
    failures: u32,
) {
    match retrying("record the run's end", || sh.store.finish(lease, run, record, next, failures)).await {
        Ok(true) => {}
        Ok(false) => warn!("the lease was lost during the run; another process owns the pair now"),
        Err(e) => error!(error = %e, "cannot record the run's end; the lease expires and the pair is taken over"),
    }
}

/// Retries transient store errors a few times: a control-database blip must
/// not lose a run's record.
async fn retrying<T, F, Fut>(what: &str, mut op: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Err(e) if e.is_retryable() && attempt < 5 => {
                warn!(error = %e, attempt, "control database unavailable ({what}); retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// `host-pid`: unique enough among agent processes, readable in status.
pub fn default_owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".into());
    format!("{host}-{}", std::process::id())
}

impl<R: CycleRunner> CycleRunner for Arc<R> {
    fn run(&self, pair: &PairKey, control: CycleControl) -> impl Future<Output = RunResult> + Send {
        (**self).run(pair, control)
    }
    fn maintenance(&self, pair: &PairKey) -> Option<String> {
        (**self).maintenance(pair)
    }
}

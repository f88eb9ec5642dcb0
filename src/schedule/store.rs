//! The schedule's shared state: which pairs are due, who runs them (leases),
//! and what every run did (history).
//!
//! The control database ([`crate::control::ControlDb`]) is the production
//! store and the one several agent processes share; [`super::MemoryStore`]
//! keeps the same rules in one process for tests on tokio's paused clock,
//! where real I/O would let tokio skip time under a query's feet.

use crate::ids::{AppId, TenantId};
use crate::protocol::Cursor;
use chrono::{DateTime, Utc};
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// One (tenant, application) pair: the unit that is scheduled and leased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub tenant: TenantId,
    pub app: AppId,
}

impl fmt::Display for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.app)
    }
}

/// A configured pair as the agent announces it at start.
#[derive(Debug, Clone)]
pub struct PairRegistration {
    pub key: PairKey,
    /// The source database server (`host:port`), for the per-server limit.
    pub server: String,
    /// When a pair never seen before first runs: spread over the interval.
    pub first_due: DateTime<Utc>,
}

/// The right to run one pair until `expires` (renewed while running).
/// `token` grows with every claim, so a process whose lease was taken over
/// cannot renew or finish it any more (fencing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: PairKey,
    pub owner: String,
    pub token: i64,
}

#[derive(Debug, Clone)]
pub struct Claim {
    pub lease: Lease,
    pub server: String,
    /// When the pair was due.
    pub due: DateTime<Utc>,
    /// Failed runs in a row before this one (drives the backoff).
    pub failures: u32,
}

/// A run's id in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a run (or a skipped turn) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every table is up to date and the receiver took ReplicationCompleted.
    Succeeded,
    /// The cycle or at least one table failed; `error_kind` says how.
    Failed,
    /// The partner answered "do not replicate".
    Paused,
    /// Stopped at a batch boundary (blackout, shutdown, lease lost);
    /// resumes from the receiver's cursor.
    Interrupted,
    /// Not run: the tenant is in maintenance.
    Maintenance,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Paused => "paused",
            Outcome::Interrupted => "interrupted",
            Outcome::Maintenance => "maintenance",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => Outcome::Succeeded,
            "failed" => Outcome::Failed,
            "paused" => Outcome::Paused,
            "interrupted" => Outcome::Interrupted,
            "maintenance" => Outcome::Maintenance,
            _ => return None,
        })
    }
}

/// What one run did to one table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRun {
    pub table: String,
    /// full, incremental, idle, failed or interrupted.
    pub mode: String,
    pub rows: u64,
    pub bytes: u64,
    pub batches: u64,
    /// The receiver's cursor before and after the run.
    pub from_cursor: Option<Cursor>,
    pub to_cursor: Option<Cursor>,
    pub duration: Duration,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    /// A full reload of the table started in this run.
    pub reloaded: bool,
    /// Why (retention expired, source restored, schema change, operator).
    pub reload_reason: Option<String>,
}

/// What one run did, written to the history when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub started: DateTime<Utc>,
    pub ended: DateTime<Utc>,
    pub outcome: Outcome,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    /// The source's version the run synced up to.
    pub source_version: Option<i64>,
    pub tables: Vec<TableRun>,
}

impl RunRecord {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }
}

/// Live progress of one table in a running cycle, for `status --follow`.
#[derive(Debug, Clone, PartialEq)]
pub struct TableProgress {
    pub table: String,
    pub mode: String,
    pub rows: u64,
    pub bytes: u64,
    pub batches: u64,
    pub cursor: Option<Cursor>,
}

/// An operator's request to reload a pair (all tables when `table` is None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncRequest {
    pub id: i64,
    pub table: Option<String>,
    pub requested_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The control database is unreachable or busy: try again shortly.
    Transient,
    /// The control database refuses us (permissions, an unknown schema
    /// version): an operator must act.
    Fatal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("control database: {message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Transient
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The scheduler's view of the shared state. Every time is passed in, never
/// read from the database's clock, so all processes and tests agree on one
/// clock: the agent's.
pub trait PairStore: Send + Sync + 'static {
    /// Adds pairs never seen before (due at `first_due`) and updates the
    /// server of known ones. Existing schedule state is kept.
    fn register(&self, pairs: &[PairRegistration]) -> impl Future<Output = StoreResult<()>> + Send;

    /// Leases up to `limit` pairs among `among` that are due at `now`, not
    /// leased by a live owner and whose server is not in `busy_servers`,
    /// oldest due first.
    fn claim(
        &self,
        owner: &str,
        among: &[PairKey],
        now: DateTime<Utc>,
        lease_for: Duration,
        limit: usize,
        busy_servers: &[String],
    ) -> impl Future<Output = StoreResult<Vec<Claim>>> + Send;

    /// The earliest instant at which `claim` could return one of `among`:
    /// its due time, or for a pair leased by a live owner, the later of that
    /// and the lease's expiry. Tells the scheduler how long it may sleep
    /// without spinning on pairs that other cycles are running.
    fn next_due(
        &self,
        among: &[PairKey],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<Option<DateTime<Utc>>>> + Send;

    /// Records the start of a run (visible as running in status).
    fn start_run(&self, lease: &Lease, started: DateTime<Utc>) -> impl Future<Output = StoreResult<RunId>> + Send;

    /// Extends the lease; false when it is no longer ours.
    fn renew(&self, lease: &Lease, now: DateTime<Utc>, lease_for: Duration)
        -> impl Future<Output = StoreResult<bool>> + Send;

    /// Replaces the live progress of a running run.
    fn progress(&self, run: RunId, tables: &[TableProgress], now: DateTime<Utc>)
        -> impl Future<Output = StoreResult<()>> + Send;

    /// Ends a run: history (when `run` is given), the pair's schedule state
    /// and per-table state, and the lease released, in one transaction.
    /// False (and nothing written but the history) when the lease was lost.
    fn finish(
        &self,
        lease: &Lease,
        run: Option<RunId>,
        record: &RunRecord,
        next_due: DateTime<Utc>,
        failures: u32,
    ) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Gives a claimed pair back without running it.
    fn release(&self, lease: &Lease, next_due: DateTime<Utc>) -> impl Future<Output = StoreResult<()>> + Send;

    /// The reason when the tenant is in maintenance in the control data.
    fn maintenance(&self, tenant: &TenantId) -> impl Future<Output = StoreResult<Option<String>>> + Send;

    fn pending_resyncs(&self, pair: &PairKey) -> impl Future<Output = StoreResult<Vec<ResyncRequest>>> + Send;

    fn resync_done(&self, ids: &[i64], now: DateTime<Utc>) -> impl Future<Output = StoreResult<()>> + Send;

    /// Replaces a whole-pair request, part of which a run carried out, by
    /// one request per table still to reload (same request time), in one
    /// step. Without it an interrupted whole-pair resync would restart
    /// every table, the finished ones too, at every cycle.
    fn narrow_resync(
        &self,
        id: i64,
        tables: &[String],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Deletes history of runs that started before `before`; returns how
    /// many runs went.
    fn prune(&self, before: DateTime<Utc>) -> impl Future<Output = StoreResult<u64>> + Send;
}

/// A shared store is a store (tests keep a handle to inspect it).
impl<S: PairStore> PairStore for std::sync::Arc<S> {
    fn register(&self, pairs: &[PairRegistration]) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).register(pairs)
    }
    fn claim(
        &self,
        owner: &str,
        among: &[PairKey],
        now: DateTime<Utc>,
        lease_for: Duration,
        limit: usize,
        busy_servers: &[String],
    ) -> impl Future<Output = StoreResult<Vec<Claim>>> + Send {
        (**self).claim(owner, among, now, lease_for, limit, busy_servers)
    }
    fn next_due(
        &self,
        among: &[PairKey],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<Option<DateTime<Utc>>>> + Send {
        (**self).next_due(among, now)
    }
    fn start_run(&self, lease: &Lease, started: DateTime<Utc>) -> impl Future<Output = StoreResult<RunId>> + Send {
        (**self).start_run(lease, started)
    }
    fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        lease_for: Duration,
    ) -> impl Future<Output = StoreResult<bool>> + Send {
        (**self).renew(lease, now, lease_for)
    }
    fn progress(
        &self,
        run: RunId,
        tables: &[TableProgress],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).progress(run, tables, now)
    }
    fn finish(
        &self,
        lease: &Lease,
        run: Option<RunId>,
        record: &RunRecord,
        next_due: DateTime<Utc>,
        failures: u32,
    ) -> impl Future<Output = StoreResult<bool>> + Send {
        (**self).finish(lease, run, record, next_due, failures)
    }
    fn release(&self, lease: &Lease, next_due: DateTime<Utc>) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).release(lease, next_due)
    }
    fn maintenance(&self, tenant: &TenantId) -> impl Future<Output = StoreResult<Option<String>>> + Send {
        (**self).maintenance(tenant)
    }
    fn pending_resyncs(&self, pair: &PairKey) -> impl Future<Output = StoreResult<Vec<ResyncRequest>>> + Send {
        (**self).pending_resyncs(pair)
    }
    fn resync_done(&self, ids: &[i64], now: DateTime<Utc>) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).resync_done(ids, now)
    }
    fn narrow_resync(
        &self,
        id: i64,
        tables: &[String],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        (**self).narrow_resync(id, tables, now)
    }
    fn prune(&self, before: DateTime<Utc>) -> impl Future<Output = StoreResult<u64>> + Send {
        (**self).prune(before)
    }
}

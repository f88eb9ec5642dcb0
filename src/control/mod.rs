//! The control database: the schedule state that agent processes share.
//!
//! A PostgreSQL database (schema `ctmirror_control`) holds, per (tenant,
//! application) pair, when it is next due and who runs it now (a lease); the
//! history of every run and what it did to each table; operator switches
//! (maintenance, resync requests). [`ControlDb`] implements
//! [`PairStore`] on it, and adds the operator queries of `ctmirror status`,
//! `ctmirror resync` and `ctmirror maintenance` (see [`ops`]).
//!
//! Every time comes from the caller (the agent's clock), never from the
//! database's `now()`: all processes, and tests on a fake clock, agree on one
//! clock.
//!
//! - [`migrate`]: the schema, applied at connect.
//! - [`leases`]: registering pairs, claiming, renewing and releasing them.
//! - [`history`]: runs, their live progress and their end.
//! - [`ops`]: operator-facing reads and switches.
//! - [`errors`]: which failures are worth retrying.

mod codec;
pub mod errors;
pub mod history;
pub mod leases;
pub mod migrate;
pub mod ops;

pub use ops::{PairStatus, RunSummary, RunningRun, TableStatus};

use crate::ids::TenantId;
use crate::schedule::store::{
    Claim, Lease, PairKey, PairRegistration, PairStore, ResyncRequest, RunId, RunRecord, StoreError, StoreErrorKind,
    StoreResult, TableProgress,
};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Connections per process: the agent's store calls are short, and each
/// running pair needs one only for a moment (claim, renew, progress, finish).
const POOL_SIZE: usize = 4;

/// How long a store call waits for a free pooled connection before giving up
/// with a transient error.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(30);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The control database, through a small connection pool. Cheap to clone.
#[derive(Clone)]
pub struct ControlDb {
    pool: Pool,
}

impl std::fmt::Debug for ControlDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: it may hold a password.
        f.debug_struct("ControlDb").field("pool", &self.pool.status()).finish()
    }
}

impl ControlDb {
    /// Connects, brings the schema up to date, and returns the store. Fails
    /// with a [`StoreErrorKind::Fatal`] error for a malformed URL or a schema
    /// newer than this binary, and a transient one when the server cannot be
    /// reached.
    pub async fn connect(url: &str) -> Result<ControlDb, StoreError> {
        // The URL may hold a password: the parse error is reported without
        // it (tokio-postgres's parse errors name options, never values).
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::new(
                StoreErrorKind::Fatal,
                format!("URL is not a valid PostgreSQL URL: {}", errors::with_sources(&e)),
            )
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("ctmirror-agent");
        }
        // "already exists, skipping" notices of the idempotent migration
        // preamble are noise in every `status` an operator runs.
        if pg.get_options().is_none() {
            pg.options("-c client_min_messages=warning");
        }
        let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT_FOR_CONNECTION))
            .build()
            .map_err(|e| StoreError::new(StoreErrorKind::Fatal, format!("cannot build connection pool: {e}")))?;
        let db = ControlDb { pool };
        let mut client = db.client().await?;
        migrate::migrate(&mut client).await?;
        Ok(db)
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let client = self.client().await?;
        migrate::current_version(&client).await
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(errors::pool)
    }
}

impl PairStore for ControlDb {
    async fn register(&self, pairs: &[PairRegistration]) -> StoreResult<()> {
        leases::register(&**self.client().await?, pairs).await
    }

    async fn claim(
        &self,
        owner: &str,
        among: &[PairKey],
        now: DateTime<Utc>,
        lease_for: Duration,
        limit: usize,
        busy_servers: &[String],
    ) -> StoreResult<Vec<Claim>> {
        if among.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        leases::claim(&**self.client().await?, owner, among, now, lease_for, limit, busy_servers).await
    }

    async fn next_due(&self, among: &[PairKey], now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>> {
        if among.is_empty() {
            return Ok(None);
        }
        leases::next_due(&**self.client().await?, among, now).await
    }

    async fn start_run(&self, lease: &Lease, started: DateTime<Utc>) -> StoreResult<RunId> {
        history::start_run(&**self.client().await?, lease, started).await
    }

    async fn renew(&self, lease: &Lease, now: DateTime<Utc>, lease_for: Duration) -> StoreResult<bool> {
        leases::renew(&**self.client().await?, lease, now, lease_for).await
    }

    async fn progress(&self, run: RunId, tables: &[TableProgress], now: DateTime<Utc>) -> StoreResult<()> {
        let mut client = self.client().await?;
        history::progress(&mut client, run, tables, now).await
    }

    async fn finish(
        &self,
        lease: &Lease,
        run: Option<RunId>,
        record: &RunRecord,
        next_due: DateTime<Utc>,
        failures: u32,
    ) -> StoreResult<bool> {
        let mut client = self.client().await?;
        history::finish(&mut client, lease, run, record, next_due, failures).await
    }

    async fn release(&self, lease: &Lease, next_due: DateTime<Utc>) -> StoreResult<()> {
        leases::release(&**self.client().await?, lease, next_due).await
    }

    async fn maintenance(&self, tenant: &TenantId) -> StoreResult<Option<String>> {
        ops::maintenance(&**self.client().await?, tenant).await
    }

    async fn pending_resyncs(&self, pair: &PairKey) -> StoreResult<Vec<ResyncRequest>> {
        ops::pending_resyncs(&**self.client().await?, pair).await
    }

    async fn resync_done(&self, ids: &[i64], now: DateTime<Utc>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        ops::resync_done(&**self.client().await?, ids, now).await
    }

    async fn narrow_resync(&self, id: i64, tables: &[String], now: DateTime<Utc>) -> StoreResult<()> {
        ops::narrow_resync(&mut **self.client().await?, id, tables, now).await
    }

    async fn prune(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        history::prune(&**self.client().await?, before).await
    }
}

//! The schedule store in one process's memory.
//!
//! Same rules as the control database (due, leases with fencing tokens,
//! history), for tests on tokio's paused clock and for checking the
//! scheduler's decisions without I/O. Not for production: nothing survives
//! the process and nothing is shared.

use super::store::*;
use crate::ids::TenantId;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct MemoryPair {
    pub server: String,
    pub next_due: DateTime<Utc>,
    pub lease: Option<(String, DateTime<Utc>)>,
    pub token: i64,
    pub failures: u32,
    pub last_outcome: Option<Outcome>,
    pub current_run: Option<RunId>,
}

/// A run as the memory store keeps it.
#[derive(Debug, Clone)]
pub struct MemoryRun {
    pub id: RunId,
    pub key: PairKey,
    pub owner: String,
    pub started: DateTime<Utc>,
    pub record: Option<RunRecord>,
    pub progress: Vec<TableProgress>,
}

#[derive(Debug, Default)]
struct State {
    pairs: BTreeMap<PairKey, MemoryPair>,
    runs: Vec<MemoryRun>,
    maintenance: HashMap<TenantId, String>,
    resyncs: Vec<(PairKey, ResyncRequest, Option<DateTime<Utc>>)>,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).expect("duration fits")
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every run so far, oldest first.
    pub fn runs(&self) -> Vec<MemoryRun> {
        self.state.lock().unwrap().runs.clone()
    }

    pub fn pair(&self, key: &PairKey) -> Option<MemoryPair> {
        self.state.lock().unwrap().pairs.get(key).cloned()
    }

    pub fn set_maintenance(&self, tenant: &TenantId, reason: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        match reason {
            Some(r) => s.maintenance.insert(tenant.clone(), r.to_owned()),
            None => s.maintenance.remove(tenant),
        };
    }

    pub fn request_resync(&self, key: &PairKey, table: Option<&str>, now: DateTime<Utc>) -> i64 {
        let mut s = self.state.lock().unwrap();
        let id = s.resyncs.len() as i64 + 1;
        let req = ResyncRequest { id, table: table.map(str::to_owned), requested_at: now };
        s.resyncs.push((key.clone(), req, None));
        id
    }

    fn holds(pair: &MemoryPair, lease: &Lease) -> bool {
        pair.token == lease.token && pair.lease.as_ref().is_some_and(|(o, _)| o == &lease.owner)
    }
}

impl PairStore for MemoryStore {
    async fn register(&self, pairs: &[PairRegistration]) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        for p in pairs {
            s.pairs
                .entry(p.key.clone())
                .and_modify(|e| e.server = p.server.clone())
                .or_insert_with(|| MemoryPair {
                    server: p.server.clone(),
                    next_due: p.first_due,
                    lease: None,
                    token: 0,
                    failures: 0,
                    last_outcome: None,
                    current_run: None,
                });
        }
        Ok(())
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
        let mut s = self.state.lock().unwrap();
        let mut due: Vec<(DateTime<Utc>, PairKey)> = among
            .iter()
            .filter_map(|k| s.pairs.get(k).map(|p| (k, p)))
            .filter(|(_, p)| p.next_due <= now)
            .filter(|(_, p)| p.lease.as_ref().is_none_or(|(_, exp)| *exp <= now))
            .filter(|(_, p)| !busy_servers.contains(&p.server))
            .map(|(k, p)| (p.next_due, k.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        let mut claims = Vec::new();
        for (when, key) in due {
            let lost_run = {
                let p = s.pairs.get_mut(&key).expect("pair exists");
                p.token += 1;
                p.lease = Some((owner.to_owned(), now + chrono(lease_for)));
                claims.push(Claim {
                    lease: Lease { key: key.clone(), owner: owner.to_owned(), token: p.token },
                    server: p.server.clone(),
                    due: when,
                    failures: p.failures,
                });
                p.current_run.take()
            };
            if let Some(id) = lost_run {
                if let Some(run) = s.runs.iter_mut().find(|r| r.id == id && r.record.is_none()) {
                    run.record = Some(RunRecord {
                        started: run.started,
                        ended: now,
                        outcome: Outcome::Failed,
                        error_kind: Some("lease_lost".into()),
                        error_message: Some(format!("agent process {} stopped renewing its lease", run.owner)),
                        source_version: None,
                        tables: Vec::new(),
                    });
                }
            }
        }
        Ok(claims)
    }

    async fn next_due(&self, among: &[PairKey], now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>> {
        let s = self.state.lock().unwrap();
        Ok(among
            .iter()
            .filter_map(|k| s.pairs.get(k))
            .map(|p| match &p.lease {
                Some((_, expires)) if *expires > now => p.next_due.max(*expires),
                _ => p.next_due,
            })
            .min())
    }

    async fn start_run(&self, lease: &Lease, started: DateTime<Utc>) -> StoreResult<RunId> {
        let mut s = self.state.lock().unwrap();
        let id = RunId(s.runs.len() as i64 + 1);
        s.runs.push(MemoryRun {
            id,
            key: lease.key.clone(),
            owner: lease.owner.clone(),
            started,
            record: None,
            progress: Vec::new(),
        });
        if let Some(p) = s.pairs.get_mut(&lease.key).filter(|p| Self::holds(p, lease)) {
            p.current_run = Some(id);
        }
        Ok(id)
    }

    async fn renew(&self, lease: &Lease, now: DateTime<Utc>, lease_for: Duration) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        match s.pairs.get_mut(&lease.key).filter(|p| Self::holds(p, lease)) {
            Some(p) => {
                p.lease = Some((lease.owner.clone(), now + chrono(lease_for)));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn progress(&self, run: RunId, tables: &[TableProgress], _now: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(r) = s.runs.iter_mut().find(|r| r.id == run) {
            r.progress = tables.to_vec();
        }
        Ok(())
    }

    async fn finish(
        &self,
        lease: &Lease,
        run: Option<RunId>,
        record: &RunRecord,
        next_due: DateTime<Utc>,
        failures: u32,
    ) -> StoreResult<bool> {
        let mut s = self.state.lock().unwrap();
        if let Some(id) = run {
            if let Some(r) = s.runs.iter_mut().find(|r| r.id == id) {
                r.record = Some(record.clone());
                r.progress.clear();
            }
        }
        match s.pairs.get_mut(&lease.key).filter(|p| Self::holds(p, lease)) {
            Some(p) => {
                p.next_due = next_due;
                p.failures = failures;
                p.last_outcome = Some(record.outcome);
                p.lease = None;
                p.current_run = None;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease, next_due: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        if let Some(p) = s.pairs.get_mut(&lease.key).filter(|p| Self::holds(p, lease)) {
            p.lease = None;
            p.next_due = next_due;
        }
        Ok(())
    }

    async fn maintenance(&self, tenant: &TenantId) -> StoreResult<Option<String>> {
        Ok(self.state.lock().unwrap().maintenance.get(tenant).cloned())
    }

    async fn pending_resyncs(&self, pair: &PairKey) -> StoreResult<Vec<ResyncRequest>> {
        let s = self.state.lock().unwrap();
        Ok(s.resyncs.iter().filter(|(k, _, done)| k == pair && done.is_none()).map(|(_, r, _)| r.clone()).collect())
    }

    async fn resync_done(&self, ids: &[i64], now: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        for (_, r, done) in s.resyncs.iter_mut() {
            if ids.contains(&r.id) {
                *done = Some(now);
            }
        }
        Ok(())
    }

    async fn narrow_resync(&self, id: i64, tables: &[String], now: DateTime<Utc>) -> StoreResult<()> {
        let mut s = self.state.lock().unwrap();
        let Some(i) = s.resyncs.iter().position(|(_, r, done)| r.id == id && done.is_none()) else {
            return Ok(());
        };
        s.resyncs[i].2 = Some(now);
        let (key, requested_at) = (s.resyncs[i].0.clone(), s.resyncs[i].1.requested_at);
        for t in tables {
            let id = s.resyncs.len() as i64 + 1;
            s.resyncs.push((key.clone(), ResyncRequest { id, table: Some(t.clone()), requested_at }, None));
        }
        Ok(())
    }

    async fn prune(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut s = self.state.lock().unwrap();
        let n = s.runs.len();
        s.runs.retain(|r| r.started >= before || r.record.is_none());
        Ok((n - s.runs.len()) as u64)
    }
}

//! The service's production parts: cycles run from the agent configuration
//! (with the shared rate limits), and the settings read from it.

use super::cycle::CycleControl;
use super::error::AgentError;
use super::limits::{PartnerLimits, RateLimit};
use super::report::CycleReport;
use super::service::{mode_name, CycleRunner, RunResult, ServiceSettings};
use crate::config::AgentConfig;
use crate::ids::AppId;
use crate::schedule::{Backoff, Cadence, Outcome, PairKey, RunRecord, TableRun};
use std::collections::HashMap;
use std::time::Duration;

/// Runs cycles as configured. Rate limiters are built once and shared by
/// every cycle of this process: one per partner, one per source server.
pub struct ConfiguredRunner {
    cfg: AgentConfig,
    partners: HashMap<AppId, PartnerLimits>,
    servers: HashMap<String, Option<RateLimit>>,
    pair_servers: HashMap<PairKey, String>,
}

impl ConfiguredRunner {
    /// Fails when a tenant's connection string cannot be parsed (or its
    /// `env:` variable is unset), or a partner's CA file cannot be used:
    /// better at start than at 3 a.m.
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let mut pair_servers = HashMap::new();
        let mut servers = HashMap::new();
        let mut tenant_servers = HashMap::new();
        for t in &cfg.tenants {
            let url = t.url.resolve().map_err(|e| {
                AgentError::new(super::AgentErrorKind::Config, format!("tenant {}: {e}", t.id))
            })?;
            let server = crate::source::server_address(t.source, &url)
                .map_err(|e| AgentError::new(super::AgentErrorKind::Config, format!("tenant {}: {e}", t.id)))?;
            servers
                .entry(server.clone())
                .or_insert_with(|| RateLimit::per_second(cfg.limits.source_rows_per_sec));
            tenant_servers.insert(t.id.clone(), server);
        }
        for pair in cfg.pairs() {
            pair_servers.insert(pair.clone(), tenant_servers[&pair.tenant].clone());
        }
        for a in &cfg.applications {
            super::TlsTrust::for_application(a).check().map_err(|e| {
                AgentError::new(super::AgentErrorKind::Config, format!("application {}: {e}", a.id))
            })?;
        }
        let partners = cfg
            .applications
            .iter()
            .map(|a| {
                let limits = PartnerLimits {
                    requests: RateLimit::per_second(a.requests_per_sec),
                    bytes: RateLimit::per_second(a.bytes_per_sec),
                };
                (a.id.clone(), limits)
            })
            .collect();
        Ok(Self { cfg, partners, servers, pair_servers })
    }

    /// Every configured pair with its source server.
    pub fn pairs(&self) -> Vec<(PairKey, String)> {
        let mut pairs: Vec<_> = self.pair_servers.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        pairs.sort();
        pairs
    }
}

impl CycleRunner for ConfiguredRunner {
    async fn run(&self, pair: &PairKey, mut control: CycleControl) -> RunResult {
        control.source_rows = self.pair_servers.get(pair).and_then(|s| self.servers.get(s).cloned().flatten());
        let limits = self.partners.get(&pair.app).cloned().unwrap_or_default();
        let result = super::sync_pair(&self.cfg, &pair.tenant, &pair.app, &control, limits).await;
        run_result(result)
    }

    fn maintenance(&self, pair: &PairKey) -> Option<String> {
        self.cfg
            .tenant(&pair.tenant)
            .filter(|t| t.maintenance)
            .map(|_| "maintenance = true in the agent configuration".to_owned())
    }
}

/// A cycle's report (or the error that stopped it) as a history record.
/// Start and end times are the scheduler's to fill in.
pub fn run_result(result: Result<CycleReport, AgentError>) -> RunResult {
    let now = chrono::Utc::now();
    match result {
        Err(e) => RunResult {
            record: RunRecord {
                started: now,
                ended: now,
                outcome: if e.kind == super::AgentErrorKind::Interrupted { Outcome::Interrupted } else { Outcome::Failed },
                error_kind: Some(e.kind.as_str().to_owned()),
                error_message: Some(e.message.clone()),
                source_version: None,
                tables: Vec::new(),
            },
            retry_after: e.retry_after,
        },
        Ok(report) => {
            let tables = report
                .tables
                .iter()
                .map(|t| TableRun {
                    table: t.table.clone(),
                    mode: mode_name(t),
                    rows: t.rows_sent,
                    bytes: t.bytes_sent,
                    batches: t.batches,
                    from_cursor: t.start_cursor.clone(),
                    to_cursor: t.cursor.clone(),
                    duration: t.duration,
                    error_kind: t.error.as_ref().map(|e| e.kind.as_str().to_owned()),
                    error_message: t.error.as_ref().map(|e| e.message.clone()),
                    reloaded: t.reloaded,
                    reload_reason: t.reload_reason.clone(),
                })
                .collect();
            let (outcome, error_message) = if let Some(reason) = &report.paused {
                (Outcome::Paused, Some(format!("partner asked not to replicate: {reason}")))
            } else if report.interrupted() {
                (Outcome::Interrupted, None)
            } else if report.succeeded() {
                (Outcome::Succeeded, None)
            } else if let Some(e) = &report.completion_error {
                (Outcome::Failed, Some(format!("ReplicationCompleted failed: {e}")))
            } else {
                let failed = report.tables.iter().filter(|t| t.error.is_some()).count();
                (Outcome::Failed, Some(format!("{failed} of {} tables failed", report.tables.len())))
            };
            // A full load catches up to a version read after its scan, which
            // can be later than the cycle's upper bound: the source was at
            // least at the newest cursor.
            let newest_cursor = report.tables.iter().filter_map(|t| t.cursor.as_ref()).map(|c| c.version().0).max();
            let record = RunRecord {
                started: now,
                ended: now,
                outcome,
                // Only a cycle-level error has a kind; table errors are per table.
                error_kind: None,
                error_message,
                source_version: report.source_version.map(|v| v.0).max(newest_cursor),
                tables,
            };
            RunResult { record, retry_after: None }
        }
    }
}

/// The scheduler's settings from the `[agent.schedule]` section.
pub fn service_settings(cfg: &AgentConfig, owner: String) -> Result<ServiceSettings, String> {
    let s = &cfg.schedule;
    Ok(ServiceSettings {
        owner,
        cadence: Cadence { interval: Duration::from_secs(s.interval_secs), blackout: s.blackout.window()? },
        backoff: Backoff { base: Duration::from_secs(s.backoff_base_secs), max: Duration::from_secs(s.backoff_max_secs) },
        definite_retry: Duration::from_secs(s.definite_failure_retry_secs),
        max_cycles: s.max_cycles,
        max_per_server: s.max_cycles_per_server,
        lease_for: Duration::from_secs(s.lease_secs),
        poll: Duration::from_secs(s.poll_secs),
        history_keep: Duration::from_secs(u64::from(s.history_days) * 86_400),
        shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
        progress_every: Duration::from_secs(1),
    })
}

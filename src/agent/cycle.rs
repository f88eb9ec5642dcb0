//! One mirroring cycle for one tenant and application.
//!
//! Authenticate, make sure every mapped table is tracked and send all their
//! schemas in one call, then bring each table up to the version captured at
//! the start, and finally report ReplicationCompleted. A failing table is
//! reported and the others go on.

use super::client::PartnerClient;
use super::error::{AgentError, AgentErrorKind};
use super::limits::RateLimit;
use super::stop::StopSignal;
use super::report::{CycleReport, TableOutcome};
use super::table_sync::{TablePlan, TableSync};
use crate::protocol::{
    AdvanceRequest, CompletedRequest, Cursor, TableSchema, TableSchemaRequest, TableState, TableStatus, Version,
};
use crate::schema_map::SchemaMap;
use crate::source::{source_part, table_identity, ChunkLimits, Source, SourceSchema, SourceTable, TableSurvey};
use std::time::Instant;
use tracing::{info, warn};

/// A transaction older than this on the source server is logged as a
/// warning (it is always in the report): every mirror of the server lags
/// behind it.
const OLD_TRANSACTION_SECS: f64 = 600.0;

#[derive(Debug, Clone, Copy)]
pub struct CycleSettings {
    pub limits: ChunkLimits,
}

/// Which tables an operator asked to reload from scratch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Reload {
    #[default]
    Nothing,
    All,
    Tables(std::collections::BTreeSet<String>),
}

impl Reload {
    pub fn covers(&self, table: &str) -> bool {
        match self {
            Reload::Nothing => false,
            Reload::All => true,
            Reload::Tables(t) => t.contains(table),
        }
    }
}

/// Live progress of one table, reported after every batch.
pub type ProgressFn = std::sync::Arc<dyn Fn(&TableOutcome) + Send + Sync>;

/// How the scheduler steers a cycle from outside: stop at the next batch
/// boundary, tables to reload, where progress goes, the source server's
/// row rate. The default steers nothing (what `ctmirror sync` uses).
#[derive(Clone, Default)]
pub struct CycleControl {
    pub stop: StopSignal,
    pub reload: Reload,
    pub progress: Option<ProgressFn>,
    pub source_rows: Option<RateLimit>,
}

struct Prepared {
    source: SourceSchema,
    mirror: TableSchema,
    newly_enabled: bool,
    /// The identity the receiver stores with this table's rows: the
    /// source's, plus the table's tracking generation.
    identity: String,
    /// Why the table's tracking was last reinstalled, if it was.
    reinstalled_because: Option<String>,
}

/// Runs one cycle. Errors that stop the whole cycle (authentication, the
/// schema call) are returned; per-table failures are in the report.
pub async fn run_cycle<S: Source>(
    source: &mut S,
    client: &PartnerClient,
    map: &SchemaMap,
    tenant: &str,
    settings: CycleSettings,
) -> Result<CycleReport, AgentError> {
    run_controlled_cycle(source, client, map, tenant, settings, &CycleControl::default()).await
}

/// [`run_cycle`] steered by the scheduler.
pub async fn run_controlled_cycle<S: Source>(
    source: &mut S,
    client: &PartnerClient,
    map: &SchemaMap,
    tenant: &str,
    settings: CycleSettings,
    control: &CycleControl,
) -> Result<CycleReport, AgentError> {
    let started = Instant::now();
    let mut report = CycleReport {
        tenant: tenant.to_owned(),
        application: map.application.to_string(),
        paused: None,
        tables: Vec::new(),
        dropped: Vec::new(),
        completion_error: None,
        duration: Default::default(),
        source_version: None,
        restore: None,
        oldest_transaction: None,
    };

    let auth = client.authenticate().await?;
    if !auth.replicate {
        let reason = auth.reason.unwrap_or_else(|| "no reason given".into());
        info!(%reason, "receiver asked not to replicate; cycle skipped");
        report.paused = Some(reason);
        report.duration = started.elapsed();
        return Ok(report);
    }

    source.maintain().await?;
    let identity = source.identity().await?;
    let mapped: Vec<SourceTable> =
        map.tables.iter().map(|t| SourceTable { schema: t.schema.clone(), name: t.table.clone() }).collect();
    match source.oldest_transaction().await {
        Ok(Some(t)) => {
            if t.age_secs >= OLD_TRANSACTION_SECS {
                warn!(oldest = %t, "a long transaction holds back every mirror of this source server");
            }
            report.oldest_transaction = Some(t);
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "looking for the oldest running transaction failed"),
    }

    let mut prepared = Vec::new();
    let mut skipped = Vec::new();
    for (t, table) in map.tables.iter().zip(&mapped) {
        match prepare(source, table, &t.columns, t.mirror_name(), &identity).await {
            Ok(p) => prepared.push(p),
            Err(e) => {
                warn!(table = t.mirror_name(), error = %e, "table cannot be read this cycle");
                skipped.push(t.mirror_name().to_owned());
                report.tables.push(TableOutcome::failed(t.mirror_name(), e));
            }
        }
    }

    // Every mapped table counts as read, also one that failed this cycle:
    // only tables the map no longer names lose their tracking. After the
    // tables were enabled, so that new ones are recorded at once.
    if let Err(e) = source.record_readers(map.application.as_str(), &mapped).await {
        warn!(error = %e, "recording which tables this application reads failed; tracking stays as it is");
    }

    let request = TableSchemaRequest {
        source_identity: identity.clone(),
        tables: prepared.iter().map(|p| p.mirror.clone()).collect(),
        skipped,
        table_identities: prepared
            .iter()
            .filter(|p| p.identity != identity)
            .map(|p| (p.mirror.name.clone(), p.identity.clone()))
            .collect(),
    };
    let answer = client.send_schema(&request).await?;
    report.dropped = answer.dropped.clone();
    if !answer.dropped.is_empty() {
        info!(tables = ?answer.dropped, "receiver dropped tables the map no longer names");
    }

    // Changes are read up to this version for every table, so one cycle
    // gives a mirror consistent with one moment of the source.
    let upper = source.current_version().await?;
    report.source_version = Some(upper);
    info!(%upper, tables = prepared.len(), "syncing");
    let restore = Restore::detect(&identity, upper, &answer.tables);
    if let Some(r) = &restore {
        warn!(reason = %r.reason, "the source was restored or replaced; the tenant's mirror is rebuilt");
        report.restore = Some(r.reason.clone());
    }

    // Min valid versions, and which tables have changes at all, in one
    // round where the source can; a failed survey only costs speed.
    let surveyed: Vec<(SourceTable, Option<Version>)> = prepared
        .iter()
        .map(|p| {
            let at = answer.tables.iter().find(|s| s.name == p.mirror.name).and_then(|s| match &s.cursor {
                Some(Cursor::Changes { version, after_key: None }) => Some(*version),
                _ => None,
            });
            (p.source.table.clone(), at)
        })
        .collect();
    let surveys = match source.survey(&surveyed, upper).await {
        Ok(s) if s.len() == prepared.len() => s,
        Ok(_) => vec![TableSurvey::UNKNOWN; prepared.len()],
        Err(e) => {
            warn!(error = %e, "surveying the tables failed; each table asks on its own");
            vec![TableSurvey::UNKNOWN; prepared.len()]
        }
    };

    for (p, survey) in prepared.iter().zip(surveys) {
        if let Some(reason) = control.stop.reason() {
            report.tables.push(TableOutcome::failed(
                &p.mirror.name,
                AgentError::new(AgentErrorKind::Interrupted, format!("not started: {}", reason.describe())),
            ));
            continue;
        }
        let Some(state) = answer.tables.iter().find(|s| s.name == p.mirror.name) else {
            report.tables.push(TableOutcome::failed(
                &p.mirror.name,
                AgentError::new(AgentErrorKind::Fatal, "receiver's schema answer omits the table"),
            ));
            continue;
        };
        if state.status == TableStatus::Refused {
            let msg = state.message.clone().unwrap_or_else(|| "schema refused".into());
            report.tables.push(TableOutcome::failed(
                &p.mirror.name,
                AgentError::new(AgentErrorKind::Refused, format!("receiver refused the schema: {msg}")),
            ));
            continue;
        }
        let plan = TablePlan {
            schema: &p.source,
            mirror: &p.mirror,
            schema_hash: state.schema_hash.clone(),
            status: state.status,
            cursor: state.cursor.clone(),
            newly_enabled: p.newly_enabled,
            message: state.message.clone(),
            identity: &p.identity,
            reload: match &restore {
                Some(r) if r.covers(state) => Some(format!("source restored: {}", r.reason)),
                _ if control.reload.covers(&p.mirror.name) => Some("reload requested by an operator".into()),
                _ => another_lifetime(state, &p.identity, p.reinstalled_because.as_deref()),
            },
            survey,
        };
        let outcome = TableSync::new(source, client, plan, settings.limits, control).run(upper).await;
        report.tables.push(outcome);
    }

    advance_idle_tables(client, &mut report.tables, control).await;

    if report.interrupted() {
        // The cycle is not complete: completion hooks would run on a mirror
        // that is only partly caught up. The next cycle completes it.
        info!("cycle interrupted at a batch boundary; ReplicationCompleted not sent");
        report.duration = started.elapsed();
        return Ok(report);
    }

    let completed = CompletedRequest { tables: report.tables.iter().map(TableOutcome::to_report).collect() };
    match client.completed(&completed).await {
        Ok(resp) => {
            for h in resp.hooks {
                info!(hook = %h, "receiver completion hook");
            }
        }
        Err(e) => {
            warn!(error = %e, "ReplicationCompleted failed; the data sent is committed");
            report.completion_error = Some(e);
        }
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Sends the cursor moves of every table that had nothing (more) to send in
/// one call. A failure leaves those cursors where they were, which costs
/// nothing but a longer way next cycle: it is logged, not a table failure.
async fn advance_idle_tables(client: &PartnerClient, tables: &mut [TableOutcome], control: &CycleControl) {
    let moves: Vec<_> = tables.iter_mut().filter_map(|t| t.pending_advance.take()).collect();
    if moves.is_empty() {
        return;
    }
    match client.advance(&AdvanceRequest { tables: moves }).await {
        Ok(answer) => {
            for a in answer.tables {
                let Some(t) = tables.iter_mut().find(|t| t.table == a.table) else { continue };
                if let Some(e) = &a.error {
                    warn!(table = %a.table, kind = %e.kind, error = %e.message, "receiver did not move the cursor");
                }
                t.cursor = a.cursor;
                if let Some(progress) = &control.progress {
                    progress(t);
                }
            }
        }
        Err(e) => warn!(error = %e, "moving idle tables' cursors failed; they move next cycle"),
    }
}

/// A source that was restored from a backup or replaced: its history is no
/// longer the one the mirror followed, so the tenant's mirror is rebuilt.
#[derive(Debug, Clone, PartialEq)]
pub struct Restore {
    /// How it was detected, for the log and the run history.
    pub reason: String,
    /// Some mirror table is ahead of the source. Version numbers may then
    /// be reused by the restored history, so no table's cursor can be
    /// trusted, not just the ones that are ahead.
    regressed: bool,
    /// The source's identity now.
    identity: String,
}

impl Restore {
    /// Compares what the receiver holds with the source now: a table whose
    /// rows came from another source identity, or a cursor past the
    /// source's current version.
    pub fn detect(identity: &str, upper: Version, tables: &[TableState]) -> Option<Restore> {
        let mut held = tables.iter().filter(|t| t.cursor.is_some());
        if let Some(t) = held.clone().find(|t| t.cursor.as_ref().is_some_and(|c| c.version() > upper)) {
            let v = t.cursor.as_ref().map(|c| c.version()).unwrap_or(upper);
            return Some(Restore {
                reason: format!(
                    "the mirror of {} is at version {v}, newer than the source's current version {upper}: the \
                     source went back in time (restored from an older backup)",
                    t.name
                ),
                regressed: true,
                identity: identity.to_owned(),
            });
        }
        let t = held.find(|t| t.source_identity.as_deref().is_some_and(|i| source_part(i) != identity))?;
        Some(Restore {
            reason: format!(
                "the source identity changed from {} to {identity} (the database was restored or replaced)",
                t.source_identity.as_deref().map(source_part).unwrap_or("")
            ),
            regressed: false,
            identity: identity.to_owned(),
        })
    }

    /// Whether this table must be reloaded. A table already reloading from
    /// the current source (its identity was updated when the reload began)
    /// goes on; after a version regression every table holding rows goes.
    pub fn covers(&self, table: &TableState) -> bool {
        table.cursor.is_some()
            && (self.regressed || table.source_identity.as_deref().map(source_part) != Some(&*self.identity))
    }
}

/// Why a table's rows must reload although the source is the same: they
/// came from another tracking lifetime of the table (it was dropped and
/// recreated, or its tracking was repaired or reinstalled, possibly by
/// another application's cycle or by a cycle that failed before the
/// table's turn). Only the receiver's record tells, so every application
/// and every later cycle sees it until the reload starts.
fn another_lifetime(table: &TableState, identity: &str, because: Option<&str>) -> Option<String> {
    let held = table.source_identity.as_deref()?;
    (table.cursor.is_some() && held != identity).then(|| {
        format!(
            "change tracking of the table was reinstalled{} (lifetime {}, the mirror's rows came from {})",
            because.map(|b| format!(": {b}")).unwrap_or_default(),
            identity.split_once('/').map_or("none", |(_, g)| g),
            held.split_once('/').map_or("an earlier version of ctmirror", |(_, g)| g),
        )
    })
}

async fn prepare<S: Source>(
    source: &mut S,
    table: &SourceTable,
    columns: &[String],
    mirror_name: &str,
    source_identity: &str,
) -> Result<Prepared, AgentError> {
    let tracking = source.ensure_tracking(table).await?;
    if tracking.newly_enabled {
        info!(table = %table, "change tracking enabled");
    }
    let schema = source.read_schema(table, columns).await?;
    let mirror = schema.to_protocol(mirror_name);
    mirror
        .validate()
        .map_err(|e| AgentError::new(AgentErrorKind::Config, e))?;
    let identity = table_identity(source_identity, tracking.generation.as_deref());
    Ok(Prepared {
        source: schema,
        mirror,
        newly_enabled: tracking.newly_enabled,
        identity,
        reinstalled_because: tracking.installed_because,
    })
}

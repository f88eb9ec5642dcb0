//! Bringing one table's mirror up to date: the per-table state machine.
//!
//! The receiver's cursor decides everything: no cursor means a full load,
//! a snapshot cursor resumes one, a changes cursor continues incrementally.
//! After every batch the agent continues from the cursor the receiver
//! answered, never from the one it hoped for.

use super::client::{BatchOutcome, PartnerClient};
use super::cycle::CycleControl;
use super::limits::RateLimit;
use super::error::{AgentError, AgentErrorKind};
use super::report::TableOutcome;
use crate::protocol::{Cursor, RowBatch, RowChange, SyncMode, TableSchema, TableStatus, Version};
use crate::source::{ChangePosition, ChunkLimits, RowOp, Source, SourceSchema};
use std::time::Instant;
use tracing::{info, info_span, Instrument};

/// A receiver that keeps answering with cursors the agent did not expect is
/// not making progress with us; give up on the table for this cycle.
const MAX_CONFLICTS: u32 = 3;

/// Everything known about one table at the start of its turn.
pub struct TablePlan<'a> {
    pub schema: &'a SourceSchema,
    pub mirror: &'a TableSchema,
    pub schema_hash: String,
    pub status: TableStatus,
    pub cursor: Option<Cursor>,
    /// Tracking was just turned on: the receiver's cursor (if any) belongs
    /// to an earlier tracking lifetime and cannot be trusted.
    pub newly_enabled: bool,
    /// What the receiver said about the table (why it is rebuilding, what
    /// it altered).
    pub message: Option<String>,
    /// The source's identity, stored with the table when a reload starts.
    pub identity: &'a str,
    /// The cycle decided this table must be reloaded (an operator's
    /// request, a restored source), and why.
    pub reload: Option<String>,
}

pub struct TableSync<'a, S: Source> {
    source: &'a mut S,
    client: &'a PartnerClient,
    plan: TablePlan<'a>,
    limits: ChunkLimits,
    control: &'a CycleControl,
    outcome: TableOutcome,
    conflicts: u32,
    /// A reload was started in this turn; a second need for one fails the
    /// table instead of looping.
    restarted: bool,
}

impl<'a, S: Source> TableSync<'a, S> {
    pub fn new(
        source: &'a mut S,
        client: &'a PartnerClient,
        plan: TablePlan<'a>,
        limits: ChunkLimits,
        control: &'a CycleControl,
    ) -> Self {
        let mut outcome = TableOutcome::new(&plan.mirror.name);
        outcome.start_cursor = plan.cursor.clone();
        Self { source, client, plan, limits, control, outcome, conflicts: 0, restarted: false }
    }

    /// Runs the table to the cycle's `upper` version. Never fails: errors end
    /// up in the outcome so the other tables go on.
    pub async fn run(mut self, upper: Version) -> TableOutcome {
        let started = Instant::now();
        let span = info_span!("table", table = %self.plan.mirror.name);
        let result = async { self.drive(upper).await }.instrument(span.clone()).await;
        self.outcome.duration = started.elapsed();
        self.outcome.cursor = self.plan.cursor.clone();
        let _enter = span.enter();
        match result {
            Ok(()) => info!(
                mode = ?self.outcome.mode,
                rows = self.outcome.rows_sent,
                batches = self.outcome.batches,
                inserted = self.outcome.counts.inserted,
                updated = self.outcome.counts.updated,
                deleted = self.outcome.counts.deleted,
                cursor = %self.plan.cursor.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                ms = self.outcome.duration.as_millis() as u64,
                "table done"
            ),
            Err(e) if e.kind == AgentErrorKind::Interrupted => {
                info!(reason = %e, rows = self.outcome.rows_sent, "table stopped at a batch boundary");
                self.outcome.mode = SyncMode::Failed;
                self.outcome.error = Some(e);
            }
            Err(e) => {
                tracing::error!(error = %e, kind = ?e.kind, "table failed");
                self.outcome.mode = SyncMode::Failed;
                self.outcome.error = Some(e);
            }
        }
        self.outcome
    }

    async fn drive(&mut self, upper: Version) -> Result<(), AgentError> {
        if self.plan.status == TableStatus::Refused {
            return Err(AgentError::new(AgentErrorKind::Refused, "receiver refused the table's schema"));
        }
        loop {
            let before = self.conflicts;
            let result = self.drive_once(upper).await;
            match result {
                Err(e) if self.conflicts > before && self.conflicts < MAX_CONFLICTS => {
                    tracing::warn!(error = %e, "receiver holds another cursor; continuing from it");
                }
                // The receiver's table drifted from its bookkeeping, or the
                // source lost the changes mid-read: a reload cures both.
                Err(e) if e.kind == AgentErrorKind::NeedsReload && !self.restarted => {
                    tracing::warn!(error = %e, "the table needs a reload; starting one");
                    self.start_reload(e.message).await?;
                }
                other => return other,
            }
        }
    }

    async fn drive_once(&mut self, upper: Version) -> Result<(), AgentError> {
        let table = self.plan.schema.table.to_string();
        let requested = self.plan.reload.take();
        let newly_enabled = std::mem::take(&mut self.plan.newly_enabled);
        if self.plan.cursor.is_some() {
            let why = requested.or_else(|| {
                newly_enabled.then(|| "change tracking was just enabled; earlier cursors cannot be trusted".to_owned())
            });
            if let Some(reason) = why {
                self.start_reload(reason).await?;
            }
        } else if let Some(reason) = requested {
            // Nothing held: the full load below is the reload asked for.
            self.outcome.reloaded_because(reason);
        }
        let min_valid = self.source.min_valid_version(&self.plan.schema.table).await?;
        match self.plan.cursor.clone() {
            None => {
                // The receiver holds nothing for the table (new, recreated,
                // or a reload just began): a fresh full load.
                if self.plan.status == TableStatus::Rebuilding && !self.outcome.reloaded {
                    let reason = self.plan.message.clone().unwrap_or_else(|| "receiver is rebuilding the table".into());
                    info!(%reason, "receiver started a rebuild");
                    self.outcome.reloaded_because(format!("receiver: {reason}"));
                }
                self.full_load(None).await
            }
            Some(Cursor::Snapshot { version, after_key }) => {
                if version < min_valid {
                    self.start_reload(format!(
                        "the interrupted full load of {table} stood at version {version}, older than the \
                         source's oldest retained change (version {min_valid})"
                    ))
                    .await?;
                    return self.full_load(None).await;
                }
                info!(%version, "resuming an interrupted full load");
                self.full_load(Some((version, after_key))).await
            }
            Some(Cursor::Changes { version, .. }) => {
                if version < min_valid {
                    self.start_reload(format!(
                        "retention expired: the mirror of {table} is at version {version}, older than the \
                         source's oldest retained change (version {min_valid})"
                    ))
                    .await?;
                    return self.full_load(None).await;
                }
                self.outcome.mode = SyncMode::Incremental;
                self.changes(upper).await?;
                if self.outcome.rows_sent == 0 {
                    self.outcome.mode = SyncMode::Idle;
                }
                Ok(())
            }
        }
    }

    /// Asks the receiver to restart the table into a shadow table; the live
    /// table stays readable until the new load completes.
    async fn start_reload(&mut self, reason: String) -> Result<(), AgentError> {
        self.check_stop()?;
        info!(%reason, "reloading the table");
        self.client.reload(&self.plan.mirror.name, &reason, self.plan.identity).await?;
        self.plan.cursor = None;
        self.restarted = true;
        self.outcome.reloaded_because(reason);
        Ok(())
    }

    /// A keyset scan in primary-key order as of version `S`, then the changes
    /// made since `S`. `resume` continues an interrupted load from the
    /// receiver's snapshot cursor instead of starting over.
    async fn full_load(&mut self, resume: Option<(Version, Option<crate::protocol::Key>)>) -> Result<(), AgentError> {
        self.outcome.mode = SyncMode::Full;
        let (snapshot_version, mut after) = match resume {
            Some(r) => r,
            // The receiver holds no cursor, so its target table is empty.
            None => (self.source.current_version().await?, None),
        };
        info!(version = %snapshot_version, "full load");
        loop {
            self.check_stop()?;
            let rows = self.source.snapshot_chunk(self.plan.schema, after.as_ref(), self.limits).await?;
            Self::pace(self.control.source_rows.clone(), rows.len()).await;
            let Some(last) = rows.last() else { break };
            let to = Cursor::Snapshot { version: snapshot_version, after_key: Some(self.plan.schema.key_of(last)) };
            let changes: Vec<RowChange> =
                rows.into_iter().map(|values| RowChange::Upsert { version: snapshot_version, values }).collect();
            self.send(changes, to).await?;
            after = match &self.plan.cursor {
                Some(Cursor::Snapshot { after_key, .. }) => after_key.clone(),
                _ => return Err(self.unexpected_cursor()),
            };
        }
        // The scan is complete: move to the change stream at the snapshot's
        // version, then catch up with what changed during the scan.
        self.send(Vec::new(), Cursor::Changes { version: snapshot_version, after_key: None }).await?;
        let upper = self.source.current_version().await?;
        self.changes(upper).await
    }

    /// Net changes after the receiver's cursor up to `upper`, oldest first;
    /// finally the cursor moves to `upper` even when nothing changed, so idle
    /// tables never fall behind the source's retention.
    async fn changes(&mut self, upper: Version) -> Result<(), AgentError> {
        loop {
            let Some(Cursor::Changes { version, after_key }) = self.plan.cursor.clone() else {
                return Err(self.unexpected_cursor());
            };
            if version > upper || (version == upper && after_key.is_none()) {
                return Ok(());
            }
            self.check_stop()?;
            let position = ChangePosition { version, after_key };
            let rows = self.source.changes_chunk(self.plan.schema, &position, upper, self.limits).await?;
            Self::pace(self.control.source_rows.clone(), rows.len()).await;
            let Some(last) = rows.last() else {
                return self.send(Vec::new(), Cursor::Changes { version: upper, after_key: None }).await;
            };
            let to = Cursor::Changes { version: last.version, after_key: Some(last.key.clone()) };
            let changes = rows
                .into_iter()
                .map(|r| match r.op {
                    RowOp::Upsert(values) => RowChange::Upsert { version: r.version, values },
                    RowOp::Delete => RowChange::Delete { version: r.version, key: r.key },
                })
                .collect();
            self.send(changes, to).await?;
        }
    }

    /// Sends one batch and adopts the receiver's answer as the cursor.
    async fn send(&mut self, rows: Vec<RowChange>, to: Cursor) -> Result<(), AgentError> {
        let n = rows.len() as u64;
        let batch = RowBatch {
            table: self.plan.mirror.name.clone(),
            schema_hash: self.plan.schema_hash.clone(),
            from: self.plan.cursor.clone(),
            to,
            rows,
        };
        let span = info_span!("batch", n = self.outcome.batches + 1, rows = n, to = %batch.to);
        let (outcome, bytes) = self.client.send_batch(&batch).instrument(span).await?;
        self.outcome.batches += 1;
        self.outcome.bytes_sent += bytes as u64;
        match outcome {
            BatchOutcome::Applied(resp) => {
                self.outcome.rows_sent += n;
                self.outcome.counts.add(resp.counts);
                self.plan.cursor = Some(resp.cursor);
                if let Some(progress) = &self.control.progress {
                    self.outcome.cursor = self.plan.cursor.clone();
                    progress(&self.outcome);
                }
                Ok(())
            }
            BatchOutcome::Conflict(cursor) => {
                self.conflicts += 1;
                let msg = format!(
                    "receiver holds cursor {} where the agent expected {}",
                    cursor.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                    batch.from.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                );
                self.plan.cursor = cursor;
                Err(AgentError::new(AgentErrorKind::Refused, msg))
            }
        }
    }

    /// The batch boundary: everything sent so far is committed, so this is
    /// where a stop request is honoured.
    fn check_stop(&self) -> Result<(), AgentError> {
        match self.control.stop.reason() {
            Some(reason) => Err(AgentError::new(
                AgentErrorKind::Interrupted,
                format!("stopped at a batch boundary: {}", reason.describe()),
            )),
            None => Ok(()),
        }
    }

    /// Holds the source server to its row rate (shared by every cycle that
    /// reads from it).
    /// (Takes the limit by value so the future does not borrow `self`,
    /// which holds the source and need not be `Sync`.)
    async fn pace(limit: Option<RateLimit>, rows: usize) {
        if let Some(limit) = limit {
            limit.take(rows as u64).await;
        }
    }

    fn unexpected_cursor(&self) -> AgentError {
        AgentError::new(
            AgentErrorKind::Fatal,
            format!(
                "receiver answered an unexpected cursor {}",
                self.plan.cursor.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "none".into())
            ),
        )
    }
}


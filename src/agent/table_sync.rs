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
use crate::protocol::copy::{CopyBatch, CopyBatchHeader};
use crate::protocol::{Advance, Cursor, Key, SyncMode, TableSchema, TableStatus, Version};
use crate::source::{ChangePosition, ChunkLimits, CopyChunk, Source, SourceSchema, TableSurvey};
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
    /// What the source said about the table at the start of the cycle.
    pub survey: TableSurvey,
}

pub struct TableSync<'a, S: Source> {
    source: &'a mut S,
    limits: ChunkLimits,
    /// A reload was started in this turn; a second need for one fails the
    /// table instead of looping.
    restarted: bool,
    /// The receiver's side, kept apart from `source` so that a batch can
    /// be sent while the next chunk is read.
    link: Link<'a>,
}

/// Everything a batch's round trip touches.
struct Link<'a> {
    client: &'a PartnerClient,
    plan: TablePlan<'a>,
    control: &'a CycleControl,
    outcome: TableOutcome,
    conflicts: u32,
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
        Self { source, limits, restarted: false, link: Link { client, plan, control, outcome, conflicts: 0 } }
    }

    /// Runs the table to the cycle's `upper` version. Never fails: errors end
    /// up in the outcome so the other tables go on.
    pub async fn run(mut self, upper: Version) -> TableOutcome {
        let started = Instant::now();
        let span = info_span!("table", table = %self.link.plan.mirror.name);
        let result = async { self.drive(upper).await }.instrument(span.clone()).await;
        self.link.outcome.duration = started.elapsed();
        self.link.outcome.cursor = self.link.plan.cursor.clone();
        let _enter = span.enter();
        match result {
            Ok(()) => info!(
                mode = ?self.link.outcome.mode,
                rows = self.link.outcome.rows_sent,
                batches = self.link.outcome.batches,
                inserted = self.link.outcome.counts.inserted,
                updated = self.link.outcome.counts.updated,
                deleted = self.link.outcome.counts.deleted,
                cursor = %self.link.plan.cursor.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                ms = self.link.outcome.duration.as_millis() as u64,
                "table done"
            ),
            Err(e) if e.kind == AgentErrorKind::Interrupted => {
                info!(reason = %e, rows = self.link.outcome.rows_sent, "table stopped at a batch boundary");
                self.link.outcome.mode = SyncMode::Failed;
                self.link.outcome.error = Some(e);
            }
            Err(e) => {
                tracing::error!(error = %e, kind = ?e.kind, "table failed");
                self.link.outcome.mode = SyncMode::Failed;
                self.link.outcome.error = Some(e);
            }
        }
        self.link.outcome
    }

    async fn drive(&mut self, upper: Version) -> Result<(), AgentError> {
        if self.link.plan.status == TableStatus::Refused {
            return Err(AgentError::new(AgentErrorKind::Refused, "receiver refused the table's schema"));
        }
        loop {
            let before = self.link.conflicts;
            let result = self.drive_once(upper).await;
            match result {
                Err(e) if self.link.conflicts > before && self.link.conflicts < MAX_CONFLICTS => {
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
        let table = self.link.plan.schema.table.to_string();
        let requested = self.link.plan.reload.take();
        let newly_enabled = std::mem::take(&mut self.link.plan.newly_enabled);
        if self.link.plan.cursor.is_some() {
            let why = requested.or_else(|| {
                newly_enabled.then(|| "change tracking was just enabled; earlier cursors cannot be trusted".to_owned())
            });
            if let Some(reason) = why {
                self.start_reload(reason).await?;
            }
        } else if let Some(reason) = requested {
            // Nothing held: the full load below is the reload asked for.
            self.link.outcome.reloaded_because(reason);
        }
        let min_valid = match self.link.plan.survey.min_valid {
            Some(v) => v,
            None => self.source.min_valid_version(&self.link.plan.schema.table).await?,
        };
        match self.link.plan.cursor.clone() {
            None => {
                // The receiver holds nothing for the table (new, recreated,
                // or a reload just began): a fresh full load.
                if self.link.plan.status == TableStatus::Rebuilding && !self.link.outcome.reloaded {
                    let reason = self.link.plan.message.clone().unwrap_or_else(|| "receiver is rebuilding the table".into());
                    info!(%reason, "receiver started a rebuild");
                    self.link.outcome.reloaded_because(format!("receiver: {reason}"));
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
                self.link.outcome.mode = SyncMode::Incremental;
                if !self.link.plan.survey.may_have_changes {
                    self.link.outcome.mode = SyncMode::Idle;
                    self.nothing_left(upper);
                    return Ok(());
                }
                self.changes(upper).await?;
                if self.link.outcome.rows_sent == 0 {
                    self.link.outcome.mode = SyncMode::Idle;
                }
                Ok(())
            }
        }
    }

    /// Asks the receiver to restart the table into a shadow table; the live
    /// table stays readable until the new load completes.
    async fn start_reload(&mut self, reason: String) -> Result<(), AgentError> {
        self.link.check_stop()?;
        info!(%reason, "reloading the table");
        self.link.client.reload(&self.link.plan.mirror.name, &reason, self.link.plan.identity).await?;
        self.link.plan.cursor = None;
        self.restarted = true;
        self.link.outcome.reloaded_because(reason);
        Ok(())
    }

    /// A keyset scan in primary-key order as of version `S`, then the changes
    /// made since `S`. `resume` continues an interrupted load from the
    /// receiver's snapshot cursor instead of starting over.
    ///
    /// Pipelined: while batch n travels and is applied, chunk n+1 is read
    /// from where batch n ends. The receiver's answer still decides: if it
    /// holds anything but the end of batch n, the chunk read ahead is
    /// dropped and nothing is lost, since rows are only ever sent from the
    /// receiver's cursor.
    async fn full_load(&mut self, resume: Option<(Version, Option<Key>)>) -> Result<(), AgentError> {
        self.link.outcome.mode = SyncMode::Full;
        let (snapshot_version, after) = match resume {
            Some(r) => r,
            // The receiver holds no cursor, so its target table is empty.
            None => (self.source.current_version().await?, None),
        };
        info!(version = %snapshot_version, "full load");
        let schema = self.link.plan.schema;
        let pace = self.link.control.source_rows.clone();
        let mut chunk = read_snapshot(self.source, schema, after.as_ref(), self.limits, pace.clone()).await?;
        while !chunk.is_empty() {
            self.link.check_stop()?;
            let to = Cursor::Snapshot { version: snapshot_version, after_key: chunk.last_key.clone() };
            let next_after = chunk.last_key.clone();
            let (sent, next) = tokio::join!(
                self.link.send(chunk, to.clone()),
                read_snapshot(self.source, schema, next_after.as_ref(), self.limits, pace.clone()),
            );
            sent?;
            if self.link.plan.cursor.as_ref() != Some(&to) {
                return Err(self.link.unexpected_cursor());
            }
            chunk = next?;
        }
        // The scan is complete: move to the change stream at the snapshot's
        // version, then catch up with what changed during the scan.
        self.link.send(CopyChunk::empty(), Cursor::Changes { version: snapshot_version, after_key: None }).await?;
        let upper = self.source.current_version().await?;
        self.changes(upper).await
    }

    /// Net changes after the receiver's cursor up to `upper`, oldest first;
    /// finally the cursor moves to `upper` even when nothing changed, so idle
    /// tables never fall behind the source's retention (that last move is
    /// left in the outcome for the cycle's Advance call). Pipelined like the
    /// full load: the chunk after a batch is read while the batch travels,
    /// and used only if the receiver ends up exactly where the batch ends.
    async fn changes(&mut self, upper: Version) -> Result<(), AgentError> {
        let schema = self.link.plan.schema;
        let pace = self.link.control.source_rows.clone();
        let mut ahead: Option<(ChangePosition, CopyChunk)> = None;
        loop {
            let Some(Cursor::Changes { version, after_key }) = self.link.plan.cursor.clone() else {
                return Err(self.link.unexpected_cursor());
            };
            if version > upper || (version == upper && after_key.is_none()) {
                return Ok(());
            }
            self.link.check_stop()?;
            let position = ChangePosition { version, after_key };
            let chunk = match ahead.take() {
                Some((at, chunk)) if at == position => chunk,
                _ => read_changes(self.source, schema, &position, upper, self.limits, pace.clone()).await?,
            };
            let (Some(last_version), Some(last_key)) = (chunk.last_version, chunk.last_key.clone()) else {
                self.nothing_left(upper);
                return Ok(());
            };
            let to = Cursor::Changes { version: last_version, after_key: Some(last_key.clone()) };
            let next = ChangePosition { version: last_version, after_key: Some(last_key) };
            let (sent, read) = tokio::join!(
                self.link.send(chunk, to),
                read_changes(self.source, schema, &next, upper, self.limits, pace.clone()),
            );
            sent?;
            match read {
                Ok(chunk) => ahead = Some((next, chunk)),
                // Read again (and fail there if it persists) at the top.
                Err(e) => tracing::debug!(error = %e, "reading ahead failed"),
            }
        }
    }
}

impl<S: Source> TableSync<'_, S> {
    /// Nothing (more) to send: the cursor still moves to `upper`, in the
    /// cycle's one Advance call for all such tables.
    fn nothing_left(&mut self, upper: Version) {
        let plan = &self.link.plan;
        if let Some(Cursor::Changes { version, after_key }) = &plan.cursor {
            if *version < upper || (*version == upper && after_key.is_some()) {
                self.link.outcome.pending_advance = Some(Advance {
                    table: plan.mirror.name.clone(),
                    schema_hash: plan.schema_hash.clone(),
                    from: Cursor::Changes { version: *version, after_key: after_key.clone() },
                    to: Cursor::Changes { version: upper, after_key: None },
                });
            }
        }
    }
}

/// One snapshot chunk, paced to the source server's row rate (shared by
/// every cycle that reads from it).
async fn read_snapshot<S: Source>(
    source: &mut S,
    schema: &SourceSchema,
    after: Option<&Key>,
    limits: ChunkLimits,
    pace: Option<RateLimit>,
) -> Result<CopyChunk, AgentError> {
    let chunk = source.snapshot_copy(schema, after, limits).await?;
    if let Some(limit) = pace {
        limit.take(chunk.rows).await;
    }
    Ok(chunk)
}

async fn read_changes<S: Source>(
    source: &mut S,
    schema: &SourceSchema,
    after: &ChangePosition,
    upper: Version,
    limits: ChunkLimits,
    pace: Option<RateLimit>,
) -> Result<CopyChunk, AgentError> {
    let chunk = source.changes_copy(schema, after, upper, limits).await?;
    if let Some(limit) = pace {
        limit.take(chunk.rows).await;
    }
    Ok(chunk)
}

impl Link<'_> {
    /// Sends one batch and adopts the receiver's answer as the cursor.
    async fn send(&mut self, chunk: CopyChunk, to: Cursor) -> Result<(), AgentError> {
        let n = chunk.rows;
        let batch = CopyBatch {
            header: CopyBatchHeader {
                table: self.plan.mirror.name.clone(),
                schema_hash: self.plan.schema_hash.clone(),
                from: self.plan.cursor.clone(),
                to,
                format: chunk.format,
                rows: n,
            },
            payload: chunk.payload.into(),
        };
        let span = info_span!("batch", n = self.outcome.batches + 1, rows = n, to = %batch.header.to);
        let (outcome, bytes) = self.client.send_copy_batch(&batch).instrument(span).await?;
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
                    batch.header.from.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
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

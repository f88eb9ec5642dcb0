//! What a cycle did, per table: the operator's view and the basis of
//! ReplicationCompleted.

use super::error::AgentError;
use crate::protocol::{ChangeCounts, Cursor, SyncMode, TableReport};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct TableOutcome {
    /// The mirror table's name.
    pub table: String,
    pub mode: SyncMode,
    /// What the receiver reports it did.
    pub counts: ChangeCounts,
    pub rows_sent: u64,
    pub bytes_sent: u64,
    pub batches: u64,
    /// The receiver's cursor when the table finished (or failed).
    pub cursor: Option<Cursor>,
    pub error: Option<AgentError>,
    pub duration: Duration,
    /// The receiver's cursor when the table's turn began.
    pub start_cursor: Option<Cursor>,
    /// A full reload of the table started in this cycle.
    pub reloaded: bool,
    /// Why it was reloaded.
    pub reload_reason: Option<String>,
    /// The table has nothing more to send and its cursor only has to move
    /// to the end of the cycle's change stream; the cycle sends every such
    /// move in one Advance call.
    pub pending_advance: Option<crate::protocol::Advance>,
}

impl TableOutcome {
    pub fn new(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            mode: SyncMode::Idle,
            counts: ChangeCounts::default(),
            rows_sent: 0,
            bytes_sent: 0,
            batches: 0,
            cursor: None,
            error: None,
            duration: Duration::ZERO,
            start_cursor: None,
            reloaded: false,
            reload_reason: None,
            pending_advance: None,
        }
    }

    pub fn failed(table: &str, error: AgentError) -> Self {
        let mut o = Self::new(table);
        o.mode = SyncMode::Failed;
        o.error = Some(error);
        o
    }

    pub fn reloaded_because(&mut self, reason: String) {
        self.reloaded = true;
        self.reload_reason = Some(reason);
    }

    pub fn to_report(&self) -> TableReport {
        TableReport {
            name: self.table.clone(),
            mode: self.mode,
            counts: self.counts,
            error: self.error.as_ref().map(|e| e.message.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CycleReport {
    pub tenant: String,
    pub application: String,
    /// Set when the receiver answered "do not replicate".
    pub paused: Option<String>,
    pub tables: Vec<TableOutcome>,
    /// Tables the receiver dropped because the map no longer names them.
    pub dropped: Vec<String>,
    /// ReplicationCompleted failed (the data itself is committed).
    pub completion_error: Option<AgentError>,
    pub duration: Duration,
    /// The source's version this cycle synced up to.
    pub source_version: Option<crate::protocol::Version>,
    /// Set when the cycle found the source restored or replaced and
    /// rebuilt the tenant's mirror; says how it knew.
    pub restore: Option<String>,
    /// The oldest transaction on the source server when the cycle began:
    /// the readable version cannot pass it, so while it runs nothing newer
    /// reaches any mirror of the server.
    pub oldest_transaction: Option<crate::source::OldestTransaction>,
}

impl CycleReport {
    /// True when every table succeeded and the receiver took the completion.
    pub fn succeeded(&self) -> bool {
        self.completion_error.is_none() && self.tables.iter().all(|t| t.error.is_none())
    }

    /// True when a table stopped at a batch boundary on request.
    pub fn interrupted(&self) -> bool {
        self.tables
            .iter()
            .any(|t| t.error.as_ref().is_some_and(|e| e.kind == super::error::AgentErrorKind::Interrupted))
    }

    pub fn rows_sent(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_sent).sum()
    }
}

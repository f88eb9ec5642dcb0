//! The agent's error type: every failure says whether trying again can help.

use crate::protocol::ErrorDetail;
use crate::source::{SourceError, SourceErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentErrorKind {
    /// Network trouble, timeouts, 5xx, a source connection lost: the next
    /// attempt may well succeed.
    Transient,
    /// Token refused or the receiver's answer did not verify: keys or clocks
    /// need an operator; retrying hammers a partner for nothing.
    Auth,
    /// The receiver refused the request itself (bad request, schema refused,
    /// a value it cannot store): retrying the same data fails the same way.
    Refused,
    /// The table's mirror needs a full reload: the receiver's table drifted
    /// from its bookkeeping, or the source lost the changes past the cursor
    /// while they were read. The table sync starts one (once per cycle).
    NeedsReload,
    /// Configuration or mapping is wrong (missing table or column, no key).
    Config,
    /// A source value the protocol cannot carry.
    Data,
    /// Stopped at a batch boundary on the scheduler's request (blackout,
    /// shutdown, lease lost); everything sent is committed and the next
    /// cycle resumes from the receiver's cursor.
    Interrupted,
    /// Anything else.
    Fatal,
}

impl AgentErrorKind {
    /// The name used in run history and status.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentErrorKind::Transient => "transient",
            AgentErrorKind::Auth => "auth",
            AgentErrorKind::Refused => "refused",
            AgentErrorKind::NeedsReload => "needs_reload",
            AgentErrorKind::Config => "config",
            AgentErrorKind::Data => "data",
            AgentErrorKind::Interrupted => "interrupted",
            AgentErrorKind::Fatal => "fatal",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: AgentErrorKind,
    pub message: String,
    /// The partner asked us to come back no sooner than this (Retry-After
    /// on a 429 or 503 that was longer than the agent waits in a cycle).
    pub retry_after: Option<std::time::Duration>,
}

impl AgentError {
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after: None }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == AgentErrorKind::Transient
    }

    /// Maps a receiver's structured error answer.
    pub fn from_receiver(status: u16, detail: &ErrorDetail) -> Self {
        let kind = if detail.retryable || status >= 500 || status == 429 {
            AgentErrorKind::Transient
        } else if detail.kind == "needs_reload" {
            AgentErrorKind::NeedsReload
        } else if status == 401 || status == 403 {
            AgentErrorKind::Auth
        } else {
            AgentErrorKind::Refused
        };
        let mut message = format!("receiver answered {status} {}: {}", detail.kind, detail.message);
        if let Some(t) = &detail.table {
            message.push_str(&format!(" (table {t}"));
            if let Some(k) = &detail.key {
                message.push_str(&format!(", key {k}"));
            }
            message.push(')');
        }
        Self::new(kind, message)
    }
}

impl From<SourceError> for AgentError {
    fn from(e: SourceError) -> Self {
        let kind = match e.kind {
            SourceErrorKind::Transient => AgentErrorKind::Transient,
            SourceErrorKind::Config => AgentErrorKind::Config,
            SourceErrorKind::Data => AgentErrorKind::Data,
            SourceErrorKind::Expired => AgentErrorKind::NeedsReload,
            SourceErrorKind::Fatal => AgentErrorKind::Fatal,
        };
        Self::new(kind, format!("source: {}", e.message))
    }
}

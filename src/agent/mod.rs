//! The agent: drives mirroring cycles from a tenant database to a partner's
//! receiver.

pub mod client;
pub mod cycle;
pub mod error;
pub mod report;
mod table_sync;

pub use client::PartnerClient;
pub use cycle::{run_cycle, CycleSettings};
pub use error::{AgentError, AgentErrorKind};
pub use report::{CycleReport, TableOutcome};


//! When cycles run: the cadence per (tenant, application) pair, the nightly
//! blackout, backoff after failures, and the store that shares this state
//! between agent processes.
//!
//! Everything here takes "now" as an argument or from a [`Clock`], so the
//! rules are tested on tokio's paused clock and on chosen instants (a DST
//! night) without waiting for real time.

pub mod cadence;
pub mod clock;
pub mod memory;
pub mod store;
pub mod window;

pub use cadence::{Backoff, Cadence};
pub use clock::{Clock, SystemClock, TokioClock};
pub use memory::MemoryStore;
pub use store::{
    Claim, Lease, Outcome, PairKey, PairRegistration, ResyncRequest, RunId, RunRecord, StoreError, StoreErrorKind,
    TableProgress, TableRun,
};
pub use window::{Blackout, WindowError};

//! Asking a running cycle to stop at its next batch boundary.
//!
//! A cycle is never cut in the middle of a batch: the receiver commits each
//! batch with its cursor, so stopping between batches leaves the mirror
//! consistent and the next cycle resumes from the receiver's cursor. The
//! scheduler raises the signal when the blackout opens, on SIGTERM, or when
//! the pair's lease was lost to another process.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Blackout,
    Shutdown,
    LeaseLost,
}

impl StopReason {
    fn code(self) -> u8 {
        match self {
            StopReason::Blackout => 1,
            StopReason::Shutdown => 2,
            StopReason::LeaseLost => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(StopReason::Blackout),
            2 => Some(StopReason::Shutdown),
            3 => Some(StopReason::LeaseLost),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Blackout => "the nightly blackout window opened",
            StopReason::Shutdown => "the agent is shutting down",
            StopReason::LeaseLost => "another agent process took over the pair's lease",
        }
    }
}

/// Shared between the scheduler (raises) and the cycle (checks).
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicU8>);

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal; the first reason wins.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.0.compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<StopReason> {
        StopReason::from_code(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins() {
        let s = StopSignal::new();
        assert_eq!(s.reason(), None);
        s.stop(StopReason::Blackout);
        s.clone().stop(StopReason::Shutdown);
        assert_eq!(s.reason(), Some(StopReason::Blackout));
    }
}

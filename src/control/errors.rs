//! How control-database failures become [`StoreError`]s.
//!
//! The scheduler only needs one decision: wait and try again
//! ([`StoreErrorKind::Transient`]: the server is unreachable, restarting,
//! overloaded, or chose us as the victim of a serialization failure or a
//! deadlock) or stop and tell an operator ([`StoreErrorKind::Fatal`]:
//! permissions, a missing object, a bug). Fatal messages carry the SQLSTATE
//! and the server's own words, so the log line is enough to act on.

use crate::schedule::store::{StoreError, StoreErrorKind};
use std::error::Error as _;

/// SQLSTATEs after which the same statement may well succeed if repeated:
/// class 08 (connection exception), 53 (insufficient resources), 40001
/// (serialization failure), 40P01 (deadlock detected), 55P03 (lock timeout),
/// 57014 (statement timeout or cancel), 57P01-57P03 (server shutting down or
/// starting), 25P03 (idle-in-transaction timeout).
pub(crate) fn is_transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "53"))
        || matches!(code, "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25P03")
}

/// Maps a tokio-postgres error.
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let mut message = db.message().to_owned();
        if let Some(detail) = db.detail() {
            message = format!("{message} ({detail})");
        }
        let kind = if is_transient_sqlstate(code) { StoreErrorKind::Transient } else { StoreErrorKind::Fatal };
        return StoreError::new(kind, format!("{message} [SQLSTATE {code}]"));
    }
    // No server error: either the connection is the problem (transient) or
    // our side is (a value that does not encode or decode: a bug).
    let text = with_sources(&e);
    let transient = e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || ["error communicating", "error connecting", "timeout", "connection closed"]
            .iter()
            .any(|p| text.starts_with(p));
    if transient {
        StoreError::new(StoreErrorKind::Transient, format!("unreachable: {text}"))
    } else {
        StoreError::new(StoreErrorKind::Fatal, text)
    }
}

/// Maps an error from taking a pooled connection.
pub(crate) fn pool(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError as P;
    match e {
        P::Backend(e) => pg(e),
        P::Timeout(_) => {
            StoreError::new(StoreErrorKind::Transient, format!("no connection available: {}", with_sources(&e)))
        }
        P::PostCreateHook(_) | P::Closed | P::NoRuntimeSpecified => {
            StoreError::new(StoreErrorKind::Fatal, format!("connection pool: {}", with_sources(&e)))
        }
    }
}

/// A value read from the control database that this ctmirror cannot
/// understand (written by hand or by another version).
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Fatal, format!("unexpected data: {what}"))
}

/// `error: cause: cause`, since tokio-postgres puts the useful part
/// ("Connection refused") in the source chain.
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text = format!("{text}: {s_text}");
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_sqlstates() {
        for code in ["08006", "08001", "53300", "40001", "40P01", "55P03", "57014", "57P01", "57P03"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["42501", "42P01", "23505", "22P02", "3D000", "28P01"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}

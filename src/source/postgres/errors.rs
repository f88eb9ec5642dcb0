//! tokio-postgres errors mapped to [`SourceErrorKind`], which decides
//! whether the agent retries. The message always says what the backend was
//! doing (naming the table) so an operator can act without a debugger.

use crate::source::{SourceError, SourceErrorKind};
use tokio_postgres::error::SqlState;

/// SQLSTATEs after which the same work can succeed later: lost
/// connections, concurrency conflicts, a server restarting or busy.
const TRANSIENT: &[SqlState] = &[
    SqlState::T_R_SERIALIZATION_FAILURE,
    SqlState::T_R_DEADLOCK_DETECTED,
    SqlState::ADMIN_SHUTDOWN,
    SqlState::CRASH_SHUTDOWN,
    SqlState::CANNOT_CONNECT_NOW,
    SqlState::TOO_MANY_CONNECTIONS,
    SqlState::LOCK_NOT_AVAILABLE,
    SqlState::QUERY_CANCELED,
];

/// Maps a failed statement. `doing` completes "while ..." and names the
/// table; `grant` says which privilege fixes a permission error.
pub(crate) fn pg_error(e: tokio_postgres::Error, doing: &str, grant: &str) -> SourceError {
    let kind = classify(&e);
    let detail = describe(&e);
    let message = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        format!("permission denied while {doing}: {detail}; grant the agent's role {grant}")
    } else {
        format!("error while {doing}: {detail}")
    };
    SourceError::new(kind, message)
}

fn classify(e: &tokio_postgres::Error) -> SourceErrorKind {
    if e.is_closed() {
        return SourceErrorKind::Transient;
    }
    match e.code() {
        // Raised by `ctmirror_ct.readable`: the changes after the cursor
        // are gone or belong to another tracking lifetime; a reload cures
        // both.
        Some(code)
            if code.code() == super::install::EXPIRED_STATE || code.code() == super::install::REPLACED_STATE =>
        {
            SourceErrorKind::Expired
        }
        Some(code) if TRANSIENT.contains(code) => SourceErrorKind::Transient,
        // Class 08: connection exceptions.
        Some(code) if code.code().starts_with("08") => SourceErrorKind::Transient,
        Some(code)
            if *code == SqlState::INSUFFICIENT_PRIVILEGE
                || *code == SqlState::UNDEFINED_TABLE
                || *code == SqlState::UNDEFINED_COLUMN =>
        {
            SourceErrorKind::Config
        }
        Some(_) => SourceErrorKind::Fatal,
        None if has_io_source(e) => SourceErrorKind::Transient,
        None => SourceErrorKind::Fatal,
    }
}

fn has_io_source(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The server's message and SQLSTATE for database errors (tokio-postgres
/// displays only "db error" for those), the error chain otherwise.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; {detail}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

//! SQL Server errors mapped to [`SourceErrorKind`]. The message always says
//! what the backend was doing, and for permission errors which permission
//! the agent's login lacks.

use crate::source::{SourceError, SourceErrorKind};

/// Server error numbers after which the same work can succeed later.
const TRANSIENT: &[u32] = &[
    1205,  // chosen as deadlock victim
    1222,  // lock request time out
    3960,  // snapshot update conflict
    3961,  // snapshot: object changed by DDL since the snapshot began
    40197, // Azure: service error processing the request
    40501, // Azure: service busy
    40613, // Azure: database not currently available
    49918, 49919, 49920, // Azure: too many operations
    233,   // no process on the other end of the pipe
    10053, 10054, 10060, // transport errors reported by the server
];

/// Permission denied in one of its phrasings.
const PERMISSION: &[u32] = &[
    229,  // The %ls permission was denied on the object
    230,  // The %ls permission was denied on the column
    262,  // %ls permission denied in database
    297,  // The user does not have permission to perform this action
    300,  // %ls permission was denied on object
    916,  // The server principal is not able to access the database
    1088, // Cannot find the object because it does not exist or you do not have permissions
    5011, // User does not have permission to alter database
    15151, // Cannot alter/find the object because it does not exist or you do not have permission
    15247, // User does not have permission to perform this action
];

/// Names that are not there (or not visible).
const MISSING: &[u32] = &[
    207, // invalid column name
    208, // invalid object name
    4902, // cannot find the object
    4060, // cannot open the database named in the connection string
    18456, // login failed
];

/// What a server answer or transport failure means for the agent.
pub fn classify(e: &tiberius::error::Error) -> SourceErrorKind {
    use tiberius::error::Error as E;
    match e {
        E::Io { .. } | E::Routing { .. } => SourceErrorKind::Transient,
        E::Tls(_) => SourceErrorKind::Config,
        E::Server(t) => classify_code(t.code()),
        _ => SourceErrorKind::Fatal,
    }
}

pub(crate) fn classify_code(code: u32) -> SourceErrorKind {
    if TRANSIENT.contains(&code) {
        SourceErrorKind::Transient
    } else if PERMISSION.contains(&code) || MISSING.contains(&code) {
        SourceErrorKind::Config
    } else {
        SourceErrorKind::Fatal
    }
}

/// Maps a failed call. `doing` completes "while ..." and names the table;
/// `grant` names the permission that fixes a permission error.
pub fn ms_error(e: tiberius::error::Error, doing: &str, grant: &str) -> SourceError {
    let kind = classify(&e);
    let (code, detail) = match &e {
        tiberius::error::Error::Server(t) => (Some(t.code()), format!("{} (error {})", t.message(), t.code())),
        other => (None, other.to_string()),
    };
    permission_or_plain(kind, code, &detail, doing, grant)
}

pub(crate) fn permission_or_plain(
    kind: SourceErrorKind,
    code: Option<u32>,
    detail: &str,
    doing: &str,
    grant: &str,
) -> SourceError {
    let message = match code {
        Some(c) if PERMISSION.contains(&c) && !grant.is_empty() => {
            format!("permission denied while {doing}: {detail}; the agent's login needs {grant}")
        }
        _ => format!("error while {doing}: {detail}"),
    };
    SourceError::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlocks_and_snapshot_conflicts_are_retried() {
        assert_eq!(classify_code(1205), SourceErrorKind::Transient);
        assert_eq!(classify_code(3960), SourceErrorKind::Transient);
        assert_eq!(classify_code(40613), SourceErrorKind::Transient);
    }

    #[test]
    fn permission_errors_name_the_missing_permission() {
        let e = permission_or_plain(
            classify_code(229),
            Some(229),
            "The SELECT permission was denied on the object 'x' (error 229)",
            "reading table dbo.x",
            "SELECT on dbo.x",
        );
        assert_eq!(e.kind, SourceErrorKind::Config);
        assert!(e.message.contains("the agent's login needs SELECT on dbo.x"), "{}", e.message);
    }

    #[test]
    fn syntax_errors_are_not_retried() {
        assert_eq!(classify_code(102), SourceErrorKind::Fatal);
    }
}

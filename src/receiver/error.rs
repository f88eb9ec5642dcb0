//! The receiver's one error type and how it travels back to the agent.
//!
//! Every refusal carries a [`ErrorKind`] that fixes the HTTP status, the
//! machine-readable `kind` of [`ErrorBody`] and whether sending the same
//! request again may help. The agent's retry policy reads only that flag, so
//! the mapping from PostgreSQL errors below decides what gets retried: data
//! the mirror cannot hold is final, a database that is down is not.

use crate::protocol::{Cursor, ErrorBody, ErrorDetail, Key};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The token is missing, forged, stale or for another request.
    Unauthorized,
    /// The request contradicts the protocol or the table's schema.
    BadRequest,
    UnsupportedMediaType,
    PayloadTooLarge,
    /// No route for this path (not part of the protocol).
    NotFound,
    /// The path exists but only for `POST`.
    MethodNotAllowed,
    /// Rows or a reload for a table no schema call announced.
    UnknownTable,
    /// The batch follows another schema than the one the receiver holds.
    SchemaMismatch,
    /// The batch's `from` cursor is not what the receiver holds.
    Conflict,
    /// PostgreSQL refused the data itself (SQLSTATE classes 21, 22, 23), or
    /// a reload cannot swap in because partner objects depend on the live
    /// table: the partner must act, resending cannot help.
    Unprocessable,
    /// The mirror table no longer matches its bookkeeping (the partner
    /// dropped it, dropped or retyped a column, dropped its key): a reload
    /// rebuilds it, sending the same batch again cannot help.
    NeedsReload,
    /// Anything unexpected on the receiver's side; may pass on retry.
    Internal,
    /// The partner database cannot be reached right now.
    Unavailable,
    /// The service could not start (keys, database URL, listen address).
    Startup,
    /// A valid token for a tenant this receiver does not serve.
    Forbidden,
    /// The tenant already has as many requests in flight as allowed.
    TooManyRequests,
    /// The request body came too slowly.
    RequestTimeout,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::UnknownTable | ErrorKind::SchemaMismatch | ErrorKind::Conflict | ErrorKind::NeedsReload => {
                StatusCode::CONFLICT
            }
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Internal | ErrorKind::Startup => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `kind` string of [`ErrorDetail`].
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::UnknownTable => "unknown_table",
            ErrorKind::SchemaMismatch => "schema_mismatch",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::NeedsReload => "needs_reload",
            ErrorKind::Internal => "internal",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Startup => "startup",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::TooManyRequests => "too_many_requests",
            ErrorKind::RequestTimeout => "request_timeout",
        }
    }

    /// The Retry-After (seconds) sent with this kind: a busy tenant's
    /// request in flight ends soon. Other retryable kinds leave the wait to
    /// the agent's backoff.
    pub fn retry_after_secs(self) -> Option<u32> {
        match self {
            ErrorKind::TooManyRequests => Some(1),
            _ => None,
        }
    }

    /// Whether the same request may succeed later without anyone changing it.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Internal | ErrorKind::Unavailable | ErrorKind::TooManyRequests | ErrorKind::RequestTimeout
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ReceiverError {
    pub kind: ErrorKind,
    pub message: String,
    pub table: Option<String>,
    pub key: Option<Key>,
    /// On [`ErrorKind::Conflict`]: the cursor the receiver holds.
    pub cursor: Option<Cursor>,
}

impl ReceiverError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), table: None, key: None, cursor: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn startup(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Startup, message)
    }
    pub fn with_table(mut self, table: &str) -> Self {
        self.table = Some(table.to_owned());
        self
    }
    pub fn with_key(mut self, key: Option<Key>) -> Self {
        self.key = key;
        self
    }
    pub fn with_cursor(mut self, cursor: Option<Cursor>) -> Self {
        self.cursor = cursor;
        self
    }
    pub fn retryable(&self) -> bool {
        self.kind.retryable()
    }
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                kind: self.kind.as_str().to_owned(),
                message: self.message.clone(),
                retryable: self.retryable(),
                table: self.table.clone(),
                key: self.key.clone(),
                cursor: self.cursor.clone(),
            },
        }
    }
}

impl IntoResponse for ReceiverError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

/// SQLSTATE classes that mean "PostgreSQL will never take this data":
/// 21 cardinality violation, 22 data exception, 23 integrity constraint.
/// Also 08P01 (protocol violation): a binary COPY value too short for its
/// type ("insufficient data left in message") is a bad batch, not a
/// connection failure, and sending it again cannot help.
fn is_data_error(code: &str) -> bool {
    matches!(code.get(..2), Some("21" | "22" | "23")) || code == "08P01"
}

/// SQLSTATEs that mean the server is going away or refusing connections:
/// class 08 connection exception, 53 insufficient resources, 57P0x shutdown.
/// Also 57014 (query canceled): the receiver's statement_timeout ended a
/// statement that ran too long; the transaction rolled back whole.
fn is_unavailable(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "53")) || matches!(code, "57P01" | "57P02" | "57P03" | "57014")
}

impl From<tokio_postgres::Error> for ReceiverError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let mut message = db.message().to_owned();
                if let Some(detail) = db.detail() {
                    message = format!("{message} ({detail})");
                }
                let kind = if is_data_error(code) {
                    ErrorKind::Unprocessable
                } else if is_unavailable(code) {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::Internal
                };
                ReceiverError::new(kind, format!("database refused: {message} [SQLSTATE {code}]"))
            }
            // No server error: the connection broke or never came up.
            None => ReceiverError::new(ErrorKind::Unavailable, format!("database unreachable: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ReceiverError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => ReceiverError::new(ErrorKind::Unavailable, format!("no database connection: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_kinds_are_retryable() {
        assert!(ErrorKind::Unavailable.retryable());
        assert!(ErrorKind::Internal.retryable());
        for k in [ErrorKind::Unprocessable, ErrorKind::Conflict, ErrorKind::BadRequest, ErrorKind::Unauthorized] {
            assert!(!k.retryable(), "{k:?}");
        }
    }

    #[test]
    fn sqlstate_classes_map_to_kinds() {
        assert!(is_data_error("22003"));
        assert!(is_data_error("23514"));
        assert!(!is_data_error("42P01"));
        assert!(is_unavailable("08006"));
        assert!(is_data_error("08P01"), "a malformed binary COPY value is the batch's fault");
        assert!(is_unavailable("57P01"));
        assert!(is_unavailable("57014"), "a statement timeout is worth retrying later");
        assert!(!is_unavailable("42501"));
    }

    #[test]
    fn body_carries_kind_and_context() {
        let e = ReceiverError::new(ErrorKind::Conflict, "x")
            .with_table("t")
            .with_cursor(Some(Cursor::Changes { version: crate::protocol::Version(3), after_key: None }));
        let json = serde_json::to_value(e.body()).unwrap();
        assert_eq!(json["error"]["kind"], "conflict");
        assert_eq!(json["error"]["retryable"], false);
        assert_eq!(json["error"]["table"], "t");
        assert_eq!(json["error"]["cursor"]["version"], 3);
        assert_eq!(e.status(), StatusCode::CONFLICT);
    }
}

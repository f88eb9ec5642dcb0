//! HTTP transport: routes, the checks every request passes before it may
//! touch the database, and the mapping of answers and errors to responses.
//!
//! The checks run in a fixed order, cheapest and least trusting first:
//! tenant id in the path, content type, body size and body time, signed
//! token (over the raw body), nonce not seen before, tenant served, a free
//! slot among the tenant's concurrent requests, then strict JSON and the
//! batch limits. Nothing is written before all of them pass, and every
//! refusal is an [`ErrorBody`](crate::protocol::ErrorBody).
//!
//! Every answer to a request whose token verified carries the receiver's
//! signature (`ctmirror-signature`) over the request's nonce, the status and
//! the body; refusals before that point are unsigned, and the agent acts on
//! none of them.

use super::error::{ErrorKind, ReceiverError};
use super::replay::Refusal;
use super::{advance, apply, hooks, reload, schema, Inner, ReceiverService};
use crate::auth::{self, Claims, RequestFacts};
use crate::ids::TenantId;
use crate::protocol::copy::{self, CopyBatch};
use crate::protocol::{self, AuthenticateRequest, AuthenticateResponse};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use std::time::Duration;
use serde::de::DeserializeOwned;
use tracing::{field, Instrument};

#[derive(Debug, Clone, Copy)]
enum Op {
    Authenticate,
    Schema,
    Rows,
    Advance,
    Reload,
    Completed,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Authenticate => "authenticate",
            Op::Schema => "schema",
            Op::Rows => "rows",
            Op::Advance => "advance",
            Op::Reload => "reload",
            Op::Completed => "completed",
        }
    }
}

pub fn router(service: ReceiverService) -> Router {
    let p = protocol::PREFIX;
    Router::new()
        .route(&format!("{p}/tenants/{{tenant}}/authenticate"), post(authenticate))
        .route(&format!("{p}/tenants/{{tenant}}/schema"), post(schema_call))
        .route(&format!("{p}/tenants/{{tenant}}/rows"), post(rows))
        .route(&format!("{p}/tenants/{{tenant}}/advance"), post(advance_call))
        .route(&format!("{p}/tenants/{{tenant}}/reload"), post(reload_call))
        .route(&format!("{p}/tenants/{{tenant}}/completed"), post(completed))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
}

type TenantPath = Result<Path<String>, PathRejection>;

async fn authenticate(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Authenticate, p, req).await
}
async fn schema_call(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Schema, p, req).await
}
async fn rows(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Rows, p, req).await
}
async fn advance_call(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Advance, p, req).await
}
async fn reload_call(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Reload, p, req).await
}
async fn completed(State(s): State<ReceiverService>, p: TenantPath, req: Request) -> Response {
    handle(s, Op::Completed, p, req).await
}

async fn not_found(req: Request) -> Response {
    refuse(ReceiverError::new(ErrorKind::NotFound, format!("no protocol operation at {}", req.uri().path())))
}

async fn method_not_allowed(req: Request) -> Response {
    refuse(ReceiverError::new(ErrorKind::MethodNotAllowed, format!("{} is not allowed here; use POST", req.method())))
}

fn refuse(e: ReceiverError) -> Response {
    let retry_after = e.kind.retry_after_secs();
    if e.kind.status().is_server_error() {
        tracing::warn!(kind = e.kind.as_str(), status = e.status().as_u16(), retryable = e.retryable(), table = ?e.table, "{}", e.message);
    } else {
        tracing::warn!(kind = e.kind.as_str(), status = e.status().as_u16(), table = ?e.table, "request refused: {}", e.message);
    }
    let mut response = e.into_response();
    if let Some(secs) = retry_after {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// One request under its span: the checks, then the operation, then the
/// answer's signature.
async fn handle(s: ReceiverService, op: Op, path: TenantPath, req: Request) -> Response {
    let span = tracing::info_span!("request", tenant = field::Empty, operation = op.name(), table = field::Empty);
    async move {
        let inner = s.inner();
        let admitted = match admit(inner, op, path, req).await {
            Ok(a) => a,
            Err(e) => return refuse(e),
        };
        let limit = Duration::from_secs(inner.cfg.limits.request_timeout_secs) + STATEMENT_TIMEOUT_MARGIN;
        let response = match tokio::time::timeout(limit, perform(inner, op, &admitted)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => refuse(e),
            Err(_) => refuse(ReceiverError::new(
                ErrorKind::Unavailable,
                format!("the request took longer than the receiver's limit of {} seconds", limit.as_secs()),
            )),
        };
        drop(admitted.slot);
        sign(response, &admitted.claims, &inner.partner_key).await
    }
    .instrument(span)
    .await
}

/// PostgreSQL's statement_timeout ends a slow statement first; this margin
/// is for time spent outside statements (waiting for a connection, hooks).
const STATEMENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// A request that passed every check before its operation.
struct Admitted {
    tenant: TenantId,
    claims: Claims,
    encoding: Encoding,
    body: Bytes,
    /// The tenant's concurrency slot, held until the answer is ready.
    slot: tokio::sync::OwnedSemaphorePermit,
}

async fn admit(inner: &Inner, op: Op, path: TenantPath, req: Request) -> Result<Admitted, ReceiverError> {
    let Path(raw) = path.map_err(|e| ReceiverError::bad_request(format!("invalid path: {e}")))?;
    let tenant = TenantId::new(raw).map_err(|e| ReceiverError::bad_request(e.to_string()))?;
    tracing::Span::current().record("tenant", tenant.as_str());

    let (parts, body) = req.into_parts();
    // The router decodes percent-escapes, the token signs the raw path: two
    // spellings of one tenant would be two signed paths to one mirror.
    if parts.uri.path().contains('%') {
        return Err(ReceiverError::bad_request("percent-encoded paths are not part of the protocol"));
    }
    let encoding = check_content_type(op, &parts.headers)?;
    let limits = &inner.cfg.limits;
    let body = read_body(&parts.headers, body, inner.cfg.max_body_bytes, Duration::from_secs(limits.body_timeout_secs))
        .await?;
    let header = parts.headers.get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let facts = RequestFacts { tenant: &tenant, method: parts.method.as_str(), path: parts.uri.path(), body: &body };
    let now = auth::now_unix();
    let unauthorized = |e: auth::AuthError| ReceiverError::new(ErrorKind::Unauthorized, e.to_string());
    let claims = inner.verifier.verify(header, &facts, now).map_err(unauthorized)?;
    inner.replay.admit(&claims, now).map_err(|refusal| match refusal {
        Refusal::Replayed(e) | Refusal::Malformed(e) => unauthorized(e),
        Refusal::Full => ReceiverError::new(
            ErrorKind::Unavailable,
            "the receiver remembers too many recent requests to accept another one now",
        ),
    })?;
    if let Some(served) = &inner.cfg.tenants {
        if !served.contains(&tenant) {
            return Err(ReceiverError::new(
                ErrorKind::Forbidden,
                format!("tenant {tenant} is not served by this receiver"),
            ));
        }
    }
    let slot = inner.slots.try_acquire(&tenant).ok_or_else(|| {
        ReceiverError::new(
            ErrorKind::TooManyRequests,
            format!(
                "tenant {tenant} already has {} requests in progress, the receiver's limit",
                limits.max_concurrent_per_tenant
            ),
        )
    })?;
    Ok(Admitted { tenant, claims, encoding, body, slot })
}

async fn perform(inner: &Inner, op: Op, a: &Admitted) -> Result<Response, ReceiverError> {
    let (tenant, claims, body) = (&a.tenant, &a.claims, &a.body);
    match op {
        Op::Authenticate => {
            let req: AuthenticateRequest = parse(body)?;
            tracing::info!(agent = %req.agent, nonce = %claims.nonce, "authenticated");
            let answer = AuthenticateResponse {
                replicate: inner.cfg.paused_reason.is_none(),
                token: auth::receiver_answer(&inner.partner_key, claims),
                reason: inner.cfg.paused_reason.clone(),
            };
            Ok(Json(answer).into_response())
        }
        Op::Schema => {
            let req: protocol::TableSchemaRequest = parse(body)?;
            let mut client = inner.client_for(tenant).await?;
            let answer = schema::apply(&mut client, tenant, &req, &inner.cfg).await?;
            Ok(Json(answer).into_response())
        }
        Op::Rows if a.encoding == Encoding::Copy => {
            let batch = CopyBatch::decode(body.clone()).map_err(ReceiverError::bad_request)?;
            tracing::Span::current().record("table", batch.header.table.as_str());
            check_batch_size(inner, batch.header.rows, batch.payload.len())?;
            let mut client = inner.client_for(tenant).await?;
            let answer = apply::apply(&mut client, tenant, &apply::Batch::copy(&batch)).await?;
            Ok(Json(answer).into_response())
        }
        Op::Rows => {
            let req: protocol::RowBatch = parse(body)?;
            tracing::Span::current().record("table", req.table.as_str());
            check_batch_size(inner, req.rows.len() as u64, body.len())?;
            let mut client = inner.client_for(tenant).await?;
            let answer = apply::apply(&mut client, tenant, &apply::Batch::json(&req)).await?;
            Ok(Json(answer).into_response())
        }
        Op::Advance => {
            let req: protocol::AdvanceRequest = parse(body)?;
            let mut client = inner.client_for(tenant).await?;
            let answer = advance::apply(&mut client, tenant, &req).await?;
            Ok(Json(answer).into_response())
        }
        Op::Reload => {
            let req: protocol::ReloadRequest = parse(body)?;
            tracing::Span::current().record("table", req.table.as_str());
            let mut client = inner.client_for(tenant).await?;
            let answer = reload::apply(&mut client, tenant, &req).await?;
            Ok(Json(answer).into_response())
        }
        Op::Completed => {
            let req: protocol::CompletedRequest = parse(body)?;
            let mut client = inner.client_for(tenant).await?;
            let answer = hooks::apply(&mut client, &inner.cfg.hooks, tenant, &req).await?;
            Ok(Json(answer).into_response())
        }
    }
}

/// The receiver's batch limits, separate from the body limit so that a
/// partner can allow large schema calls but bound what one transaction
/// writes.
fn check_batch_size(inner: &Inner, rows: u64, bytes: usize) -> Result<(), ReceiverError> {
    let l = &inner.cfg.limits;
    if rows > l.max_batch_rows {
        return Err(ReceiverError::new(
            ErrorKind::PayloadTooLarge,
            format!("batch has {rows} rows, more than the receiver's limit of {} rows per batch", l.max_batch_rows),
        ));
    }
    if bytes as u64 > l.max_batch_bytes {
        return Err(ReceiverError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "batch has {bytes} bytes of rows, more than the receiver's limit of {} bytes per batch",
                l.max_batch_bytes
            ),
        ));
    }
    Ok(())
}

/// Adds the receiver's signature of the answer (see `auth::sign_answer`).
/// Answers are small JSON documents, so reading one back costs nothing.
async fn sign(response: Response, claims: &Claims, key: &auth::Keypair) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return refuse(ReceiverError::internal(format!("cannot read back the answer: {e}"))),
    };
    let token = auth::sign_answer(key, claims, parts.status.as_u16(), &bytes);
    parts.headers.insert(
        auth::ANSWER_SIGNATURE_HEADER,
        HeaderValue::from_str(&token).expect("a token is base64url and a dot"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    /// A [`CopyBatch`]; RowData only.
    Copy,
}

/// `application/json` (parameters such as a charset allowed), or on
/// RowData also a COPY batch.
fn check_content_type(op: Op, headers: &HeaderMap) -> Result<Encoding, ReceiverError> {
    let value = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(Encoding::Json);
    }
    if matches!(op, Op::Rows) && essence.eq_ignore_ascii_case(copy::CONTENT_TYPE) {
        return Ok(Encoding::Copy);
    }
    let allowed = if matches!(op, Op::Rows) {
        format!("application/json or {}", copy::CONTENT_TYPE)
    } else {
        "application/json".to_owned()
    };
    Err(ReceiverError::new(
        ErrorKind::UnsupportedMediaType,
        format!("content type must be {allowed}, not {:?}", value.chars().take(80).collect::<String>()),
    ))
}

/// Reads the body, stopping as soon as it passes `limit` bytes (a declared
/// length beyond the limit is refused without reading anything) or takes
/// longer than `timeout`.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ReceiverError> {
    let too_large = || {
        ReceiverError::new(
            ErrorKind::PayloadTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ReceiverError::bad_request(format!("cannot read request body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(timeout, read).await.unwrap_or_else(|_| {
        Err(ReceiverError::new(
            ErrorKind::RequestTimeout,
            format!("request body did not arrive within {} seconds", timeout.as_secs()),
        ))
    })
}

/// Strict JSON: unknown fields and invalid UTF-8 are refused with serde's
/// message, which names the line and column.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ReceiverError> {
    // Every request is a JSON object; serde would also fill a struct from
    // an array of its fields in order, which the protocol does not allow.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ReceiverError::bad_request("invalid request body: expected a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| ReceiverError::bad_request(format!("invalid request body: {e}")))
}

//! The partner client: signed HTTP calls to one receiver for one tenant.
//!
//! Each call signs method, path and body afresh, so the receiver validates
//! every call on its own. Transient failures (connection refused, timeouts,
//! 5xx, 429) are retried a few times with jittered backoff; that is safe for
//! every operation because batches are compare-and-set on the receiver's
//! cursor, so a batch that was applied but whose answer was lost comes back
//! as "already applied".
//!
//! A 429 or 503 with Retry-After is waited out inside the cycle when it is
//! short; a longer one ends the call with the delay attached to the error, so
//! the scheduler comes back no sooner than the partner asked. Every request
//! first passes the partner's rate limits.

use super::error::{AgentError, AgentErrorKind};
use super::limits::PartnerLimits;
use super::trust::TlsTrust;
use crate::auth::{self, Claims, PublicKey, RequestSigner};
use crate::protocol::copy::{self, CopyBatch};
use bytes::Bytes;
use crate::protocol::{self, *};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Allowed clock difference when checking the receiver's Authenticate answer.
const ANSWER_SKEW_SECS: i64 = 300;

/// Longest Retry-After waited out within a cycle; longer ones go back to the
/// scheduler.
const MAX_RETRY_AFTER_IN_CYCLE: Duration = Duration::from_secs(30);

/// Longest Retry-After believed; a partner answering "come back next year"
/// is retried tomorrow.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A receiver's HTTP answer.
struct Answer {
    status: u16,
    bytes: bytes::Bytes,
    retry_after: Option<Duration>,
    /// The receiver's signature header, checked before the agent acts.
    signature: Option<String>,
}

pub struct PartnerClient {
    http: reqwest::Client,
    base_url: String,
    signer: RequestSigner,
    /// The partner's current key and, during a rotation, its next.
    partner_keys: Vec<PublicKey>,
    attempts: u32,
    limits: PartnerLimits,
    max_retry_after_wait: Duration,
}

/// What a batch call ended in.
pub enum BatchOutcome {
    Applied(RowBatchResponse),
    /// The receiver holds another cursor than the batch's `from`; the agent
    /// continues from the receiver's.
    Conflict(Option<Cursor>),
}

impl PartnerClient {
    /// `trust` decides which certificates the receiver may present and
    /// whether `base_url` may be plain HTTP (see [`TlsTrust`]).
    pub fn new(
        base_url: &str,
        signer: RequestSigner,
        partner_key: PublicKey,
        timeout: Duration,
        trust: &TlsTrust,
    ) -> Result<Self, AgentError> {
        let builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ctmirror-agent/", env!("CARGO_PKG_VERSION")));
        let http = trust
            .configure(base_url, builder)
            .map_err(|e| AgentError::new(AgentErrorKind::Config, e.to_string()))?
            .build()
            .map_err(|e| AgentError::new(AgentErrorKind::Config, format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            signer,
            partner_keys: vec![partner_key],
            attempts: 3,
            limits: PartnerLimits::default(),
            max_retry_after_wait: MAX_RETRY_AFTER_IN_CYCLE,
        })
    }

    /// Also trusts the partner's next key, so the partner can switch to it
    /// without a cycle failing.
    pub fn with_next_partner_key(mut self, key: Option<PublicKey>) -> Self {
        self.partner_keys.extend(key);
        self
    }

    /// Applies the partner's request and byte rate limits to every call.
    pub fn with_limits(mut self, limits: PartnerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a Retry-After may be waited out within the cycle.
    pub fn with_max_retry_after_wait(mut self, wait: Duration) -> Self {
        self.max_retry_after_wait = wait;
        self
    }

    /// Authenticates and checks the receiver's answer against the partner's
    /// registered key; returns the answer (which may say "do not replicate").
    pub async fn authenticate(&self) -> Result<AuthenticateResponse, AgentError> {
        let path = protocol::authenticate_path(&self.signer.tenant);
        let req = AuthenticateRequest { agent: concat!("ctmirror/", env!("CARGO_PKG_VERSION")).into() };
        let body = serde_json::to_vec(&req).expect("request serializes");
        let (claims, reply) = self.post_retrying(&path, body).await?;
        let answer: AuthenticateResponse = decode(&reply)?;
        auth::check_receiver_answer(&answer.token, &self.partner_keys, &claims, ANSWER_SKEW_SECS, auth::now_unix())
            .map_err(|e| AgentError::new(AgentErrorKind::Auth, format!("receiver's answer did not verify: {e}")))?;
        Ok(answer)
    }

    pub async fn send_schema(&self, req: &TableSchemaRequest) -> Result<TableSchemaResponse, AgentError> {
        self.call(&protocol::schema_path(&self.signer.tenant), req).await
    }

    /// Starts a reload of `table` into a shadow table (see [`ReloadRequest`]).
    pub async fn reload(&self, table: &str, reason: &str, source_identity: &str) -> Result<ReloadResponse, AgentError> {
        let req = ReloadRequest {
            table: table.to_owned(),
            reason: reason.to_owned(),
            source_identity: source_identity.to_owned(),
        };
        self.call(&protocol::reload_path(&self.signer.tenant), &req).await
    }

    /// Moves idle tables' cursors (see [`AdvanceRequest`]).
    pub async fn advance(&self, req: &AdvanceRequest) -> Result<AdvanceResponse, AgentError> {
        self.call(&protocol::advance_path(&self.signer.tenant), req).await
    }

    pub async fn completed(&self, req: &CompletedRequest) -> Result<CompletedResponse, AgentError> {
        self.call(&protocol::completed_path(&self.signer.tenant), req).await
    }

    /// Sends one JSON batch; returns the outcome and the request body's size.
    pub async fn send_batch(&self, batch: &RowBatch) -> Result<(BatchOutcome, usize), AgentError> {
        let body = serde_json::to_vec(batch).expect("batch serializes");
        self.send_rows(vec![body.into()], "application/json").await
    }

    /// Sends one COPY batch (what the agent's cycles send); returns the
    /// outcome and the request body's size.
    pub async fn send_copy_batch(&self, batch: &CopyBatch) -> Result<(BatchOutcome, usize), AgentError> {
        self.send_rows(batch.encode_parts().to_vec(), copy::CONTENT_TYPE).await
    }

    async fn send_rows(&self, body: Vec<Bytes>, content_type: &'static str) -> Result<(BatchOutcome, usize), AgentError> {
        let path = protocol::rows_path(&self.signer.tenant);
        let size = body.iter().map(Bytes::len).sum();
        let (_, reply) = self.post_retrying_as(&path, body, content_type).await?;
        if reply.status == 409 {
            if let Ok(err) = serde_json::from_slice::<ErrorBody>(&reply.bytes) {
                if err.error.kind == "conflict" {
                    return Ok((BatchOutcome::Conflict(err.error.cursor), size));
                }
            }
        }
        Ok((BatchOutcome::Applied(decode(&reply)?), size))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, path: &str, req: &Req) -> Result<Resp, AgentError> {
        let body = serde_json::to_vec(req).expect("request serializes");
        let (_, reply) = self.post_retrying(path, body).await?;
        decode(&reply)
    }

    /// Posts with retries; returns the claims of the attempt that answered
    /// (the Authenticate answer is checked against them) and its answer.
    async fn post_retrying(&self, path: &str, body: Vec<u8>) -> Result<(Claims, Answer), AgentError> {
        self.post_retrying_as(path, vec![body.into()], "application/json").await
    }

    /// The body comes in parts (a COPY batch's header and rows) so that the
    /// rows are sent from the buffer they were read into.
    async fn post_retrying_as(
        &self,
        path: &str,
        body: Vec<Bytes>,
        content_type: &'static str,
    ) -> Result<(Claims, Answer), AgentError> {
        let len: usize = body.iter().map(Bytes::len).sum();
        let digest = digest_off_task(&body, len).await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limits.before_request(len).await;
            // A fresh token per attempt: each one has its own nonce and time.
            let (claims, header) = self.signer.authorize_digest("POST", path, digest.clone());
            // `Bytes` clones share the buffers: a retry does not copy the batch.
            let result = self.post_once(path, body.clone(), len, header, content_type).await;
            let delay = match &result {
                Err(e) if e.is_retryable() => Some(backoff(attempt)),
                Err(_) => None,
                Ok(a) => match a.retry_after {
                    Some(wait) if wait <= self.max_retry_after_wait => Some(wait),
                    Some(_) => None,
                    None if a.status >= 500 || a.status == 429 => Some(backoff(attempt)),
                    None => None,
                },
            };
            match delay {
                Some(delay) if attempt < self.attempts => {
                    tracing::warn!(path, attempt, ?delay, "receiver unavailable or busy; retrying");
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    let answer = result?;
                    self.check_signature(&claims, &answer)?;
                    return Ok((claims, answer));
                }
            }
        }
    }

    /// Every answer the agent acts on (a success, or a conflict naming the
    /// receiver's cursor) must carry the partner's signature over this
    /// request's nonce, the status and the body; otherwise someone between
    /// agent and partner could move the cursor and lose rows. Other
    /// refusals end the call either way, so they are taken as they come.
    fn check_signature(&self, sent: &Claims, answer: &Answer) -> Result<(), AgentError> {
        if !((200..300).contains(&answer.status) || answer.status == 409) {
            return Ok(());
        }
        auth::check_answer(
            answer.signature.as_deref(),
            &self.partner_keys,
            sent,
            answer.status,
            &answer.bytes,
            ANSWER_SKEW_SECS,
            auth::now_unix(),
        )
        .map_err(|e| AgentError::new(AgentErrorKind::Auth, format!("receiver's answer did not verify: {e}")))
    }

    async fn post_once(
        &self,
        path: &str,
        mut body: Vec<Bytes>,
        len: usize,
        header: String,
        content_type: &'static str,
    ) -> Result<Answer, AgentError> {
        let url = format!("{}{}", self.base_url, path);
        let body = if body.len() == 1 {
            reqwest::Body::from(body.pop().expect("one part"))
        } else {
            reqwest::Body::wrap_stream(futures_util::stream::iter(body.into_iter().map(Ok::<_, std::io::Error>)))
        };
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, header)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| send_error(&url, &e))?;
        let status = resp.status().as_u16();
        let retry_after = if status == 429 || status == 503 {
            resp.headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
        } else {
            None
        };
        let signature = resp
            .headers()
            .get(auth::ANSWER_SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = read_answer(resp, MAX_ANSWER_BYTES).await.map_err(|mut e| {
            e.message = format!("{url}: {}", e.message);
            e
        })?;
        Ok(Answer { status, bytes, retry_after, signature })
    }
}

/// Bodies at least this large are hashed on a blocking thread.
const HASH_ELSEWHERE_FROM: usize = 256 * 1024;

/// SHA-256 of a body in parts. A batch of several MiB takes milliseconds
/// to hash on CPUs without SHA instructions; on a blocking thread that time
/// overlaps with reading the next chunk from the source (the pipelined
/// table sync polls both on one task) instead of stalling it.
async fn digest_off_task(body: &[Bytes], len: usize) -> String {
    let hash = |parts: &[Bytes]| auth::body_digest_parts(&parts.iter().map(|b| &b[..]).collect::<Vec<_>>());
    if len < HASH_ELSEWHERE_FROM {
        return hash(body);
    }
    let parts = body.to_vec();
    match tokio::task::spawn_blocking(move || hash(&parts)).await {
        Ok(digest) => digest,
        Err(_) => hash(body),
    }
}

/// Largest answer read from a partner. Real answers are small JSON (a
/// schema answer for hundreds of tables is well under 1 MiB); the bound
/// keeps a broken or hostile partner from filling the agent's memory.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// Reads an answer's body, refusing one beyond `limit` bytes.
async fn read_answer(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, AgentError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_long_answer(limit));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| AgentError::new(AgentErrorKind::Transient, format!("reading answer: {e}")))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(too_long_answer(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn too_long_answer(limit: usize) -> AgentError {
    AgentError::new(AgentErrorKind::Refused, format!("answer is larger than the agent's limit of {limit} bytes"))
}

/// Exponential backoff with jitter between attempts within one call.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(jitter(200u64 << (2 * (attempt - 1).min(8))))
}

/// Retry-After is either delay-seconds or an HTTP date (RFC 9110 §10.2.3).
/// Garbage is ignored (the ordinary backoff applies); absurd values are
/// capped.
fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Full jitter: a uniform delay in [base/2, base].
fn jitter(base_ms: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).ok();
    base_ms / 2 + u64::from_le_bytes(b) % (base_ms / 2 + 1)
}

/// A failed send. A certificate the agent does not trust is definite: it
/// needs an operator (a CA file, a renewed certificate), and retrying soon
/// only repeats the handshake, so it is an [`AgentErrorKind::Auth`] failure;
/// everything else on the way (refused, reset, timed out) is transient.
fn send_error(url: &str, e: &reqwest::Error) -> AgentError {
    let chain = error_chain(e);
    if chain.contains("invalid peer certificate") {
        return AgentError::new(AgentErrorKind::Auth, format!("POST {url}: TLS: the receiver's certificate is not trusted: {chain}"));
    }
    AgentError::new(AgentErrorKind::Transient, format!("POST {url}: {chain}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn decode<T: DeserializeOwned>(answer: &Answer) -> Result<T, AgentError> {
    decode_parts(answer.status, &answer.bytes).map_err(|mut e| {
        e.retry_after = answer.retry_after;
        e
    })
}

fn decode_parts<T: DeserializeOwned>(status: u16, bytes: &[u8]) -> Result<T, AgentError> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(bytes).map_err(|e| {
            AgentError::new(AgentErrorKind::Fatal, format!("receiver's answer is not the expected JSON: {e}"))
        });
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(err) => Err(AgentError::from_receiver(status, &err.error)),
        Err(_) => {
            let text: String = String::from_utf8_lossy(bytes).chars().take(200).collect();
            let kind = if status >= 500 || status == 429 {
                AgentErrorKind::Transient
            } else if status == 401 {
                AgentErrorKind::Auth
            } else {
                AgentErrorKind::Refused
            };
            Err(AgentError::new(kind, format!("receiver answered {status}: {text}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_reads_seconds_and_http_dates_and_ignores_garbage() {
        let now = chrono::Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 22 Nov 2026 10:01:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Sun, 22 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999", now), Some(MAX_RETRY_AFTER));
        for garbage in ["", "soon", "-5", "1.5", "12abc", "Sun, 99 Nov 2026 10:01:30 GMT"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_beyond_the_limit_is_refused_not_buffered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // One answer declares its huge length, the other streams without one.
        let app = axum::Router::new()
            .route("/declared", axum::routing::get(|| async { vec![b'x'; 2048] }))
            .route(
                "/streamed",
                axum::routing::get(|| async {
                    let chunks = futures_util::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 64])));
                    axum::body::Body::from_stream(chunks)
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        let http = reqwest::Client::new();
        for path in ["/declared", "/streamed"] {
            let resp = http.get(format!("{url}{path}")).send().await.unwrap();
            let e = read_answer(resp, 1024).await.unwrap_err();
            assert_eq!(e.kind, AgentErrorKind::Refused, "{path}: {e}");
            assert!(e.message.contains("limit of 1024 bytes"), "{path}: {e}");
        }
        let resp = http.get(format!("{url}/declared")).send().await.unwrap();
        assert_eq!(read_answer(resp, 4096).await.unwrap().len(), 2048);
    }

    #[test]
    fn backoff_between_attempts_grows_and_stays_bounded() {
        assert!(backoff(1) <= Duration::from_millis(200));
        assert!(backoff(2) >= Duration::from_millis(400) && backoff(2) <= Duration::from_millis(800));
        assert!(backoff(50) <= Duration::from_millis(200 << 16));
    }
}

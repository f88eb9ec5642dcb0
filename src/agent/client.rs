//! The partner client: signed HTTP calls to one receiver for one tenant.
//!
//! Each call signs method, path and body afresh, so the receiver validates
//! every call on its own. Transient failures (connection refused, timeouts,
//! 5xx, 429) are retried a few times with jittered backoff; that is safe for
//! every operation because batches are compare-and-set on the receiver's
//! cursor, so a batch that was applied but whose answer was lost comes back
//! as "already applied".

use super::error::{AgentError, AgentErrorKind};
use crate::auth::{self, PublicKey, RequestSigner};
use crate::protocol::{self, *};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Allowed clock difference when checking the receiver's Authenticate answer.
const ANSWER_SKEW_SECS: i64 = 300;

pub struct PartnerClient {
    http: reqwest::Client,
    base_url: String,
    signer: RequestSigner,
    partner_key: PublicKey,
    attempts: u32,
}

/// What a batch call ended in.
pub enum BatchOutcome {
    Applied(RowBatchResponse),
    /// The receiver holds another cursor than the batch's `from`; the agent
    /// continues from the receiver's.
    Conflict(Option<Cursor>),
}

impl PartnerClient {
    pub fn new(
        base_url: &str,
        signer: RequestSigner,
        partner_key: PublicKey,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ctmirror-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AgentError::new(AgentErrorKind::Config, format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            signer,
            partner_key,
            attempts: 3,
        })
    }

    /// Authenticates and checks the receiver's answer against the partner's
    /// registered key; returns the answer (which may say "do not replicate").
    pub async fn authenticate(&self) -> Result<AuthenticateResponse, AgentError> {
        let path = protocol::authenticate_path(&self.signer.tenant);
        let req = AuthenticateRequest { agent: concat!("ctmirror/", env!("CARGO_PKG_VERSION")).into() };
        let body = serde_json::to_vec(&req).expect("request serializes");
        let (claims, header) = self.signer.authorize("POST", &path, &body);
        let (status, bytes) = self.post_once(&path, body, header).await?;
        let answer: AuthenticateResponse = decode(status, &bytes)?;
        auth::check_receiver_answer(&answer.token, &self.partner_key, &claims, ANSWER_SKEW_SECS, auth::now_unix())
            .map_err(|e| AgentError::new(AgentErrorKind::Auth, format!("receiver's answer did not verify: {e}")))?;
        Ok(answer)
    }

    pub async fn send_schema(&self, req: &TableSchemaRequest) -> Result<TableSchemaResponse, AgentError> {
        self.call(&protocol::schema_path(&self.signer.tenant), req).await
    }

    pub async fn wipe(&self, table: &str) -> Result<WipeResponse, AgentError> {
        self.call(&protocol::wipe_path(&self.signer.tenant), &WipeRequest { table: table.to_owned() }).await
    }

    pub async fn completed(&self, req: &CompletedRequest) -> Result<CompletedResponse, AgentError> {
        self.call(&protocol::completed_path(&self.signer.tenant), req).await
    }

    /// Sends one batch; returns the outcome and the request body's size.
    pub async fn send_batch(&self, batch: &RowBatch) -> Result<(BatchOutcome, usize), AgentError> {
        let path = protocol::rows_path(&self.signer.tenant);
        let body = serde_json::to_vec(batch).expect("batch serializes");
        let size = body.len();
        let (status, bytes) = self.post_retrying(&path, body).await?;
        if status == 409 {
            if let Ok(err) = serde_json::from_slice::<ErrorBody>(&bytes) {
                if err.error.kind == "conflict" {
                    return Ok((BatchOutcome::Conflict(err.error.cursor), size));
                }
            }
        }
        Ok((BatchOutcome::Applied(decode(status, &bytes)?), size))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, path: &str, req: &Req) -> Result<Resp, AgentError> {
        let body = serde_json::to_vec(req).expect("request serializes");
        let (status, bytes) = self.post_retrying(path, body).await?;
        decode(status, &bytes)
    }

    async fn post_retrying(&self, path: &str, body: Vec<u8>) -> Result<(u16, bytes::Bytes), AgentError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A fresh token per attempt: each one has its own nonce and time.
            let (_, header) = self.signer.authorize("POST", path, &body);
            let result = self.post_once(path, body.clone(), header).await;
            let retry = match &result {
                Err(e) => e.is_retryable(),
                Ok((status, _)) => *status >= 500 || *status == 429,
            };
            if !retry || attempt >= self.attempts {
                return result;
            }
            let base = 200u64 << (2 * (attempt - 1));
            let delay = Duration::from_millis(jitter(base));
            tracing::warn!(path, attempt, ?delay, "transient failure talking to the receiver; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn post_once(&self, path: &str, body: Vec<u8>, header: String) -> Result<(u16, bytes::Bytes), AgentError> {
        let url = format!("{}{}", self.base_url, path);
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, header)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| AgentError::new(AgentErrorKind::Transient, format!("POST {url}: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| AgentError::new(AgentErrorKind::Transient, format!("reading answer of {url}: {e}")))?;
        Ok((status, bytes))
    }
}

/// Full jitter: a uniform delay in [base/2, base].
fn jitter(base_ms: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).ok();
    base_ms / 2 + u64::from_le_bytes(b) % (base_ms / 2 + 1)
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

fn decode<T: DeserializeOwned>(status: u16, bytes: &[u8]) -> Result<T, AgentError> {
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

//! Signed tokens: ed25519 over a small JSON claim set.
//!
//! Every agent request carries a fresh token in `Authorization: CtMirror
//! <token>`, so the receiver validates each call on its own; there are no
//! sessions. A token is `base64url(claims) "." base64url(signature)`, and the
//! signature covers a role-specific prefix plus the encoded claims, so an
//! agent token can never pass as a receiver token or the other way round.
//!
//! The claims bind method, path and a SHA-256 hash of the body, so a token
//! captured in transit cannot carry another body; the receiver remembers the
//! nonces it accepted (`receiver::replay`), so it cannot be sent twice either.
//! The receiver signs every answer to an authenticated request the same way
//! ([`sign_answer`]), bound to the request's nonce, its status and its body,
//! and the agent acts on no answer that does not verify ([`check_answer`]).
//!
//! Each side trusts a list of its peer's public keys, the current one and
//! during a rotation the next, so either side changes keys without downtime.

use crate::ids::{AppId, TenantId};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Who signed a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Agent,
    Receiver,
}

impl Role {
    fn context(self) -> &'static [u8] {
        match self {
            Role::Agent => b"ctmirror-agent-token-v1.",
            Role::Receiver => b"ctmirror-receiver-token-v1.",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub role: Role,
    pub tenant: TenantId,
    pub app: AppId,
    /// Seconds since the Unix epoch, UTC.
    pub ts: i64,
    /// 16 random bytes, base64url.
    pub nonce: String,
    pub method: String,
    pub path: String,
    /// Hex SHA-256 of the request body (of the answer body in an answer
    /// signature).
    pub body_sha256: String,
    /// Only in answer signatures: the HTTP status of the answer, so a
    /// refusal cannot be passed off as a success or the other way round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// Why a token was refused. Messages name the failed check and never include
/// key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing Authorization header with scheme CtMirror")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("signature does not verify with the configured key")]
    BadSignature,
    #[error("token was signed by the {0:?} role where the other role was expected")]
    WrongRole(Role),
    #[error("token timestamp is {0} seconds away from this server's clock, outside the allowed window")]
    OutsideWindow(i64),
    #[error("token is for tenant {token}, but the request is for tenant {request}")]
    WrongTenant { token: String, request: String },
    #[error("token is for application {0}, which this receiver does not serve")]
    WrongApp(String),
    #[error("token was signed for {token}, not for {request}")]
    WrongRequest { token: String, request: String },
    #[error("signed body hash does not match the body: the body was changed or belongs to another message")]
    BodyMismatch,
    #[error("answer is for nonce {0}, not for the nonce the agent sent")]
    WrongNonce(String),
    #[error("token nonce was already used; a captured token cannot be sent again")]
    Replayed,
    #[error("answer is not signed: the {0} header is missing")]
    UnsignedAnswer(&'static str),
    #[error("answer signature is for status {signed:?}, but the answer has status {actual}")]
    WrongStatus { signed: Option<u16>, actual: u16 },
}

/// Hex SHA-256 of a request body. SHA-256 because every partner's
/// platform has it in its standard library (a partner may write its own
/// receiver); ring's assembly implementation because on CPUs without SHA
/// instructions the hash is a visible share of a full load's CPU (see
/// `docs/security.md`).
pub fn body_digest(body: &[u8]) -> String {
    body_digest_parts(&[body])
}

/// [`body_digest`] of a body sent in parts (their concatenation).
pub fn body_digest_parts(parts: &[&[u8]]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finish())
}

/// Bytes of randomness in a nonce; a token whose nonce has another length is
/// malformed, so the replay cache holds fixed-size entries.
pub const NONCE_BYTES: usize = 16;

/// The decoded nonce of a token, or why it is not one.
pub fn nonce_bytes(nonce: &str) -> Result<[u8; NONCE_BYTES], AuthError> {
    URL_SAFE_NO_PAD
        .decode(nonce)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(AuthError::Malformed("nonce must be 16 random bytes, base64url without padding"))
}

pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("operating system random source");
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A private signing key. Never printed: `Debug` shows only the public half.
#[derive(Clone)]
pub struct Keypair {
    key: SigningKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair(public {})", self.public_base64())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key in {origin} is not valid: {reason}")]
    Invalid { origin: String, reason: &'static str },
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    #[error("cannot write key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Key files hold one line of standard base64: the 32-byte secret seed for a
/// private key, the 32-byte point for a public key. A location of the form
/// `env:NAME` reads the same text from an environment variable instead.
fn read_key_text(location: &str) -> Result<(String, String), KeyError> {
    if let Some(var) = location.strip_prefix("env:") {
        let text = std::env::var(var).map_err(|_| KeyError::MissingEnv(var.to_owned()))?;
        Ok((text, format!("environment variable {var}")))
    } else {
        let text = std::fs::read_to_string(location)
            .map_err(|source| KeyError::Read { path: location.to_owned(), source })?;
        Ok((text, format!("file {location}")))
    }
}

fn decode_32(text: &str, origin: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Invalid {
        origin: origin.to_owned(),
        reason: "not base64",
    })?;
    bytes.try_into().map_err(|_| KeyError::Invalid {
        origin: origin.to_owned(),
        reason: "expected exactly 32 bytes",
    })
}

impl Keypair {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("operating system random source");
        Self { key: SigningKey::from_bytes(&seed) }
    }

    pub fn load(location: &str) -> Result<Self, KeyError> {
        let (text, origin) = read_key_text(location)?;
        Ok(Self { key: SigningKey::from_bytes(&decode_32(&text, &origin)?) })
    }

    /// A key from a fixed 32-byte seed. For fuzzing and tests, whose
    /// inputs must verify the same way on every run; real keys come from
    /// [`Keypair::generate`] and [`Keypair::load`].
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&seed) }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.key.verifying_key().to_bytes())
    }

    /// Writes `<stem>.key` (mode 0600) and `<stem>.pub`; refuses to overwrite.
    pub fn write_files(&self, stem: &Path) -> Result<(String, String), KeyError> {
        let private = stem.with_extension("key");
        let public = stem.with_extension("pub");
        let write = |path: &Path, text: String, mode: u32| {
            create_new_file(path, &text, mode)
                .map_err(|source| KeyError::Write { path: path.display().to_string(), source })
        };
        write(&private, format!("{}\n", STANDARD.encode(self.key.to_bytes())), 0o600)?;
        write(&public, format!("{}\n", self.public_base64()), 0o644)?;
        Ok((private.display().to_string(), public.display().to_string()))
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let encoded = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let mut message = claims.role.context().to_vec();
        message.extend_from_slice(encoded.as_bytes());
        let sig = self.key.sign(&message);
        format!("{encoded}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", STANDARD.encode(self.0.to_bytes()))
    }
}

impl PublicKey {
    pub fn load(location: &str) -> Result<Self, KeyError> {
        let (text, origin) = read_key_text(location)?;
        let bytes = decode_32(&text, &origin)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::Invalid { origin, reason: "not a valid ed25519 public key" })
    }
}

/// Writes a new file for key material, refusing to replace an existing
/// one. The mode is set when the file is created, so a private key is never
/// readable by others, not even between creation and a chmod.
pub(crate) fn create_new_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    opts.open(path)?.write_all(text.as_bytes())
}

/// Longest token accepted before any decoding; real ones are ~500 bytes.
const MAX_TOKEN_LEN: usize = 4096;

/// Splits and checks the signature of a token without judging its claims.
/// `keys` are the signer's trusted keys (current and next); any one of them
/// verifying is enough.
pub fn decode_verified(token: &str, role: Role, keys: &[PublicKey]) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("token is too long"));
    }
    let (encoded, sig) = token.split_once('.').ok_or(AuthError::Malformed("expected claims.signature"))?;
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
    let sig_bytes: [u8; 64] =
        sig_bytes.try_into().map_err(|_| AuthError::Malformed("signature is not 64 bytes"))?;
    let mut message = role.context().to_vec();
    message.extend_from_slice(encoded.as_bytes());
    let signature = Signature::from_bytes(&sig_bytes);
    if !keys.iter().any(|key| key.0.verify_strict(&message, &signature).is_ok()) {
        return Err(AuthError::BadSignature);
    }
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| AuthError::Malformed("claims are not base64url"))?;
    let claims: Claims =
        serde_json::from_slice(&json).map_err(|_| AuthError::Malformed("claims are not the expected JSON"))?;
    if claims.role != role {
        return Err(AuthError::WrongRole(claims.role));
    }
    nonce_bytes(&claims.nonce)?;
    if (role == Role::Agent) != claims.status.is_none() {
        return Err(AuthError::Malformed("status claim belongs to answers only"));
    }
    Ok(claims)
}

/// What a request looked like, for checking the token it carried.
pub struct RequestFacts<'a> {
    pub tenant: &'a TenantId,
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
}

/// Receiver-side token checks (all but the replay check, which needs the
/// receiver's memory of accepted nonces).
pub struct Verifier {
    /// The agent's current key and, during a rotation, its next.
    pub agent_keys: Vec<PublicKey>,
    pub app: AppId,
    pub max_skew_secs: i64,
}

impl Verifier {
    /// Checks an `Authorization` header value against the request it came with.
    pub fn verify(&self, header: Option<&str>, req: &RequestFacts<'_>, now: i64) -> Result<Claims, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix(crate::protocol::AUTH_SCHEME)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or(AuthError::Missing)?;
        let claims = decode_verified(token.trim(), Role::Agent, &self.agent_keys)?;
        check_window(claims.ts, now, self.max_skew_secs)?;
        check_addressed(&claims, req.tenant, &self.app, req.method, req.path)?;
        if claims.body_sha256 != body_digest(req.body) {
            return Err(AuthError::BodyMismatch);
        }
        Ok(claims)
    }
}

/// Agent side: signs each request for one tenant and application.
pub struct RequestSigner {
    pub key: Keypair,
    pub tenant: TenantId,
    pub app: AppId,
}

impl RequestSigner {
    /// The claims and the full `Authorization` header value for one request.
    pub fn authorize(&self, method: &str, path: &str, body: &[u8]) -> (Claims, String) {
        self.authorize_digest(method, path, body_digest(body))
    }

    /// [`RequestSigner::authorize`] with the body's digest already taken
    /// (once per batch, however many attempts it takes).
    pub fn authorize_digest(&self, method: &str, path: &str, body_sha256: String) -> (Claims, String) {
        let claims = Claims {
            role: Role::Agent,
            tenant: self.tenant.clone(),
            app: self.app.clone(),
            ts: now_unix(),
            nonce: new_nonce(),
            method: method.to_owned(),
            path: path.to_owned(),
            body_sha256,
            status: None,
        };
        let header = format!("{} {}", crate::protocol::AUTH_SCHEME, self.key.sign(&claims));
        (claims, header)
    }
}

/// The HTTP header carrying the receiver's signature of an answer.
pub const ANSWER_SIGNATURE_HEADER: &str = "ctmirror-signature";

/// The receiver's answer to Authenticate: its own token over the agent's
/// nonce, which the agent checks with the partner's registered key.
pub fn receiver_answer(key: &Keypair, request: &Claims) -> String {
    sign_answer(key, request, 200, b"")
}

/// The receiver's signature of one answer: the request's claims (so its
/// nonce, tenant, application, method and path) with the receiver's role
/// and time, the answer's status and the hash of the answer's body.
pub fn sign_answer(key: &Keypair, request: &Claims, status: u16, body: &[u8]) -> String {
    let claims = Claims {
        role: Role::Receiver,
        ts: now_unix(),
        body_sha256: body_digest(body),
        status: Some(status),
        ..request.clone()
    };
    key.sign(&claims)
}

/// Checks the claims of a receiver token against the request they answer.
fn check_answer_claims(claims: &Claims, sent: &Claims, max_skew_secs: i64, now: i64) -> Result<(), AuthError> {
    if claims.nonce != sent.nonce {
        return Err(AuthError::WrongNonce(claims.nonce.clone()));
    }
    check_addressed(claims, &sent.tenant, &sent.app, &sent.method, &sent.path)?;
    check_window(claims.ts, now, max_skew_secs)
}

/// Refuses a token signed for another tenant, application, method or path
/// than the message it came with, naming which.
fn check_addressed(claims: &Claims, tenant: &TenantId, app: &AppId, method: &str, path: &str) -> Result<(), AuthError> {
    if &claims.tenant != tenant {
        return Err(AuthError::WrongTenant { token: claims.tenant.to_string(), request: tenant.to_string() });
    }
    if &claims.app != app {
        return Err(AuthError::WrongApp(claims.app.to_string()));
    }
    if claims.method != method || claims.path != path {
        return Err(AuthError::WrongRequest {
            token: format!("{} {}", claims.method, claims.path),
            request: format!("{method} {path}"),
        });
    }
    Ok(())
}

/// Refuses a token whose timestamp is more than `max_skew_secs` away from
/// `now`, either way. The distance is taken without overflow: a signed timestamp is
/// attacker-chosen, and with `i64::MIN` a plain `abs()` panics in debug
/// builds and wraps to a negative skew (inside every window) in release.
fn check_window(ts: i64, now: i64, max_skew_secs: i64) -> Result<(), AuthError> {
    if ts.abs_diff(now) > max_skew_secs.max(0).unsigned_abs() {
        return Err(AuthError::OutsideWindow(ts.saturating_sub(now)));
    }
    Ok(())
}

/// Checks the token inside an Authenticate answer.
pub fn check_receiver_answer(
    token: &str,
    partner_keys: &[PublicKey],
    sent: &Claims,
    max_skew_secs: i64,
    now: i64,
) -> Result<(), AuthError> {
    let claims = decode_verified(token, Role::Receiver, partner_keys)?;
    check_answer_claims(&claims, sent, max_skew_secs, now)
}

/// Checks an answer's signature header: signed by one of the partner's
/// keys, for the request the agent sent (`sent`), with this status and body.
pub fn check_answer(
    header: Option<&str>,
    partner_keys: &[PublicKey],
    sent: &Claims,
    status: u16,
    body: &[u8],
    max_skew_secs: i64,
    now: i64,
) -> Result<(), AuthError> {
    let token = header.ok_or(AuthError::UnsignedAnswer(ANSWER_SIGNATURE_HEADER))?;
    let claims = decode_verified(token.trim(), Role::Receiver, partner_keys)?;
    check_answer_claims(&claims, sent, max_skew_secs, now)?;
    if claims.status != Some(status) {
        return Err(AuthError::WrongStatus { signed: claims.status, actual: status });
    }
    if claims.body_sha256 != body_digest(body) {
        return Err(AuthError::BodyMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Keypair, Verifier, TenantId) {
        let agent = Keypair::generate();
        let v = Verifier { agent_keys: vec![agent.public()], app: AppId::new("crm").unwrap(), max_skew_secs: 300 };
        (agent, v, TenantId::new("acme").unwrap())
    }

    fn header(key: &Keypair, claims: &Claims) -> String {
        format!("CtMirror {}", key.sign(claims))
    }

    fn claims(t: &TenantId, body: &[u8]) -> Claims {
        Claims {
            role: Role::Agent,
            tenant: t.clone(),
            app: AppId::new("crm").unwrap(),
            ts: now_unix(),
            nonce: new_nonce(),
            method: "POST".into(),
            path: "/v1/tenants/acme/rows".into(),
            body_sha256: body_digest(body),
            status: None,
        }
    }

    fn facts<'a>(t: &'a TenantId, body: &'a [u8]) -> RequestFacts<'a> {
        RequestFacts { tenant: t, method: "POST", path: "/v1/tenants/acme/rows", body }
    }

    #[test]
    fn a_fresh_token_verifies() {
        let (k, v, t) = setup();
        let h = header(&k, &claims(&t, b"{}"));
        assert!(v.verify(Some(&h), &facts(&t, b"{}"), now_unix()).is_ok());
    }

    #[test]
    fn each_check_fails_on_its_own() {
        let (k, v, t) = setup();
        let now = now_unix();
        let c = claims(&t, b"{}");
        assert_eq!(v.verify(None, &facts(&t, b"{}"), now), Err(AuthError::Missing));
        assert_eq!(v.verify(Some("Bearer x"), &facts(&t, b"{}"), now), Err(AuthError::Missing));
        assert_eq!(v.verify(Some(&header(&k, &c)), &facts(&t, b"{ }"), now), Err(AuthError::BodyMismatch));
        assert!(matches!(v.verify(Some(&header(&k, &c)), &facts(&t, b"{}"), now + 301), Err(AuthError::OutsideWindow(_))));
        assert!(matches!(v.verify(Some(&header(&k, &c)), &facts(&t, b"{}"), now - 301), Err(AuthError::OutsideWindow(_))));
        let other = TenantId::new("other").unwrap();
        assert!(matches!(v.verify(Some(&header(&k, &c)), &facts(&other, b"{}"), now), Err(AuthError::WrongTenant { .. })));
        let stranger = Keypair::generate();
        assert_eq!(v.verify(Some(&header(&stranger, &c)), &facts(&t, b"{}"), now), Err(AuthError::BadSignature));
        let mut wrong_path = c.clone();
        wrong_path.path = "/v1/tenants/acme/wipe".into();
        assert!(matches!(v.verify(Some(&header(&k, &wrong_path)), &facts(&t, b"{}"), now), Err(AuthError::WrongRequest { .. })));
        let mut receiver_role = c.clone();
        receiver_role.role = Role::Receiver;
        assert_eq!(v.verify(Some(&header(&k, &receiver_role)), &facts(&t, b"{}"), now), Err(AuthError::BadSignature));
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_outside_the_window() {
        let (k, v, t) = setup();
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let mut c = claims(&t, b"{}");
            c.ts = ts;
            let r = v.verify(Some(&header(&k, &c)), &facts(&t, b"{}"), now_unix());
            assert!(matches!(r, Err(AuthError::OutsideWindow(_))), "ts {ts}: {r:?}");
            // The agent's check of the receiver's answer has the same window.
            let mut answer = c.clone();
            answer.role = Role::Receiver;
            answer.status = Some(200);
            let answer = k.sign(&answer);
            assert!(matches!(check_receiver_answer(&answer, &[k.public()], &c, 300, now_unix()), Err(AuthError::OutsideWindow(_))), "ts {ts}");
        }
    }

    #[test]
    fn garbled_tokens_are_malformed_not_panics() {
        let (k, v, t) = setup();
        let good = k.sign(&claims(&t, b""));
        let (enc, sig) = good.split_once('.').unwrap();
        let cases = [
            String::new(),
            "nodot".into(),
            format!("{enc}."),
            format!(".{sig}"),
            format!("{enc}.{}", &sig[..10]),
            format!("{enc}!.{sig}"),
            format!("{}.{sig}", &enc[..enc.len() - 3]),
            "a".repeat(5000),
            format!("{enc}.{sig}.{sig}"),
        ];
        for c in cases {
            let r = v.verify(Some(&format!("CtMirror {c}")), &facts(&t, b""), now_unix());
            assert!(matches!(r, Err(AuthError::Malformed(_)) | Err(AuthError::BadSignature)), "{c:?}: {r:?}");
        }
    }

    #[test]
    fn receiver_answer_is_bound_to_the_nonce() {
        let (_, _, t) = setup();
        let partner = Keypair::generate();
        let sent = claims(&t, b"");
        let answer = receiver_answer(&partner, &sent);
        assert!(check_receiver_answer(&answer, &[partner.public()], &sent, 300, now_unix()).is_ok());
        let other = claims(&t, b"");
        assert!(matches!(check_receiver_answer(&answer, &[partner.public()], &other, 300, now_unix()), Err(AuthError::WrongNonce(_))));
        assert_eq!(
            check_receiver_answer(&answer, &[Keypair::generate().public()], &sent, 300, now_unix()),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn current_and_next_agent_keys_both_verify_during_a_rotation() {
        let (current, mut v, t) = setup();
        let next = Keypair::generate();
        let c = claims(&t, b"{}");
        assert_eq!(v.verify(Some(&header(&next, &c)), &facts(&t, b"{}"), now_unix()), Err(AuthError::BadSignature));
        v.agent_keys.push(next.public());
        assert!(v.verify(Some(&header(&next, &c)), &facts(&t, b"{}"), now_unix()).is_ok());
        assert!(v.verify(Some(&header(&current, &c)), &facts(&t, b"{}"), now_unix()).is_ok());
        v.agent_keys.remove(0);
        assert_eq!(v.verify(Some(&header(&current, &c)), &facts(&t, b"{}"), now_unix()), Err(AuthError::BadSignature));
    }

    #[test]
    fn nonces_that_are_not_sixteen_random_bytes_are_malformed() {
        let (k, v, t) = setup();
        for nonce in ["", "short", "AAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAA=", "!!!!!!!!!!!!!!!!!!!!!!"] {
            let mut c = claims(&t, b"{}");
            c.nonce = nonce.into();
            let r = v.verify(Some(&header(&k, &c)), &facts(&t, b"{}"), now_unix());
            assert!(matches!(r, Err(AuthError::Malformed(m)) if m.contains("nonce")), "{nonce:?}: {r:?}");
        }
        let mut with_status = claims(&t, b"{}");
        with_status.status = Some(200);
        let r = v.verify(Some(&header(&k, &with_status)), &facts(&t, b"{}"), now_unix());
        assert!(matches!(r, Err(AuthError::Malformed(_))), "{r:?}");
    }

    #[test]
    fn answer_signatures_bind_nonce_status_and_body() {
        let (_, _, t) = setup();
        let partner = Keypair::generate();
        let next = Keypair::generate();
        let keys = [partner.public(), next.public()];
        let sent = claims(&t, b"{}");
        let now = now_unix();
        let body = br#"{"cursor":1}"#;
        let sig = sign_answer(&partner, &sent, 200, body);
        assert!(check_answer(Some(&sig), &keys, &sent, 200, body, 300, now).is_ok());
        let by_next = sign_answer(&next, &sent, 200, body);
        assert!(check_answer(Some(&by_next), &keys, &sent, 200, body, 300, now).is_ok(), "the next key is trusted too");
        assert_eq!(check_answer(None, &keys, &sent, 200, body, 300, now), Err(AuthError::UnsignedAnswer(ANSWER_SIGNATURE_HEADER)));
        assert_eq!(check_answer(Some(&sig), &keys, &sent, 200, br#"{"cursor":2}"#, 300, now), Err(AuthError::BodyMismatch));
        assert!(matches!(check_answer(Some(&sig), &keys, &sent, 409, body, 300, now), Err(AuthError::WrongStatus { .. })));
        assert!(matches!(check_answer(Some(&sig), &keys, &claims(&t, b"{}"), 200, body, 300, now), Err(AuthError::WrongNonce(_))));
        assert!(matches!(check_answer(Some(&sig), &keys, &sent, 200, body, 300, now + 400), Err(AuthError::OutsideWindow(_))));
        let stranger = sign_answer(&Keypair::generate(), &sent, 200, body);
        assert_eq!(check_answer(Some(&stranger), &keys, &sent, 200, body, 300, now), Err(AuthError::BadSignature));
        // An agent token replayed as an answer fails on the role's context.
        let agent_token = partner.sign(&sent);
        assert_eq!(check_answer(Some(&agent_token), &keys, &sent, 200, body, 300, now), Err(AuthError::BadSignature));
        let mut other_path = sent.clone();
        other_path.path = "/v1/tenants/acme/advance".into();
        let moved = sign_answer(&partner, &other_path, 200, body);
        assert!(matches!(check_answer(Some(&moved), &keys, &sent, 200, body, 300, now), Err(AuthError::WrongRequest { .. })));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = Keypair::generate();
        let secret = STANDARD.encode(k.key.to_bytes());
        assert!(!format!("{k:?}").contains(&secret));
    }

    #[test]
    fn key_files_round_trip_and_refuse_garbage() {
        let dir = std::env::temp_dir().join(format!("ctm-keys-{}", new_nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = Keypair::generate();
        let (private, public) = k.write_files(&dir.join("agent")).unwrap();
        assert_eq!(Keypair::load(&private).unwrap().public(), k.public());
        assert_eq!(PublicKey::load(&public).unwrap(), k.public());
        assert!(k.write_files(&dir.join("agent")).is_err(), "must not overwrite");
        std::fs::write(dir.join("bad.pub"), "not base64!").unwrap();
        assert!(PublicKey::load(dir.join("bad.pub").to_str().unwrap()).is_err());
        std::fs::write(dir.join("short.pub"), "AAAA").unwrap();
        assert!(PublicKey::load(dir.join("short.pub").to_str().unwrap()).unwrap_err().to_string().contains("32 bytes"));
        assert!(matches!(Keypair::load("env:CTMIRROR_SURELY_UNSET_VAR"), Err(KeyError::MissingEnv(_))));
        std::fs::remove_dir_all(dir).ok();
    }
}

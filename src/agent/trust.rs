//! Which receivers the agent believes it is talking to.
//!
//! The partner's ed25519 answer proves the receiver holds the partner key,
//! but the agent's signed tokens and the rows travel before that answer is
//! checked, so TLS must already hold: certificates are verified against the
//! system's root store (which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`) or,
//! for a partner with a private CA, only against the CA file configured for
//! that partner. There is no "accept any certificate" switch. Plain HTTP
//! must be allowed per partner, for receivers on loopback or behind a
//! TLS-terminating proxy on the same host.

use crate::config::ApplicationConfig;
use crate::tls::{read_certificates, PemFileError};
use std::path::{Path, PathBuf};

/// How the agent's HTTP client checks one partner's receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsTrust {
    /// PEM bundle of the only CAs trusted; `None`: the system's root store.
    pub ca_file: Option<PathBuf>,
    /// Whether an `http://` receiver URL may be used at all.
    pub allow_plain_http: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "receiver_url {0} is plain HTTP, which would send tokens and rows unencrypted; use https://, or set \
         allow_plain_http = true for a receiver on loopback or behind a TLS-terminating proxy on this host"
    )]
    PlainHttpNotAllowed(String),
    #[error(transparent)]
    File(#[from] PemFileError),
    #[error("ca_file {}: certificate {index} is not a usable CA certificate ({reason})", path.display())]
    BadCertificate { path: PathBuf, index: usize, reason: String },
}

impl TlsTrust {
    /// The system's root store; https only.
    pub fn system_roots() -> Self {
        Self::default()
    }

    /// Only the CAs in `path`; https only.
    pub fn ca_file(path: impl Into<PathBuf>) -> Self {
        Self { ca_file: Some(path.into()), allow_plain_http: false }
    }

    /// The system's root store for https, and `http://` allowed.
    pub fn allowing_plain_http() -> Self {
        Self { ca_file: None, allow_plain_http: true }
    }

    /// What the configuration says for this partner.
    pub fn for_application(app: &ApplicationConfig) -> Self {
        Self { ca_file: app.ca_file.clone(), allow_plain_http: app.allow_plain_http }
    }

    /// Reads and checks the CA file, if any: for a clear error at start
    /// rather than at the first cycle.
    pub fn check(&self) -> Result<(), TrustError> {
        self.ca_file.as_deref().map(ca_certificates).transpose().map(drop)
    }

    /// Applies this trust to the client for `url`.
    pub(crate) fn configure(
        &self,
        url: &str,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, TrustError> {
        let plain = url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"));
        if plain && !self.allow_plain_http {
            return Err(TrustError::PlainHttpNotAllowed(url.to_owned()));
        }
        if plain {
            tracing::warn!(url, "allow_plain_http: tokens and rows to this receiver travel unencrypted");
        }
        // Also refuses a redirect from https to http.
        let mut builder = builder.https_only(!self.allow_plain_http);
        if let Some(path) = &self.ca_file {
            builder = builder.tls_built_in_root_certs(false);
            for (i, der) in ca_certificates(path)?.iter().enumerate() {
                let cert = reqwest::Certificate::from_der(der).map_err(|e| TrustError::BadCertificate {
                    path: path.clone(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(builder)
    }
}

/// The certificates of a CA file, each checked as a trust anchor, so that
/// a bad one is named here instead of failing the client build vaguely.
fn ca_certificates(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TrustError> {
    let certs = read_certificates("ca_file", path)?;
    let mut store = rustls::RootCertStore::empty();
    for (i, der) in certs.iter().enumerate() {
        store.add(der.clone()).map_err(|e| TrustError::BadCertificate {
            path: path.to_owned(),
            index: i + 1,
            reason: match e {
                rustls::Error::InvalidCertificate(e) => format!("{e:?}"),
                e => e.to_string(),
            },
        })?;
    }
    Ok(certs)
}

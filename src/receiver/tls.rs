//! How `ctmirror receiver` listens: HTTPS from PEM files, or plain HTTP
//! when the configuration asks for it (behind a TLS-terminating proxy).
//!
//! Both are served by axum-server, so they start and stop alike. With TLS
//! each connection's handshake runs in that connection's own task (with
//! axum-server's 10 s handshake timeout), so a slow or silent client never
//! holds up the accept loop. The certificate is read once at start: a
//! renewed certificate takes a restart.

use super::error::ReceiverError;
use crate::config::{ReceiverConfig, Transport};
use crate::tls::{read_certificates, read_private_key, PemFileError};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// After the shutdown signal, how long requests in flight may take to
/// finish before their connections are closed: the agent's default request
/// timeout, after which the agent has given up on the answer anyway. A
/// request cut short rolls back; the agent sends the batch again.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(120);

/// What the receiver listens with, loaded before anything else starts so
/// that a bad file fails at once, before the database is touched.
pub(crate) enum Listening {
    Tls(RustlsConfig),
    PlainHttp,
}

/// A certificate or key that the receiver cannot serve with.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] PemFileError),
    #[error("tls_cert {}: certificate {index} of the chain cannot be parsed ({reason})", path.display())]
    BadCertificate { path: PathBuf, index: usize, reason: String },
    #[error("tls_key {} is not the private key of the certificate in tls_cert {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls_key {} cannot be used: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
}

impl Listening {
    pub(crate) fn load(cfg: &ReceiverConfig) -> Result<Self, ReceiverError> {
        match cfg.transport().map_err(ReceiverError::startup)? {
            Transport::PlainHttp => {
                tracing::warn!(
                    listen = %cfg.listen,
                    "plain_http = true: the agent's tokens and the mirrored rows travel unencrypted; \
                     run this only behind a TLS-terminating proxy or on loopback"
                );
                Ok(Listening::PlainHttp)
            }
            Transport::Tls { cert, key } => server_config(cert, key)
                .map(|config| Listening::Tls(RustlsConfig::from_config(config)))
                .map_err(|e| ReceiverError::startup(e.to_string())),
        }
    }

    pub(crate) fn scheme(&self) -> &'static str {
        match self {
            Listening::Tls(_) => "https",
            Listening::PlainHttp => "http",
        }
    }
}

/// The rustls configuration serving `cert` (a PEM chain, server certificate
/// first) with `key`. Every failure names the file; none quotes it.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certificates("tls_cert", cert)?;
    for (i, c) in chain.iter().enumerate() {
        rustls::server::ParsedCertificate::try_from(c).map_err(|e| TlsError::BadCertificate {
            path: cert.to_owned(),
            index: i + 1,
            reason: match e {
                rustls::Error::InvalidCertificate(e) => format!("{e:?}"),
                e => e.to_string(),
            },
        })?;
    }
    let private = read_private_key("tls_key", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch { cert: cert.to_owned(), key: key.to_owned() }
            }
            e => TlsError::BadKey { path: key.to_owned(), reason: e.to_string() },
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, lets requests in flight finish (for up to
/// [`SHUTDOWN_GRACE`]) and returns.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    listening: Listening,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReceiverError> {
    let handle = axum_server::Handle::<std::net::SocketAddr>::new();
    let server = axum_server::Server::from_listener(listener).handle(handle.clone());
    let app = router.into_make_service();
    let serving = async move {
        match listening {
            Listening::Tls(config) => server.acceptor(RustlsAcceptor::new(config)).serve(app).await,
            Listening::PlainHttp => server.serve(app).await,
        }
    };
    tokio::pin!(serving);
    let failed = |e: std::io::Error| ReceiverError::internal(format!("server failed: {e}"));
    tokio::select! {
        result = &mut serving => return result.map_err(failed),
        () = shutdown => {}
    }
    // Said more than once: axum-server's signal reaches only the tasks
    // waiting for it at that instant, and its accept loop (or a connection
    // still in its handshake) may be between two waits.
    let keep_signalling = async {
        loop {
            handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        result = &mut serving => result.map_err(failed),
        () = keep_signalling => unreachable!("signals until the server returns"),
    }
}

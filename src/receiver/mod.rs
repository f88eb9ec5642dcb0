//! The reference receiver: an HTTP service writing mirrors into PostgreSQL.
//!
//! [`ReceiverService`] holds the keys, the configuration and a connection
//! pool to the partner database; [`ReceiverService::router`] serves the five
//! protocol calls (`http`), and each call's database work lives in its own
//! module: `schema` (with `evolve` for changed schemas), `apply` (rows),
//! `reload` (shadow tables), `hooks` (completed). The bookkeeping tables
//! are in `store`, type mapping and DDL in `ddl`. [`serve`] is what
//! `ctmirror receiver` runs: HTTPS (or plain HTTP, when asked for) in `tls`.
//! See `docs/receiver.md`.

mod advance;
mod apply;
mod copy;
mod ddl;
mod error;
mod evolve;
mod hooks;
mod http;
mod reload;
mod replay;
mod schema;
mod slots;
mod sql;
mod store;
mod tls;

pub use error::{ErrorKind, ReceiverError};
pub use sql::quote_ident;
pub use tls::{server_config, TlsError};

use crate::auth::{Keypair, PublicKey, Verifier};
use crate::config::{ReceiverConfig, Secret};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::future::Future;
use std::sync::Arc;
use tokio_postgres::NoTls;

/// Connections to the partner database at most; each request holds one
/// for the length of its transaction.
const POOL_SIZE: usize = 16;

/// The receiver: cheap to clone, every clone shares keys and pool.
#[derive(Clone)]
pub struct ReceiverService {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: ReceiverConfig,
    pool: Pool,
    verifier: Verifier,
    partner_key: Keypair,
    replay: replay::ReplayGuard,
    slots: slots::TenantSlots,
}

impl ReceiverService {
    /// Loads keys from `cfg.private_key` / `cfg.agent_public_key`, connects,
    /// runs migrations.
    pub async fn new(cfg: ReceiverConfig) -> Result<Self, ReceiverError> {
        let partner_key = Keypair::load(&cfg.private_key)
            .map_err(|e| ReceiverError::startup(format!("receiver private key: {e}")))?;
        let agent_key = PublicKey::load(&cfg.agent_public_key)
            .map_err(|e| ReceiverError::startup(format!("agent public key: {e}")))?;
        Self::with_keys(cfg, partner_key, agent_key).await
    }

    /// Same as [`ReceiverService::new`] with the partner's key and the
    /// agent's current key given directly; the agent's next key, if
    /// configured, is still loaded from `cfg.agent_next_public_key`.
    pub async fn with_keys(
        cfg: ReceiverConfig,
        partner_key: Keypair,
        agent_key: PublicKey,
    ) -> Result<Self, ReceiverError> {
        let mut agent_keys = vec![agent_key];
        if let Some(next) = &cfg.agent_next_public_key {
            agent_keys.push(
                PublicKey::load(next).map_err(|e| ReceiverError::startup(format!("agent next public key: {e}")))?,
            );
        }
        Self::with_key_set(cfg, partner_key, agent_keys).await
    }

    /// Same as [`ReceiverService::new`] with every trusted agent key given.
    pub async fn with_key_set(
        cfg: ReceiverConfig,
        partner_key: Keypair,
        agent_keys: Vec<PublicKey>,
    ) -> Result<Self, ReceiverError> {
        let pool = connect(&cfg.database_url, cfg.limits.request_timeout_secs)?;
        {
            let mut client = pool.get().await?;
            let client: &mut tokio_postgres::Client = &mut client;
            store::migrate(client).await?;
        }
        let verifier = Verifier { agent_keys, app: cfg.application.clone(), max_skew_secs: cfg.max_clock_skew_secs };
        let replay = replay::ReplayGuard::new(cfg.limits.max_remembered_nonces, cfg.max_clock_skew_secs);
        let slots = slots::TenantSlots::new(cfg.limits.max_concurrent_per_tenant);
        tracing::info!(
            application = %cfg.application,
            agent_keys = verifier.agent_keys.len(),
            tenants = cfg.tenants.as_ref().map_or("all".to_owned(), |t| t.len().to_string()),
            "receiver ready"
        );
        Ok(Self { inner: Arc::new(Inner { cfg, pool, verifier, partner_key, replay, slots }) })
    }

    /// The HTTP routes of the protocol, with this service as their state.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

impl Inner {
    /// A database connection for work on behalf of `tenant`. Every request's
    /// database work goes through here, so that tenant isolation has one
    /// place to decide which role the work runs under.
    pub(crate) async fn client_for(&self, _tenant: &crate::ids::TenantId) -> Result<deadpool_postgres::Object, ReceiverError> {
        Ok(self.pool.get().await?)
    }
}

/// Builds the pool; no connection is made until the first `get`. Every
/// session gets a statement_timeout, so no request holds locks longer than
/// the receiver's request limit.
fn connect(database_url: &Secret, statement_timeout_secs: u64) -> Result<Pool, ReceiverError> {
    let url = database_url.resolve().map_err(|e| ReceiverError::startup(format!("database_url: {e}")))?;
    // The URL is a secret: the parse error is reported without it.
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e| ReceiverError::startup(format!("database_url is not a valid PostgreSQL URL: {e}")))?;
    let ours = format!("{} -c statement_timeout={}s", crate::pgtext::session_options(), statement_timeout_secs);
    let options = match pg.get_options() {
        Some(existing) => format!("{ours} {existing}"),
        None => ours,
    };
    pg.options(&options);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(std::time::Duration::from_secs(10));
    }
    if pg.get_application_name().is_none() {
        pg.application_name("ctmirror-receiver");
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .build()
        .map_err(|e| ReceiverError::startup(format!("cannot build connection pool: {e}")))
}

/// Binds `cfg.listen` and serves until `shutdown` resolves: what
/// `ctmirror receiver` runs. Refuses a configuration that chose neither TLS
/// nor plain HTTP.
pub async fn serve(
    cfg: ReceiverConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReceiverError> {
    bind(cfg).await?.serve(shutdown).await
}

/// Everything [`serve`] does before the first connection: loads the TLS
/// certificate (first, so a bad file fails before the database is
/// touched), starts the service and binds. Separate so that a caller with
/// `listen` on port 0 (tests) learns the address before serving.
pub async fn bind(cfg: ReceiverConfig) -> Result<BoundReceiver, ReceiverError> {
    let listening = tls::Listening::load(&cfg)?;
    let listen = cfg.listen.clone();
    let service = ReceiverService::new(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| ReceiverError::startup(format!("cannot listen on {listen}: {e}")))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| ReceiverError::startup(format!("cannot listen on {listen}: {e}")))?;
    Ok(BoundReceiver { listener, local_addr, listening, service })
}

/// A receiver that listens but does not accept yet; see [`bind`].
pub struct BoundReceiver {
    listener: tokio::net::TcpListener,
    local_addr: std::net::SocketAddr,
    listening: tls::Listening,
    service: ReceiverService,
}

impl BoundReceiver {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        self.listening.scheme()
    }

    /// Serves until `shutdown` resolves and requests in flight have ended.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ReceiverError> {
        tracing::info!(listen = %self.local_addr, scheme = self.scheme(), "receiver listening");
        tls::serve(self.listener, self.listening, self.service.router(), shutdown).await
    }
}

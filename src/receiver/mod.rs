//! The reference receiver: an HTTP service writing mirrors into PostgreSQL.
//!
//! [`ReceiverService`] holds the keys, the configuration and a connection
//! pool to the partner database; [`ReceiverService::router`] serves the five
//! protocol calls (`http`), and each call's database work lives in its own
//! module: `schema` (with `evolve` for changed schemas), `apply` (rows),
//! `reload` (shadow tables), `hooks` (completed). The bookkeeping tables
//! are in `store`, type mapping and DDL in `ddl`.
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
mod schema;
mod sql;
mod store;

pub use error::{ErrorKind, ReceiverError};
pub use sql::quote_ident;

use crate::auth::{Keypair, PublicKey, Verifier};
use crate::config::{resolve_secret, ReceiverConfig};
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

    /// Same as [`ReceiverService::new`] with the keys given directly.
    pub async fn with_keys(
        cfg: ReceiverConfig,
        partner_key: Keypair,
        agent_key: PublicKey,
    ) -> Result<Self, ReceiverError> {
        let pool = connect(&cfg.database_url)?;
        {
            let mut client = pool.get().await?;
            let client: &mut tokio_postgres::Client = &mut client;
            store::migrate(client).await?;
        }
        let verifier = Verifier { agent_key, app: cfg.application.clone(), max_skew_secs: cfg.max_clock_skew_secs };
        tracing::info!(application = %cfg.application, "receiver ready");
        Ok(Self { inner: Arc::new(Inner { cfg, pool, verifier, partner_key }) })
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

/// Builds the pool; no connection is made until the first `get`.
fn connect(database_url: &str) -> Result<Pool, ReceiverError> {
    let url = resolve_secret(database_url).map_err(|e| ReceiverError::startup(format!("database_url: {e}")))?;
    // The URL is a secret: the parse error is reported without it.
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e| ReceiverError::startup(format!("database_url is not a valid PostgreSQL URL: {e}")))?;
    let options = match pg.get_options() {
        Some(existing) => format!("{} {existing}", crate::pgtext::session_options()),
        None => crate::pgtext::session_options(),
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

/// Binds `cfg.listen` and serves until `shutdown` resolves.
pub async fn serve(
    cfg: ReceiverConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReceiverError> {
    let listen = cfg.listen.clone();
    let service = ReceiverService::new(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| ReceiverError::startup(format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(%listen, "receiver listening");
    axum::serve(listener, service.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ReceiverError::internal(format!("server failed: {e}")))
}

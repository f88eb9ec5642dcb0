//! The reference receiver: an HTTP service writing mirrors into PostgreSQL.
//!
//! [`ReceiverService`] holds the keys, the configuration and a connection
//! pool to the partner database; [`ReceiverService::router`] serves the five
//! protocol calls (`http`), and each call's database work lives in its own
//! module: `schema` (with `evolve` for changed schemas), `apply` (rows),
//! `reload` (shadow tables), `hooks` (completed). The bookkeeping tables
//! are in `store`, type mapping and DDL in `ddl`; `tenant_roles` runs each
//! tenant's work under its own database role when that is configured.
//! [`serve`] is what `ctmirror receiver` runs: HTTPS (or plain HTTP, when
//! asked for) in `tls`.
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
mod tenant_roles;
mod tls;

pub use error::{ErrorKind, ReceiverError};
pub use sql::quote_ident;
pub use tenant_roles::{tenant_role_name, tenant_role_password, TENANT_GROUP_ROLE, TENANT_ROLE_PREFIX};
pub use tls::{server_config, TlsError};

/// What RowData does with a batch's rows before its transaction touches
/// the database, callable without one.
///
/// This exists for fuzzing: the targets in `fuzz/` and the stable test that
/// replays their seeds (`tests/fuzz_seeds.rs`) call it with arbitrary
/// input. The receiver's request path runs the very same functions, so a
/// crash found through here is a crash in the receiver. Not an API for
/// anything else.
pub mod prechecks {
    use super::apply::{self, Batch};
    use super::copy::{self, WriteError};
    use super::ReceiverError;
    use crate::protocol::copy::CopyBatch;
    use crate::protocol::{RowBatch, TableSchema};
    use bytes::Bytes;

    /// A JSON batch checked row by row against `schema` (which must be
    /// valid, as the receiver's stored schemas are) and turned into COPY
    /// text: the number of rows and the text.
    pub fn json_rows(schema: &TableSchema, batch: &RowBatch) -> Result<(u64, Bytes), ReceiverError> {
        let rows = apply::prepare(schema, batch)?;
        Ok((rows.count, rows.payload))
    }

    /// A COPY batch's rows as RowData hands them to `COPY`, after the one
    /// check the receiver makes itself (text rows must not hold an
    /// end-of-data line); PostgreSQL checks the values.
    pub fn copy_rows(batch: &CopyBatch, schema: &TableSchema) -> Result<(), ReceiverError> {
        let rows = Batch::copy(batch).rows(schema)?;
        if rows.count == 0 {
            return Ok(());
        }
        copy::check_text(&rows).map_err(|e| match e {
            WriteError::Refused(e) => e,
            other => ReceiverError::internal(format!("unexpected write error without a database: {other:?}")),
        })
    }
}

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
    /// Per-tenant logins when `[receiver.tenant_roles]` is enabled.
    tenant_roles: Option<tenant_roles::TenantRoles>,
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
        let session = session_config(&cfg.database_url, cfg.limits.request_timeout_secs)?;
        let pool = pool_for(session.clone(), POOL_SIZE)?;
        {
            let mut client = pool.get().await?;
            let client: &mut tokio_postgres::Client = &mut client;
            store::migrate(client).await?;
        }
        let tenant_roles = match cfg.tenant_roles.enabled {
            true => Some(tenant_roles::TenantRoles::start(&cfg.tenant_roles, pool.clone(), session).await?),
            false => None,
        };
        let verifier = Verifier { agent_keys, app: cfg.application.clone(), max_skew_secs: cfg.max_clock_skew_secs };
        let replay = replay::ReplayGuard::new(cfg.limits.max_remembered_nonces, cfg.max_clock_skew_secs);
        let slots = slots::TenantSlots::new(cfg.limits.max_concurrent_per_tenant);
        tracing::info!(
            application = %cfg.application,
            agent_keys = verifier.agent_keys.len(),
            tenants = cfg.tenants.as_ref().map_or("all".to_owned(), |t| t.len().to_string()),
            "receiver ready"
        );
        Ok(Self { inner: Arc::new(Inner { cfg, pool, tenant_roles, verifier, partner_key, replay, slots }) })
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
    /// place to decide which role the work runs under: the tenant's own
    /// login role with `[receiver.tenant_roles]` enabled, else the
    /// receiver's login.
    pub(crate) async fn client_for(&self, tenant: &crate::ids::TenantId) -> Result<deadpool_postgres::Object, ReceiverError> {
        match &self.tenant_roles {
            Some(roles) => roles.client(tenant).await,
            None => Ok(self.pool.get().await?),
        }
    }
}

/// The connection settings of `database_url` plus the session options every
/// receiver connection needs (tenant roles' connections start from these),
/// among them a statement_timeout, so no request holds locks longer than
/// the receiver's request limit.
fn session_config(database_url: &Secret, statement_timeout_secs: u64) -> Result<tokio_postgres::Config, ReceiverError> {
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
    Ok(pg)
}

/// Builds a pool; no connection is made until the first `get`.
fn pool_for(pg: tokio_postgres::Config, max_size: usize) -> Result<Pool, ReceiverError> {
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(max_size)
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

//! End-to-end harness: a source database, a mirror database, an in-process
//! receiver on a real HTTP port, and a way to run agent cycles between them.
#![allow(dead_code)]

#[path = "../support/mod.rs"]
pub mod support;
pub mod drivers;

#[allow(unused_imports)]
pub use drivers::{Dialect, MssqlDriver, PgDriver, SourceDriver};

use ctmirror::agent::{run_cycle, CycleReport, CycleSettings, PartnerClient, TlsTrust};
use ctmirror::auth::{Keypair, PublicKey, RequestSigner};
use ctmirror::config::{HookConfig, ReceiverConfig};
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::Cursor;
use ctmirror::receiver::ReceiverService;
use ctmirror::schema_map::SchemaMap;
use ctmirror::source::ChunkLimits;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::TestDb;
use tokio_postgres::Client;

pub const APP: &str = "crm_insights";
pub const TENANT: &str = "acme";

pub struct Pipeline<D: SourceDriver = PgDriver> {
    pub src: D,
    pub mirror_db: TestDb,
    pub receiver_url: String,
    pub map: SchemaMap,
    pub tenant: TenantId,
    pub limits: ChunkLimits,
    pub retention: Duration,
    pub agent_key: Keypair,
    pub partner_public: PublicKey,
    /// Every request body the receiver saw, for wire-level assertions.
    pub wire: Arc<Mutex<Vec<Vec<u8>>>>,
    server: tokio::task::JoinHandle<()>,
}

impl<D: SourceDriver> Drop for Pipeline<D> {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub struct Options {
    pub limits: ChunkLimits,
    pub paused: Option<String>,
    pub drop_unmapped_tables: bool,
    pub keep_dropped_columns: bool,
    /// Any other receiver setting, applied last.
    pub configure: Option<Configure>,
}

/// Changes a test makes to the receiver's configuration.
pub type Configure = Box<dyn FnOnce(&mut ReceiverConfig) + Send>;

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: ChunkLimits { max_rows: 1000, max_bytes: 1 << 20 },
            paused: None,
            drop_unmapped_tables: true,
            keep_dropped_columns: false,
            configure: None,
        }
    }
}

pub fn receiver_config(mirror_url: &str) -> ReceiverConfig {
    ReceiverConfig {
        max_body_bytes: 64 << 20,
        hooks: HookConfig { analyze: true, notify_channel: Some("ctmirror_test".into()), sql: vec![] },
        ..ReceiverConfig::new("127.0.0.1:0", mirror_url, AppId::new(APP).unwrap(), "unused", "unused")
    }
}

impl Pipeline<PgDriver> {
    /// Creates both databases, runs `setup_sql` on the source and starts a
    /// receiver.
    pub async fn start(label: &str, setup_sql: &str, map_toml: &str) -> Pipeline {
        Self::start_with(label, setup_sql, map_toml, Options::default()).await
    }

    pub async fn start_with(label: &str, setup_sql: &str, map_toml: &str, opts: Options) -> Pipeline {
        let src = PgDriver::create(label).await.expect("PostgreSQL always runs");
        Pipeline::launch(label, src, setup_sql, map_toml, opts).await
    }

    pub fn source_db(&self) -> &TestDb {
        &self.src.db
    }

    pub async fn source(&self) -> Client {
        self.src.db.client().await
    }
}

impl<D: SourceDriver> Pipeline<D> {
    /// A pipeline over an existing source driver: runs `setup_sql` (in the
    /// driver's dialect) on it, creates the mirror database and starts a
    /// receiver.
    pub async fn launch(label: &str, src: D, setup_sql: &str, map_toml: &str, opts: Options) -> Pipeline<D> {
        let mirror_db = TestDb::create(&format!("{label}_dst")).await;
        if !setup_sql.trim().is_empty() {
            src.exec(setup_sql).await;
        }
        let map = SchemaMap::parse(map_toml, "test map").expect("test map");

        let agent = Keypair::generate();
        let partner = Keypair::generate();
        let partner_public = partner.public();
        let mut cfg = receiver_config(&mirror_db.url);
        cfg.paused_reason = opts.paused.clone();
        cfg.drop_unmapped_tables = opts.drop_unmapped_tables;
        cfg.keep_dropped_columns = opts.keep_dropped_columns;
        if let Some(configure) = opts.configure {
            configure(&mut cfg);
        }
        let svc = ReceiverService::with_keys(cfg, partner, agent.public()).await.expect("receiver starts");
        let wire: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let recorder = wire.clone();
        let router = svc.router().layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let recorder = recorder.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
                recorder.lock().unwrap().push(bytes.to_vec());
                next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        Pipeline {
            src,
            mirror_db,
            receiver_url: format!("http://{addr}"),
            map,
            tenant: TenantId::new(TENANT).unwrap(),
            limits: opts.limits,
            retention: Duration::from_secs(7 * 24 * 3600),
            agent_key: agent.clone(),
            partner_public,
            wire,
            server,
        }
    }

    pub fn client(&self) -> PartnerClient {
        let key = self.agent_key.clone();
        let signer = RequestSigner { key, tenant: self.tenant.clone(), app: AppId::new(APP).unwrap() };
        // The in-process receiver serves plain HTTP on loopback (TLS: tests/tls.rs).
        let trust = TlsTrust::allowing_plain_http();
        PartnerClient::new(&self.receiver_url, signer, self.partner_public, Duration::from_secs(60), &trust).unwrap()
    }

    pub async fn connect_source(&self) -> D::Src {
        self.src.connect(self.retention).await
    }

    /// Runs SQL of the source's dialect on the source database.
    pub async fn exec(&self, sql: &str) {
        self.src.exec(sql).await
    }

    pub async fn wait_quiet(&self) {
        self.src.wait_quiet().await
    }

    /// One full cycle after all earlier writes are final.
    pub async fn cycle(&self) -> CycleReport {
        self.wait_quiet().await;
        self.cycle_now().await
    }

    pub async fn cycle_now(&self) -> CycleReport {
        let mut source = self.connect_source().await;
        let client = self.client();
        run_cycle(&mut source, &client, &self.map, TENANT, CycleSettings { limits: self.limits })
            .await
            .expect("cycle runs")
    }

    pub async fn mirror(&self) -> Client {
        self.mirror_db.client().await
    }

    /// The receiver's stored cursor of a mirror table.
    pub async fn mirror_cursor(&self, table: &str) -> Option<Cursor> {
        let c = self.mirror().await;
        let row = c
            .query_opt("SELECT cursor::text FROM ctmirror.tables WHERE tenant = $1 AND table_name = $2", &[&TENANT, &table])
            .await
            .unwrap()?;
        let text: Option<String> = row.get(0);
        text.map(|t| serde_json::from_str(&t).unwrap())
    }

    pub async fn assert_converged(&self) {
        let cmp = self.src.compare(&self.mirror_db.url, &self.tenant, &self.map).await;
        for t in cmp {
            assert!(t.equal(), "mirror of {} differs from the source projection: {t:?}", t.table);
        }
    }

    /// All request bodies the receiver saw, as text.
    pub fn wire_text(&self) -> String {
        let w = self.wire.lock().unwrap();
        w.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>().join("\n")
    }
}


/// The sample CRM tenant at a small scale (1.0 is about 120,000 rows).
pub fn sample_crm_sql(scale: f64) -> String {
    let sql = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sample-crm.sql")).unwrap();
    format!("SELECT set_config('ctmirror.scale', '{scale}', false);\n{sql}")
}

pub fn sample_crm_map() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema-maps/crm_insights.toml")).unwrap()
}

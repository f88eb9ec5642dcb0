//! Source databases for the end-to-end harness: one driver per source kind,
//! so one list of scenarios runs against PostgreSQL and SQL Server.

use super::support::TestDb;
use ctmirror::ids::TenantId;
use ctmirror::schema_map::SchemaMap;
use ctmirror::source::mssql::client::MsClient;
use ctmirror::source::mssql::SqlServerSource;
use ctmirror::source::postgres::PostgresSource;
use ctmirror::source::Source;
use ctmirror::verify::TableComparison;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Which SQL a scenario must write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    SqlServer,
}

#[allow(async_fn_in_trait)]
pub trait SourceDriver: Send + Sync + Sized + 'static {
    type Src: Source;
    /// A fresh, empty source database, or `None` (with the reason printed)
    /// when this kind of source cannot run here.
    async fn create(label: &str) -> Option<Self>;
    fn dialect(&self) -> Dialect;
    /// Runs a batch of the dialect's SQL on the source database.
    async fn exec(&self, sql: &str);
    fn connect(&self, retention: Duration) -> impl std::future::Future<Output = Self::Src> + Send;
    /// Waits until every write made so far is below the version the next
    /// cycle reads.
    async fn wait_quiet(&self);
    async fn compare(&self, mirror_url: &str, tenant: &TenantId, map: &SchemaMap) -> Vec<TableComparison>;
    fn pick<'a>(&self, pg: &'a str, mssql: &'a str) -> &'a str {
        match self.dialect() {
            Dialect::Postgres => pg,
            Dialect::SqlServer => mssql,
        }
    }
}

pub struct PgDriver {
    pub db: TestDb,
}

impl SourceDriver for PgDriver {
    type Src = PostgresSource;

    async fn create(label: &str) -> Option<Self> {
        Some(PgDriver { db: TestDb::create(&format!("{label}_src")).await })
    }
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    async fn exec(&self, sql: &str) {
        self.db.client().await.batch_execute(sql).await.unwrap_or_else(|e| panic!("source SQL failed: {e:?}\n{sql}"));
    }
    async fn connect(&self, retention: Duration) -> PostgresSource {
        PostgresSource::connect(&self.db.url, retention).await.expect("source connects")
    }
    /// Versions are cluster-wide transaction ids: other tests' open
    /// transactions hold the readable version back for a moment.
    async fn wait_quiet(&self) {
        let c = self.db.client().await;
        let row = c.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await.unwrap();
        let marker: i64 = row.get(0);
        for _ in 0..3000 {
            let r = c.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint", &[]).await.unwrap();
            let xmin: i64 = r.get(0);
            if xmin > marker {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("cluster never became quiet");
    }
    async fn compare(&self, mirror_url: &str, tenant: &TenantId, map: &SchemaMap) -> Vec<TableComparison> {
        ctmirror::verify::compare_postgres(&self.db.url, mirror_url, tenant, map).await.expect("verify runs")
    }
}

/// A database on the SQL Server that `MSSQL_URL` (an ADO.NET connection
/// string with a login allowed to create databases) points at. Databases
/// are left behind: the server is a throwaway one.
pub struct MssqlDriver {
    pub url: String,
}

static MSSQL_COUNTER: AtomicU32 = AtomicU32::new(0);

impl MssqlDriver {
    pub async fn client(&self) -> MsClient {
        MsClient::connect(&self.url).await.expect("SQL Server connects")
    }
}

impl SourceDriver for MssqlDriver {
    type Src = SqlServerSource;

    async fn create(label: &str) -> Option<Self> {
        let Ok(base) = std::env::var("MSSQL_URL") else {
            eprintln!("skipped: MSSQL_URL is not set (see docker/README.md to run the SQL Server tests)");
            return None;
        };
        let n = MSSQL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let mut label: String =
            label.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
        label.truncate(60);
        let name = format!("ctm_{label}_{}_{n}_{nanos:x}", std::process::id());
        let mut admin = MsClient::connect(&base).await.expect("MSSQL_URL connects");
        admin.batch(&format!("CREATE DATABASE [{name}]"), "creating a test database").await.expect("create database");
        Some(MssqlDriver { url: format!("{};database={name}", base.trim_end_matches(';')) })
    }
    fn dialect(&self) -> Dialect {
        Dialect::SqlServer
    }
    async fn exec(&self, sql: &str) {
        self.client().await.batch(sql, "running test SQL").await.unwrap_or_else(|e| panic!("source SQL failed: {e}\n{sql}"));
    }
    async fn connect(&self, retention: Duration) -> SqlServerSource {
        SqlServerSource::connect(&self.url, retention).await.expect("source connects")
    }
    /// Versions are per database and assigned at commit.
    async fn wait_quiet(&self) {}
    async fn compare(&self, mirror_url: &str, tenant: &TenantId, map: &SchemaMap) -> Vec<TableComparison> {
        let mut source = self.connect(Duration::from_secs(3600)).await;
        ctmirror::verify::compare_through_source(&mut source, mirror_url, tenant, map).await.expect("verify runs")
    }
}

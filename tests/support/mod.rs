//! Shared test harness: every test gets its own fresh databases on the private
//! cluster that `scripts/test` starts (`CTMIRROR_TEST_PG`).
#![allow(dead_code)]

pub mod cluster;

use std::sync::atomic::{AtomicU32, Ordering};
use ctmirror::protocol::{ColumnSchema, ColumnType, TableSchema};
use tokio_postgres::{Client, NoTls};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The admin URL of the test cluster.
pub fn admin_url() -> String {
    std::env::var("CTMIRROR_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "CTMIRROR_TEST_PG is not set. Run the suite with scripts/test, which starts a private \
             PostgreSQL cluster, or point CTMIRROR_TEST_PG at a postgres:// admin URL of a throwaway cluster."
        )
    })
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database created for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates a new, empty database named after the test (`label`) plus a
    /// unique suffix.
    pub async fn create(label: &str) -> TestDb {
        let admin = admin_url();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let mut label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect();
        label.truncate(40);
        let name = format!("t_{label}_{}_{n}_{nanos:x}", std::process::id());
        let client = connect(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).expect("admin URL has a database");
        TestDb { url: format!("{base}/{name}"), name }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

/// A fresh directory under the system's temp folder for one test's files.
pub fn scratch(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ctm-{label}-{}", ctmirror::auth::new_nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed and reaped when the test lets go of it, even
/// when the test fails first.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn col(name: &str, data_type: ColumnType, nullable: bool) -> ColumnSchema {
    ColumnSchema { name: name.into(), data_type, nullable }
}

/// id bigint key, name varchar(20), qty smallint not null, price numeric(5,2).
pub fn items() -> TableSchema {
    TableSchema {
        name: "items".into(),
        columns: vec![
            col("id", ColumnType::Int64, false),
            col("name", ColumnType::Text { max_length: Some(20) }, true),
            col("qty", ColumnType::Int16, false),
            col("price", ColumnType::Decimal { precision: Some(5), scale: Some(2) }, true),
        ],
        primary_key: vec!["id".into()],
    }
}

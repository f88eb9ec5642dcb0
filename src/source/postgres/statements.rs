//! Prepared statements of the fixed catalog and registry queries, kept for
//! the connection's life.
//!
//! A query given as text is prepared afresh on every call: two round trips
//! instead of one. An idle cycle is nothing but such small queries (a few
//! per table), so preparing each once per connection is most of what an
//! idle tenant costs. PostgreSQL re-plans a prepared statement by itself
//! when the objects it names change, so a cached statement never goes stale.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio_postgres::{GenericClient, Statement};

#[derive(Debug, Default)]
pub(crate) struct Statements(Mutex<HashMap<&'static str, Statement>>);

impl Statements {
    /// The statement for `sql`, prepared on first use. Statements prepared
    /// inside a transaction outlive it (they belong to the session).
    pub(crate) async fn get<C: GenericClient + Sync>(
        &self,
        client: &C,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.0.lock().expect("statement cache").get(sql) {
            return Ok(s.clone());
        }
        let statement = client.prepare(sql).await?;
        self.0.lock().expect("statement cache").insert(sql, statement.clone());
        Ok(statement)
    }
}

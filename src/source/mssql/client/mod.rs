//! The project's own small SQL Server client: connect, run a statement,
//! stream rows, and read transactions that roll back when dropped.
//!
//! tiberius lives behind this module; everything else in the backend works
//! with [`SqlValue`] and [`SqlParam`]. Statements are always parameterized
//! (`@P1`, `@P2`, ...): values never go into SQL text.

mod errors;
mod value;

pub use errors::ms_error;
pub use value::{SqlParam, SqlValue, DAYS_TO_1900};
#[cfg(test)]
pub use value::cells;

use crate::source::{SourceError, SourceErrorKind};
use futures_util::TryStreamExt;
use tiberius::{Client, Config, Query};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

/// Settings every session runs with. `TEXTSIZE` lifts the 4 KiB default
/// cut-off that raw TDS sessions apply to `(max)` and legacy LOB columns;
/// `XACT_ABORT` makes any error end the transaction; `LOCK_TIMEOUT` turns a
/// blocked catalog read into a retryable error instead of a hang.
const SESSION_SQL: &str = "SET NOCOUNT ON; SET XACT_ABORT ON; SET TEXTSIZE 2147483647; \
                           SET LOCK_TIMEOUT 30000; SET DATEFORMAT ymd; SET ARITHABORT ON; \
                           SET TRANSACTION ISOLATION LEVEL READ COMMITTED;";

/// Ends a read transaction left open by a dropped [`ReadTx`] and puts the
/// session back on READ COMMITTED, which DDL (enabling tracking) needs.
const RESET_SQL: &str = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION; \
                         SET TRANSACTION ISOLATION LEVEL READ COMMITTED;";

/// What a row callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One connection to one tenant database.
pub struct MsClient {
    inner: Client<Compat<TcpStream>>,
    /// A read transaction was dropped without commit: roll it back before
    /// the next statement.
    needs_reset: bool,
}

impl MsClient {
    /// Connects with an ADO.NET connection string (`server=tcp:host,1433;
    /// database=...;user id=...;password=...;TrustServerCertificate=false`)
    /// or a JDBC URL (`jdbc:sqlserver://host:1433;databaseName=...`).
    /// Follows one Azure gateway redirect.
    pub async fn connect(conn: &str) -> Result<MsClient, SourceError> {
        let mut config = parse_config(conn)?;
        config.application_name("ctmirror");
        let mut redirects = 0;
        let inner = loop {
            let tcp = TcpStream::connect(config.get_addr()).await.map_err(|e| {
                SourceError::new(
                    SourceErrorKind::Transient,
                    format!("cannot reach SQL Server at {}: {e}", config.get_addr()),
                )
            })?;
            tcp.set_nodelay(true).ok();
            match Client::connect(config.clone(), tcp.compat_write()).await {
                Ok(client) => break client,
                Err(tiberius::error::Error::Routing { host, port }) if redirects == 0 => {
                    redirects += 1;
                    config.host(&host);
                    config.port(port);
                }
                Err(e) => return Err(ms_error(e, "connecting to SQL Server", "CONNECT SQL and a database user")),
            }
        };
        let mut client = MsClient { inner, needs_reset: false };
        client.execute(SESSION_SQL, &[], "preparing the session").await?;
        Ok(client)
    }

    async fn reset_if_needed(&mut self) -> Result<(), SourceError> {
        if self.needs_reset {
            self.inner
                .simple_query(RESET_SQL)
                .await
                .map_err(|e| ms_error(e, "rolling back an abandoned read", ""))?
                .into_results()
                .await
                .map_err(|e| ms_error(e, "rolling back an abandoned read", ""))?;
            self.needs_reset = false;
        }
        Ok(())
    }

    /// Runs a statement (or batch) and discards any rows.
    pub async fn execute(&mut self, sql: &str, params: &[SqlParam], doing: &str) -> Result<(), SourceError> {
        self.execute_as(sql, params, doing, "").await
    }

    /// [`execute`](Self::execute), naming the permission a denial means.
    pub async fn execute_as(
        &mut self,
        sql: &str,
        params: &[SqlParam],
        doing: &str,
        grant: &str,
    ) -> Result<(), SourceError> {
        self.reset_if_needed().await?;
        let mut q = Query::new(sql);
        for p in params {
            q.bind(p.to_column());
        }
        q.execute(&mut self.inner).await.map_err(|e| ms_error(e, doing, grant))?;
        Ok(())
    }

    /// Runs a T-SQL batch as written, without parameters: for setup scripts
    /// and tests (statements such as `CREATE SCHEMA` must start a batch).
    pub async fn batch(&mut self, sql: &str, doing: &str) -> Result<(), SourceError> {
        self.reset_if_needed().await?;
        self.inner
            .simple_query(sql)
            .await
            .map_err(|e| ms_error(e, doing, ""))?
            .into_results()
            .await
            .map_err(|e| ms_error(e, doing, ""))?;
        Ok(())
    }

    /// Runs a query and collects its rows; for small catalog answers.
    pub async fn query(
        &mut self,
        sql: &str,
        params: &[SqlParam],
        doing: &str,
        grant: &str,
    ) -> Result<Vec<Vec<SqlValue>>, SourceError> {
        let mut rows = Vec::new();
        self.query_each(sql, params, doing, grant, |row| {
            rows.push(row);
            Ok(Flow::Continue)
        })
        .await?;
        Ok(rows)
    }

    /// Streams a query's rows into `each` until it answers [`Flow::Stop`];
    /// the rest of the answer is skipped by the next call, never buffered.
    pub async fn query_each<F>(
        &mut self,
        sql: &str,
        params: &[SqlParam],
        doing: &str,
        grant: &str,
        mut each: F,
    ) -> Result<(), SourceError>
    where
        F: FnMut(Vec<SqlValue>) -> Result<Flow, SourceError> + Send,
    {
        self.reset_if_needed().await?;
        let mut q = Query::new(sql);
        for p in params {
            q.bind(p.to_column());
        }
        let stream = q.query(&mut self.inner).await.map_err(|e| ms_error(e, doing, grant))?;
        let mut rows = stream.into_row_stream();
        while let Some(row) = rows.try_next().await.map_err(|e| ms_error(e, doing, grant))? {
            let mut values = Vec::with_capacity(row.len());
            for cell in row.into_iter() {
                values.push(SqlValue::from_column(cell).map_err(|m| {
                    SourceError::new(SourceErrorKind::Fatal, format!("error while {doing}: malformed value: {m}"))
                })?);
            }
            if each(values)? == Flow::Stop {
                break;
            }
        }
        Ok(())
    }

    /// Starts a SNAPSHOT read transaction: every statement in it sees the
    /// database as of its first data read.
    pub async fn snapshot_transaction(&mut self, doing: &str) -> Result<ReadTx<'_>, SourceError> {
        self.execute_as(
            "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION;",
            &[],
            doing,
            "ALLOW_SNAPSHOT_ISOLATION on the database",
        )
        .await?;
        Ok(ReadTx { client: self, done: false })
    }
}

/// An open read transaction. [`commit`](ReadTx::commit) ends it; dropping it
/// (an error, a cancelled cycle) rolls it back before the client's next
/// statement.
pub struct ReadTx<'a> {
    client: &'a mut MsClient,
    done: bool,
}

impl ReadTx<'_> {
    pub fn client(&mut self) -> &mut MsClient {
        self.client
    }

    pub async fn commit(mut self) -> Result<(), SourceError> {
        let result = self
            .client
            .execute("COMMIT TRANSACTION; SET TRANSACTION ISOLATION LEVEL READ COMMITTED;", &[], "committing a read")
            .await;
        self.done = result.is_ok();
        result
    }
}

impl Drop for ReadTx<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.needs_reset = true;
        }
    }
}

/// `host:port` of the server a connection string names (no secrets), for
/// the agent's per-server limits.
pub fn server_address(conn: &str) -> Result<String, SourceError> {
    Ok(parse_config(conn)?.get_addr().to_lowercase())
}

fn parse_config(conn: &str) -> Result<Config, SourceError> {
    let trimmed = conn.trim();
    let parsed = if trimmed.to_ascii_lowercase().starts_with("jdbc:") {
        Config::from_jdbc_string(trimmed)
    } else {
        Config::from_ado_string(trimmed)
    };
    // The connection string holds a password: never echo it back.
    parsed.map_err(|e| {
        let reason = match e {
            tiberius::error::Error::Conversion(m) => m.to_string(),
            _ => "malformed".to_owned(),
        };
        SourceError::config(format!(
            "the SQL Server connection string cannot be parsed ({}); expected ADO.NET form \
             `server=tcp:HOST,PORT;database=DB;user id=USER;password=...` or a jdbc:sqlserver:// URL",
            reason.chars().take(120).collect::<String>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_connection_strings_are_config_errors_without_the_password() {
        for bad in ["server=tcp:host,notaport;password=hunter2", "jdbc:sqlserver://:x;password=hunter2"] {
            match parse_config(bad) {
                Err(e) => {
                    assert_eq!(e.kind, SourceErrorKind::Config);
                    assert!(!e.message.contains("hunter2"), "{}", e.message);
                }
                Ok(_) => panic!("{bad} parsed"),
            }
        }
    }

    #[test]
    fn ado_strings_name_host_port_and_database() {
        let cfg = parse_config("server=tcp:db.example,1444;database=acme;user id=agent;password=x").unwrap();
        assert_eq!(cfg.get_addr(), "db.example:1444");
    }
}

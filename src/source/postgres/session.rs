//! Opening the one connection a [`super::PostgresSource`] uses, with the
//! session settings that make every value's text form predictable.

use super::errors::describe;
use crate::source::{SourceError, SourceErrorKind};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// Besides the settings [`crate::pgtext`] relies on, a search path holding
/// only the system catalog: every object ctmirror names is
/// schema-qualified, so nothing a tenant puts in `public` can shadow a
/// function or operator we call, and `format_type` spells user types
/// schema-qualified, which keeps the casts and side-table columns built from
/// it unambiguous.
fn session_settings() -> String {
    format!(
        "{}SET IntervalStyle = 'postgres'; SET search_path = pg_catalog, pg_temp",
        crate::pgtext::session_set_sql()
    )
}

/// Connects and prepares the session. Connection failures are transient
/// (the server may be restarting); a malformed URL is a configuration
/// error. Messages name host, port, database and user, never the password.
pub(crate) async fn open(url: &str) -> Result<Client, SourceError> {
    let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
        SourceError::config(format!("the source database URL is not valid: {}", describe(&e)))
    })?;
    config.application_name("ctmirror-agent");
    let target = describe_target(&config);
    let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
    let redact = |message: String| match &password {
        Some(p) if !p.is_empty() => message.replace(p.as_str(), "***"),
        _ => message,
    };
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        SourceError::new(
            SourceErrorKind::Transient,
            redact(format!("cannot connect to the source database {target}: {}", describe(&e))),
        )
    })?;
    let log_target = target.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(target = %log_target, error = %describe(&e), "source database connection ended");
        }
    });
    client.batch_execute(&session_settings()).await.map_err(|e| {
        let mut err = super::errors::pg_error(e, &format!("preparing the session on {target}"), "CONNECT");
        err.message = redact(err.message);
        err
    })?;
    Ok(client)
}

/// `user@host:port/dbname`, for messages.
fn describe_target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{}@{host}:{port}/{}", config.get_user().unwrap_or("?"), config.get_dbname().unwrap_or("?"))
}

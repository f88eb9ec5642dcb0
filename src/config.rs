//! The configuration file shared by agent and receiver (`ctmirror.example.toml`).
//!
//! One file format with an `[agent]` and a `[receiver]` section; each command
//! reads only its own section, so a partner's file holds just `[receiver]`.
//! Relative paths are resolved against the file's directory. Secrets (keys,
//! database URLs) may be given as `env:NAME` to read an environment variable.

use crate::ids::{AppId, TenantId};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub agent: Option<AgentConfig>,
    pub receiver: Option<ReceiverConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// The partner's PostgreSQL, where mirror schemas live.
    pub database_url: Secret,
    /// The application this receiver serves; tokens for others are refused.
    pub application: AppId,
    /// The partner's private key, signing Authenticate answers.
    pub private_key: String,
    /// The hosting operator's agent public key.
    pub agent_public_key: String,
    /// The agent's next key during a key rotation: tokens signed by either
    /// are accepted, so the operator switches without downtime.
    #[serde(default)]
    pub agent_next_public_key: Option<String>,
    /// When set, only these tenants are served; calls for any other tenant
    /// are refused with 403 before anything is read or written.
    #[serde(default)]
    pub tenants: Option<Vec<TenantId>>,
    #[serde(default)]
    pub limits: ReceiverLimits,
    #[serde(default = "default_skew")]
    pub max_clock_skew_secs: i64,
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Drop mirror tables the schema map no longer names (default), or keep
    /// them, frozen, for the partner to drop.
    #[serde(default = "yes")]
    pub drop_unmapped_tables: bool,
    /// Keep a column the source dropped (or the map no longer names) in the
    /// mirror table, made nullable and no longer filled, instead of
    /// dropping it (default).
    #[serde(default)]
    pub keep_dropped_columns: bool,
    /// When set, Authenticate answers "do not replicate" with this reason.
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// PEM certificate chain (server certificate first) served over HTTPS;
    /// set together with `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead. The agent's tokens and the rows then travel
    /// unencrypted, so this is only for a receiver behind a TLS-terminating
    /// proxy or on loopback; it must be asked for, never a silent default.
    #[serde(default)]
    pub plain_http: bool,
    #[serde(default)]
    pub hooks: HookConfig,
    /// Tenant isolation by database roles (off by default).
    #[serde(default)]
    pub tenant_roles: TenantRolesConfig,
}

/// How the receiver serves: what [`ReceiverConfig::transport`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    Tls { cert: &'a Path, key: &'a Path },
    PlainHttp,
}

impl ReceiverConfig {
    /// A configuration with every optional setting at its default, for
    /// programs and tests that build one without a file.
    pub fn new(
        listen: impl Into<String>,
        database_url: impl Into<Secret>,
        application: AppId,
        private_key: impl Into<String>,
        agent_public_key: impl Into<String>,
    ) -> Self {
        Self {
            listen: listen.into(),
            database_url: database_url.into(),
            application,
            private_key: private_key.into(),
            agent_public_key: agent_public_key.into(),
            agent_next_public_key: None,
            tenants: None,
            limits: ReceiverLimits::default(),
            max_clock_skew_secs: default_skew(),
            max_body_bytes: default_body(),
            drop_unmapped_tables: true,
            keep_dropped_columns: false,
            paused_reason: None,
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            hooks: HookConfig::default(),
            tenant_roles: TenantRolesConfig::default(),
        }
    }

    /// HTTPS with `tls_cert` and `tls_key`, or plain HTTP when asked for
    /// explicitly; anything else is refused with what to set. Both config
    /// validation and `receiver::serve` decide through here, so a config
    /// built in code cannot fall back to plain HTTP either.
    pub fn transport(&self) -> Result<Transport<'_>, String> {
        const CHOOSE: &str = "set tls_cert and tls_key (PEM files) to serve HTTPS, or plain_http = true to serve \
                              plain HTTP behind a TLS-terminating proxy or on loopback";
        match (&self.tls_cert, &self.tls_key, self.plain_http) {
            (Some(cert), Some(key), false) => Ok(Transport::Tls { cert, key }),
            (None, None, true) => Ok(Transport::PlainHttp),
            (None, None, false) => Err(format!("receiver: neither TLS nor plain HTTP is configured; {CHOOSE}")),
            (Some(_), Some(_), true) => Err("receiver: tls_cert/tls_key and plain_http = true contradict each other; \
                                             remove plain_http to serve HTTPS"
                .into()),
            (Some(_), None, _) => Err(format!("receiver.tls_cert is set but tls_key is not; {CHOOSE}")),
            (None, Some(_), _) => Err(format!("receiver.tls_key is set but tls_cert is not; {CHOOSE}")),
        }
    }
}

/// What one request, and one tenant, may take of a receiver. Each limit is
/// answered with its own status code, so the agent knows whether to wait
/// (429, 503), send smaller batches (413) or stop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverLimits {
    /// Rows in one batch at most (413 beyond).
    pub max_batch_rows: u64,
    /// Bytes of row data in one batch at most (413 beyond); the body limit
    /// `max_body_bytes` bounds the whole request.
    pub max_batch_bytes: u64,
    /// A request's body must arrive within this many seconds (408 beyond),
    /// so a slow sender cannot hold a connection and a tenant slot.
    pub body_timeout_secs: u64,
    /// A request's database work must finish within this many seconds;
    /// beyond, it is rolled back and answered 503 with Retry-After. Also
    /// the PostgreSQL statement_timeout of the receiver's sessions.
    pub request_timeout_secs: u64,
    /// Requests of one tenant in flight at most; more are answered 429
    /// with Retry-After. One agent sends one request at a time per tenant
    /// and application, so a small number is plenty.
    pub max_concurrent_per_tenant: usize,
    /// Accepted nonces remembered at most (each about 60 bytes). When full,
    /// new requests are answered 503 rather than forgetting a nonce that
    /// could then be replayed.
    pub max_remembered_nonces: usize,
}

impl Default for ReceiverLimits {
    fn default() -> Self {
        Self {
            max_batch_rows: 500_000,
            max_batch_bytes: 32 * 1024 * 1024,
            body_timeout_secs: 60,
            request_timeout_secs: 600,
            max_concurrent_per_tenant: 4,
            max_remembered_nonces: 200_000,
        }
    }
}

/// `[receiver.tenant_roles]`: each tenant's writes run on a connection that
/// logged in as the tenant's own role, which can touch that tenant's schemas
/// only (`src/receiver/tenant_roles.rs`, docs/receiver.md "Tenant isolation").
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRolesConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Secret (or `env:NAME`) from which each tenant role's password is
    /// derived, so every receiver instance sets and uses the same one.
    /// Without it tenant roles get no password and the partner's
    /// `pg_hba.conf` must let them in another way (peer, cert, trust).
    #[serde(default)]
    pub password_secret: Option<String>,
    /// Existing roles that get read access to every tenant's mirror schema.
    #[serde(default)]
    pub grant_read_to: Vec<String>,
}

/// The secret never reaches a log line, even through `{:?}` of the config.
impl std::fmt::Debug for TenantRolesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRolesConfig")
            .field("enabled", &self.enabled)
            .field("password_secret", &self.password_secret.as_ref().map(|_| "<redacted>"))
            .field("grant_read_to", &self.grant_read_to)
            .finish()
    }
}

impl TenantRolesConfig {
    /// Refuses reader names that are not plain role names, and names that
    /// PostgreSQL or ctmirror give a meaning of their own: `"public"` in a
    /// GRANT means every role (tenant roles included, even quoted), and a
    /// tenant role or the tenants' group as a reader would see every tenant.
    pub fn validate(&self) -> Result<(), String> {
        if self.password_secret.as_deref().is_some_and(|s| s.is_empty() || s == "env:") {
            return Err("password_secret is empty; leave it out for roles without a password".into());
        }
        for name in &self.grant_read_to {
            let plain = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !plain {
                return Err(format!(
                    "grant_read_to {:?} is not a role name ctmirror accepts: use 1-63 characters of letters, \
                     digits and _, not starting with a digit",
                    name.chars().take(80).collect::<String>()
                ));
            }
            let lower = name.to_ascii_lowercase();
            let reserved = ["public", "none", "current_user", "current_role", "session_user"].contains(&lower.as_str())
                || lower.starts_with("pg_")
                || lower == crate::receiver::TENANT_GROUP_ROLE
                || lower.starts_with(crate::receiver::TENANT_ROLE_PREFIX);
            if reserved {
                return Err(format!(
                    "grant_read_to {name:?} is reserved: PUBLIC, pg_* roles, {} and {}* roles would \
                     give readers (or other tenants) more than the mirror schemas",
                    crate::receiver::TENANT_GROUP_ROLE,
                    crate::receiver::TENANT_ROLE_PREFIX
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// `ANALYZE` each table that changed in the cycle.
    #[serde(default = "yes")]
    pub analyze: bool,
    /// `NOTIFY` this channel with a JSON summary after each cycle.
    #[serde(default)]
    pub notify_channel: Option<String>,
    /// Extra SQL run after each cycle with `search_path` set to the tenant's
    /// mirror schema, e.g. index maintenance.
    #[serde(default)]
    pub sql: Vec<String>,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self { analyze: true, notify_channel: None, sql: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's private key, signing every request.
    pub private_key: String,
    /// Rows per batch at most.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Bytes per batch at most (approximate wire size; one oversized row
    /// still travels alone).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// How long the source keeps change records (hours): the PostgreSQL
    /// source's own cleanup, and the CHANGE_RETENTION a SQL Server database
    /// gets when the agent turns change tracking on (an existing setting
    /// there is kept).
    #[serde(default = "default_retention")]
    pub change_retention_hours: u32,
    /// HTTP timeout per request, seconds.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// The control database (PostgreSQL URL or `env:NAME`) holding schedule
    /// state, leases and run history; required by `agent`, `status`,
    /// `resync` and `maintenance`, not by `sync`.
    #[serde(default)]
    pub control_database_url: Option<Secret>,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(rename = "application", default)]
    pub applications: Vec<ApplicationConfig>,
}

/// How `ctmirror agent` schedules cycles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Seconds from one cycle's start to the next of the same pair.
    pub interval_secs: u64,
    /// The nightly window in which no cycle starts; absent = default window.
    pub blackout: BlackoutConfig,
    /// Cycles in flight in this process at most.
    pub max_cycles: usize,
    /// Cycles reading from one source database server at most.
    pub max_cycles_per_server: usize,
    /// A pair's lease lasts this long unless renewed; a process that dies
    /// hands its pairs over after at most this time.
    pub lease_secs: u64,
    /// How often the agent looks for due pairs at least (it also wakes when
    /// a pair falls due or a cycle ends).
    pub poll_secs: u64,
    /// Run history older than this is pruned.
    pub history_days: u32,
    /// After SIGTERM, running cycles get this long to reach a batch boundary.
    pub shutdown_grace_secs: u64,
    /// Transient failures retry after a full-jitter backoff starting here...
    pub backoff_base_secs: u64,
    /// ...and never longer than this.
    pub backoff_max_secs: u64,
    /// Definite failures (auth refused, schema refused, bad config) are
    /// retried no sooner than this, so a partner is not hammered.
    pub definite_failure_retry_secs: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval_secs: 20 * 60,
            blackout: BlackoutConfig::default(),
            max_cycles: 16,
            max_cycles_per_server: 4,
            lease_secs: 120,
            poll_secs: 5,
            history_days: 30,
            shutdown_grace_secs: 60,
            backoff_base_secs: 30,
            backoff_max_secs: 3600,
            definite_failure_retry_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlackoutConfig {
    /// false turns the blackout off.
    pub enabled: bool,
    /// Wall-clock start, `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// Wall-clock end (may be before start: the window crosses midnight).
    pub end: String,
    /// IANA time zone of the wall clock, e.g. `Europe/Berlin`.
    pub time_zone: String,
}

impl Default for BlackoutConfig {
    fn default() -> Self {
        Self { enabled: true, start: "01:30".into(), end: "03:00".into(), time_zone: "UTC".into() }
    }
}

impl BlackoutConfig {
    pub fn window(&self) -> Result<Option<crate::schedule::Blackout>, String> {
        if !self.enabled {
            return Ok(None);
        }
        crate::schedule::Blackout::parse(&self.start, &self.end, &self.time_zone)
            .map(Some)
            .map_err(|e| format!("agent.schedule.blackout: {e}"))
    }
}

/// Rate limits; 0 means unlimited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Rows per second read from one source database server, over all the
    /// cycles of this process that read from it.
    pub source_rows_per_sec: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// PostgreSQL with ctmirror's trigger-based change tracking; `url` is a
    /// `postgres://` URL.
    Postgres,
    /// SQL Server with native Change Tracking; `url` is an ADO.NET
    /// connection string or a `jdbc:sqlserver://` URL.
    Sqlserver,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: TenantId,
    pub source: SourceKind,
    /// Connection URL of the tenant database, or `env:NAME`.
    pub url: Secret,
    /// Skip this tenant's cycles (e.g. while its database is migrated); the
    /// control database has the same flag (`ctmirror maintenance`).
    #[serde(default)]
    pub maintenance: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationConfig {
    pub id: AppId,
    pub receiver_url: String,
    /// The partner's registered public key, checking the signature of every
    /// answer the agent acts on.
    pub partner_public_key: String,
    /// The partner's next key during a key rotation: answers signed by
    /// either are accepted, so the partner switches without downtime.
    #[serde(default)]
    pub partner_next_public_key: Option<String>,
    pub schema_map: PathBuf,
    /// Tenants that approved this application.
    pub tenants: Vec<TenantId>,
    /// Requests per second to this partner's receiver at most (0: no limit).
    #[serde(default)]
    pub requests_per_sec: u32,
    /// Request body bytes per second to this partner at most (0: no limit).
    #[serde(default)]
    pub bytes_per_sec: u32,
    /// PEM bundle of the CA certificates the receiver's certificate must
    /// chain to, for a partner with a private CA. When set, these are the
    /// only roots trusted for this partner; unset, the system's root store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` receiver_url. Tokens and rows then travel
    /// unencrypted: only for a receiver on loopback or behind a
    /// TLS-terminating proxy on the same host.
    #[serde(default)]
    pub allow_plain_http: bool,
}

fn yes() -> bool {
    true
}
fn default_skew() -> i64 {
    300
}
fn default_body() -> usize {
    64 * 1024 * 1024
}
/// Large enough that per-batch costs (a request, a signature, a commit and
/// its cursor write) stay small next to the rows (measured with
/// `scripts/bench`); the byte bound is what keeps memory flat. A pipelined
/// agent holds about three batches at once, so 4 MiB keeps it near 32 MiB
/// (8 MiB measured no faster and twice the memory).
fn default_batch_rows() -> usize {
    50_000
}
fn default_batch_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_retention() -> u32 {
    7 * 24
}
fn default_timeout() -> u64 {
    120
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path} is invalid: {message}")]
    Invalid { path: String, message: String },
    #[error("config {path} has no [{section}] section")]
    MissingSection { path: String, section: &'static str },
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(cfg)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ConfigFile = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid { path: origin.to_owned(), message: e.to_string() })?;
        cfg.validate()
            .map_err(|message| ConfigError::Invalid { path: origin.to_owned(), message })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(r) = &self.receiver {
            if r.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("receiver.listen {:?} is not host:port with an IP address", r.listen));
            }
            if r.max_clock_skew_secs <= 0 || r.max_clock_skew_secs > 3600 {
                return Err("receiver.max_clock_skew_secs must be between 1 and 3600".into());
            }
            if r.max_body_bytes < 1024 {
                return Err("receiver.max_body_bytes must be at least 1024".into());
            }
            let l = &r.limits;
            if l.max_batch_rows == 0 || l.max_batch_bytes < 1024 {
                return Err("receiver.limits.max_batch_rows must be positive and max_batch_bytes at least 1024".into());
            }
            if l.body_timeout_secs == 0 || l.request_timeout_secs == 0 {
                return Err("receiver.limits.body_timeout_secs and request_timeout_secs must be at least 1".into());
            }
            if l.max_concurrent_per_tenant == 0 || l.max_remembered_nonces < 1000 {
                return Err(
                    "receiver.limits.max_concurrent_per_tenant must be at least 1 and max_remembered_nonces at least 1000"
                        .into(),
                );
            }
            if r.tenants.as_ref().is_some_and(Vec::is_empty) {
                return Err("receiver.tenants is empty: leave it out to serve every tenant, or list the tenants served".into());
            }
            r.transport()?;
            r.tenant_roles.validate().map_err(|e| format!("receiver.tenant_roles: {e}"))?;
        }
        if let Some(a) = &self.agent {
            if a.batch_rows == 0 || a.batch_bytes < 1024 {
                return Err("agent.batch_rows must be positive and agent.batch_bytes at least 1024".into());
            }
            let s = &a.schedule;
            if s.interval_secs == 0 || s.interval_secs > 7 * 24 * 3600 {
                return Err("agent.schedule.interval_secs must be between 1 and 604800".into());
            }
            if s.max_cycles == 0 || s.max_cycles_per_server == 0 {
                return Err("agent.schedule.max_cycles and max_cycles_per_server must be at least 1".into());
            }
            if s.lease_secs < 1 || s.poll_secs < 1 || s.poll_secs > 3600 {
                return Err("agent.schedule.lease_secs must be at least 1 and poll_secs between 1 and 3600".into());
            }
            if s.backoff_base_secs == 0 || s.backoff_max_secs < s.backoff_base_secs {
                return Err("agent.schedule.backoff_base_secs must be positive and at most backoff_max_secs".into());
            }
            if s.history_days == 0 {
                return Err("agent.schedule.history_days must be at least 1".into());
            }
            s.blackout.window()?;
            let mut ids = std::collections::HashSet::new();
            for t in &a.tenants {
                if !ids.insert(&t.id) {
                    return Err(format!("tenant {} is configured twice", t.id));
                }
            }
            let mut apps = std::collections::HashSet::new();
            for app in &a.applications {
                if !apps.insert(&app.id) {
                    return Err(format!("application {} is configured twice", app.id));
                }
                if !(app.receiver_url.starts_with("http://") || app.receiver_url.starts_with("https://")) {
                    return Err(format!("application {}: receiver_url must start with http:// or https://", app.id));
                }
                if app.receiver_url.starts_with("http://") && !app.allow_plain_http {
                    return Err(format!(
                        "application {}: receiver_url {} is plain HTTP, which would send tokens and rows \
                         unencrypted; use https://, or set allow_plain_http = true for a receiver on loopback \
                         or behind a TLS-terminating proxy on this host",
                        app.id, app.receiver_url
                    ));
                }
                for t in &app.tenants {
                    if !ids.contains(t) {
                        return Err(format!("application {} names tenant {t}, which is not configured", app.id));
                    }
                }
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut String| {
            if !p.starts_with("env:") && Path::new(p.as_str()).is_relative() {
                *p = base.join(&*p).display().to_string();
            }
        };
        let fix_path = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(r) = &mut self.receiver {
            fix(&mut r.private_key);
            fix(&mut r.agent_public_key);
            if let Some(next) = &mut r.agent_next_public_key {
                fix(next);
            }
            r.tls_cert.iter_mut().chain(r.tls_key.iter_mut()).for_each(fix_path);
        }
        if let Some(a) = &mut self.agent {
            fix(&mut a.private_key);
            for app in &mut a.applications {
                fix(&mut app.partner_public_key);
                if let Some(next) = &mut app.partner_next_public_key {
                    fix(next);
                }
                fix_path(&mut app.schema_map);
                app.ca_file.iter_mut().for_each(fix_path);
            }
        }
    }

    pub fn agent(&self, path: &str) -> Result<&AgentConfig, ConfigError> {
        self.agent.as_ref().ok_or(ConfigError::MissingSection { path: path.to_owned(), section: "agent" })
    }

    pub fn receiver(&self, path: &str) -> Result<&ReceiverConfig, ConfigError> {
        self.receiver.as_ref().ok_or(ConfigError::MissingSection { path: path.to_owned(), section: "receiver" })
    }
}

/// A configuration value that may carry a credential (a database URL with
/// its password). `Debug` shows only where it comes from, never the value,
/// so a configuration printed while debugging or logged leaks nothing.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, reading the environment variable for `env:NAME`.
    pub fn resolve(&self) -> Result<String, ConfigError> {
        resolve_secret(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.strip_prefix("env:") {
            Some(var) => write!(f, "Secret(env:{var})"),
            None => f.write_str("Secret(<redacted>)"),
        }
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Resolves an `env:NAME` value; other values are returned as they are.
pub fn resolve_secret(value: &str) -> Result<String, ConfigError> {
    match value.strip_prefix("env:") {
        Some(var) => std::env::var(var).map_err(|_| ConfigError::MissingEnv(var.to_owned())),
        None => Ok(value.to_owned()),
    }
}

impl AgentConfig {
    pub fn tenant(&self, id: &TenantId) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| &t.id == id)
    }
    pub fn application(&self, id: &AppId) -> Option<&ApplicationConfig> {
        self.applications.iter().find(|a| &a.id == id)
    }

    /// Every (tenant, application) pair the agent drives.
    pub fn pairs(&self) -> Vec<crate::schedule::PairKey> {
        let mut pairs: Vec<_> = self
            .applications
            .iter()
            .flat_map(|a| {
                a.tenants.iter().map(|t| crate::schedule::PairKey { tenant: t.clone(), app: a.id.clone() })
            })
            .collect();
        pairs.sort();
        pairs
    }

    /// The control database URL, resolved; a clear error when unset.
    pub fn control_url(&self) -> Result<String, ConfigError> {
        let url = self.control_database_url.as_ref().ok_or_else(|| ConfigError::Invalid {
            path: "[agent]".into(),
            message: "control_database_url is not set; the agent keeps schedule state, leases and run \
                      history there"
                .into(),
        })?;
        url.resolve()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ctmirror.example.toml");
        let cfg = ConfigFile::load(&path).unwrap();
        assert!(cfg.agent.is_some() && cfg.receiver.is_some());
    }

    #[test]
    fn garbage_is_refused_clearly() {
        let bare = "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"x\"\napplication=\"a\"\nprivate_key=\"k\"\nagent_public_key=\"p\"\n";
        let recv = format!("{bare}tls_cert=\"cert.pem\"\ntls_key=\"key.pem\"\n");
        let app = |extra: &str| {
            format!("[agent]\nprivate_key=\"k\"\n[[agent.application]]\nid=\"a\"\nreceiver_url=\"http://x\"\npartner_public_key=\"p\"\nschema_map=\"m\"\ntenants=[]\n{extra}")
        };
        let cases = [
            ("[receiver]\nlisten=1", "invalid type"),
            ("[nonsense]\n", "unknown field"),
            (&recv.replace("127.0.0.1:1", "localhost"), "host:port"),
            (&format!("{recv}max_clock_skew_secs=0\n"), "max_clock_skew_secs"),
            (&format!("{recv}bogus=1\n"), "unknown field"),
            (&format!("{recv}keep_dropped_columns=\"yes\"\n"), "invalid type"),
            (&format!("{recv}tenants=[]\n"), "receiver.tenants is empty"),
            (&format!("{recv}tenants=[\"Acme\"]\n"), "invalid tenant id"),
            (&format!("{recv}tenants=\"acme\"\n"), "invalid type"),
            (&format!("{recv}[receiver.limits]\nmax_batch_rows=0\n"), "max_batch_rows"),
            (&format!("{recv}[receiver.limits]\nmax_batch_bytes=10\n"), "max_batch_bytes"),
            (&format!("{recv}[receiver.limits]\nbody_timeout_secs=0\n"), "body_timeout_secs"),
            (&format!("{recv}[receiver.limits]\nmax_concurrent_per_tenant=0\n"), "max_concurrent_per_tenant"),
            (&format!("{recv}[receiver.limits]\nmax_remembered_nonces=5\n"), "max_remembered_nonces"),
            (&format!("{recv}[receiver.limits]\nmax_batch_rows=-1\n"), "invalid value"),
            (&format!("{recv}[receiver.limits]\nbogus=1\n"), "unknown field"),
            (bare, "neither TLS nor plain HTTP is configured; set tls_cert and tls_key"),
            (&format!("{bare}tls_cert=\"cert.pem\"\n"), "tls_cert is set but tls_key is not"),
            (&format!("{bare}tls_key=\"key.pem\"\n"), "tls_key is set but tls_cert is not"),
            (&format!("{bare}tls_key=\"key.pem\"\nplain_http=true\n"), "tls_key is set but tls_cert is not"),
            (&format!("{recv}plain_http=true\n"), "contradict each other"),
            (&format!("{bare}plain_http=\"yes\"\n"), "invalid type"),
            (&app(""), "receiver_url http://x is plain HTTP"),
            (&app("allow_plain_http=\"yes\"\n"), "invalid type"),
            (&app("ca_file=[]\n"), "invalid type"),
            ("[agent]\nprivate_key=\"k\"\nbatch_rows=0\n", "batch_rows"),
            ("[agent]\nprivate_key=\"k\"\n[[agent.application]]\nid=\"a\"\nreceiver_url=\"ftp://x\"\npartner_public_key=\"p\"\nschema_map=\"m\"\ntenants=[]\n", "http"),
            ("[agent]\nprivate_key=\"k\"\n[[agent.application]]\nid=\"a\"\nreceiver_url=\"https://x\"\npartner_public_key=\"p\"\nschema_map=\"m\"\ntenants=[\"ghost\"]\n", "not configured"),
            ("[agent]\nprivate_key=\"k\"\n[[agent.tenant]]\nid=\"Bad\"\nsource=\"postgres\"\nurl=\"u\"\n", "invalid tenant id"),
            ("[agent]\nprivate_key=\"k\"\n[[agent.tenant]]\nid=\"t\"\nsource=\"oracle\"\nurl=\"u\"\n", "unknown variant"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\ninterval_secs=0\n", "interval_secs"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\ninterval_secs=\"20m\"\n", "invalid type"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\nmax_cycles=0\n", "max_cycles"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\nbackoff_base_secs=10\nbackoff_max_secs=5\n", "backoff"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\nlease_secs=0\n", "lease_secs"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\nhistory_days=0\n", "history_days"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule]\nbogus=1\n", "unknown field"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule.blackout]\ntime_zone=\"Mars/Base\"\n", "Mars/Base"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule.blackout]\nstart=\"25:00\"\n", "25:00"),
            ("[agent]\nprivate_key=\"k\"\n[agent.schedule.blackout]\nstart=\"03:00\"\n", "empty"),
            ("[agent]\nprivate_key=\"k\"\n[agent.limits]\nsource_rows_per_sec=-1\n", "invalid value"),
            ("[agent]\nprivate_key=\"k\"\n[[agent.tenant]]\nid=\"t\"\nsource=\"postgres\"\nurl=\"u\"\nmaintenance=\"yes\"\n", "invalid type"),
        ];
        for (text, expected) in cases {
            let err = ConfigFile::parse(text, "c.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn debug_output_never_shows_database_urls() {
        let text = "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"postgres://u:hunter2@h/db\"\napplication=\"a\"\n\
                    private_key=\"k\"\nagent_public_key=\"p\"\nplain_http=true\n[agent]\nprivate_key=\"k\"\n\
                    control_database_url=\"postgres://c:hunter3@h/c\"\n[[agent.tenant]]\nid=\"t\"\n\
                    source=\"postgres\"\nurl=\"postgres://t:hunter4@h/t\"\n";
        let cfg = ConfigFile::parse(text, "c.toml").unwrap();
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("Secret(<redacted>)"));
        assert_eq!(format!("{:?}", Secret::from("env:DB_URL")), "Secret(env:DB_URL)");
    }

    #[test]
    fn tls_settings_parse_and_their_paths_resolve_against_the_config_file() {
        let dir = std::env::temp_dir().join(format!("ctm-config-tls-{}", crate::auth::new_nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"x\"\napplication=\"a\"\nprivate_key=\"k\"\n\
             agent_public_key=\"p\"\ntls_cert=\"tls/cert.pem\"\ntls_key=\"/etc/tls/key.pem\"\n\
             [agent]\nprivate_key=\"k\"\n[[agent.application]]\nid=\"a\"\nreceiver_url=\"https://x\"\n\
             partner_public_key=\"p\"\nschema_map=\"m\"\ntenants=[]\nca_file=\"partner-ca.pem\"\n\
             [[agent.application]]\nid=\"b\"\nreceiver_url=\"http://127.0.0.1:9\"\nallow_plain_http=true\n\
             partner_public_key=\"p\"\nschema_map=\"m\"\ntenants=[]\n",
        )
        .unwrap();
        let cfg = ConfigFile::load(&path).unwrap();
        let r = cfg.receiver.as_ref().unwrap();
        let cert = dir.join("tls/cert.pem");
        assert_eq!(r.transport(), Ok(Transport::Tls { cert: &cert, key: Path::new("/etc/tls/key.pem") }));
        let apps = &cfg.agent.as_ref().unwrap().applications;
        assert_eq!(apps[0].ca_file.as_deref(), Some(dir.join("partner-ca.pem").as_path()));
        assert!(!apps[0].allow_plain_http && apps[1].allow_plain_http && apps[1].ca_file.is_none());

        let plain = "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"x\"\napplication=\"a\"\nprivate_key=\"k\"\n\
                     agent_public_key=\"p\"\nplain_http=true\n";
        let cfg = ConfigFile::parse(plain, "plain.toml").unwrap();
        assert_eq!(cfg.receiver.unwrap().transport(), Ok(Transport::PlainHttp));
    }

    #[test]
    fn a_receiver_config_built_in_code_has_no_transport_until_one_is_chosen() {
        let cfg = ReceiverConfig::new("127.0.0.1:0", "x", AppId::new("a").unwrap(), "k", "p");
        assert!(cfg.transport().unwrap_err().contains("neither TLS nor plain HTTP"));
    }

    #[test]
    fn env_secrets_resolve_or_say_which_variable() {
        assert_eq!(resolve_secret("plain").unwrap(), "plain");
        let err = resolve_secret("env:CTMIRROR_TEST_SURELY_UNSET").unwrap_err();
        assert!(err.to_string().contains("CTMIRROR_TEST_SURELY_UNSET"));
    }
}

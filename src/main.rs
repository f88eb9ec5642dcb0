//! The `ctmirror` command line: wires configuration to the agent, the
//! receiver and key generation. All behaviour lives in the library.

use clap::{Parser, Subcommand};
use ctmirror::agent::{self, CycleReport};
use ctmirror::auth::Keypair;
use ctmirror::config::{ConfigFile, SourceKind};
use ctmirror::ids::{AppId, TenantId};
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that takes a closed stdout (`ctmirror sync | head`) as the
/// reader having seen enough: exit quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

#[derive(Parser)]
#[command(name = "ctmirror", version, about = "Table-level change-tracking mirror")]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax); RUST_LOG also works.
    #[arg(long, global = true, env = "CTMIRROR_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 key pair: <OUT>.key (private, mode 0600) and <OUT>.pub.
    Keygen {
        /// Path without extension, e.g. keys/agent.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a throwaway CA and receiver certificate, for tests and demos.
    ///
    /// <DIR>/ca.pem is the agent's ca_file; <DIR>/cert.pem and <DIR>/key.pem
    /// (mode 0600) are the receiver's tls_cert and tls_key. Never
    /// overwrites. Production receivers use a certificate from a real CA.
    TlsSelfsigned {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// A name or IP address the certificate is for; repeat for several.
        #[arg(long = "host", value_name = "NAME", default_values = ctmirror::tls::DEFAULT_HOSTS)]
        hosts: Vec<String>,
    },
    /// Serve the reference receiver until SIGTERM or Ctrl-C.
    Receiver {
        /// Configuration file with a [receiver] section.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one mirroring cycle for one tenant and application. Exits 0 only
    /// when every table succeeded.
    Sync {
        #[command(flatten)]
        pair: PairArgs,
        /// Print the cycle report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the hosted service: every configured pair on its cadence, until
    /// SIGTERM (or one pass with --once). Needs agent.control_database_url.
    Agent {
        /// Configuration file with an [agent] section.
        #[arg(long, short)]
        config: PathBuf,
        /// Run every pair that is due now once, then exit (cron-style
        /// hosting).
        #[arg(long)]
        once: bool,
    },
    /// Ask for a full reload of a tenant (all its applications, or one) or
    /// of one mirror table, at the pair's next cycle or at once.
    Resync {
        /// Configuration file with an [agent] section.
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        app: Option<AppId>,
        /// A mirror table name from the schema map.
        #[arg(long)]
        table: Option<String>,
        /// Make the pair due now instead of at its next turn.
        #[arg(long)]
        now: bool,
    },
    /// Show each pair and table: state, cursor, lag, last success, last error.
    Status {
        /// Configuration file with an [agent] section.
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<TenantId>,
        /// Keep showing the progress of running cycles until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
    /// Put a tenant in maintenance (its cycles are skipped) or take it out.
    Maintenance {
        /// Configuration file with an [agent] section.
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: TenantId,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// Shown in status while the tenant is in maintenance.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Turn change tracking off for one source table of a tenant now,
    /// removing the triggers and side table ctmirror installed, whichever
    /// applications map it. Use it before DDL PostgreSQL refuses on a
    /// tracked table (changing a primary-key column's type); the next cycle
    /// of an application that maps the table tracks it again and reloads it.
    Untrack {
        /// Configuration file with an [agent] section.
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: TenantId,
        /// The source table's schema (the source's default schema when left out).
        #[arg(long)]
        schema: Option<String>,
        /// The source table's name.
        #[arg(long)]
        table: String,
    },
    /// Compare a PostgreSQL tenant's mapped tables with their mirror: row
    /// counts and checksums. Exits 0 only when every table is equal.
    Verify {
        #[command(flatten)]
        pair: PairArgs,
        /// The receiver's database URL (or env:NAME).
        #[arg(long)]
        mirror_url: String,
    },
}

/// One tenant and application of an agent configuration.
#[derive(clap::Args)]
struct PairArgs {
    /// Configuration file with an [agent] section.
    #[arg(long, short)]
    config: PathBuf,
    #[arg(long)]
    tenant: TenantId,
    #[arg(long)]
    app: AppId,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Keygen { out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            }
            let key = Keypair::generate();
            let (private, public) = key.write_files(&out).map_err(|e| e.to_string())?;
            out!("private key: {private}\npublic key:  {public}\n{}", key.public_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::TlsSelfsigned { dir, hosts } => {
            let [ca, cert, key] = ctmirror::tls::write_self_signed(&dir, &hosts).map_err(|e| e.to_string())?;
            out!(
                "CA certificate:     {} (agent: ca_file)\nserver certificate: {} (receiver: tls_cert) for {}\n\
                 server key:         {} (receiver: tls_key)\nfor tests and demos only: production receivers use a \
                 certificate from a real CA",
                ca.display(),
                cert.display(),
                hosts.join(", "),
                key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Receiver { config } => {
            let file = ConfigFile::load(&config).map_err(|e| e.to_string())?;
            let cfg = file.receiver(&config.display().to_string()).map_err(|e| e.to_string())?.clone();
            ctmirror::receiver::serve(cfg, shutdown_signal()).await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync { pair: PairArgs { config, tenant, app }, json } => {
            let file = ConfigFile::load(&config).map_err(|e| e.to_string())?;
            let cfg = file.agent(&config.display().to_string()).map_err(|e| e.to_string())?;
            let report = agent::sync_once(cfg, &tenant, &app).await.map_err(|e| e.to_string())?;
            if json {
                out!("{}", serde_json::to_string_pretty(&report_json(&report)).expect("json"));
            } else {
                print_report(&report);
            }
            Ok(if report.succeeded() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Verify { pair, mirror_url } => verify(pair, mirror_url).await,
        Command::Untrack { config, tenant, schema, table } => untrack(config, tenant, schema, table).await,
        Command::Agent { config, once } => run_agent(config, once).await,
        Command::Resync { config, tenant, app, table, now } => {
            let cfg = load_agent(&config)?;
            let targets = ctmirror::ops::resync::plan(&cfg, &tenant, app.as_ref(), table.as_deref())?;
            let control = control_db(&cfg).await?;
            for t in &targets {
                let id = control
                    .request_resync(&t.pair, t.table.as_deref(), chrono::Utc::now(), now)
                    .await
                    .map_err(|e| e.to_string())?;
                out!(
                    "resync {id}: {} {} reloads {}",
                    t.pair,
                    t.table.as_deref().map(|x| format!("table {x}")).unwrap_or_else(|| "every table".into()),
                    if now { "now" } else { "at its next cycle" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, tenant, follow } => {
            let cfg = load_agent(&config)?;
            let control = control_db(&cfg).await?;
            if follow {
                tokio::select! {
                    r = ctmirror::ops::follow(&control, tenant.as_ref(), std::time::Duration::from_secs(1)) => {
                        r.map_err(|e| e.to_string())?
                    }
                    _ = shutdown_signal() => {}
                }
            } else {
                ctmirror::ops::print_status(&control, tenant.as_ref()).await.map_err(|e| e.to_string())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Maintenance { config, tenant, state, reason } => {
            let cfg = load_agent(&config)?;
            if cfg.tenant(&tenant).is_none() {
                return Err(format!("tenant {tenant} is not configured"));
            }
            let control = control_db(&cfg).await?;
            let on = state == "on";
            control
                .set_maintenance(&tenant, on, reason.as_deref(), chrono::Utc::now())
                .await
                .map_err(|e| e.to_string())?;
            out!("tenant {tenant}: maintenance {state}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_agent(config: &std::path::Path) -> Result<ctmirror::config::AgentConfig, String> {
    let file = ConfigFile::load(config).map_err(|e| e.to_string())?;
    Ok(file.agent(&config.display().to_string()).map_err(|e| e.to_string())?.clone())
}

async fn control_db(cfg: &ctmirror::config::AgentConfig) -> Result<ctmirror::control::ControlDb, String> {
    let url = cfg.control_url().map_err(|e| e.to_string())?;
    ctmirror::control::ControlDb::connect(&url).await.map_err(|e| e.to_string())
}

async fn run_agent(config: PathBuf, once: bool) -> Result<ExitCode, String> {
    use ctmirror::agent::hosted::{service_settings, ConfiguredRunner};
    use ctmirror::agent::service::{default_owner, Mode, Service};
    let cfg = load_agent(&config)?;
    let settings = service_settings(&cfg, default_owner())?;
    let runner = ConfiguredRunner::new(cfg.clone()).map_err(|e| e.to_string())?;
    let control = control_db(&cfg).await?;
    let pairs = runner.pairs();
    let service = Service::new(control, runner, ctmirror::schedule::SystemClock, settings, pairs);
    let mode = if once { Mode::Once } else { Mode::Forever };
    let summary = service.run(mode, shutdown_signal()).await.map_err(|e| e.to_string())?;
    if once {
        out!("{} cycles, {} failed", summary.cycles, summary.failed);
    }
    Ok(ExitCode::SUCCESS)
}

async fn untrack(config: PathBuf, tenant: TenantId, schema: Option<String>, table: String) -> Result<ExitCode, String> {
    use ctmirror::source::{Source, SourceTable};
    let cfg = load_agent(&config)?;
    let t = cfg.tenant(&tenant).ok_or(format!("tenant {tenant} is not configured"))?;
    let url = t.url.resolve().map_err(|e| e.to_string())?;
    let table = SourceTable { schema, name: table };
    let retention = std::time::Duration::from_secs(u64::from(cfg.change_retention_hours) * 3600);
    let removed = match t.source {
        SourceKind::Postgres => {
            let mut source =
                ctmirror::source::postgres::PostgresSource::connect(&url, retention).await.map_err(|e| e.to_string())?;
            source.untrack(&table).await
        }
        SourceKind::Sqlserver => {
            let mut source =
                ctmirror::source::mssql::SqlServerSource::connect(&url, retention).await.map_err(|e| e.to_string())?;
            source.untrack(&table).await
        }
    }
    .map_err(|e| e.to_string())?;
    if removed {
        out!("untracked {table} of tenant {tenant}; an application that maps it tracks it again and reloads it");
    } else {
        out!("{table} of tenant {tenant} was not tracked; nothing to do");
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(PairArgs { config, tenant, app }: PairArgs, mirror_url: String) -> Result<ExitCode, String> {
    use ctmirror::config::resolve_secret;
    let file = ConfigFile::load(&config).map_err(|e| e.to_string())?;
    let cfg = file.agent(&config.display().to_string()).map_err(|e| e.to_string())?;
    let t = cfg.tenant(&tenant).ok_or(format!("tenant {tenant} is not configured"))?;
    let a = cfg.application(&app).ok_or(format!("application {app} is not configured"))?;
    let map = ctmirror::schema_map::SchemaMap::load(&a.schema_map).map_err(|e| e.to_string())?;
    let source_url = t.url.resolve().map_err(|e| e.to_string())?;
    let mirror_url = resolve_secret(&mirror_url).map_err(|e| e.to_string())?;
    let tables = match t.source {
        SourceKind::Postgres => ctmirror::verify::compare_postgres(&source_url, &mirror_url, &tenant, &map).await,
        SourceKind::Sqlserver => {
            let retention = std::time::Duration::from_secs(u64::from(cfg.change_retention_hours) * 3600);
            let mut source = ctmirror::source::mssql::SqlServerSource::connect(&source_url, retention)
                .await
                .map_err(|e| e.to_string())?;
            ctmirror::verify::compare_through_source(&mut source, &mirror_url, &tenant, &map).await
        }
    }
    .map_err(|e| e.to_string())?;
    out!("{:<24} {:>12} {:>12}  {:<32} equal", "table", "source rows", "mirror rows", "checksum");
    for t in &tables {
        out!(
            "{:<24} {:>12} {:>12}  {:<32} {}",
            t.table,
            t.source_rows,
            t.mirror_rows,
            t.source_md5,
            if t.equal() { "yes" } else { "NO" }
        );
    }
    Ok(if tables.iter().all(|t| t.equal()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.ok();
}

fn print_report(r: &CycleReport) {
    if let Some(reason) = &r.paused {
        out!("tenant {} / {}: receiver asked not to replicate ({reason})", r.tenant, r.application);
        return;
    }
    out!(
        "tenant {} / {}: {} tables, {} rows sent in {:.2}s",
        r.tenant,
        r.application,
        r.tables.len(),
        r.rows_sent(),
        r.duration.as_secs_f64()
    );
    out!(
        "{:<24} {:<12} {:>10} {:>10} {:>10} {:>10}  {:<24} result",
        "table", "mode", "rows sent", "inserted", "updated", "deleted", "cursor"
    );
    for t in &r.tables {
        let result = match &t.error {
            None => "ok".to_string(),
            Some(e) => format!("FAILED ({:?}): {}", e.kind, e.message),
        };
        out!(
            "{:<24} {:<12} {:>10} {:>10} {:>10} {:>10}  {:<24} {}",
            t.table,
            format!("{:?}", t.mode).to_lowercase(),
            t.rows_sent,
            t.counts.inserted,
            t.counts.updated,
            t.counts.deleted,
            t.cursor.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            result
        );
    }
    for d in &r.dropped {
        out!("{d:<24} dropped by the receiver (no longer mapped)");
    }
    if let Some(e) = &r.completion_error {
        out!("ReplicationCompleted failed: {e}");
    }
}

fn report_json(r: &CycleReport) -> serde_json::Value {
    serde_json::json!({
        "tenant": r.tenant,
        "application": r.application,
        "paused": r.paused,
        "succeeded": r.succeeded(),
        "seconds": r.duration.as_secs_f64(),
        "dropped": r.dropped,
        "completion_error": r.completion_error.as_ref().map(|e| e.message.clone()),
        "tables": r.tables.iter().map(|t| serde_json::json!({
            "table": t.table,
            "mode": t.mode,
            "rows_sent": t.rows_sent,
            "bytes_sent": t.bytes_sent,
            "batches": t.batches,
            "counts": t.counts,
            "cursor": t.cursor,
            "error": t.error.as_ref().map(|e| serde_json::json!({"kind": format!("{:?}", e.kind), "message": e.message})),
            "seconds": t.duration.as_secs_f64(),
        })).collect::<Vec<_>>(),
    })
}

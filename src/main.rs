//! The `ctmirror` command line: wires configuration to the agent, the
//! receiver and key generation. All behaviour lives in the library.

use clap::{Parser, Subcommand};
use ctmirror::agent::{self, CycleReport};
use ctmirror::auth::Keypair;
use ctmirror::config::{ConfigFile, SourceKind};
use ctmirror::ids::{AppId, TenantId};
use std::path::PathBuf;
use std::process::ExitCode;

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
            println!("private key: {private}\npublic key:  {public}\n{}", key.public_base64());
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
                println!("{}", serde_json::to_string_pretty(&report_json(&report)).expect("json"));
            } else {
                print_report(&report);
            }
            Ok(if report.succeeded() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Verify { pair, mirror_url } => verify(pair, mirror_url).await,
    }
}

async fn verify(PairArgs { config, tenant, app }: PairArgs, mirror_url: String) -> Result<ExitCode, String> {
    use ctmirror::config::resolve_secret;
    let file = ConfigFile::load(&config).map_err(|e| e.to_string())?;
    let cfg = file.agent(&config.display().to_string()).map_err(|e| e.to_string())?;
    let t = cfg.tenant(&tenant).ok_or(format!("tenant {tenant} is not configured"))?;
    let a = cfg.application(&app).ok_or(format!("application {app} is not configured"))?;
    let map = ctmirror::schema_map::SchemaMap::load(&a.schema_map).map_err(|e| e.to_string())?;
    let source_url = resolve_secret(&t.url).map_err(|e| e.to_string())?;
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
    println!("{:<24} {:>12} {:>12}  {:<32} equal", "table", "source rows", "mirror rows", "checksum");
    for t in &tables {
        println!(
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
        println!("tenant {} / {}: receiver asked not to replicate ({reason})", r.tenant, r.application);
        return;
    }
    println!(
        "tenant {} / {}: {} tables, {} rows sent in {:.2}s",
        r.tenant,
        r.application,
        r.tables.len(),
        r.rows_sent(),
        r.duration.as_secs_f64()
    );
    println!(
        "{:<24} {:<12} {:>10} {:>10} {:>10} {:>10}  {:<24} result",
        "table", "mode", "rows sent", "inserted", "updated", "deleted", "cursor"
    );
    for t in &r.tables {
        let result = match &t.error {
            None => "ok".to_string(),
            Some(e) => format!("FAILED ({:?}): {}", e.kind, e.message),
        };
        println!(
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
        println!("{d:<24} dropped by the receiver (no longer mapped)");
    }
    if let Some(e) = &r.completion_error {
        println!("ReplicationCompleted failed: {e}");
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

//! The `ctmirror` binary: keygen, a full sync through a receiver process, and
//! garbage on the command line and in config files.

mod harness;

use harness::support::{free_port, Child, TestDb};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctmirror"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("ctmirror runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn scratch(label: &str) -> PathBuf {
    harness::support::scratch(&format!("cli-{label}"))
}

#[test]
fn keygen_writes_a_private_and_a_public_key_and_refuses_to_overwrite() {
    let dir = scratch("keygen");
    let stem = dir.join("keys/agent");
    let o = run(&["keygen", "--out", stem.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let private = std::fs::read_to_string(dir.join("keys/agent.key")).unwrap();
    assert!(!text(&o).contains(private.trim()), "keygen must not print the private key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("keys/agent.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = run(&["keygen", "--out", stem.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(text(&again).contains("cannot write key file"), "{}", text(&again));
}

#[test]
fn garbage_flags_are_refused_with_usage_errors() {
    for args in [
        vec!["sync"],
        vec!["sync", "--config", "x.toml", "--tenant", "Not Valid", "--app", "crm"],
        vec!["sync", "--config", "x.toml", "--tenant", "acme", "--app", "a;b"],
        vec!["frobnicate"],
        vec!["keygen"],
        vec!["receiver", "--config"],
        vec!["agent"],
        vec!["agent", "--config", "x.toml", "--once=yes"],
        vec!["status", "--config", "x.toml", "--tenant", "Bad Tenant"],
        vec!["resync", "--config", "x.toml"],
        vec!["resync", "--config", "x.toml", "--tenant", "acme", "--app", "../etc"],
        vec!["maintenance", "--config", "x.toml", "--tenant", "acme"],
        vec!["maintenance", "--config", "x.toml", "--tenant", "acme", "maybe"],
        vec!["tls-selfsigned"],
        vec!["tls-selfsigned", "--dir"],
        vec!["tls-selfsigned", "--dir", "x", "--host"],
        vec!["untrack", "--config", "x.toml", "--tenant", "acme"],
        vec!["untrack", "--config", "x.toml", "--tenant", "Bad Tenant", "--table", "t"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
    let o = run(&["sync", "--config", "x.toml", "--tenant", "Not Valid", "--app", "crm"]);
    assert!(text(&o).contains("invalid tenant id"), "{}", text(&o));
}

#[test]
fn bad_config_files_fail_clearly() {
    let dir = scratch("badcfg");
    let missing = dir.join("nope.toml");
    let o = run(&["sync", "--config", missing.to_str().unwrap(), "--tenant", "acme", "--app", "crm"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cannot read config"), "{}", text(&o));

    let garbage = dir.join("garbage.toml");
    std::fs::write(&garbage, "[agent\nthis is not toml").unwrap();
    let o = run(&["sync", "--config", garbage.to_str().unwrap(), "--tenant", "acme", "--app", "crm"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("is invalid"), "{}", text(&o));

    let receiver_only = dir.join("receiver.toml");
    std::fs::write(&receiver_only, "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"x\"\napplication=\"a\"\nprivate_key=\"k\"\nagent_public_key=\"p\"\nplain_http=true\n").unwrap();
    let o = run(&["sync", "--config", receiver_only.to_str().unwrap(), "--tenant", "acme", "--app", "crm"]);
    assert!(text(&o).contains("no [agent] section"), "{}", text(&o));

    let bad_key = dir.join("badkey.toml");
    std::fs::write(dir.join("agent.key"), "definitely not a key").unwrap();
    std::fs::write(&bad_key, "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"postgres://127.0.0.1:1/x\"\napplication=\"a\"\nprivate_key=\"agent.key\"\nagent_public_key=\"agent.key\"\nplain_http=true\n").unwrap();
    let o = run(&["receiver", "--config", bad_key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not valid"), "{}", text(&o));
    assert!(!text(&o).contains("definitely not a key"), "key file content leaked: {}", text(&o));
}


fn write_config(dir: &Path, port: u16, source_url: &str, mirror_url: &str) -> PathBuf {
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema-maps/crm_insights.toml");
    let cfg = format!(
        r#"
[receiver]
listen = "127.0.0.1:{port}"
database_url = "env:CTM_CLI_MIRROR_URL"
application = "crm_insights"
private_key = "keys/partner.key"
agent_public_key = "keys/agent.pub"
# Loopback only; HTTPS through the binary: tests/tls.rs.
plain_http = true

[agent]
private_key = "keys/agent.key"
batch_rows = 700

[[agent.tenant]]
id = "acme"
source = "postgres"
url = "{source_url}"

[[agent.application]]
id = "crm_insights"
receiver_url = "http://127.0.0.1:{port}"
allow_plain_http = true
partner_public_key = "keys/partner.pub"
schema_map = "{}"
tenants = ["acme"]
"#,
        map.display()
    );
    let _ = mirror_url;
    let path = dir.join("ctmirror.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}


#[tokio::test]
async fn sync_through_a_receiver_process_mirrors_the_tenant_and_exits_zero() {
    let source = TestDb::create("cli_src").await;
    let mirror = TestDb::create("cli_dst").await;
    source.client().await.batch_execute(&harness::sample_crm_sql(0.02)).await.unwrap();
    let dir = scratch("sync");
    for who in ["agent", "partner"] {
        assert!(run(&["keygen", "--out", dir.join("keys").join(who).to_str().unwrap()]).status.success());
    }
    let port = free_port();
    let cfg = write_config(&dir, port, &source.url, &mirror.url);
    let cfg_s = cfg.to_str().unwrap();
    let _receiver = Child(
        bin()
            .args(["receiver", "--config", cfg_s])
            .env("CTM_CLI_MIRROR_URL", &mirror.url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = run(&["sync", "--config", cfg_s, "--tenant", "acme", "--app", "crm_insights"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("contact"), "{}", text(&o));

    let o = run(&["sync", "--config", cfg_s, "--tenant", "acme", "--app", "crm_insights", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(report["succeeded"], true);
    assert!(report["tables"].as_array().unwrap().iter().all(|t| t["mode"] == "idle"), "{report}");

    let o = run(&["verify", "--config", cfg_s, "--tenant", "acme", "--app", "crm_insights", "--mirror-url", &mirror.url]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches(" yes").count(), 6, "{}", text(&o));

    // A table the agent cannot read makes the exit code non-zero.
    source.client().await.batch_execute("ALTER TABLE sale DROP COLUMN heading").await.unwrap();
    let o = run(&["sync", "--config", cfg_s, "--tenant", "acme", "--app", "crm_insights"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("heading"), "{}", text(&o));

    // Unknown tenant: a clear error, exit 1.
    let o = run(&["sync", "--config", cfg_s, "--tenant", "ghost", "--app", "crm_insights"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("tenant ghost is not configured"), "{}", text(&o));
}

#[tokio::test]
async fn sync_against_a_dead_receiver_fails_with_a_transient_error() {
    let source = TestDb::create("cli_dead").await;
    source.client().await.batch_execute(&harness::sample_crm_sql(0.01)).await.unwrap();
    let dir = scratch("dead");
    for who in ["agent", "partner"] {
        assert!(run(&["keygen", "--out", dir.join("keys").join(who).to_str().unwrap()]).status.success());
    }
    let cfg = write_config(&dir, free_port(), &source.url, "unused");
    let o = run(&["sync", "--config", cfg.to_str().unwrap(), "--tenant", "acme", "--app", "crm_insights"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("POST http://127.0.0.1"), "{}", text(&o));
}

#[test]
fn sql_server_tenants_with_bad_connection_strings_fail_clearly_without_the_password() {
    let dir = scratch("mssqlcfg");
    for who in ["agent", "partner"] {
        let o = run(&["keygen", "--out", dir.join(format!("keys/{who}")).to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let port = free_port();
    let unreachable = format!("server=tcp:127.0.0.1,{port};database=acme;user id=sa;password=Hunter2Secret;TrustServerCertificate=true");
    for (url, expected) in [
        ("server=tcp:db,notaport;password=Hunter2Secret", "connection string cannot be parsed"),
        (unreachable.as_str(), "cannot reach SQL Server"),
    ] {
        let path = write_config(&dir, free_port(), "unused", "unused");
        let cfg = std::fs::read_to_string(&path)
            .unwrap()
            .replace("source = \"postgres\"", "source = \"sqlserver\"")
            .replace("url = \"unused\"", &format!("url = \"{url}\""));
        std::fs::write(&path, cfg).unwrap();
        let o = run(&["sync", "--config", path.to_str().unwrap(), "--tenant", "acme", "--app", "crm_insights"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(expected), "{}", text(&o));
        assert!(!text(&o).contains("Hunter2Secret"), "password leaked: {}", text(&o));
    }
}

#[test]
fn a_reader_that_stops_early_does_not_make_it_panic() {
    // `ctmirror keygen | head -c0`: the reader is gone before the key
    // paths are printed.
    let dir = std::env::temp_dir().join(format!("ctmirror-pipe-{}", std::process::id()));
    let mut child = bin()
        .args(["keygen", "--out"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
    let _ = std::fs::remove_file(dir.with_extension("key"));
    let _ = std::fs::remove_file(dir.with_extension("pub"));
}

#[test]
fn bench_flags_are_checked_before_anything_starts() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench");
    for (args, expected) in [
        (vec!["--rows", "0"], "positive whole number"),
        (vec!["--repeat", "x"], "positive whole number"),
        (vec!["--only", "full,nonsense"], "unknown section nonsense"),
        (vec!["--only", "full,,idle"], "a list such as"),
        (vec!["--frob"], "unknown option --frob"),
    ] {
        let out = Command::new("bash").arg(script).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected) && out.stdout.is_empty(), "{args:?}: {stderr}");
    }
}

/// Keys given through the environment and database passwords in URLs must
/// not reach the output, whatever fails and however verbose the logging.
#[test]
fn secrets_never_appear_in_output_or_logs() {
    let dir = scratch("secrets");
    let stem = dir.join("agent");
    assert!(run(&["keygen", "--out", stem.to_str().unwrap()]).status.success());
    assert!(run(&["keygen", "--out", dir.join("partner").to_str().unwrap()]).status.success());
    let agent_key = std::fs::read_to_string(dir.join("agent.key")).unwrap().trim().to_owned();
    let partner_key = std::fs::read_to_string(dir.join("partner.key")).unwrap().trim().to_owned();
    let password = "pw-s3cr3t-4711";
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema-maps/crm_insights.toml");
    let cfg = dir.join("ctmirror.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[receiver]
listen = "127.0.0.1:{port}"
database_url = "postgres://postgres:{password}@127.0.0.1:1/mirror"
application = "crm_insights"
private_key = "env:CTM_TEST_PARTNER_KEY"
agent_public_key = "agent.pub"
plain_http = true

[agent]
private_key = "env:CTM_TEST_AGENT_KEY"

[[agent.tenant]]
id = "acme"
source = "postgres"
url = "postgres://postgres:{password}@127.0.0.1:1/tenant"

[[agent.application]]
id = "crm_insights"
receiver_url = "https://127.0.0.1:1"
partner_public_key = "partner.pub"
schema_map = "{}"
tenants = ["acme"]
"#,
            map.display(),
            port = free_port()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    for args in [
        vec!["sync", "--config", cfg, "--tenant", "acme", "--app", "crm_insights"],
        vec!["receiver", "--config", cfg],
    ] {
        let o = bin()
            .args(&args)
            .env("RUST_LOG", "trace")
            .env("CTM_TEST_AGENT_KEY", &agent_key)
            .env("CTM_TEST_PARTNER_KEY", &partner_key)
            .output()
            .unwrap();
        let out = text(&o);
        assert!(!o.status.success(), "{args:?} should fail: {out}");
        assert!(out.contains("error connecting to server"), "{args:?} should get as far as the database: {out}");
        assert!(!out.contains(password), "{args:?} printed a database password: {out}");
        assert!(!out.contains(&agent_key) && !out.contains(&partner_key), "{args:?} printed a private key: {out}");
    }
}

#[tokio::test]
async fn untrack_removes_a_tables_capture_on_request() {
    use ctmirror::source::{Source, SourceTable};
    let source = TestDb::create("cli_untrack").await;
    let client = source.client().await;
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE kept (id int PRIMARY KEY)").await.unwrap();
    let mut pg = ctmirror::source::postgres::PostgresSource::connect(&source.url, std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    for name in ["t", "kept"] {
        pg.ensure_tracking(&SourceTable { schema: None, name: name.into() }).await.unwrap();
    }
    let dir = scratch("untrack");
    for who in ["agent", "partner"] {
        assert!(run(&["keygen", "--out", dir.join("keys").join(who).to_str().unwrap()]).status.success());
    }
    let cfg = write_config(&dir, free_port(), &source.url, "unused");
    let cfg = cfg.to_str().unwrap();
    let o = run(&["untrack", "--config", cfg, "--tenant", "acme", "--schema", "public", "--table", "t"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("untracked public.t of tenant acme"), "{}", text(&o));
    let triggers = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'ctmirror%'", &[&table])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(triggers("t").await, 0);
    assert!(triggers("kept").await > 0, "only the table asked for");
    let o = run(&["untrack", "--config", cfg, "--tenant", "acme", "--table", "t"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("was not tracked"), "{}", text(&o));
    let o = run(&["untrack", "--config", cfg, "--tenant", "acme", "--table", "no_such_table"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("table public.no_such_table not found"), "{}", text(&o));
    let o = run(&["untrack", "--config", cfg, "--tenant", "other", "--table", "t"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("tenant other is not configured"), "{}", text(&o));
}

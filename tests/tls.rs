//! TLS on both sides, over real HTTPS on 127.0.0.1: the receiver started
//! the way `ctmirror receiver` starts it (`receiver::bind` + `serve`, which is
//! all `receiver::serve` does), certificates issued here with rcgen, and the
//! agent's `PartnerClient` trusting a configured CA, another CA or the
//! system roots. Every test that touches PostgreSQL has its own database.

mod harness;

use ctmirror::agent::{AgentErrorKind, PartnerClient, TlsTrust};
use ctmirror::auth::{Keypair, RequestSigner};
use ctmirror::config::{ConfigFile, ReceiverConfig};
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::{ColumnSchema, ColumnType, TableSchema, TableSchemaRequest};
use ctmirror::receiver::ReceiverError;
use harness::support::{free_port, Child, TestDb};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const APP: &str = "crm";
const TENANT: &str = "acme";

fn scratch(label: &str) -> PathBuf {
    harness::support::scratch(&format!("tls-{label}"))
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

/// A certificate authority of the test's own, as a partner with a private
/// CA would have.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, issuer: rcgen::Issuer::new(params, key) }
    }

    /// A server certificate for `hosts` and its key, both PEM.
    fn issue(&self, hosts: &[&str]) -> (String, String) {
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Both parties' keys and the partner CA's files in one scratch directory.
struct Parties {
    dir: PathBuf,
    agent: Keypair,
    partner: Keypair,
    ca: Ca,
    ca_file: PathBuf,
}

impl Parties {
    fn new(label: &str) -> Parties {
        let dir = scratch(label);
        let agent = Keypair::generate();
        let partner = Keypair::generate();
        agent.write_files(&dir.join("agent")).unwrap();
        partner.write_files(&dir.join("partner")).unwrap();
        let ca = Ca::new("partner test CA");
        let ca_file = write(&dir.join("ca.pem"), &ca.pem);
        Parties { dir, agent, partner, ca, ca_file }
    }

    /// A server certificate from the partner CA for 127.0.0.1 and
    /// localhost: (tls_cert, tls_key).
    fn server_files(&self) -> (PathBuf, PathBuf) {
        self.server_files_for(&["127.0.0.1", "localhost"])
    }

    fn server_files_for(&self, hosts: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.ca.issue(hosts);
        let stem = hosts[0].replace(['.', ':'], "_");
        let cert = write(&self.dir.join(format!("{stem}.cert.pem")), &cert);
        (cert, write(&self.dir.join(format!("{stem}.key.pem")), &key))
    }

    fn receiver_config(&self, database_url: &str, cert: &Path, key: &Path) -> ReceiverConfig {
        ReceiverConfig {
            tls_cert: Some(cert.to_owned()),
            tls_key: Some(key.to_owned()),
            ..ReceiverConfig::new(
                "127.0.0.1:0",
                database_url,
                AppId::new(APP).unwrap(),
                self.dir.join("partner.key").display().to_string(),
                self.dir.join("agent.pub").display().to_string(),
            )
        }
    }

    fn signer(&self) -> RequestSigner {
        RequestSigner { key: self.agent.clone(), tenant: TenantId::new(TENANT).unwrap(), app: AppId::new(APP).unwrap() }
    }

    fn client(&self, url: &str, trust: &TlsTrust) -> Result<PartnerClient, ctmirror::agent::AgentError> {
        PartnerClient::new(url, self.signer(), self.partner.public(), Duration::from_secs(5), trust)
    }
}

/// A receiver serving on its own port until dropped or stopped.
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ReceiverError>>,
}

impl Running {
    async fn start(cfg: ReceiverConfig) -> Running {
        let bound = ctmirror::receiver::bind(cfg).await.expect("receiver starts");
        assert_eq!(bound.scheme(), "https");
        let addr = bound.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(async move {
            stopped.await.ok();
        }));
        Running { addr, stop: Some(stop), task }
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    /// Sends the shutdown signal and waits for `serve` to return.
    async fn stop(mut self) -> Result<(), ReceiverError> {
        self.stop.take().unwrap().send(()).ok();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("serve returns after the shutdown signal")
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn items_schema() -> TableSchemaRequest {
    let col = |name: &str, data_type, nullable| ColumnSchema { name: name.into(), data_type, nullable };
    TableSchemaRequest {
        source_identity: "src-1".into(),
        tables: vec![TableSchema {
            name: "items".into(),
            columns: vec![
                col("id", ColumnType::Int64, false),
                col("name", ColumnType::Text { max_length: None }, true),
            ],
            primary_key: vec!["id".into()],
        }],
        skipped: vec![],
        table_identities: Default::default(),
    }
}

async fn mirror_schemas(db: &TestDb) -> i64 {
    let c = db.client().await;
    c.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'mirror_acme'", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn an_agent_trusting_the_partner_ca_authenticates_over_https_and_shutdown_ends_serve() {
    let parties = Parties::new("trusted");
    let db = TestDb::create("tls_trusted").await;
    let (cert, key) = parties.server_files();
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;
    let trust = TlsTrust::ca_file(&parties.ca_file);
    // Both the IP address and the DNS name of the certificate verify.
    for host in ["127.0.0.1", "localhost"] {
        let client = parties.client(&receiver.url(host), &trust).unwrap();
        let answer = client.authenticate().await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(answer.replicate);
    }
    let client = parties.client(&receiver.url("127.0.0.1"), &trust).unwrap();
    client.send_schema(&items_schema()).await.expect("schema call over https");
    assert_eq!(mirror_schemas(&db).await, 1);

    let addr = receiver.addr;
    receiver.stop().await.expect("serve returns Ok after a graceful shutdown");
    assert!(std::net::TcpStream::connect(addr).is_err(), "nothing listens after shutdown");
}

#[tokio::test]
async fn a_receiver_certificate_from_another_ca_is_refused_naming_the_certificate() {
    let parties = Parties::new("untrusted");
    let db = TestDb::create("tls_untrusted").await;
    let (cert, key) = parties.server_files();
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;
    let other_ca = write(&parties.dir.join("other-ca.pem"), &Ca::new("someone else's CA").pem);
    let client = parties.client(&receiver.url("127.0.0.1"), &TlsTrust::ca_file(other_ca)).unwrap();
    let err = client.authenticate().await.unwrap_err();
    assert!(err.message.contains("certificate is not trusted"), "{err}");
    assert!(err.message.to_lowercase().contains("unknownissuer"), "{err}");
    assert_eq!(err.kind, AgentErrorKind::Auth, "an untrusted certificate needs an operator, not a quick retry");
}

#[tokio::test]
async fn the_system_roots_do_not_trust_a_private_ca() {
    let parties = Parties::new("system");
    let db = TestDb::create("tls_system").await;
    let (cert, key) = parties.server_files();
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;
    let client = parties.client(&receiver.url("localhost"), &TlsTrust::system_roots()).unwrap();
    let err = client.authenticate().await.unwrap_err();
    assert!(err.message.contains("certificate"), "{err}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let parties = Parties::new("wronghost");
    let db = TestDb::create("tls_wronghost").await;
    let (cert, key) = parties.server_files_for(&["partner.example"]);
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;
    let client = parties.client(&receiver.url("127.0.0.1"), &TlsTrust::ca_file(&parties.ca_file)).unwrap();
    let err = client.authenticate().await.unwrap_err();
    assert!(err.message.contains("certificate not valid for name"), "{err}");
    assert_eq!(err.kind, AgentErrorKind::Auth);
}

#[test]
fn a_plain_http_receiver_url_needs_allow_plain_http() {
    let parties = Parties::new("plainurl");
    for trust in [TlsTrust::system_roots(), TlsTrust::ca_file(&parties.ca_file)] {
        let err = parties.client("http://127.0.0.1:9", &trust).err().expect("refused");
        assert_eq!(err.kind, AgentErrorKind::Config);
        assert!(err.message.contains("plain HTTP") && err.message.contains("allow_plain_http = true"), "{err}");
    }
    parties.client("http://127.0.0.1:9", &TlsTrust::allowing_plain_http()).expect("allowed when asked for");

    let app = |extra: &str| {
        format!(
            "[agent]\nprivate_key = \"k\"\n[[agent.application]]\nid = \"crm\"\nreceiver_url = \"http://127.0.0.1:9\"\n\
             partner_public_key = \"p\"\nschema_map = \"m\"\ntenants = []\n{extra}"
        )
    };
    let err = ConfigFile::parse(&app(""), "agent.toml").unwrap_err().to_string();
    assert!(err.contains("receiver_url http://127.0.0.1:9 is plain HTTP") && err.contains("allow_plain_http"), "{err}");
    ConfigFile::parse(&app("allow_plain_http = true\n"), "agent.toml").expect("allowed when asked for");
}

#[tokio::test]
async fn a_receiver_with_neither_tls_nor_plain_http_refuses_to_start() {
    let parties = Parties::new("notransport");
    // No database is needed: the transport is decided before anything else.
    let cfg = ReceiverConfig::new(
        "127.0.0.1:0",
        "postgres://nobody@127.0.0.1:1/none",
        AppId::new(APP).unwrap(),
        parties.dir.join("partner.key").display().to_string(),
        parties.dir.join("agent.pub").display().to_string(),
    );
    let err = ctmirror::receiver::serve(cfg.clone(), async {}).await.unwrap_err();
    assert!(err.message.contains("neither TLS nor plain HTTP is configured"), "{err}");
    assert!(err.message.contains("tls_cert and tls_key") && err.message.contains("plain_http = true"), "{err}");

    let (cert, _) = parties.server_files();
    let half = ReceiverConfig { tls_cert: Some(cert), ..cfg };
    let err = ctmirror::receiver::serve(half, async {}).await.unwrap_err();
    assert!(err.message.contains("tls_cert is set but tls_key is not"), "{err}");
}

#[tokio::test]
async fn unusable_pem_files_fail_at_start_naming_the_file_and_never_its_contents() {
    let parties = Parties::new("garbage");
    let dir = &parties.dir;
    let (cert, key) = parties.server_files();
    let (other_cert, _) = parties.server_files_for(&["other.example"]);
    let secret = "-----BEGIN PRIVATE KEY-----\n\
                  TUlJRXZnSUJBREFOQmdrcWhraUc5dzBCQVFFRkFBU0NCS2d3Z2dTa0FnRUFBb0lCQVFD!!\n\
                  -----END PRIVATE KEY-----\n";
    let garbage = write(&dir.join("garbage.pem"), "these are not the bytes you are looking for\n");
    let broken_key = write(&dir.join("broken.key.pem"), secret);
    let not_der = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    let not_der = write(&dir.join("notder.pem"), not_der);
    let missing = dir.join("missing.pem");
    let cases: [(&Path, &Path, &Path, &str); 6] = [
        (&garbage, &key, &garbage, "holds no certificate"),
        (&cert, &garbage, &garbage, "holds no private key"),
        (&cert, &broken_key, &broken_key, "not a valid PEM file"),
        (&not_der, &key, &not_der, "cannot be parsed"),
        (&other_cert, &key, &key, "is not the private key of the certificate"),
        (&missing, &key, &missing, "cannot read tls_cert"),
    ];
    for (cert, key, named, expected) in cases {
        // The database URL leads nowhere: the files are checked first.
        let cfg = parties.receiver_config("postgres://nobody@127.0.0.1:1/none", cert, key);
        let err = ctmirror::receiver::bind(cfg).await.err().expect("refused").message;
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(err.contains(&named.display().to_string()), "the file is named: {err}");
        assert!(!err.contains("TUlJRXZnSUJBREFO"), "key material leaked: {err}");
    }

    // The agent's CA file: garbage, empty, and a block that is no certificate.
    let empty = write(&dir.join("empty.pem"), "");
    let ca_cases =
        [(&garbage, "holds no certificate"), (&empty, "holds no certificate"), (&not_der, "not a usable CA certificate")];
    for (ca_file, expected) in ca_cases {
        let trust = TlsTrust::ca_file(ca_file);
        let err = parties.client("https://127.0.0.1:9", &trust).err().expect("refused");
        assert_eq!(err.kind, AgentErrorKind::Config);
        assert!(err.message.contains("ca_file") && err.message.contains(&ca_file.display().to_string()), "{err}");
        assert!(err.message.contains(expected), "{expected}: {err}");
        assert!(trust.check().unwrap_err().to_string().contains(expected));
    }
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_answer_and_writes_nothing() {
    let parties = Parties::new("plainprobe");
    let db = TestDb::create("tls_plain_probe").await;
    let (cert, key) = parties.server_files();
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;

    // A correctly signed schema call, sent in clear text.
    let path = format!("/v1/tenants/{TENANT}/schema");
    let body = serde_json::to_vec(&items_schema()).unwrap();
    let (_, auth) = parties.signer().authorize("POST", &path, &body);
    let addr = receiver.addr;
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        reply
    })
    .await
    .unwrap();
    assert!(!reply.starts_with(b"HTTP/"), "an HTTP answer came back: {:?}", String::from_utf8_lossy(&reply));
    assert_eq!(mirror_schemas(&db).await, 0, "the plain request wrote nothing");

    // The same call over https does write: the probe was not refused for
    // anything but its lack of TLS.
    let client = parties.client(&receiver.url("127.0.0.1"), &TlsTrust::ca_file(&parties.ca_file)).unwrap();
    client.send_schema(&items_schema()).await.unwrap();
    assert_eq!(mirror_schemas(&db).await, 1);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_does_not_hold_up_others() {
    let parties = Parties::new("stall");
    let db = TestDb::create("tls_stall").await;
    let (cert, key) = parties.server_files();
    let receiver = Running::start(parties.receiver_config(&db.url, &cert, &key)).await;
    // Connected, and then silent: the server waits for a ClientHello.
    let silent: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(receiver.addr).unwrap()).collect();
    let client = parties.client(&receiver.url("127.0.0.1"), &TlsTrust::ca_file(&parties.ca_file)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.authenticate())
        .await
        .expect("answered while other handshakes are pending")
        .unwrap();
    drop(silent);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctmirror"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}



#[tokio::test]
async fn tls_selfsigned_files_serve_a_receiver_process_that_the_agent_verifies_end_to_end() {
    let dir = scratch("selfsigned");
    let tls_dir = dir.join("tls");
    let o = bin().args(["tls-selfsigned", "--dir"]).arg(&tls_dir).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("tests and demos only"), "{}", text(&o));
    let key_text = std::fs::read_to_string(tls_dir.join("key.pem")).unwrap();
    assert!(!text(&o).contains(key_text.lines().nth(1).unwrap()), "the key is never printed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(tls_dir.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = bin().args(["tls-selfsigned", "--dir"]).arg(&tls_dir).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("never overwrites"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(tls_dir.join("key.pem")).unwrap(), key_text);
    let bad_host = ["--host", "no such host"];
    let bad = bin().args(["tls-selfsigned", "--dir"]).arg(dir.join("bad")).args(bad_host).output().unwrap();
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));

    for who in ["agent", "partner"] {
        let o = bin().args(["keygen", "--out"]).arg(dir.join("keys").join(who)).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let source = TestDb::create("tls_cli_src").await;
    let mirror = TestDb::create("tls_cli_dst").await;
    source.client().await.batch_execute(&harness::sample_crm_sql(0.01)).await.unwrap();
    let port = free_port();
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema-maps/crm_insights.toml");
    // Relative TLS paths, resolved against the config file's folder.
    let cfg = write(
        &dir.join("ctmirror.toml"),
        &format!(
            r#"
[receiver]
listen = "127.0.0.1:{port}"
database_url = "env:CTM_TLS_MIRROR_URL"
application = "crm_insights"
private_key = "keys/partner.key"
agent_public_key = "keys/agent.pub"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"

[agent]
private_key = "keys/agent.key"

[[agent.tenant]]
id = "acme"
source = "postgres"
url = "{}"

[[agent.application]]
id = "crm_insights"
receiver_url = "https://localhost:{port}"
ca_file = "tls/ca.pem"
partner_public_key = "keys/partner.pub"
schema_map = "{}"
tenants = ["acme"]
"#,
            source.url,
            map.display()
        ),
    );
    let log = std::fs::File::create(dir.join("receiver.log")).unwrap();
    let mut receiver = Child(
        bin()
            .arg("receiver")
            .arg("--config")
            .arg(&cfg)
            .env("CTM_TLS_MIRROR_URL", &mirror.url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = bin().args(["sync", "--tenant", "acme", "--app", "crm_insights", "--config"]).arg(&cfg).output().unwrap();
    let log = || std::fs::read_to_string(dir.join("receiver.log")).unwrap_or_default();
    assert!(o.status.success(), "{}\nreceiver log:\n{}", text(&o), log());
    assert!(log().contains("receiver listening") && log().contains("https"), "{}", log());
    let o = bin()
        .args(["verify", "--tenant", "acme", "--app", "crm_insights", "--mirror-url", &mirror.url, "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The same files with the CA left out: the agent refuses the receiver.
    let without_ca = std::fs::read_to_string(&cfg).unwrap().replace("ca_file = \"tls/ca.pem\"\n", "");
    let untrusting = write(&dir.join("untrusting.toml"), &without_ca);
    let o = bin().args(["sync", "--tenant", "acme", "--app", "crm_insights", "--config"]).arg(&untrusting).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("certificate"), "{}", text(&o));

    // SIGTERM: the HTTPS receiver stops and exits 0.
    let pid = receiver.0.id();
    assert!(Command::new("sh").args(["-c", &format!("kill -TERM {pid}")]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = receiver.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the receiver is still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}\n{}", log());
}

//! Tenant isolation by database roles (`[receiver.tenant_roles]`): the
//! receiver works as before when every tenant's writes run as its own role,
//! and that role cannot reach another tenant's tables, shadows or cursors.
//!
//! Roles are cluster-wide while each test has its own databases, so tests
//! that need a role nobody made yet use a tenant id of their own.

mod harness;

use ctmirror::agent::{run_cycle, CycleReport, CycleSettings, PartnerClient};
use ctmirror::auth::{Keypair, RequestSigner};
use ctmirror::config::{ConfigFile, ReceiverConfig, TenantRolesConfig};
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::{ChangeCounts, CompletedRequest, SyncMode, TableReport, TableSchemaRequest};
use ctmirror::receiver::{tenant_role_name, tenant_role_password, ReceiverService};
use ctmirror::schema_map::SchemaMap;
use harness::support::{self, TestDb};
use harness::{sample_crm_map, sample_crm_sql, Options, PgDriver, Pipeline, SourceDriver, APP, TENANT};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio_postgres::Client;

const ITEM_SQL: &str = "
CREATE TABLE item (id bigint PRIMARY KEY, name text, qty integer);
INSERT INTO item SELECT i, 'item ' || i, i % 7 FROM generate_series(1, 300) i;
";
const ITEM_MAP: &str = r#"
application = "crm_insights"
[[table]]
table = "item"
columns = ["id", "name", "qty"]
"#;

fn roles_on() -> TenantRolesConfig {
    TenantRolesConfig { enabled: true, ..TenantRolesConfig::default() }
}

fn with_roles(roles: TenantRolesConfig) -> Options {
    Options {
        configure: Some(Box::new(move |cfg: &mut ReceiverConfig| cfg.tenant_roles = roles)),
        ..Options::default()
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name no earlier run on this cluster used (roles outlive test databases).
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{nanos:x}", std::process::id(), UNIQUE.fetch_add(1, Ordering::Relaxed))
}

/// The test database URL with another login (the test cluster trusts every
/// local login, so no password is needed).
fn url_as(url: &str, user: &str) -> String {
    let rest = url.strip_prefix("postgres://postgres@").expect("test URLs log in as postgres");
    format!("postgres://{user}@{rest}")
}

async fn connect_as(url: &str, user: &str) -> Client {
    support::connect(&url_as(url, user)).await
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", e.as_db_error().map_or(e.to_string(), |d| d.message().to_owned())))
        .get(0)
}

/// The SQLSTATE a statement fails with; panics if it succeeds.
async fn refused(c: &Client, sql: &str) -> String {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("the tenant role was allowed: {sql}"),
        Err(e) => e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| panic!("{sql}: {e}")),
    }
}

/// A receiver on `url` with `configure` applied, served on a free port, and
/// an agent-side client for `tenant`.
async fn serve(
    url: &str,
    agent: &Keypair,
    tenant: &str,
    configure: impl FnOnce(&mut ReceiverConfig),
) -> Result<PartnerClient, ctmirror::receiver::ReceiverError> {
    let mut cfg = harness::receiver_config(url);
    configure(&mut cfg);
    let partner = Keypair::generate();
    let partner_public = partner.public();
    let svc = ReceiverService::with_keys(cfg, partner, agent.public()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, svc.router()).into_future());
    Ok(client_for(&base, agent, tenant, partner_public))
}

fn client_for(base: &str, agent: &Keypair, tenant: &str, partner: ctmirror::auth::PublicKey) -> PartnerClient {
    let signer =
        RequestSigner { key: agent.clone(), tenant: TenantId::new(tenant).unwrap(), app: AppId::new(APP).unwrap() };
    PartnerClient::new(base, signer, partner, Duration::from_secs(60), &ctmirror::agent::TlsTrust::allowing_plain_http()).unwrap()
}

/// One agent cycle of `tenant` from `source` through `client`.
async fn cycle(source: &PgDriver, client: &PartnerClient, map: &SchemaMap, tenant: &str) -> CycleReport {
    source.wait_quiet().await;
    let mut src = source.connect(Duration::from_secs(3600)).await;
    let limits = ctmirror::source::ChunkLimits { max_rows: 1000, max_bytes: 1 << 20 };
    let report = run_cycle(&mut src, client, map, tenant, CycleSettings { limits }).await.expect("cycle runs");
    assert!(report.succeeded(), "{report:#?}");
    report
}

async fn assert_converged(source: &PgDriver, mirror_url: &str, tenant: &str, map: &SchemaMap) {
    let tenant = TenantId::new(tenant).unwrap();
    for t in ctmirror::verify::compare_postgres(&source.db.url, mirror_url, &tenant, map).await.unwrap() {
        assert!(t.equal(), "mirror of {} differs from the source: {t:?}", t.table);
    }
}

/// Relations in a tenant's schemas that the tenant role does not own.
async fn not_owned_by_tenant(c: &Client, tenant: &str) -> Vec<String> {
    c.query(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ($1, $2) AND c.relkind IN ('r', 'p', 'S', 'v')
            AND pg_get_userbyid(c.relowner) <> $3
         UNION ALL
         SELECT nspname FROM pg_namespace WHERE nspname IN ($1, $2) AND pg_get_userbyid(nspowner) <> $3",
        &[&format!("mirror_{tenant}"), &format!("ctmirror_load_{tenant}"), &format!("ctmirror_t_{tenant}")],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The crm_insights map with `contact.org_nr` left out.
fn crm_map_without_org_nr() -> SchemaMap {
    let text = sample_crm_map().replacen("\"org_nr\", ", "", 1);
    assert_ne!(text, sample_crm_map());
    SchemaMap::parse(&text, "test map").unwrap()
}

#[tokio::test]
async fn the_whole_flow_runs_as_the_tenant_role() {
    let reader = unique("reader");
    support::connect(&support::admin_url())
        .await
        .batch_execute(&format!("CREATE ROLE {reader} NOLOGIN"))
        .await
        .unwrap();
    let roles = TenantRolesConfig { grant_read_to: vec![reader.clone()], ..roles_on() };
    let opts = Options {
        configure: Some(Box::new(move |cfg: &mut ReceiverConfig| {
            cfg.tenant_roles = roles;
            cfg.hooks.sql = vec!["CREATE INDEX IF NOT EXISTS contact_name ON contact (name)".into()];
        })),
        ..Options::default()
    };
    let mut p = Pipeline::start_with("roles_flow", &sample_crm_sql(0.02), &sample_crm_map(), opts).await;

    // Full load (COPY batches straight into the tables), then changes
    // (COPY into temporary staging, DELETE/INSERT ... ON CONFLICT).
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert!(p.wire.lock().unwrap().iter().any(|b| !b.starts_with(b"{")), "the agent sent COPY batches");
    p.source()
        .await
        .batch_execute(
            "UPDATE contact SET name = name || ' (renamed)' WHERE contact_id <= 10;
             DELETE FROM sale WHERE sale_id <= 5;
             INSERT INTO project SELECT 100000 + i, 'New ' || i, NULL, 1, NULL, NULL, false, gen_random_uuid()
               FROM generate_series(1, 3) i;",
        )
        .await
        .unwrap();
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_eq!(r.rows_sent(), 18);
    p.assert_converged().await;

    // A column no longer mapped is dropped in place; mapped again, the
    // table reloads into a shadow in ctmirror_load_acme and is swapped in.
    p.map = crm_map_without_org_nr();
    assert!(p.cycle().await.succeeded());
    p.map = SchemaMap::parse(&sample_crm_map(), "test map").unwrap();
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert!(r.tables.iter().find(|t| t.table == "contact").unwrap().reloaded, "{r:#?}");
    p.assert_converged().await;

    // The completion hooks, called directly to read their answers.
    let report = CompletedRequest {
        tables: vec![TableReport {
            name: "contact".into(),
            mode: SyncMode::Full,
            counts: ChangeCounts { inserted: 1, updated: 0, deleted: 0 },
            error: None,
        }],
    };
    let hooks = p.client().completed(&report).await.unwrap().hooks;
    assert_eq!(hooks.len(), 3, "{hooks:?}");
    assert!(hooks.iter().all(|h| h.ends_with(": ok")), "{hooks:?}");

    let admin = p.mirror().await;
    assert_eq!(not_owned_by_tenant(&admin, TENANT).await, Vec::<String>::new());
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'mirror_acme' AND indexname = 'contact_name'"
        )
        .await,
        1
    );
    let analyzed =
        "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname = 'mirror_acme' AND last_analyze IS NOT NULL";
    assert_eq!(count(&admin, analyzed).await, 6);
    // The receiver's sessions for the tenant logged in as its role.
    let logins: Vec<String> = admin
        .query(
            "SELECT DISTINCT usename::text FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'ctmirror-receiver' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(logins.contains(&"ctmirror_t_acme".to_owned()), "{logins:?}");

    // grant_read_to reads every table, including the one rebuilt by the reload.
    admin.batch_execute(&format!("SET ROLE {reader}")).await.unwrap();
    assert_eq!(count(&admin, "SELECT count(*) FROM mirror_acme.contact").await, 400);
    assert_eq!(count(&admin, "SELECT count(*) FROM mirror_acme.project").await, 103);
}

#[tokio::test]
async fn a_tenant_role_cannot_reach_another_tenants_data() {
    let p = Pipeline::start_with("roles_fence", ITEM_SQL, ITEM_MAP, with_roles(roles_on())).await;
    assert!(p.cycle().await.succeeded());
    // Tenant b: same source, same receiver, its own role and schemas.
    let b = "fence_b";
    let client_b = client_for(&p.receiver_url, &p.agent_key, b, p.partner_public);
    cycle(&p.src, &client_b, &p.map, b).await;
    // A reload of b's table left unfinished: its shadow sits in ctmirror_load_b.
    client_b.reload("item", "test", "src").await.unwrap();

    let a = connect_as(&p.mirror_db.url, "ctmirror_t_acme").await;
    assert_eq!(count(&a, "SELECT count(*) FROM mirror_acme.item").await, 300);

    for sql in [
        "SELECT * FROM mirror_fence_b.item",
        "INSERT INTO mirror_fence_b.item VALUES (1000, 'x', 1)",
        "UPDATE mirror_fence_b.item SET qty = 0",
        "CREATE TABLE mirror_fence_b.planted (i int)",
        "SELECT * FROM ctmirror_load_fence_b.item",
        "CREATE TABLE ctmirror_load_fence_b.planted (i int)",
        "DROP TABLE mirror_fence_b.item",
        "DROP SCHEMA mirror_fence_b CASCADE",
        "DROP SCHEMA ctmirror_load_fence_b CASCADE",
        "ALTER TABLE ctmirror.tables DISABLE ROW LEVEL SECURITY",
        "DROP POLICY ctmirror_tenant_rows ON ctmirror.tables",
        "CREATE SCHEMA planted",
    ] {
        assert_eq!(refused(&a, sql).await, "42501", "{sql}");
    }

    // Bookkeeping: its own rows only; b's cursor cannot be moved, nor rows
    // written in b's name.
    let tenants = "SELECT count(*) FROM (SELECT tenant FROM ctmirror.tables UNION SELECT tenant FROM ctmirror.completions) t WHERE tenant <> 'acme'";
    assert_eq!(count(&a, tenants).await, 0);
    assert_eq!(count(&a, "SELECT count(*) FROM ctmirror.tables WHERE tenant = 'acme'").await, 1);
    assert_eq!(count(&a, "SELECT count(*) FROM ctmirror.completions WHERE tenant = 'acme'").await, 1);
    assert_eq!(a.execute("UPDATE ctmirror.tables SET cursor = NULL WHERE tenant = 'fence_b'", &[]).await.unwrap(), 0);
    assert_eq!(a.execute("DELETE FROM ctmirror.completions WHERE tenant = 'fence_b'", &[]).await.unwrap(), 0);
    let forged = [
        "INSERT INTO ctmirror.tables (tenant, table_name, schema, schema_hash, source_identity) VALUES ('fence_b', 'x', '{}', 'h', 's')",
        "INSERT INTO ctmirror.completions (tenant, report) VALUES ('fence_b', '{}')",
        "UPDATE ctmirror.tables SET tenant = 'fence_b' WHERE tenant = 'acme'",
    ];
    for sql in forged {
        assert_eq!(refused(&a, sql).await, "42501", "{sql}"); // new row violates row-level security policy
    }

    // No way out of the login: not to the receiver's role, not to b's.
    for sql in ["SET ROLE postgres", "SET ROLE ctmirror_t_fence_b", "SET SESSION AUTHORIZATION postgres"] {
        assert_eq!(refused(&a, sql).await, "42501", "{sql}");
    }
    a.batch_execute("RESET ROLE").await.unwrap();
    let who = a.query_one("SELECT current_user::text, session_user::text", &[]).await.unwrap();
    assert_eq!(
        (who.get::<_, String>(0), who.get::<_, String>(1)),
        ("ctmirror_t_acme".into(), "ctmirror_t_acme".into())
    );
    // The group is reachable, and sees nothing.
    a.batch_execute("SET ROLE ctmirror_tenants").await.unwrap();
    assert_eq!(count(&a, "SELECT count(*) FROM ctmirror.tables").await, 0);
    assert_eq!(refused(&a, "SELECT * FROM mirror_acme.item").await, "42501");

    // b is untouched, and still syncs.
    let admin = p.mirror().await;
    assert_eq!(count(&admin, "SELECT count(*) FROM mirror_fence_b.item").await, 300);
    assert_eq!(count(&admin, "SELECT count(*) FROM ctmirror.tables WHERE tenant = 'fence_b' AND reloading").await, 1);
    p.exec("UPDATE item SET qty = qty + 1 WHERE id <= 3").await;
    cycle(&p.src, &client_b, &p.map, b).await;
    assert_converged(&p.src, &p.mirror_db.url, b, &p.map).await;
}

#[tokio::test]
async fn turning_roles_on_hands_existing_mirror_data_over_and_keeps_working() {
    let p = Pipeline::start_with("roles_turn_on", ITEM_SQL, ITEM_MAP, Options::default()).await;
    let tenant = unique("on");
    let before = client_for(&p.receiver_url, &p.agent_key, &tenant, p.partner_public);
    cycle(&p.src, &before, &p.map, &tenant).await;
    before.reload("item", "leave a shadow behind", "src").await.unwrap();
    let admin = p.mirror().await;
    assert_eq!(not_owned_by_tenant(&admin, &tenant).await.len(), 4, "receiver-owned before");

    let reader = unique("reader");
    admin.batch_execute(&format!("CREATE ROLE {reader} NOLOGIN")).await.unwrap();
    let roles = TenantRolesConfig { grant_read_to: vec![reader.clone()], ..roles_on() };
    let after = serve(&p.mirror_db.url, &p.agent_key, &tenant, |cfg| cfg.tenant_roles = roles).await.unwrap();
    p.exec("UPDATE item SET name = 'changed' WHERE id <= 20; DELETE FROM item WHERE id > 290").await;
    let r = cycle(&p.src, &after, &p.map, &tenant).await;
    assert!(r.tables[0].reloaded, "the unfinished reload completes under the tenant role: {r:#?}");
    assert_converged(&p.src, &p.mirror_db.url, &tenant, &p.map).await;
    assert_eq!(not_owned_by_tenant(&admin, &tenant).await, Vec::<String>::new());
    let cursors = format!("SELECT count(*) FROM ctmirror.tables WHERE tenant = '{tenant}' AND cursor IS NOT NULL");
    assert_eq!(count(&admin, &cursors).await, 1);
    admin.batch_execute(&format!("SET ROLE {reader}")).await.unwrap();
    assert_eq!(count(&admin, &format!("SELECT count(*) FROM mirror_{tenant}.item")).await, 290);
}

#[tokio::test]
async fn receivers_provisioning_one_tenant_at_once_all_succeed() {
    let agent = Keypair::generate();
    let db1 = TestDb::create("roles_race_1").await;
    let db2 = TestDb::create("roles_race_2").await;
    let tenant = unique("race");
    // Two receivers on one database (they take turns under the advisory
    // lock) and one on another (role statements collide; it starts over).
    let mut clients = Vec::new();
    for url in [&db1.url, &db1.url, &db2.url] {
        clients.push(serve(url, &agent, &tenant, |cfg| cfg.tenant_roles = roles_on()).await.unwrap());
    }
    let request = TableSchemaRequest { source_identity: "src".into(), tables: vec![], skipped: vec![], table_identities: Default::default() };
    let answers = futures_util::future::join_all(clients.iter().map(|c| c.send_schema(&request))).await;
    for a in answers {
        a.expect("every receiver provisions the tenant");
    }
    for db in [&db1, &db2] {
        assert_eq!(not_owned_by_tenant(&db.client().await, &tenant).await, Vec::<String>::new());
        let schemas =
            format!("SELECT count(*) FROM pg_namespace WHERE nspname IN ('mirror_{tenant}', 'ctmirror_load_{tenant}')");
        assert_eq!(count(&db.client().await, &schemas).await, 2);
    }
}

/// Whether `password` matches PostgreSQL's stored SCRAM verifier.
fn scram_matches(stored: &str, password: &str) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let rest = stored.strip_prefix("SCRAM-SHA-256$").expect("a SCRAM verifier");
    let (params, keys) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let (stored_key, _) = keys.split_once(':').unwrap();
    let mut salted = [0u8; 32];
    let iterations = std::num::NonZeroU32::new(iterations.parse().unwrap()).unwrap();
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &b64.decode(salt).unwrap(),
        password.as_bytes(),
        &mut salted,
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salted);
    let client_key = ring::hmac::sign(&key, b"Client Key");
    let digest = ring::digest::digest(&ring::digest::SHA256, client_key.as_ref());
    b64.encode(digest.as_ref()) == stored_key
}

/// A role's password as PostgreSQL stores it (superusers only).
async fn stored_password(role: &str) -> String {
    let c = support::connect(&support::admin_url()).await;
    let row = c.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&role]).await.unwrap();
    row.get::<_, Option<String>>(0).expect("the role has a password")
}

#[tokio::test]
async fn a_password_secret_gives_the_role_the_derived_password_everywhere() {
    let agent = Keypair::generate();
    let db = TestDb::create("roles_password").await;
    let tenant = unique("pw");
    let id = TenantId::new(&tenant).unwrap();
    let request = TableSchemaRequest { source_identity: "src".into(), tables: vec![], skipped: vec![], table_identities: Default::default() };
    let role = tenant_role_name(&id);
    let with_secret = |secret: &'static str| {
        move |cfg: &mut ReceiverConfig| {
            cfg.tenant_roles = TenantRolesConfig { password_secret: Some(secret.into()), ..roles_on() }
        }
    };

    let first = serve(&db.url, &agent, &tenant, with_secret("first secret")).await.unwrap();
    first.send_schema(&request).await.unwrap();
    let password = tenant_role_password("first secret", &id);
    assert!(scram_matches(&stored_password(&role).await, &password));
    // The secret itself is not the password, and no other tenant's password fits.
    assert!(!scram_matches(&stored_password(&role).await, "first secret"));
    assert!(!scram_matches(
        &stored_password(&role).await,
        &tenant_role_password("first secret", &TenantId::new("other").unwrap())
    ));

    // Another instance with the same secret agrees on the password.
    let second = serve(&db.url, &agent, &tenant, with_secret("first secret")).await.unwrap();
    second.send_schema(&request).await.unwrap();
    assert!(scram_matches(&stored_password(&role).await, &password));

    // A new secret resets the password when a receiver provisions.
    let third = serve(&db.url, &agent, &tenant, with_secret("second secret")).await.unwrap();
    third.send_schema(&request).await.unwrap();
    assert!(scram_matches(&stored_password(&role).await, &tenant_role_password("second secret", &id)));
    assert!(!scram_matches(&stored_password(&role).await, &password));
}

#[tokio::test]
async fn a_login_with_createrole_and_create_on_the_database_is_enough() {
    let login = unique("recv");
    let mirror = TestDb::create("roles_minimal_dst").await;
    let admin = support::connect(&support::admin_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN CREATEROLE; GRANT CREATE ON DATABASE \"{}\" TO {login}",
            mirror.name
        ))
        .await
        .unwrap();
    let source = PgDriver::create("roles_minimal").await.unwrap();
    source.exec(ITEM_SQL).await;
    let map = SchemaMap::parse(ITEM_MAP, "test map").unwrap();
    let agent = Keypair::generate();
    let tenant = unique("min");
    let url = url_as(&mirror.url, &login);
    let client = serve(&mirror.url, &agent, &tenant, |cfg| {
        cfg.database_url = url.into();
        cfg.tenant_roles = roles_on();
    })
    .await
    .unwrap();
    cycle(&source, &client, &map, &tenant).await;
    source.exec("UPDATE item SET qty = 0 WHERE id <= 5").await;
    cycle(&source, &client, &map, &tenant).await;
    assert_converged(&source, &mirror.url, &tenant, &map).await;
    let c = mirror.client().await;
    assert_eq!(not_owned_by_tenant(&c, &tenant).await, Vec::<String>::new());
    let owner = format!(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'ctmirror' AND pg_get_userbyid(nspowner) = '{login}'"
    );
    assert_eq!(count(&c, &owner).await, 1, "the receiver's login owns the bookkeeping");
}

#[tokio::test]
async fn a_reader_that_does_not_exist_stops_the_receiver_at_start() {
    let db = TestDb::create("roles_no_reader").await;
    let agent = Keypair::generate();
    let roles = TenantRolesConfig { grant_read_to: vec![unique("ghost")], ..roles_on() };
    let err = serve(&db.url, &agent, TENANT, |cfg| cfg.tenant_roles = roles).await.err().expect("refused");
    assert!(err.message.contains("does not exist") && err.message.contains("grant_read_to"), "{}", err.message);
}

#[test]
fn garbage_tenant_roles_config_is_refused_clearly() {
    let recv = "[receiver]\nlisten=\"127.0.0.1:1\"\ndatabase_url=\"x\"\napplication=\"a\"\nprivate_key=\"k\"\nagent_public_key=\"p\"\nplain_http=true\n[receiver.tenant_roles]\n";
    let cases = [
        ("enabled = true\ngrant_read_to = [\"bad name\"]\n", "not a role name"),
        ("enabled = true\ngrant_read_to = [\"x\\\"; DROP TABLE y; --\"]\n", "not a role name"),
        ("enabled = true\ngrant_read_to = [\"\"]\n", "not a role name"),
        ("enabled = true\ngrant_read_to = [\"1abc\"]\n", "not a role name"),
        (&format!("enabled = true\ngrant_read_to = [\"{}\"]\n", "r".repeat(64)), "not a role name"),
        ("enabled = true\ngrant_read_to = [\"public\"]\n", "reserved"),
        ("enabled = true\ngrant_read_to = [\"PUBLIC\"]\n", "reserved"),
        ("enabled = true\ngrant_read_to = [\"pg_read_all_data\"]\n", "reserved"),
        ("enabled = true\ngrant_read_to = [\"ctmirror_tenants\"]\n", "reserved"),
        ("enabled = true\ngrant_read_to = [\"ctmirror_t_other\"]\n", "reserved"),
        ("enabled = true\npassword_secret = \"\"\n", "password_secret is empty"),
        ("enable = true\n", "unknown field"),
        ("enabled = \"yes\"\n", "invalid type"),
        ("enabled = true\ngrant_read_to = \"reporting\"\n", "invalid type"),
    ];
    for (section, expected) in cases {
        let text = format!("{recv}{section}");
        let err = ConfigFile::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(err.contains(expected), "{section}: {err}");
    }
    let ok = ConfigFile::parse(
        &format!("{recv}enabled = true\npassword_secret = \"env:X\"\ngrant_read_to = [\"Reporting_1\"]\n"),
        "c.toml",
    )
    .unwrap();
    let roles = &ok.receiver.unwrap().tenant_roles;
    assert!(roles.enabled);
    assert!(!format!("{roles:?}").contains("env:X"), "the secret stays out of Debug output");
    let off = ConfigFile::parse(recv.trim_end_matches("[receiver.tenant_roles]\n"), "c.toml").unwrap();
    assert!(!off.receiver.unwrap().tenant_roles.enabled);
}

#[tokio::test]
async fn a_mirror_schema_the_partner_dropped_is_recreated_by_the_tenant_roles_login() {
    let p = Pipeline::start_with("roles_dropped_schema", ITEM_SQL, ITEM_MAP, with_roles(roles_on())).await;
    assert!(p.cycle().await.succeeded());
    p.mirror().await.batch_execute("DROP SCHEMA mirror_acme CASCADE").await.unwrap();
    // The tenant role may not create schemas: its next connection notices
    // and the receiver's login provisions the schema again.
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
    assert_eq!(not_owned_by_tenant(&p.mirror().await, TENANT).await, Vec::<String>::new());
}

//! End to end with a PostgreSQL tenant: PostgreSQL-specific cases (the
//! sample CRM, odd PostgreSQL values, concurrent writers, receiver
//! behaviour). Scenarios shared by every source kind are in scenarios.rs.

mod harness;

use ctmirror::agent::AgentErrorKind;
use ctmirror::protocol::SyncMode;
use ctmirror::source::ChunkLimits;
use harness::{sample_crm_map, sample_crm_sql, Options, Pipeline};

const SIMPLE_SQL: &str = "
CREATE TABLE item (id bigint PRIMARY KEY, name text, qty integer, secret text);
INSERT INTO item SELECT i, 'item ' || i, i % 7, 'hidden' || i FROM generate_series(1, 500) i;
";
const SIMPLE_MAP: &str = r#"
application = "crm_insights"
[[table]]
table = "item"
columns = ["id", "name", "qty"]
"#;

fn small_batches(rows: usize) -> Options {
    Options { limits: ChunkLimits { max_rows: rows, max_bytes: 1 << 20 }, ..Options::default() }
}

#[tokio::test]
async fn multi_table_initial_load_equals_source_projection() {
    let p = Pipeline::start("initial_load", &sample_crm_sql(0.05), &sample_crm_map()).await;
    let report = p.cycle().await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.tables.len(), 6);
    assert!(report.tables.iter().all(|t| t.mode == SyncMode::Full));
    p.assert_converged().await;
    let contact = report.tables.iter().find(|t| t.table == "contact").unwrap();
    assert_eq!(contact.counts.inserted, 1000);
    // The users table is mirrored under its mapped name, without secrets.
    let m = p.mirror().await;
    let cols: Vec<String> = m
        .query("SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'mirror_acme' AND table_name = 'associate' ORDER BY ordinal_position", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["user_id", "login", "display_name", "is_active", "last_login"]);
}

#[tokio::test]
async fn second_cycle_sends_only_the_changes() {
    let p = Pipeline::start("only_changes", &sample_crm_sql(0.05), &sample_crm_map()).await;
    assert!(p.cycle().await.succeeded());
    p.source()
        .await
        .batch_execute(
            "UPDATE contact SET name = name || ' (renamed)' WHERE contact_id <= 10;
             DELETE FROM sale WHERE sale_id <= 5;
             INSERT INTO project SELECT 100000 + i, 'New ' || i, NULL, 1, NULL, NULL, false, gen_random_uuid() FROM generate_series(1, 3) i;",
        )
        .await
        .unwrap();
    let report = p.cycle().await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.rows_sent(), 18);
    let by = |n: &str| report.tables.iter().find(|t| t.table == n).unwrap().clone();
    assert_eq!(by("contact").counts.updated, 10);
    assert_eq!(by("sale").counts.deleted, 5);
    assert_eq!(by("project").counts.inserted, 3);
    assert_eq!(by("person").mode, SyncMode::Idle);
    assert_eq!(by("contact").mode, SyncMode::Incremental);
    p.assert_converged().await;
}

#[tokio::test]
async fn concurrent_writers_converge_after_one_more_cycle() {
    let p = Pipeline::start_with("concurrent", SIMPLE_SQL, SIMPLE_MAP, small_batches(50)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3i64 {
        let c = p.source().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let id = 5000 + w * 100_000 + i;
                // A mix of short and slow transactions, some committing late.
                c.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO item VALUES ({id}, 'w{w}', {i}, 's');
                     UPDATE item SET qty = qty + 1 WHERE id = {};
                     DELETE FROM item WHERE id = {};
                     SELECT pg_sleep({});
                     COMMIT;",
                    1 + (i * 7 + w) % 500,
                    id - 3,
                    if i % 5 == 0 { 0.05 } else { 0.0 }
                ))
                .await
                .unwrap();
            }
        }));
    }
    for _ in 0..3 {
        let r = p.cycle_now().await;
        assert!(r.succeeded(), "{r:#?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
}

#[tokio::test]
async fn odd_values_survive_the_round_trip() {
    let sql = r#"
CREATE TABLE odd (
  k1 text COLLATE "C", k2 integer, n numeric(38,10), f float8, r real, b bytea, ts timestamptz, t timestamp,
  d date, tm time, u uuid, j json, jb jsonb, big text, flag boolean, ch char(3), v varchar(5),
  PRIMARY KEY (k1, k2));
INSERT INTO odd VALUES
 ('a', 1, 9999999999999999999999999999.9999999999, 'NaN', 'Infinity', '\x00ff10', '2024-02-29 23:59:59.999999+00', 'infinity', '0001-01-01', '24:00:00',
  '123e4567-e89b-12d3-a456-426614174000', '{"b":1, "a":[1,2]}', '{"z":null}', repeat('🦀', 262144), true, 'ab', 'ÆØÅ'),
 ('a', 2, -9999999999999999999999999999.9999999999, '-Infinity', '-0', '\x', '-infinity', '1999-12-31 23:59:59.5', '9999-12-31', '00:00:00.000001',
  '00000000-0000-0000-0000-000000000000', '[]', '"\u00e9"', '', false, '   ', ''),
 ('Z', 1, 0.0000000001, 1e-300, 3.4e38, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 ('ä''"\', -2147483648, NULL, 1.7976931348623157e308, 1.17549435e-38, '\xdeadbeef', '1970-01-01 00:00:00+00', '2000-01-01 00:00:00', '2000-02-29', '12:34:56.789',
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '{"k": "line\nbreak \u0001"}', '{"deep": {"a": {"b": [1.5e10]}}}', E'tab\there\nnewline\\back', NULL, 'x', 'a"b');
"#;
    let map = r#"
application = "crm_insights"
[[table]]
table = "odd"
columns = ["k1", "k2", "n", "f", "r", "b", "ts", "t", "d", "tm", "u", "j", "jb", "big", "flag", "ch", "v"]
"#;
    let p = Pipeline::start_with("odd_values", sql, map, small_batches(2)).await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
    p.source().await.batch_execute("UPDATE odd SET big = big || 'x', n = -n WHERE k2 = 1; DELETE FROM odd WHERE k1 = 'Z'").await.unwrap();
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
}

#[tokio::test]
async fn unmapped_columns_never_reach_the_mirror_or_the_wire() {
    let p = Pipeline::start("deny_default", &sample_crm_sql(0.02), &sample_crm_map()).await;
    assert!(p.cycle().await.succeeded());
    // A sensitive column added later is not mapped either.
    p.source().await.batch_execute("ALTER TABLE contact ADD COLUMN tax_secret text DEFAULT 'TOPSECRET'; UPDATE contact SET name = name WHERE contact_id < 20;").await.unwrap();
    assert!(p.cycle().await.succeeded());
    let wire = p.wire_text();
    for forbidden in ["password_hash", "argon2id", "mfa_secret", "internal_notes", "internal note", "national_id", "tax_secret", "TOPSECRET"] {
        assert!(!wire.contains(forbidden), "{forbidden} travelled on the wire");
    }
    let m = p.mirror().await;
    let n: i64 = m
        .query_one("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'mirror_acme' AND column_name IN ('password_hash', 'mfa_secret', 'internal_notes', 'national_id', 'tax_secret')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn paused_receiver_skips_the_cycle() {
    let opts = Options { paused: Some("maintenance".into()), ..Options::default() };
    let p = Pipeline::start_with("paused", SIMPLE_SQL, SIMPLE_MAP, opts).await;
    let r = p.cycle().await;
    assert_eq!(r.paused.as_deref(), Some("maintenance"));
    assert!(r.tables.is_empty());
    let n: i64 = p.mirror().await.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'mirror_acme'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn table_dropped_from_the_map_is_dropped_from_the_mirror() {
    let sql = format!("{SIMPLE_SQL} CREATE TABLE extra (id int PRIMARY KEY); INSERT INTO extra VALUES (1);");
    let map2 = format!("{SIMPLE_MAP}\n[[table]]\ntable = \"extra\"\ncolumns = [\"id\"]\n");
    let mut p = Pipeline::start("drop_table", &sql, &map2).await;
    assert!(p.cycle().await.succeeded());
    p.map = ctmirror::schema_map::SchemaMap::parse(SIMPLE_MAP, "m").unwrap();
    let r = p.cycle().await;
    assert_eq!(r.dropped, vec!["extra".to_string()]);
    let n: i64 = p.mirror().await.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'mirror_acme' AND tablename = 'extra'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_table_that_cannot_be_read_is_not_dropped() {
    let p = Pipeline::start("skip_not_drop", SIMPLE_SQL, SIMPLE_MAP).await;
    assert!(p.cycle().await.succeeded());
    // The mapped column disappears at the source: the table fails this cycle,
    // but the receiver must keep its mirror.
    p.source().await.batch_execute("ALTER TABLE item RENAME COLUMN qty TO quantity").await.unwrap();
    let r = p.cycle().await;
    assert!(r.tables[0].error.is_some());
    assert!(r.dropped.is_empty());
    let n: i64 = p.mirror().await.query_one("SELECT count(*) FROM mirror_acme.item", &[]).await.unwrap().get(0);
    assert_eq!(n, 500);
}

#[tokio::test]
async fn wrong_keys_fail_authentication_and_write_nothing() {
    use ctmirror::agent::PartnerClient;
    use ctmirror::auth::{Keypair, RequestSigner};
    let p = Pipeline::start("wrong_keys", SIMPLE_SQL, SIMPLE_MAP).await;
    let app: ctmirror::ids::AppId = "crm_insights".parse().unwrap();
    let timeout = std::time::Duration::from_secs(5);
    // An agent key the receiver does not know: the receiver refuses.
    let signer = RequestSigner { key: Keypair::generate(), tenant: p.tenant.clone(), app: app.clone() };
    let trust = ctmirror::agent::TlsTrust::allowing_plain_http();
    let stranger = PartnerClient::new(&p.receiver_url, signer, p.partner_public, timeout, &trust).unwrap();
    let e = stranger.authenticate().await.unwrap_err();
    assert_eq!(e.kind, AgentErrorKind::Auth, "{e}");
    assert!(e.message.contains("401"), "{e}");
    // The right agent key, but the answer is checked against another partner
    // key: the agent refuses to go on.
    let signer = RequestSigner { key: p.agent_key.clone(), tenant: p.tenant.clone(), app };
    let fooled = PartnerClient::new(&p.receiver_url, signer, Keypair::generate().public(), timeout, &trust).unwrap();
    let e = fooled.authenticate().await.unwrap_err();
    assert_eq!(e.kind, AgentErrorKind::Auth, "{e}");
    assert!(e.message.contains("did not verify"), "{e}");
    let n: i64 = p.mirror().await.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'mirror_acme'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

/// Loads and change streams are pipelined: the next chunk is read while a
/// batch is applied. Killing the agent at arbitrary moments (the cycle's
/// future dropped mid-request, as a killed process would leave it) must
/// lose and repeat nothing: each next cycle resumes from the receiver's
/// cursor, and writes made between the kills arrive too.
#[tokio::test]
async fn a_pipelined_load_killed_midway_resumes_without_loss() {
    let sql = "CREATE TABLE item (id bigint PRIMARY KEY, name text, qty integer, secret text);
               INSERT INTO item SELECT i, repeat('n', i % 50), i % 7, 's' FROM generate_series(1, 20000) i;";
    let p = Pipeline::start_with("killed_load", sql, SIMPLE_MAP, small_batches(100)).await;
    p.wait_quiet().await;
    let mut kills_inside_the_load = 0;
    for (round, extra_ms) in [0u64, 30, 5, 60, 15, 45, 10, 90].into_iter().enumerate() {
        // Kill once the load has moved since the last kill, plus a little:
        // progress, not wall time, so a slow machine still kills mid-load.
        let before = p.mirror_cursor("item").await;
        let mut cycle = Box::pin(p.cycle_now());
        let finished = loop {
            tokio::select! {
                _ = &mut cycle => break true,
                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {
                    let now = p.mirror_cursor("item").await;
                    if now != before && matches!(now, Some(ctmirror::protocol::Cursor::Snapshot { .. })) {
                        break false;
                    }
                }
            }
        };
        if finished {
            break;
        }
        let finished = tokio::select! {
            _ = &mut cycle => true,
            _ = tokio::time::sleep(std::time::Duration::from_millis(extra_ms)) => false,
        };
        drop(cycle);
        if finished {
            break;
        }
        if matches!(p.mirror_cursor("item").await, Some(ctmirror::protocol::Cursor::Snapshot { .. })) {
            kills_inside_the_load += 1;
        }
        // Writes between kills: some behind the load's position, some ahead.
        p.exec(&format!(
            "UPDATE item SET qty = qty + 100 WHERE id % 97 = {round};
             DELETE FROM item WHERE id = {};
             INSERT INTO item VALUES ({}, 'late', 1, 's');",
            1000 + round * 2000,
            30000 + round
        ))
        .await;
    }
    assert!(kills_inside_the_load >= 2, "the kills should land inside the full load ({kills_inside_the_load})");
    let report = p.cycle().await;
    assert!(report.succeeded(), "{report:#?}");
    let report = p.cycle().await;
    assert!(report.succeeded(), "{report:#?}");
    p.assert_converged().await;
}

/// Stands between agent and receiver and changes what `tamper` says: a
/// network attacker's view of the protocol without TLS.
async fn tampering_proxy(
    upstream: String,
    tamper: fn(&str, &mut reqwest::header::HeaderMap, &mut Vec<u8>),
) -> String {
    use axum::body::Bytes;
    use axum::extract::Request;
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (http, upstream) = (http.clone(), upstream.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let path = parts.uri.path().to_owned();
            let resp = http.post(format!("{upstream}{path}")).headers(parts.headers).body(body).send().await.unwrap();
            let status = resp.status();
            let mut headers = resp.headers().clone();
            let mut bytes = resp.bytes().await.unwrap().to_vec();
            tamper(&path, &mut headers, &mut bytes);
            headers.remove(reqwest::header::CONTENT_LENGTH);
            let mut out = axum::response::Response::new(axum::body::Body::from(bytes));
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            out
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    url
}

async fn cycle_through(p: &Pipeline, url: &str) -> Result<ctmirror::agent::CycleReport, ctmirror::agent::AgentError> {
    use ctmirror::auth::RequestSigner;
    let signer = RequestSigner { key: p.agent_key.clone(), tenant: p.tenant.clone(), app: "crm_insights".parse().unwrap() };
    let trust = ctmirror::agent::TlsTrust::allowing_plain_http();
    let timeout = std::time::Duration::from_secs(10);
    let client = ctmirror::agent::PartnerClient::new(url, signer, p.partner_public, timeout, &trust).unwrap();
    let mut source = p.connect_source().await;
    let settings = ctmirror::agent::CycleSettings { limits: p.limits };
    ctmirror::agent::run_cycle(&mut source, &client, &p.map, "acme", settings).await
}

/// An attacker between agent and partner who strips or rewrites the
/// receiver's answers cannot steer the agent: every answer it acts on must
/// carry the partner's signature over the request's nonce, the status and
/// the body, and the next honest cycle converges.
#[tokio::test]
async fn the_agent_acts_on_no_answer_without_the_partners_signature() {
    let p = Pipeline::start("tampered_answers", SIMPLE_SQL, SIMPLE_MAP).await;
    p.wait_quiet().await;

    let stripped = tampering_proxy(p.receiver_url.clone(), |_, headers, _| {
        headers.remove("ctmirror-signature");
    })
    .await;
    let e = cycle_through(&p, &stripped).await.unwrap_err();
    assert_eq!(e.kind, AgentErrorKind::Auth, "{e}");
    assert!(e.message.contains("answer is not signed"), "{e}");

    // The rows answers get an extra space: the same JSON, another body.
    let rewritten = tampering_proxy(p.receiver_url.clone(), |path, _, body| {
        if path.ends_with("/rows") {
            body.push(b' ');
        }
    })
    .await;
    let report = cycle_through(&p, &rewritten).await.unwrap();
    let item = &report.tables[0];
    let err = item.error.as_ref().expect("the table stops at the first rewritten answer");
    assert_eq!(err.kind, AgentErrorKind::Auth, "{err}");
    assert!(err.message.contains("body hash does not match the body"), "{err}");
    assert!(item.counts.inserted <= p.limits.max_rows as u64, "no batch after the first: {:?}", item.counts);

    let report = p.cycle().await;
    assert!(report.succeeded(), "{report:#?}");
    p.assert_converged().await;
}

//! The receiver over real HTTP against a real PostgreSQL: every test starts
//! its own service on its own database and speaks the protocol the way the
//! agent does, signing with `RequestSigner`.

mod support;

use ctmirror::auth::{self, check_receiver_answer, Claims, Keypair, PublicKey, RequestSigner, Role};
use ctmirror::config::ReceiverConfig;
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::{
    ColumnType, Cursor, Key, TableSchema, TableSchemaResponse, TableStatus, Value, Version,
};
use ctmirror::receiver::{quote_ident, ReceiverService};
use serde_json::{json, Value as Json};
use support::{col, items};
use futures_util::StreamExt;
use std::future::IntoFuture;

const TENANT: &str = "acme";

fn config(url: &str) -> ReceiverConfig {
    ReceiverConfig {
        max_body_bytes: 1 << 20,
        ..ReceiverConfig::new("127.0.0.1:0", url, AppId::new("crm").unwrap(), "unused", "unused")
    }
}

/// A receiver on its own database and port, and an agent-side signer.
struct Rig {
    db: support::TestDb,
    base: String,
    signer: RequestSigner,
    partner_public: PublicKey,
    http: reqwest::Client,
}

struct Answer {
    status: u16,
    body: Json,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn kind(&self) -> &str {
        self.body["error"]["kind"].as_str().unwrap_or("<none>")
    }
    fn ok<T: serde::de::DeserializeOwned>(self) -> T {
        assert_eq!(self.status, 200, "{}", self.body);
        serde_json::from_value(self.body).unwrap()
    }
}

impl Rig {
    async fn start(label: &str) -> Rig {
        Rig::start_with(label, |_| {}).await
    }

    async fn start_with(label: &str, tweak: impl FnOnce(&mut ReceiverConfig)) -> Rig {
        let db = support::TestDb::create(label).await;
        let mut cfg = config(&db.url);
        tweak(&mut cfg);
        let partner = Keypair::generate();
        let partner_public = partner.public();
        let agent = Keypair::generate();
        let svc = ReceiverService::with_keys(cfg, partner, agent.public()).await.expect("receiver starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, svc.router()).into_future());
        let signer =
            RequestSigner { key: agent, tenant: TenantId::new(TENANT).unwrap(), app: AppId::new("crm").unwrap() };
        Rig { db, base, signer, partner_public, http: reqwest::Client::new() }
    }

    fn path(&self, op: &str) -> String {
        format!("/v1/tenants/{TENANT}/{op}")
    }

    async fn send(&self, path: &str, content_type: Option<&str>, auth: Option<String>, body: Vec<u8>) -> Answer {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("request reaches the receiver");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
        Answer { status, body, headers }
    }

    /// A correctly signed call, as the agent makes it.
    async fn call(&self, op: &str, body: &Json) -> Answer {
        let path = self.path(op);
        let bytes = serde_json::to_vec(body).unwrap();
        let (_, auth) = self.signer.authorize("POST", &path, &bytes);
        self.send(&path, Some("application/json"), Some(auth), bytes).await
    }

    async fn schema(&self, tables: &[TableSchema]) -> TableSchemaResponse {
        self.call("schema", &json!({"source_identity": "src-1", "tables": tables})).await.ok()
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.db.client().await
    }

    /// Every row of a mirror table as JSON text, in key order.
    async fn dump(&self, table: &str) -> Vec<String> {
        let sql = format!(
            "SELECT to_jsonb(t)::text FROM {}.{} t ORDER BY 1",
            quote_ident(&format!("mirror_{TENANT}")),
            quote_ident(table)
        );
        self.client().await.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    async fn cursor(&self, table: &str) -> Option<Cursor> {
        let row = self
            .client()
            .await
            .query_one(
                "SELECT cursor::text FROM ctmirror.tables WHERE tenant = $1 AND table_name = $2",
                &[&TENANT, &table],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).map(|t| serde_json::from_str(&t).unwrap())
    }

    async fn bookkeeping_rows(&self) -> i64 {
        self.client().await.query_one("SELECT count(*) FROM ctmirror.tables", &[]).await.unwrap().get(0)
    }

    async fn mirror_tables(&self) -> Vec<String> {
        self.client()
            .await
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
                &[&format!("mirror_{TENANT}")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn assert_nothing_written(&self) {
        assert_eq!(self.bookkeeping_rows().await, 0, "bookkeeping rows were written");
        assert!(self.mirror_tables().await.is_empty(), "mirror tables were created");
    }
}


fn changes(v: i64) -> Cursor {
    Cursor::Changes { version: Version(v), after_key: None }
}

fn batch(table: &TableSchema, from: Option<Cursor>, to: Cursor, rows: Json) -> Json {
    json!({"table": table.name, "schema_hash": table.hash(), "from": from, "to": to, "rows": rows})
}

fn upsert(version: i64, values: Json) -> Json {
    json!({"op": "upsert", "version": version, "values": values})
}

fn delete(version: i64, key: Json) -> Json {
    json!({"op": "delete", "version": version, "key": key})
}

/// `items` created and filled with ids 1 and 2, cursor at changes@1.
async fn rig_with_items(label: &str) -> Rig {
    let rig = Rig::start(label).await;
    rig.schema(&[items()]).await;
    let b = batch(
        &items(),
        None,
        changes(1),
        json!([upsert(1, json!([1, "one", 1, "1.50"])), upsert(1, json!([2, "two", 2, null]))]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 200, "{}", a.body);
    rig
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn authenticate_answer_verifies_with_partner_key_and_echoes_nonce() {
    let rig = Rig::start("auth_ok").await;
    let path = rig.path("authenticate");
    let body = serde_json::to_vec(&json!({"agent": "ctmirror-test 0.1"})).unwrap();
    let (claims, header) = rig.signer.authorize("POST", &path, &body);
    let a = rig.send(&path, Some("application/json"), Some(header), body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["replicate"], true);
    let token = a.body["token"].as_str().unwrap();
    check_receiver_answer(token, &[rig.partner_public], &claims, 300, auth::now_unix()).expect("answer verifies");
    let stranger = Keypair::generate().public();
    assert!(check_receiver_answer(token, &[stranger], &claims, 300, auth::now_unix()).is_err());
    let mut other = claims.clone();
    other.nonce = auth::new_nonce();
    assert!(check_receiver_answer(token, &[rig.partner_public], &other, 300, auth::now_unix()).is_err());
}

#[tokio::test]
async fn paused_receiver_answers_do_not_replicate() {
    let rig = Rig::start_with("auth_paused", |c| c.paused_reason = Some("maintenance until 03:00".into())).await;
    let a = rig.call("authenticate", &json!({"agent": "t"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["replicate"], false);
    assert_eq!(a.body["reason"], "maintenance until 03:00");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_nothing_is_written() {
    let rig = Rig::start("auth_bad").await;
    let path = rig.path("schema");
    let body = serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()]})).unwrap();
    let claims = |ts_offset: i64, tenant: &str, body: &[u8]| Claims {
        role: Role::Agent,
        tenant: TenantId::new(tenant).unwrap(),
        app: AppId::new("crm").unwrap(),
        ts: auth::now_unix() + ts_offset,
        nonce: auth::new_nonce(),
        method: "POST".into(),
        path: format!("/v1/tenants/{tenant}/schema"),
        body_sha256: auth::body_digest(body),
        status: None,
    };
    let agent = &rig.signer.key;
    let stranger = Keypair::generate();
    let header = |key: &Keypair, c: &Claims| Some(format!("CtMirror {}", key.sign(c)));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing header", None, "missing"),
        ("garbage", Some("CtMirror not-a-token".into()), "malformed"),
        ("bearer scheme", Some("Bearer abc".into()), "missing"),
        ("wrong key", header(&stranger, &claims(0, TENANT, &body)), "signature"),
        ("expired", header(agent, &claims(-600, TENANT, &body)), "timestamp"),
        ("from the future", header(agent, &claims(600, TENANT, &body)), "timestamp"),
        ("other tenant", header(agent, &claims(0, "other", &body)), "tenant"),
        ("other body", header(agent, &claims(0, TENANT, b"{}")), "body"),
    ];
    for (what, auth, expected) in cases {
        let a = rig.send(&path, Some("application/json"), auth, body.clone()).await;
        assert_eq!(a.status, 401, "{what}: {}", a.body);
        assert_eq!(a.kind(), "unauthorized", "{what}");
        assert_eq!(a.body["error"]["retryable"], false);
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expected), "{what}: {msg}");
        assert!(!msg.contains(&agent.public_base64()), "{what}: message leaks key material");
    }
    // A token for another operation's path does not open this one either.
    let (_, reload_token) = rig.signer.authorize("POST", &rig.path("reload"), &body);
    let a = rig.send(&path, Some("application/json"), Some(reload_token), body.clone()).await;
    assert_eq!(a.status, 401, "{}", a.body);
    rig.assert_nothing_written().await;
}

// ---------------------------------------------------------------- transport

/// What is wrong, content type, body, expected status and error kind.
type TransportCase<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);

#[tokio::test]
async fn malformed_requests_are_refused_before_anything_is_written() {
    let rig = Rig::start_with("malformed", |c| c.max_body_bytes = 4096).await;
    let path = rig.path("schema");
    let signed = |body: &[u8]| rig.signer.authorize("POST", &path, body).1;
    let good = serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()]})).unwrap();

    let cases: Vec<TransportCase> = vec![
        ("malformed json", Some("application/json"), b"{\"tables\": [".to_vec(), 400, "bad_request"),
        (
            "unknown field",
            Some("application/json"),
            serde_json::to_vec(&json!({"source_identity": "s", "tables": [], "extra": 1})).unwrap(),
            400,
            "bad_request",
        ),
        (
            "invalid utf-8",
            Some("application/json"),
            b"{\"source_identity\": \"\xff\xfe\", \"tables\": []}".to_vec(),
            400,
            "bad_request",
        ),
        ("wrong content type", Some("text/plain"), good.clone(), 415, "unsupported_media_type"),
        ("no content type", None, good.clone(), 415, "unsupported_media_type"),
        ("oversized", Some("application/json"), vec![b' '; 5000], 413, "payload_too_large"),
    ];
    for (what, ct, body, status, kind) in cases {
        let auth = signed(&body);
        let a = rig.send(&path, ct, Some(auth), body).await;
        assert_eq!(a.status, status, "{what}: {}", a.body);
        assert_eq!(a.kind(), kind, "{what}");
    }
    let a = rig.send(&path, Some("application/json; charset=utf-8"), Some(signed(b"[")), b"[".to_vec()).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "charset parameter is accepted, then JSON fails");

    let a =
        rig.send("/v1/tenants/Not-A-Tenant/schema", Some("application/json"), Some(signed(&good)), good.clone()).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "{}", a.body);
    let a = rig.send("/v1/elsewhere", Some("application/json"), None, good.clone()).await;
    assert_eq!(a.status, 404, "{}", a.body);
    let resp = rig.http.get(format!("{}{path}", rig.base)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "method_not_allowed");
    rig.assert_nothing_written().await;
}

// ---------------------------------------------------------------- schema

fn all_types() -> TableSchema {
    use ColumnType as T;
    TableSchema {
        name: "all_types".into(),
        columns: vec![
            col("id", T::Int32, false),
            col("b", T::Bool, true),
            col("i16", T::Int16, true),
            col("i64", T::Int64, true),
            col("f32", T::Float32, true),
            col("f64", T::Float64, true),
            col("dec", T::Decimal { precision: Some(10), scale: Some(2) }, true),
            col("dec_any", T::Decimal { precision: None, scale: None }, true),
            col("txt", T::Text { max_length: Some(20) }, false),
            col("txt_any", T::Text { max_length: None }, true),
            col("fixed", T::FixedText { length: 3 }, true),
            col("bin", T::Bytes { max_length: None }, true),
            col("d", T::Date, true),
            col("tm", T::Time { precision: Some(3) }, true),
            col("ts", T::Timestamp { precision: None }, true),
            col("tstz", T::TimestampTz { precision: Some(6) }, true),
            col("u", T::Uuid, true),
            col("j", T::Json, true),
        ],
        primary_key: vec!["id".into()],
    }
}

#[tokio::test]
async fn schema_creates_tables_with_exact_column_types() {
    let rig = Rig::start("schema_types").await;
    let answer = rig.schema(&[all_types()]).await;
    assert_eq!(answer.tables.len(), 1);
    assert_eq!(answer.tables[0].status, TableStatus::Created);
    assert_eq!(answer.tables[0].cursor, None);
    assert_eq!(answer.tables[0].schema_hash, all_types().hash());

    let client = rig.client().await;
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull
             FROM pg_attribute a WHERE a.attrelid = 'mirror_acme.all_types'::regclass AND a.attnum > 0
             ORDER BY a.attnum",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let expected = [
        ("id", "integer", true),
        ("b", "boolean", false),
        ("i16", "smallint", false),
        ("i64", "bigint", false),
        ("f32", "real", false),
        ("f64", "double precision", false),
        ("dec", "numeric(10,2)", false),
        ("dec_any", "numeric", false),
        ("txt", "character varying(20)", true),
        ("txt_any", "text", false),
        ("fixed", "character(3)", false),
        ("bin", "bytea", false),
        ("d", "date", false),
        ("tm", "time(3) without time zone", false),
        ("ts", "timestamp without time zone", false),
        ("tstz", "timestamp(6) with time zone", false),
        ("u", "uuid", false),
        ("j", "jsonb", false),
    ];
    let expected: Vec<(String, String, bool)> =
        expected.iter().map(|(n, t, nn)| (n.to_string(), t.to_string(), *nn)).collect();
    assert_eq!(got, expected);
    let is_nullable: String = client
        .query_one(
            "SELECT is_nullable::text FROM information_schema.columns
             WHERE table_schema = 'mirror_acme' AND table_name = 'all_types' AND column_name = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(is_nullable, "YES");
    let pk: String = client
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = 'mirror_acme.all_types'::regclass AND contype = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, "PRIMARY KEY (id)");
}

#[tokio::test]
async fn every_type_stores_its_wire_value() {
    let rig = Rig::start("every_type").await;
    rig.schema(&[all_types()]).await;
    let values = json!([
        1,
        true,
        -32768,
        9007199254740993i64,
        1.5,
        "NaN",
        "12345678.91",
        "-1",
        "héllo \"quoted\"",
        "tab\there",
        "ab",
        "AAH/",
        "2024-02-29",
        "23:59:59.123",
        "2024-01-01T10:00:00.5",
        "2024-01-01T10:00:00+02:00",
        "123e4567-e89b-12d3-a456-426614174000",
        "{\"a\": [1, 2]}"
    ]);
    let a = rig.call("rows", &batch(&all_types(), None, changes(3), json!([upsert(3, values)]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let row = rig
        .client()
        .await
        .query_one(
            "SELECT b::text, i16::text, i64::text, f32::text, f64::text, dec::text, dec_any::text, txt, txt_any,
                    fixed, encode(bin, 'hex'), d::text, tm::text, ts::text,
                    to_char(tstz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), u::text, j::text
             FROM mirror_acme.all_types WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<String> = (0..17).map(|i| row.get(i)).collect();
    assert_eq!(
        got,
        [
            "true",
            "-32768",
            "9007199254740993",
            "1.5",
            "NaN",
            "12345678.91",
            "-1",
            "héllo \"quoted\"",
            "tab\there",
            "ab ",
            "0001ff",
            "2024-02-29",
            "23:59:59.123",
            "2024-01-01 10:00:00.5",
            "2024-01-01 08:00:00",
            "123e4567-e89b-12d3-a456-426614174000",
            "{\"a\": [1, 2]}"
        ]
    );
}

#[tokio::test]
async fn schema_answers_created_then_unchanged_with_the_cursor() {
    let rig = rig_with_items("schema_unchanged").await;
    let again = rig.schema(&[items()]).await;
    assert_eq!(again.tables[0].status, TableStatus::Unchanged);
    assert_eq!(again.tables[0].cursor, Some(changes(1)));
    assert!(again.dropped.is_empty());
    assert_eq!(rig.dump("items").await.len(), 2, "rows survive an unchanged schema call");
}

#[tokio::test]
async fn a_widened_column_is_altered_in_place_and_the_cursor_stands() {
    let rig = rig_with_items("schema_widen").await;
    let mut wider = items();
    wider.columns[2].data_type = ColumnType::Int32;
    wider.columns[1] = col("name", ColumnType::Text { max_length: Some(200) }, true);
    let answer = rig.schema(&[wider.clone()]).await;
    let t = &answer.tables[0];
    assert_eq!(t.status, TableStatus::Altered, "{t:?}");
    assert_eq!(t.cursor, Some(changes(1)));
    assert_eq!(t.schema_hash, wider.hash());
    let msg = t.message.as_deref().unwrap();
    assert!(msg.contains("smallint -> integer") && msg.contains("varchar(20) -> varchar(200)"), "{msg}");
    assert_eq!(rig.dump("items").await.len(), 2);
    // A value only the wider type holds now goes in, under the new hash.
    let long = "x".repeat(150);
    let b = batch(&wider, Some(changes(1)), changes(2), json!([upsert(2, json!([3, long, 40000, null]))]));
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A batch still following the old schema is refused.
    let b = batch(&items(), Some(changes(2)), changes(3), json!([]));
    assert_eq!(rig.call("rows", &b).await.kind(), "schema_mismatch");
}

#[tokio::test]
async fn an_added_column_rebuilds_into_a_shadow_while_the_live_table_serves() {
    let rig = rig_with_items("schema_rebuild").await;
    let mut added = items();
    added.columns.push(col("added", ColumnType::Bool, true));
    let answer = rig.schema(&[added.clone()]).await;
    let t = &answer.tables[0];
    assert_eq!(t.status, TableStatus::Rebuilding, "{t:?}");
    assert_eq!(t.cursor, None);
    assert!(t.message.as_deref().unwrap().contains("\"added\" added"), "{t:?}");
    // Asking again while the rebuild runs answers the same, and starts nothing new.
    let snap = Cursor::Snapshot { version: Version(5), after_key: Some(Key(vec![Value::Int(1)])) };
    let b = batch(&added, None, snap.clone(), json!([upsert(5, json!([1, "new", 1, null, true]))]));
    assert_eq!(rig.call("rows", &b).await.status, 200);
    let again = rig.schema(&[added.clone()]).await;
    assert_eq!((again.tables[0].status, again.tables[0].cursor.clone()), (TableStatus::Rebuilding, Some(snap.clone())));
    // Partners still read the old table, whole and in its old shape.
    let live = rig.dump("items").await;
    assert_eq!(live.len(), 2);
    assert!(!live[0].contains("added"), "{live:?}");
    // The batch that ends the snapshot swaps the shadow in.
    let a = rig.call("rows", &batch(&added, Some(snap), changes(5), json!([]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let live = rig.dump("items").await;
    assert_eq!(live.len(), 1);
    assert!(live[0].contains("\"added\": true"), "{live:?}");
    let shadows: i64 = rig
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'ctmirror_load_acme'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shadows, 0);
    assert_eq!(rig.schema(&[added]).await.tables[0].status, TableStatus::Unchanged);
}

#[tokio::test]
async fn a_change_postgres_refuses_refuses_that_table_only() {
    let rig = rig_with_items("schema_view").await;
    rig.client().await.batch_execute("CREATE VIEW public.item_names AS SELECT name FROM mirror_acme.items").await.unwrap();
    let mut wider = items();
    wider.columns[1] = col("name", ColumnType::Text { max_length: Some(200) }, true);
    let answer = rig.schema(&[wider, all_types()]).await;
    let t = &answer.tables[0];
    assert_eq!(t.status, TableStatus::Refused, "{t:?}");
    assert!(t.message.as_deref().unwrap().contains("view"), "{t:?}");
    assert_eq!(t.schema_hash, items().hash(), "answers the hash the table still has");
    assert_eq!(answer.tables[1].status, TableStatus::Created);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
}

#[tokio::test]
async fn table_missing_from_a_later_schema_call_is_dropped() {
    let rig = rig_with_items("schema_drop").await;
    let answer = rig.schema(&[all_types()]).await;
    assert_eq!(answer.dropped, vec!["items".to_string()]);
    assert_eq!(rig.mirror_tables().await, vec!["all_types".to_string()]);
    assert_eq!(rig.bookkeeping_rows().await, 1);
}

#[tokio::test]
async fn table_missing_from_a_later_schema_call_is_kept_when_configured() {
    let rig = Rig::start_with("schema_keep", |c| c.drop_unmapped_tables = false).await;
    rig.schema(&[items()]).await;
    let answer = rig.schema(&[all_types()]).await;
    assert_eq!(answer.dropped, vec!["items".to_string()]);
    assert_eq!(rig.mirror_tables().await, vec!["all_types".to_string(), "items".to_string()]);
    assert_eq!(rig.bookkeeping_rows().await, 2);
}

#[tokio::test]
async fn skipped_tables_are_kept_untouched() {
    let rig = rig_with_items("schema_skipped").await;
    let a =
        rig.call("schema", &json!({"source_identity": "src-1", "tables": [all_types()], "skipped": ["items"]})).await;
    let answer: TableSchemaResponse = a.ok();
    assert!(answer.dropped.is_empty(), "{:?}", answer.dropped);
    assert_eq!(rig.dump("items").await.len(), 2);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
    let a = rig.call("schema", &json!({"source_identity": "s", "tables": [items()], "skipped": ["items"]})).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "{}", a.body);
}

#[tokio::test]
async fn mirror_table_dropped_by_the_partner_is_recreated_without_cursor() {
    let rig = rig_with_items("schema_recreate").await;
    rig.client().await.batch_execute("DROP TABLE mirror_acme.items").await.unwrap();
    let answer = rig.schema(&[items()]).await;
    assert_eq!(answer.tables[0].status, TableStatus::Created);
    assert_eq!(answer.tables[0].cursor, None);
    assert_eq!(rig.cursor("items").await, None);
    assert!(rig.dump("items").await.is_empty());
}

#[tokio::test]
async fn leftover_table_without_bookkeeping_is_replaced() {
    let rig = Rig::start("schema_leftover").await;
    rig.client()
        .await
        .batch_execute("CREATE SCHEMA mirror_acme; CREATE TABLE mirror_acme.items (junk text); INSERT INTO mirror_acme.items VALUES ('x')")
        .await
        .unwrap();
    let answer = rig.schema(&[items()]).await;
    assert_eq!(answer.tables[0].status, TableStatus::Created);
    assert!(rig.dump("items").await.is_empty());
    let a = rig.call("rows", &batch(&items(), None, changes(1), json!([upsert(1, json!([1, null, 1, null]))]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn invalid_schema_calls_are_refused_whole() {
    let rig = Rig::start("schema_invalid").await;
    let mut no_key = all_types();
    no_key.primary_key.clear();
    for tables in [vec![items(), items()], vec![items(), no_key]] {
        let a = rig.call("schema", &json!({"source_identity": "s", "tables": tables})).await;
        assert_eq!((a.status, a.kind()), (400, "bad_request"), "{}", a.body);
    }
    rig.assert_nothing_written().await;
}

// ---------------------------------------------------------------- rows

#[tokio::test]
async fn batch_applies_upserts_and_deletes_with_counts() {
    let rig = rig_with_items("rows_apply").await;
    let b = batch(
        &items(),
        Some(changes(1)),
        changes(2),
        json!([
            upsert(2, json!([2, "two again", 5, "9.99"])),
            upsert(2, json!([3, "three", 3, "-1.25"])),
            delete(2, json!([1])),
            delete(2, json!([42])),
        ]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["applied"], true);
    assert_eq!(a.body["counts"], json!({"inserted": 1, "updated": 1, "deleted": 1}));
    assert_eq!(serde_json::from_value::<Cursor>(a.body["cursor"].clone()).unwrap(), changes(2));
    assert_eq!(
        rig.dump("items").await,
        vec![
            r#"{"id": 2, "qty": 5, "name": "two again", "price": 9.99}"#.to_string(),
            r#"{"id": 3, "qty": 3, "name": "three", "price": -1.25}"#.to_string(),
        ]
    );
    assert_eq!(rig.cursor("items").await, Some(changes(2)));
}

#[tokio::test]
async fn resent_batch_is_acknowledged_without_changes() {
    let rig = rig_with_items("rows_resend").await;
    let b = batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([5, "five", 5, null]))]));
    assert_eq!(rig.call("rows", &b).await.status, 200);
    // The partner edits the row; a re-send must not overwrite it.
    rig.client().await.batch_execute("UPDATE mirror_acme.items SET name = 'edited' WHERE id = 5").await.unwrap();
    let before = rig.dump("items").await;
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["applied"], false);
    assert_eq!(a.body["counts"], json!({"inserted": 0, "updated": 0, "deleted": 0}));
    assert_eq!(serde_json::from_value::<Cursor>(a.body["cursor"].clone()).unwrap(), changes(2));
    assert_eq!(rig.dump("items").await, before);
}

#[tokio::test]
async fn batch_from_another_cursor_conflicts_with_the_current_cursor() {
    let rig = rig_with_items("rows_conflict").await;
    for from in [None, Some(changes(0)), Some(Cursor::Snapshot { version: Version(1), after_key: None })] {
        let a =
            rig.call("rows", &batch(&items(), from, changes(5), json!([upsert(5, json!([9, null, 1, null]))]))).await;
        assert_eq!((a.status, a.kind()), (409, "conflict"), "{}", a.body);
        assert_eq!(serde_json::from_value::<Cursor>(a.body["error"]["cursor"].clone()).unwrap(), changes(1));
        assert_eq!(a.body["error"]["table"], "items");
        assert_eq!(a.body["error"]["retryable"], false);
    }
    assert_eq!(rig.dump("items").await.len(), 2);
}

#[tokio::test]
async fn backwards_cursor_is_a_bad_request() {
    let rig = Rig::start("rows_backwards").await;
    rig.schema(&[items()]).await;
    let a = rig.call("rows", &batch(&items(), None, changes(10), json!([]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = rig.call("rows", &batch(&items(), Some(changes(10)), changes(9), json!([]))).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "{}", a.body);
    let snap = Cursor::Snapshot { version: Version(11), after_key: None };
    let a = rig.call("rows", &batch(&items(), Some(changes(10)), snap, json!([]))).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "{}", a.body);
    assert_eq!(rig.cursor("items").await, Some(changes(10)));
}

#[tokio::test]
async fn unknown_table_and_other_schema_are_409() {
    let rig = rig_with_items("rows_unknown").await;
    let mut ghost = items();
    ghost.name = "ghost".into();
    let a = rig.call("rows", &batch(&ghost, None, changes(1), json!([]))).await;
    assert_eq!((a.status, a.kind()), (409, "unknown_table"), "{}", a.body);
    let mut b = batch(&items(), Some(changes(1)), changes(2), json!([]));
    b["schema_hash"] = json!("0000");
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, a.kind()), (409, "schema_mismatch"), "{}", a.body);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
}

#[tokio::test]
async fn values_contradicting_the_schema_are_refused_and_nothing_is_written() {
    let rig = rig_with_items("rows_contradict").await;
    let good = upsert(2, json!([7, "seven", 7, "7.00"]));
    let cases: Vec<(&str, Json, &str)> = vec![
        ("missing value", upsert(2, json!([8, "eight", 8])), "expected 4 values"),
        ("extra value", upsert(2, json!([8, "eight", 8, null, true])), "expected 4 values"),
        ("wrong type", upsert(2, json!([8, 8, 8, null])), "column \"name\""),
        ("abc in numeric", upsert(2, json!([8, null, 8, "abc"])), "column \"price\""),
        ("null key", upsert(2, json!([null, null, 8, null])), "column \"id\""),
        ("null in not-null column", upsert(2, json!([8, null, null, null])), "column \"qty\""),
        ("out-of-range smallint", upsert(2, json!([8, null, 40000, null])), "out of range"),
        ("too long text", upsert(2, json!([8, "x".repeat(21), 1, null])), "exceeds"),
        ("duplicate key", upsert(2, json!([7, "again", 7, null])), "appears twice"),
        ("null key in delete", delete(2, json!([null])), "column \"id\""),
        ("short delete key", delete(2, json!([])), "key of 1 values"),
        ("version past cursor", upsert(3, json!([8, null, 8, null])), "past the batch's cursor"),
    ];
    let before = rig.dump("items").await;
    for (what, bad, expected) in cases {
        let a = rig.call("rows", &batch(&items(), Some(changes(1)), changes(2), json!([good.clone(), bad]))).await;
        assert_eq!((a.status, a.kind()), (400, "bad_request"), "{what}: {}", a.body);
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expected) && msg.contains("row 1"), "{what}: {msg}");
        assert_eq!(a.body["error"]["table"], "items", "{what}");
        assert_eq!(rig.dump("items").await, before, "{what}: rows were written");
        assert_eq!(rig.cursor("items").await, Some(changes(1)), "{what}: cursor moved");
    }
    // NaN is a legal numeric value.
    let a = rig
        .call("rows", &batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([8, null, 8, "NaN"]))])))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn values_postgres_rejects_roll_back_the_whole_batch() {
    let rig = rig_with_items("rows_unprocessable").await;
    let before = rig.dump("items").await;
    // numeric(5,2) holds at most 999.99.
    let b = batch(
        &items(),
        Some(changes(1)),
        changes(2),
        json!([
            delete(2, json!([1])),
            upsert(2, json!([8, "fine", 1, null])),
            upsert(2, json!([9, "big", 1, "12345.67"]))
        ]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, a.kind()), (422, "unprocessable"), "{}", a.body);
    assert_eq!(a.body["error"]["table"], "items");
    assert_eq!(a.body["error"]["retryable"], false);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("overflow"), "{}", a.body);
    assert_eq!(rig.dump("items").await, before);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));

    rig.client()
        .await
        .batch_execute("ALTER TABLE mirror_acme.items ADD CONSTRAINT qty_positive CHECK (qty > 0)")
        .await
        .unwrap();
    let b = batch(
        &items(),
        Some(changes(1)),
        changes(2),
        json!([upsert(2, json!([8, "fine", 1, null])), upsert(2, json!([9, "negative", -1, null]))]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, a.kind()), (422, "unprocessable"), "{}", a.body);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("qty_positive"), "{}", a.body);
    assert_eq!(rig.dump("items").await, before);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
}

#[tokio::test]
async fn hostile_names_create_and_fill_correctly() {
    let rig = Rig::start("hostile").await;
    let table = TableSchema {
        name: "Order Lines \"2024\"; drop".into(),
        columns: vec![
            col("select", ColumnType::Int32, false),
            col("Mixed Case", ColumnType::Text { max_length: None }, false),
            col("\"; drop table x; --", ColumnType::Text { max_length: None }, true),
            col("with space", ColumnType::Bool, true),
        ],
        primary_key: vec!["select".into(), "Mixed Case".into()],
    };
    let answer = rig.schema(std::slice::from_ref(&table)).await;
    assert_eq!(answer.tables[0].status, TableStatus::Created);
    let b = batch(
        &table,
        None,
        changes(1),
        json!([upsert(1, json!([1, "A", "'); drop", true])), upsert(1, json!([1, "a", null, false]))]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["counts"]["inserted"], 2);
    let b = batch(
        &table,
        Some(changes(1)),
        changes(2),
        json!([delete(2, json!([1, "a"])), upsert(2, json!([1, "A", "x", null]))]),
    );
    let a = rig.call("rows", &b).await;
    assert_eq!(a.body["counts"], json!({"inserted": 0, "updated": 1, "deleted": 1}), "{}", a.body);
    assert_eq!(rig.mirror_tables().await, vec![table.name.clone()]);
    let cols: Vec<String> = rig
        .client()
        .await
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'mirror_acme' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, table.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>());
    assert_eq!(
        rig.dump(&table.name).await,
        vec![r#"{"select": 1, "Mixed Case": "A", "with space": null, "\"; drop table x; --": "x"}"#.to_string()]
    );
}

#[tokio::test]
async fn table_of_only_key_columns_upserts_idempotently() {
    let rig = Rig::start("keys_only").await;
    let table = TableSchema {
        name: "links".into(),
        columns: vec![col("a", ColumnType::Int64, false), col("b", ColumnType::Uuid, false)],
        primary_key: vec!["a".into(), "b".into()],
    };
    rig.schema(std::slice::from_ref(&table)).await;
    let u = "123e4567-e89b-12d3-a456-426614174000";
    let a = rig.call("rows", &batch(&table, None, changes(1), json!([upsert(1, json!([1, u]))]))).await;
    assert_eq!(a.body["counts"], json!({"inserted": 1, "updated": 0, "deleted": 0}), "{}", a.body);
    let a = rig.call("rows", &batch(&table, Some(changes(1)), changes(2), json!([upsert(2, json!([1, u]))]))).await;
    assert_eq!(a.body["counts"], json!({"inserted": 0, "updated": 1, "deleted": 0}), "{}", a.body);
    assert_eq!(rig.dump("links").await.len(), 1);
}

#[tokio::test]
async fn full_load_batches_go_in_by_copy_and_a_repeated_key_still_applies() {
    let rig = Rig::start("copy_load").await;
    rig.schema(&[items()]).await;
    let snap = |k: i64| Cursor::Snapshot { version: Version(5), after_key: Some(Key(vec![Value::Int(k)])) };
    let odd = "t\tn\nb\\s\r\\N";
    let b = batch(&items(), None, snap(2), json!([upsert(5, json!([1, odd, 1, "1.5"])), upsert(5, json!([2, null, 2, null]))]));
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, &a.body["counts"]), (200, &json!({"inserted": 2, "updated": 0, "deleted": 0})), "{}", a.body);
    let name: String = rig.client().await.query_one("SELECT name FROM mirror_acme.items WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(name, odd, "COPY escaping keeps every character");
    // A batch repeating a key the table holds (a scan that went back) is
    // applied as upserts instead of failing.
    let b = batch(&items(), Some(snap(2)), snap(3), json!([upsert(5, json!([2, "two", 2, null])), upsert(5, json!([3, null, 3, null]))]));
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, &a.body["counts"]), (200, &json!({"inserted": 1, "updated": 1, "deleted": 0})), "{}", a.body);
    // A value too large for its column is refused by COPY as by an insert,
    // and its row named.
    let b = batch(&items(), Some(snap(3)), snap(4), json!([upsert(5, json!([4, null, 4, "1234.5"]))]));
    let a = rig.call("rows", &b).await;
    assert_eq!((a.status, a.kind()), (422, "unprocessable"), "{}", a.body);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("key [4]"), "{}", a.body);
    assert_eq!(rig.dump("items").await.len(), 3);
}

// ---------------------------------------------------------------- reload

#[tokio::test]
async fn reload_keeps_the_live_table_until_the_new_load_completes() {
    let rig = rig_with_items("reload").await;
    let body = json!({"table": "items", "reason": "operator", "source_identity": "src-2"});
    let a = rig.call("reload", &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, json!({"table": "items"}));
    assert_eq!(rig.cursor("items").await, None);
    assert_eq!(rig.dump("items").await.len(), 2, "the live table is untouched");
    let snap = Cursor::Snapshot { version: Version(4), after_key: Some(Key(vec![Value::Int(1)])) };
    let a = rig.call("rows", &batch(&items(), None, snap.clone(), json!([upsert(4, json!([1, null, 1, null]))]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(rig.dump("items").await.len(), 2, "the shadow fills, not the live table");
    let a = rig.call("rows", &batch(&items(), Some(snap), changes(4), json!([]))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(rig.dump("items").await, vec![r#"{"id": 1, "qty": 1, "name": null, "price": null}"#.to_string()]);
    let identity: String = rig.client().await.query_one("SELECT source_identity FROM ctmirror.tables", &[]).await.unwrap().get(0);
    assert_eq!(identity, "src-2");
}

#[tokio::test]
async fn garbage_reload_requests_are_refused() {
    let rig = rig_with_items("reload_bad").await;
    let a = rig.call("reload", &json!({"table": "ghost", "reason": "r", "source_identity": "s"})).await;
    assert_eq!((a.status, a.kind()), (409, "unknown_table"), "{}", a.body);
    for bad in [
        json!({"table": "items"}),
        json!({"table": "items", "reason": "r", "source_identity": "s", "wipe": true}),
        json!({"table": "items", "reason": "r".repeat(3000), "source_identity": "s"}),
        json!({"table": 5, "reason": "r", "source_identity": "s"}),
    ] {
        let a = rig.call("reload", &bad).await;
        assert_eq!((a.status, a.kind()), (400, "bad_request"), "{bad}: {}", a.body);
    }
    assert_eq!(rig.cursor("items").await, Some(changes(1)), "nothing was touched");
}

// ---------------------------------------------------------------- completed

async fn listen(url: &str, channel: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", quote_ident(channel))).await.unwrap();
    (client, rx)
}

#[tokio::test]
async fn completed_records_the_report_runs_analyze_and_notifies() {
    let rig = Rig::start_with("completed", |c| c.hooks.notify_channel = Some("mirror_done".into())).await;
    rig.schema(&[items(), all_types()]).await;
    rig.call("rows", &batch(&items(), None, changes(1), json!([upsert(1, json!([1, null, 1, null]))]))).await;
    let (_listener, mut notes) = listen(&rig.db.url, "mirror_done").await;
    let report = json!({"tables": [
        {"name": "items", "mode": "full", "counts": {"inserted": 1, "updated": 0, "deleted": 0}},
        {"name": "all_types", "mode": "idle", "counts": {"inserted": 0, "updated": 0, "deleted": 0}},
    ]});
    let a = rig.call("completed", &report).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let hooks: Vec<String> = serde_json::from_value(a.body["hooks"].clone()).unwrap();
    assert_eq!(hooks, vec!["analyze \"items\": ok".to_string(), "notify mirror_done: ok".to_string()]);

    let client = rig.client().await;
    let stored: String = client
        .query_one("SELECT report::text FROM ctmirror.completions WHERE tenant = 'acme'", &[])
        .await
        .unwrap()
        .get(0);
    let stored: Json = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["tables"][0]["name"], "items");
    let analyzed: Vec<String> = client
        // reltuples is -1 until a table is first analyzed (or vacuumed).
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'mirror_acme' AND c.relkind = 'r' AND c.reltuples >= 0",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(analyzed, vec!["items".to_string()], "only changed tables are analyzed");

    // Once analyzed, a small incremental change is left to autovacuum; a
    // change past autovacuum's threshold (50 + a tenth of the rows) is
    // analyzed again.
    let small = json!({"tables": [{"name": "items", "mode": "incremental", "counts": {"inserted": 0, "updated": 0, "deleted": 0}}]});
    assert_eq!(rig.call("completed", &small).await.ok::<Json>()["hooks"], json!(["notify mirror_done: ok"]));
    client.batch_execute("UPDATE pg_catalog.pg_class SET reltuples = 1000 WHERE oid = 'mirror_acme.items'::regclass").await.unwrap();
    let some = json!({"tables": [{"name": "items", "mode": "incremental", "counts": {"inserted": 5, "updated": 10, "deleted": 0}}]});
    assert_eq!(rig.call("completed", &some).await.ok::<Json>()["hooks"], json!(["notify mirror_done: ok"]));
    let at = json!({"tables": [{"name": "items", "mode": "incremental", "counts": {"inserted": 100, "updated": 40, "deleted": 10}}]});
    assert_eq!(rig.call("completed", &at).await.ok::<Json>()["hooks"], json!(["notify mirror_done: ok"]));
    let tenth = json!({"tables": [{"name": "items", "mode": "incremental", "counts": {"inserted": 100, "updated": 40, "deleted": 11}}]});
    assert_eq!(rig.call("completed", &tenth).await.ok::<Json>()["hooks"], json!(["analyze \"items\": ok", "notify mirror_done: ok"]));

    let payload =
        tokio::time::timeout(std::time::Duration::from_secs(10), notes.recv()).await.expect("notification").unwrap();
    let payload: Json = serde_json::from_str(&payload).unwrap();
    assert_eq!(payload["tenant"], "acme");
    assert_eq!(payload["inserted"], 1);
    assert_eq!(payload["changed"], json!(["items"]));
}

#[tokio::test]
async fn sql_hooks_run_in_the_tenant_schema_and_failures_are_reported() {
    let rig = Rig::start_with("sql_hooks", |c| {
        c.hooks.sql =
            vec!["CREATE INDEX IF NOT EXISTS items_name ON items (name)".into(), "SELECT no_such_function()".into()]
    })
    .await;
    rig.schema(&[items()]).await;
    let a = rig.call("completed", &json!({"tables": []})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let hooks: Vec<String> = serde_json::from_value(a.body["hooks"].clone()).unwrap();
    assert_eq!(hooks.len(), 2);
    assert_eq!(hooks[0], "sql hook 1: ok");
    assert!(hooks[1].starts_with("sql hook 2: failed") && hooks[1].contains("no_such_function"), "{}", hooks[1]);
    let n: i64 = rig
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_indexes WHERE schemaname = 'mirror_acme' AND indexname = 'items_name'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

// ---------------------------------------------------------------- start-up

#[tokio::test]
async fn receivers_starting_together_migrate_once() {
    let db = support::TestDb::create("migrate_race").await;
    let start = || ReceiverService::with_keys(config(&db.url), Keypair::generate(), Keypair::generate().public());
    let (a, b, c) = tokio::join!(start(), start(), start());
    assert!(a.is_ok() && b.is_ok() && c.is_ok());
    let n: i64 = db.client().await.query_one("SELECT count(*) FROM ctmirror.migrations", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "each migration recorded once");
}

#[tokio::test]
async fn unreachable_database_fails_start_as_unavailable() {
    let cfg = config("postgres://postgres@127.0.0.1:1/none");
    let err = ReceiverService::with_keys(cfg, Keypair::generate(), Keypair::generate().public()).await.err().unwrap();
    assert_eq!(err.kind, ctmirror::receiver::ErrorKind::Unavailable, "{err}");
    assert!(err.retryable());
}

// ------------------------------------------------------- COPY batches

use ctmirror::protocol::copy::{CopyBatch, CopyBatchHeader, CopyFormat, CONTENT_TYPE as COPY_TYPE};

impl Rig {
    /// A correctly signed COPY batch, as the agent sends it.
    async fn copy(&self, header: CopyBatchHeader, payload: &[u8]) -> Answer {
        let body = CopyBatch { header, payload: payload.to_vec().into() }.encode();
        self.copy_body(body).await
    }

    async fn copy_body(&self, body: Vec<u8>) -> Answer {
        let path = self.path("rows");
        let (_, auth) = self.signer.authorize("POST", &path, &body);
        self.send(&path, Some(COPY_TYPE), Some(auth), body).await
    }
}

fn copy_header(from: Option<Cursor>, to: Cursor, format: CopyFormat, rows: u64) -> CopyBatchHeader {
    CopyBatchHeader { table: "items".into(), schema_hash: items().hash(), from, to, format, rows }
}

/// One binary COPY tuple of `items` in the rows layout (id, name, qty, price=NULL).
fn binary_item(id: i64, name: &str, qty: i16) -> Vec<u8> {
    let mut t = 4i16.to_be_bytes().to_vec();
    t.extend_from_slice(&8i32.to_be_bytes());
    t.extend_from_slice(&id.to_be_bytes());
    t.extend_from_slice(&(name.len() as i32).to_be_bytes());
    t.extend_from_slice(name.as_bytes());
    t.extend_from_slice(&2i32.to_be_bytes());
    t.extend_from_slice(&qty.to_be_bytes());
    t.extend_from_slice(&(-1i32).to_be_bytes());
    t
}

#[tokio::test]
async fn copy_batches_load_binary_rows_and_apply_text_changes() {
    let rig = Rig::start("copy_apply").await;
    rig.schema(&[items()]).await;
    let snap = |id: i64| Cursor::Snapshot { version: Version(5), after_key: Some(Key(vec![Value::Int(id)])) };
    let rows = [binary_item(1, "one", 1), binary_item(2, "two", 2)].concat();
    let a = rig.copy(copy_header(None, snap(2), CopyFormat::Binary, 2), &rows).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["counts"], json!({"inserted": 2, "updated": 0, "deleted": 0}));
    let a = rig.copy(copy_header(Some(snap(2)), changes(5), CopyFormat::Binary, 0), b"").await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Changes as text: version, deleted, then the columns.
    let text = "6\tf\t2\ttwo again\t5\t9.99\n6\tf\t3\tthree\t3\t\\N\n7\tt\t1\t\\N\t\\N\t\\N\n7\tt\t42\t\\N\t\\N\t\\N\n";
    let a = rig.copy(copy_header(Some(changes(5)), changes(7), CopyFormat::Text, 4), text.as_bytes()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["counts"], json!({"inserted": 1, "updated": 1, "deleted": 1}));
    assert_eq!(
        rig.dump("items").await,
        vec![
            r#"{"id": 2, "qty": 5, "name": "two again", "price": 9.99}"#.to_string(),
            r#"{"id": 3, "qty": 3, "name": "three", "price": null}"#.to_string(),
        ]
    );
    // A re-send is acknowledged without writing.
    let a = rig.copy(copy_header(Some(changes(5)), changes(7), CopyFormat::Text, 4), text.as_bytes()).await;
    assert_eq!((a.status, a.body["applied"].clone()), (200, json!(false)), "{}", a.body);
}

#[tokio::test]
async fn garbage_copy_batches_are_refused_and_nothing_is_written() {
    let rig = rig_with_items("copy_garbage").await;
    let before = rig.dump("items").await;
    let text = |rows: u64, data: &str| (copy_header(Some(changes(1)), changes(3), CopyFormat::Text, rows), data.as_bytes().to_vec());
    let binary = |rows: u64, data: Vec<u8>| (copy_header(Some(changes(1)), changes(3), CopyFormat::Binary, rows), data);
    type Case = ((CopyBatchHeader, Vec<u8>), u16, &'static str);
    let cases: Vec<Case> = vec![
        // Framing the receiver's COPY refuses.
        (text(1, "2\tf\t9\tx\t1\n"), 422, "missing data"),
        (text(1, "2\tf\t9\tx\t1\t\\N\textra\n"), 422, "extra data"),
        (text(1, "two\tf\t9\tx\t1\t\\N\n"), 422, "invalid input syntax for type bigint"),
        (text(1, "2\tf\t9\tx\t99999\t\\N\n"), 422, "out of range"),
        (text(1, "2\tf\t9\t\\N\t\\N\t\\N\n"), 422, "null value in column \"qty\""),
        (text(1, "2\tf\t9\tthis name is far too long for it\t1\t\\N\n"), 422, "too long"),
        (text(1, "2\tf\t9\tx\t1\t\\N\n\\.\n2\tf\t10\tx\t1\t\\N\n"), 400, "end-of-data"),
        (text(3, "2\tf\t9\tx\t1\t\\N\n"), 400, "announces 3 rows but its data holds 1"),
        (text(1, "2\tf\t9\t\\xff\t1\t\\N\n"), 422, "invalid byte sequence"),
        (binary(1, vec![0, 6, 1, 2, 3]), 422, ""),
        (binary(1, vec![0xff, 0xff]), 422, "EOF marker"),
        (binary(1, [binary_item(9, "x", 1), vec![0xff, 0xff]].concat()), 422, ""),
        // Contradictions only the receiver sees.
        (text(1, "4\tf\t9\tx\t1\t\\N\n"), 400, "past the batch's cursor"),
        (text(1, "\\N\tf\t9\tx\t1\t\\N\n"), 400, "no version"),
        (text(1, "2\tt\t\\N\t\\N\t\\N\t\\N\n"), 400, "NULL"),
        (text(2, "2\tt\t9\t\\N\t\\N\t\\N\n2\tf\t9\tx\t1\t\\N\n"), 400, "both deleted and upserted"),
        (text(2, "2\tf\t9\tx\t1\t\\N\n2\tf\t9\ty\t1\t\\N\n"), 422, "second time"),
        // Header contradictions.
        ((CopyBatchHeader { schema_hash: "other".into(), ..text(1, "").0 }, b"2\tf\t9\tx\t1\t\\N\n".to_vec()), 409, "schema"),
        ((CopyBatchHeader { table: "nope".into(), ..text(1, "").0 }, b"2\tf\t9\tx\t1\t\\N\n".to_vec()), 409, "not in the mirror"),
        ((CopyBatchHeader { from: Some(changes(0)), ..text(1, "").0 }, b"2\tf\t9\tx\t1\t\\N\n".to_vec()), 409, "starts at"),
    ];
    for ((header, payload), status, expected) in cases {
        let shown = String::from_utf8_lossy(&payload).into_owned();
        let a = rig.copy(header, &payload).await;
        assert_eq!(a.status, status, "{shown:?}: {}", a.body);
        assert!(a.body["error"]["message"].as_str().unwrap().contains(expected), "{shown:?}: {}", a.body);
        assert_eq!(rig.dump("items").await, before, "{shown:?}");
        assert_eq!(rig.cursor("items").await, Some(changes(1)), "{shown:?}");
    }
    // Bodies that are not COPY batches at all.
    for body in [vec![], vec![0, 0, 0], vec![0, 0, 0, 50, b'{'], vec![0, 0, 0, 2, b'{', b'}'], b"{\"table\":\"items\"}".to_vec()] {
        let a = rig.copy_body(body.clone()).await;
        assert_eq!((a.status, a.kind()), (400, "bad_request"), "{body:?}: {}", a.body);
    }
    // The COPY type is for RowData only.
    let path = rig.path("schema");
    let (_, auth) = rig.signer.authorize("POST", &path, b"{}");
    assert_eq!(rig.send(&path, Some(COPY_TYPE), Some(auth), b"{}".to_vec()).await.status, 415);
    assert_eq!(rig.dump("items").await, before);
}

#[tokio::test]
async fn a_refused_copy_row_is_named_by_its_key() {
    let rig = rig_with_items("copy_locate").await;
    rig.client()
        .await
        .batch_execute("ALTER TABLE mirror_acme.items ADD CONSTRAINT qty_positive CHECK (qty > 0)")
        .await
        .unwrap();
    let text = "2\tf\t8\tfine\t1\t\\N\n2\tf\t9\tnegative\t-1\t\\N\n";
    let a = rig.copy(copy_header(Some(changes(1)), changes(3), CopyFormat::Text, 2), text.as_bytes()).await;
    assert_eq!((a.status, a.kind()), (422, "unprocessable"), "{}", a.body);
    assert_eq!(a.body["error"]["key"], json!([9]), "{}", a.body);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("qty_positive"), "{}", a.body);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
}

// ------------------------------------------------------------- Advance

#[tokio::test]
async fn advance_moves_idle_cursors_in_one_call_and_refuses_per_table() {
    let rig = rig_with_items("advance").await;
    let mut other = items();
    other.name = "others".into();
    rig.schema(&[items(), other.clone()]).await;
    let b = batch(&other, None, changes(1), json!([]));
    assert_eq!(rig.call("rows", &b).await.status, 200);
    let mv = |table: &TableSchema, from: Cursor, to: Cursor| {
        json!({"table": table.name, "schema_hash": table.hash(), "from": from, "to": to})
    };
    let a = rig.call("advance", &json!({"tables": [mv(&items(), changes(1), changes(9)), mv(&other, changes(1), changes(9))]})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["tables"][0]["applied"], true);
    assert_eq!(a.body["tables"][1]["applied"], true);
    assert_eq!(rig.cursor("items").await, Some(changes(9)));
    assert_eq!(rig.cursor("others").await, Some(changes(9)));
    // Re-sent: acknowledged, nothing moves.
    let a = rig.call("advance", &json!({"tables": [mv(&items(), changes(1), changes(9))]})).await;
    assert_eq!((a.status, a.body["tables"][0]["applied"].clone()), (200, json!(false)), "{}", a.body);
    // A table named twice is refused whole.
    let twice = json!({"tables": [mv(&items(), changes(9), changes(12)), mv(&items(), changes(9), changes(13))]});
    let a = rig.call("advance", &twice).await;
    assert_eq!((a.status, a.kind()), (400, "bad_request"), "a table twice: {}", a.body);
    // One refused table does not hold the others back.
    let a = rig
        .call(
            "advance",
            &json!({"tables": [
                mv(&items(), changes(3), changes(12)),
                mv(&other, changes(9), changes(12)),
                mv(&TableSchema { name: "ghost".into(), ..items() }, changes(1), changes(12)),
            ]}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let kinds: Vec<&str> = (0..3).map(|i| a.body["tables"][i]["error"]["kind"].as_str().unwrap_or("-")).collect();
    assert_eq!(kinds, ["conflict", "-", "unknown_table"], "{}", a.body);
    assert_eq!(a.body["tables"][0]["cursor"], serde_json::to_value(changes(9)).unwrap());
    assert_eq!(a.body["tables"][1]["applied"], true);
    assert_eq!(rig.cursor("others").await, Some(changes(12)));
    let wrong_hash = json!({"table": "items", "schema_hash": "nope", "from": changes(9), "to": changes(12)});
    let a = rig.call("advance", &json!({"tables": [wrong_hash]})).await;
    assert_eq!(a.body["tables"][0]["error"]["kind"], "schema_mismatch", "{}", a.body);
    let snap = Cursor::Snapshot { version: Version(9), after_key: None };
    let keyed = Cursor::Changes { version: Version(12), after_key: Some(Key(vec![Value::Int(1)])) };
    for bad in [
        json!({"tables": [mv(&items(), snap.clone(), changes(12))]}),
        json!({"tables": [mv(&items(), changes(9), snap)]}),
        json!({"tables": [mv(&items(), changes(9), changes(8))]}),
        json!({"tables": [mv(&items(), changes(9), keyed)]}),
    ] {
        let a = rig.call("advance", &bad).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["tables"][0]["applied"], false, "{bad}: {}", a.body);
        assert_eq!(a.body["tables"][0]["error"]["kind"], "bad_request", "{bad}: {}", a.body);
    }
    for garbage in [json!({}), json!({"tables": 1}), json!({"tables": [{"table": "items"}]}), json!({"tables": [], "x": 1})] {
        let a = rig.call("advance", &garbage).await;
        assert_eq!((a.status, a.kind()), (400, "bad_request"), "{garbage}: {}", a.body);
    }
    assert_eq!(rig.cursor("items").await, Some(changes(9)));
    assert_eq!(rig.cursor("others").await, Some(changes(12)));
}

// ------------------------------------------- guards: replay, limits, answers

/// A signed rows call whose exact request can be sent again.
fn signed_rows(rig: &Rig, b: &Json) -> (String, Claims, String, Vec<u8>) {
    let path = rig.path("rows");
    let bytes = serde_json::to_vec(b).unwrap();
    let (claims, header) = rig.signer.authorize("POST", &path, &bytes);
    (path, claims, header, bytes)
}

#[tokio::test]
async fn a_replayed_request_is_refused_and_writes_nothing() {
    let rig = rig_with_items("guard_replay").await;
    let b = batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "three", 3, null]))]));
    let (path, _, header, bytes) = signed_rows(&rig, &b);
    let first = rig.send(&path, Some("application/json"), Some(header.clone()), bytes.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    // Undo the write behind the receiver's back: the replay must not redo it.
    rig.client().await.batch_execute("DELETE FROM mirror_acme.items WHERE id = 3").await.unwrap();
    let again = rig.send(&path, Some("application/json"), Some(header), bytes).await;
    assert_eq!(again.status, 401, "{}", again.body);
    assert_eq!(again.kind(), "unauthorized");
    assert!(again.body["error"]["message"].as_str().unwrap().contains("nonce was already used"), "{}", again.body);
    assert!(again.headers.get("ctmirror-signature").is_none(), "refusals before authentication are unsigned");
    assert_eq!(rig.dump("items").await.len(), 2, "the replay wrote nothing");
}

#[tokio::test]
async fn every_authenticated_answer_is_signed_over_nonce_status_and_body() {
    let rig = rig_with_items("guard_signed").await;
    let keys = [rig.partner_public];
    let now = auth::now_unix();
    let ok = batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "three", 3, null]))]));
    let conflict = batch(&items(), Some(changes(7)), changes(8), json!([]));
    for (b, status) in [(ok, 200), (conflict, 409)] {
        let (path, claims, header, bytes) = signed_rows(&rig, &b);
        let resp = rig.http.post(format!("{}{path}", rig.base)).header("content-type", "application/json")
            .header("authorization", header).body(bytes).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let sig = resp.headers().get("ctmirror-signature").map(|v| v.to_str().unwrap().to_owned());
        let body = resp.bytes().await.unwrap();
        auth::check_answer(sig.as_deref(), &keys, &claims, status, &body, 300, now).expect("answer verifies");
        let mut tampered = body.to_vec();
        tampered[1] ^= 1;
        assert!(auth::check_answer(sig.as_deref(), &keys, &claims, status, &tampered, 300, now).is_err());
    }
}

#[tokio::test]
async fn a_tenant_outside_the_allow_list_is_forbidden_and_nothing_is_written() {
    let rig = Rig::start_with("guard_allow", |c| c.tenants = Some(vec![TenantId::new("globex").unwrap()])).await;
    let a = rig.call("schema", &json!({"source_identity": "s", "tables": [items()]})).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.kind(), "forbidden");
    assert!(a.body["error"]["message"].as_str().unwrap().contains("tenant acme is not served by this receiver"));
    rig.assert_nothing_written().await;
    let served = Rig::start_with("guard_allow_ok", |c| c.tenants = Some(vec![TenantId::new(TENANT).unwrap()])).await;
    served.schema(&[items()]).await;
}

#[tokio::test]
async fn batches_beyond_the_row_or_byte_limit_are_413_and_nothing_is_written() {
    let rig = Rig::start_with("guard_batch", |c| {
        c.limits.max_batch_rows = 2;
        c.limits.max_batch_bytes = 1024;
    })
    .await;
    rig.schema(&[items()]).await;
    let three = batch(&items(), None, changes(1), json!([
        upsert(1, json!([1, "a", 1, null])), upsert(1, json!([2, "b", 1, null])), upsert(1, json!([3, "c", 1, null]))
    ]));
    let a = rig.call("rows", &three).await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("limit of 2 rows per batch"), "{}", a.body);
    let padded = json!({"table": "items", "schema_hash": items().hash(), "from": null, "to": changes(1),
        "rows": [upsert(1, json!([1, "é".repeat(20), 1, "1.00"])), upsert(1, json!([2, "x".repeat(20), 1, "1".to_owned() + &"0".repeat(900)]))]});
    let a = rig.call("rows", &padded).await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("bytes per batch"), "{}", a.body);
    assert!(rig.dump("items").await.is_empty());
    assert_eq!(rig.cursor("items").await, None);
}

#[tokio::test]
async fn a_tenant_beyond_its_concurrent_requests_gets_429_with_retry_after() {
    let rig = rig_with_items("guard_busy").await;
    // Hold the table's bookkeeping row so that one batch stays in flight.
    let mut holder = rig.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM ctmirror.tables WHERE table_name = 'items' FOR UPDATE", &[]).await.unwrap();
    let stuck = batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "three", 3, null]))]));
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let (path, _, header, bytes) = signed_rows(&rig, &stuck);
        let req = rig.http.post(format!("{}{path}", rig.base)).header("content-type", "application/json")
            .header("authorization", header).body(bytes);
        in_flight.push(tokio::spawn(req.send()));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let a = rig.call("rows", &stuck).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.kind(), "too_many_requests");
    assert_eq!(a.headers.get("retry-after").unwrap(), "1");
    assert_eq!(a.body["error"]["retryable"], true);
    tx.rollback().await.unwrap();
    let mut statuses = Vec::new();
    for h in in_flight {
        statuses.push(h.await.unwrap().unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![200; 4], "one applies, the others find it already applied");
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_is_408() {
    let rig = Rig::start_with("guard_slow", |c| c.limits.body_timeout_secs = 1).await;
    let path = rig.path("schema");
    let bytes = serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()]})).unwrap();
    let (_, header) = rig.signer.authorize("POST", &path, &bytes);
    let (head, tail) = bytes.split_at(10);
    let (head, tail) = (head.to_vec(), tail.to_vec());
    let slow = futures_util::stream::iter([head, tail]).then(|chunk| async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let resp = rig.http.post(format!("{}{path}", rig.base)).header("content-type", "application/json")
        .header("authorization", header).body(reqwest::Body::wrap_stream(slow)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 408);
    let body: Json = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("did not arrive within 1 seconds"), "{body}");
    rig.assert_nothing_written().await;
}

#[tokio::test]
async fn database_work_past_the_request_limit_is_rolled_back_as_503() {
    let rig = Rig::start_with("guard_timeout", |c| c.limits.request_timeout_secs = 1).await;
    rig.schema(&[items()]).await;
    let first = batch(&items(), None, changes(1), json!([upsert(1, json!([1, "one", 1, null]))]));
    assert_eq!(rig.call("rows", &first).await.status, 200);
    let mut holder = rig.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("LOCK TABLE mirror_acme.items IN ACCESS EXCLUSIVE MODE", &[]).await.unwrap();
    let b = batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "three", 3, null]))]));
    let a = rig.call("rows", &b).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["error"]["retryable"], true);
    assert!(a.body["error"]["message"].as_str().unwrap().contains("statement timeout"), "{}", a.body);
    tx.rollback().await.unwrap();
    assert_eq!(rig.dump("items").await.len(), 1);
    assert_eq!(rig.cursor("items").await, Some(changes(1)));
}

#[tokio::test]
async fn the_next_agent_key_is_accepted_alongside_the_current_one() {
    let db = support::TestDb::create("guard_rotation").await;
    let current = Keypair::generate();
    let next = Keypair::generate();
    let partner = Keypair::generate();
    let svc = ReceiverService::with_key_set(config(&db.url), partner, vec![current.public(), next.public()])
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, svc.router()).into_future());
    let mut statuses = Vec::new();
    for key in [current, next, Keypair::generate()] {
        let signer = RequestSigner { key, tenant: TenantId::new(TENANT).unwrap(), app: AppId::new("crm").unwrap() };
        let path = format!("/v1/tenants/{TENANT}/authenticate");
        let body = br#"{"agent":"t"}"#.to_vec();
        let (_, header) = signer.authorize("POST", &path, &body);
        let resp = reqwest::Client::new().post(format!("{base}{path}")).header("content-type", "application/json")
            .header("authorization", header).body(body).send().await.unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 401], "current and next verify, a stranger does not");
}

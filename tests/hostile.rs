//! Hostile input against the receiver, over real HTTP, each group on its own
//! database.
//!
//! The security issue asks for at least 100 hostile requests, each checked
//! for its status code, its error and that nothing was written. Each group
//! below is a table of [`Case`]s built from the same small request plumbing
//! ([`Ctx`] signs arbitrary [`Claims`], [`Rig::send`] sends arbitrary bytes
//! with arbitrary headers). Every group starts from the same realistic
//! state ([`Rig::start`]: two tenants, mirror tables created by schema calls,
//! rows, cursors and a completion report), and "nothing was written" is a
//! comparison of that whole database ([`Rig::fingerprint`]) before and after
//! each request.
//!
//! Odd names that are legal (quotes, semicolons, case, `pg_catalog`) are not
//! refused; `odd_but_legal_identifiers_create_exactly_the_table_they_name`
//! checks that each creates its table and nothing outside the tenant's
//! mirror schema.
//!
//! A group does not stop at its first failing case: it runs them all and
//! fails with the list, so a change in the receiver shows everything it
//! broke at once.
//!
//! The cases in [`replay_cases`] are written against the replay-protection
//! contract (an accepted nonce cannot be used again; a nonce is 16 bytes of
//! base64url) that lands separately; until it does they fail, and they are
//! kept apart so they are easy to find.

mod support;

use ctmirror::auth::{self, Claims, Keypair, Role};
use ctmirror::config::ReceiverConfig;
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::copy::{CopyBatch, CopyBatchHeader, CopyFormat, CONTENT_TYPE as COPY_TYPE};
use ctmirror::protocol::{ColumnType, Cursor, Key, TableSchema, Value, Version};
use ctmirror::receiver::{quote_ident, ReceiverService};
use serde_json::{json, Value as Json};
use support::{col, items};
use std::collections::BTreeSet;
use std::future::IntoFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TENANT: &str = "acme";
/// A second tenant with its own mirror, so that a request that strays
/// across tenants would show up as a write.
const OTHER_TENANT: &str = "globex";
const APP: &str = "crm";
/// Small enough that oversized bodies are cheap to send, large enough for
/// a schema call of 1,601 columns.
const MAX_BODY: usize = 256 * 1024;

// ------------------------------------------------------------ requests

/// How a request travels: reqwest builds HTTP the way a client library
/// does (and normalizes paths); `Chunked` streams the body without a
/// declared length; `Tcp` writes the request line and headers exactly as
/// given, for paths and lengths no well-behaved client would send.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Reqwest,
    Chunked,
    Tcp,
}

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    via: Via,
}

impl Request {
    fn post(path: impl Into<String>, body: Vec<u8>) -> Request {
        Request { method: "POST".into(), path: path.into(), headers: Vec::new(), body, via: Via::Reqwest }
    }
    /// Adds a header; a name given twice is sent twice.
    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.headers.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }
    /// Drops every header of that name.
    fn without(mut self, name: &str) -> Request {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }
    /// Replaces the headers of that name by one with this value.
    fn replace(self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.without(name).header(name, value)
    }
    fn method(mut self, method: &str) -> Request {
        self.method = method.to_owned();
        self
    }
    fn path(mut self, path: impl Into<String>) -> Request {
        self.path = path.into();
        self
    }
    fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }
    fn via(mut self, via: Via) -> Request {
        self.via = via;
        self
    }
}

/// A receiver's answer: its status and JSON body (`Json::Null` and the raw
/// text when it is not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Json,
    raw: String,
}

impl Answer {
    fn kind(&self) -> &str {
        self.body["error"]["kind"].as_str().unwrap_or("<no error kind>")
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

fn path(tenant: &str, op: &str) -> String {
    format!("/v1/tenants/{tenant}/{op}")
}

/// The keys of one run and the signing of arbitrary claims with them.
struct Ctx {
    agent: Keypair,
    partner: Keypair,
    /// A key nobody registered.
    stranger: Keypair,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx { agent: Keypair::generate(), partner: Keypair::generate(), stranger: Keypair::generate() }
    }

    /// The claims the agent would sign for `POST` of `body` to `op` of `tenant`.
    fn claims(&self, tenant: &str, op: &str, body: &[u8]) -> Claims {
        Claims {
            role: Role::Agent,
            tenant: TenantId::new(tenant).unwrap(),
            app: AppId::new(APP).unwrap(),
            ts: auth::now_unix(),
            nonce: auth::new_nonce(),
            method: "POST".into(),
            path: path(tenant, op),
            body_sha256: auth::body_digest(body),
            status: None,
        }
    }

    /// The `Authorization` value carrying `claims` signed by `key`.
    fn header(key: &Keypair, claims: &Claims) -> String {
        format!("CtMirror {}", key.sign(claims))
    }

    /// A correctly signed `POST` of raw bytes to `op` of `tenant` with
    /// content type `application/json`.
    fn signed_to(&self, tenant: &str, op: &str, body: Vec<u8>) -> Request {
        let auth = Ctx::header(&self.agent, &self.claims(tenant, op, &body));
        Request::post(path(tenant, op), body).header("content-type", "application/json").header("authorization", auth)
    }

    fn signed(&self, op: &str, body: Vec<u8>) -> Request {
        self.signed_to(TENANT, op, body)
    }

    fn json(&self, op: &str, body: &Json) -> Request {
        self.signed(op, serde_json::to_vec(body).unwrap())
    }

    /// `body` to `op` under a token made of `claims` (changed from the
    /// correct ones by `tweak`) and signed by `key`.
    fn with_claims(&self, op: &str, body: Vec<u8>, key: &Keypair, tweak: impl FnOnce(&mut Claims)) -> Request {
        let mut claims = self.claims(TENANT, op, &body);
        tweak(&mut claims);
        self.signed(op, body).replace("authorization", Ctx::header(key, &claims))
    }

    /// A correctly signed COPY batch body to RowData.
    fn copy(&self, body: Vec<u8>) -> Request {
        self.signed("rows", body).replace("content-type", COPY_TYPE)
    }

    /// A request of `op` that would write if the receiver accepted it, so a
    /// refusal that lets it through shows up in the fingerprint.
    fn writing(&self, op: &str) -> Request {
        self.json(op, &writing_body(op))
    }
}

/// For each operation a body the receiver would act on by writing (or, for
/// Authenticate, by answering with a signed token).
fn writing_body(op: &str) -> Json {
    match op {
        "authenticate" => json!({"agent": "ctmirror-hostile"}),
        "schema" => json!({"source_identity": "src-1", "tables": [items(), kinds(), intruder()]}),
        "rows" => batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([99, "intruder", 1, null]))])),
        "advance" => json!({"tables": [{"table": "items", "schema_hash": items().hash(), "from": changes(1), "to": changes(50)}]}),
        "reload" => json!({"table": "items", "reason": "hostile", "source_identity": "src-evil"}),
        "completed" => json!({"tables": [{"name": "items", "mode": "incremental", "counts": {"inserted": 1, "updated": 0, "deleted": 0}}]}),
        other => panic!("no operation {other}"),
    }
}

const OPS: [&str; 6] = ["authenticate", "schema", "rows", "advance", "reload", "completed"];

// ------------------------------------------------------------ tables


/// One nullable column of every type behind an int64 key, for values that
/// contradict their column's type.
fn kinds() -> TableSchema {
    use ColumnType as T;
    TableSchema {
        name: "kinds".into(),
        columns: vec![
            col("id", T::Int64, false),
            col("flag", T::Bool, true),
            col("small", T::Int16, true),
            col("medium", T::Int32, true),
            col("big", T::Int64, true),
            col("real4", T::Float32, true),
            col("real8", T::Float64, true),
            col("money", T::Decimal { precision: Some(5), scale: Some(2) }, true),
            col("short", T::Text { max_length: Some(5) }, true),
            col("code", T::FixedText { length: 3 }, true),
            col("blob", T::Bytes { max_length: Some(4) }, true),
            col("day", T::Date, true),
            col("at", T::Time { precision: Some(3) }, true),
            col("stamp", T::Timestamp { precision: None }, true),
            col("stamptz", T::TimestampTz { precision: None }, true),
            col("uid", T::Uuid, true),
            col("doc", T::Json, true),
        ],
        primary_key: vec!["id".into()],
    }
}

/// A table no schema call has created: the schema call that would create
/// it must not get through.
fn intruder() -> TableSchema {
    TableSchema { name: "intruder".into(), ..items() }
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

/// A full `kinds` row, id 50, NULL everywhere except `column`.
fn kinds_row(column: &str, value: Json) -> Json {
    let t = kinds();
    let mut values = vec![Json::Null; t.columns.len()];
    values[0] = json!(50);
    let at = t.columns.iter().position(|c| c.name == column).unwrap_or_else(|| panic!("no column {column}"));
    values[at] = value;
    Json::Array(values)
}

// ------------------------------------------------------------ the rig

/// A receiver on its own database and port, in the starting state.
struct Rig {
    db: support::TestDb,
    base: String,
    addr: std::net::SocketAddr,
    http: reqwest::Client,
}

impl Rig {
    /// Starts a receiver with `ctx`'s keys and brings it into the starting
    /// state through the protocol itself: tenant `acme` with `items` (ids 1
    /// and 2) and `kinds` (id 1), both at cursor changes@1, and one
    /// completion report; tenant `globex` with `items` (id 7) at changes@1.
    async fn start(label: &str, ctx: &Ctx) -> Rig {
        let db = support::TestDb::create(label).await;
        let cfg = ReceiverConfig {
            max_body_bytes: MAX_BODY,
            ..ReceiverConfig::new("127.0.0.1:0", db.url.as_str(), AppId::new(APP).unwrap(), "unused", "unused")
        };
        let svc = ReceiverService::with_keys(cfg, ctx.partner.clone(), ctx.agent.public()).await.expect("receiver starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, svc.router()).into_future());
        let rig = Rig { db, base: format!("http://{addr}"), addr, http: reqwest::Client::new() };

        let all_types_row = json!([1, true, 1, 1, 1, 1.5, 2.5, "1.25", "abc", "xyz", "AAEC", "2024-02-29",
            "12:30:00.5", "2024-01-01T10:00:00", "2024-01-01T10:00:00Z", "123e4567-e89b-12d3-a456-426614174000", "{\"a\":1}"]);
        let setup = [
            ctx.json("schema", &json!({"source_identity": "src-1", "tables": [items(), kinds()]})),
            ctx.json("rows", &batch(&items(), None, changes(1), json!([upsert(1, json!([1, "one", 1, "1.50"])), upsert(1, json!([2, "two", 2, null]))]))),
            ctx.json("rows", &batch(&kinds(), None, changes(1), json!([upsert(1, all_types_row)]))),
            ctx.json("completed", &writing_body("completed")),
            ctx.signed_to(OTHER_TENANT, "schema", serde_json::to_vec(&json!({"source_identity": "src-g", "tables": [items()]})).unwrap()),
            ctx.signed_to(
                OTHER_TENANT,
                "rows",
                serde_json::to_vec(&batch(&items(), None, changes(1), json!([upsert(1, json!([7, "globex", 7, null]))]))).unwrap(),
            ),
        ];
        for r in setup {
            let a = rig.send(&r).await;
            assert_eq!(a.status, 200, "setup {} {}: {}", r.method, r.path, a.raw);
        }
        rig
    }

    async fn send(&self, r: &Request) -> Answer {
        self.try_send(r).await.unwrap_or_else(|e| Answer { status: 0, body: Json::Null, raw: format!("no answer: {e}") })
    }

    async fn try_send(&self, r: &Request) -> Result<Answer, String> {
        if r.via == Via::Tcp {
            return self.send_tcp(r).await;
        }
        let method = reqwest::Method::from_bytes(r.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self.http.request(method, format!("{}{}", self.base, r.path));
        for (name, value) in &r.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            let value = reqwest::header::HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
            req = req.header(name, value);
        }
        req = match r.via {
            Via::Chunked => {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> = r.body.chunks(8192).map(|c| Ok(c.to_vec())).collect();
                req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
            }
            _ => req.body(r.body.clone()),
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let raw = resp.text().await.map_err(|e| e.to_string())?;
        Ok(Answer { status, body: serde_json::from_str(&raw).unwrap_or(Json::Null), raw })
    }

    /// Writes the request exactly as given: no path normalization, and only
    /// the headers the case names (no Content-Length unless it names one).
    async fn send_tcp(&self, r: &Request) -> Result<Answer, String> {
        let mut head = format!("{} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n", r.method, r.path, self.addr).into_bytes();
        for (name, value) in &r.headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
        stream.write_all(&head).await.map_err(|e| e.to_string())?;
        // The receiver may answer and close before taking the whole body
        // (a declared length past the limit); that is not an error here.
        let _ = stream.write_all(&r.body).await;
        let mut response = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut response)).await;
        if response.is_empty() {
            return Err(format!("no response ({read:?})"));
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("response without header end")?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
        Ok(Answer { status, body: serde_json::from_str(&body).unwrap_or(Json::Null), raw: body })
    }

    /// Everything a request could have written, one line per fact: every
    /// schema, relation and column outside PostgreSQL's own schemas, and
    /// every row of every table there (the mirror tables, their shadows and
    /// the receiver's bookkeeping in `ctmirror`), in a stable order.
    async fn fingerprint(&self) -> BTreeSet<String> {
        let client = self.db.client().await;
        let user_schemas = "n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'";
        // (fact, schema, relation, detail), quoted below in one way.
        let structure = format!(
            "SELECT 'schema', n.nspname::text, '', '' FROM pg_namespace n WHERE {user_schemas}
             UNION ALL
             SELECT 'relation', n.nspname::text, c.relname::text, 'kind ' || c.relkind::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user_schemas}
             UNION ALL
             SELECT 'column', n.nspname::text, c.relname::text,
                    format('%I %s not null %s', a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE {user_schemas} AND a.attnum > 0 AND NOT a.attisdropped"
        );
        let mut facts = BTreeSet::new();
        let mut tables = Vec::new();
        for row in client.query(&structure, &[]).await.unwrap() {
            let (fact, schema, relation, detail): (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
            let name = match fact.as_str() {
                "schema" => quote_ident(&schema),
                _ => format!("{}.{}", quote_ident(&schema), quote_ident(&relation)),
            };
            if fact == "relation" && (detail == "kind r" || detail == "kind p") {
                tables.push(name.clone());
            }
            facts.insert(format!("{fact} {name} {detail}"));
        }
        for name in tables {
            for row in client.query(&format!("SELECT to_jsonb(t)::text FROM {name} t"), &[]).await.unwrap() {
                facts.insert(format!("row {name} {}", row.get::<_, String>(0)));
            }
        }
        facts
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ------------------------------------------------------------ cases

/// What a hostile request must get.
#[derive(Debug, Clone)]
enum Expect {
    /// An error answer with this status, `kind` and a message containing
    /// one of the `|`-separated texts.
    Error { status: u16, kind: &'static str, text: String },
    /// A schema call answered 200 whose table `table` is `refused` with a
    /// message containing `text` (PostgreSQL refused it; nothing stays).
    TableRefused { table: String, text: String },
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    /// Requests sent first that must succeed (the original of a replay);
    /// the fingerprint is taken after them.
    prelude: Vec<Request>,
    request: Request,
    expect: Expect,
}

fn case(name: impl Into<String>, request: Request, status: u16, kind: &'static str, text: impl Into<String>) -> Case {
    Case { name: name.into(), prelude: Vec::new(), request, expect: Expect::Error { status, kind, text: text.into() } }
}

impl Case {
    fn after(mut self, prelude: Request) -> Case {
        self.prelude.push(prelude);
        self
    }
}

/// Runs every case against `rig` and fails with the list of the cases
/// that got another answer or wrote anything.
async fn run(rig: &Rig, cases: Vec<Case>) {
    let total = cases.len();
    let mut failed = Vec::new();
    'cases: for c in cases {
        for p in &c.prelude {
            let a = rig.send(p).await;
            if a.status != 200 {
                failed.push(format!("{}: prelude {} answered {}: {}", c.name, p.path, a.status, a.raw));
                continue 'cases;
            }
        }
        let before = rig.fingerprint().await;
        let a = rig.send(&c.request).await;
        let mut problems = Vec::new();
        problems.extend(judge(&c.expect, &a));
        let after = rig.fingerprint().await;
        if before != after {
            let gone: Vec<&String> = before.difference(&after).take(5).collect();
            let new: Vec<&String> = after.difference(&before).take(5).collect();
            problems.push(format!("the database changed; gone {gone:?}, new {new:?}"));
        }
        if !problems.is_empty() {
            failed.push(format!("{}: {}", c.name, problems.join("; AND ")));
        }
    }
    assert!(failed.is_empty(), "{} of {total} cases failed:\n{}", failed.len(), failed.join("\n"));
}

fn judge(expect: &Expect, a: &Answer) -> Option<String> {
    let shown = a.raw.chars().take(400).collect::<String>();
    match expect {
        Expect::Error { status, kind, text } => {
            if a.status != *status || a.kind() != *kind {
                return Some(format!("expected {status} {kind}, got {} {}: {shown}", a.status, a.kind()));
            }
            if !text.split('|').any(|t| a.message().contains(t)) {
                return Some(format!("message does not contain {text:?}: {shown}"));
            }
            if a.body["error"]["retryable"] != json!(false) {
                return Some(format!("a hostile request must not be retryable: {shown}"));
            }
            None
        }
        Expect::TableRefused { table, text } => {
            let state = a.body["tables"].as_array().and_then(|ts| ts.iter().find(|t| t["name"] == json!(table)));
            match state {
                Some(t) if a.status == 200 && t["status"] == "refused" && t["message"].as_str().unwrap_or("").contains(text.as_str()) => None,
                _ => Some(format!("expected 200 with table {table:?} refused ({text:?}), got {}: {shown}", a.status)),
            }
        }
    }
}

// ------------------------------------------------------------ tokens

/// Forged, garbled, stale and misdirected tokens: `401 unauthorized`
/// naming the failed check, whatever the request would have done.
fn token_cases(ctx: &Ctx) -> Vec<Case> {
    let op = "schema";
    let body = serde_json::to_vec(&writing_body(op)).unwrap();
    let good = ctx.signed(op, body.clone());
    let token = ctx.agent.sign(&ctx.claims(TENANT, op, &body));
    let (claims_part, sig) = token.split_once('.').unwrap();
    let with_auth = |value: &[u8]| good.clone().replace("authorization", value);
    let with_token = |t: &str| with_auth(format!("CtMirror {t}").as_bytes());
    let claims_with = |tweak: &dyn Fn(&mut Claims)| ctx.with_claims(op, body.clone(), &ctx.agent, tweak);
    let u = "unauthorized";
    let mut other_claims = ctx.claims(TENANT, op, &body);
    other_claims.tenant = TenantId::new(OTHER_TENANT).unwrap();
    let swapped_claims = format!("{}.{sig}", ctx.agent.sign(&other_claims).split_once('.').unwrap().0);
    let mut flipped = sig.as_bytes().to_vec();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };

    let mut cases = vec![
        case("no Authorization header", good.clone().without("authorization"), 401, u, "missing Authorization header"),
        case("empty Authorization header", with_auth(b""), 401, u, "missing Authorization header"),
        case("scheme without token", with_auth(b"CtMirror"), 401, u, "missing Authorization header"),
        case("scheme and a blank token", with_auth(b"CtMirror "), 401, u, "missing Authorization header"),
        case("Bearer scheme with a valid token", with_auth(format!("Bearer {token}").as_bytes()), 401, u, "missing Authorization header"),
        case("lower-case scheme", with_auth(format!("ctmirror {token}").as_bytes()), 401, u, "missing Authorization header"),
        case("scheme glued to the token", with_auth(format!("CtMirror{token}").as_bytes()), 401, u, "missing Authorization header"),
        case("token without a dot", with_token("not-a-token"), 401, u, "expected claims.signature"),
        case("claims only", with_token(claims_part), 401, u, "expected claims.signature"),
        case("dot only", with_token("."), 401, u, "signature is not 64 bytes"),
        case("signature cut by 10 characters", with_token(&token[..token.len() - 10]), 401, u, "signature is not 64 bytes"),
        case("signature cut by 1 character", with_token(&token[..token.len() - 1]), 401, u, "signature is not base64url"),
        case("padded signature", with_token(&format!("{token}==")), 401, u, "signature is not base64url"),
        case("three parts", with_token(&format!("{token}.{sig}")), 401, u, "signature is not base64url"),
        case("claims cut by 3 characters", with_token(&format!("{}.{sig}", &claims_part[..claims_part.len() - 3])), 401, u, "signature does not verify"),
        case("one flipped signature character", with_token(&format!("{claims_part}.{}", String::from_utf8(flipped).unwrap())), 401, u, "signature does not verify"),
        case("all-zero signature", with_token(&format!("{claims_part}.{}", "A".repeat(86))), 401, u, "signature does not verify"),
        case("other claims under a valid signature", with_token(&swapped_claims), 401, u, "signature does not verify"),
        case("oversized token", with_token(&"A".repeat(5000)), 401, u, "token is too long"),
        case("oversized header of 64 KiB", with_token(&format!("{token}{}", "A".repeat(64 * 1024))), 401, u, "token is too long"),
        case("token bytes that are not UTF-8", with_auth(b"CtMirror \xff\xfe"), 401, u, "missing Authorization header"),
        case("garbage header before a valid one", good.clone().without("authorization").header("authorization", "CtMirror x").header("authorization", format!("CtMirror {token}")), 401, u, "expected claims.signature"),
        case("signed by a key nobody registered", ctx.with_claims(op, body.clone(), &ctx.stranger, |_| {}), 401, u, "signature does not verify"),
        case("agent claims signed by the partner's key", ctx.with_claims(op, body.clone(), &ctx.partner, |_| {}), 401, u, "signature does not verify"),
        case("receiver-role token signed by the agent key", ctx.with_claims(op, body.clone(), &ctx.agent, |c| c.role = Role::Receiver), 401, u, "signature does not verify"),
        case("receiver-role token signed by the partner key", ctx.with_claims(op, body.clone(), &ctx.partner, |c| c.role = Role::Receiver), 401, u, "signature does not verify"),
        case("valid signature over a different body", claims_with(&|c| c.body_sha256 = auth::body_digest(b"{}")), 401, u, "body hash does not match the body"),
        case("body hash of the empty body", claims_with(&|c| c.body_sha256 = auth::body_digest(b"")), 401, u, "body hash does not match the body"),
        case("body hash in upper case", claims_with(&|c| c.body_sha256 = c.body_sha256.to_uppercase()), 401, u, "body hash does not match the body"),
        case("empty body hash", claims_with(&|c| c.body_sha256 = String::new()), 401, u, "body hash does not match the body"),
        case("body hash of the body plus a newline", claims_with(&|c| c.body_sha256 = auth::body_digest(&[&body[..], b"\n"].concat())), 401, u, "body hash does not match the body"),
        case("token for another operation's path", claims_with(&|c| c.path = path(TENANT, "reload")), 401, u, "was signed for POST /v1/tenants/acme/reload"),
        case("token for the path with a trailing slash", claims_with(&|c| c.path.push('/')), 401, u, "was signed for POST /v1/tenants/acme/schema/"),
        case("token for another method", claims_with(&|c| c.method = "GET".into()), 401, u, "was signed for GET"),
        case("token for the method in lower case", claims_with(&|c| c.method = "post".into()), 401, u, "was signed for post"),
        case("timestamp 301 s in the past", claims_with(&|c| c.ts -= 301), 401, u, "outside the allowed window"),
        // Cases are built before they are sent: a few seconds pass, which
        // only moves a past timestamp further out, but would bring one
        // just past the window's future edge back inside it.
        case("timestamp 330 s in the future", claims_with(&|c| c.ts += 330), 401, u, "outside the allowed window"),
        case("timestamp a year old", claims_with(&|c| c.ts -= 365 * 86400), 401, u, "outside the allowed window"),
        case("timestamp zero", claims_with(&|c| c.ts = 0), 401, u, "outside the allowed window"),
        case("timestamp i64::MIN", claims_with(&|c| c.ts = i64::MIN), 401, u, "outside the allowed window"),
        case("timestamp i64::MAX", claims_with(&|c| c.ts = i64::MAX), 401, u, "outside the allowed window"),
        case("another tenant's claims on this tenant's path", claims_with(&|c| c.tenant = TenantId::new(OTHER_TENANT).unwrap()), 401, u, "token is for tenant globex, but the request is for tenant acme"),
        case("another tenant's claims and path on this tenant's path", claims_with(&|c| { c.tenant = TenantId::new(OTHER_TENANT).unwrap(); c.path = path(OTHER_TENANT, "schema") }), 401, u, "token is for tenant globex"),
        case("this tenant's claims naming another tenant's path, on that path", claims_with(&|c| c.path = path(OTHER_TENANT, "schema")).path(path(OTHER_TENANT, op)), 401, u, "token is for tenant acme, but the request is for tenant globex"),
        case("another application's token", claims_with(&|c| c.app = AppId::new("erp").unwrap()), 401, u, "token is for application erp"),
    ];
    // The checks that matter most, on every other operation: each of them
    // writes or answers with a signed token when it gets through.
    for op in OPS.into_iter().filter(|o| *o != "schema") {
        let body = serde_json::to_vec(&writing_body(op)).unwrap();
        let good = ctx.signed(op, body.clone());
        cases.extend([
            case(format!("{op}: no token"), good.clone().without("authorization"), 401, u, "missing Authorization header"),
            case(format!("{op}: wrong key"), ctx.with_claims(op, body.clone(), &ctx.stranger, |_| {}), 401, u, "signature does not verify"),
            case(format!("{op}: token over another body"), good.clone().body([&body[..], b" "].concat()), 401, u, "body hash does not match the body"),
            case(format!("{op}: expired token"), ctx.with_claims(op, body.clone(), &ctx.agent, |c| c.ts -= 600), 401, u, "outside the allowed window"),
            case(format!("{op}: this tenant's token on another tenant's path"), good.clone().path(path(OTHER_TENANT, op)), 401, u, "token is for tenant acme"),
        ]);
    }
    cases
}

// ------------------------------------------------------------ transport

/// Content types, body sizes, nesting and encodings: refused by the checks
/// that run before the token (content type, size) or after it (strict
/// JSON), each with a correctly signed token.
fn transport_cases(ctx: &Ctx) -> Vec<Case> {
    let schema_body = serde_json::to_vec(&writing_body("schema")).unwrap();
    let schema = ctx.signed("schema", schema_body.clone());
    let ct = |value: &[u8]| schema.clone().replace("content-type", value);
    let media = "unsupported_media_type";
    let bad = "bad_request";
    let json_text = "content type must be application/json";
    // A valid schema call padded past the limit: it would write if read.
    let mut big = writing_body("schema");
    big["source_identity"] = json!("x".repeat(MAX_BODY));
    let big = serde_json::to_vec(&big).unwrap();
    let nested = |depth: usize, open: &str, close: &str| format!("{}{}", open.repeat(depth), close.repeat(depth)).into_bytes();
    let in_tables = |inner: Vec<u8>| [&b"{\"source_identity\":\"s\",\"tables\":["[..], &inner, b"]}"].concat();

    let mut cases = vec![
        case("no content type", schema.clone().without("content-type"), 415, media, json_text),
        case("empty content type", ct(b""), 415, media, json_text),
        case("text/plain", ct(b"text/plain"), 415, media, json_text),
        case("text/json", ct(b"text/json"), 415, media, json_text),
        case("application/xml", ct(b"application/xml"), 415, media, json_text),
        case("application/jsonp", ct(b"application/jsonp"), 415, media, json_text),
        case("application/json-seq", ct(b"application/json-seq"), 415, media, json_text),
        case("a list of content types", ct(b"application/json, text/plain"), 415, media, json_text),
        case("multipart form", ct(b"multipart/form-data; boundary=x"), 415, media, json_text),
        case("url-encoded form", ct(b"application/x-www-form-urlencoded"), 415, media, json_text),
        case("content type bytes that are not UTF-8", ct(b"application/json\xff"), 415, media, json_text),
        case("COPY content type on TableSchema", ct(COPY_TYPE.as_bytes()), 415, media, json_text),
        case("COPY content type on Reload", ctx.writing("reload").replace("content-type", COPY_TYPE), 415, media, json_text),
        case("text/csv on RowData", ctx.writing("rows").replace("content-type", "text/csv"), 415, media, COPY_TYPE),
        case("a COPY look-alike type on RowData", ctx.writing("rows").replace("content-type", "application/vnd.ctmirror.copy+json"), 415, media, COPY_TYPE),
        case("table identity for a table not sent", ctx.signed("schema", br#"{"source_identity":"s","tables":[],"table_identities":{"ghost":"s/g"}}"#.to_vec()), 400, bad, "table_identities names table \"ghost\""),
        case("empty table identity", ctx.signed("schema", serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()], "table_identities": {"items": ""}})).unwrap()), 400, bad, "must be 1 to 500 bytes"),
        case("table identity past 500 bytes", ctx.signed("schema", serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()], "table_identities": {"items": "x".repeat(501)}})).unwrap()), 400, bad, "must be 1 to 500 bytes"),
        case("table identity that is not a string", ctx.signed("schema", serde_json::to_vec(&json!({"source_identity": "s", "tables": [items()], "table_identities": {"items": 7}})).unwrap()), 400, bad, "invalid request body"),
        case("body past the limit, declared", ctx.signed("schema", big.clone()), 413, "payload_too_large", "larger than the limit"),
        case("body past the limit, chunked without a length", ctx.signed("schema", big.clone()).via(Via::Chunked), 413, "payload_too_large", "larger than the limit"),
        case("body one byte past the limit", ctx.signed("schema", vec![b' '; MAX_BODY + 1]), 413, "payload_too_large", "larger than the limit"),
        case("declared length of a terabyte, body never sent", ctx.signed("completed", Vec::new()).header("content-length", "1000000000000").via(Via::Tcp), 413, "payload_too_large", "larger than the limit"),
        case("COPY body past the limit", ctx.copy(vec![0; MAX_BODY + 10]), 413, "payload_too_large", "larger than the limit"),
        case("Completed body past the limit, chunked", ctx.signed("completed", vec![b'['; MAX_BODY + 10]).via(Via::Chunked), 413, "payload_too_large", "larger than the limit"),
        case("50,000 nested arrays", ctx.signed("schema", nested(50_000, "[", "]")), 400, bad, "invalid request body"),
        case("50,000 nested arrays as a table", ctx.signed("schema", in_tables(nested(50_000, "[", "]"))), 400, bad, "invalid request body"),
        case("20,000 nested objects", ctx.signed("schema", nested(20_000, "{\"a\":", "}")), 400, bad, "invalid request body"),
        case("nested arrays as row values", ctx.signed("rows", format!("{{\"table\":\"items\",\"schema_hash\":\"h\",\"from\":null,\"to\":{{\"phase\":\"changes\",\"version\":1,\"after_key\":null}},\"rows\":[{{\"op\":\"upsert\",\"version\":1,\"values\":{}}}]}}", String::from_utf8(nested(20_000, "[", "]")).unwrap()).into_bytes()), 400, bad, "invalid request body"),
        case("nested arrays as a cursor key", ctx.signed("advance", format!("{{\"tables\":[{{\"table\":\"items\",\"schema_hash\":\"h\",\"from\":{{\"phase\":\"changes\",\"version\":1,\"after_key\":{}}},\"to\":null}}]}}", String::from_utf8(nested(20_000, "[", "]")).unwrap()).into_bytes()), 400, bad, "invalid request body"),
        case("nested arrays in a COPY header", ctx.copy({ let h = nested(50_000, "[", "]"); [&(h.len() as u32).to_be_bytes()[..], &h].concat() }), 400, bad, "invalid COPY batch header"),
        case("byte 0xff in a string", ctx.signed("reload", b"{\"table\":\"items\",\"reason\":\"\xff\",\"source_identity\":\"s\"}".to_vec()), 400, bad, "invalid request body"),
        case("overlong UTF-8 encoding of '/'", ctx.signed("rows", b"{\"table\":\"it\xc0\xafems\",\"schema_hash\":\"h\",\"from\":null,\"to\":{\"phase\":\"changes\",\"version\":1,\"after_key\":null},\"rows\":[]}".to_vec()), 400, bad, "invalid request body"),
        case("UTF-8-encoded surrogate", ctx.signed("completed", b"{\"tables\":[{\"name\":\"\xed\xa0\x80\",\"mode\":\"idle\",\"counts\":{\"inserted\":0,\"updated\":0,\"deleted\":0}}]}".to_vec()), 400, bad, "invalid request body"),
        case("truncated multi-byte character", ctx.signed("authenticate", b"{\"agent\":\"\xe2\x82\"}".to_vec()), 400, bad, "invalid request body"),
        case("lone surrogate escape", ctx.signed("reload", br#"{"table":"items","reason":"\ud800","source_identity":"s"}"#.to_vec()), 400, bad, "invalid request body"),
        case("UTF-16 encoded JSON", ctx.signed("authenticate", "{\"agent\":\"x\"}".encode_utf16().flat_map(u16::to_le_bytes).collect()), 400, bad, "invalid request body"),
        case("byte order mark", ctx.signed("schema", [&b"\xef\xbb\xbf"[..], &schema_body].concat()), 400, bad, "invalid request body"),
        case("trailing garbage", ctx.signed("schema", [&schema_body[..], b"x"].concat()), 400, bad, "trailing characters"),
        case("two documents", ctx.signed("schema", [&schema_body[..], &schema_body].concat()), 400, bad, "trailing characters"),
        case("NUL between tokens", ctx.signed("schema", b"{\"source_identity\":\"s\",\0\"tables\":[]}".to_vec()), 400, bad, "invalid request body"),
        case("duplicate field", ctx.signed("reload", br#"{"table":"ghost","table":"items","reason":"r","source_identity":"s"}"#.to_vec()), 400, bad, "duplicate field `table`"),
        case("comment", ctx.signed("schema", [&b"// hello\n"[..], &schema_body].concat()), 400, bad, "invalid request body"),
        case("single quotes", ctx.signed("authenticate", b"{'agent':'x'}".to_vec()), 400, bad, "invalid request body"),
        case("NaN literal", ctx.signed("completed", br#"{"tables":[{"name":"items","mode":"idle","counts":{"inserted":NaN,"updated":0,"deleted":0}}]}"#.to_vec()), 400, bad, "invalid request body"),
        case("JSON null", ctx.signed("schema", b"null".to_vec()), 400, bad, "invalid request body"),
        case("a number", ctx.signed("advance", b"17".to_vec()), 400, bad, "invalid request body"),
        case("a COPY batch under the JSON type", ctx.copy(CopyBatch { header: copy_header(1), payload: b"2\tf\t9\tx\t1\t\\N\n".to_vec().into() }.encode()).replace("content-type", "application/json"), 400, bad, "invalid request body"),
        case("a JSON batch under the COPY type", ctx.writing("rows").replace("content-type", COPY_TYPE), 400, bad, "does not fit the body"),
    ];
    for op in OPS {
        cases.push(case(format!("{op}: empty body"), ctx.signed(op, Vec::new()), 400, bad, "EOF while parsing"));
    }
    cases
}

// ------------------------------------------------------------ paths

/// Tenant ids and paths outside the protocol, sent on the wire exactly as
/// written (no client normalizes them first). A token for the canonical
/// path does not help: the path is refused before the token is looked at.
fn path_cases(ctx: &Ctx) -> Vec<Case> {
    let body = serde_json::to_vec(&writing_body("schema")).unwrap();
    let signed = ctx.signed("schema", body.clone()).header("content-length", body.len().to_string()).via(Via::Tcp);
    let at = |p: &str| signed.clone().path(p.to_owned());
    let tenant = |t: &str| at(&format!("/v1/tenants/{t}/schema"));
    let bad = "bad_request";
    let id = "invalid tenant id";
    let mut cases = Vec::new();
    for (what, t) in [
        ("upper case", "ACME".to_owned()),
        ("mixed case", "Acme".to_owned()),
        ("dot-dot", "..".to_owned()),
        ("dot", ".".to_owned()),
        ("percent-encoded dot-dot", "%2E%2E".to_owned()),
        ("percent-encoded slash and dot-dot", "acme%2F..%2Fglobex".to_owned()),
        ("percent-encoded NUL", "acme%00".to_owned()),
        ("percent-encoded space", "ac%20me".to_owned()),
        ("percent-encoded quote", "acme%27%3B--".to_owned()),
        ("percent-encoded upper-case letter", "%41cme".to_owned()),
        ("semicolon", "acme;drop".to_owned()),
        ("leading underscore", "_acme".to_owned()),
        ("leading dash", "-acme".to_owned()),
        ("non-ASCII letter", "acm%C3%A9".to_owned()),
        ("49 characters", "a".repeat(49)),
        ("1,000 characters", "a".repeat(1000)),
    ] {
        cases.push(case(format!("tenant id: {what}"), tenant(&t), 400, bad, id));
    }
    cases.extend([
        case("tenant id: percent-encoded invalid UTF-8", tenant("%ff"), 400, bad, "invalid path"),
        case("tenant id: percent-encoded spelling of the right tenant", tenant("%61cme"), 400, bad, "percent-encoded paths are not part of the protocol"),
        case("path: empty tenant", at("/v1/tenants//schema"), 400, bad, "invalid tenant id \"\""),
        case("path: dot-dot to another tenant", at("/v1/tenants/acme/../globex/schema"), 404, "not_found", "no protocol operation"),
        case("path: trailing slash", at("/v1/tenants/acme/schema/"), 404, "not_found", "no protocol operation"),
        case("path: extra segment", at("/v1/tenants/acme/schema/extra"), 404, "not_found", "no protocol operation"),
        case("path: operation in upper case", at("/v1/tenants/acme/SCHEMA"), 404, "not_found", "no protocol operation"),
        case("path: version in upper case", at("/V1/tenants/acme/schema"), 404, "not_found", "no protocol operation"),
        case("path: unknown version", at("/v2/tenants/acme/schema"), 404, "not_found", "no protocol operation"),
        case("path: double leading slash", at("//v1/tenants/acme/schema"), 404, "not_found", "no protocol operation"),
        case("path: unknown operation", at("/v1/tenants/acme/wipe"), 404, "not_found", "no protocol operation"),
        case("path: tenant without operation", at("/v1/tenants/acme"), 404, "not_found", "no protocol operation"),
        case("path: root", at("/"), 404, "not_found", "no protocol operation"),
    ]);
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let body = serde_json::to_vec(&writing_body("reload")).unwrap();
        let r = ctx.with_claims("reload", body, &ctx.agent, |c| c.method = method.into()).method(method);
        cases.push(case(format!("method {method} with a token for it"), r, 405, "method_not_allowed", "use POST"));
    }
    cases
}

// ------------------------------------------------------------ JSON shapes

/// Requests that are JSON but not the operation's shape: unknown fields,
/// wrong types, missing fields, values outside their type's range.
fn shape_cases(ctx: &Ctx) -> Vec<Case> {
    let with = |op: &str, edit: &dyn Fn(&mut Json)| {
        let mut body = writing_body(op);
        edit(&mut body);
        ctx.json(op, &body)
    };
    let raw = |op: &str, text: &str| ctx.signed(op, text.as_bytes().to_vec());
    let bad = "bad_request";
    let cases: Vec<(&str, Request, &str)> = vec![
        ("authenticate: missing agent", raw("authenticate", "{}"), "missing field `agent`"),
        ("authenticate: agent is a number", raw("authenticate", r#"{"agent":1}"#), "invalid type"),
        ("authenticate: unknown field", raw("authenticate", r#"{"agent":"x","admin":true}"#), "unknown field `admin`"),
        ("authenticate: fields as an array", raw("authenticate", r#"["x"]"#), "expected a JSON object"),
        ("completed: fields as an array", raw("completed", r#"[[], null]"#), "expected a JSON object"),
        ("schema: source identity of 501 bytes", with("schema", &|b| b["source_identity"] = json!("s".repeat(501))), "source_identity must be 1 to 500 bytes"),
        ("schema: empty source identity", with("schema", &|b| b["source_identity"] = json!("")), "source_identity must be 1 to 500 bytes"),
        ("schema: unknown top-level field", with("schema", &|b| b["drop_all"] = json!(true)), "unknown field `drop_all`"),
        ("schema: missing source identity", with("schema", &|b| { b.as_object_mut().unwrap().remove("source_identity"); }), "missing field `source_identity`"),
        ("schema: tables is an object", with("schema", &|b| b["tables"] = json!({"items": {}})), "invalid type"),
        ("schema: skipped is a string", with("schema", &|b| b["skipped"] = json!("items")), "invalid type"),
        ("schema: table name is a number", with("schema", &|b| b["tables"][2]["name"] = json!(7)), "invalid type"),
        ("schema: unknown column field", with("schema", &|b| b["tables"][2]["columns"][1]["default"] = json!("now()")), "unknown field `default`"),
        ("schema: nullable is a string", with("schema", &|b| b["tables"][2]["columns"][1]["nullable"] = json!("yes")), "invalid type"),
        ("schema: unknown column type", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"] = json!({"type": "money"})), "unknown variant `money`"),
        ("schema: column type as a string", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"] = json!("int64")), "invalid type"),
        ("schema: column type without its tag", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"] = json!({"max_length": 3})), "missing field `type`"),
        ("schema: unknown type parameter", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"]["collation"] = json!("C")), "unknown field `collation`"),
        ("schema: negative length", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"]["max_length"] = json!(-1)), "invalid value"),
        ("schema: length past u32", with("schema", &|b| b["tables"][2]["columns"][1]["data_type"]["max_length"] = json!(1u64 << 40)), "invalid value"),
        ("schema: precision past u16", with("schema", &|b| b["tables"][2]["columns"][3]["data_type"]["precision"] = json!(70000)), "invalid value"),
        ("schema: primary key is a string", with("schema", &|b| b["tables"][2]["primary_key"] = json!("id")), "invalid type"),
        ("schema: unknown table field", with("schema", &|b| b["tables"][2]["owner"] = json!("postgres")), "unknown field `owner`"),
        ("rows: unknown field", with("rows", &|b| b["truncate"] = json!(true)), "unknown field `truncate`"),
        ("rows: unknown operation", with("rows", &|b| b["rows"][0]["op"] = json!("merge")), "unknown variant `merge`"),
        ("rows: operation missing", with("rows", &|b| { b["rows"][0].as_object_mut().unwrap().remove("op"); }), "missing field `op`"),
        ("rows: upsert with a key field", with("rows", &|b| b["rows"][0]["key"] = json!([99])), "unknown field `key`"),
        ("rows: delete without its key", with("rows", &|b| b["rows"][0] = json!({"op": "delete", "version": 2})), "missing field `key`"),
        ("rows: upsert without values", with("rows", &|b| b["rows"][0] = json!({"op": "upsert", "version": 2})), "missing field `values`"),
        ("rows: version is a string", with("rows", &|b| b["rows"][0]["version"] = json!("2")), "invalid type"),
        ("rows: version is a fraction", with("rows", &|b| b["rows"][0]["version"] = json!(1.5)), "invalid type"),
        ("rows: version past i64", with("rows", &|b| b["rows"][0]["version"] = json!(u64::MAX)), "invalid value"),
        ("rows: cursor missing", with("rows", &|b| { b.as_object_mut().unwrap().remove("to"); }), "missing field `to`"),
        ("rows: unknown cursor phase", with("rows", &|b| b["to"]["phase"] = json!("later")), "unknown variant `later`"),
        ("rows: unknown cursor field", with("rows", &|b| b["to"]["force"] = json!(true)), "unknown field `force`"),
        ("rows: from is a string", with("rows", &|b| b["from"] = json!("changes@1")), "invalid type"),
        ("rows: rows is an object", with("rows", &|b| b["rows"] = json!({"0": {}})), "invalid type"),
        ("rows: values is an object", with("rows", &|b| b["rows"][0]["values"] = json!({"id": 99})), "invalid type"),
        ("rows: a value is an object", with("rows", &|b| b["rows"][0]["values"][1] = json!({"$gt": ""})), "invalid type"),
        ("rows: a value past f64", raw("rows", &serde_json::to_string(&writing_body("rows")).unwrap().replace("\"intruder\"", "1e400")), "number out of range"),
        ("rows: table is null", with("rows", &|b| b["table"] = Json::Null), "invalid type"),
        ("rows: schema hash missing", with("rows", &|b| { b.as_object_mut().unwrap().remove("schema_hash"); }), "missing field `schema_hash`"),
        ("advance: tables is null", raw("advance", r#"{"tables":null}"#), "invalid type"),
        ("advance: unknown entry field", with("advance", &|b| b["tables"][0]["force"] = json!(true)), "unknown field `force`"),
        ("advance: entry without from", with("advance", &|b| { b["tables"][0].as_object_mut().unwrap().remove("from"); }), "missing field `from`"),
        ("advance: from is null", with("advance", &|b| b["tables"][0]["from"] = Json::Null), "invalid type"),
        ("reload: table is an array", with("reload", &|b| b["table"] = json!(["items"])), "invalid type"),
        ("reload: source identity is a number", with("reload", &|b| b["source_identity"] = json!(2)), "invalid type"),
        ("completed: unknown mode", with("completed", &|b| b["tables"][0]["mode"] = json!("partial")), "unknown variant `partial`"),
        ("completed: negative count", with("completed", &|b| b["tables"][0]["counts"]["deleted"] = json!(-1)), "invalid value"),
        ("completed: counts missing", with("completed", &|b| { b["tables"][0].as_object_mut().unwrap().remove("counts"); }), "missing field `counts`"),
        ("completed: unknown field", with("completed", &|b| b["tables"][0]["sql"] = json!("DROP TABLE items")), "unknown field `sql`"),
        ("completed: table name is a number", with("completed", &|b| b["tables"][0]["name"] = json!(1)), "invalid type"),
        ("completed: error is an object", with("completed", &|b| b["tables"][0]["error"] = json!({})), "invalid type"),
    ];
    let mut out: Vec<Case> = cases.into_iter().map(|(name, r, text)| case(name, r, 400, bad, text)).collect();
    out.extend([
        case("reload: source identity past 500 bytes", with("reload", &|b| b["source_identity"] = json!("s".repeat(501))), 400, bad, "too long"),
        case("reload: table never announced", with("reload", &|b| b["table"] = json!("intruder")), 409, "unknown_table", "intruder"),
    ]);
    out
}

// ------------------------------------------------------------ rows

/// JSON batches whose rows contradict the table's schema: every one is
/// refused whole, naming the column, and the table and cursor stay.
fn row_cases(ctx: &Ctx) -> Vec<Case> {
    let kinds_batch = |rows: Json| ctx.json("rows", &batch(&kinds(), Some(changes(1)), changes(2), rows));
    let bad = "bad_request";
    let value_cases: Vec<(&str, Json, &str)> = vec![
        ("flag", json!(1), "expected a boolean, got integer 1"),
        ("flag", json!("true"), "expected a boolean, got string"),
        ("flag", json!("NaN"), "expected a boolean"),
        ("small", json!(-32769), "-32769 is out of range for int16"),
        ("small", json!("-Infinity"), "expected an integer, got string \"-Infinity\""),
        ("medium", json!(2147483648i64), "2147483648 is out of range for int32"),
        ("medium", json!(-2147483649i64), "-2147483649 is out of range for int32"),
        ("medium", json!(1.5), "expected an integer, got number 1.5"),
        ("medium", json!("12"), "expected an integer, got string"),
        ("medium", json!(true), "expected an integer, got boolean"),
        ("big", json!(1000.0), "expected an integer, got number"),
        ("big", json!(1.8446744073709552e19), "expected an integer, got number"),
        ("big", json!("NaN"), "expected an integer, got string \"NaN\""),
        ("big", json!("Infinity"), "expected an integer, got string \"Infinity\""),
        ("real4", json!(1e39), "1000000000000000000000000000000000000000 is out of range for float32"),
        ("real8", json!("nan"), "expected a number"),
        ("real8", json!("inf"), "expected a number"),
        ("real8", json!("1.5"), "expected a number"),
        ("money", json!("1e5"), "expected a decimal string"),
        ("money", json!(" 1.00"), "expected a decimal string"),
        ("money", json!("1,5"), "expected a decimal string"),
        ("money", json!("0x10"), "expected a decimal string"),
        ("money", json!("1."), "expected a decimal string"),
        ("money", json!(1.5), "expected a decimal string like \"-12.50\", got number 1.5"),
        ("short", json!("abcdef"), "text of 6 characters exceeds the column's 5"),
        ("short", json!("ééééé€"), "text of 6 characters exceeds the column's 5"),
        ("short", json!("a\u{0}b"), "text contains a NUL character"),
        ("short", json!(true), "expected a string, got boolean"),
        ("code", json!("abcd"), "text of 4 characters exceeds the column's 3"),
        ("code", json!("\u{0}"), "text contains a NUL character"),
        ("blob", json!("AAAAAAA="), "5 bytes exceed the column's 4"),
        ("blob", json!("!!!!"), "bytes must be standard base64"),
        ("blob", json!("YQ"), "bytes must be standard base64"),
        ("blob", json!("-_-_"), "bytes must be standard base64"),
        ("blob", json!("YQ==\n"), "bytes must be standard base64"),
        ("blob", json!(12), "expected a base64 string"),
        ("day", json!("2024-02-30"), "expected a date string"),
        ("day", json!("2024-13-01"), "expected a date string"),
        ("day", json!("0000-01-01"), "expected a date string"),
        ("day", json!("10000-01-01"), "expected a date string"),
        ("day", json!("2024-1-1"), "expected a date string"),
        ("day", json!("2024-01-01T00:00:00"), "expected a date string"),
        ("day", json!("yesterday"), "expected a date string"),
        ("day", json!("2024-01-01 BC"), "expected a date string"),
        ("day", json!("NaN"), "expected a date string"),
        ("day", json!(20240101), "expected a date string YYYY-MM-DD, got integer 20240101"),
        ("at", json!("25:00:00"), "expected a time string"),
        ("at", json!("12:60:00"), "expected a time string"),
        ("at", json!("24:00:00.1"), "expected a time string"),
        ("at", json!("12:00:00.1234567890"), "expected a time string"),
        ("stamp", json!("2024-01-01 10:00:00"), "expected a timestamp string"),
        ("stamp", json!("2024-01-01T24:00:00"), "expected a timestamp string"),
        ("stamp", json!("2024-01-01T10:00:00Z"), "expected a timestamp string"),
        ("stamptz", json!("2024-01-01T10:00:00"), "expected an RFC 3339 timestamp with offset"),
        ("stamptz", json!("2024-01-01T10:00:00+25:00"), "expected an RFC 3339 timestamp with offset"),
        ("stamptz", json!("NaN"), "expected an RFC 3339 timestamp with offset"),
        ("uid", json!("not-a-uuid"), "expected a hyphenated UUID string"),
        ("uid", json!("123e4567e89b12d3a456426614174000"), "expected a hyphenated UUID string"),
        ("uid", json!("{123e4567-e89b-12d3-a456-426614174000}"), "expected a hyphenated UUID string"),
        ("doc", json!("{"), "json value is not valid JSON"),
        ("doc", json!("{\"a\":\"\\u0000\"}"), "json value contains \\u0000"),
        ("doc", json!(7), "expected a string holding JSON text"),
        ("id", json!("50"), "expected an integer, got string"),
    ];
    let mut cases: Vec<Case> = value_cases
        .into_iter()
        .map(|(column, value, text)| {
            let shown = value.to_string().chars().take(30).collect::<String>();
            let request = kinds_batch(json!([upsert(2, kinds_row(column, value))]));
            case(format!("kinds.{column} = {shown}"), request, 400, bad, format!("column {column:?}: {text}"))
        })
        .collect();
    let width = kinds().columns.len();
    let mut short_row = kinds_row("flag", json!(true));
    short_row.as_array_mut().unwrap().pop();
    let mut long_row = kinds_row("flag", json!(true));
    long_row.as_array_mut().unwrap().push(json!("extra"));
    let snapshot_to = Cursor::Snapshot { version: Version(1), after_key: Some(Key(vec![Value::Int(60)])) };
    cases.extend([
        case("a row missing its last column", kinds_batch(json!([upsert(2, short_row)])), 400, bad, format!("expected {width} values, one per column, got {}", width - 1)),
        case("a row with an extra column", kinds_batch(json!([upsert(2, long_row)])), 400, bad, format!("expected {width} values, one per column, got {}", width + 1)),
        case("a row of no values", kinds_batch(json!([upsert(2, json!([]))])), 400, bad, format!("expected {width} values, one per column, got 0")),
        case("a row with a null key", kinds_batch(json!([upsert(2, kinds_row("id", Json::Null))])), 400, bad, "column \"id\" is not nullable"),
        case("a delete whose key has an extra value", kinds_batch(json!([delete(2, json!([1, 2]))])), 400, bad, "expected a key of 1 values, got 2"),
        case("a delete keyed by text", kinds_batch(json!([delete(2, json!(["1"]))])), 400, bad, "column \"id\": expected an integer"),
        case("a delete keyed by a fraction", kinds_batch(json!([delete(2, json!([1.5]))])), 400, bad, "column \"id\": expected an integer, got number 1.5"),
        case("a version far past the cursor", kinds_batch(json!([delete(i64::MAX, json!([1]))])), 400, bad, "past the batch's cursor"),
        case("a good row before a bad one", kinds_batch(json!([upsert(2, kinds_row("flag", json!(false))), upsert(2, json!([51, 1]))])), 400, bad, "row 1"),
        case("a full-load batch for a table past its load", ctx.json("rows", &batch(&kinds(), None, snapshot_to, json!([delete(1, json!([1]))]))), 409, "conflict", "starts at no cursor"),
        case("numeric Infinity in a numeric(5,2)", kinds_batch(json!([upsert(2, kinds_row("money", json!("Infinity")))])), 422, "unprocessable", "numeric field overflow"),
        case("a text key that breaks the column limit", ctx.json("rows", &batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "x".repeat(21), 1, null]))]))), 400, bad, "exceeds the column's 20"),
    ]);
    cases
}

// ------------------------------------------------------------ COPY

fn copy_header(rows: u64) -> CopyBatchHeader {
    CopyBatchHeader {
        table: "items".into(),
        schema_hash: items().hash(),
        from: Some(changes(1)),
        to: changes(3),
        format: CopyFormat::Text,
        rows,
    }
}

/// A COPY body: the 4-byte length, `header` as given, then `payload`.
fn copy_body(header: &[u8], payload: &[u8]) -> Vec<u8> {
    [&(header.len() as u32).to_be_bytes()[..], header, payload].concat()
}

/// One binary field: its length and bytes (`None` is NULL).
fn field(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        None => (-1i32).to_be_bytes().to_vec(),
        Some(v) => [&(v.len() as i32).to_be_bytes()[..], v].concat(),
    }
}

/// A binary tuple of the given fields.
fn tuple(fields: &[Vec<u8>]) -> Vec<u8> {
    [(fields.len() as i16).to_be_bytes().to_vec(), fields.concat()].concat()
}

/// A binary changes-layout row of `items`: version, deleted, id, name, qty, price.
fn binary_change(version: i64, id: i64, name: &[u8], qty: i16) -> Vec<Vec<u8>> {
    vec![
        field(Some(&version.to_be_bytes())),
        field(Some(&[0])),
        field(Some(&id.to_be_bytes())),
        field(Some(name)),
        field(Some(&qty.to_be_bytes())),
        field(None),
    ]
}

/// COPY batches that lie about themselves: row counts, header JSON,
/// truncated or misshapen tuples, tables and hashes the receiver does not
/// hold. Framing the receiver sees is `400`, rows PostgreSQL refuses `422`.
fn copy_cases(ctx: &Ctx) -> Vec<Case> {
    let bad = "bad_request";
    let unproc = "unprocessable";
    let line = "2\tf\t9\tx\t1\t\\N\n";
    let text = |rows: u64, data: &str| ctx.copy(CopyBatch { header: copy_header(rows), payload: data.as_bytes().to_vec().into() }.encode());
    let binary = |rows: u64, data: Vec<u8>| {
        let header = CopyBatchHeader { format: CopyFormat::Binary, ..copy_header(rows) };
        ctx.copy(CopyBatch { header, payload: data.into() }.encode())
    };
    let header_json = |edit: &dyn Fn(&mut Json)| {
        let mut h = serde_json::to_value(copy_header(1)).unwrap();
        edit(&mut h);
        serde_json::to_vec(&h).unwrap()
    };
    let with_header = |edit: &dyn Fn(&mut Json)| ctx.copy(copy_body(&header_json(edit), line.as_bytes()));
    let good_header = serde_json::to_vec(&copy_header(1)).unwrap();
    let mut truncated = tuple(&binary_change(2, 9, b"x", 1));
    truncated.truncate(truncated.len() - 6);
    let mut short_int = binary_change(2, 9, b"x", 1);
    short_int[2] = field(Some(&9i32.to_be_bytes()));
    let mut bad_bool = binary_change(2, 9, b"x", 1);
    bad_bool[1] = field(Some(&[0, 1]));
    let mut null_version = binary_change(2, 9, b"x", 1);
    null_version[0] = field(None);
    let mut negative_length = tuple(&binary_change(2, 9, b"x", 1)[..3]);
    negative_length[0..2].copy_from_slice(&6i16.to_be_bytes());
    negative_length.extend_from_slice(&(-2i32).to_be_bytes());

    vec![
        case("fewer rows announced than sent", text(1, &format!("{line}2\tf\t10\ty\t1\t\\N\n")), 400, bad, "announces 1 rows but its data holds 2"),
        case("u64::MAX rows announced", text(u64::MAX, line), 413, "payload_too_large", "batch has 18446744073709551615 rows, more than the receiver's limit"),
        case("no rows announced, rows sent", text(0, line), 400, bad, "announces no rows"),
        case("rows announced, none sent", text(2, ""), 400, bad, "announces 2 rows but its data holds 0"),
        case("header length past the body", ctx.copy([&999u32.to_be_bytes()[..], &good_header].concat()), 400, bad, "does not fit the body"),
        case("header length zero", ctx.copy(copy_body(b"", line.as_bytes())), 400, bad, "invalid COPY batch header"),
        case("header with an unknown field", with_header(&|h| h["sql"] = json!("DROP TABLE items")), 400, bad, "unknown field `sql`"),
        case("header in an unknown format", with_header(&|h| h["format"] = json!("csv")), 400, bad, "unknown variant `csv`"),
        case("header with a negative row count", with_header(&|h| h["rows"] = json!(-1)), 400, bad, "invalid value"),
        case("header that is not UTF-8", ctx.copy(copy_body(b"{\"table\":\"\xff\"}", line.as_bytes())), 400, bad, "invalid COPY batch header"),
        case("header with trailing garbage inside its length", ctx.copy(copy_body(&[&good_header[..], b"garbage"].concat(), line.as_bytes())), 400, bad, "trailing characters"),
        case("header length covering the rows", ctx.copy(copy_body(&[&good_header[..], line.as_bytes()].concat(), b"")), 400, bad, "trailing characters"),
        case("header naming a hostile table", with_header(&|h| h["table"] = json!("items\"; DROP TABLE ctmirror.tables; --")), 409, "unknown_table", "is not in the mirror"),
        case("header naming another tenant's table name in its schema", with_header(&|h| h["table"] = json!("mirror_globex.items")), 409, "unknown_table", "is not in the mirror"),
        case("header with another table's schema hash", with_header(&|h| h["schema_hash"] = json!(kinds().hash())), 409, "schema_mismatch", "follows schema"),
        case("header with an empty schema hash", with_header(&|h| h["schema_hash"] = json!("")), 409, "schema_mismatch", "follows schema"),
        case("header moving the cursor backward", with_header(&|h| h["to"] = serde_json::to_value(changes(0)).unwrap()), 400, bad, "backward"),
        case("header moving the cursor back to a snapshot", with_header(&|h| h["to"] = json!({"phase": "snapshot", "version": 5, "after_key": [1]})), 400, bad, "cannot return to a snapshot"),
        case("header from no cursor", with_header(&|h| h["from"] = Json::Null), 409, "conflict", "starts at no cursor"),
        case("binary tuple cut inside a field", binary(1, truncated), 422, unproc, "unexpected EOF"),
        case("binary tuple of 4 fields where 6 belong", binary(1, tuple(&binary_change(2, 9, b"x", 1)[2..])), 422, unproc, "row field count is 4, expected 6"),
        case("binary tuple of 7 fields where 6 belong", binary(1, tuple(&[binary_change(2, 9, b"x", 1), vec![field(None)]].concat())), 422, unproc, "row field count is 7, expected 6"),
        case("binary field of negative length", binary(1, negative_length), 422, unproc, "invalid field size"),
        case("binary bigint of 4 bytes", binary(1, tuple(&short_int)), 422, unproc, "insufficient data left in message"),
        case("binary boolean of 2 bytes", binary(1, tuple(&bad_bool)), 422, unproc, "incorrect binary data format"),
        case("binary text that is not UTF-8", binary(1, tuple(&binary_change(2, 9, b"\xff\xfe", 1))), 422, unproc, "invalid byte sequence"),
        case("binary text with a NUL", binary(1, tuple(&binary_change(2, 9, b"a\0b", 1))), 422, unproc, "invalid byte sequence"),
        case("binary change without a version", binary(1, tuple(&null_version)), 400, bad, "has no version"),
        case("binary COPY file header inside the rows", binary(1, [ctmirror::protocol::copy::BINARY_HEADER, &tuple(&binary_change(2, 9, b"x", 1))].concat()), 422, unproc, "row field count"),
        case("text row with an octal NUL escape", text(1, "2\tf\t9\ta\\000b\t1\t\\N\n"), 422, unproc, "invalid byte sequence"),
        case("text end-of-data line with a carriage return", text(2, &format!("{line}\\.\r\n{line}")), 400, bad, "end-of-data"),
        case("text rows with mixed line endings", text(2, "2\tf\t9\tx\t1\t\\N\r\n2\tf\t10\tx\t1\t\\N\n"), 422, unproc, "newline"),
        case("text row cut in the middle", text(1, "2\tf\t9\tx"), 422, unproc, "missing data for column"),
        case("text row of a snapshot layout in a changes batch", text(1, "9\tx\t1\t\\N\n"), 422, unproc, "invalid input syntax for type boolean"),
    ]
}

// ------------------------------------------------------------ identifiers

/// A schema call with the tables the tenant has plus `table`.
fn schema_with(ctx: &Ctx, table: Json) -> Request {
    ctx.json("schema", &json!({"source_identity": "src-1", "tables": [items(), kinds(), table]}))
}

/// Names and schemas the receiver must refuse before it touches its
/// database: the whole call is refused and nothing of it stays.
fn identifier_cases(ctx: &Ctx) -> Vec<Case> {
    let t = |edit: &dyn Fn(&mut Json)| {
        let mut table = serde_json::to_value(intruder()).unwrap();
        edit(&mut table);
        schema_with(ctx, table)
    };
    let bad = "bad_request";
    let named = |name: String| t(&|j| j["name"] = json!(name));
    let column = |name: String| t(&|j| j["columns"][1]["name"] = json!(name));
    let data_type = |ty: Json| t(&|j| j["columns"][1]["data_type"] = ty.clone());
    let cases: Vec<(&str, Request, &str)> = vec![
        ("empty table name", named(String::new()), "table name is empty"),
        ("empty column name", column(String::new()), "column name is empty"),
        ("NUL in a table name", named("a\0b".into()), "contains control characters"),
        ("NUL in a column name", column("a\0b".into()), "contains control characters"),
        ("newline in a table name", named("items\nDROP".into()), "contains control characters"),
        ("tab in a column name", column("na\tme".into()), "contains control characters"),
        ("terminal escape in a table name", named("\u{1b}[31mred".into()), "contains control characters"),
        ("DEL in a column name", column("na\u{7f}me".into()), "contains control characters"),
        ("C1 control in a table name", named("na\u{85}me".into()), "contains control characters"),
        ("table name of 64 bytes", named("t".repeat(64)), "longer than 63 bytes"),
        ("column name of 64 bytes in 32 characters", column("é".repeat(32)), "longer than 63 bytes"),
        ("table name of 10,000 bytes", named("x".repeat(10_000)), "longer than 63 bytes"),
        ("duplicate column", t(&|j| { let c = j["columns"][1].clone(); j["columns"].as_array_mut().unwrap().push(c); }), "appears twice in table"),
        ("table sent twice", ctx.json("schema", &json!({"source_identity": "s", "tables": [items(), kinds(), intruder(), TableSchema { columns: items().columns[..2].to_vec(), ..intruder() }]})), "table \"intruder\" appears twice"),
        ("table both sent and skipped", ctx.json("schema", &json!({"source_identity": "s", "tables": [items(), kinds(), intruder()], "skipped": ["intruder"]})), "both sent and skipped"),
        ("primary key naming no column", t(&|j| j["primary_key"] = json!(["nope"])), "is not among the columns"),
        ("nullable primary key", t(&|j| j["primary_key"] = json!(["name"])), "is nullable"),
        ("no primary key", t(&|j| j["primary_key"] = json!([])), "has no primary key"),
        ("primary key column twice", t(&|j| j["primary_key"] = json!(["id", "id"])), "appears twice"),
        ("no columns", t(&|j| { j["columns"] = json!([]); j["primary_key"] = json!([]); }), "has no columns"),
        ("1,601 columns", t(&|j| { j["columns"] = Json::Array((0..1601).map(|i| json!({"name": format!("c{i}"), "data_type": {"type": "bool"}, "nullable": i > 0})).collect()); j["primary_key"] = json!(["c0"]); }), "more than 1600 columns"),
        ("decimal of precision 0", data_type(json!({"type": "decimal", "precision": 0, "scale": null})), "out of range"),
        ("decimal scale past its precision", data_type(json!({"type": "decimal", "precision": 5, "scale": 9})), "out of range"),
        ("decimal of precision 1001", data_type(json!({"type": "decimal", "precision": 1001, "scale": 0})), "out of range"),
        ("decimal scale without precision", data_type(json!({"type": "decimal", "precision": null, "scale": 2})), "scale without precision"),
        ("text of length 0", data_type(json!({"type": "text", "max_length": 0})), "out of range"),
        ("bytes past PostgreSQL's length limit", data_type(json!({"type": "bytes", "max_length": 10_485_761})), "out of range"),
        ("fixed text of length 0", data_type(json!({"type": "fixed_text", "length": 0})), "out of range"),
        ("time of precision 7", data_type(json!({"type": "time", "precision": 7})), "above 6"),
        ("timestamptz of precision 200", data_type(json!({"type": "timestamp_tz", "precision": 200})), "above 6"),
    ];
    let mut out: Vec<Case> = cases.into_iter().map(|(name, r, text)| case(name, r, 400, bad, text)).collect();
    // PostgreSQL's system column names cannot be column names: the table
    // is refused by the database, answered as `refused`, and nothing stays.
    for system in ["ctid", "xmin", "xmax", "cmin", "tableoid"] {
        out.push(Case {
            name: format!("system column name {system}"),
            prelude: Vec::new(),
            request: column(system.into()),
            expect: Expect::TableRefused { table: "intruder".into(), text: "conflicts with a system column name".into() },
        });
    }
    out
}

// ------------------------------------------------------------ replay

/// REPLAY PROTECTION (lands separately; these fail until it does).
///
/// An accepted token cannot be used again within its window (`401`,
/// "nonce was already used"), whatever body it carries, and a nonce that is
/// not 16 bytes of base64url is a malformed token. Each replay is preceded
/// by the original request, which must succeed.
fn replay_cases(ctx: &Ctx) -> Vec<Case> {
    let u = "unauthorized";
    let used = "nonce was already used";
    let mut cases = Vec::new();
    // In this order: each original moves the state the next one starts from.
    let originals = [
        ("authenticate", ctx.json("authenticate", &json!({"agent": "ctmirror-hostile"}))),
        ("schema", ctx.json("schema", &json!({"source_identity": "src-1", "tables": [items(), kinds()]}))),
        ("rows", ctx.json("rows", &batch(&items(), Some(changes(1)), changes(2), json!([upsert(2, json!([3, "three", 3, null]))])))),
        ("advance", ctx.json("advance", &json!({"tables": [{"table": "items", "schema_hash": items().hash(), "from": changes(2), "to": changes(3)}]}))),
        ("completed", ctx.writing("completed")),
    ];
    for (op, original) in originals {
        cases.push(case(format!("replay: {op} sent twice"), original.clone(), 401, u, used).after(original));
    }
    let original = ctx.writing("completed");
    let other_body = serde_json::to_vec(&json!({"tables": []})).unwrap();
    cases.push(
        case("replay: an accepted token with another body", original.clone().body(other_body), 401, u, format!("{used}|body hash does not match the body"))
            .after(original),
    );
    let original = ctx.json("advance", &json!({"tables": []}));
    cases.push(
        case("replay: an accepted token on another tenant's path", original.clone().path(path(OTHER_TENANT, "advance")), 401, u, format!("{used}|token is for tenant acme"))
            .after(original),
    );
    let original = ctx.json("reload", &json!({"table": "kinds", "reason": "replay test", "source_identity": "src-1"}));
    cases.push(case("replay: reload sent twice", original.clone(), 401, u, used).after(original));

    let body = serde_json::to_vec(&writing_body("completed")).unwrap();
    let b64 = |bytes: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let standard = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfb; 16])
    };
    for (what, nonce) in [
        ("empty", String::new()),
        ("a word", "short".to_owned()),
        ("15 bytes", b64(&[7; 15])),
        ("17 bytes", b64(&[7; 17])),
        ("16 bytes with padding", format!("{}==", b64(&[7; 16]))),
        ("16 bytes in the standard alphabet", standard),
        ("1,000 characters", "A".repeat(1000)),
        ("non-ASCII", "é".repeat(11)),
    ] {
        let r = ctx.with_claims("completed", body.clone(), &ctx.agent, |c| c.nonce = nonce.clone());
        cases.push(case(format!("nonce: {what}"), r, 401, u, "malformed token"));
    }
    cases
}

// ------------------------------------------------------------ the tests

/// A table of cases, built from one run's keys.
type Group = fn(&Ctx) -> Vec<Case>;

async fn run_group(label: &str, build: Group) {
    let ctx = Ctx::new();
    let rig = Rig::start(label, &ctx).await;
    run(&rig, build(&ctx)).await;
}

#[tokio::test]
async fn forged_stale_and_misdirected_tokens_are_refused_and_write_nothing() {
    run_group("hostile_tokens", token_cases).await;
}

#[tokio::test]
async fn content_types_sizes_nesting_and_encodings_are_refused_and_write_nothing() {
    run_group("hostile_transport", transport_cases).await;
}

#[tokio::test]
async fn hostile_tenant_ids_and_paths_are_refused_and_write_nothing() {
    run_group("hostile_paths", path_cases).await;
}

#[tokio::test]
async fn json_of_the_wrong_shape_for_each_operation_is_refused_and_writes_nothing() {
    run_group("hostile_shapes", shape_cases).await;
}

#[tokio::test]
async fn rows_contradicting_the_schema_are_refused_and_write_nothing() {
    run_group("hostile_rows", row_cases).await;
}

#[tokio::test]
async fn copy_batches_that_lie_are_refused_and_write_nothing() {
    run_group("hostile_copy", copy_cases).await;
}

#[tokio::test]
async fn hostile_identifiers_in_schema_calls_are_refused_and_write_nothing() {
    run_group("hostile_identifiers", identifier_cases).await;
}

/// REPLAY PROTECTION: fails until the replay cache lands.
#[tokio::test]
async fn replayed_tokens_and_malformed_nonces_are_refused_and_write_nothing() {
    run_group("hostile_replay", replay_cases).await;
}

/// All groups together: the issue asks for at least 100 distinct hostile
/// requests, each with its own name.
#[test]
fn the_hostile_suite_has_at_least_100_distinct_cases() {
    let ctx = Ctx::new();
    let groups: [(&str, Group); 8] = [
        ("tokens", token_cases),
        ("transport", transport_cases),
        ("paths", path_cases),
        ("shapes", shape_cases),
        ("rows", row_cases),
        ("copy", copy_cases),
        ("identifiers", identifier_cases),
        ("replay", replay_cases),
    ];
    let mut names = Vec::new();
    for (group, build) in groups {
        let cases = build(&ctx);
        println!("{group}: {} cases", cases.len());
        names.extend(cases.into_iter().map(|c| c.name));
    }
    println!("total: {} cases", names.len());
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "case names repeat");
    assert!(names.len() >= 100, "only {} cases", names.len());
}

/// Names that are odd but legal (quotes, semicolons, case, reserved-looking
/// words) are not refused: each creates exactly the table it names, in the
/// tenant's mirror schema, and nothing anywhere else.
#[tokio::test]
async fn odd_but_legal_identifiers_create_exactly_the_table_they_name() {
    let ctx = Ctx::new();
    let rig = Rig::start("hostile_legal_names", &ctx).await;
    let baseline = rig.fingerprint().await;
    let legal = [
        TableSchema { name: "x\"; DROP TABLE ctmirror.tables; --".into(), ..items() },
        TableSchema { name: "pg_catalog".into(), ..items() },
        TableSchema { name: "information_schema".into(), ..items() },
        TableSchema { name: "ctmirror.tables".into(), ..items() },
        TableSchema { name: "mirror_globex\".\"items".into(), ..items() },
        TableSchema { name: "Items".into(), ..items() },
        TableSchema { name: "t".repeat(63), ..items() },
        TableSchema { name: "é".repeat(31), ..items() },
        TableSchema { name: "$1".into(), ..items() },
        TableSchema { name: "'); DELETE FROM x; --".into(), ..items() },
        TableSchema {
            name: "cased".into(),
            columns: vec![
                col("id", ColumnType::Int64, false),
                col("Qty", ColumnType::Int32, true),
                col("qty", ColumnType::Int32, true),
                col("QTY\"", ColumnType::Int32, true),
            ],
            primary_key: vec!["id".into()],
        },
    ];
    for table in legal {
        let a = rig.send(&schema_with(&ctx, serde_json::to_value(&table).unwrap())).await;
        assert_eq!(a.status, 200, "{:?}: {}", table.name, a.raw);
        let state = a.body["tables"].as_array().unwrap().iter().find(|t| t["name"] == json!(table.name)).cloned();
        assert_eq!(state.as_ref().map(|s| s["status"].clone()), Some(json!("created")), "{:?}: {}", table.name, a.raw);
        let now = rig.fingerprint().await;
        assert!(baseline.is_subset(&now), "{:?} changed what was there: {:?}", table.name, baseline.difference(&now).collect::<Vec<_>>());
        let mirror_table = format!("{}.{}", quote_ident("mirror_acme"), quote_ident(&table.name));
        let bookkeeping_row = format!("\"table_name\": {}", serde_json::to_string(&table.name).unwrap());
        assert!(now.iter().any(|f| f.starts_with(&format!("relation {mirror_table} kind r"))), "{:?} was not created", table.name);
        for new in now.difference(&baseline) {
            let in_mirror = ["relation", "column", "row"].iter().any(|fact| new.starts_with(&format!("{fact} \"mirror_acme\".")));
            let bookkeeping = new.starts_with("row \"ctmirror\".\"tables\" ") && new.contains(&bookkeeping_row);
            assert!(in_mirror || bookkeeping, "{:?} created something outside its mirror schema: {new}", table.name);
        }
        let columns: Vec<String> = rig
            .db
            .client()
            .await
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = format('%I.%I', 'mirror_acme', $1::text)::regclass AND attnum > 0 ORDER BY attnum",
                &[&table.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(columns, table.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), "{:?}", table.name);
        // The next call without it drops it again: back to the start.
        let a = rig.send(&ctx.json("schema", &json!({"source_identity": "src-1", "tables": [items(), kinds()]}))).await;
        assert_eq!(a.status, 200, "{}", a.raw);
        assert_eq!(rig.fingerprint().await, baseline, "{:?} left something behind", table.name);
    }
}

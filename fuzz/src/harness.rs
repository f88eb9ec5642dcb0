//! What each fuzz target does with one input, shared by the cargo-fuzz
//! targets (`fuzz_targets/*.rs`, nightly) and by the stable test that
//! replays every seed (`tests/fuzz_seeds.rs` includes this file), so the
//! seeds guard against regressions on every `scripts/test` run.
//!
//! Each function takes arbitrary bytes, runs them through the code the
//! receiver runs on untrusted input before it touches its database, and
//! panics only when that code panics or breaks one of the invariants
//! asserted here. Everything is deterministic: fixed keys, a fixed clock.
//!
//! This file must compile both as the fuzz crate's library and as a module
//! of an integration test of `ctmirror`: it uses only `ctmirror`, `bytes`
//! and `serde_json`.

use bytes::Bytes;
use ctmirror::auth::{self, AuthError, Claims, Keypair, RequestFacts, Role, Verifier};
use ctmirror::ids::{AppId, TenantId};
use ctmirror::protocol::copy::{CopyBatch, CopyFormat, TupleReader};
use ctmirror::protocol::{ColumnSchema, ColumnType, Cursor, RowBatch, TableSchema};
use ctmirror::receiver::{prechecks, ErrorKind};

/// The clock every target runs at (2027-01-15), so seeds signed for it
/// stay inside the window.
pub const NOW: i64 = 1_800_000_000;
pub const TENANT: &str = "acme";
pub const APP: &str = "crm";
pub const PATH: &str = "/v1/tenants/acme/rows";
/// The body every token target request carries.
pub const BODY: &[u8] = br#"{"table":"t"}"#;

/// The agent's key, fixed so that seeds can hold valid tokens.
pub fn agent_key() -> Keypair {
    Keypair::from_seed([7; 32])
}

/// The partner's key, for receiver-role tokens.
pub fn partner_key() -> Keypair {
    Keypair::from_seed([9; 32])
}

/// The receiver's token checks with the fixed agent key.
pub fn verifier() -> Verifier {
    Verifier { agent_keys: vec![agent_key().public()], app: AppId::new(APP).unwrap(), max_skew_secs: 300 }
}

/// Claims the verifier accepts for the fixed request: the seeds start here.
pub fn valid_claims() -> Claims {
    Claims {
        role: Role::Agent,
        tenant: TenantId::new(TENANT).unwrap(),
        app: AppId::new(APP).unwrap(),
        ts: NOW,
        nonce: "AAECAwQFBgcICQoLDA0ODw".into(),
        method: "POST".into(),
        path: PATH.into(),
        body_sha256: auth::body_digest(BODY),
        status: None,
    }
}

/// Token target. The input is tried two ways:
///
/// - as the `Authorization` header (and as the token after the scheme)
///   through [`Verifier::verify`] and [`auth::decode_verified`], which must
///   refuse it without panicking unless it is a token the fixed key signed
///   for the fixed request;
/// - as claims JSON which, if it parses, is signed with the agent's key, so
///   that every check after the signature (window, tenant, application,
///   request, body) sees arbitrary values; a token the verifier accepts
///   must then match the request in every respect.
pub fn token(data: &[u8]) {
    let verifier = verifier();
    let tenant = TenantId::new(TENANT).unwrap();
    let facts = RequestFacts { tenant: &tenant, method: "POST", path: PATH, body: BODY };

    // The receiver reads the header with `HeaderValue::to_str`, which only
    // passes visible ASCII; anything else arrives as "".
    if let Ok(text) = std::str::from_utf8(data) {
        for header in [text.to_owned(), format!("CtMirror {text}")] {
            if let Ok(claims) = verifier.verify(Some(&header), &facts, NOW) {
                assert_accepted_claims_match(&claims);
            }
        }
        for role in [Role::Agent, Role::Receiver] {
            let _ = auth::decode_verified(text, role, &[agent_key().public()]);
        }
        let _ = auth::check_receiver_answer(text, &[partner_key().public()], &valid_claims(), 300, NOW);
        let _ = auth::check_answer(Some(text), &[partner_key().public()], &valid_claims(), 200, BODY, 300, NOW);
    }

    if let Ok(claims) = serde_json::from_slice::<Claims>(data) {
        let key = match claims.role {
            Role::Agent => agent_key(),
            Role::Receiver => partner_key(),
        };
        let token = key.sign(&claims);
        match auth::decode_verified(&token, claims.role, &[key.public()]) {
            Ok(decoded) => assert_eq!(decoded, claims, "claims survive signing"),
            // A signed token whose nonce is not 16 bytes, or whose status
            // claim belongs to the other role, is malformed by design.
            Err(AuthError::Malformed(_)) => {
                assert!(auth::nonce_bytes(&claims.nonce).is_err() || (claims.role == Role::Agent) != claims.status.is_none());
            }
            Err(e) => panic!("a token just signed must decode: {e}"),
        }
        match verifier.verify(Some(&format!("CtMirror {token}")), &facts, NOW) {
            Ok(accepted) => assert_accepted_claims_match(&accepted),
            Err(AuthError::BadSignature) => assert_eq!(claims.role, Role::Receiver, "only the other role's token fails its signature"),
            Err(_) => {}
        }
        let _ = auth::check_receiver_answer(&token, &[partner_key().public()], &valid_claims(), 300, NOW);
    }
}

fn assert_accepted_claims_match(claims: &Claims) {
    assert_eq!(claims.role, Role::Agent);
    assert_eq!(claims.tenant.as_str(), TENANT);
    assert_eq!(claims.app.as_str(), APP);
    assert_eq!((claims.method.as_str(), claims.path.as_str()), ("POST", PATH));
    assert_eq!(claims.body_sha256, auth::body_digest(BODY));
    assert!(claims.ts.abs_diff(NOW) <= 300, "accepted a token from {}", claims.ts);
}

/// The mirror table the batch targets check rows against: every column
/// type, with a composite key of text, int32 and date.
pub fn schema() -> TableSchema {
    use ColumnType as T;
    let col = |name: &str, data_type: ColumnType, nullable: bool| ColumnSchema { name: name.into(), data_type, nullable };
    TableSchema {
        name: "t".into(),
        columns: vec![
            col("k_text", T::Text { max_length: Some(10) }, false),
            col("k_int", T::Int32, false),
            col("k_day", T::Date, false),
            col("flag", T::Bool, true),
            col("small", T::Int16, true),
            col("big", T::Int64, true),
            col("real4", T::Float32, true),
            col("real8", T::Float64, true),
            col("money", T::Decimal { precision: Some(12), scale: Some(2) }, true),
            col("any_number", T::Decimal { precision: None, scale: None }, true),
            col("code", T::FixedText { length: 3 }, true),
            col("blob", T::Bytes { max_length: Some(16) }, true),
            col("at", T::Time { precision: Some(3) }, true),
            col("stamp", T::Timestamp { precision: None }, true),
            col("stamptz", T::TimestampTz { precision: Some(6) }, true),
            col("uid", T::Uuid, true),
            col("doc", T::Json, false),
        ],
        primary_key: vec!["k_text".into(), "k_int".into(), "k_day".into()],
    }
}

/// COPY batch target: [`CopyBatch::decode`], and for a batch that decodes,
/// what the receiver does before `COPY` (cursor rules, the text rows'
/// end-of-data check), plus splitting binary rows into tuples the way the
/// PostgreSQL source does.
pub fn copy_batch(data: &[u8]) {
    let Ok(batch) = CopyBatch::decode(Bytes::copy_from_slice(data)) else { return };
    let again = CopyBatch::decode(Bytes::from(batch.encode())).expect("a decoded batch encodes to a body that decodes");
    assert_eq!(again, batch, "decode(encode(batch)) is the batch");
    let _ = Cursor::may_advance(batch.header.from.as_ref(), &batch.header.to);
    let schema = schema();
    if let Err(e) = prechecks::copy_rows(&batch, &schema) {
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    }
    if batch.header.format == CopyFormat::Binary {
        split_tuples(&batch.payload);
    }
}

/// Every tuple [`TupleReader`] finds lies inside the data, and so does
/// every field and prefix it reports.
fn split_tuples(mut data: &[u8]) {
    let mut reader = TupleReader::default();
    while let Ok(Some(len)) = reader.read(data) {
        assert!(len >= 2 && len <= data.len(), "tuple of {len} bytes in {}", data.len());
        for i in 0..reader.fields.len() {
            if let Some(v) = reader.field(data, i) {
                assert!(v.len() <= len);
            }
        }
        for n in 0..=reader.fields.len() {
            assert!(reader.prefix_end(n) <= len, "prefix of {n} fields past the tuple");
        }
        if reader.fields.is_empty() && len == 2 {
            break; // the trailer, or a tuple of no fields
        }
        data = &data[len..];
    }
}

/// JSON batch target: the body through serde as the receiver parses it,
/// then each row through the checks and conversion RowData runs once it
/// knows the table's schema. A batch either is refused as a bad request
/// or becomes exactly one COPY text line per row.
pub fn json_batch(data: &[u8]) {
    let Ok(batch) = serde_json::from_slice::<RowBatch>(data) else { return };
    let schema = schema();
    match prechecks::json_rows(&schema, &batch) {
        Ok((count, text)) => {
            assert_eq!(count, batch.rows.len() as u64);
            assert_eq!(text.iter().filter(|b| **b == b'\n').count() as u64, count, "one line per row");
            assert!(!text.contains(&0), "COPY text never holds a NUL");
            assert!(text.split(|b| *b == b'\n').all(|line| line != b"\\."), "no end-of-data line");
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{e}"),
    }
    let json = serde_json::to_vec(&batch).expect("a parsed batch serializes");
    let again: RowBatch = serde_json::from_slice(&json).expect("a serialized batch parses");
    assert_eq!((&again.from, &again.to, &again.rows), (&batch.from, &batch.to, &batch.rows), "batches survive a round trip");
}

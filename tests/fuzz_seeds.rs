//! Every seed of the fuzz targets (`fuzz/seeds/<target>/*`) through the
//! same checks the cargo-fuzz targets run, on stable Rust and without a
//! database: a crash the fuzzer once found, saved as a seed, stays fixed
//! with every `scripts/test` run, not only when someone fuzzes.
//!
//! The checks live in `fuzz/src/harness.rs`, compiled here as a module and
//! in `fuzz/` as the targets' library. `fuzz/README.md` says how to add a
//! crash as a seed.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use ctmirror::auth::{self, Claims, Role};
use ctmirror::protocol::copy::{CopyBatch, CopyBatchHeader, CopyFormat, BINARY_TRAILER};
use ctmirror::protocol::{Cursor, Key, Value, Version};
use ctmirror::receiver::prechecks;
use serde_json::json;
use std::path::{Path, PathBuf};

fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target)
}

/// Runs `check` on every seed of `target` and fails naming each seed that
/// panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(seed_dir(target))
        .unwrap_or_else(|e| panic!("seeds of {target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds for {target}");
    let failed: Vec<String> = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{} of {} {target} seeds fail:\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn every_token_seed_passes_the_token_checks() {
    replay("token", harness::token);
}

#[test]
fn every_copy_batch_seed_passes_the_copy_batch_checks() {
    replay("copy_batch", harness::copy_batch);
}

#[test]
fn every_json_batch_seed_passes_the_json_batch_checks() {
    replay("json_batch", harness::json_batch);
}

/// A seed that every check refuses at once only fuzzes the first check: the
/// valid ones must get through all of them.
#[test]
fn the_valid_seeds_pass_every_check() {
    let seed = |target: &str, name: &str| std::fs::read(seed_dir(target).join(name)).unwrap();
    let header = String::from_utf8(seed("token", "valid-header")).unwrap();
    let tenant = ctmirror::ids::TenantId::new(harness::TENANT).unwrap();
    let facts = auth::RequestFacts { tenant: &tenant, method: "POST", path: harness::PATH, body: harness::BODY };
    harness::verifier().verify(Some(&header), &facts, harness::NOW).expect("valid-header verifies");

    let schema = harness::schema();
    for name in ["changes.json", "snapshot.json", "escapes-and-specials.json"] {
        let batch: ctmirror::protocol::RowBatch = serde_json::from_slice(&seed("json_batch", name)).unwrap();
        prechecks::json_rows(&schema, &batch).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["text-snapshot", "text-changes", "binary-tuples", "cursor-only"] {
        let batch = CopyBatch::decode(seed("copy_batch", name).into()).unwrap_or_else(|e| panic!("{name}: {e}"));
        prechecks::copy_rows(&batch, &schema).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The seeds that are built rather than found: valid inputs for the
/// fixed keys and clock of the harness, and near misses of them. Written
/// by hand when the harness's keys, clock or a format change:
/// `cargo test --test fuzz_seeds -- --ignored`. Files the fuzzer found
/// (`crash-*`, `found-*`) are left alone.
#[test]
#[ignore = "writes fuzz/seeds; run by hand after changing the harness or a format"]
fn write_built_seeds() {
    let write = |target: &str, name: &str, data: Vec<u8>| {
        std::fs::create_dir_all(seed_dir(target)).unwrap();
        std::fs::write(seed_dir(target).join(name), data).unwrap();
    };

    // token
    let claims = harness::valid_claims();
    let token = harness::agent_key().sign(&claims);
    let claim_seed = |edit: &dyn Fn(&mut Claims)| {
        let mut c = claims.clone();
        edit(&mut c);
        serde_json::to_vec(&c).unwrap()
    };
    write("token", "valid-header", format!("CtMirror {token}").into_bytes());
    write("token", "valid-token", token.clone().into_bytes());
    write("token", "partner-answer", auth::receiver_answer(&harness::partner_key(), &claims).into_bytes());
    write("token", "truncated-signature", token.as_bytes()[..token.len() - 10].to_vec());
    write("token", "bearer", format!("Bearer {token}").into_bytes());
    write("token", "claims-valid.json", claim_seed(&|_| {}));
    write("token", "claims-receiver-role.json", claim_seed(&|c| c.role = Role::Receiver));
    write("token", "claims-expired.json", claim_seed(&|c| c.ts -= 301));
    // The overflow the token target found: |i64::MIN - now| panicked in
    // debug builds and wrapped to "inside the window" in release builds.
    write("token", "claims-ts-i64-min.json", claim_seed(&|c| c.ts = i64::MIN));
    write("token", "claims-ts-i64-max.json", claim_seed(&|c| c.ts = i64::MAX));
    write("token", "claims-other-body.json", claim_seed(&|c| c.body_sha256 = auth::body_digest(b"")));
    write("token", "claims-other-path.json", claim_seed(&|c| c.path = "/v1/tenants/acme/schema".into()));

    // copy_batch
    let snapshot = Cursor::Snapshot { version: Version(5), after_key: Some(Key(vec![Value::Text("b".into()), Value::Int(2), Value::Text("2024-01-02".into())])) };
    let changes = |v: i64| Cursor::Changes { version: Version(v), after_key: None };
    let header = |format: CopyFormat, rows: u64, from: Option<Cursor>, to: Cursor| CopyBatchHeader {
        table: "t".into(),
        schema_hash: harness::schema().hash(),
        from,
        to,
        format,
        rows,
    };
    let batch = |h: CopyBatchHeader, payload: &[u8]| CopyBatch { header: h, payload: payload.to_vec().into() }.encode();
    let text_row = "a\t1\t2024-01-01\tt\t2\t3\t1.5\tNaN\t10.25\t-100000.5\tabc\t\\\\x00ff\t12:00:00\t2024-01-01 10:00:00\t2024-01-01 10:00:00+00\t123e4567-e89b-12d3-a456-426614174000\t{}\n";
    let field = |v: Option<&[u8]>| match v {
        None => (-1i32).to_be_bytes().to_vec(),
        Some(v) => [&(v.len() as i32).to_be_bytes()[..], v].concat(),
    };
    let tuple = [&3i16.to_be_bytes()[..], &field(Some(b"a")), &field(Some(&1i32.to_be_bytes())), &field(None)].concat();
    write("copy_batch", "text-snapshot", batch(header(CopyFormat::Text, 1, None, snapshot.clone()), text_row.as_bytes()));
    write("copy_batch", "text-changes", batch(header(CopyFormat::Text, 2, Some(snapshot.clone()), changes(7)), format!("6\tf\t{text_row}7\tt\ta\t1\t2024-01-01\t\\N\n").as_bytes()));
    write("copy_batch", "text-end-of-data", batch(header(CopyFormat::Text, 2, None, changes(7)), b"6\tf\ta\n\\.\n7\tf\tb\n"));
    write("copy_batch", "binary-tuples", batch(header(CopyFormat::Binary, 2, None, snapshot.clone()), &[&tuple[..], &tuple, BINARY_TRAILER].concat()));
    write("copy_batch", "binary-cut", batch(header(CopyFormat::Binary, 1, None, snapshot), &tuple[..tuple.len() - 3]));
    write("copy_batch", "cursor-only", batch(header(CopyFormat::Binary, 0, Some(changes(7)), changes(9)), b""));
    write("copy_batch", "header-length-lies", [&[0u8, 0, 1, 0][..], b"{\"table\":\"t\"}"].concat());

    // json_batch
    let row = json!(["a", 1, "2024-01-01", true, 2, 3, 1.5, "NaN", "10.25", "-100000.5", "abc", "AAH/", "12:00:00.5", "2024-01-01T10:00:00", "2024-01-01T10:00:00Z", "123e4567-e89b-12d3-a456-426614174000", "{\"a\":[1,null]}"]);
    let json_batch = |from: Option<Cursor>, to: Cursor, rows: serde_json::Value| {
        serde_json::to_vec_pretty(&json!({"table": "t", "schema_hash": harness::schema().hash(), "from": from, "to": to, "rows": rows})).unwrap()
    };
    let delete = json!({"op": "delete", "version": 6, "key": ["b", 2, "2024-01-02"]});
    write("json_batch", "changes.json", json_batch(Some(changes(5)), changes(7), json!([{"op": "upsert", "version": 6, "values": row}, delete])));
    write("json_batch", "snapshot.json", json_batch(None, Cursor::Snapshot { version: Version(5), after_key: None }, json!([{"op": "upsert", "version": 5, "values": row}])));
    let mut odd = row.clone();
    odd[0] = json!("t\tn\nb\\s\r\\.");
    odd[6] = json!("-Infinity");
    odd[12] = json!("24:00:00");
    write("json_batch", "escapes-and-specials.json", json_batch(None, changes(7), json!([{"op": "upsert", "version": 7, "values": odd}])));
    let mut wrong = row.clone();
    wrong[4] = json!(40000);
    write("json_batch", "out-of-range.json", json_batch(None, changes(7), json!([{"op": "upsert", "version": 7, "values": wrong}])));
    write("json_batch", "key-twice.json", json_batch(None, changes(7), json!([{"op": "upsert", "version": 6, "values": row}, {"op": "delete", "version": 6, "key": ["a", 1, "2024-01-01"]}])));
    write("json_batch", "null-key.json", json_batch(None, changes(7), json!([{"op": "delete", "version": 6, "key": [null, 1, "2024-01-01"]}])));
}

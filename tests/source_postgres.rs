//! The PostgreSQL source backend against a real server: change tracking
//! installation, schema reading, snapshot and change chunks, retention.
//! Each test creates its own database (see `support`).

mod support;

use ctmirror::protocol::{ColumnType, Key, Value, Version};
use ctmirror::source::postgres::PostgresSource;
use ctmirror::source::{
    ChangePosition, ChangeRow, ChunkLimits, RowOp, Source, SourceErrorKind, SourceSchema, SourceTable,
};
use std::time::Duration;
use support::TestDb;
use tokio_postgres::Client;

const HOUR: Duration = Duration::from_secs(3600);
const WIDE_OPEN: ChunkLimits = ChunkLimits { max_rows: 1_000_000, max_bytes: usize::MAX / 2 };

fn table(name: &str) -> SourceTable {
    SourceTable { schema: None, name: name.into() }
}

fn cols(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// A fresh database with `ddl` applied, an admin client and a source.
async fn setup(label: &str, ddl: &str) -> (TestDb, Client, PostgresSource) {
    let db = TestDb::create(label).await;
    let client = db.client().await;
    client.batch_execute(ddl).await.expect("ddl");
    let source = PostgresSource::connect(&db.url, HOUR).await.expect("connect");
    (db, client, source)
}

/// Enables tracking and reads the schema of the named columns.
async fn track(source: &mut PostgresSource, t: &SourceTable, columns: &[&str]) -> SourceSchema {
    source.ensure_tracking(t).await.expect("ensure_tracking");
    source.read_schema(t, &cols(columns)).await.expect("read_schema")
}

/// The id of the transaction `sql` runs in, committed.
async fn write(client: &mut Client, sql: &str) -> i64 {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(sql).await.unwrap();
    let v: i64 = tx.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await.unwrap().get(0);
    tx.commit().await.unwrap();
    v
}

/// Waits until every transaction begun so far is final and returns the
/// current version. Versions are cluster-wide transaction ids, so a test
/// running in parallel with an open transaction holds everyone's current
/// version back for a moment.
async fn settle(source: &mut PostgresSource, client: &Client) -> Version {
    let next: i64 = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..600 {
        let v = source.current_version().await.unwrap();
        if v.0 >= next - 1 {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("transactions before {next} did not finish within 30 s");
}

/// Every change after `from` up to the settled current version.
async fn drain_changes(
    source: &mut PostgresSource,
    client: &Client,
    schema: &SourceSchema,
    from: Version,
    max_rows: usize,
) -> Vec<ChangeRow> {
    let upper = settle(source, client).await;
    drain_changes_upto(source, schema, from, upper, max_rows).await
}

/// Every change after `from` up to `upper`, read in chunks of `max_rows`
/// through cursors that stand inside versions.
async fn drain_changes_upto(
    source: &mut PostgresSource,
    schema: &SourceSchema,
    from: Version,
    upper: Version,
    max_rows: usize,
) -> Vec<ChangeRow> {
    let mut pos = ChangePosition { version: from, after_key: None };
    let mut out = Vec::new();
    loop {
        let limits = ChunkLimits { max_rows, max_bytes: usize::MAX / 2 };
        let chunk = source.changes_chunk(schema, &pos, upper, limits).await.unwrap();
        let Some(last) = chunk.last() else { break };
        pos = ChangePosition { version: last.version, after_key: Some(last.key.clone()) };
        out.extend(chunk);
    }
    out
}

/// Every row of a snapshot, in chunks of `max_rows`.
async fn drain_snapshot(
    source: &mut PostgresSource,
    schema: &SourceSchema,
    max_rows: usize,
) -> Vec<Vec<Value>> {
    let mut after: Option<Key> = None;
    let mut out = Vec::new();
    loop {
        let limits = ChunkLimits { max_rows, max_bytes: usize::MAX / 2 };
        let chunk = source.snapshot_chunk(schema, after.as_ref(), limits).await.unwrap();
        let Some(last) = chunk.last() else { break };
        after = Some(schema.key_of(last));
        out.extend(chunk);
    }
    out
}

#[tokio::test]
async fn enabling_is_idempotent_and_installs_into_ctmirror_ct() {
    let (db, client, mut source) =
        setup("enable_idempotent", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    assert!(source.ensure_tracking(&table("t")).await.unwrap().newly_enabled);
    assert!(!source.ensure_tracking(&table("t")).await.unwrap().newly_enabled);
    let mut other = PostgresSource::connect(&db.url, HOUR).await.unwrap();
    assert!(!other.ensure_tracking(&table("t")).await.unwrap().newly_enabled);

    let tracked: i64 =
        client.query_one("SELECT count(*) FROM ctmirror_ct.tracked", &[]).await.unwrap().get(0);
    assert_eq!(tracked, 1);
    let outside: Vec<String> = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'ctmirror_ct')
                AND c.relname <> 't' AND c.relname <> 't_pkey'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(outside.is_empty(), "objects outside ctmirror_ct: {outside:?}");
    let functions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'ctmirror_ct' AND p.prosecdef",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // insert, update, update_key (row-level, key changes), delete, truncate,
    // truncated (records the new filenode), and the three replica row
    // triggers
    assert_eq!(functions, 9);
    let min_valid = source.min_valid_version(&table("t")).await.unwrap();
    let enabled: i64 =
        client.query_one("SELECT enabled_version FROM ctmirror_ct.tracked", &[]).await.unwrap().get(0);
    assert_eq!(min_valid, Version(enabled));
}

#[tokio::test]
async fn two_agents_enabling_at_once_enable_exactly_once() {
    let db = TestDb::create("enable_race").await;
    db.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = PostgresSource::connect(&url, HOUR).await.unwrap();
            s.ensure_tracking(&table("t")).await.unwrap().newly_enabled
        }));
    }
    let mut enabled = 0;
    for t in tasks {
        enabled += t.await.unwrap() as usize;
    }
    assert_eq!(enabled, 1);
}

#[tokio::test]
async fn table_without_primary_key_is_refused_with_a_clear_error() {
    let (_db, _c, mut source) = setup("no_pk", "CREATE TABLE loose (id int, v text)").await;
    let e = source.ensure_tracking(&table("loose")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(
        e.message.contains("public.loose has no primary key; change tracking needs one"),
        "{}",
        e.message
    );
    let e = source.read_schema(&table("loose"), &cols(&["id"])).await.unwrap_err();
    assert!(e.message.contains("no primary key"), "{}", e.message);
}

#[tokio::test]
async fn missing_table_is_refused_naming_it() {
    let (_db, _c, mut source) = setup("missing_table", "").await;
    let e = source.ensure_tracking(&table("ghost")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("table public.ghost not found"), "{}", e.message);
    let e = source.read_schema(&table("ghost"), &cols(&["id"])).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    let e = source.min_valid_version(&table("ghost")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
}

#[tokio::test]
async fn untracked_table_has_no_min_valid_version() {
    let (_db, _c, mut source) = setup("untracked", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let e = source.min_valid_version(&table("t")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("not enabled on table public.t"), "{}", e.message);
}

#[tokio::test]
async fn schema_of_every_supported_type_is_mapped() {
    let ddl = "
        CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE DOMAIN short_code AS varchar(10);
        CREATE TABLE all_types (
            id bigint PRIMARY KEY, b boolean NOT NULL, i2 smallint, i4 integer, f4 real, f8 double precision,
            n numeric(12,3), nu numeric, t text, vc varchar(20), vcu varchar, c char(3), by bytea, d date,
            tm time(3), tmu time, ts timestamp(0), tsu timestamp, tz timestamptz(6), u uuid, j json, jb jsonb,
            m mood, sc short_code
        )";
    let (_db, _c, mut source) = setup("all_types", ddl).await;
    let names = [
        "id", "b", "i2", "i4", "f4", "f8", "n", "nu", "t", "vc", "vcu", "c", "by", "d", "tm", "tmu", "ts",
        "tsu", "tz", "u", "j", "jb", "m", "sc",
    ];
    let schema = source.read_schema(&table("all_types"), &cols(&names)).await.unwrap();
    use ColumnType as T;
    let expected = vec![
        T::Int64,
        T::Bool,
        T::Int16,
        T::Int32,
        T::Float32,
        T::Float64,
        T::Decimal { precision: Some(12), scale: Some(3) },
        T::Decimal { precision: None, scale: None },
        T::Text { max_length: None },
        T::Text { max_length: Some(20) },
        T::Text { max_length: None },
        T::FixedText { length: 3 },
        T::Bytes { max_length: None },
        T::Date,
        T::Time { precision: Some(3) },
        T::Time { precision: None },
        T::Timestamp { precision: Some(0) },
        T::Timestamp { precision: None },
        T::TimestampTz { precision: Some(6) },
        T::Uuid,
        T::Json,
        T::Json,
        T::Text { max_length: None },
        T::Text { max_length: Some(10) },
    ];
    let got: Vec<ColumnType> = schema.columns.iter().map(|c| c.column.data_type.clone()).collect();
    assert_eq!(got, expected);
    let got_names: Vec<&str> = schema.columns.iter().map(|c| c.column.name.as_str()).collect();
    assert_eq!(got_names, names);
    assert_eq!(schema.primary_key, vec!["id"]);
    assert!(!schema.columns[0].column.nullable && !schema.columns[1].column.nullable);
    assert!(schema.columns[2].column.nullable);
    assert_eq!(schema.columns[9].native_type, "character varying(20)");
    assert_eq!(schema.columns[6].native_type, "numeric(12,3)");
    assert_eq!(schema.columns[22].native_type, "public.mood");
    assert!(schema.to_protocol("all_types").validate().is_ok());
}

#[tokio::test]
async fn unsupported_type_is_refused_naming_the_column() {
    let ddl = "CREATE TABLE odd_types (id int PRIMARY KEY, span interval, tags text[], ok text)";
    let (_db, _c, mut source) = setup("unsupported", ddl).await;
    let e = source.read_schema(&table("odd_types"), &cols(&["id", "span"])).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(
        e.message.contains("column \"span\" of table public.odd_types has type interval, which ctmirror cannot mirror; leave it out of the schema map"),
        "{}",
        e.message
    );
    let e = source.read_schema(&table("odd_types"), &cols(&["id", "tags"])).await.unwrap_err();
    assert!(e.message.contains("\"tags\"") && e.message.contains("text[]"), "{}", e.message);
    // Leaving them out is enough.
    assert!(source.read_schema(&table("odd_types"), &cols(&["id", "ok"])).await.is_ok());
}

#[tokio::test]
async fn unmapped_primary_key_column_is_refused() {
    let ddl = "CREATE TABLE lines (order_id int, line int, v text, PRIMARY KEY (order_id, line))";
    let (_db, _c, mut source) = setup("unmapped_pk", ddl).await;
    let e = source.read_schema(&table("lines"), &cols(&["order_id", "v"])).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(
        e.message.contains("primary key column \"line\" of table public.lines must be mapped"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn missing_named_column_is_refused_naming_it() {
    let (_db, _c, mut source) = setup("missing_column", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let e = source.read_schema(&table("t"), &cols(&["id", "nope"])).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("column \"nope\" of table public.t does not exist"), "{}", e.message);
}

#[tokio::test]
async fn only_named_columns_appear_in_schema_and_chunks() {
    let ddl = "CREATE TABLE users (name text, id int PRIMARY KEY, password_hash text);
               INSERT INTO users VALUES ('ann', 1, 'SECRET')";
    let (_db, mut client, mut source) = setup("deny_by_default", ddl).await;
    // Named out of table order: the schema follows the table's order.
    let schema = track(&mut source, &table("users"), &["id", "name"]).await;
    let names: Vec<&str> = schema.columns.iter().map(|c| c.column.name.as_str()).collect();
    assert_eq!(names, ["name", "id"]);
    let rows = drain_snapshot(&mut source, &schema, 10).await;
    assert_eq!(rows, vec![vec![text("ann"), int(1)]]);
    let from = source.min_valid_version(&table("users")).await.unwrap();
    write(&mut client, "UPDATE users SET password_hash = 'NEW SECRET', name = 'bob'").await;
    let changes = drain_changes(&mut source, &client, &schema, from, 10).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].op, RowOp::Upsert(vec![text("bob"), int(1)]));
    assert!(!format!("{changes:?}{rows:?}").contains("SECRET"));
}

#[tokio::test]
async fn net_changes_keep_one_row_per_key_with_the_latest_version() {
    let (_db, mut client, mut source) =
        setup("net_changes", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    write(&mut client, "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')").await;
    write(&mut client, "UPDATE t SET v = 'a2' WHERE id = 1").await;
    let last_update = write(&mut client, "UPDATE t SET v = 'a3' WHERE id = 1").await;
    let delete = write(&mut client, "DELETE FROM t WHERE id = 2").await;
    write(&mut client, "DELETE FROM t WHERE id = 3").await;
    let reinsert = write(&mut client, "INSERT INTO t VALUES (3, 'c again')").await;

    let changes = drain_changes(&mut source, &client, &schema, from, 2).await;
    assert_eq!(
        changes,
        vec![
            ChangeRow {
                version: Version(last_update),
                key: Key(vec![int(1)]),
                op: RowOp::Upsert(vec![int(1), text("a3")])
            },
            ChangeRow { version: Version(delete), key: Key(vec![int(2)]), op: RowOp::Delete },
            ChangeRow {
                version: Version(reinsert),
                key: Key(vec![int(3)]),
                op: RowOp::Upsert(vec![int(3), text("c again")])
            },
        ]
    );
    // Past the last update, only later changes remain.
    let later = drain_changes(&mut source, &client, &schema, Version(last_update), 10).await;
    assert_eq!(later.len(), 2);
}

#[tokio::test]
async fn triggers_are_statement_level_and_a_20k_row_update_yields_20k_changes() {
    let ddl = "CREATE TABLE big (id int PRIMARY KEY, v text);
               INSERT INTO big SELECT g, 'x' FROM generate_series(1, 20000) g";
    let (_db, mut client, mut source) = setup("statement_level", ddl).await;
    let schema = track(&mut source, &table("big"), &["id", "v"]).await;
    let triggers: Vec<(String, i16, bool, String)> = client
        .query(
            "SELECT tgname::text, tgtype, tgqual IS NOT NULL, tgenabled::text FROM pg_trigger
              WHERE tgrelid = 'big'::regclass AND tgname LIKE 'ctmirror%' ORDER BY tgname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(triggers.len(), 9);
    // Every trigger that carries rows for ordinary writers is
    // statement-level; the one row-level trigger they fire only fires
    // (WHEN) for rows whose key changed. The other row-level ones fire for
    // replica writers only (the logical-replication apply worker fires no
    // statement triggers).
    for (name, tgtype, when, enabled) in &triggers {
        let row_level = tgtype & 1 == 1;
        let replica = name.starts_with("ctmirror_ct_replica_");
        assert_eq!(row_level, name == "ctmirror_ct_update_key" || replica, "{triggers:?}");
        assert_eq!(*when, name == "ctmirror_ct_update_key", "{triggers:?}");
        assert_eq!(enabled, if replica { "R" } else { "A" }, "{triggers:?}");
    }

    let from = source.min_valid_version(&table("big")).await.unwrap();
    let version = write(&mut client, "UPDATE big SET v = 'y'").await;
    let side: i64 = client
        .query_one(
            "SELECT count(*) FROM ctmirror_ct.tracked t, LATERAL (SELECT 1) x WHERE t.table_name = 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(side, 1);
    let changes = drain_changes(&mut source, &client, &schema, from, 7000).await;
    assert_eq!(changes.len(), 20000);
    assert!(changes.iter().all(|c| c.version == Version(version)));
    assert!(changes.iter().all(|c| matches!(&c.op, RowOp::Upsert(v) if v[1] == text("y"))));
    let ids: Vec<i64> = changes
        .iter()
        .map(|c| match c.key.0[0] {
            Value::Int(i) => i,
            _ => -1,
        })
        .collect();
    assert_eq!(ids, (1..=20000).collect::<Vec<i64>>());
}

#[tokio::test]
async fn primary_key_update_yields_delete_of_old_key_and_upsert_of_new() {
    // Deferrable, so the key swap below is legal within one statement.
    let ddl =
        "CREATE TABLE t (id int PRIMARY KEY DEFERRABLE, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')";
    let (_db, mut client, mut source) = setup("pk_update", ddl).await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let v = write(&mut client, "UPDATE t SET id = id + 10").await;
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(
        changes,
        vec![
            ChangeRow { version: Version(v), key: Key(vec![int(1)]), op: RowOp::Delete },
            ChangeRow { version: Version(v), key: Key(vec![int(2)]), op: RowOp::Delete },
            ChangeRow {
                version: Version(v),
                key: Key(vec![int(11)]),
                op: RowOp::Upsert(vec![int(11), text("a")])
            },
            ChangeRow {
                version: Version(v),
                key: Key(vec![int(12)]),
                op: RowOp::Upsert(vec![int(12), text("b")])
            },
        ]
    );
    // A swap of keys within one statement leaves both keys present.
    let swap = write(&mut client, "UPDATE t SET id = CASE id WHEN 11 THEN 12 ELSE 11 END").await;
    let changes = drain_changes(&mut source, &client, &schema, Version(v), 100).await;
    assert_eq!(
        changes,
        vec![
            ChangeRow {
                version: Version(swap),
                key: Key(vec![int(11)]),
                op: RowOp::Upsert(vec![int(11), text("b")])
            },
            ChangeRow {
                version: Version(swap),
                key: Key(vec![int(12)]),
                op: RowOp::Upsert(vec![int(12), text("a")])
            },
        ]
    );
}

#[tokio::test]
async fn truncate_yields_deletes() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 5)";
    let (_db, mut client, mut source) = setup("truncate", ddl).await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let v = write(&mut client, "TRUNCATE t").await;
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(changes.len(), 5);
    assert!(changes.iter().all(|c| c.op == RowOp::Delete && c.version == Version(v)));
    // Truncate and refill in one transaction: upserts win.
    write(&mut client, "TRUNCATE t; INSERT INTO t VALUES (3)").await;
    let changes = drain_changes(&mut source, &client, &schema, Version(v), 100).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].op, RowOp::Upsert(vec![int(3)]));
}

#[tokio::test]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let (db, mut client, mut source) = setup("late_commit", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let start = source.min_valid_version(&table("t")).await.unwrap();

    let mut slow_client = db.client().await;
    let slow = slow_client.transaction().await.unwrap();
    slow.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let slow_version: i64 =
        slow.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await.unwrap().get(0);

    let fast_version = write(&mut client, "INSERT INTO t VALUES (2)").await;
    assert!(fast_version > slow_version);
    let cursor = source.current_version().await.unwrap();
    assert!(cursor.0 < slow_version, "current version {cursor} passed running transaction {slow_version}");
    // The fast transaction is committed but not yet final: nothing is read.
    assert!(drain_changes_upto(&mut source, &schema, start, cursor, 10).await.is_empty());

    slow.commit().await.unwrap();
    let changes = drain_changes(&mut source, &client, &schema, cursor, 10).await;
    let versions: Vec<i64> = changes.iter().map(|c| c.version.0).collect();
    assert_eq!(versions, vec![slow_version, fast_version]);
}

#[tokio::test]
async fn changes_chunk_with_a_cursor_inside_a_version_continues_after_that_key() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY)";
    let (_db, mut client, mut source) = setup("inside_version", ddl).await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let v = write(&mut client, "INSERT INTO t SELECT generate_series(1, 10)").await;
    let upper = settle(&mut source, &client).await;
    let limits = ChunkLimits { max_rows: 3, max_bytes: 1 << 20 };
    let first = source
        .changes_chunk(&schema, &ChangePosition { version: from, after_key: None }, upper, limits)
        .await
        .unwrap();
    assert_eq!(first.len(), 3);
    let pos = ChangePosition { version: Version(v), after_key: Some(Key(vec![int(3)])) };
    let next = source.changes_chunk(&schema, &pos, upper, limits).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
        vec![Key(vec![int(4)]), Key(vec![int(5)]), Key(vec![int(6)])]
    );
    // A whole version consumed: nothing of it again.
    let done = ChangePosition { version: Version(v), after_key: None };
    assert!(source.changes_chunk(&schema, &done, upper, limits).await.unwrap().is_empty());
    // Nothing past `upper`.
    let capped = source
        .changes_chunk(&schema, &ChangePosition { version: from, after_key: None }, Version(v - 1), limits)
        .await
        .unwrap();
    assert!(capped.is_empty());
    assert_eq!(drain_changes(&mut source, &client, &schema, from, 4).await.len(), 10);
}

#[tokio::test]
async fn snapshot_pagination_over_a_composite_text_int_key_visits_every_row_once() {
    let ddl = "CREATE TABLE docs (name text, rev int, body text, PRIMARY KEY (name, rev))";
    let (_db, client, mut source) = setup("snapshot_pages", ddl).await;
    let names = [
        "a",
        "A",
        "B",
        "b",
        "ä",
        "Ä",
        "z",
        "Z",
        "日本",
        "",
        " ",
        "a b",
        "a\"b",
        "ß",
        "emoji 🎉",
        "aa",
        "a-b",
    ];
    for (i, n) in names.iter().enumerate() {
        for rev in [1, 2, -5] {
            client
                .execute("INSERT INTO docs VALUES ($1, $2, $3)", &[n, &rev, &format!("body {i}")])
                .await
                .unwrap();
        }
    }
    let schema = track(&mut source, &table("docs"), &["name", "rev", "body"]).await;
    let expected: Vec<Vec<Value>> = client
        .query("SELECT name, rev, body FROM docs ORDER BY name, rev", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| vec![text(r.get(0)), int(r.get::<_, i32>(1) as i64), text(r.get(2))])
        .collect();
    for page in [1, 2, 3, 7, 1000] {
        assert_eq!(drain_snapshot(&mut source, &schema, page).await, expected, "page size {page}");
    }
}

#[tokio::test]
async fn byte_limit_bounds_a_chunk_of_wide_rows_but_returns_at_least_one() {
    let ddl = "CREATE TABLE wide (id int PRIMARY KEY, blob text)";
    let (_db, mut client, mut source) = setup("byte_limit", ddl).await;
    let schema = track(&mut source, &table("wide"), &["id", "blob"]).await;
    let from = source.min_valid_version(&table("wide")).await.unwrap();
    write(&mut client, "INSERT INTO wide SELECT g, repeat('x', 100000) FROM generate_series(1, 50) g").await;

    let limits = ChunkLimits { max_rows: 1000, max_bytes: 350_000 };
    let chunk = source.snapshot_chunk(&schema, None, limits).await.unwrap();
    assert_eq!(chunk.len(), 3);
    let size: usize = chunk.iter().flatten().map(Value::wire_size).sum();
    assert!(size <= 350_000);
    let tiny = ChunkLimits { max_rows: 1000, max_bytes: 10 };
    assert_eq!(source.snapshot_chunk(&schema, None, tiny).await.unwrap().len(), 1);

    let upper = settle(&mut source, &client).await;
    let pos = ChangePosition { version: from, after_key: None };
    let changes = source.changes_chunk(&schema, &pos, upper, limits).await.unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(source.changes_chunk(&schema, &pos, upper, tiny).await.unwrap().len(), 1);
}

#[tokio::test]
async fn maintain_with_zero_retention_removes_old_changes_and_raises_min_valid_version() {
    let (db, mut client, mut source) = setup("retention", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let enabled = source.min_valid_version(&table("t")).await.unwrap();
    write(&mut client, "INSERT INTO t SELECT generate_series(1, 5)").await;

    // A long retention keeps everything.
    source.maintain().await.unwrap();
    assert_eq!(source.min_valid_version(&table("t")).await.unwrap(), enabled);
    assert_eq!(drain_changes(&mut source, &client, &schema, enabled, 100).await.len(), 5);

    // The longest retention any agent asked for wins; this agent's request
    // of an hour has lapsed.
    client.batch_execute("DELETE FROM ctmirror_ct.retention_requests").await.unwrap();
    let mut eager = PostgresSource::connect(&db.url, Duration::ZERO).await.unwrap();
    let before = settle(&mut eager, &client).await;
    eager.maintain().await.unwrap();
    let min_valid = eager.min_valid_version(&table("t")).await.unwrap();
    assert!(min_valid >= before && min_valid > enabled, "{min_valid} vs {before}");
    let side: i64 = client
        .query_one(&format!("SELECT count(*) FROM ctmirror_ct.\"changes_{}\"", oid(&client, "t").await), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(side, 0);
    // Later changes are kept and readable from the new min valid version.
    write(&mut client, "DELETE FROM t WHERE id = 1").await;
    let changes = drain_changes(&mut source, &client, &schema, min_valid, 100).await;
    assert_eq!(changes.len(), 1);
}

async fn oid(client: &Client, name: &str) -> u32 {
    client.query_one("SELECT $1::text::regclass::oid", &[&name]).await.unwrap().get(0)
}

#[tokio::test]
async fn maintain_forgets_dropped_tables_and_ensure_tracking_reinstalls_a_changed_key() {
    let ddl = "CREATE TABLE gone (id int PRIMARY KEY); CREATE TABLE rekeyed (a int NOT NULL, b int NOT NULL, PRIMARY KEY (a))";
    let (_db, client, mut source) = setup("forget_dropped", ddl).await;
    source.ensure_tracking(&table("gone")).await.unwrap();
    source.ensure_tracking(&table("rekeyed")).await.unwrap();
    client.batch_execute("DROP TABLE gone").await.unwrap();
    source.maintain().await.unwrap();
    let names: Vec<String> = client
        .query("SELECT table_name FROM ctmirror_ct.tracked", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["rekeyed"]);
    let side_tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'ctmirror_ct' AND tablename LIKE 'changes_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(side_tables, 1);

    client
        .batch_execute("ALTER TABLE rekeyed DROP CONSTRAINT rekeyed_pkey, ADD PRIMARY KEY (a, b)")
        .await
        .unwrap();
    assert!(source.ensure_tracking(&table("rekeyed")).await.unwrap().newly_enabled);
    assert!(!source.ensure_tracking(&table("rekeyed")).await.unwrap().newly_enabled);
    client.batch_execute("ALTER TABLE rekeyed DISABLE TRIGGER ctmirror_ct_update").await.unwrap();
    assert!(source.ensure_tracking(&table("rekeyed")).await.unwrap().newly_enabled);
}

#[tokio::test]
async fn quoted_identifiers_work_end_to_end() {
    let ddl = r#"CREATE SCHEMA "my schema";
        CREATE TABLE "my schema"."Order ""Lines""" ("select" int PRIMARY KEY, "Mixed Case" text, "version" int);
        INSERT INTO "my schema"."Order ""Lines""" VALUES (1, 'one', 7)"#;
    let (_db, mut client, mut source) = setup("quoted", ddl).await;
    let t = SourceTable { schema: Some("my schema".into()), name: "Order \"Lines\"".into() };
    let schema = track(&mut source, &t, &["select", "Mixed Case", "version"]).await;
    assert_eq!(schema.primary_key, vec!["select"]);
    assert_eq!(drain_snapshot(&mut source, &schema, 1).await, vec![vec![int(1), text("one"), int(7)]]);
    let from = source.min_valid_version(&t).await.unwrap();
    write(&mut client, r#"UPDATE "my schema"."Order ""Lines""" SET "Mixed Case" = 'uno'; INSERT INTO "my schema"."Order ""Lines""" VALUES (2, 'two', 8)"#).await;
    let changes = drain_changes(&mut source, &client, &schema, from, 1).await;
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0].op, RowOp::Upsert(vec![int(1), text("uno"), int(7)]));
    source.maintain().await.unwrap();
}

#[tokio::test]
async fn odd_values_come_back_as_documented_wire_values() {
    let ddl = "CREATE TABLE odd (id bigint PRIMARY KEY, f8 float8, f4 float4, n numeric(38,10), t text, b bytea,
                 jb jsonb, j json, ts timestamp, tz timestamptz, d date, u uuid, tm time, c char(3), flag boolean)";
    let (_db, client, mut source) = setup("odd_values", ddl).await;
    client
        .batch_execute(
            "INSERT INTO odd VALUES
             (-9223372036854775808, 'NaN', 'Infinity', 9999999999999999999999999999.9999999999, repeat('é', 500000),
              '\\x00ff', '{\"b\": [1, \"ä\"], \"a\": null}', '{\"b\":1,  \"a\":2}', 'infinity', '-infinity', 'infinity',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '23:59:59.999999', 'ab', true),
             (2, '-Infinity', 0.1, -9999999999999999999999999999.9999999999, 'ünïcödé 日本 🎉', '',
              '[]', 'null', '2024-02-29 12:34:56.123456', '2024-01-01 10:00:00+02', '2024-02-29',
              NULL, '00:00', 'abc', false),
             (3, 0.1, 1.5, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        )
        .await
        .unwrap();
    let names = ["id", "f8", "f4", "n", "t", "b", "jb", "j", "ts", "tz", "d", "u", "tm", "c", "flag"];
    let schema = track(&mut source, &table("odd"), &names).await;
    let rows = drain_snapshot(&mut source, &schema, 10).await;
    assert_eq!(rows.len(), 3);
    let big = "é".repeat(500000);
    assert_eq!(
        rows[0],
        vec![
            int(i64::MIN),
            text("NaN"),
            text("Infinity"),
            text("9999999999999999999999999999.9999999999"),
            text(&big),
            text("AP8="),
            text("{\"a\": null, \"b\": [1, \"ä\"]}"),
            text("{\"b\":1,  \"a\":2}"),
            text("infinity"),
            text("-infinity"),
            text("infinity"),
            text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            text("23:59:59.999999"),
            text("ab"),
            Value::Bool(true),
        ]
    );
    assert_eq!(
        rows[1],
        vec![
            int(2),
            text("-Infinity"),
            Value::Float(0.1),
            text("-9999999999999999999999999999.9999999999"),
            text("ünïcödé 日本 🎉"),
            text(""),
            text("[]"),
            text("null"),
            text("2024-02-29T12:34:56.123456"),
            text("2024-01-01T08:00:00Z"),
            text("2024-02-29"),
            Value::Null,
            text("00:00:00"),
            text("abc"),
            Value::Bool(false),
        ]
    );
    let mut nulls = vec![int(3), Value::Float(0.1), Value::Float(1.5), text("0.0000000000")];
    nulls.extend(std::iter::repeat_n(Value::Null, 11));
    assert_eq!(rows[2], nulls);
    // Keys round-trip through cursors, including the extreme one.
    let after = source.snapshot_chunk(&schema, Some(&Key(vec![int(i64::MIN)])), WIDE_OPEN).await.unwrap();
    assert_eq!(after.len(), 2);
}

#[tokio::test]
async fn a_bc_date_is_a_data_error_naming_the_column() {
    let ddl = "CREATE TABLE history (id int PRIMARY KEY, happened date);
               INSERT INTO history VALUES (1, '2000-01-01'), (44, '0044-03-15 BC')";
    let (_db, _c, mut source) = setup("bc_date", ddl).await;
    let schema = track(&mut source, &table("history"), &["id", "happened"]).await;
    let e = source.snapshot_chunk(&schema, None, WIDE_OPEN).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Data);
    assert!(
        e.message.contains("public.history")
            && e.message.contains("\"happened\"")
            && e.message.contains("44"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn identity_is_stable_per_database_and_differs_between_databases() {
    let (db, _c, mut source) = setup("identity_a", "").await;
    let a = source.identity().await.unwrap();
    let mut again = PostgresSource::connect(&db.url, HOUR).await.unwrap();
    assert_eq!(again.identity().await.unwrap(), a);
    let (_db2, _c2, mut other) = setup("identity_b", "").await;
    assert_ne!(other.identity().await.unwrap(), a);
    assert!(a.contains(':'));
}

#[tokio::test]
async fn connection_failures_are_transient_and_never_show_the_password() {
    let e = match PostgresSource::connect("postgres://agent:hunter2secret@127.0.0.1:1/tenant", HOUR).await {
        Ok(_) => panic!("connected to port 1"),
        Err(e) => e,
    };
    assert_eq!(e.kind, SourceErrorKind::Transient);
    assert!(!e.message.contains("hunter2secret"), "{}", e.message);
    assert!(e.message.contains("127.0.0.1:1/tenant"), "{}", e.message);
    let e = match PostgresSource::connect("postgres://x:y@host:notaport/db", HOUR).await {
        Ok(_) => panic!("parsed a bad URL"),
        Err(e) => e,
    };
    assert_eq!(e.kind, SourceErrorKind::Config);
}

#[tokio::test]
async fn source_futures_are_send() {
    let (_db, _c, source) = setup("send", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let handle = tokio::spawn(async move {
        let mut source = source;
        source.ensure_tracking(&table("t")).await.unwrap();
        source.current_version().await.unwrap()
    });
    assert!(handle.await.unwrap().0 > 0);
}

/// A login role unique to this database (roles are cluster-wide), and the
/// database URL as that role.
async fn role_url(db: &TestDb, client: &Client, suffix: &str, grants: &str) -> String {
    let role = format!("{}_{suffix}", db.name);
    client
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; {}",
            grants.replace("ROLE", &format!("\"{role}\""))
        ))
        .await
        .unwrap();
    let (scheme_host, _) = db.url.rsplit_once('/').unwrap();
    let host =
        scheme_host.split_once('@').map(|(_, h)| h).unwrap_or(scheme_host.trim_start_matches("postgres://"));
    format!("postgres://{role}@{host}/{}", db.name)
}

#[tokio::test]
async fn missing_privileges_are_config_errors_saying_what_to_grant() {
    let (db, client, _source) = setup("privileges", "CREATE TABLE t (id int PRIMARY KEY)").await;
    // PUBLIC has no CREATE on a database by default.
    let url = role_url(&db, &client, "weak", "").await;
    let mut weak = PostgresSource::connect(&url, HOUR).await.unwrap();
    let e = weak.ensure_tracking(&table("t")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("permission denied") && e.message.contains("grant"), "{}", e.message);
    let schema = weak.read_schema(&table("t"), &cols(&["id"])).await.unwrap();
    let e = weak.snapshot_chunk(&schema, None, WIDE_OPEN).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("public.t") && e.message.contains("SELECT"), "{}", e.message);
}

#[tokio::test]
async fn writers_without_rights_on_ctmirror_ct_are_still_tracked() {
    let (db, client, mut source) = setup("app_role", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let url =
        role_url(&db, &client, "app", "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON t TO ROLE").await;
    let app = support::connect(&url).await;
    app.batch_execute("INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1; DELETE FROM t WHERE id = 2")
        .await
        .unwrap();
    assert!(app.batch_execute("SELECT * FROM ctmirror_ct.tracked").await.is_err());
    let changes = drain_changes(&mut source, &client, &schema, from, 10).await;
    let ops: Vec<RowOp> = changes.into_iter().map(|c| c.op).collect();
    assert_eq!(ops, vec![RowOp::Upsert(vec![int(1), text("c")]), RowOp::Delete]);
}

#[tokio::test]
async fn partitioned_tables_are_tracked_through_the_parent() {
    let ddl =
        "CREATE TABLE p (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
               CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
               CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us');
               INSERT INTO p VALUES (1, 'eu', 'a'), (2, 'us', 'b')";
    let (_db, mut client, mut source) = setup("partitioned", ddl).await;
    let schema = track(&mut source, &table("p"), &["id", "region", "v"]).await;
    assert_eq!(drain_snapshot(&mut source, &schema, 1).await.len(), 2);
    let from = source.min_valid_version(&table("p")).await.unwrap();
    // Moves a row to another partition: a key change.
    write(&mut client, "UPDATE p SET region = 'us' WHERE id = 1").await;
    let changes = drain_changes(&mut source, &client, &schema, from, 10).await;
    assert_eq!(
        changes.iter().map(|c| (c.key.clone(), c.op.clone())).collect::<Vec<_>>(),
        vec![
            (Key(vec![int(1), text("eu")]), RowOp::Delete),
            (Key(vec![int(1), text("us")]), RowOp::Upsert(vec![int(1), text("us"), text("a")])),
        ]
    );
}

#[tokio::test]
async fn a_full_load_starting_right_after_enabling_is_never_below_min_valid() {
    let (db, _client, mut source) = setup("min_valid_xmin", "CREATE TABLE t (id int PRIMARY KEY)").await;
    // An older transaction with an xid, open elsewhere on the cluster, holds
    // the readable version below the enabling transaction's id.
    let other = TestDb::create("min_valid_other").await;
    let mut holder = other.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("CREATE TABLE hold (x int)").await.unwrap();
    source.ensure_tracking(&table("t")).await.unwrap();
    let snapshot_version = source.current_version().await.unwrap();
    let min_valid = source.min_valid_version(&table("t")).await.unwrap();
    assert!(
        snapshot_version >= min_valid,
        "a full load at version {snapshot_version} would already count as expired (min valid {min_valid})"
    );
    tx.rollback().await.unwrap();
    drop(db);
}

#[tokio::test]
async fn survey_reports_every_tables_min_valid_version_and_which_have_changes() {
    let ddl = "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE \"B b\" (id int PRIMARY KEY); CREATE TABLE untracked (id int PRIMARY KEY);";
    let (_db, mut client, mut source) = setup("survey", ddl).await;
    let (a, b) = (table("a"), table("B b"));
    track(&mut source, &a, &["id"]).await;
    track(&mut source, &b, &["id"]).await;
    let before = settle(&mut source, &client).await;
    write(&mut client, "INSERT INTO \"B b\" VALUES (1)").await;
    let upper = settle(&mut source, &client).await;
    let asked = vec![(a.clone(), Some(before)), (b.clone(), Some(before)), (table("untracked"), Some(before)), (a.clone(), None)];
    let s = source.survey(&asked, upper).await.unwrap();
    let min_a = source.min_valid_version(&a).await.unwrap();
    assert_eq!(s[0].min_valid, Some(min_a));
    assert_eq!(s.iter().map(|t| t.may_have_changes).collect::<Vec<_>>(), [false, true, true, true]);
    assert_eq!(s[2].min_valid, None, "an untracked table is not known here");
    // Past the change, nothing waits.
    let s = source.survey(&[(b.clone(), Some(upper))], upper).await.unwrap();
    assert!(!s[0].may_have_changes);
}

/// The capture functions and triggers as ctmirror installed them before the
/// UPDATE trigger was split (two statements with EXCEPT and DISTINCT, a
/// fixed search path, OLD and NEW transition tables), for table `t (id
/// int PRIMARY KEY, ...)` whose oid is `oid`.
fn first_generation_sql(oid: u32) -> String {
    let upsert = |source: &str, deleted: bool| {
        format!(
            "INSERT INTO \"ctmirror_ct\".\"changes_{oid}\" AS s (\"id\", \"ctmirror_version\", \"ctmirror_deleted\") \
             SELECT c.\"id\", pg_catalog.pg_current_xact_id()::text::bigint, {deleted} FROM ({source}) AS c \
             ON CONFLICT (\"id\") DO UPDATE SET \"ctmirror_version\" = EXCLUDED.\"ctmirror_version\", \
             \"ctmirror_deleted\" = EXCLUDED.\"ctmirror_deleted\";"
        )
    };
    let function = |event: &str, body: String| {
        format!(
            "CREATE OR REPLACE FUNCTION \"ctmirror_ct\".\"capture_{oid}_{event}\"() RETURNS trigger \
             LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
             #variable_conflict use_column
             BEGIN {body} RETURN NULL; END $f$;"
        )
    };
    let trigger = |event: &str, timing: &str, referencing: &str| {
        format!(
            "CREATE TRIGGER \"ctmirror_ct_{event}\" {timing} ON \"public\".\"t\"{referencing} FOR EACH STATEMENT \
             EXECUTE FUNCTION \"ctmirror_ct\".\"capture_{oid}_{event}\"();
             ALTER TABLE \"public\".\"t\" ENABLE ALWAYS TRIGGER \"ctmirror_ct_{event}\";"
        )
    };
    [
        function("insert", upsert("SELECT DISTINCT r.\"id\" FROM ctmirror_new AS r", false)),
        trigger("insert", "AFTER INSERT", " REFERENCING NEW TABLE AS ctmirror_new"),
        function(
            "update",
            upsert("SELECT o.\"id\" FROM ctmirror_old AS o EXCEPT SELECT n.\"id\" FROM ctmirror_new AS n", true)
                + &upsert("SELECT DISTINCT r.\"id\" FROM ctmirror_new AS r", false),
        ),
        trigger("update", "AFTER UPDATE", " REFERENCING OLD TABLE AS ctmirror_old NEW TABLE AS ctmirror_new"),
        function("delete", upsert("SELECT DISTINCT r.\"id\" FROM ctmirror_old AS r", true)),
        trigger("delete", "AFTER DELETE", " REFERENCING OLD TABLE AS ctmirror_old"),
        function("truncate", upsert("SELECT t.\"id\" FROM \"public\".\"t\" AS t", true)),
        trigger("truncate", "BEFORE TRUNCATE", ""),
    ]
    .join("\n")
}

/// The names of the user-level triggers on a table, sorted.
async fn capture_triggers(client: &Client, name: &str) -> Vec<String> {
    client
        .query(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal ORDER BY 1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn trigger_oids(client: &Client, name: &str) -> Vec<u32> {
    client
        .query("SELECT oid FROM pg_trigger WHERE tgrelid = $1::text::regclass ORDER BY oid", &[&name])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_first_generation_installation_is_upgraded_in_place_without_losing_a_change() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')";
    let (db, mut client, mut source) = setup("upgrade", ddl).await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    // Turn the installation into one made by the first release: its
    // triggers and functions, and a registry without fingerprints.
    let oid = oid(&client, "t").await;
    client
        .batch_execute(&format!(
            "DROP TRIGGER ctmirror_ct_update_key ON t; DROP FUNCTION ctmirror_ct.capture_{oid}_update_key();
             DROP FUNCTION ctmirror_ct.capture_{oid}_truncated() CASCADE;
             DROP FUNCTION ctmirror_ct.capture_{oid}_replica_insert() CASCADE;
             DROP FUNCTION ctmirror_ct.capture_{oid}_replica_update() CASCADE;
             DROP FUNCTION ctmirror_ct.capture_{oid}_replica_delete() CASCADE;
             DROP TRIGGER ctmirror_ct_insert ON t; DROP TRIGGER ctmirror_ct_update ON t;
             DROP TRIGGER ctmirror_ct_delete ON t; DROP TRIGGER ctmirror_ct_truncate ON t;
             {}
             ALTER TABLE ctmirror_ct.tracked DROP COLUMN capture_fingerprint, DROP COLUMN generation,
                 DROP COLUMN storage, DROP COLUMN columns, DROP COLUMN triggers;
             DROP FUNCTION ctmirror_ct.layout();",
            first_generation_sql(oid)
        ))
        .await
        .unwrap();
    assert_eq!(capture_triggers(&client, "t").await.len(), 4);
    // A change captured by the old triggers, before the upgrade.
    let moved_first = write(&mut client, "UPDATE t SET id = 3 WHERE id = 1").await;
    // A writer still open when the upgrade starts: the upgrade waits for it.
    let mut writer = support::connect(&db.url).await;
    let open = writer.transaction().await.unwrap();
    open.batch_execute("UPDATE t SET v = 'b2' WHERE id = 2").await.unwrap();
    let open_version: i64 =
        open.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await.unwrap().get(0);
    let url = db.url.clone();
    let upgrade = tokio::spawn(async move {
        // A new agent: it also adds the registry's fingerprint column.
        let mut agent = PostgresSource::connect(&url, HOUR).await.unwrap();
        agent.ensure_tracking(&table("t")).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!upgrade.is_finished(), "the upgrade must wait for the open writer");
    open.commit().await.unwrap();
    assert!(!upgrade.await.unwrap().newly_enabled, "an upgrade is not a reload");

    assert_eq!(
        capture_triggers(&client, "t").await,
        vec![
            "ctmirror_ct_delete",
            "ctmirror_ct_insert",
            "ctmirror_ct_replica_delete",
            "ctmirror_ct_replica_insert",
            "ctmirror_ct_replica_update",
            "ctmirror_ct_truncate",
            "ctmirror_ct_truncated",
            "ctmirror_ct_update",
            "ctmirror_ct_update_key"
        ]
    );
    let fixed_search_path: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'ctmirror_ct' AND p.proconfig IS NOT NULL
                AND p.proname LIKE 'capture%' AND p.proname NOT LIKE '%truncated'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fixed_search_path, 0, "first-generation functions remain");
    // Changes from before and after the upgrade, and a key change through
    // the new row-level trigger.
    let moved_again = write(&mut client, "UPDATE t SET id = 4 WHERE id = 3").await;
    // The upgrade kept the side table but the registry got its first
    // generation: this connection learns it as every cycle does.
    let before = trigger_oids(&client, "t").await;
    assert!(!source.ensure_tracking(&table("t")).await.unwrap().newly_enabled);
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(
        changes.iter().map(|c| (c.version, c.key.clone(), c.op.clone())).collect::<Vec<_>>(),
        vec![
            (Version(moved_first), Key(vec![int(1)]), RowOp::Delete),
            (Version(open_version), Key(vec![int(2)]), RowOp::Upsert(vec![int(2), text("b2")])),
            (Version(moved_again), Key(vec![int(3)]), RowOp::Delete),
            (Version(moved_again), Key(vec![int(4)]), RowOp::Upsert(vec![int(4), text("a")])),
        ]
    );
    // Upgraded once: the next call left the triggers alone.
    assert_eq!(trigger_oids(&client, "t").await, before);
}

#[tokio::test]
async fn a_key_changed_by_a_before_trigger_marks_the_old_key_deleted() {
    // The UPDATE never names the key; the application's trigger moves it.
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');
               CREATE FUNCTION move_key() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.v = 'move' THEN NEW.id := NEW.id + 100; END IF; RETURN NEW; END $$;
               CREATE TRIGGER move_key BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION move_key()";
    let (_db, mut client, mut source) = setup("before_trigger_key", ddl).await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let v = write(&mut client, "UPDATE t SET v = 'move'").await;
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(
        changes,
        vec![
            ChangeRow { version: Version(v), key: Key(vec![int(1)]), op: RowOp::Delete },
            ChangeRow { version: Version(v), key: Key(vec![int(2)]), op: RowOp::Delete },
            ChangeRow {
                version: Version(v),
                key: Key(vec![int(101)]),
                op: RowOp::Upsert(vec![int(101), text("move")])
            },
            ChangeRow {
                version: Version(v),
                key: Key(vec![int(102)]),
                op: RowOp::Upsert(vec![int(102), text("move")])
            },
        ]
    );
}

#[tokio::test]
async fn a_deferred_primary_key_may_hold_duplicates_until_commit() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')";
    let (_db, mut client, mut source) = setup("deferred_key", ddl).await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    // Made deferrable after tracking began: the capture is upgraded in
    // place, nothing reloads.
    client
        .batch_execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED")
        .await
        .unwrap();
    let before = trigger_oids(&client, "t").await;
    assert!(!source.ensure_tracking(&table("t")).await.unwrap().newly_enabled);
    assert_ne!(trigger_oids(&client, "t").await, before, "the capture was not upgraded");
    // Statements leave a key twice in their transition tables (an error
    // in ON CONFLICT without DISTINCT); the transaction repairs it before
    // commit. Taking one of two rows off a key marks the key deleted
    // although the other row still holds it, so the survivors are written
    // once more at the end.
    let v = write(
        &mut client,
        "UPDATE t SET id = 1; UPDATE t SET id = 2 WHERE v = 'b';
         INSERT INTO t VALUES (3, 'x'), (3, 'y'); DELETE FROM t WHERE v = 'y';
         INSERT INTO t VALUES (4, 'p'), (4, 'q'); DELETE FROM t WHERE id = 4;
         UPDATE t SET v = v WHERE id IN (1, 3)",
    )
    .await;
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(
        changes.iter().map(|c| (c.version, c.key.clone(), c.op.clone())).collect::<Vec<_>>(),
        vec![
            (Version(v), Key(vec![int(1)]), RowOp::Upsert(vec![int(1), text("a")])),
            (Version(v), Key(vec![int(2)]), RowOp::Upsert(vec![int(2), text("b")])),
            (Version(v), Key(vec![int(3)]), RowOp::Upsert(vec![int(3), text("x")])),
            (Version(v), Key(vec![int(4)]), RowOp::Delete),
        ]
    );
}

#[tokio::test]
async fn a_writers_search_path_cannot_redirect_the_capture() {
    // Look-alikes of everything a capture function could name unqualified,
    // operators included: the functions are SECURITY DEFINER, so anything
    // a writer's search path could redirect would run as their owner.
    let ddl = r#"CREATE TABLE t (id int PRIMARY KEY, v text); CREATE SCHEMA evil;
        CREATE FUNCTION evil.txid_current() RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint';
        CREATE FUNCTION evil.format(text, name, name) RETURNS text LANGUAGE sql AS $$SELECT 'SELECT 1'$$;
        CREATE TYPE evil.text AS ENUM ('x'); CREATE TYPE evil.int8 AS ENUM ('x');
        CREATE TABLE evil.ctmirror_ct (id int);
        CREATE FUNCTION evil.same(int, int) RETURNS boolean LANGUAGE sql AS 'SELECT true';
        CREATE OPERATOR evil.= (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.same);
        CREATE OPERATOR evil.<> (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.same)"#;
    let (db, client, mut source) = setup("search_path", ddl).await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    // The writer's session compiles the capture functions under this path
    // (where even `write`'s `::text` would mean evil.text).
    let mut writer = support::connect(&db.url).await;
    writer.batch_execute("SET search_path = evil, pg_catalog, public").await.unwrap();
    let mut hostile_write = async |sql: &str| -> i64 {
        let tx = writer.transaction().await.unwrap();
        tx.batch_execute(sql).await.unwrap();
        let v = tx
            .query_one("SELECT pg_catalog.pg_current_xact_id()::pg_catalog.text::pg_catalog.int8", &[])
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        v
    };
    // The writer's own comparison is qualified; only the capture is on trial.
    let v = hostile_write("INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET id = 3 WHERE id OPERATOR(pg_catalog.=) 2")
        .await;
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(changes.iter().all(|c| c.version == Version(v)), "{changes:?}");
    let truncated = hostile_write("TRUNCATE t").await;
    let changes = drain_changes(&mut source, &client, &schema, Version(v), 100).await;
    assert_eq!(
        changes.iter().map(|c| (c.version, c.op.clone())).collect::<Vec<_>>(),
        vec![(Version(truncated), RowOp::Delete), (Version(truncated), RowOp::Delete)]
    );
}

#[tokio::test]
async fn truncate_of_a_renamed_table_is_captured_without_reinstalling() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)";
    let (_db, mut client, mut source) = setup("rename_truncate", ddl).await;
    track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    let before = trigger_oids(&client, "t").await;
    // Renamed between two cycles: the capture keeps working before the next.
    let v = write(&mut client, "ALTER TABLE t RENAME TO \"T 2\"; TRUNCATE \"T 2\"").await;
    assert!(!source.ensure_tracking(&table("T 2")).await.unwrap().newly_enabled);
    assert_eq!(trigger_oids(&client, "\"T 2\"").await, before);
    let schema = source.read_schema(&table("T 2"), &cols(&["id"])).await.unwrap();
    let changes = drain_changes(&mut source, &client, &schema, from, 100).await;
    assert_eq!(
        changes.iter().map(|c| (c.version, c.op.clone())).collect::<Vec<_>>(),
        vec![(Version(v), RowOp::Delete), (Version(v), RowOp::Delete)]
    );
}

// ------------------------------------------ changes the read can no longer see

/// A source whose retention is `retention` and whose registry holds no
/// longer request: retention is the longest any agent asked for.
async fn eager_source(db: &TestDb, client: &Client, retention: Duration) -> PostgresSource {
    client.batch_execute("DELETE FROM ctmirror_ct.retention_requests").await.unwrap();
    PostgresSource::connect(&db.url, retention).await.unwrap()
}

#[tokio::test]
async fn a_retention_cleanup_between_two_change_reads_expires_the_second_read() {
    let (db, mut client, mut source) = setup("expire_midread", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    for i in 0..4 {
        write(&mut client, &format!("INSERT INTO t VALUES ({i})")).await;
    }
    let upper = settle(&mut source, &client).await;
    let limits = ChunkLimits { max_rows: 1, max_bytes: 1 << 20 };
    let first = source.changes_copy(&schema, &ChangePosition { version: from, after_key: None }, upper, limits).await.unwrap();
    let next = ChangePosition { version: first.last_version.unwrap(), after_key: first.last_key.clone() };
    // Another application's cycle cleans up everything up to now.
    let mut other = eager_source(&db, &client, Duration::ZERO).await;
    other.maintain().await.unwrap();
    let e = source.changes_copy(&schema, &next, upper, limits).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Expired, "{e}");
    assert!(e.message.contains("public.t") && e.message.contains("removed by retention"), "{e}");
    // The value reader checks the same way.
    let e = source.changes_chunk(&schema, &next, upper, limits).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Expired, "{e}");
}

#[tokio::test]
async fn a_cursor_inside_the_version_at_the_retention_horizon_expires() {
    let (db, mut client, mut source) = setup("expire_inside", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    // One large transaction h, read over several chunks.
    let h = write(&mut client, "INSERT INTO t SELECT generate_series(1, 10)").await;
    let upper = settle(&mut source, &client).await;
    let limits = ChunkLimits { max_rows: 3, max_bytes: 1 << 20 };
    let first = source.changes_copy(&schema, &ChangePosition { version: from, after_key: None }, upper, limits).await.unwrap();
    assert_eq!(first.last_version, Some(Version(h)));
    let inside = ChangePosition { version: Version(h), after_key: first.last_key.clone() };
    // The horizon lands exactly on h: the cleanup deletes version <= h.
    client.batch_execute("DELETE FROM ctmirror_ct.retention_requests").await.unwrap();
    client
        .batch_execute(&format!(
            "DELETE FROM ctmirror_ct.version_clock;
             INSERT INTO ctmirror_ct.version_clock VALUES ({h}, now() - interval '2 hours')"
        ))
        .await
        .unwrap();
    PostgresSource::connect(&db.url, HOUR).await.unwrap().maintain().await.unwrap();
    assert_eq!(source.min_valid_version(&table("t")).await.unwrap(), Version(h));
    let e = source.changes_copy(&schema, &inside, upper, limits).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Expired, "the rest of version {h} is gone: {e}");
    // A cursor that ends version h needs nothing the cleanup removed.
    let after_h = ChangePosition { version: Version(h), after_key: None };
    assert!(source.changes_copy(&schema, &after_h, upper, limits).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_read_of_a_table_whose_tracking_was_reinstalled_meanwhile_is_refused() {
    let (db, mut client, mut source) = setup("reinstalled_midread", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    write(&mut client, "INSERT INTO t VALUES (1)").await;
    // Another application's cycle finds the capture damaged and reinstalls
    // it: a new, empty side table.
    client.batch_execute("ALTER TABLE t DISABLE TRIGGER ctmirror_ct_insert").await.unwrap();
    let mut other = PostgresSource::connect(&db.url, HOUR).await.unwrap();
    assert!(other.ensure_tracking(&table("t")).await.unwrap().newly_enabled);
    let upper = settle(&mut source, &client).await;
    let e = source.changes_copy(&schema, &ChangePosition { version: from, after_key: None }, upper, WIDE_OPEN).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Expired, "{e}");
    assert!(e.message.contains("reinstalled"), "{e}");
    // So does the survey: it does not call the table idle.
    let survey = source.survey(&[(table("t"), Some(from))], upper).await.unwrap();
    assert!(survey[0].may_have_changes && survey[0].min_valid.is_none(), "{survey:?}");
}

#[tokio::test]
async fn the_longest_retention_any_agent_asked_for_is_kept() {
    let (db, mut client, mut source) = setup("longest_retention", "CREATE TABLE t (id int PRIMARY KEY)").await;
    let schema = track(&mut source, &table("t"), &["id"]).await;
    let from = source.min_valid_version(&table("t")).await.unwrap();
    write(&mut client, "INSERT INTO t VALUES (1)").await;
    settle(&mut source, &client).await;
    // This agent keeps an hour; another one asks for nothing at all.
    source.maintain().await.unwrap();
    let mut short = PostgresSource::connect(&db.url, Duration::ZERO).await.unwrap();
    short.maintain().await.unwrap();
    assert_eq!(source.min_valid_version(&table("t")).await.unwrap(), from, "the hour asked for is kept");
    assert_eq!(drain_changes(&mut source, &client, &schema, from, 10).await.len(), 1);
    let requests: Vec<i64> = client
        .query("SELECT retention_secs FROM ctmirror_ct.retention_requests ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(requests, vec![0, 3600]);
}

// ------------------------------------------------------------ partitions

async fn changed_keys(source: &mut PostgresSource, client: &Client, schema: &SourceSchema, from: Version) -> Vec<(Vec<Value>, bool)> {
    let mut out: Vec<(Vec<Value>, bool)> = drain_changes(source, client, schema, from, 1000)
        .await
        .into_iter()
        .map(|c| (c.key.0, matches!(c.op, RowOp::Upsert(_))))
        .collect();
    out.sort_by_key(|(k, _)| format!("{k:?}"));
    out
}

#[tokio::test]
async fn writes_addressed_to_a_partition_are_captured() {
    let ddl = "CREATE TABLE p (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
               CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
               CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us') PARTITION BY RANGE (id);
               CREATE TABLE p_us_low PARTITION OF p_us FOR VALUES FROM (0) TO (100);
               INSERT INTO p VALUES (1, 'eu', 'a'), (2, 'eu', 'b'), (3, 'us', 'c'), (4, 'us', 'd');";
    let (_db, mut client, mut source) = setup("partition_writes", ddl).await;
    let schema = track(&mut source, &table("p"), &["id", "region", "v"]).await;
    let from = source.min_valid_version(&table("p")).await.unwrap();
    write(&mut client, "INSERT INTO p_eu VALUES (5, 'eu', 'e')").await;
    write(&mut client, "UPDATE p_eu SET v = 'b2' WHERE id = 2").await;
    write(&mut client, "UPDATE p_eu SET id = 10 WHERE id = 1").await;
    write(&mut client, "DELETE FROM p_us_low WHERE id = 4").await;
    write(&mut client, "INSERT INTO p_us VALUES (6, 'us', 'f')").await;
    write(&mut client, "TRUNCATE p_us_low").await;
    let eu = |i| vec![int(i), text("eu")];
    let us = |i| vec![int(i), text("us")];
    assert_eq!(
        changed_keys(&mut source, &client, &schema, from).await,
        {
            let mut want = vec![
                (eu(1), false),
                (eu(10), true),
                (eu(2), true),
                (us(3), false),
                (us(4), false),
                (eu(5), true),
                (us(6), false),
            ];
            want.sort_by_key(|(k, _)| format!("{k:?}"));
            want
        }
    );
    // Nothing about this was damage: no reinstall.
    assert!(!source.ensure_tracking(&table("p")).await.unwrap().newly_enabled);
}

#[tokio::test]
async fn rows_an_attached_or_detached_partition_moves_are_changes_and_a_dropped_partition_reinstalls() {
    let ddl = "CREATE TABLE p (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
               CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
               CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us');
               CREATE TABLE p_ap (id int, region text, PRIMARY KEY (id, region));
               INSERT INTO p VALUES (1, 'eu'), (2, 'us');
               INSERT INTO p_ap VALUES (7, 'ap');";
    let (_db, client, mut source) = setup("partition_ddl", ddl).await;
    let schema = track(&mut source, &table("p"), &["id", "region"]).await;
    let first = source.ensure_tracking(&table("p")).await.unwrap();
    let from = source.min_valid_version(&table("p")).await.unwrap();
    // Rows arrive and leave without a write any trigger sees.
    client.batch_execute("ALTER TABLE p ATTACH PARTITION p_ap FOR VALUES IN ('ap')").await.unwrap();
    client.batch_execute("ALTER TABLE p DETACH PARTITION p_us").await.unwrap();
    let adopted = source.ensure_tracking(&table("p")).await.unwrap();
    assert!(!adopted.newly_enabled && adopted.generation == first.generation, "{adopted:?}");
    assert_eq!(
        changed_keys(&mut source, &client, &schema, from).await,
        vec![(vec![int(2), text("us")], false), (vec![int(7), text("ap")], true)]
    );
    // The attached partition's own writes are captured; the detached one's
    // no longer feed the table.
    let from = settle(&mut source, &client).await;
    client.batch_execute("INSERT INTO p_ap VALUES (8, 'ap'); INSERT INTO p_us VALUES (9, 'us')").await.unwrap();
    assert_eq!(changed_keys(&mut source, &client, &schema, from).await, vec![(vec![int(8), text("ap")], true)]);
    let on_detached: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'p_us'::regclass AND tgname LIKE 'ctmirror_ct%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_detached, 0);
    // A dropped partition took rows nobody can list any more.
    client.batch_execute("DROP TABLE p_eu").await.unwrap();
    let after = source.ensure_tracking(&table("p")).await.unwrap();
    assert!(after.newly_enabled && after.generation != first.generation, "{after:?}");
    assert!(after.installed_because.as_deref().unwrap_or("").contains("partition of the table was dropped"), "{after:?}");
}

#[tokio::test]
async fn a_partition_cannot_be_tracked_on_its_own() {
    let ddl = "CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id);
               CREATE TABLE p_low PARTITION OF p FOR VALUES FROM (0) TO (10);";
    let (_db, client, mut source) = setup("partition_alone", ddl).await;
    let e = source.ensure_tracking(&table("p_low")).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(e.message.contains("p_low is a partition of public.p") && e.message.contains("map public.p instead"), "{e}");
    let installed: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'ctmirror_ct%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(installed, 0);
}

// ------------------------------------------------ triggers reset, replica writers

#[tokio::test]
async fn enable_trigger_all_is_damage_and_replica_writes_are_captured_after_the_repair() {
    let (_db, mut client, mut source) = setup("enable_all", "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let schema = track(&mut source, &table("t"), &["id", "v"]).await;
    // A bulk load with the usual DISABLE / ENABLE TRIGGER ALL around it
    // resets every trigger to fire for origin writers only.
    client
        .batch_execute("ALTER TABLE t DISABLE TRIGGER ALL; INSERT INTO t VALUES (1, 'bulk'); ALTER TABLE t ENABLE TRIGGER ALL;")
        .await
        .unwrap();
    let repaired = source.ensure_tracking(&table("t")).await.unwrap();
    assert!(repaired.newly_enabled, "{repaired:?}");
    assert!(repaired.installed_because.as_deref().unwrap_or("").contains("no longer enabled as installed"), "{repaired:?}");
    let from = source.min_valid_version(&table("t")).await.unwrap();
    write(&mut client, "SET session_replication_role = replica; INSERT INTO t VALUES (2, 'replica'); UPDATE t SET v = 'r' WHERE id = 1").await;
    let keys = changed_keys(&mut source, &client, &schema, from).await;
    assert_eq!(keys, vec![(vec![int(1)], true), (vec![int(2)], true)]);
}

// --------------------------------------------------------- DDL on tracked tables

async fn writes_work(client: &Client, sql: &str) -> Result<(), String> {
    client.batch_execute(sql).await.map_err(|e| e.as_db_error().map(|d| d.message().to_owned()).unwrap_or(e.to_string()))
}

#[tokio::test]
async fn renaming_a_key_column_breaks_no_write_after_one_maintenance_pass() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE unmapped (id int PRIMARY KEY, v text);";
    let (_db, client, mut source) = setup("rename_key", ddl).await;
    source.ensure_tracking(&table("t")).await.unwrap();
    source.ensure_tracking(&table("unmapped")).await.unwrap();
    client.batch_execute("ALTER TABLE t RENAME COLUMN id TO t_id; ALTER TABLE unmapped RENAME COLUMN id TO u_id").await.unwrap();
    // The capture names the old column: PostgreSQL refuses the writes.
    assert!(writes_work(&client, "INSERT INTO unmapped VALUES (1, 'x')").await.is_err());
    // One maintenance pass repairs every tracked table, mapped or not.
    source.maintain().await.unwrap();
    for sql in [
        "INSERT INTO t VALUES (1, 'a')",
        "UPDATE t SET v = 'b'",
        "UPDATE t SET t_id = 2",
        "DELETE FROM t",
        "TRUNCATE t",
        "INSERT INTO unmapped VALUES (1, 'x')",
        "UPDATE unmapped SET u_id = 3",
    ] {
        writes_work(&client, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let reinstalled = source.ensure_tracking(&table("t")).await.unwrap();
    assert!(reinstalled.installed_because.as_deref().unwrap_or("").contains("primary key changed"), "{reinstalled:?}");
}

#[tokio::test]
async fn a_table_no_application_maps_any_more_is_untracked() {
    let ddl = "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); CREATE TABLE c (id int PRIMARY KEY);";
    let (_db, client, mut source) = setup("untrack_unmapped", ddl).await;
    for t in ["a", "b", "c"] {
        source.ensure_tracking(&table(t)).await.unwrap();
    }
    source.record_readers("app1", &[table("a"), table("b")]).await.unwrap();
    source.record_readers("app2", &[table("b"), table("c")]).await.unwrap();
    // app1 stops mapping a and b; b is still read by app2.
    source.record_readers("app1", &[]).await.unwrap();
    let tracked: Vec<String> = client
        .query("SELECT table_name FROM ctmirror_ct.tracked ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tracked, vec!["b", "c"]);
    let triggers_on_a: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'a'::regclass AND tgname LIKE 'ctmirror%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers_on_a, 0);
    // On request, whoever reads it.
    assert!(source.untrack(&table("c")).await.unwrap());
    assert!(!source.untrack(&table("c")).await.unwrap());
    // A table tracked long ago that no application has read since goes at
    // the next maintenance pass.
    client.batch_execute("UPDATE ctmirror_ct.tracked SET enabled_at = now() - interval '2 days'; UPDATE ctmirror_ct.readers SET last_read = now() - interval '2 days'").await.unwrap();
    source.maintain().await.unwrap();
    let left: i64 = client.query_one("SELECT count(*) FROM ctmirror_ct.tracked", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_registry_row_whose_oid_names_another_table_is_forgotten() {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE stranger (id int PRIMARY KEY);";
    let (_db, client, mut source) = setup("oid_reused", ddl).await;
    source.ensure_tracking(&table("t")).await.unwrap();
    // What a restore into a fresh cluster (or oid wraparound) can leave: a
    // registry row whose oid now belongs to a table that never carried our
    // capture.
    client
        .batch_execute("DROP TABLE t; UPDATE ctmirror_ct.tracked SET table_oid = 'stranger'::regclass")
        .await
        .unwrap();
    source.maintain().await.unwrap();
    let left: i64 = client.query_one("SELECT count(*) FROM ctmirror_ct.tracked", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    let triggers: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'ctmirror%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0, "the stranger gets no capture");
}

//! Schema evolution, reloads into shadow tables, retention expiry, restored
//! sources and mirrors, and batches the receiver cannot apply. PostgreSQL on
//! both sides; every scenario ends in a convergence check.

mod harness;

use ctmirror::agent::{run_controlled_cycle, CycleControl, CycleReport, CycleSettings, ProgressFn};
use ctmirror::agent::stop::StopReason;
use ctmirror::agent::AgentErrorKind;
use ctmirror::protocol::{Cursor, SyncMode};
use ctmirror::schema_map::SchemaMap;
use ctmirror::source::{ChunkLimits, Source};
use harness::support;
use harness::{Options, Pipeline, TENANT};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `item` (mapped: id, name, qty, price; `secret` never) and `note`.
fn setup(items: usize) -> String {
    format!(
        "CREATE TABLE item (id bigint PRIMARY KEY, name varchar(50) NOT NULL, qty integer, price numeric(10,2),
                           secret text);
         INSERT INTO item SELECT i, 'item ' || i, i % 100, i * 1.25, 'hidden' FROM generate_series(1, {items}) i;
         CREATE TABLE note (id integer PRIMARY KEY, body text);
         INSERT INTO note SELECT i, 'note ' || i FROM generate_series(1, 50) i;"
    )
}

fn map(item_columns: &[&str], with_note: bool) -> SchemaMap {
    SchemaMap::parse(&map_toml(item_columns, with_note), "test map").unwrap()
}

fn map_toml(item_columns: &[&str], with_note: bool) -> String {
    let cols: Vec<String> = item_columns.iter().map(|c| format!("{c:?}")).collect();
    let mut toml = format!(
        "application = \"crm_insights\"\n[[table]]\ntable = \"item\"\ncolumns = [{}]\n",
        cols.join(", ")
    );
    if with_note {
        toml.push_str("[[table]]\ntable = \"note\"\ncolumns = [\"id\", \"body\"]\n");
    }
    toml
}

const ITEM: &[&str] = &["id", "name", "qty", "price"];

fn opts(rows: usize) -> Options {
    Options { limits: ChunkLimits { max_rows: rows, max_bytes: 1 << 20 }, ..Options::default() }
}

async fn start(label: &str, items: usize, o: Options) -> Pipeline {
    let p = Pipeline::start_with(label, &setup(items), &map_toml(ITEM, true), o).await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
    p
}

fn table<'a>(r: &'a CycleReport, name: &str) -> &'a ctmirror::agent::TableOutcome {
    r.tables.iter().find(|t| t.table == name).unwrap_or_else(|| panic!("no outcome for {name}: {r:#?}"))
}

async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(c: &tokio_postgres::Client, sql: &str) -> T {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// `data_type` of a mirror column, as information_schema spells it with
/// its length or precision.
async fn mirror_type(p: &Pipeline, table: &str, column: &str) -> Option<String> {
    let c = p.mirror().await;
    c.query_opt(
        "SELECT format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           FROM pg_attribute a JOIN pg_class t ON t.oid = a.attrelid JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = 'mirror_acme' AND t.relname = $1 AND a.attname = $2 AND NOT a.attisdropped",
        &[&table, &column],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

fn assert_not_reloaded(r: &CycleReport, name: &str) {
    let t = table(r, name);
    assert!(t.error.is_none() && !t.reloaded && t.mode != SyncMode::Full, "{name} must stay incremental: {t:#?}");
}

fn assert_reloaded(r: &CycleReport, name: &str, why: &str) {
    let t = table(r, name);
    assert!(t.error.is_none(), "{t:#?}");
    assert!(t.reloaded && t.mode == SyncMode::Full, "{name} must be reloaded: {t:#?}");
    let reason = t.reload_reason.as_deref().unwrap_or("");
    assert!(reason.contains(why), "{name}: reason {reason:?} does not mention {why:?}");
}

// ------------------------------------------------------------ schema evolution

#[tokio::test]
async fn an_added_mapped_column_reaches_the_existing_rows() {
    let mut p = start("evo_add", 300, Options::default()).await;
    p.exec("ALTER TABLE item ADD COLUMN color text DEFAULT 'red'; UPDATE item SET color = 'blue' WHERE id <= 10;")
        .await;
    // Added at the source but not mapped: nothing changes (deny by default).
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert!(!table(&r, "item").reloaded);
    assert_eq!(mirror_type(&p, "item", "color").await, None);

    p.map = map(&["id", "name", "qty", "price", "color"], true);
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "\"color\" added");
    assert_not_reloaded(&r, "note");
    p.assert_converged().await;
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE color = 'red'").await, 290);
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE color = 'blue'").await, 10);
}

#[tokio::test]
async fn an_unmapped_column_is_dropped_without_a_reload() {
    let mut p = start("evo_drop", 200, Options::default()).await;
    p.map = map(&["id", "name", "qty"], true);
    p.exec("UPDATE item SET qty = qty + 1 WHERE id <= 5").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    assert_eq!(table(&r, "item").counts.updated, 5);
    assert_eq!(mirror_type(&p, "item", "price").await, None);
    p.assert_converged().await;
    // The source drops the column for real: nothing more to do.
    p.exec("ALTER TABLE item DROP COLUMN price").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_dropped_column_is_kept_nullable_when_the_partner_wants_it() {
    let o = Options { keep_dropped_columns: true, ..Options::default() };
    let mut p = start("evo_keep", 200, o).await;
    p.exec("ALTER TABLE item DROP COLUMN name").await;
    p.map = map(&["id", "qty", "price"], true);
    p.exec("INSERT INTO item (id, qty, price) VALUES (1000, 1, 1)").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    assert_eq!(mirror_type(&p, "item", "name").await.as_deref(), Some("character varying(50)"));
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE name IS NOT NULL").await, 200);
    assert_eq!(scalar::<Option<String>>(&m, "SELECT name FROM mirror_acme.item WHERE id = 1000").await, None);
    p.assert_converged().await;
}

#[tokio::test]
async fn widened_columns_are_altered_in_place() {
    let p = start("evo_widen", 400, opts(100)).await;
    let cursor_before = p.mirror_cursor("item").await.unwrap();
    p.exec(
        "ALTER TABLE item ALTER COLUMN name TYPE varchar(200), ALTER COLUMN name DROP NOT NULL,
                          ALTER COLUMN price TYPE numeric(12,2);
         UPDATE item SET name = repeat('w', 180), qty = 5, price = 9999999999.99 WHERE id = 7;
         UPDATE item SET name = NULL WHERE id = 8;",
    )
    .await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    let item = table(&r, "item");
    assert_eq!((item.rows_sent, item.counts.updated), (2, 2), "only the changed rows travel: {item:#?}");
    assert!(Cursor::may_advance(Some(&cursor_before), item.cursor.as_ref().unwrap()).is_ok());
    assert_eq!(mirror_type(&p, "item", "name").await.as_deref(), Some("character varying(200)"));
    assert_eq!(mirror_type(&p, "item", "price").await.as_deref(), Some("numeric(12,2)"));
    p.assert_converged().await;
}

#[tokio::test]
async fn a_widening_that_rewrites_the_table_reloads_it() {
    // int -> bigint rewrites every row, and a USING expression may have
    // changed every value: no trigger saw it, so only a reload is safe.
    let p = start("evo_rewrite", 300, opts(100)).await;
    p.exec("ALTER TABLE item ALTER COLUMN qty TYPE bigint USING qty * 100").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "rewritten");
    assert_not_reloaded(&r, "note");
    assert_eq!(mirror_type(&p, "item", "qty").await.as_deref(), Some("bigint"));
    p.assert_converged().await;
    let r = p.cycle().await;
    assert_not_reloaded(&r, "item");
}

#[tokio::test]
async fn a_narrowed_column_rebuilds_the_table() {
    let p = start("evo_narrow", 300, opts(50)).await;
    p.exec("ALTER TABLE item ALTER COLUMN name TYPE varchar(20); DELETE FROM item WHERE id = 3;").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "not a widening");
    assert_not_reloaded(&r, "note");
    assert_eq!(mirror_type(&p, "item", "name").await.as_deref(), Some("character varying(20) not null"));
    p.assert_converged().await;
    // The rebuilt table goes on incrementally.
    p.exec("UPDATE item SET qty = -1 WHERE id = 4").await;
    let r = p.cycle().await;
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_primary_key_change_rebuilds_the_table() {
    let p = start("evo_pk", 100, Options::default()).await;
    p.exec(
        "ALTER TABLE note DROP CONSTRAINT note_pkey; UPDATE note SET body = coalesce(body, '');
         ALTER TABLE note ALTER COLUMN body SET NOT NULL, ADD PRIMARY KEY (id, body);
         INSERT INTO note VALUES (1, 'second body of note 1');",
    )
    .await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    let note = table(&r, "note");
    assert!(note.reloaded && note.mode == SyncMode::Full, "{note:#?}");
    assert_not_reloaded(&r, "item");
    let m = p.mirror().await;
    let key: String = scalar(
        &m,
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
          JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'mirror_acme' AND t.relname = 'note' AND c.contype = 'p'",
    )
    .await;
    assert_eq!(key, "PRIMARY KEY (id, body)");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_table_unmapped_then_mapped_again_is_dropped_then_loaded() {
    let mut p = start("evo_remap", 100, Options::default()).await;
    p.map = map(ITEM, false);
    let r = p.cycle().await;
    assert_eq!(r.dropped, vec!["note".to_string()]);
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM pg_tables WHERE tablename = 'note'").await, 0);
    p.exec("DELETE FROM note WHERE id > 40; INSERT INTO note VALUES (99, 'while unmapped');").await;
    p.map = map(ITEM, true);
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_eq!(table(&r, "note").mode, SyncMode::Full);
    assert_eq!(table(&r, "note").counts.inserted, 41);
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

// ------------------------------------------------------------ reloads stay readable

/// Counts a mirror table in a loop on its own connection until stopped:
/// the lowest count seen, how many reads, and every error.
struct Reader {
    stop: Arc<AtomicBool>,
    min: Arc<AtomicI64>,
    reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Reader {
    async fn start(url: &str, table: &str) -> Reader {
        let client = support::connect(url).await;
        let (stop, min, reads) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(i64::MAX)), Arc::default());
        let (s, m, n): (Arc<AtomicBool>, Arc<AtomicI64>, Arc<AtomicU64>) = (stop.clone(), min.clone(), Arc::clone(&reads));
        let sql = format!("SELECT count(*) FROM mirror_acme.{table}");
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match client.query_one(&sql, &[]).await {
                    Ok(row) => {
                        m.fetch_min(row.get(0), Ordering::SeqCst);
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => errors.push(format!("{e:?}")),
                }
            }
            errors
        });
        Reader { stop, min, reads, task }
    }

    async fn finish(self) -> (i64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.unwrap();
        (self.min.load(Ordering::SeqCst), self.reads.load(Ordering::SeqCst), errors)
    }
}

#[tokio::test]
async fn a_reader_never_sees_a_reloading_table_empty_or_half_loaded() {
    let mut p = start("evo_reader", 20_000, opts(500)).await;
    p.exec("ALTER TABLE item ADD COLUMN color text DEFAULT 'red'; INSERT INTO item VALUES (50000, 'x', 1, 1, 's', 'b');")
        .await;
    p.map = map(&["id", "name", "qty", "price", "color"], true);
    let reader = Reader::start(&p.mirror_db.url, "item").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = p.cycle().await;
    let (min, reads, errors) = reader.finish().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "added");
    assert!(table(&r, "item").batches >= 40, "the reload took many batches: {:#?}", table(&r, "item"));
    assert!(errors.is_empty(), "the reader got errors: {errors:?}");
    assert!(reads >= 20, "the reader ran during the reload ({reads} reads)");
    assert!(min >= 20_000, "the reader saw {min} rows, fewer than the old table's 20000");
    p.assert_converged().await;
}

#[tokio::test]
async fn an_interrupted_reload_resumes_and_the_live_table_serves_meanwhile() {
    let mut p = start("evo_resume", 3000, opts(200)).await;
    p.exec("ALTER TABLE item ADD COLUMN color text DEFAULT 'red'").await;
    p.map = map(&["id", "name", "qty", "price", "color"], true);
    // Stop at the batch boundary after the fourth batch of the reload.
    let control = CycleControl::default();
    let stop = control.stop.clone();
    let progress: ProgressFn = Arc::new(move |t| {
        if t.table == "item" && t.batches >= 4 {
            stop.stop(StopReason::Blackout);
        }
    });
    let control = CycleControl { progress: Some(progress), ..control };
    p.wait_quiet().await;
    let mut source = p.connect_source().await;
    let settings = CycleSettings { limits: p.limits };
    let r = run_controlled_cycle(&mut source, &p.client(), &p.map, TENANT, settings, &control).await.unwrap();
    assert!(r.interrupted(), "{r:#?}");
    assert!(matches!(p.mirror_cursor("item").await, Some(Cursor::Snapshot { .. })));
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item").await, 3000, "live table intact");
    assert_eq!(mirror_type(&p, "item", "color").await, None, "live table keeps its old shape");
    assert!(scalar::<i64>(&m, "SELECT count(*) FROM ctmirror_load_acme.item").await >= 800);

    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    let item = table(&r, "item");
    assert_eq!(item.mode, SyncMode::Full);
    assert!(item.rows_sent <= 2200, "resumed where the shadow stood, not from scratch: {item:#?}");
    p.assert_converged().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM pg_tables WHERE schemaname = 'ctmirror_load_acme'").await, 0);
}

// ------------------------------------------------------------ retention

/// Runs the source's retention cleanup the way a cycle does.
async fn cleanup(p: &Pipeline) {
    p.wait_quiet().await;
    p.connect_source().await.maintain().await.unwrap();
}

/// Runs the next cycles with a short retention. The longest retention any
/// agent asked for is what the source keeps, so the earlier cycles' request
/// (a week) is withdrawn, as if it had lapsed.
async fn shorten_retention(p: &mut Pipeline, retention: Duration) {
    p.retention = retention;
    p.exec("DELETE FROM ctmirror_ct.retention_requests").await;
}

async fn min_valid(p: &Pipeline, table: &str) -> i64 {
    let c = p.source().await;
    c.query_one("SELECT min_valid_version FROM ctmirror_ct.tracked WHERE table_name = $1", &[&table])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_idle_table_never_expires_across_cleanups() {
    let mut p = start("ret_idle", 100, Options::default()).await;
    shorten_retention(&mut p, Duration::from_secs(1)).await;
    let first = p.mirror_cursor("note").await.unwrap().version().0;
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        p.exec(&format!("UPDATE item SET qty = {round} WHERE id <= 10")).await;
        let r = p.cycle().await; // maintains (cleans up) first, then syncs
        assert!(r.succeeded(), "round {round}: {r:#?}");
        assert_not_reloaded(&r, "note");
        assert_not_reloaded(&r, "item");
    }
    cleanup(&p).await;
    assert!(min_valid(&p, "note").await > first, "cleanup must have passed the idle table's first cursor");
    let r = p.cycle().await;
    assert_not_reloaded(&r, "note");
    p.assert_converged().await;
}

#[tokio::test]
async fn an_expired_table_is_reloaded_alone() {
    let o = Options { drop_unmapped_tables: false, ..Options::default() };
    let mut p = start("ret_expired", 300, o).await;
    // `note` leaves the map for longer than retention: its mirror stays
    // (drop_unmapped_tables = false) with a cursor that no one advances.
    // Another application still reads it, so it stays tracked.
    p.exec(
        "INSERT INTO ctmirror_ct.readers SELECT table_oid, 'another_app', now() FROM ctmirror_ct.tracked
          WHERE table_name = 'note'",
    )
    .await;
    p.map = map(ITEM, false);
    shorten_retention(&mut p, Duration::from_secs(1)).await;
    p.exec("DELETE FROM note WHERE id <= 5; UPDATE note SET body = 'changed' WHERE id = 6;").await;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        p.exec("UPDATE item SET qty = qty + 1 WHERE id = 1").await;
        assert!(p.cycle().await.succeeded());
    }
    let stale = p.mirror_cursor("note").await.unwrap().version().0;
    assert!(min_valid(&p, "note").await > stale, "the note cursor must be expired for this test");
    p.map = map(ITEM, true);
    p.exec("UPDATE item SET qty = 0 WHERE id = 2").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "note", "retention expired");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

// ------------------------------------------------------------ restored source

/// A PostgreSQL client program of the test cluster's version.
fn pg_tool(name: &str) -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("CTMIRROR_PG_BIN") {
        return std::path::Path::new(&dir).join(name);
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| name.into())
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn dump_file(label: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dumps");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{label}-{}.dump", std::process::id()))
}

#[tokio::test]
async fn a_source_restored_from_an_earlier_dump_rebuilds_the_mirror() {
    let p = start("restore_src", 500, opts(100)).await;
    let dump = dump_file("restore_src");
    run(std::process::Command::new(pg_tool("pg_dump")).args(["-Fc", "-f"]).arg(&dump).arg(&p.source_db().url));
    p.exec(
        "DELETE FROM item WHERE id <= 50; INSERT INTO item VALUES (9000, 'after the dump', 1, 1, 's');
         UPDATE note SET body = 'after the dump';",
    )
    .await;
    assert!(p.cycle().await.succeeded());
    p.assert_converged().await;

    // The database is replaced by the earlier dump, under the same name.
    let admin = support::connect(&support::admin_url()).await;
    let name = &p.source_db().name;
    admin.batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.unwrap();
    run(std::process::Command::new(pg_tool("pg_restore")).args(["--no-owner", "-d"]).arg(&p.source_db().url).arg(&dump));

    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    let why = r.restore.as_deref().expect("the restore is detected");
    assert!(why.contains("identity changed"), "{why}");
    assert_reloaded(&r, "item", "source restored");
    assert_reloaded(&r, "note", "source restored");
    p.assert_converged().await;
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item").await, 500, "rows deleted after the dump are back");
    // The rebuilt mirror is the new normal: the next cycle is incremental.
    p.exec("UPDATE item SET qty = 1 WHERE id = 1").await;
    let r = p.cycle().await;
    assert!(r.restore.is_none(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
    std::fs::remove_file(dump).ok();
}

#[tokio::test]
async fn a_mirror_ahead_of_the_source_rebuilds_every_table() {
    let p = start("restore_version", 200, Options::default()).await;
    // What a source restored to an older version looks like from here: the
    // receiver holds a cursor the source has not reached.
    p.mirror()
        .await
        .batch_execute(
            "UPDATE ctmirror.tables SET cursor = '{\"phase\":\"changes\",\"version\":900000000000,\"after_key\":null}'
              WHERE table_name = 'note'",
        )
        .await
        .unwrap();
    p.exec("UPDATE item SET qty = 7 WHERE id = 7").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert!(r.restore.as_deref().unwrap_or("").contains("newer than the source's current version"), "{r:#?}");
    assert_reloaded(&r, "note", "source restored");
    assert_reloaded(&r, "item", "source restored");
    p.assert_converged().await;
}

// ------------------------------------------------------------ partner side

#[tokio::test]
async fn a_mirror_schema_dropped_by_the_partner_is_recreated_and_loaded() {
    let p = start("partner_drop", 300, Options::default()).await;
    p.mirror().await.batch_execute("DROP SCHEMA mirror_acme CASCADE").await.unwrap();
    p.exec("UPDATE item SET qty = 3 WHERE id = 3").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_eq!(table(&r, "item").mode, SyncMode::Full);
    assert_eq!(table(&r, "note").mode, SyncMode::Full);
    p.assert_converged().await;
}

#[tokio::test]
async fn a_mirror_restored_to_an_older_copy_catches_up() {
    let p = start("partner_restore", 300, opts(100)).await;
    let dump = dump_file("partner_restore");
    let mirror_url = p.mirror_db.url.clone();
    run(std::process::Command::new(pg_tool("pg_dump"))
        .args(["-Fc", "-n", "mirror_acme", "-n", "ctmirror", "-f"])
        .arg(&dump)
        .arg(&mirror_url));
    p.exec("DELETE FROM item WHERE id <= 20; UPDATE item SET qty = 42 WHERE id > 250; INSERT INTO note VALUES (77, 'n');")
        .await;
    assert!(p.cycle().await.succeeded());
    run(std::process::Command::new(pg_tool("pg_restore")).args(["--clean", "--if-exists", "-d"]).arg(&mirror_url).arg(&dump));
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item").await, 300, "the older copy is back");

    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    assert_not_reloaded(&r, "note");
    assert_eq!(table(&r, "item").counts.deleted, 20);
    p.assert_converged().await;
    std::fs::remove_file(dump).ok();
}

#[tokio::test]
async fn a_batch_the_mirror_refuses_is_named_applied_not_at_all_and_retried() {
    let p = start("partner_check", 200, Options::default()).await;
    let m = p.mirror().await;
    m.batch_execute("ALTER TABLE mirror_acme.item ADD CONSTRAINT small_qty CHECK (qty < 1000)").await.unwrap();
    p.exec("UPDATE item SET qty = 1 WHERE id = 10; UPDATE item SET qty = 5000 WHERE id = 42; UPDATE note SET body = 'fine';")
        .await;
    let r = p.cycle().await;
    let item = table(&r, "item");
    let e = item.error.as_ref().expect("the batch is refused");
    assert_eq!(e.kind, AgentErrorKind::Refused, "{e}");
    assert!(e.message.contains("key [42]") && e.message.contains("small_qty"), "{e}");
    assert_eq!(scalar::<Option<i32>>(&m, "SELECT qty FROM mirror_acme.item WHERE id = 10").await, Some(10), "nothing of the batch");
    let note = table(&r, "note");
    assert!(note.error.is_none() && note.counts.updated == 50, "{note:#?}");

    // Next cycle: refused again, nothing lost; once the partner lifts the
    // constraint the table converges.
    let r = p.cycle().await;
    assert!(table(&r, "item").error.is_some());
    m.batch_execute("ALTER TABLE mirror_acme.item DROP CONSTRAINT small_qty").await.unwrap();
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_full_partner_disk_fails_the_table_retryably_and_the_rest_goes_on() {
    let p = start("partner_disk", 100, Options::default()).await;
    let m = p.mirror().await;
    m.batch_execute(
        "CREATE FUNCTION public.no_space() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$;
         CREATE TRIGGER no_space BEFORE INSERT OR UPDATE ON mirror_acme.item FOR EACH ROW EXECUTE FUNCTION public.no_space();",
    )
    .await
    .unwrap();
    p.exec("UPDATE item SET qty = 99 WHERE id <= 3; UPDATE note SET body = 'ok' WHERE id = 1;").await;
    let r = p.cycle().await;
    let e = table(&r, "item").error.as_ref().expect("the disk is full");
    assert_eq!(e.kind, AgentErrorKind::Transient, "{e}");
    assert!(e.message.contains("No space left") && e.message.contains("53100"), "{e}");
    assert!(table(&r, "note").error.is_none());
    m.batch_execute("DROP TRIGGER no_space ON mirror_acme.item").await.unwrap();
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_column_the_partner_dropped_triggers_a_reload_of_that_table() {
    let p = start("partner_column", 200, Options::default()).await;
    p.mirror().await.batch_execute("ALTER TABLE mirror_acme.item DROP COLUMN qty").await.unwrap();
    p.exec("UPDATE item SET qty = 5 WHERE id = 5").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "no longer matches");
    assert_not_reloaded(&r, "note");
    p.assert_converged().await;
}

// ------------------------------------------------- DDL no trigger sees

#[tokio::test]
async fn a_dropped_and_re_added_last_column_reloads_the_table() {
    let p = start("evo_readd", 200, Options::default()).await;
    // `body` is note's last column: the schema hash does not change at all.
    p.exec("ALTER TABLE note DROP COLUMN body; ALTER TABLE note ADD COLUMN body text DEFAULT 'fresh'").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "note", "dropped and re-added");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

#[tokio::test]
async fn a_renamed_enum_label_reloads_the_table() {
    let setup = "CREATE TYPE mood AS ENUM ('happy', 'sad');
                 CREATE TABLE item (id bigint PRIMARY KEY, name varchar(50) NOT NULL, qty integer, price numeric(10,2),
                                    feeling mood);
                 INSERT INTO item SELECT i, 'item ' || i, i, i, CASE WHEN i % 2 = 0 THEN 'sad' ELSE 'happy' END::mood
                   FROM generate_series(1, 100) i;";
    let toml = "application = \"crm_insights\"\n[[table]]\ntable = \"item\"\ncolumns = [\"id\", \"name\", \"feeling\"]\n";
    let p = Pipeline::start_with("evo_enum", setup, toml, Options::default()).await;
    assert!(p.cycle().await.succeeded());
    p.exec("ALTER TYPE mood RENAME VALUE 'sad' TO 'glum'").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "enum labels");
    p.assert_converged().await;
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE feeling = 'glum'").await, 50);
}

#[tokio::test]
async fn a_renamed_enum_label_held_by_an_interrupted_load_reloads_the_table() {
    let setup = "CREATE TYPE stage AS ENUM ('a', 'b', 'c', 'd');
                 CREATE TABLE item (s stage, n int, v text, PRIMARY KEY (s, n));
                 INSERT INTO item SELECT s, n, 'v' FROM unnest(enum_range(NULL::stage)) s, generate_series(1, 50) n;";
    let toml = "application = \"crm_insights\"\n[[table]]\ntable = \"item\"\ncolumns = [\"s\", \"n\", \"v\"]\n";
    let p = Pipeline::start_with("evo_enum_key", setup, toml, opts(40)).await;
    // The first load stops after one batch: its cursor holds key ('a', 40).
    let control = CycleControl::default();
    let stop = control.stop.clone();
    let progress: ProgressFn = Arc::new(move |_| stop.stop(StopReason::Blackout));
    let control = CycleControl { progress: Some(progress), ..control };
    p.wait_quiet().await;
    let mut source = p.connect_source().await;
    let r = run_controlled_cycle(&mut source, &p.client(), &p.map, TENANT, CycleSettings { limits: p.limits }, &control)
        .await
        .unwrap();
    assert!(r.interrupted(), "{r:#?}");
    assert!(matches!(p.mirror_cursor("item").await, Some(Cursor::Snapshot { after_key: Some(_), .. })));
    // The label the cursor holds no longer exists.
    p.exec("ALTER TYPE stage RENAME VALUE 'a' TO 'first'").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert!(table(&r, "item").reloaded, "{r:#?}");
    p.assert_converged().await;
}

// ------------------------------------------------------------ partitions

const PARTITIONED: &str = "
    CREATE TABLE item (id bigint, region text, name text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE item_eu PARTITION OF item FOR VALUES IN ('eu');
    CREATE TABLE item_us PARTITION OF item FOR VALUES IN ('us');
    CREATE TABLE item_ap (id bigint, region text, name text, PRIMARY KEY (id, region));
    INSERT INTO item SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, 'item ' || i FROM generate_series(1, 200) i;
    INSERT INTO item_ap SELECT i, 'ap', 'waiting ' || i FROM generate_series(1, 30) i;";

#[tokio::test]
async fn partition_writes_and_partition_ddl_reach_the_mirror() {
    let toml = "application = \"crm_insights\"\n[[table]]\ntable = \"item\"\ncolumns = [\"id\", \"region\", \"name\"]\n";
    let p = Pipeline::start_with("evo_partitions", PARTITIONED, toml, opts(50)).await;
    assert!(p.cycle().await.succeeded());
    p.assert_converged().await;
    // Writes that name a partition, as time-partitioned loaders do.
    p.exec(
        "INSERT INTO item_eu VALUES (1000, 'eu', 'direct');
         UPDATE item_us SET name = 'direct update' WHERE id <= 21;
         UPDATE item_eu SET id = id + 5000 WHERE id = 2;
         DELETE FROM item_us WHERE id BETWEEN 31 AND 41;
         TRUNCATE item_eu;
         INSERT INTO item_eu VALUES (1001, 'eu', 'after the truncate');",
    )
    .await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
    // Rows that arrive or leave without any write: they travel as changes.
    for ddl in [
        "ALTER TABLE item ATTACH PARTITION item_ap FOR VALUES IN ('ap')",
        "ALTER TABLE item DETACH PARTITION item_us",
    ] {
        p.exec(ddl).await;
        let r = p.cycle().await;
        assert!(r.succeeded(), "{ddl}: {r:#?}");
        assert_not_reloaded(&r, "item");
        p.assert_converged().await;
    }
    // Rows a dropped partition took along cannot be listed: the table reloads.
    p.exec("DROP TABLE item_eu").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "partition of the table was dropped");
    p.assert_converged().await;
    // The attached partition's own writes are captured from now on.
    p.exec("UPDATE item_ap SET name = 'attached' WHERE id <= 3").await;
    let r = p.cycle().await;
    assert_not_reloaded(&r, "item");
    assert_eq!(table(&r, "item").counts.updated, 3);
    p.assert_converged().await;
}

// ------------------------------------------------ tracking lifetimes

#[tokio::test]
async fn a_recreated_table_reloads_whichever_cycle_noticed_first_even_under_a_long_transaction() {
    let p = start("lifetime", 200, Options::default()).await;
    // A long writing transaction (any database of the server) holds the
    // readable version back from here on.
    let mut long = support::connect(&support::admin_url()).await;
    let long_tx = long.transaction().await.unwrap();
    long_tx.query_one("SELECT pg_current_xact_id()", &[]).await.unwrap();
    p.exec("UPDATE item SET qty = 7 WHERE id = 1").await;
    assert!(p.cycle_now().await.succeeded());
    // The table is swapped for a new one under the same name.
    p.exec(
        "DROP TABLE item;
         CREATE TABLE item (id bigint PRIMARY KEY, name varchar(50) NOT NULL, qty integer, price numeric(10,2), secret text);
         INSERT INTO item SELECT i, 'new ' || i, 1, 1, 's' FROM generate_series(101, 150) i;",
    )
    .await;
    // Another application's cycle (or this one's, failing right after)
    // enables the new table's tracking and gets "newly enabled".
    let mut other = p.connect_source().await;
    assert!(other.ensure_tracking(&ctmirror::source::SourceTable { schema: None, name: "item".into() }).await.unwrap().newly_enabled);
    let r = p.cycle_now().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_reloaded(&r, "item", "reinstalled");
    assert_not_reloaded(&r, "note");
    p.assert_converged().await;
    long_tx.rollback().await.unwrap();
    let r = p.cycle().await;
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
}

// ------------------------------------------------ logical replication

#[tokio::test]
async fn rows_applied_by_a_logical_replication_subscription_reach_the_mirror() {
    let admin = support::connect(&support::admin_url()).await;
    let wal_level: String = admin.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal_level, "logical", "scripts/test starts the cluster with wal_level = logical");
    let publisher = support::TestDb::create("subscription_pub").await;
    let pubc = publisher.client().await;
    let slot = format!("ctm_{}", publisher.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let slot = &slot[..slot.len().min(60)];
    pubc.batch_execute(&format!(
        "CREATE TABLE item (id bigint PRIMARY KEY, name varchar(50) NOT NULL, qty integer, price numeric(10,2), secret text);
         INSERT INTO item SELECT i, 'pub ' || i, i, i, 's' FROM generate_series(1, 100) i;
         CREATE PUBLICATION ctm_pub FOR TABLE item;"
    ))
    .await
    .unwrap();
    // Made here, not by CREATE SUBSCRIPTION: publisher and subscriber share
    // a cluster, and creating the slot would wait for the subscriber's own
    // transaction.
    pubc.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
    let p = start("subscription", 0, Options::default()).await;
    let port = support::admin_url().rsplit_once(':').unwrap().1.split('/').next().unwrap().to_owned();
    p.exec(&format!(
        "CREATE SUBSCRIPTION ctm_sub CONNECTION 'host=127.0.0.1 port={port} user=postgres dbname={}'
           PUBLICATION ctm_pub WITH (create_slot = false, slot_name = '{slot}')",
        publisher.name
    ))
    .await;
    let src = p.source().await;
    let digest = "SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM item t";
    let wait_applied = || async {
        for _ in 0..600 {
            let want: String = pubc.query_one(digest, &[]).await.unwrap().get(0);
            let got: String = src.query_one(digest, &[]).await.unwrap().get(0);
            if want == got {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the subscription did not catch up");
    };
    // The initial copy behaves like COPY (statement triggers fire).
    wait_applied().await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    p.assert_converged().await;
    // What the apply worker writes fires row triggers only.
    pubc.batch_execute(
        "INSERT INTO item VALUES (500, 'new', 1, 1, 's');
         UPDATE item SET name = 'updated' WHERE id <= 10;
         UPDATE item SET id = id + 1000 WHERE id BETWEEN 11 AND 15;
         DELETE FROM item WHERE id BETWEEN 20 AND 29;",
    )
    .await
    .unwrap();
    wait_applied().await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    assert_not_reloaded(&r, "item");
    p.assert_converged().await;
    p.exec("ALTER SUBSCRIPTION ctm_sub DISABLE; ALTER SUBSCRIPTION ctm_sub SET (slot_name = NONE); DROP SUBSCRIPTION ctm_sub;")
        .await;
    pubc.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}

// ------------------------------------------------------------ failover

#[tokio::test]
async fn a_promoted_standby_that_lost_transactions_rebuilds_the_mirror_even_after_reusing_their_versions() {
    use harness::PgDriver;
    use support::cluster::Cluster;
    let primary = Cluster::start("failover_primary");
    primary.psql("postgres", "CREATE DATABASE tenant");
    let on = |c: &Cluster| PgDriver { db: support::TestDb { name: "tenant".into(), url: c.url("tenant") } };
    let p = Pipeline::launch("failover", on(&primary), &setup(300), &map_toml(ITEM, true), Options::default()).await;
    let mut standby = primary.standby("failover_standby");
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    standby.wait_for_replay_of(&primary);

    // The asynchronous standby falls behind; the primary commits changes
    // the mirror receives, then crashes before the standby has them.
    standby.stop_immediate();
    p.exec("DELETE FROM item WHERE id <= 20; INSERT INTO item VALUES (9001, 'lost at failover', 1, 1, 's');").await;
    p.exec("UPDATE note SET body = 'lost at failover' WHERE id <= 10").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    let seen = p.mirror_cursor("item").await.unwrap().version().0;
    let mut primary = primary;
    primary.stop_immediate();

    standby.restart();
    standby.promote();
    // The new primary hands out the lost transactions' ids again, for
    // other transactions, until it is past every version the mirror saw.
    loop {
        let xid: i64 = standby.psql("tenant", "SELECT txid_current()").parse().unwrap();
        if xid > seen + 5 {
            break;
        }
    }
    let mut p = p;
    p.src = on(&standby);
    p.exec("UPDATE item SET name = 'after failover' WHERE id BETWEEN 30 AND 40; DELETE FROM note WHERE id = 50;").await;
    let r = p.cycle().await;
    assert!(r.succeeded(), "{r:#?}");
    let why = r.restore.as_deref().expect("the failover is detected");
    assert!(why.contains("identity changed"), "{why}");
    assert_reloaded(&r, "item", "source restored");
    assert_reloaded(&r, "note", "source restored");
    p.assert_converged().await;
    let m = p.mirror().await;
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE id <= 20").await, 20, "the lost delete is undone");
    assert_eq!(scalar::<i64>(&m, "SELECT count(*) FROM mirror_acme.item WHERE id = 9001").await, 0, "the lost insert is gone");
}

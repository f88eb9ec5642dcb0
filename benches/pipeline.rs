//! The pipeline benchmark; run it with `scripts/bench`.
//!
//! Measures ctmirror end to end, as the processes a hosting operator and a
//! partner run (`ctmirror sync`, `ctmirror receiver`), against two
//! references on the same PostgreSQL clusters with the same settings:
//!
//! - the **baseline**, a binary `COPY … TO STDOUT` streamed into `COPY …
//!   FROM STDIN`: about the fastest any pipeline can move a table, and
//! - the **anchor**, PostgreSQL's native logical replication: what a partner
//!   would run instead, for the initial sync and for changes;
//!
//! then the idle cycle of a 20-table tenant, the peak memory of agent and
//! receiver on a 10,000,000-row table (`--big`), and the cost of the capture
//! triggers on a durable cluster. Each figure is the median of `--repeat`
//! runs; every run, with the CPU time each process used, goes to the JSON
//! file.
//!
//! `scripts/bench` builds ctmirror, starts the clusters and passes their
//! URLs. `cargo test --all-targets` (scripts/test) runs `harness = false`
//! benches without `--bench`; there this program does nothing.

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, TryStreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

// ------------------------------------------------------------ constants --

/// A tenant database on the source cluster and the application it feeds.
struct Tenant {
    id: &'static str,
    database: &'static str,
    app: &'static str,
}

/// The generated `contact` table (`--rows` rows).
const MAIN: Tenant = Tenant { id: "acme", database: "tenant", app: "bench" };
/// Twenty small tables that never change: the idle cycle.
const IDLE: Tenant = Tenant { id: "idle", database: "idle_tenant", app: "bench_idle" };
/// `contact` again with 10,000,000 rows, for `--big`.
const BIG: Tenant = Tenant { id: "big", database: "tenant_big", app: "bench" };
const TENANTS: [&Tenant; 3] = [&MAIN, &IDLE, &BIG];

const CONTACT_COLUMNS: [&str; 12] = [
    "id",
    "first_name",
    "last_name",
    "email",
    "notes",
    "account_id",
    "owner_id",
    "created_at",
    "updated_at",
    "balance",
    "active",
    "external_id",
];

/// The durable cluster's database of the trigger measurement.
const TRIGGER_DB: &str = "bench_triggers";
/// The publication on the main tenant that every subscription uses.
const PUBLICATION: &str = "bench_pub";
/// Rows changed by the incremental and UPDATE measurements.
const UPDATE_ROWS: i64 = 100_000;
/// Rows per transaction of the many-transactions variant.
const SMALL_TX_ROWS: usize = 100;
const IDLE_TABLES: usize = 20;
const IDLE_TABLE_ROWS: i64 = 100;
const BIG_ROWS: i64 = 10_000_000;
/// The incremental updates set `owner_id` to a fresh marker; normal owner
/// ids are 1..=1000, so the markers never collide with data.
const FIRST_MARKER: i32 = 1_000_000;

/// How often the subscription state is polled during an initial sync.
const READY_POLL: Duration = Duration::from_millis(20);
/// How often the mirror is polled for a change made visible.
const VISIBLE_POLL: Duration = Duration::from_millis(10);
/// How often peak RSS is read while a sync runs.
const RSS_POLL: Duration = Duration::from_millis(50);
/// Waits that end in an error rather than hang the bench forever.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);
const RECEIVER_START_LIMIT: Duration = Duration::from_secs(30);

const MIB: f64 = 1024.0 * 1024.0;

// --------------------------------------------------------- command line --

#[derive(Parser, Debug)]
#[command(about = "ctmirror pipeline benchmark. Run it with scripts/bench, which starts the PostgreSQL clusters \
                   and passes --source-url, --mirror-url, --durable-url, --pg-bin, --ctmirror and --work-dir.")]
struct Args {
    /// Rows in the generated `contact` table.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    rows: i64,
    /// Also measure the agent's and receiver's peak RSS during a 10,000,000-row full load (section rss).
    #[arg(long)]
    big: bool,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Run only these sections (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// Length of each pgbench run of the trigger measurement.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..))]
    pgbench_seconds: u32,
    /// pgbench clients (and threads) of the trigger measurement.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pgbench_clients: u32,
    /// Source cluster, without a database: postgres://postgres@127.0.0.1:PORT
    #[arg(long)]
    source_url: String,
    /// Mirror cluster (same settings as the source).
    #[arg(long)]
    mirror_url: String,
    /// Durable cluster (fsync and synchronous_commit on) for the trigger overhead.
    #[arg(long)]
    durable_url: String,
    /// PostgreSQL's bin folder (pgbench).
    #[arg(long)]
    pg_bin: PathBuf,
    /// The release build of ctmirror.
    #[arg(long)]
    ctmirror: PathBuf,
    /// Results go here; scratch files (configs, keys, logs) to its run/ folder.
    #[arg(long)]
    work_dir: PathBuf,
    /// A postgresql.conf line of the source and mirror clusters (recorded in the results).
    #[arg(long = "pipeline-setting")]
    pipeline_settings: Vec<String>,
    /// A postgresql.conf line of the durable cluster (recorded in the results).
    #[arg(long = "durable-setting")]
    durable_settings: Vec<String>,
    /// Added by `cargo bench`.
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Binary COPY pipe.
    Baseline,
    /// Logical replication initial sync.
    Anchor,
    /// ctmirror full load.
    Full,
    /// ctmirror and logical replication after 100,000 updated rows.
    Incremental,
    /// ctmirror cycle of a 20-table tenant without changes.
    Idle,
    /// Capture-trigger overhead (durable cluster).
    Triggers,
    /// Peak RSS at 10,000,000 rows (what --big adds).
    Rss,
}

impl Args {
    fn runs(&self, section: Section) -> bool {
        if self.only.is_empty() {
            section != Section::Rss || self.big
        } else {
            self.only.contains(&section)
        }
    }

    fn needs_main_tenant(&self) -> bool {
        [Section::Baseline, Section::Anchor, Section::Full, Section::Incremental].iter().any(|&s| self.runs(s))
    }
}

// --------------------------------------------------------------- errors --

type Result<T, E = String> = std::result::Result<T, E>;

/// Says what was being done when an error happened, with the error's whole
/// chain: tokio-postgres's own message is just "db error".
trait Context<T> {
    fn context(self, doing: impl Display) -> Result<T>;
}

impl<T, E: std::error::Error> Context<T> for std::result::Result<T, E> {
    fn context(self, doing: impl Display) -> Result<T> {
        self.map_err(|e| {
            let mut message = format!("{doing}: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                message.push_str(&format!(": {c}"));
                cause = c.source();
            }
            message
        })
    }
}

// ----------------------------------------------------------------- main --

fn main() -> ExitCode {
    // `cargo test --all-targets` (scripts/test) runs harness-less benches
    // too, without `--bench` and without the clusters.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/pipeline: nothing to do under cargo test; run scripts/bench");
        return ExitCode::SUCCESS;
    }
    // A plain `cargo bench` has no clusters either: say how to run it.
    let by_hand = !std::env::args().any(|a| a.starts_with("--source-url") || a == "--help" || a == "-h");
    if by_hand {
        eprintln!(
            "benches/pipeline needs the PostgreSQL clusters that scripts/bench starts: run \
             scripts/bench [--rows N] [--repeat K] [--only a,b] [--big]"
        );
        return ExitCode::from(2);
    }
    let args = Args::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("the bench needs a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bench failed: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut bench = Bench::new(args).await?;
    if bench.args.needs_main_tenant() {
        bench.create_main_tenant().await?;
        bench.warm_up_mirror().await?;
    }
    if bench.args.runs(Section::Baseline) {
        bench.measure_copy_pipe().await?;
    }
    if bench.args.runs(Section::Anchor) {
        bench.measure_logical_initial_sync().await?;
    }
    if bench.args.runs(Section::Full) {
        bench.measure_full_load().await?;
    }
    if bench.args.runs(Section::Incremental) {
        bench.measure_ctmirror_incremental().await?;
        bench.measure_logical_incremental().await?;
    }
    if bench.args.runs(Section::Idle) {
        bench.measure_idle_cycle().await?;
    }
    if bench.args.runs(Section::Triggers) {
        bench.measure_trigger_overhead().await?;
    }
    if bench.args.runs(Section::Rss) {
        bench.measure_big_full_load().await?;
    }
    let lines = bench.lines();
    print_table(&lines);
    bench.print_notes();
    bench.write_results(&lines)
}

// ---------------------------------------------------------------- bench --

/// The clusters, the files ctmirror needs, and everything measured so far.
struct Bench {
    args: Args,
    source_admin: Client,
    mirror_admin: Client,
    durable_admin: Client,
    /// Configs, keys, schema maps and logs.
    run_dir: PathBuf,
    cpu: CpuMeter,
    postgres_version: String,
    started_at: chrono::DateTime<chrono::Utc>,
    next_marker: i32,
    series: BTreeMap<&'static str, Series>,
    notes: Vec<String>,
}

impl Bench {
    async fn new(args: Args) -> Result<Bench> {
        let run_dir = args.work_dir.join("run");
        std::fs::create_dir_all(run_dir.join("maps")).context(format!("creating {}", run_dir.display()))?;
        let source_admin = connect(&db_url(&args.source_url, "postgres")).await?;
        let mirror_admin = connect(&db_url(&args.mirror_url, "postgres")).await?;
        let durable_admin = connect(&db_url(&args.durable_url, "postgres")).await?;
        let postgres_version: String = source_admin
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .context("reading the server version")?
            .get(0);
        let cpu = CpuMeter {
            ticks_per_second: clock_ticks_per_second().await,
            source: postmaster_pid(&source_admin).await?,
            mirror: postmaster_pid(&mirror_admin).await?,
        };
        let bench = Bench {
            args,
            source_admin,
            mirror_admin,
            durable_admin,
            run_dir,
            cpu,
            postgres_version,
            started_at: chrono::Utc::now(),
            next_marker: FIRST_MARKER,
            series: BTreeMap::new(),
            notes: Vec::new(),
        };
        bench.generate_keys().await?;
        bench.write_schema_maps()?;
        say(format!(
            "PostgreSQL {}, {} contact rows, median of {} run(s)",
            bench.postgres_version,
            grouped(bench.args.rows as f64),
            bench.args.repeat
        ));
        Ok(bench)
    }

    fn source_url(&self, database: &str) -> String {
        db_url(&self.args.source_url, database)
    }

    fn mirror_url(&self, database: &str) -> String {
        db_url(&self.args.mirror_url, database)
    }

    fn marker(&mut self) -> i32 {
        self.next_marker += 1;
        self.next_marker
    }

    /// Keeps one run of a measurement.
    fn record(&mut self, key: &'static str, unit: Unit, value: f64, run: Value) {
        let series = self.series.entry(key).or_insert_with(|| Series { unit, values: Vec::new(), runs: Vec::new() });
        series.values.push(value);
        series.runs.push(run);
    }

    fn median(&self, key: &str) -> Option<f64> {
        self.series.get(key).map(Series::median)
    }

    // ------------------------------------------------------ set-up --

    async fn generate_keys(&self) -> Result<()> {
        for who in ["agent", "partner"] {
            let out = self.run_dir.join("keys").join(who);
            let output = Command::new(&self.args.ctmirror)
                .arg("keygen")
                .arg("--out")
                .arg(&out)
                .output()
                .await
                .context(format!("running {} keygen", self.args.ctmirror.display()))?;
            if !output.status.success() {
                return Err(format!("ctmirror keygen failed: {}", String::from_utf8_lossy(&output.stderr)));
            }
        }
        Ok(())
    }

    /// Application `bench` maps every column of `contact`; `bench_idle`
    /// maps the idle tenant's twenty tables.
    fn write_schema_maps(&self) -> Result<()> {
        let quoted = |cols: &[&str]| cols.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        let contact = format!(
            "application = \"{}\"\n\n[[table]]\ntable = \"contact\"\ncolumns = [{}]\n",
            MAIN.app,
            quoted(&CONTACT_COLUMNS)
        );
        let mut idle = format!("application = \"{}\"\n", IDLE.app);
        for table in idle_table_names() {
            idle.push_str(&format!(
                "\n[[table]]\ntable = \"{table}\"\ncolumns = [{}]\n",
                quoted(&["id", "name", "amount", "updated_at"])
            ));
        }
        for (app, text) in [(MAIN.app, contact), (IDLE.app, idle)] {
            let path = self.run_dir.join("maps").join(format!("{app}.toml"));
            std::fs::write(&path, text).context(format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The main tenant: `contact` with `--rows` rows and the publication
    /// of it that every subscription uses.
    async fn create_main_tenant(&self) -> Result<()> {
        say(format!("generating {} contact rows in {}", grouped(self.args.rows as f64), MAIN.database));
        self.create_contact_database(MAIN.database, self.args.rows).await?;
        let client = connect(&self.source_url(MAIN.database)).await?;
        execute(&client, &format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE contact")).await
    }

    /// A fresh source database holding `contact` with `rows` rows, vacuumed
    /// so no measurement pays for hint bits or the visibility map the
    /// first reader would otherwise write.
    async fn create_contact_database(&self, database: &str, rows: i64) -> Result<()> {
        recreate_database(&self.source_admin, database).await?;
        let client = connect(&self.source_url(database)).await?;
        execute(&client, &contact_ddl("contact")).await?;
        execute(&client, &contact_fill("contact", rows)).await?;
        execute(&client, "VACUUM (ANALYZE) contact").await?;
        execute(&self.source_admin, "CHECKPOINT").await
    }

    /// One untimed COPY pipe into a scratch database, so the first timed
    /// measurement does not pay alone for the fresh mirror cluster's first
    /// WAL segments and cold caches.
    async fn warm_up_mirror(&self) -> Result<()> {
        say("warming up the mirror cluster (one untimed COPY pipe)");
        let database = "bench_warm_up";
        recreate_database(&self.mirror_admin, database).await?;
        let source = connect(&self.source_url(MAIN.database)).await?;
        let mirror = connect(&self.mirror_url(database)).await?;
        execute(&mirror, &contact_ddl("contact")).await?;
        copy_pipe(&source, &mirror).await?;
        drop(mirror);
        drop_database(&self.mirror_admin, database).await
    }

    // ---------------------------------------------------- baseline --

    /// Baseline: the table streamed by binary COPY from source to a fresh
    /// empty table (same definition, primary key included) on the mirror.
    async fn measure_copy_pipe(&mut self) -> Result<()> {
        say("baseline: binary COPY pipe");
        let database = "bench_copy";
        recreate_database(&self.mirror_admin, database).await?;
        let source = connect(&self.source_url(MAIN.database)).await?;
        let mirror = connect(&self.mirror_url(database)).await?;
        for run in 1..=self.args.repeat {
            execute(&mirror, &format!("DROP TABLE IF EXISTS contact; {}", contact_ddl("contact"))).await?;
            let mark = self.cpu.mark(None);
            let started = Instant::now();
            let (rows, bytes) = copy_pipe(&source, &mirror).await?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu = self.cpu.since(&mark, None);
            expect_rows("the COPY pipe", rows as i64, self.args.rows)?;
            self.progress("COPY pipe", run, seconds, self.args.rows);
            self.record("copy_pipe", Unit::Seconds, seconds, json!({ "seconds": seconds, "bytes": bytes, "cpu": cpu }));
        }
        drop(mirror);
        drop_database(&self.mirror_admin, database).await
    }

    // ------------------------------------------------------ anchor --

    /// Anchor: a subscription on a fresh mirror database, timed from
    /// CREATE SUBSCRIPTION until the table's initial copy is done and the
    /// apply worker has taken it over (state 'r').
    async fn measure_logical_initial_sync(&mut self) -> Result<()> {
        say("anchor: logical replication initial sync");
        for run in 1..=self.args.repeat {
            let database = format!("bench_lr_{run}");
            let subscription = format!("bench_initial_{run}");
            recreate_database(&self.mirror_admin, &database).await?;
            let mirror = connect(&self.mirror_url(&database)).await?;
            execute(&mirror, &contact_ddl("contact")).await?;
            let mark = self.cpu.mark(None);
            let started = Instant::now();
            self.subscribe(&mirror, &subscription).await?;
            wait_until_ready(&mirror, &subscription).await?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu = self.cpu.since(&mark, None);
            expect_rows("the subscription", count(&mirror, "SELECT count(*) FROM contact").await?, self.args.rows)?;
            self.progress("logical replication initial sync", run, seconds, self.args.rows);
            self.record("logical_initial_sync", Unit::Seconds, seconds, json!({ "seconds": seconds, "cpu": cpu }));
            // Also drops the replication slot on the source.
            execute(&mirror, &format!("DROP SUBSCRIPTION {subscription}")).await?;
            drop(mirror);
            drop_database(&self.mirror_admin, &database).await?;
        }
        Ok(())
    }

    async fn subscribe(&self, mirror: &Client, subscription: &str) -> Result<()> {
        let sql = format!(
            "CREATE SUBSCRIPTION {subscription} CONNECTION '{}' PUBLICATION {PUBLICATION}",
            self.source_url(MAIN.database)
        );
        execute(mirror, &sql).await
    }

    // --------------------------------------------------- full load --

    /// A whole `ctmirror sync` process against a fresh mirror database, so
    /// every run is a full load. The first run on a source also installs
    /// change tracking there.
    async fn measure_full_load(&mut self) -> Result<()> {
        say("ctmirror full load");
        for run in 1..=self.args.repeat {
            let database = format!("bench_full_{run}");
            recreate_database(&self.mirror_admin, &database).await?;
            let tracked_before = self.is_tracked(MAIN.database).await?;
            let receiver = self.start_receiver(&format!("full-{run}"), &MAIN, &database).await?;
            let sync = self.sync(&receiver, &MAIN).await?;
            sync.check(&MAIN, "full", self.args.rows)?;
            self.expect_mirror_rows(&database, &MAIN, self.args.rows).await?;
            receiver.stop().await;
            drop_database(&self.mirror_admin, &database).await?;
            if !tracked_before {
                self.notes.push(format!(
                    "ctmirror full load run {run} also installed change tracking on the source (schema \
                     ctmirror_ct, triggers, side table); later runs found it installed."
                ));
            }
            let seconds = sync.wall.as_secs_f64();
            self.progress("ctmirror full load", run, seconds, self.args.rows);
            let mut detail = sync.json();
            detail["installed_tracking"] = json!(!tracked_before);
            self.record("ctmirror_full_load", Unit::Seconds, seconds, detail);
        }
        Ok(())
    }

    async fn is_tracked(&self, database: &str) -> Result<bool> {
        let client = connect(&self.source_url(database)).await?;
        let triggers = count(
            &client,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'contact'::regclass AND tgname LIKE 'ctmirror_ct_%'",
        )
        .await?;
        Ok(triggers > 0)
    }

    async fn expect_mirror_rows(&self, database: &str, tenant: &Tenant, rows: i64) -> Result<()> {
        let mirror = connect(&self.mirror_url(database)).await?;
        let sql = format!("SELECT count(*) FROM mirror_{}.contact", tenant.id);
        expect_rows("the ctmirror mirror", count(&mirror, &sql).await?, rows)
    }

    // ------------------------------------------------- incremental --

    /// After an untimed full load: the same rows updated in one
    /// transaction, then in many small ones, each followed by one timed
    /// `sync`.
    async fn measure_ctmirror_incremental(&mut self) -> Result<()> {
        say("ctmirror incremental");
        let plan = UpdatePlan::new(self.args.rows);
        let database = "bench_incremental";
        recreate_database(&self.mirror_admin, database).await?;
        let receiver = self.start_receiver("incremental", &MAIN, database).await?;
        self.sync(&receiver, &MAIN).await?.check(&MAIN, "full", self.args.rows)?;
        let mut source = connect(&self.source_url(MAIN.database)).await?;
        let mirror = connect(&self.mirror_url(database)).await?;
        let visible = format!("SELECT count(*) FROM mirror_{}.contact WHERE owner_id = $1", MAIN.id);
        for run in 1..=self.args.repeat {
            for shape in TxShape::BOTH {
                let marker = self.marker();
                plan.apply(&mut source, shape, marker).await?;
                let sync = self.sync(&receiver, &MAIN).await?;
                sync.check(&MAIN, "incremental", plan.rows())?;
                let shown = mirror.query_one(&visible, &[&marker]).await.context("counting mirrored updates")?;
                expect_rows("the mirrored updates", shown.get(0), plan.rows())?;
                let seconds = sync.wall.as_secs_f64();
                self.progress(&format!("ctmirror incremental, {}", plan.describe(shape)), run, seconds, plan.rows());
                self.record(shape.ctmirror_key(), Unit::Seconds, seconds, sync.json());
            }
        }
        receiver.stop().await;
        drop(mirror);
        drop_database(&self.mirror_admin, database).await
    }

    /// The anchor for the incremental runs: a live subscription, timed from
    /// the return of the (last) COMMIT until the mirror shows it.
    ///
    /// The subscriber applies transactions whole and in commit order, so
    /// once the last transaction's rows show the marker every earlier one
    /// does too: polling those rows through the primary key keeps each poll
    /// cheap (a full count every 10 ms would itself load the mirror). A
    /// full count afterwards checks it.
    async fn measure_logical_incremental(&mut self) -> Result<()> {
        say("logical replication incremental (commit to visible)");
        let plan = UpdatePlan::new(self.args.rows);
        let database = "bench_lr_live";
        let subscription = "bench_live";
        recreate_database(&self.mirror_admin, database).await?;
        let mirror = connect(&self.mirror_url(database)).await?;
        execute(&mirror, &contact_ddl("contact")).await?;
        self.subscribe(&mirror, subscription).await?;
        wait_until_ready(&mirror, subscription).await?;
        let mut source = connect(&self.source_url(MAIN.database)).await?;
        for run in 1..=self.args.repeat {
            for shape in TxShape::BOTH {
                let marker = self.marker();
                let committed = plan.apply(&mut source, shape, marker).await?;
                let shown = wait_until_visible(&mirror, plan.last_keys(), marker).await?;
                let seconds = shown.duration_since(committed).as_secs_f64();
                let all = count_marker(&mirror, "contact", marker).await?;
                if all != plan.rows() {
                    return Err(format!(
                        "the subscriber showed the last transaction with only {all} of {} updated rows; \
                         the commit-order assumption of this measurement does not hold",
                        plan.rows()
                    ));
                }
                self.progress(&format!("logical replication, {}", plan.describe(shape)), run, seconds, plan.rows());
                self.record(shape.logical_key(), Unit::Seconds, seconds, json!({ "seconds": seconds }));
            }
        }
        execute(&mirror, &format!("DROP SUBSCRIPTION {subscription}")).await?;
        drop(mirror);
        drop_database(&self.mirror_admin, database).await
    }

    // -------------------------------------------------------- idle --

    /// A tenant of twenty small tables, full-loaded once; then `sync`
    /// with nothing changed, as a frequent schedule runs it most of the
    /// time.
    async fn measure_idle_cycle(&mut self) -> Result<()> {
        say("ctmirror idle cycle, 20 tables");
        recreate_database(&self.source_admin, IDLE.database).await?;
        let source = connect(&self.source_url(IDLE.database)).await?;
        execute(&source, &idle_tables_sql()).await?;
        execute(&source, "VACUUM ANALYZE").await?;
        let database = "bench_idle";
        recreate_database(&self.mirror_admin, database).await?;
        let receiver = self.start_receiver("idle", &IDLE, database).await?;
        let loaded = IDLE_TABLES as i64 * IDLE_TABLE_ROWS;
        self.sync(&receiver, &IDLE).await?.check(&IDLE, "full", loaded)?;
        for run in 1..=self.args.repeat {
            let sync = self.sync(&receiver, &IDLE).await?;
            sync.check(&IDLE, "idle", 0)?;
            let cycle = sync.cycle_seconds()?;
            say(format!(
                "  idle cycle {run}/{}: {} cycle, {} process",
                self.args.repeat,
                Unit::Seconds.show(cycle),
                Unit::Seconds.show(sync.wall.as_secs_f64())
            ));
            self.record("ctmirror_idle_process", Unit::Seconds, sync.wall.as_secs_f64(), sync.json());
            self.record("ctmirror_idle_cycle", Unit::Seconds, cycle, json!({ "seconds": cycle }));
        }
        receiver.stop().await;
        drop_database(&self.mirror_admin, database).await
    }

    // ---------------------------------------------------- triggers --

    /// The writers' price of change tracking, on the durable cluster: two
    /// identical tables, tracking on one of them only (enabled through
    /// ctmirror's own source code, as the first sync would). Runs
    /// alternate between the tables so drift (checkpoints, bloat) hits both.
    async fn measure_trigger_overhead(&mut self) -> Result<()> {
        say(format!("trigger overhead on the durable cluster ({} rows per table)", grouped(self.args.rows as f64)));
        let database = TRIGGER_DB;
        let url = db_url(&self.args.durable_url, database);
        recreate_database(&self.durable_admin, database).await?;
        let client = connect(&url).await?;
        for table in TrackedTable::BOTH {
            execute(&client, &contact_ddl(table.name())).await?;
            execute(&client, &contact_fill(table.name(), self.args.rows)).await?;
            execute(&client, &format!("VACUUM (ANALYZE) {}", table.name())).await?;
        }
        enable_tracking(&url, TrackedTable::Tracked.name()).await?;
        for table in TrackedTable::BOTH {
            let triggers = count(
                &client,
                &format!(
                    "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{}'::regclass AND NOT tgisinternal",
                    table.name()
                ),
            )
            .await?;
            // insert, update, update_key (row-level, key changes only), delete, truncate
            let expected = if table == TrackedTable::Tracked { 5 } else { 0 };
            if triggers != expected {
                return Err(format!("{} has {triggers} triggers, expected {expected}", table.name()));
            }
        }
        execute(&self.durable_admin, "CHECKPOINT").await?;

        for run in 1..=self.args.repeat {
            for table in TrackedTable::order(run) {
                let (tps, latency_ms) = self.pgbench(table).await?;
                say(format!("  pgbench {} {run}/{}: {tps:.0} tps", table.name(), self.args.repeat));
                self.record(table.pgbench_key(), Unit::Tps, tps, json!({ "tps": tps, "latency_ms": latency_ms }));
            }
        }
        let ids = UpdatePlan::new(self.args.rows).ids;
        for run in 1..=self.args.repeat {
            for table in TrackedTable::order(run) {
                // Every run starts right after a checkpoint, so each pays
                // the same full-page writes.
                execute(&self.durable_admin, "CHECKPOINT").await?;
                let sql = format!(
                    "UPDATE {} SET owner_id = coalesce(owner_id, 0) + 1, updated_at = now() WHERE id = ANY($1)",
                    table.name()
                );
                let started = Instant::now();
                let updated = client.execute(&sql, &[&ids]).await.context(format!("updating {}", table.name()))?;
                let seconds = started.elapsed().as_secs_f64();
                expect_rows("the UPDATE", updated as i64, ids.len() as i64)?;
                say(format!(
                    "  {}-row UPDATE of {} {run}/{}: {}",
                    grouped(ids.len() as f64),
                    table.name(),
                    self.args.repeat,
                    Unit::Seconds.show(seconds)
                ));
                self.record(table.update_key(), Unit::Seconds, seconds, json!({ "seconds": seconds }));
            }
        }
        drop(client);
        drop_database(&self.durable_admin, database).await
    }

    /// Single-row UPDATEs of random rows; returns tps and mean latency (ms).
    async fn pgbench(&self, table: TrackedTable) -> Result<(f64, Option<f64>)> {
        let script = self.run_dir.join(format!("pgbench-{}.sql", table.name()));
        let text = format!(
            "\\set id random(1, :rows)\nUPDATE {} SET owner_id = coalesce(owner_id, 0) + 1, updated_at = now() WHERE id = :id;\n",
            table.name()
        );
        std::fs::write(&script, text).context(format!("writing {}", script.display()))?;
        let config: tokio_postgres::Config = self.args.durable_url.parse().context("parsing --durable-url")?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let clients = self.args.pgbench_clients.to_string();
        let output = Command::new(self.args.pg_bin.join("pgbench"))
            .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
            .args(["-c", &clients, "-j", &clients, "-T", &self.args.pgbench_seconds.to_string()])
            .arg("-D")
            .arg(format!("rows={}", self.args.rows))
            .arg("-f")
            .arg(&script)
            .arg(TRIGGER_DB)
            .output()
            .await
            .context("running pgbench")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!("pgbench failed: {stdout}{}", String::from_utf8_lossy(&output.stderr)));
        }
        let figure = |prefix: &str| {
            stdout.lines().find_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse::<f64>().ok())
        };
        let tps = figure("tps = ").ok_or_else(|| format!("no tps in pgbench's output:\n{stdout}"))?;
        Ok((tps, figure("latency average = ")))
    }

    // --------------------------------------------------------- rss --

    /// Full loads of 10,000,000 rows with the peak RSS (VmHWM) of the agent
    /// and of a receiver started for each run.
    async fn measure_big_full_load(&mut self) -> Result<()> {
        say(format!("generating {} contact rows in {} (for the peak RSS)", grouped(BIG_ROWS as f64), BIG.database));
        self.create_contact_database(BIG.database, BIG_ROWS).await?;
        for run in 1..=self.args.repeat {
            let database = format!("bench_big_{run}");
            recreate_database(&self.mirror_admin, &database).await?;
            let receiver = self.start_receiver(&format!("big-{run}"), &BIG, &database).await?;
            let sync = self.sync(&receiver, &BIG).await?;
            sync.check(&BIG, "full", BIG_ROWS)?;
            receiver.stop().await;
            drop_database(&self.mirror_admin, &database).await?;
            let (agent, receiver_peak) = match (sync.agent_peak_rss, sync.receiver_peak_rss) {
                (Some(a), Some(r)) => (a as f64, r as f64),
                _ => return Err("could not read VmHWM of the agent or the receiver from /proc".into()),
            };
            let seconds = sync.wall.as_secs_f64();
            self.progress("ctmirror full load (10M)", run, seconds, BIG_ROWS);
            say(format!("  peak RSS: agent {:.1} MiB, receiver {:.1} MiB", agent / MIB, receiver_peak / MIB));
            self.record("agent_peak_rss", Unit::Bytes, agent, json!({ "bytes": agent }));
            self.record("receiver_peak_rss", Unit::Bytes, receiver_peak, json!({ "bytes": receiver_peak }));
            self.record("ctmirror_full_load_big", Unit::Seconds, seconds, sync.json());
        }
        drop_database(&self.source_admin, BIG.database).await
    }

    // ------------------------------------------- ctmirror processes --

    /// Starts `ctmirror receiver` for `tenant`'s application, writing into
    /// `mirror_db`, and waits until it listens. Its log goes to run/.
    async fn start_receiver(&self, name: &str, tenant: &Tenant, mirror_db: &str) -> Result<Receiver> {
        let port = free_port()?;
        let config = self.write_config(name, tenant.app, port, mirror_db)?;
        let log_path = self.run_dir.join(format!("receiver-{name}.log"));
        let log = std::fs::File::create(&log_path).context(format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the receiver log handle")?;
        let mut child = Command::new(&self.args.ctmirror)
            .arg("receiver")
            .arg("--config")
            .arg(&config)
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .context(format!("starting {} receiver", self.args.ctmirror.display()))?;
        let pid = child.id().ok_or("the receiver exited at once")?;
        wait_for_port(&mut child, port, &log_path).await?;
        Ok(Receiver { child, pid, config, app: tenant.app })
    }

    /// One config per receiver: its [receiver] section and the [agent]
    /// section the syncs against it use. Plain HTTP on loopback: the
    /// pipelines compared (a raw COPY pipe, logical replication) are not
    /// encrypted either.
    fn write_config(&self, name: &str, app: &str, port: u16, mirror_db: &str) -> Result<PathBuf> {
        let mut text = format!(
            "# Written by benches/pipeline.rs: receiver {name} and the syncs against it.\n\
             [receiver]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = \"{}\"\napplication = \"{app}\"\n\
             private_key = \"keys/partner.key\"\nagent_public_key = \"keys/agent.pub\"\nplain_http = true\n\n\
             [agent]\nprivate_key = \"keys/agent.key\"\n",
            self.mirror_url(mirror_db)
        );
        for t in TENANTS {
            text.push_str(&format!(
                "\n[[agent.tenant]]\nid = \"{}\"\nsource = \"postgres\"\nurl = \"{}\"\n",
                t.id,
                self.source_url(t.database)
            ));
        }
        let approved: Vec<String> = TENANTS.iter().filter(|t| t.app == app).map(|t| format!("\"{}\"", t.id)).collect();
        text.push_str(&format!(
            "\n[[agent.application]]\nid = \"{app}\"\nreceiver_url = \"http://127.0.0.1:{port}\"\n\
             allow_plain_http = true\npartner_public_key = \"keys/partner.pub\"\n\
             schema_map = \"maps/{app}.toml\"\ntenants = [{}]\n",
            approved.join(", ")
        ));
        let path = self.run_dir.join(format!("ctmirror-{name}.toml"));
        std::fs::write(&path, text).context(format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Runs `ctmirror sync` for `tenant` against `receiver` and times the
    /// whole process: start, connect, authenticate, schema, rows and
    /// ReplicationCompleted (with the receiver's ANALYZE hook).
    async fn sync(&self, receiver: &Receiver, tenant: &Tenant) -> Result<SyncRun> {
        let mark = self.cpu.mark(Some(receiver.pid));
        let started = Instant::now();
        let child = Command::new(&self.args.ctmirror)
            .args(["--log", "warn", "sync", "--json", "--tenant", tenant.id, "--app", receiver.app, "--config"])
            .arg(&receiver.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting ctmirror sync")?;
        let pid = child.id().ok_or("ctmirror sync exited at once")?;
        // VmHWM only grows, so the last successful read is the peak; the
        // receiver's is read once more at the end.
        let mut agent_peak_rss = None;
        let mut receiver_peak_rss = None;
        let mut ticker = tokio::time::interval(RSS_POLL);
        let mut exit = std::pin::pin!(child.wait_with_output());
        let output = loop {
            tokio::select! {
                output = &mut exit => break output.context("waiting for ctmirror sync")?,
                _ = ticker.tick() => {
                    agent_peak_rss = peak_rss(pid).or(agent_peak_rss);
                    receiver_peak_rss = peak_rss(receiver.pid).or(receiver_peak_rss);
                }
            }
        };
        let wall = started.elapsed();
        receiver_peak_rss = peak_rss(receiver.pid).or(receiver_peak_rss);
        let cpu = self.cpu.since(&mark, Some(receiver.pid));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!("ctmirror sync for {} failed ({}):\n{stdout}{stderr}", tenant.id, output.status));
        }
        let report: Value =
            serde_json::from_str(&stdout).context(format!("ctmirror sync --json printed something else:\n{stdout}"))?;
        Ok(SyncRun { wall, report, agent_peak_rss, receiver_peak_rss, cpu })
    }

    // ----------------------------------------------------- results --

    fn progress(&self, what: &str, run: u32, seconds: f64, rows: i64) {
        say(format!(
            "  {what} {run}/{}: {} ({} rows/s)",
            self.args.repeat,
            Unit::Seconds.show(seconds),
            grouped(rows as f64 / seconds)
        ));
    }

    /// The printed table, row by row; ratios and verdicts from the medians.
    fn lines(&self) -> Vec<Line> {
        let mut lines = self.pipeline_lines();
        lines.extend(self.idle_lines());
        lines.extend(self.memory_lines());
        lines.extend(self.trigger_lines());
        lines
    }

    /// A timed line with its rows per second; `copy` and `anchor` are the
    /// medians it is compared with.
    fn timed(&self, key: &str, name: String, rows: i64, copy: Option<f64>, anchor: Option<f64>) -> Option<Line> {
        self.median(key).map(|s| Line {
            measurement: name,
            median: Unit::Seconds.show(s),
            rows_per_sec: Some(rows as f64 / s),
            vs_copy: copy.map(|c| s / c),
            vs_logical: anchor.map(|a| s / a),
            targets: Vec::new(),
        })
    }

    /// Baseline, anchor, full load and the incremental runs.
    fn pipeline_lines(&self) -> Vec<Line> {
        let rows = self.args.rows;
        let copy = self.median("copy_pipe");
        let logical = self.median("logical_initial_sync");
        let mut lines = Vec::new();
        lines.extend(self.timed("copy_pipe", "COPY pipe, binary (baseline)".into(), rows, copy, logical));
        let anchor = "logical replication initial sync (anchor)".into();
        lines.extend(self.timed("logical_initial_sync", anchor, rows, copy, logical));
        if let Some(mut line) = self.timed("ctmirror_full_load", "ctmirror full load".into(), rows, copy, logical) {
            if let Some(r) = line.vs_copy {
                line.targets.push(Verdict::at_most("≤ 1.3× COPY pipe", r, 1.3));
            }
            if let Some(r) = line.vs_logical {
                line.targets.push(Verdict::at_most("≤ 1.0× logical replication", r, 1.0));
            }
            lines.push(line);
        }
        let updated = UpdatePlan::new(rows);
        for shape in TxShape::BOTH {
            let anchor = self.median(shape.logical_key());
            let what = updated.describe(shape);
            let name = format!("logical replication, {what}, commit→visible");
            lines.extend(self.timed(shape.logical_key(), name, updated.rows(), None, anchor));
            let name = format!("ctmirror incremental, {what}");
            if let Some(mut line) = self.timed(shape.ctmirror_key(), name, updated.rows(), None, anchor) {
                if let Some(r) = line.vs_logical {
                    line.targets.push(Verdict::at_most("≤ 1.0× logical replication", r, 1.0));
                }
                lines.push(line);
            }
        }
        lines
    }

    fn idle_lines(&self) -> Vec<Line> {
        let measured = [
            ("ctmirror_idle_cycle", "ctmirror idle cycle, 20 tables (cycle time)"),
            ("ctmirror_idle_process", "ctmirror idle sync, 20 tables (whole process)"),
        ];
        measured
            .iter()
            .filter_map(|(key, name)| {
                let s = self.median(key)?;
                Some(Line::plain(name, Unit::Seconds.show(s), vec![Verdict::at_most("≤ 50 ms", s * 1000.0, 50.0)]))
            })
            .collect()
    }

    /// The 10M-row full load and its peak memory. For a memory ceiling the
    /// worst run counts, not the median.
    fn memory_lines(&self) -> Vec<Line> {
        let mut lines = Vec::new();
        lines.extend(self.timed("ctmirror_full_load_big", "ctmirror full load, 10M rows".into(), BIG_ROWS, None, None));
        for (key, name) in [
            ("agent_peak_rss", "agent peak RSS, 10M-row full load (worst run)"),
            ("receiver_peak_rss", "receiver peak RSS, 10M-row full load (worst run)"),
        ] {
            if let Some(b) = self.series.get(key).map(Series::max) {
                lines.push(Line::plain(name, Unit::Bytes.show(b), vec![Verdict::at_most("≤ 64 MiB", b / MIB, 64.0)]));
            }
        }
        lines
    }

    fn trigger_lines(&self) -> Vec<Line> {
        let mut lines = Vec::new();
        let plain_tps = self.median("pgbench_untracked");
        if let Some(t) = plain_tps {
            lines.push(Line::plain("pgbench 1-row UPDATE, untracked table", Unit::Tps.show(t), Vec::new()));
        }
        if let Some(t) = self.median("pgbench_tracked") {
            let targets = plain_tps.map(|p| {
                let loss = (1.0 - t / p) * 100.0;
                Verdict::at_most(&format!("≤ 10% tps loss ({loss:.1}%)"), loss, 10.0)
            });
            lines.push(Line::plain(
                "pgbench 1-row UPDATE, tracked table",
                Unit::Tps.show(t),
                targets.into_iter().collect(),
            ));
        }
        let n = grouped(UpdatePlan::new(self.args.rows).rows() as f64);
        let plain_update = self.median("update_untracked");
        if let Some(s) = plain_update {
            lines.push(Line::plain(&format!("{n}-row UPDATE, untracked table"), Unit::Seconds.show(s), Vec::new()));
        }
        if let Some(s) = self.median("update_tracked") {
            let targets =
                plain_update.map(|p| Verdict::at_most(&format!("≤ 2× untracked ({:.2}×)", s / p), s / p, 2.0));
            let name = format!("{n}-row UPDATE, tracked table");
            lines.push(Line::plain(&name, Unit::Seconds.show(s), targets.into_iter().collect()));
        }
        lines
    }

    fn print_notes(&self) {
        println!();
        for note in self.standing_notes().iter().chain(&self.notes) {
            println!("- {note}");
        }
        let split = [
            ("copy_pipe", "COPY pipe"),
            ("logical_initial_sync", "logical replication initial sync"),
            ("ctmirror_full_load", "ctmirror full load"),
            ("ctmirror_incremental_one_tx", "ctmirror incremental, 1 tx"),
            ("ctmirror_incremental_many_tx", "ctmirror incremental, many tx"),
        ];
        for (key, what) in split {
            if let Some(cpu) = self.median_run_cpu(key) {
                println!("- CPU during the middle run of {what}: {cpu}");
            }
        }
    }

    fn standing_notes(&self) -> Vec<String> {
        vec![
            "Source and mirror run with fsync, synchronous_commit and full_page_writes off; the baseline and \
             the anchor run on the same clusters. The trigger overhead runs on a durable cluster."
                .into(),
            "ctmirror times are whole processes (`ctmirror --log warn sync`): start, connect, authenticate, \
             schema, rows, ReplicationCompleted with the receiver's default ANALYZE hook. Agent and receiver \
             use their default batch limits (50,000 rows, 4 MiB)."
                .into(),
            "CPU seconds (from /proc, 10 ms resolution) count every process of a cluster: backends, \
             walsenders, replication workers, but also autovacuum and the checkpointer."
                .into(),
            "Logical replication uses subscription defaults (text initial copy, streaming off); \
             commit→visible runs from the return of the (last) COMMIT to the first poll (every 10 ms) \
             that sees its rows on the mirror."
                .into(),
        ]
    }

    /// The CPU split of the middle run (the lower middle of an even count),
    /// as text.
    fn median_run_cpu(&self, key: &str) -> Option<String> {
        let series = self.series.get(key)?;
        let run = &series.runs[series.median_index()];
        let cpu = run.get("cpu")?.as_object()?;
        let wall = series.values[series.median_index()];
        let parts: Vec<String> = [
            ("agent", "agent"),
            ("receiver", "receiver"),
            ("source_postgres", "source PostgreSQL"),
            ("mirror_postgres", "mirror PostgreSQL"),
        ]
        .iter()
        .filter_map(|(k, name)| cpu.get(*k)?.as_f64().map(|s| format!("{name} {s:.2} s")))
        .collect();
        Some(format!("{} (wall {wall:.2} s)", parts.join(", ")))
    }

    fn write_results(&self, lines: &[Line]) -> Result<()> {
        let measurements: serde_json::Map<String, Value> = self
            .series
            .iter()
            .map(|(key, s)| {
                (
                    key.to_string(),
                    json!({ "unit": s.unit.name(), "median": s.median(), "values": s.values, "runs": s.runs }),
                )
            })
            .collect();
        let (commit, dirty) = git_state();
        let sections: Vec<String> = Section::value_variants()
            .iter()
            .filter(|s| self.args.runs(**s))
            .filter_map(|s| Some(s.to_possible_value()?.get_name().to_owned()))
            .collect();
        let results = json!({
            "started_at": self.started_at.to_rfc3339(),
            "git_commit": commit,
            "git_dirty": dirty,
            "postgres_version": self.postgres_version,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "rows": self.args.rows,
            "big_rows": BIG_ROWS,
            "updated_rows": UpdatePlan::new(self.args.rows).rows(),
            "rows_per_small_transaction": SMALL_TX_ROWS,
            "idle_tables": IDLE_TABLES,
            "idle_table_rows": IDLE_TABLE_ROWS,
            "repeat": self.args.repeat,
            "sections": sections,
            "settings": {
                "pipeline_clusters": self.args.pipeline_settings,
                "durable_cluster": self.args.durable_settings,
                "pgbench": { "clients": self.args.pgbench_clients, "seconds": self.args.pgbench_seconds },
            },
            "notes": self.standing_notes().iter().chain(&self.notes).collect::<Vec<_>>(),
            "table": lines.iter().map(Line::json).collect::<Vec<_>>(),
            "measurements": measurements,
        });
        let text = serde_json::to_string_pretty(&results).expect("the results are plain JSON values");
        let stamped = self.args.work_dir.join(format!("results-{}.json", self.started_at.format("%Y%m%dT%H%M%SZ")));
        let latest = self.args.work_dir.join("latest.json");
        for path in [&stamped, &latest] {
            std::fs::write(path, &text).context(format!("writing {}", path.display()))?;
        }
        println!("\nresults: {} (also {})", stamped.display(), latest.display());
        Ok(())
    }
}

// ---------------------------------------------------- measurements data --

#[derive(Debug, Clone, Copy)]
enum Unit {
    Seconds,
    Tps,
    Bytes,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Seconds => "seconds",
            Unit::Tps => "transactions per second",
            Unit::Bytes => "bytes",
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Unit::Seconds if value < 1.0 => format!("{:.1} ms", value * 1000.0),
            Unit::Seconds => format!("{value:.3} s"),
            Unit::Tps => format!("{} tps", grouped(value)),
            Unit::Bytes => format!("{:.1} MiB", value / MIB),
        }
    }
}

/// The runs of one measurement: one value each, and what else was seen.
struct Series {
    unit: Unit,
    values: Vec<f64>,
    runs: Vec<Value>,
}

impl Series {
    /// The run whose value is the median (the lower middle of an even count).
    fn median_index(&self) -> usize {
        let mut order: Vec<usize> = (0..self.values.len()).collect();
        order.sort_by(|&a, &b| self.values[a].total_cmp(&self.values[b]));
        order[(order.len() - 1) / 2]
    }

    fn median(&self) -> f64 {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        if sorted.len() % 2 == 0 {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        }
    }

    fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::MIN, f64::max)
    }
}

/// One row of the printed table.
struct Line {
    measurement: String,
    median: String,
    rows_per_sec: Option<f64>,
    vs_copy: Option<f64>,
    vs_logical: Option<f64>,
    targets: Vec<Verdict>,
}

impl Line {
    fn plain(measurement: &str, median: String, targets: Vec<Verdict>) -> Line {
        Line { measurement: measurement.into(), median, rows_per_sec: None, vs_copy: None, vs_logical: None, targets }
    }

    fn json(&self) -> Value {
        json!({
            "measurement": self.measurement,
            "median": self.median,
            "rows_per_sec": self.rows_per_sec,
            "vs_copy_pipe": self.vs_copy,
            "vs_logical_replication": self.vs_logical,
            "targets": self.targets.iter().map(|v| json!({ "target": v.target, "pass": v.pass })).collect::<Vec<_>>(),
        })
    }
}

/// One of the targets and whether the measurement meets it.
struct Verdict {
    target: String,
    pass: bool,
}

impl Verdict {
    fn at_most(target: &str, value: f64, limit: f64) -> Verdict {
        Verdict { target: target.into(), pass: value <= limit }
    }

    fn word(&self) -> &'static str {
        if self.pass {
            "PASS"
        } else {
            "MISS"
        }
    }
}

/// Prints the table, one more row per extra target of a measurement.
fn print_table(lines: &[Line]) {
    let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
    let name_width = lines.iter().map(|l| l.measurement.chars().count()).chain([11]).max().unwrap_or(11);
    let target_width = lines.iter().flat_map(|l| &l.targets).map(|v| v.target.chars().count()).chain([6]).max();
    let target_width = target_width.unwrap_or(6);
    let row = |cells: [&str; 7]| {
        let [name, median, rate, copy, logical, target, result] = cells;
        println!(
            "{name:<name_width$}  {median:>11}  {rate:>9}  {copy:>5}  {logical:>5}  {target:<target_width$}  {result}"
        );
    };
    println!();
    row(["measurement", "median", "rows/s", "×COPY", "×LR", "target", "result"]);
    for line in lines {
        let rate = line.rows_per_sec.map(grouped).unwrap_or_else(|| "-".into());
        let (copy, logical) = (ratio(line.vs_copy), ratio(line.vs_logical));
        let mut targets = line.targets.iter();
        let first = targets.next();
        let target = first.map(|v| v.target.as_str()).unwrap_or("");
        row([&line.measurement, &line.median, &rate, &copy, &logical, target, first.map(Verdict::word).unwrap_or("")]);
        for more in targets {
            row(["", "", "", "", "", &more.target, more.word()]);
        }
    }
}

// ------------------------------------------------------------ the syncs --

/// A running `ctmirror receiver`; killed when stopped or dropped.
struct Receiver {
    child: Child,
    pid: u32,
    config: PathBuf,
    app: &'static str,
}

impl Receiver {
    /// Kills the process; its state is in the mirror database, which the
    /// caller drops or keeps.
    async fn stop(mut self) {
        // Nothing to do if it already exited.
        let _ = self.child.kill().await;
    }
}

/// One `ctmirror sync` process.
struct SyncRun {
    wall: Duration,
    /// ctmirror's own report (`sync --json`).
    report: Value,
    agent_peak_rss: Option<u64>,
    receiver_peak_rss: Option<u64>,
    cpu: Value,
}

impl SyncRun {
    fn tables(&self) -> &[Value] {
        self.report["tables"].as_array().map(Vec::as_slice).unwrap_or_default()
    }

    fn rows_sent(&self) -> i64 {
        self.tables().iter().filter_map(|t| t["rows_sent"].as_i64()).sum()
    }

    /// The cycle time ctmirror measured itself (without process start,
    /// configuration and the source connection).
    fn cycle_seconds(&self) -> Result<f64> {
        self.report["seconds"].as_f64().ok_or_else(|| format!("sync report without seconds: {}", self.report))
    }

    /// Fails unless every table ran in `mode` and `rows` rows were sent.
    fn check(&self, tenant: &Tenant, mode: &str, rows: i64) -> Result<()> {
        let modes: Vec<&str> = self.tables().iter().filter_map(|t| t["mode"].as_str()).collect();
        if modes.is_empty() || modes.iter().any(|m| *m != mode) || self.rows_sent() != rows {
            return Err(format!(
                "ctmirror sync of tenant {} was expected to send {rows} rows in {mode} mode; its report: {}",
                tenant.id, self.report
            ));
        }
        Ok(())
    }

    fn json(&self) -> Value {
        let tables: Vec<Value> = self
            .tables()
            .iter()
            .map(|t| json!({ "table": t["table"], "rows_sent": t["rows_sent"], "bytes_sent": t["bytes_sent"], "batches": t["batches"] }))
            .collect();
        json!({
            "seconds": self.wall.as_secs_f64(),
            "cycle_seconds": self.report["seconds"],
            "agent_peak_rss_bytes": self.agent_peak_rss,
            "receiver_peak_rss_bytes": self.receiver_peak_rss,
            "cpu": self.cpu,
            "tables": tables,
        })
    }
}

/// Which rows the incremental and UPDATE measurements change: up to
/// 100,000 keys spread evenly over the table, so the updates touch pages
/// all over it as real edits do.
struct UpdatePlan {
    ids: Vec<i64>,
}

#[derive(Debug, Clone, Copy)]
enum TxShape {
    /// Every row in one transaction.
    One,
    /// [`SMALL_TX_ROWS`] rows per transaction.
    Many,
}

impl TxShape {
    const BOTH: [TxShape; 2] = [TxShape::One, TxShape::Many];

    fn ctmirror_key(self) -> &'static str {
        match self {
            TxShape::One => "ctmirror_incremental_one_tx",
            TxShape::Many => "ctmirror_incremental_many_tx",
        }
    }

    fn logical_key(self) -> &'static str {
        match self {
            TxShape::One => "logical_incremental_one_tx",
            TxShape::Many => "logical_incremental_many_tx",
        }
    }
}

impl UpdatePlan {
    fn new(table_rows: i64) -> UpdatePlan {
        let rows = table_rows.min(UPDATE_ROWS);
        let stride = table_rows / rows;
        UpdatePlan { ids: (1..=rows).map(|k| k * stride).collect() }
    }

    fn rows(&self) -> i64 {
        self.ids.len() as i64
    }

    fn transactions(&self, shape: TxShape) -> usize {
        match shape {
            TxShape::One => 1,
            TxShape::Many => self.ids.len().div_ceil(SMALL_TX_ROWS),
        }
    }

    fn describe(&self, shape: TxShape) -> String {
        let tx = self.transactions(shape);
        format!("{} rows in {} tx", grouped(self.rows() as f64), grouped(tx as f64))
    }

    /// Sets `owner_id` to `marker` on every planned row, in the given
    /// shape; returns when the last COMMIT has returned.
    async fn apply(&self, client: &mut Client, shape: TxShape, marker: i32) -> Result<Instant> {
        let sql = "UPDATE contact SET owner_id = $1, updated_at = now() WHERE id = ANY($2)";
        match shape {
            TxShape::One => {
                let tx = client.transaction().await.context("starting the update")?;
                tx.execute(sql, &[&marker, &self.ids]).await.context("updating contact")?;
                tx.commit().await.context("committing the update")?;
            }
            TxShape::Many => {
                let statement = client.prepare(sql).await.context("preparing the update")?;
                for chunk in self.ids.chunks(SMALL_TX_ROWS) {
                    client.execute(&statement, &[&marker, &chunk]).await.context("updating contact")?;
                }
            }
        }
        Ok(Instant::now())
    }

    /// The keys updated last: the whole last transaction of the many
    /// shape, part of the single transaction of the other (which becomes
    /// visible whole).
    fn last_keys(&self) -> &[i64] {
        let from = self.ids.len().saturating_sub(SMALL_TX_ROWS);
        &self.ids[from..]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrackedTable {
    Untracked,
    Tracked,
}

impl TrackedTable {
    const BOTH: [TrackedTable; 2] = [TrackedTable::Untracked, TrackedTable::Tracked];

    fn name(self) -> &'static str {
        match self {
            TrackedTable::Untracked => "contact_plain",
            TrackedTable::Tracked => "contact_tracked",
        }
    }

    fn pgbench_key(self) -> &'static str {
        match self {
            TrackedTable::Untracked => "pgbench_untracked",
            TrackedTable::Tracked => "pgbench_tracked",
        }
    }

    fn update_key(self) -> &'static str {
        match self {
            TrackedTable::Untracked => "update_untracked",
            TrackedTable::Tracked => "update_tracked",
        }
    }

    /// Odd runs start with the untracked table, even runs with the tracked.
    fn order(run: u32) -> [TrackedTable; 2] {
        if run % 2 == 1 {
            Self::BOTH
        } else {
            [TrackedTable::Tracked, TrackedTable::Untracked]
        }
    }
}

// ------------------------------------------------------------- database --

fn db_url(cluster: &str, database: &str) -> String {
    format!("{}/{database}", cluster.trim_end_matches('/'))
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context(format!("connecting to {url}"))?;
    // A connection that breaks fails the next query on it, with a message;
    // one that ends after its client was dropped (a database dropped WITH
    // (FORCE) right after) needs none.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn execute(client: &Client, sql: &str) -> Result<()> {
    client.batch_execute(sql).await.context(format!("running {}", abbreviate(sql)))
}

async fn count(client: &Client, sql: &str) -> Result<i64> {
    let row = client.query_one(sql, &[]).await.context(format!("running {}", abbreviate(sql)))?;
    Ok(row.get(0))
}

async fn count_marker(client: &Client, table: &str, marker: i32) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM {table} WHERE owner_id = $1");
    let row = client.query_one(&sql, &[&marker]).await.context("counting updated rows")?;
    Ok(row.get(0))
}

fn abbreviate(sql: &str) -> String {
    let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

fn expect_rows(what: &str, got: i64, expected: i64) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{what} holds {got} rows, expected {expected}"))
    }
}

/// Drops (disconnecting anyone still on it) and creates a database.
async fn recreate_database(admin: &Client, name: &str) -> Result<()> {
    drop_database(admin, name).await?;
    execute(admin, &format!("CREATE DATABASE {name}")).await
}

async fn drop_database(admin: &Client, name: &str) -> Result<()> {
    execute(admin, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
}

/// The benchmark table: a typical CRM row of twelve columns.
fn contact_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            id bigint PRIMARY KEY,
            first_name varchar(40) NOT NULL,
            last_name varchar(60) NOT NULL,
            email text,
            notes text,
            account_id integer NOT NULL,
            owner_id integer,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            balance numeric(12,2),
            active boolean NOT NULL,
            external_id uuid NOT NULL)"
    )
}

/// Deterministic rows (the same on every run) with NULLs, non-ASCII names
/// and text of varied length, so no column is trivially small.
fn contact_fill(table: &str, rows: i64) -> String {
    format!(
        "INSERT INTO {table}
         SELECT g,
                (ARRAY['Anna', 'Bjørn', 'Carla', 'Dmitri', 'Eva', 'Farid', 'Grete', 'Hiroshi'])[1 + g % 8],
                'Lastname-' || (g % 9973),
                CASE WHEN g % 17 = 0 THEN NULL ELSE 'contact' || g || '@example.com' END,
                CASE WHEN g % 3 = 0 THEN NULL ELSE repeat('Met at the fair; follow up. ', 1 + (g % 5)) END,
                1 + g % 50000,
                CASE WHEN g % 10 = 0 THEN NULL ELSE 1 + g % 1000 END,
                timestamptz '2020-01-01 00:00:00+00' + g * interval '37 seconds',
                timestamptz '2024-01-01 00:00:00+00' + g * interval '11 seconds',
                CASE WHEN g % 11 = 0 THEN NULL ELSE ((g::bigint * 7919) % 10000000) / 100.0 END,
                g % 7 <> 0,
                md5(g::text)::uuid
           FROM generate_series(1, {rows}) AS g"
    )
}

fn idle_table_names() -> Vec<String> {
    (1..=IDLE_TABLES).map(|i| format!("idle_{i:02}")).collect()
}

fn idle_tables_sql() -> String {
    idle_table_names()
        .iter()
        .map(|t| {
            format!(
                "CREATE TABLE {t} (id integer PRIMARY KEY, name text NOT NULL, amount numeric(10,2), \
                 updated_at timestamptz NOT NULL);
                 INSERT INTO {t} SELECT g, 'item ' || g, g * 1.5, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour'
                   FROM generate_series(1, {IDLE_TABLE_ROWS}) AS g;"
            )
        })
        .collect()
}

/// Streams the source's `contact` into the mirror's chunk by chunk; never
/// holds more than a chunk. Returns rows and bytes moved.
async fn copy_pipe(source: &Client, mirror: &Client) -> Result<(u64, u64)> {
    let out = source.copy_out("COPY contact TO STDOUT (FORMAT binary)").await.context("starting COPY TO")?;
    let sink: tokio_postgres::CopyInSink<bytes::Bytes> =
        mirror.copy_in("COPY contact FROM STDIN (FORMAT binary)").await.context("starting COPY FROM")?;
    let out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    let mut bytes = 0u64;
    let mut counted = out.inspect_ok(|chunk| bytes += chunk.len() as u64);
    sink.send_all(&mut counted).await.context("piping COPY data")?;
    let rows = sink.as_mut().finish().await.context("finishing COPY FROM")?;
    Ok((rows, bytes))
}

/// Polls until every table of the subscription is in state 'r' (ready).
async fn wait_until_ready(mirror: &Client, subscription: &str) -> Result<()> {
    let sql = "SELECT count(*) FILTER (WHERE r.srsubstate <> 'r'), count(*)
                 FROM pg_subscription_rel AS r JOIN pg_subscription AS s ON s.oid = r.srsubid
                WHERE s.subname = $1";
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let row = mirror.query_one(sql, &[&subscription]).await.context("reading the subscription state")?;
        let (pending, tables): (i64, i64) = (row.get(0), row.get(1));
        if tables > 0 && pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("subscription {subscription} not ready after {WAIT_LIMIT:?}"));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Polls until every one of `ids` shows `marker` on the mirror; returns
/// when it first did.
async fn wait_until_visible(mirror: &Client, ids: &[i64], marker: i32) -> Result<Instant> {
    let statement = mirror
        .prepare("SELECT count(*) FROM contact WHERE id = ANY($1) AND owner_id = $2")
        .await
        .context("preparing the visibility probe")?;
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let row = mirror.query_one(&statement, &[&ids, &marker]).await.context("probing the mirror")?;
        if row.get::<_, i64>(0) == ids.len() as i64 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("the subscriber did not show marker {marker} after {WAIT_LIMIT:?}"));
        }
        tokio::time::sleep(VISIBLE_POLL).await;
    }
}

/// Turns change tracking on through ctmirror's own PostgreSQL source, as
/// the first sync of a table does.
async fn enable_tracking(url: &str, table: &str) -> Result<()> {
    use ctmirror::source::{postgres::PostgresSource, Source, SourceTable};
    let retention = Duration::from_secs(7 * 24 * 3600);
    let mut source = PostgresSource::connect(url, retention).await.context("connecting ctmirror's source")?;
    let table = SourceTable { schema: None, name: table.to_owned() };
    source.ensure_tracking(&table).await.context(format!("enabling change tracking on {table}"))?;
    Ok(())
}

// ------------------------------------------------------------ processes --

/// A port nobody listens on now (the receiver binds it a moment later).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("reading the free port")?.port())
}

async fn wait_for_port(child: &mut Child, port: u16, log: &Path) -> Result<()> {
    let deadline = Instant::now() + RECEIVER_START_LIMIT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        let tail = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = child.try_wait().context("checking on the receiver")? {
            return Err(format!("the receiver exited ({status}) before listening; {}:\n{}", log.display(), tail()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the receiver did not listen on port {port} within {RECEIVER_START_LIMIT:?}:\n{}",
                tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// VmHWM of a running process, in bytes; `None` once it is gone.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The fields of `/proc/<pid>/stat` the CPU accounting needs, in clock ticks.
struct ProcStat {
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children that exited and were waited for.
    children: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat { ppid: field(4)? as u32, own: field(14)? + field(15)?, children: field(16)? + field(17)? })
}

/// Where CPU time goes while something runs: the agent (a child of this
/// program, so its time lands in our children's counters when it is
/// waited for), the receiver, and each cluster's PostgreSQL processes.
struct CpuMeter {
    ticks_per_second: f64,
    source: u32,
    mirror: u32,
}

struct CpuMark {
    agent: u64,
    receiver: Option<u64>,
    source: u64,
    mirror: u64,
}

impl CpuMeter {
    fn mark(&self, receiver: Option<u32>) -> CpuMark {
        CpuMark {
            agent: proc_stat(std::process::id()).map_or(0, |s| s.children),
            receiver: receiver.and_then(proc_stat).map(|s| s.own),
            source: cluster_ticks(self.source),
            mirror: cluster_ticks(self.mirror),
        }
    }

    /// CPU seconds used since `mark`, per process group. Agent and receiver
    /// are counted for a sync, the one measurement that names a receiver.
    fn since(&self, mark: &CpuMark, receiver: Option<u32>) -> Value {
        let now = self.mark(receiver);
        let seconds = |now: u64, then: u64| now.saturating_sub(then) as f64 / self.ticks_per_second;
        let mut cpu = json!({
            "source_postgres": seconds(now.source, mark.source),
            "mirror_postgres": seconds(now.mirror, mark.mirror),
        });
        if receiver.is_some() {
            cpu["agent"] = json!(seconds(now.agent, mark.agent));
        }
        if let (Some(now), Some(then)) = (now.receiver, mark.receiver) {
            cpu["receiver"] = json!(seconds(now, then));
        }
        cpu
    }
}

/// CPU ticks of a cluster so far: the postmaster, its children that exited
/// (backends come and go with connections) and those still running.
///
/// A child reaped between reading the postmaster and listing its children
/// would be counted nowhere (an autovacuum worker takes seconds of CPU with
/// it), so the reading is retried until the reaped count holds still.
fn cluster_ticks(postmaster: u32) -> u64 {
    let running = || -> u64 {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(proc_stat)
            .filter(|s| s.ppid == postmaster)
            .map(|s| s.own)
            .sum()
    };
    let mut total = 0;
    for _ in 0..10 {
        let before = proc_stat(postmaster);
        let children = running();
        let (Some(before), Some(after)) = (before, proc_stat(postmaster)) else { return 0 };
        total = after.own + after.children + children;
        if before.children == after.children {
            break;
        }
    }
    total
}

/// The postmaster is the parent of every backend, ours included.
async fn postmaster_pid(client: &Client) -> Result<u32> {
    let backend: i32 =
        client.query_one("SELECT pg_backend_pid()", &[]).await.context("reading the backend pid")?.get(0);
    proc_stat(backend as u32)
        .map(|s| s.ppid)
        .ok_or_else(|| format!("cannot read /proc/{backend}/stat (is PostgreSQL on this machine?)"))
}

async fn clock_ticks_per_second() -> f64 {
    let output = Command::new("getconf").arg("CLK_TCK").output().await;
    output.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

/// The commit measured, and whether the work tree had changes.
fn git_state() -> (Option<String>, Option<bool>) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    (commit, dirty)
}

// ---------------------------------------------------------------- output --

/// Progress goes to stderr; the table and the notes to stdout.
fn say(message: impl Display) {
    eprintln!("{message}");
}

/// 1234567.8 → "1,234,568".
fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

//! Private PostgreSQL clusters for tests that need servers of their own:
//! a primary, streaming standbys made from it, promotion, and crashes.
//!
//! ```ignore
//! let primary = Cluster::start("failover");
//! primary.psql("postgres", "CREATE DATABASE tenant");
//! let standby = primary.standby("failover_standby");
//! standby.wait_for_replay_of(&primary);
//! let url = standby.url("tenant"); // read-only while it is a standby
//! standby.promote();               // now a primary of its own
//! ```
//!
//! The server binaries come from `CTMIRROR_PG_BIN` (`scripts/test` sets
//! it). `initdb` refuses to run as root, so as root every server program
//! runs as the `postgres` system user, as in `scripts/lib/pg.sh`. Each
//! cluster lives in its own folder under the build's temporary folder,
//! listens on 127.0.0.1 on a port of its own with trust authentication
//! (replication included), and is stopped and deleted when dropped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long a server gets to start, stop, promote or catch up.
const PATIENCE: Duration = Duration::from_secs(60);

/// One running (or stopped) PostgreSQL cluster.
pub struct Cluster {
    label: String,
    /// Holds `data/`, `server.log` and the server's socket.
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl Cluster {
    /// Creates and starts a new primary cluster (`wal_level = replica`,
    /// hot standbys allowed). `label` names its folder, for reading its
    /// log after a failure.
    pub fn start(label: &str) -> Cluster {
        let mut cluster = Cluster::new(label);
        let data = cluster.data();
        let init = |locale: &str| {
            as_owner(&bin("initdb"))
                .args(["-D", path(&data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .arg(format!("--locale={locale}"))
                .output()
                .expect("initdb runs")
        };
        let out = init("C.UTF-8");
        let out = if out.status.success() { out } else { init("C") };
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        cluster.configure(&[
            "wal_level = replica",
            "max_wal_senders = 10",
            "hot_standby = on",
            "max_connections = 50",
            "fsync = off",
            "synchronous_commit = off",
        ]);
        cluster.start_server();
        cluster
    }

    /// A new streaming (asynchronous) hot standby of this running cluster,
    /// made with `pg_basebackup -R` and started; it follows this cluster
    /// until promoted.
    pub fn standby(&self, label: &str) -> Cluster {
        assert!(self.running, "cluster {} is not running", self.label);
        let mut standby = Cluster::new(label);
        let out = as_owner(&bin("pg_basebackup"))
            .args(["-D", path(&standby.data()), "-R", "-X", "stream", "-c", "fast"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .output()
            .expect("pg_basebackup runs");
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        // The copied configuration names the primary's socket folder.
        standby.configure(&[]);
        standby.start_server();
        standby
    }

    /// The URL of database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `sql` in database `db` with psql and returns its unaligned
    /// output (`-At`: one row per line, fields separated by `|`). Panics
    /// when psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(bin("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", &self.url(db), "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql on cluster {} failed: {}\n{sql}",
            self.label,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> bool {
        self.psql("postgres", "SELECT pg_is_in_recovery()") == "t"
    }

    /// Waits until this standby has replayed everything `primary` has
    /// written so far.
    pub fn wait_for_replay_of(&self, primary: &Cluster) {
        let lsn = primary.psql("postgres", "SELECT pg_current_wal_lsn()");
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        wait_until(&format!("standby {} to replay {lsn}", self.label), || self.psql("postgres", &sql) == "t");
    }

    /// Promotes this standby (`pg_ctl promote`) and waits until it accepts
    /// writes: `pg_is_in_recovery()` is false. Transactions of the old
    /// primary it had not received are lost, as in a real failover.
    pub fn promote(&self) {
        let out = as_owner(&bin("pg_ctl"))
            .args(["-D", path(&self.data()), "-w", "-t", "60", "promote"])
            .output()
            .expect("pg_ctl promote runs");
        assert!(out.status.success(), "pg_ctl promote failed: {}", String::from_utf8_lossy(&out.stderr));
        wait_until(&format!("{} to leave recovery", self.label), || !self.is_in_recovery());
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m
    /// immediate`): nothing is flushed, and a standby receives nothing more.
    /// The folder stays until the cluster is dropped.
    pub fn stop_immediate(&mut self) {
        if self.running {
            let out = as_owner(&bin("pg_ctl"))
                .args(["-D", path(&self.data()), "-m", "immediate", "-w", "-t", "60", "stop"])
                .output()
                .expect("pg_ctl stop runs");
            assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
            self.running = false;
        }
    }

    /// Starts a stopped cluster again, on the same port (a standby resumes
    /// streaming when its primary is up, or stays in recovery).
    pub fn restart(&mut self) {
        assert!(!self.running, "cluster {} is running", self.label);
        self.start_server();
    }

    fn new(label: &str) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ctm-cluster-{label}-{}-{n}", std::process::id());
        let mut dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&name);
        std::fs::create_dir_all(&dir).expect("cluster folder");
        if running_as_root() {
            chown_to_owner(&dir);
            // The owner must reach the folder; /tmp always is.
            if !as_owner(Path::new("test")).args(["-w", path(&dir)]).status().is_ok_and(|s| s.success()) {
                let _ = std::fs::remove_dir_all(&dir);
                dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir).expect("cluster folder");
                chown_to_owner(&dir);
            }
        }
        Cluster { label: label.to_owned(), dir, port: 0, running: false }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Appends the cluster's own listening settings and `extra` to its
    /// `postgresql.conf` (later lines win over copied ones).
    fn configure(&self, extra: &[&str]) {
        use std::io::Write;
        let conf = self.data().join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new().append(true).open(&conf).expect("postgresql.conf");
        writeln!(f, "\nlisten_addresses = '127.0.0.1'").unwrap();
        writeln!(f, "unix_socket_directories = '{}'", self.dir.display()).unwrap();
        for line in extra {
            writeln!(f, "{line}").unwrap();
        }
    }

    /// Starts the server on a free port (a fresh one per attempt, as
    /// another test may take a port between the check and the start), or
    /// on its old port after a stop.
    fn start_server(&mut self) {
        let log = self.dir.join("server.log");
        let attempts = if self.port == 0 { 5 } else { 1 };
        for _ in 0..attempts {
            let port = if self.port == 0 { super::free_port() } else { self.port };
            let out = as_owner(&bin("pg_ctl"))
                .args(["-D", path(&self.data()), "-l", path(&log), "-w", "-t", "60"])
                .args(["-o", &format!("-p {port}"), "start"])
                .output()
                .expect("pg_ctl start runs");
            if out.status.success() {
                self.port = port;
                self.running = true;
                return;
            }
            // A server that did not come up is stopped before the next try.
            let _ = as_owner(&bin("pg_ctl")).args(["-D", path(&self.data()), "-m", "immediate", "stop"]).output();
        }
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        panic!("cluster {} did not start; server.log ends:\n{}", self.label, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_owner(&bin("pg_ctl"))
                .args(["-D", path(&self.data()), "-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server program of `CTMIRROR_PG_BIN`.
fn bin(name: &str) -> PathBuf {
    let dir = std::env::var("CTMIRROR_PG_BIN").unwrap_or_else(|_| {
        panic!("CTMIRROR_PG_BIN is not set: run the tests with scripts/test, which points it at the PostgreSQL binaries")
    });
    Path::new(&dir).join(name)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program` run as the cluster owner: `postgres` when we are root.
fn as_owner(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_owner(dir: &Path) {
    let ok = Command::new("chown").args(["postgres:", path(dir)]).status().is_ok_and(|s| s.success());
    assert!(ok, "cannot hand {} to user postgres", dir.display());
}

fn path(p: &Path) -> &str {
    p.to_str().expect("cluster paths are UTF-8")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! A private PostgreSQL for tests: a fresh cluster in a temp dir, on a free loopback port,
//! with its socket inside that dir, started as the `postgres` user when the tests run as
//! root (the server refuses root), and stopped with `pg_ctl stop -m fast` on drop.
//!
//! The cluster runs with `fsync=off`: the tests crash the mirror and the SpacetimeDB server,
//! never Postgres. The binaries come from `KHALA_PG_BIN`, or the newest
//! `/usr/lib/postgresql/<n>/bin`.
//! When there are none the test fails and says how to install them: nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running private cluster; `khala` is its superuser (trust auth on loopback).
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The directory holding `initdb`, `pg_ctl` and `psql`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("KHALA_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!("PostgreSQL server binaries not found (no /usr/lib/postgresql/<n>/bin/initdb, KHALA_PG_BIN unset); install them, e.g. `apt-get install postgresql`"),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server binary, as `postgres` when this process is root.
fn run_as_owner(bin: &Path, args: &[&str]) -> Output {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    command.args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

fn check(what: &str, output: Output) -> Output {
    assert!(output.status.success(), "{what} failed:\n{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    output
}

impl Postgres {
    /// Creates and starts a cluster; panics with the reason when it cannot.
    pub fn start() -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new().prefix("khala-pg-").tempdir().expect("a temp dir");
        if is_root() {
            check("chown of the cluster dir to postgres", Command::new("chown").args(["postgres:", &dir.path().to_string_lossy()]).output().expect("running chown"));
        }
        let data = dir.path().join("data");
        let data = data.to_string_lossy();
        check("initdb", run_as_owner(&bin.join("initdb"), &["-D", &data, "-A", "trust", "-U", "khala", "--no-sync"]));
        let port = khala_tools::server::free_port().expect("a free port");
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", dir.path().display());
        let log = dir.path().join("log");
        check("pg_ctl start", run_as_owner(&bin.join("pg_ctl"), &["-D", &data, "-o", &options, "-l", &log.to_string_lossy(), "-w", "start"]));
        Postgres { dir, bin, port }
    }

    /// A connection string for `khala mirror --postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The connection string of another database of the cluster.
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://khala@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL with `psql` and returns its unaligned output (one row per line).
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// The same, in another database of the cluster.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "khala", "-d", database, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e}"));
        String::from_utf8_lossy(&check(&format!("psql {sql:.80}"), output).stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = run_as_owner(&self.bin.join("pg_ctl"), &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"]);
    }
}

//! The real-server test harness shared by Khala's integration tests.
//!
//! - One server per test binary ([`shared_server`]), on a free loopback port, in a temp
//!   data dir; it is killed when the test process ends, however it ends.
//! - [`TestServer::start`] gives a test its own server, for kill -9 / restart drills.
//! - A fresh database per test ([`TestServer::new_database`]), from a module wasm that
//!   is built once per run ([`module_wasm`]).
//! - Identities are minted over HTTP; SDK clients connect as those non-owner identities
//!   (the owner bypasses row-level security, so it would prove nothing).

pub mod bin;
pub mod client;
pub mod pg;
pub mod sdk;
pub mod verify;

use khala_tools::api::{Api, Credentials, SqlRows};
use khala_tools::engine::Engine;
use khala_tools::server::{Lifetime, ServerDir, ServerProcess};
use khala_tools::ToolError;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How long a server may take to answer after a start or restart.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The pinned engine; panics with the fix when it is missing.
pub fn engine() -> Engine {
    match Engine::locate() {
        Ok(engine) => engine,
        Err(e) => panic!("{e} (the README's test command installs it)"),
    }
}

/// The module wasm, built once per test run.
pub fn module_wasm() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = khala_tools::module_wasm::build_module().unwrap_or_else(|e| panic!("{e}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    })
}

/// A server run by the tests, in its own temp data dir.
pub struct TestServer {
    process: Mutex<ServerProcess>,
    engine: Engine,
    url: String,
    dir: tempfile::TempDir,
}

static SHARED: OnceLock<TestServer> = OnceLock::new();

/// The server shared by every test of this test binary. A static is never dropped, so
/// the server is stopped and its data dir removed when the test process exits.
pub fn shared_server() -> &'static TestServer {
    SHARED.get_or_init(|| {
        let server = TestServer::start();
        // SAFETY: `atexit` only records the function; it runs once, at exit.
        unsafe { libc::atexit(stop_shared_server) };
        server
    })
}

extern "C" fn stop_shared_server() {
    if let Some(server) = SHARED.get() {
        if let Ok(mut process) = server.process.lock() {
            process.kill9();
        }
        let _ = std::fs::remove_dir_all(server.dir.path());
    }
}

impl TestServer {
    /// Starts a server on a free port, tied to this process's life.
    pub fn start() -> TestServer {
        let _ = env_logger::builder().is_test(true).try_init();
        let engine = engine();
        let dir = tempfile::Builder::new().prefix("khala-test-").tempdir().expect("a temp dir");
        let server_dir = ServerDir::open_or_create(dir.path()).expect("a fresh server dir");
        let process = ServerProcess::start_on_a_free_port(&engine, &server_dir, Lifetime::TiedToThisProcess, START_TIMEOUT)
            .unwrap_or_else(|e| panic!("starting the test server: {e}"));
        TestServer { url: process.url(), process: Mutex::new(process), engine, dir }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// SIGKILL the server, as a crash would; its data dir stays.
    pub fn kill9(&self) {
        self.process.lock().unwrap().kill9();
    }

    /// Start the server again on the same data dir and port.
    pub fn restart(&self) {
        let mut process = self.process.lock().unwrap();
        process.restart(&self.engine, Lifetime::TiedToThisProcess, START_TIMEOUT).unwrap_or_else(|e| panic!("restarting: {e}"));
    }

    /// Mints an identity.
    pub fn new_identity(&self) -> Credentials {
        self.api().new_identity().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Publishes the module to a new, uniquely named database owned by a new identity.
    pub fn new_database(&self, label: &str) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t-{}-{}-{n}", label.replace('_', "-"), std::process::id());
        let owner = self.new_identity();
        self.api().publish_module(&name, module_wasm(), &owner.token, false).unwrap_or_else(|e| panic!("{e}"));
        TestDb { name, owner, api: self.api(), url: self.url.clone() }
    }
}

/// One database of a test, with its owner.
pub struct TestDb {
    pub name: String,
    pub owner: Credentials,
    pub api: Api,
    pub url: String,
}

impl TestDb {
    /// Calls a reducer as `who`.
    pub fn call_as(&self, who: &Credentials, reducer: &str, args: Value) -> Result<(), ToolError> {
        self.api.call(&self.name, reducer, args, &who.token)
    }

    /// Calls a reducer as the owner, panicking on failure.
    pub fn call(&self, reducer: &str, args: Value) {
        self.call_as(&self.owner.clone(), reducer, args).unwrap_or_else(|e| panic!("{reducer}: {e}"));
    }

    /// Runs SQL as the owner.
    pub fn sql(&self, query: &str) -> SqlRows {
        self.api.sql(&self.name, query, &self.owner.token).unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    pub fn new_identity(&self) -> Credentials {
        self.api.new_identity().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Grants `scopes` on `stream` to `who` for `ttl_secs`.
    pub fn grant(&self, who: &Credentials, stream: &str, scopes: &[&str], ttl_secs: u64) {
        self.call("grant", json!([who.identity_arg(), stream, scopes, ttl_secs]));
    }

    /// Opens `who`'s replay window on `bucket` of `stream` (segments are visible only
    /// through open windows). Call it while `who` has an SDK connection: windows close
    /// when an identity's last connection goes.
    pub fn open_window(&self, who: &Credentials, stream: &str, bucket: u64) {
        self.call_as(who, "open_window", json!([stream, bucket])).unwrap_or_else(|e| panic!("open_window: {e}"));
    }

    pub fn revoke(&self, who: &Credentials, stream: &str) {
        self.call("revoke", json!([who.identity_arg(), stream]));
    }

    /// A new identity with the publisher role and a publish grant on every stream
    /// (`*`), for tests about something other than publish scopes.
    pub fn publisher(&self) -> Credentials {
        self.publisher_for(&["*"])
    }

    /// A new identity with the publisher role and publish grants on `patterns` (stream
    /// ids, or prefixes ending in `*`).
    pub fn publisher_for(&self, patterns: &[&str]) -> Credentials {
        let who = self.new_identity();
        khala_tools::grants::make_publisher(&self.api, &self.name, &self.owner.token, &who.identity, patterns, 24 * 3600).unwrap_or_else(|e| panic!("making a publisher: {e}"));
        who
    }
}

/// Publish-event JSON for a reducer call: `(key, kind, payload, authority_seq)`.
pub fn event_json(key: &str, kind: &str, payload: &[u8], authority_seq: Option<u64>) -> Value {
    khala_tools::api::publish_event_arg(key, kind, payload, authority_seq, 0)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The payload of event `seq` in the test streams (deterministic, so a republish after a
/// crash produces the same hashes).
pub fn test_payload(stream_id: &str, seq: u64) -> Vec<u8> {
    format!("{{\"stream\":\"{stream_id}\",\"seq\":{seq}}}").into_bytes()
}

/// Publishes events `from..from+n` of `stream_id` as `who`, in batches of `batch`, with
/// keys `k<seq>`, `authority_seq = seq` and [`test_payload`] payloads.
pub fn publish_range(db: &TestDb, who: &Credentials, stream_id: &str, from: u64, n: u64, batch: u64) {
    let mut seq = from;
    while seq < from + n {
        let upto = (seq + batch).min(from + n);
        let events: Vec<Value> = (seq..upto).map(|s| event_json(&format!("k{s}"), "test.event", &test_payload(stream_id, s), Some(s))).collect();
        db.call_as(who, "publish", json!([stream_id, events])).unwrap_or_else(|e| panic!("publishing {stream_id} {seq}..{upto}: {e}"));
        seq = upto;
    }
}

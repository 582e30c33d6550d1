//! `khala smoke`: the two-client handshake, against any server, as an admin.
//!
//! Mints two client identities and a publisher, grants them one fresh stream
//! (`smoke.<unix-ms>.<random>`) with a short lease, connects two real Khala clients
//! ([`SyncClient`]), publishes a handful of events as the publisher (never as the admin),
//! and checks that both clients apply every event in order with the chain verified, that
//! the connected count shows them, and that a revoke ends delivery to one of them. Then it
//! takes back everything it gave, also after a failed check. `khala deploy` runs it after
//! publishing (docs/SMOKE.md).
//!
//! Every wait and every HTTP request is bounded by [`SmokeOptions::timeout`].

use crate::api::{identity_arg, publish_event_arg, token_identity, Api, Credentials};
use crate::error::ToolError;
use crate::{grants, inspect};
use khala_client::health::{state_name, HealthHandle};
use khala_client::{ClientConfig, ClientError, Event, Handler, HandlerError, SyncClient};
use khala_proto::hash::{chain_hash, display, payload_hash, Hash32, GENESIS};
use khala_proto::v1::ConnectionState;
use khala_proto::StaleCursor;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A smoke run with failed checks, for the binary's `khala: smoke_failed: …` line.
#[derive(Debug, thiserror::Error)]
#[error("failed check(s): {}", .checks.join(", "))]
pub struct SmokeFailed {
    pub checks: Vec<&'static str>,
}

impl SmokeFailed {
    pub fn code(&self) -> &'static str {
        "smoke_failed"
    }
}

/// The kind of every event the smoke publishes.
pub const EVENT_KIND: &str = "khala.smoke";

/// How long a revoked client is watched after the other one applied the next event: it
/// would have had it by then, had delivery not ended.
const REVOKE_GRACE: Duration = Duration::from_millis(300);
const POLL: Duration = Duration::from_millis(50);

/// What to smoke-test, and as whom.
#[derive(Debug, Clone)]
pub struct SmokeOptions {
    pub server: String,
    pub database: String,
    /// The token of an identity with the `admin` role (the owner's, after `khala up`).
    pub admin_token: String,
    /// Events published before the revoke (one more follows it).
    pub events: u64,
    /// The bound on every wait and every HTTP request.
    pub timeout: Duration,
    /// The lease of every grant the smoke gives: if the smoke is killed before its
    /// cleanup, the grants end by themselves this soon.
    pub lease_secs: u64,
}

impl SmokeOptions {
    pub fn new(server: impl Into<String>, database: impl Into<String>, admin_token: impl Into<String>) -> Self {
        SmokeOptions {
            server: server.into(),
            database: database.into(),
            admin_token: admin_token.into(),
            events: 5,
            timeout: Duration::from_secs(20),
            lease_secs: 120,
        }
    }
}

/// The checks, in the order they run. The `cleanup_*` ones run whatever happened before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The server answers and the database exists.
    Database,
    /// The token's identity holds the `admin` role.
    Admin,
    /// Two client identities and a publisher identity minted.
    Identities,
    /// The fresh stream created (`create_stream`).
    Stream,
    /// Subscribe and ack grants to both clients; the publisher role and a publish grant
    /// on the stream to the publisher.
    Grants,
    /// Both clients connected, subscribed and live on the stream.
    Connect,
    /// The module's `presence` count rose by two; each client sees its one `connection` row.
    ConnectedCount,
    /// Every event reached both clients, in order, with the chain verified.
    Delivery,
    /// A revoked client goes `forbidden` and gets no further event; the other one does.
    Revoke,
    /// Both clients stopped and disconnected.
    CleanupClients,
    /// The clients' grants taken back.
    CleanupGrants,
    /// The stream emptied with `reset_stream` (its row stays).
    CleanupStream,
    /// The publisher role (and with it the publish grant) taken back.
    CleanupPublisher,
}

impl Check {
    const MAIN: [Check; 9] =
        [Check::Database, Check::Admin, Check::Identities, Check::Stream, Check::Grants, Check::Connect, Check::ConnectedCount, Check::Delivery, Check::Revoke];

    pub fn name(self) -> &'static str {
        match self {
            Check::Database => "database",
            Check::Admin => "admin",
            Check::Identities => "identities",
            Check::Stream => "stream",
            Check::Grants => "grants",
            Check::Connect => "connect",
            Check::ConnectedCount => "connected_count",
            Check::Delivery => "delivery",
            Check::Revoke => "revoke",
            Check::CleanupClients => "cleanup_clients",
            Check::CleanupGrants => "cleanup_grants",
            Check::CleanupStream => "cleanup_stream",
            Check::CleanupPublisher => "cleanup_publisher",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not run: an earlier check failed, or there was nothing to clean up.
    Skip,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub check: Check,
    pub outcome: Outcome,
    pub ms: u64,
    pub detail: String,
    /// A stable error code when the check failed.
    pub code: Option<String>,
}

/// What the smoke found, check by check.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    pub server: String,
    pub database: String,
    pub stream_id: String,
    pub checks: Vec<CheckResult>,
    pub ms: u64,
}

impl SmokeReport {
    /// No check failed (cleanup included).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| c.outcome == Outcome::Fail)
    }

    pub fn get(&self, check: Check) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == check)
    }

    pub fn to_json(&self) -> Value {
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| json!({ "check": c.check.name(), "result": c.outcome.name(), "ms": c.ms, "detail": c.detail, "code": c.code }))
            .collect();
        json!({
            "server": self.server,
            "database": self.database,
            "stream_id": self.stream_id,
            "passed": self.passed(),
            "ms": self.ms,
            "checks": checks,
        })
    }
}

/// Runs the smoke test. It never returns early: every failure is a failed check in the
/// report, and the cleanup checks run after any of them.
pub fn run_smoke(opts: &SmokeOptions) -> SmokeReport {
    let started = Instant::now();
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let stream_id = format!("smoke.{millis}.{:08x}", rand::random::<u32>());
    let mut run = Run {
        opts,
        api: Api::with_timeout(&opts.server, opts.timeout),
        stream_id,
        checks: Vec::new(),
        dir: None,
        admin: String::new(),
        clients: Vec::new(),
        client_ids: Vec::new(),
        granted: Vec::new(),
        publisher: None,
        publisher_role: false,
        stream_epoch: None,
        chain: vec![GENESIS],
        presence_before: 0,
    };
    let mut failed: Option<Check> = None;
    for check in Check::MAIN {
        match failed {
            Some(first) => run.record(check, Outcome::Skip, Duration::ZERO, format!("not run: {} failed", first.name()), None),
            None => {
                if !run.step(check, |run| run.main_check(check)) {
                    failed = Some(check);
                }
            }
        }
    }
    run.cleanup();
    SmokeReport { server: opts.server.clone(), database: opts.database.clone(), stream_id: run.stream_id, checks: run.checks, ms: started.elapsed().as_millis() as u64 }
}

/// Why a check failed.
#[derive(Debug)]
struct Failure {
    code: String,
    detail: String,
}

fn failure(code: &str, detail: impl Into<String>) -> Failure {
    Failure { code: code.into(), detail: detail.into() }
}

impl From<ToolError> for Failure {
    fn from(e: ToolError) -> Failure {
        Failure { code: e.code().into(), detail: e.to_string() }
    }
}

/// Calls `probe` every [`POLL`] until it returns `Some`, or `None` after `timeout`.
fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>, Failure>) -> Result<Option<T>, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// A hash as `blake3:` and its first 12 hex digits.
fn short_hash(hash: &[u8]) -> String {
    let shown = display(hash);
    shown[..shown.len().min(19)].to_string()
}

/// What a client's handler saw.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    rebootstraps: Vec<StaleCursor>,
}

struct Recorder(Arc<Mutex<Seen>>);

impl Handler for Recorder {
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError> {
        self.0.lock().map_err(|_| "the smoke's record is poisoned")?.events.push(event.clone());
        Ok(())
    }

    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError> {
        self.0.lock().map_err(|_| "the smoke's record is poisoned")?.rebootstraps.push(stale.clone());
        Ok(())
    }
}

/// One real Khala client, on its own thread.
struct SmokeClient {
    name: &'static str,
    seen: Arc<Mutex<Seen>>,
    health: HealthHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ClientError>>>,
    /// How the run ended, once it has.
    ended: Option<String>,
}

impl SmokeClient {
    fn start(name: &'static str, config: ClientConfig) -> Result<SmokeClient, Failure> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut client = SyncClient::new(config, Recorder(seen.clone())).map_err(|e| failure(e.code(), format!("client {name}: {e}")))?;
        let health = client.health();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("smoke-client-{name}"))
            .spawn(move || client.run(&flag))
            .map_err(|e| failure("io_error", format!("starting client {name}: {e}")))?;
        Ok(SmokeClient { name, seen, health, stop, thread: Some(thread), ended: None })
    }

    fn events(&self) -> Vec<Event> {
        self.seen.lock().map(|s| s.events.clone()).unwrap_or_default()
    }

    fn rebootstraps(&self) -> usize {
        self.seen.lock().map_or(0, |s| s.rebootstraps.len())
    }

    fn state(&self, stream_id: &str) -> Option<ConnectionState> {
        let health = self.health.get();
        let stream = health.streams.iter().find(|s| s.stream_id == stream_id)?;
        ConnectionState::try_from(stream.state).ok()
    }

    /// The client's state and last error, for a failure's detail.
    fn describe(&self, stream_id: &str) -> String {
        let health = self.health.get();
        let state = self.state(stream_id).map_or("no stream state yet", |s| state_name(s as i32));
        let mut text = format!("client {}: {state}, {} applied", self.name, self.events().len());
        if !health.last_error.is_empty() {
            text.push_str(&format!(", last error {}", health.last_error));
        }
        if let Some(ended) = &self.ended {
            text.push_str(&format!(", ended: {ended}"));
        }
        text
    }

    /// Fails when the client's run has ended: a smoke client runs until it is stopped.
    fn check_running(&mut self) -> Result<(), Failure> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let ended = match self.thread.take().map(|t| t.join()) {
                Some(Ok(Ok(()))) => ("client_stopped".to_string(), "stopped by itself".to_string()),
                Some(Ok(Err(e))) => (e.code().to_string(), e.to_string()),
                _ => ("client_panicked".to_string(), "the client thread panicked".to_string()),
            };
            self.ended = Some(format!("{}: {}", ended.0, ended.1));
            return Err(failure(&ended.0, format!("client {} ended: {}", self.name, ended.1)));
        }
        if let Some(ended) = &self.ended {
            return Err(failure("client_stopped", format!("client {} ended: {ended}", self.name)));
        }
        Ok(())
    }

    /// Asks the client to stop and waits up to `timeout` for it. Returns whether it stopped.
    fn stop(&mut self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else { return true };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
            true
        } else {
            // Left to end on its own: its stop flag is set.
            log::warn!("smoke client {} did not stop within {timeout:?}", self.name);
            false
        }
    }
}

struct Run<'a> {
    opts: &'a SmokeOptions,
    api: Api,
    stream_id: String,
    checks: Vec<CheckResult>,
    /// Token files and checkpoints of the two clients.
    dir: Option<tempfile::TempDir>,
    /// The admin's identity (hex).
    admin: String,
    clients: Vec<SmokeClient>,
    client_ids: Vec<Credentials>,
    /// Clients given a grant, to revoke at cleanup.
    granted: Vec<Credentials>,
    publisher: Option<Credentials>,
    /// The publisher role may have been given: take it back at cleanup.
    publisher_role: bool,
    /// The stream's epoch when the smoke created it.
    stream_epoch: Option<u32>,
    /// Expected chain hashes: `chain[seq]`, `chain[0]` is [`GENESIS`].
    chain: Vec<Hash32>,
    presence_before: u64,
}

impl Run<'_> {
    fn db(&self) -> &str {
        &self.opts.database
    }

    fn record(&mut self, check: Check, outcome: Outcome, took: Duration, detail: String, code: Option<String>) {
        self.checks.push(CheckResult { check, outcome, ms: took.as_millis() as u64, detail, code });
    }

    /// Runs one check and records it. Returns whether it passed.
    fn step(&mut self, check: Check, f: impl FnOnce(&mut Self) -> Result<String, Failure>) -> bool {
        let started = Instant::now();
        let result = f(self);
        let took = started.elapsed();
        match result {
            Ok(detail) => {
                self.record(check, Outcome::Pass, took, detail, None);
                true
            }
            Err(e) => {
                self.record(check, Outcome::Fail, took, e.detail, Some(e.code));
                false
            }
        }
    }

    fn main_check(&mut self, check: Check) -> Result<String, Failure> {
        match check {
            Check::Database => self.check_database(),
            Check::Admin => self.check_admin(),
            Check::Identities => self.mint_identities(),
            Check::Stream => self.create_stream(),
            Check::Grants => self.give_grants(),
            Check::Connect => self.connect_clients(),
            Check::ConnectedCount => self.check_connected_count(),
            Check::Delivery => self.check_delivery(),
            Check::Revoke => self.check_revoke(),
            _ => unreachable!("cleanup checks are not main checks"),
        }
    }

    fn check_database(&mut self) -> Result<String, Failure> {
        if !self.api.database_exists(self.db())? {
            return Err(failure("unknown_database", format!("the server at {} has no database {}", self.opts.server, self.db())));
        }
        let owner = self.api.database_owner(self.db())?;
        Ok(format!("{} at {}, owner {}", self.db(), self.opts.server, short(&owner)))
    }

    fn check_admin(&mut self) -> Result<String, Failure> {
        let identity = token_identity(&self.opts.admin_token)
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| failure("unauthorized", "the token is not a SpacetimeDB identity token (a JWT with a hex_identity claim)"))?;
        let query = format!("SELECT * FROM identity_role WHERE identity = 0x{identity} AND role = 'admin'");
        let rows = self.api.sql(self.db(), &query, &self.opts.admin_token)?;
        if rows.rows.is_empty() {
            return Err(failure(
                "unauthorized",
                format!("identity {} does not hold the admin role on {} (use the owner's token, or give it: khala role --role admin)", short(&identity), self.db()),
            ));
        }
        self.admin = identity;
        Ok(format!("identity {} holds the admin role", short(&self.admin)))
    }

    fn mint_identities(&mut self) -> Result<String, Failure> {
        let a = self.api.new_identity()?;
        let b = self.api.new_identity()?;
        let p = self.api.new_identity()?;
        let detail = format!("clients a {} and b {}, publisher {}", short(&a.identity), short(&b.identity), short(&p.identity));
        self.client_ids = vec![a, b];
        self.publisher = Some(p);
        Ok(detail)
    }

    fn create_stream(&mut self) -> Result<String, Failure> {
        let stream_id = self.stream_id.clone();
        self.api.call(self.db(), "create_stream", json!([stream_id, 0, 0]), &self.opts.admin_token)?;
        // Created now: reset at cleanup whatever happens next.
        self.stream_epoch = Some(0);
        Ok(format!("created {stream_id}"))
    }

    fn give_grants(&mut self) -> Result<String, Failure> {
        let lease = self.opts.lease_secs;
        for who in self.client_ids.clone() {
            self.granted.push(who.clone());
            self.api.call(self.db(), "grant", json!([who.identity_arg(), self.stream_id, ["subscribe", "ack"], lease]), &self.opts.admin_token)?;
        }
        let publisher = self.publisher.clone().ok_or_else(|| failure("internal", "no publisher identity"))?;
        self.publisher_role = true;
        grants::make_publisher(&self.api, self.db(), &self.opts.admin_token, &publisher.identity, &[self.stream_id.as_str()], lease)?;
        // The publisher reads the stream row through its grant: the epoch to compare with at cleanup.
        let row = inspect::stream(&self.api, self.db(), &publisher.token, &self.stream_id)?
            .ok_or_else(|| failure("forbidden_stream", "the publisher does not see the stream it was granted"))?;
        self.stream_epoch = Some(row.epoch);
        Ok(format!("subscribe,ack to a and b; publisher role and publish on the stream to the publisher; lease {lease} s"))
    }

    fn connect_clients(&mut self) -> Result<String, Failure> {
        self.presence_before = self.presence()?;
        let dir = tempfile::Builder::new().prefix("khala-smoke-").tempdir().map_err(|e| failure("io_error", format!("a temp dir for the clients: {e}")))?;
        for (who, name) in self.client_ids.clone().iter().zip(["a", "b"]) {
            let token = dir.path().join(format!("{name}.token"));
            std::fs::write(&token, &who.token).map_err(|e| failure("io_error", format!("writing {}: {e}", token.display())))?;
            let mut config = ClientConfig::new(self.opts.server.as_str(), self.db(), &token, dir.path().join(format!("{name}.checkpoint")));
            config.streams = vec![self.stream_id.clone()];
            self.clients.push(SmokeClient::start(name, config)?);
        }
        self.dir = Some(dir);
        let stream_id = self.stream_id.clone();
        let live = poll(self.opts.timeout, || {
            for c in self.clients.iter_mut() {
                c.check_running()?;
            }
            Ok(self.clients.iter().all(|c| c.state(&stream_id) == Some(ConnectionState::Live)).then_some(()))
        })?;
        if live.is_none() {
            return Err(failure("timeout", format!("not live within {:?}: {}", self.opts.timeout, self.describe_clients())));
        }
        Ok("a and b connected, subscribed, live on the stream".into())
    }

    fn describe_clients(&self) -> String {
        self.clients.iter().map(|c| c.describe(&self.stream_id)).collect::<Vec<_>>().join("; ")
    }

    /// The module's connected count (the `presence` row admins see).
    fn presence(&self) -> Result<u64, Failure> {
        let rows = self.api.sql(self.db(), "SELECT * FROM presence", &self.opts.admin_token)?;
        Ok(rows.rows.first().and_then(|r| rows.get(r, "connected")).and_then(Value::as_u64).unwrap_or(0))
    }

    /// How many `connection` rows `who` sees: its own only (row-level security).
    fn own_connections(&self, who: &Credentials) -> Result<usize, Failure> {
        Ok(self.api.sql(self.db(), "SELECT * FROM connection", &who.token)?.rows.len())
    }

    /// Each smoke client sees exactly its own connection row, and the module's presence
    /// count includes both. On a live database other clients come and go meanwhile, so
    /// the count must be at least two, not exactly two more than before (the detail says
    /// whether it moved by exactly two).
    fn check_connected_count(&mut self) -> Result<String, Failure> {
        let before = self.presence_before;
        let mut last = (0, Vec::new());
        let shown = poll(self.opts.timeout, || {
            let now = self.presence()?;
            let own = self.client_ids.iter().map(|c| self.own_connections(c)).collect::<Result<Vec<_>, _>>()?;
            let ok = now >= 2 && own.iter().all(|n| *n == 1);
            last = (now, own);
            Ok(ok.then_some(now))
        })?;
        match shown {
            Some(now) => {
                let moved = if now == before + 2 { "exactly the smoke's two more" } else { "other clients came or went meanwhile" };
                Ok(format!("presence shows {now} connected (was {before}: {moved}); a and b each see their one connection row"))
            }
            None => Err(failure(
                "connected_count",
                format!("presence shows {} connected (was {before}), expected at least 2 with a and b each seeing one own connection row: a {} b {}", last.0, last.1.first().unwrap_or(&0), last.1.get(1).unwrap_or(&0)),
            )),
        }
    }

    /// Publishes event `seq` (the stream's next) as the publisher, and extends the
    /// expected chain with it.
    fn publish(&mut self, seq: u64) -> Result<(), Failure> {
        let publisher = self.publisher.clone().ok_or_else(|| failure("internal", "no publisher identity"))?;
        let payload = event_payload(&self.stream_id, seq);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let event = publish_event_arg(&format!("smoke-{seq}"), EVENT_KIND, &payload, Some(seq), now);
        self.api.call(self.db(), "publish", json!([self.stream_id, [event]]), &publisher.token)?;
        let prev = *self.chain.last().unwrap_or(&GENESIS);
        self.chain.push(chain_hash(&prev, &self.stream_id, seq, EVENT_KIND, &payload_hash(&payload)));
        Ok(())
    }

    /// Checks that `events` are exactly seqs `1..=upto`, in order, each the event
    /// published with its chain hash following from the one before.
    fn verify(&self, name: &str, events: &[Event], upto: u64) -> Result<(), Failure> {
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        if seqs != (1..=upto).collect::<Vec<_>>() {
            return Err(failure("out_of_order", format!("client {name} applied seqs {seqs:?}, expected 1..={upto}")));
        }
        for e in events {
            let seq = e.seq as usize;
            let (Some(expected), Some(prev)) = (self.chain.get(seq), self.chain.get(seq - 1)) else {
                return Err(failure("internal", format!("no expected chain hash for seq {seq}")));
            };
            if e.kind != EVENT_KIND || e.payload != event_payload(&self.stream_id, e.seq) {
                return Err(failure("chain_mismatch", format!("client {name}: event {} is not the one published", e.seq)));
            }
            if &e.chain_hash != expected || &e.prev_chain != prev {
                return Err(failure(
                    "chain_mismatch",
                    format!("client {name}: event {} has chain {}, expected {}", e.seq, short_hash(&e.chain_hash), short_hash(expected)),
                ));
            }
        }
        Ok(())
    }

    /// Waits until client `i` has applied at least `count` events.
    fn wait_applied(&mut self, i: usize, count: usize) -> Result<(), Failure> {
        let timeout = self.opts.timeout;
        let client = &mut self.clients[i];
        let got = poll(timeout, || {
            client.check_running()?;
            Ok((client.events().len() >= count).then_some(()))
        })?;
        if got.is_none() {
            return Err(failure("timeout", format!("within {timeout:?}: {}, expected {count}", self.clients[i].describe(&self.stream_id))));
        }
        Ok(())
    }

    fn check_delivery(&mut self) -> Result<String, Failure> {
        let n = self.opts.events;
        let started = Instant::now();
        for seq in 1..=n {
            self.publish(seq)?;
        }
        let published = started.elapsed();
        for i in 0..self.clients.len() {
            self.wait_applied(i, n as usize)?;
        }
        let delivered = started.elapsed();
        for c in &self.clients {
            self.verify(c.name, &c.events(), n)?;
            if c.rebootstraps() > 0 {
                return Err(failure("stale_cursor", format!("client {} was told to rebuild a fresh stream", c.name)));
            }
        }
        let publisher = self.publisher.clone().ok_or_else(|| failure("internal", "no publisher identity"))?;
        let row = inspect::stream(&self.api, self.db(), &publisher.token, &self.stream_id)?.ok_or_else(|| failure("unknown_stream", "the stream row is gone"))?;
        let head = self.chain[n as usize];
        if row.head_seq != n || row.head_hash != head {
            return Err(failure(
                "chain_mismatch",
                format!("the module's head is {} {}, the clients' {n} {}", row.head_seq, short_hash(&row.head_hash), short_hash(&head)),
            ));
        }
        Ok(format!(
            "{n} events published in {} ms, all in order at a and b {} ms after the first publish; chains match the head {}",
            published.as_millis(),
            delivered.as_millis(),
            short_hash(&head)
        ))
    }

    fn check_revoke(&mut self) -> Result<String, Failure> {
        let n = self.opts.events;
        let b = self.client_ids[1].clone();
        let started = Instant::now();
        self.api.call(self.db(), "revoke", json!([b.identity_arg(), self.stream_id]), &self.opts.admin_token)?;
        let timeout = self.opts.timeout;
        let stream_id = self.stream_id.clone();
        let client = &mut self.clients[1];
        let forbidden = poll(timeout, || {
            client.check_running()?;
            Ok((client.state(&stream_id) == Some(ConnectionState::Forbidden)).then_some(()))
        })?;
        if forbidden.is_none() {
            return Err(failure("timeout", format!("not forbidden within {timeout:?} of the revoke: {}", self.clients[1].describe(&stream_id))));
        }
        let forbidden_after = started.elapsed();
        self.publish(n + 1)?;
        self.wait_applied(0, n as usize + 1)?;
        self.verify("a", &self.clients[0].events(), n + 1)?;
        std::thread::sleep(REVOKE_GRACE);
        let seen_by_b: Vec<u64> = self.clients[1].events().iter().map(|e| e.seq).collect();
        if seen_by_b != (1..=n).collect::<Vec<_>>() {
            return Err(failure("delivered_after_revoke", format!("client b applied {seen_by_b:?} after its grant was revoked; expected 1..={n}")));
        }
        let query = format!("SELECT * FROM stream WHERE stream_id = {}", inspect::quote(&stream_id));
        let visible = self.api.sql(self.db(), &query, &b.token)?.rows.len();
        if visible != 0 {
            return Err(failure("forbidden_stream", "client b still sees the stream row after the revoke"));
        }
        Ok(format!("b forbidden {} ms after the revoke; event {} reached a only; b no longer sees the stream", forbidden_after.as_millis(), n + 1))
    }

    /// Takes back everything the smoke gave, each part its own check.
    fn cleanup(&mut self) {
        if self.clients.is_empty() {
            self.record(Check::CleanupClients, Outcome::Skip, Duration::ZERO, "no client was started".into(), None);
        } else {
            self.step(Check::CleanupClients, |run| run.stop_clients());
        }
        if self.granted.is_empty() {
            self.record(Check::CleanupGrants, Outcome::Skip, Duration::ZERO, "nothing was granted".into(), None);
        } else {
            self.step(Check::CleanupGrants, |run| run.revoke_grants());
        }
        if self.stream_epoch.is_none() {
            self.record(Check::CleanupStream, Outcome::Skip, Duration::ZERO, "no stream was created".into(), None);
        } else {
            self.step(Check::CleanupStream, |run| run.reset_stream());
        }
        if !self.publisher_role {
            self.record(Check::CleanupPublisher, Outcome::Skip, Duration::ZERO, "no publisher was made".into(), None);
        } else {
            self.step(Check::CleanupPublisher, |run| run.take_publisher_back());
        }
        self.dir = None;
    }

    fn stop_clients(&mut self) -> Result<String, Failure> {
        let timeout = self.opts.timeout;
        let stuck: Vec<&str> = self.clients.iter_mut().filter_map(|c| (!c.stop(timeout)).then_some(c.name)).collect();
        if !stuck.is_empty() {
            return Err(failure("timeout", format!("client(s) {} did not stop within {timeout:?}", stuck.join(", "))));
        }
        let ids = self.client_ids.clone();
        let gone = poll(timeout, || {
            let left = ids.iter().map(|c| self.own_connections(c)).sum::<Result<usize, _>>()?;
            Ok((left == 0).then_some(()))
        })?;
        if gone.is_none() {
            return Err(failure("timeout", format!("the clients' connection rows were still there {timeout:?} after they stopped")));
        }
        Ok(format!("{} clients stopped; no connection row left", self.clients.len()))
    }

    fn revoke_grants(&mut self) -> Result<String, Failure> {
        let mut errors = Vec::new();
        for who in self.granted.clone() {
            if let Err(e) = self.api.call(self.db(), "revoke", json!([who.identity_arg(), self.stream_id]), &self.opts.admin_token) {
                errors.push(format!("{}: {}: {e}", short(&who.identity), e.code()));
            }
        }
        if !errors.is_empty() {
            return Err(failure("cleanup_incomplete", format!("revoking: {}", errors.join("; "))));
        }
        // Each identity sees its own grants: none may be left.
        for who in &self.granted {
            let left = self.api.sql(self.db(), "SELECT * FROM stream_grant", &who.token)?.rows.len();
            if left != 0 {
                return Err(failure("cleanup_incomplete", format!("{} still holds {left} grant(s)", short(&who.identity))));
            }
        }
        Ok(format!("revoked the grants of {} clients; none left", self.granted.len()))
    }

    fn reset_stream(&mut self) -> Result<String, Failure> {
        const KEPT: &str = "its empty row stays: the module has no reducer that drops a stream";
        let stream_id = self.stream_id.clone();
        let Some(publisher) = self.publisher.clone().filter(|_| self.chain.len() > 1) else {
            return Ok(format!("{stream_id} holds no events; {KEPT}"));
        };
        let before = self.stream_epoch.unwrap_or(0);
        let mut calls = 0;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            self.api.call(self.db(), "reset_stream", json!([stream_id]), &self.opts.admin_token)?;
            calls += 1;
            // The publisher still reaches the stream; the admin (unless the owner) does not see it.
            let row = inspect::stream(&self.api, self.db(), &publisher.token, &stream_id)?.ok_or_else(|| failure("unknown_stream", "the stream row is gone"))?;
            if row.epoch > before && row.head_seq == 0 && row.segment_count == 0 {
                return Ok(format!("{stream_id} emptied by reset_stream ({calls} call(s), epoch {before} -> {}); {KEPT}", row.epoch));
            }
            if Instant::now() >= deadline {
                return Err(failure("timeout", format!("{stream_id} still holds {} segment(s) after {calls} reset_stream calls", row.segment_count)));
            }
        }
    }

    fn take_publisher_back(&mut self) -> Result<String, Failure> {
        let publisher = self.publisher.clone().ok_or_else(|| failure("internal", "no publisher identity"))?;
        // Taking the role back also revokes the identity's publish grants.
        self.api.call(self.db(), "set_role", json!([identity_arg(&publisher.identity), "publisher", false]), &self.opts.admin_token)?;
        let roles = self.api.sql(self.db(), "SELECT * FROM identity_role", &publisher.token)?.rows.len();
        let grants = self.api.sql(self.db(), "SELECT * FROM publish_grant", &publisher.token)?.rows.len();
        if roles != 0 || grants != 0 {
            return Err(failure("cleanup_incomplete", format!("the publisher still holds {roles} role(s) and {grants} publish grant(s)")));
        }
        Ok(format!("publisher {} holds no role and no publish grant", short(&publisher.identity)))
    }
}

/// The payload of the smoke's event `seq`.
fn event_payload(stream_id: &str, seq: u64) -> Vec<u8> {
    json!({ "smoke": stream_id, "seq": seq }).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_without_a_failed_check() {
        let check = |outcome| CheckResult { check: Check::Database, outcome, ms: 1, detail: String::new(), code: None };
        let report = |checks| SmokeReport { server: "s".into(), database: "d".into(), stream_id: "x".into(), checks, ms: 1 };
        assert!(report(vec![check(Outcome::Pass), check(Outcome::Skip)]).passed());
        assert!(!report(vec![check(Outcome::Pass), check(Outcome::Fail)]).passed());
        assert!(!report(vec![]).passed());
        assert_eq!(report(vec![check(Outcome::Fail)]).to_json()["checks"][0]["result"], "fail");
    }
}

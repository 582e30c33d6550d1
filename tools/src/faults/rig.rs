//! What the drills run: a private server, and the mirror and clients as separate `khala`
//! processes (so a kill -9 is a real crash). Each client process incarnation writes its
//! own log file; nothing is ever merged or deduplicated ([`super::history`]).

use super::DrillError;
use crate::api::{identity_arg, Api, Credentials};
use crate::engine::Engine;
use crate::grants;
use crate::inspect;
use crate::mirror::mapping::topic_to_stream;
use crate::server::{Lifetime, ServerDir, ServerProcess};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub type Result<T, E = DrillError> = std::result::Result<T, E>;

/// Topics (streams) of every drill's authority log.
pub const TOPICS: u32 = 3;

/// The server and what every drill shares.
pub struct Rig {
    pub engine: Engine,
    pub server: ServerProcess,
    pub api: Api,
    pub owner: Credentials,
    /// The mirror's publisher identity (granted `runtime.*` on every drill database).
    pub mirror_id: Credentials,
    pub mirror_token: PathBuf,
    pub dir: PathBuf,
    pub wasm: Vec<u8>,
    /// The `khala` binary the processes run.
    pub khala: PathBuf,
    _tmp: tempfile::TempDir,
    databases: AtomicU64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DrillError {
    let what = what.into();
    move |source| DrillError::Io { what, source }
}

/// Children die with the thread that forked them (the drill's thread): a drill that
/// panics or is killed leaves no client or mirror running.
fn tied(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

impl Rig {
    /// Starts a private server in a temp dir and builds the module.
    pub fn start(khala: PathBuf) -> Result<Rig> {
        let engine = Engine::locate()?;
        let mut tmp = tempfile::Builder::new().prefix("khala-chaos-").tempdir().map_err(io("creating a temp dir"))?;
        // KHALA_CHAOS_KEEP=1 keeps every log, checkpoint and the server's data for a look.
        if std::env::var_os("KHALA_CHAOS_KEEP").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("khala chaos: keeping {}", tmp.path().display());
        }
        let server_dir = ServerDir::open_or_create(&tmp.path().join("server"))?;
        let server = ServerProcess::start_on_a_free_port(&engine, &server_dir, Lifetime::TiedToThisProcess, Duration::from_secs(60))?;
        let api = Api::new(&server.url());
        let owner = api.new_identity()?;
        let mirror_id = api.new_identity()?;
        let dir = tmp.path().to_path_buf();
        let mirror_token = dir.join("mirror.token");
        std::fs::write(&mirror_token, &mirror_id.token).map_err(io("writing the mirror token"))?;
        let wasm_path = crate::module_wasm::build_module()?;
        let wasm = std::fs::read(&wasm_path).map_err(io(format!("reading {}", wasm_path.display())))?;
        Ok(Rig { engine, server, api, owner, mirror_id, mirror_token, dir, wasm, khala, _tmp: tmp, databases: AtomicU64::new(0) })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn server_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.server.port))
    }

    /// A fresh database for one drill run, with the mirror granted `runtime.*`.
    pub fn database(&self, label: &str) -> Result<String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("chaos-{}-{n}", label.replace('_', "-"));
        self.api.publish_module(&name, &self.wasm, &self.owner.token, false)?;
        grants::make_publisher(&self.api, &name, &self.owner.token, &self.mirror_id.identity, &[grants::MIRROR_PATTERN], 24 * 3600)?;
        Ok(name)
    }

    pub fn streams() -> Vec<String> {
        (0..TOPICS).filter_map(|i| topic_to_stream(&format!("run:{i}:events")).ok()).collect()
    }

    /// The authority's log: `events` synthetic events over [`TOPICS`] topics, as lines.
    pub fn authority_lines(events: u64, seed: u64) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        crate::mirror::gen::write_events(&mut out, events, 200, TOPICS, seed).map_err(io("generating events"))?;
        Ok(out.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect())
    }

    /// A new identity granted subscribe and ack on every drill stream for `ttl_secs`;
    /// returns it and its token file.
    pub fn reader(&self, database: &str, ttl_secs: u64) -> Result<(Credentials, PathBuf)> {
        let reader = self.api.new_identity()?;
        for s in Self::streams() {
            self.api.call(database, "grant", json!([identity_arg(&reader.identity), s, ["subscribe", "ack"], ttl_secs]), &self.owner.token)?;
        }
        let path = self.dir.join(format!("{database}-{}.token", &reader.identity[..16]));
        std::fs::write(&path, &reader.token).map_err(io("writing a token"))?;
        Ok((reader, path))
    }

    fn command(&self, url: &str, database: &str) -> Command {
        let mut c = Command::new(&self.khala);
        c.env("RUST_LOG", "warn").env("KHALA_ENV_FILE", self.dir.join("none.env"));
        c.env("KHALA_SERVER_URL", url).env("KHALA_DATABASE", database).env_remove("KHALA_TOKEN_FILE");
        c.stdin(Stdio::null());
        tied(&mut c);
        c
    }

    /// A mirror of `input` (followed as it grows) into `database` at `url`.
    pub fn mirror(&self, url: &str, database: &str, input: &Path, state: &str) -> MirrorProc {
        MirrorProc { command_url: url.to_string(), database: database.into(), input: input.into(), state: self.dir.join(state), runs: Vec::new(), child: None, follow: true, batch_ms: None }
    }

    /// A client process of `database` at `url` (not started).
    pub fn client(&self, url: &str, database: &str, name: &str, token: &Path, identity: &str) -> ClientProc {
        let base = self.dir.join(format!("{database}-{name}"));
        ClientProc {
            url: url.into(),
            database: database.into(),
            token: token.into(),
            checkpoint: base.with_extension("checkpoint"),
            base,
            logs: Vec::new(),
            identity: identity.to_string(),
            child: None,
            read: ReadState::default(),
            reached: BTreeMap::new(),
            started_at: None,
        }
    }

    /// Each identity's acked seq per stream (as the owner, over SQL).
    pub fn acks(&self, database: &str) -> Result<Vec<(String, String, u64)>> {
        let rows = self.api.sql(database, "SELECT grantee, stream_id, acked_seq FROM client_ack", &self.owner.token)?.rows;
        Ok(rows.iter().filter_map(|r| Some((r.first()?.to_string(), r.get(1)?.as_str()?.to_string(), r.get(2)?.as_u64()?))).collect())
    }

    /// The module's heads by stream (as the owner, over SQL).
    pub fn module_heads(&self, database: &str) -> Result<BTreeMap<String, u64>> {
        Ok(inspect::streams(&self.api, database, &self.owner.token)?.into_iter().map(|s| (s.stream_id, s.head_seq)).collect())
    }

    pub fn spawn_mirror(&self, m: &mut MirrorProc) -> Result<()> {
        let n = m.runs.len();
        let out = self.dir.join(format!("{}-mirror-{n}.out", m.database));
        let err = self.dir.join(format!("{}-mirror-{n}.err", m.database));
        let mut c = self.command(&m.command_url, &m.database);
        c.arg("mirror").arg("--input").arg(&m.input).arg("--state-dir").arg(&m.state).arg("--token-file").arg(&self.mirror_token);
        c.args(["--batch-events", "200", "--durable-after-ms", "1000"]);
        if let Some(ms) = m.batch_ms {
            c.args(["--batch-ms", &ms.to_string()]);
        }
        if m.follow {
            c.arg("--follow");
        }
        c.stdout(std::fs::File::create(&out).map_err(io("creating the mirror's output"))?);
        c.stderr(std::fs::File::create(&err).map_err(io("creating the mirror's log"))?);
        m.child = Some(c.spawn().map_err(io("starting the mirror"))?);
        m.runs.push((out, err));
        Ok(())
    }

    pub fn spawn_client(&self, c: &mut ClientProc) -> Result<()> {
        let n = c.logs.len();
        let log = PathBuf::from(format!("{}.{n}.jsonl", c.base.display()));
        let err = PathBuf::from(format!("{}.{n}.err", c.base.display()));
        let mut cmd = self.command(&c.url, &c.database);
        cmd.args(["tail", "--json"]).arg("--token-file").arg(&c.token).arg("--checkpoint").arg(&c.checkpoint);
        for s in Self::streams() {
            cmd.args(["--stream", &s]);
        }
        cmd.stdout(std::fs::File::create(&log).map_err(io("creating a client log"))?);
        cmd.stderr(std::fs::File::create(&err).map_err(io("creating a client log"))?);
        // What the last incarnation wrote after the last look counts too: a process killed
        // just after it reached the head, restarted with nothing left to apply, would
        // otherwise never be seen there.
        c.refresh();
        c.child = Some(cmd.spawn().map_err(io("starting a client"))?);
        c.logs.push(log);
        c.read = ReadState::default();
        c.started_at = Some(Instant::now());
        Ok(())
    }
}

/// A `khala mirror` process and its runs (one stdout/stderr pair per start).
pub struct MirrorProc {
    command_url: String,
    pub database: String,
    pub input: PathBuf,
    pub state: PathBuf,
    pub runs: Vec<(PathBuf, PathBuf)>,
    pub child: Option<Child>,
    pub follow: bool,
    /// `--batch-ms` (the mirror's default, 50 ms, when `None`).
    pub batch_ms: Option<u64>,
}

/// Whether the process in `child` is still running.
fn child_running(child: &mut Option<Child>) -> bool {
    child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
}

/// SIGKILL, and reap it.
fn kill9_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM, then SIGKILL after `grace`; the exit status if it ended.
fn stop_child(child: &mut Option<Child>, grace: Duration) -> Option<std::process::ExitStatus> {
    let mut c = child.take()?;
    signal(c.id(), nix::sys::signal::Signal::SIGTERM);
    wait_child(&mut c, grace).or_else(|| {
        let _ = c.kill();
        c.wait().ok()
    })
}

impl MirrorProc {
    pub fn running(&mut self) -> bool {
        child_running(&mut self.child)
    }

    pub fn kill9(&mut self) {
        kill9_child(&mut self.child);
    }

    /// SIGTERM (a clean stop), then SIGKILL after `grace`; the exit status if it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        stop_child(&mut self.child, grace)
    }

    /// The exit status, if the process has ended with a failure.
    pub fn failed(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        (!status.success()).then_some(status)
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let Some(c) = self.child.as_mut() else { return Err(DrillError::Process("the mirror is not running".into())) };
        let status = wait_child(c, limit).ok_or_else(|| DrillError::Timeout { what: "the mirror to exit".into(), secs: limit.as_secs() })?;
        self.child = None;
        Ok(status)
    }

    /// stdout and stderr of every run so far, concatenated.
    pub fn output(&self) -> String {
        let mut text = String::new();
        for (out, err) in &self.runs {
            text.push_str(&std::fs::read_to_string(out).unwrap_or_default());
            text.push_str(&std::fs::read_to_string(err).unwrap_or_default());
        }
        text
    }
}

fn wait_child(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where reading the current incarnation's log got to.
#[derive(Debug, Default)]
struct ReadState {
    offset: u64,
    partial: Vec<u8>,
    applied: u64,
    last: BTreeMap<String, u64>,
    rebootstraps: u64,
}

/// A `khala tail --json` client: its incarnations' logs, checkpoint and health file.
pub struct ClientProc {
    pub url: String,
    pub database: String,
    pub token: PathBuf,
    pub checkpoint: PathBuf,
    base: PathBuf,
    /// One log per process start, in start order.
    pub logs: Vec<PathBuf>,
    /// The client's identity (hex), for its acks.
    pub identity: String,
    pub child: Option<Child>,
    read: ReadState,
    /// The last seq applied per stream by any incarnation (a restart whose checkpoint is
    /// at the head applies nothing, and is at the head all the same).
    reached: BTreeMap<String, u64>,
    pub started_at: Option<Instant>,
}

impl ClientProc {
    pub fn alive(&mut self) -> bool {
        child_running(&mut self.child)
    }

    pub fn kill9(&mut self) {
        kill9_child(&mut self.child);
    }

    /// SIGTERM (the client checkpoints and exits); SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        stop_child(&mut self.child, grace)
    }

    /// Reads what the current incarnation logged since the last call.
    fn refresh(&mut self) {
        let Some(path) = self.logs.last() else { return };
        let Ok(mut f) = std::fs::File::open(path) else { return };
        if f.seek(SeekFrom::Start(self.read.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.read.offset += buf.len() as u64;
        self.read.partial.extend_from_slice(&buf);
        let Some(end) = self.read.partial.iter().rposition(|b| *b == b'\n') else { return };
        let whole: Vec<u8> = self.read.partial.drain(..=end).collect();
        for line in whole.split(|b| *b == b'\n') {
            let Ok(v) = serde_json::from_slice::<Value>(line) else { continue };
            if v.get("rebootstrap").is_some() {
                self.read.rebootstraps += 1;
                continue;
            }
            if let (Some(s), Some(seq)) = (v["stream_id"].as_str(), v["seq"].as_u64()) {
                self.read.applied += 1;
                self.read.last.insert(s.to_string(), seq);
                self.reached.insert(s.to_string(), seq);
            }
        }
    }

    /// Events the current incarnation applied so far.
    pub fn applied_now(&mut self) -> u64 {
        self.refresh();
        self.read.applied
    }

    /// The last seq the current incarnation applied, per stream.
    pub fn heads_now(&mut self) -> BTreeMap<String, u64> {
        self.refresh();
        self.read.last.clone()
    }

    /// How many times the current incarnation's session ended (its log's warnings).
    pub fn sessions_ended(&self) -> usize {
        let Some(log) = self.logs.last() else { return 0 };
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default().lines().filter(|l| l.contains("session ended")).count()
    }

    /// The client's health file (`<checkpoint>.health.json`), if written.
    pub fn health(&self) -> Option<Value> {
        let mut p = self.checkpoint.clone().into_os_string();
        p.push(".health.json");
        serde_json::from_slice(&std::fs::read(PathBuf::from(p)).ok()?).ok()
    }

    /// Whether the client (any incarnation, the latest last) has applied every stream up
    /// to `heads`.
    pub fn at(&mut self, heads: &BTreeMap<String, u64>) -> bool {
        self.refresh();
        heads.iter().all(|(s, h)| *h == 0 || self.reached.get(s) == Some(h))
    }
}

/// Feeds authority lines into the mirror's input file over `over`, in small appends, so
/// that the mirror and the clients see live traffic while faults happen.
pub struct Feeder {
    handle: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Feeder {
    pub fn start(path: &Path, lines: Vec<Vec<u8>>, over: Duration) -> Result<Feeder> {
        std::fs::File::create(path).map_err(io("creating the authority input"))?;
        let path = path.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("khala-chaos-feeder".into())
            .spawn(move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
                let steps = 50usize.min(lines.len().max(1));
                let per = lines.len().div_ceil(steps);
                let started = Instant::now();
                for (i, chunk) in lines.chunks(per.max(1)).enumerate() {
                    let due = started + over.mul_f64(i as f64 / steps as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    f.write_all(&chunk.concat())?;
                    f.flush()?;
                }
                Ok(())
            })
            .map_err(io("starting the feeder"))?;
        Ok(Feeder { handle: Some(handle) })
    }

    /// Writes everything at once, appending to what the file holds already, which must
    /// be the start of `lines`: an authority log only grows, and a followed file that is
    /// rewritten (truncated, even for an instant) stops the mirror as `input_changed`.
    pub fn all_at_once(path: &Path, lines: &[Vec<u8>]) -> Result<()> {
        let all = lines.concat();
        let held = match std::fs::read(path) {
            Ok(held) => held,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("reading the authority input")(e)),
        };
        if !all.starts_with(&held) {
            let detail = format!("{} holds {} bytes that do not begin the log to write", path.display(), held.len());
            return Err(io("appending to the authority input")(std::io::Error::new(std::io::ErrorKind::InvalidInput, detail)));
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io("opening the authority input"))?;
        f.write_all(&all[held.len()..]).map_err(io("appending to the authority input"))
    }

    pub fn done(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    pub fn join(&mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.join().map_err(|_| DrillError::Process("the feeder panicked".into()))?.map_err(io("feeding the authority input"))?;
        }
        Ok(())
    }
}

/// Microseconds since the Unix epoch, as the module's timestamps count.
pub fn unix_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Polls `check` every 50 ms until it is true, or fails after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if check()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            return Err(DrillError::Timeout { what: what.into(), secs: limit.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

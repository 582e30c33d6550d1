//! `khala tail`: a Khala client that prints each applied event as a line, checkpoints,
//! acks, and resumes from its checkpoint after a restart. `--sqlite FILE` also stores
//! every event in a SQLite database that owns the cursors (exactly-once effects: see
//! `khala_client::store::sqlite`), and resumes from it instead of a checkpoint file. `--metrics-addr` serves the
//! client's metrics (docs/METRICS.md); a replay shows a progress bar on a terminal.

use super::Target;
use clap::Args;
use khala_client::health;
use khala_client::{ClientConfig, Event, Handler, HandlerError, SyncClient, Syncer};
use khala_proto::hash::{display, payload_hash};
use khala_proto::v1::ConnectionState;
use khala_client::store::sqlite::{Commit, SqliteStore};
use khala_proto::{StaleCursor, StreamCursor};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub target: Target,
    /// A stream to follow (repeat for more).
    #[arg(long = "stream", required = true)]
    pub streams: Vec<String>,
    /// The checkpoint file (default: one per database and stream set, under the user data dir).
    #[arg(long, conflicts_with = "sqlite")]
    pub checkpoint: Option<PathBuf>,
    /// Store every event, with its stream's cursor in the same transaction, in this SQLite
    /// database, and resume from its cursors (no checkpoint file; health goes to
    /// `FILE.health.json`).
    #[arg(long, value_name = "FILE")]
    pub sqlite: Option<PathBuf>,
    /// When the SQLite store commits: `batch` (at each checkpoint interval) or `event`.
    #[arg(long, value_enum, default_value_t = SqliteCommit::Batch, requires = "sqlite")]
    pub sqlite_commit: SqliteCommit,
    /// Print JSON lines (stream_id, seq, kind, payload_hash, chain_hash).
    #[arg(long)]
    pub json: bool,
    /// Print nothing per event (for measurements).
    #[arg(long)]
    pub quiet: bool,
    /// Exit once every stream is live and caught up with its head, and has stayed so for
    /// a second: a stream's head, as a client reads it (its `stream_view` row), is
    /// refreshed every 250 ms while the stream is published.
    #[arg(long)]
    pub exit_when_live: bool,
    /// Exit after this many events were applied.
    #[arg(long)]
    pub max_events: Option<u64>,
    /// Print a JSON summary to stderr at exit: events, seconds, events/s, peak RSS.
    #[arg(long)]
    pub report: bool,
    /// Do not ack (for identities without the ack scope).
    #[arg(long)]
    pub no_ack: bool,
    /// Serve the client's metrics as Prometheus text on this address, e.g. 127.0.0.1:9466.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Streams that may catch up at once, each holding its replay windows (about 50–65 MB
    /// per stream at 256-byte payloads); the others wait their turn. 0 for no limit.
    #[arg(long, default_value_t = khala_client::config::DEFAULT_REPLAY_SLOTS)]
    pub replay_slots: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteCommit {
    Batch,
    Event,
}

/// Events behind, over all streams, before a replay gets a progress bar (a live burst
/// does not flash one).
const BAR_FROM_LAG: u64 = 1_000;
/// How long `--exit-when-live` waits, caught up throughout, before it exits: longer than
/// the module's `VIEW_EVERY` (250 ms) plus the refresh's delivery, so that a head that
/// trailed is brought up before the client counts itself done.
const LIVE_SETTLE: Duration = Duration::from_secs(1);

/// A replay's progress bar, drawn while the client replays a backlog: on a terminal only
/// (stderr), and only when events are not printed to that terminal too.
struct ReplayBar {
    enabled: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl ReplayBar {
    fn new(quiet: bool) -> Self {
        ReplayBar { enabled: khala_tools::progress::enabled() && (quiet || !std::io::stdout().is_terminal()), bar: None }
    }

    fn show(&mut self, h: &khala_proto::v1::HealthSnapshot) {
        if !self.enabled {
            return;
        }
        let cursor: u64 = h.streams.iter().map(|s| s.cursor).sum();
        let target: u64 = h.streams.iter().map(|s| s.target.max(s.cursor)).sum();
        let replaying = h.state == ConnectionState::Replaying as i32;
        if replaying && (self.bar.is_some() || target - cursor >= BAR_FROM_LAG) {
            let bar = self.bar.get_or_insert_with(|| khala_tools::progress::bar(target, "replaying"));
            bar.set_length(target);
            bar.set_position(cursor);
        } else if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Prints events (after storing them, with `--sqlite`); counts them; asks to stop after
/// `max_events`.
struct Printer {
    store: Option<SqliteStore>,
    json: bool,
    quiet: bool,
    applied: u64,
    max_events: Option<u64>,
    stop: Arc<AtomicBool>,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl Handler for Printer {
    fn apply(&mut self, e: &Event) -> Result<(), HandlerError> {
        if let Some(store) = &mut self.store {
            store.apply(e)?;
        }
        // Once stored, an event must not be offered again (the store would refuse it):
        // a failed print is logged, not retried.
        if let Err(err) = self.print(e) {
            if self.store.is_none() {
                return Err(err);
            }
            log::warn!("printing {}/{}: {err}", e.stream_id, e.seq);
        }
        self.applied += 1;
        if self.max_events.is_some_and(|max| self.applied >= max) {
            self.stop.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn rebootstrap(&mut self, s: &StaleCursor) -> Result<(), HandlerError> {
        if let Some(store) = &mut self.store {
            store.rebootstrap(s)?;
        }
        let reason = khala_client::metrics::reason_name(s.reason);
        let line = json!({ "rebootstrap": {
            "stream_id": s.stream_id, "reason": reason, "requested": s.requested,
            "oldest_available": s.oldest_available, "head": s.head, "epoch": s.epoch } });
        writeln!(self.out, "{line}")?;
        self.out.flush()?;
        Ok(())
    }

    fn persist(&mut self) -> Result<(), HandlerError> {
        // Lines reach stdout before their checkpoint reaches disk. With a store, the
        // store's commit is the durability point and stdout is only a view.
        match &mut self.store {
            Some(store) => {
                store.persist()?;
                if let Err(e) = self.out.flush() {
                    log::warn!("writing to stdout: {e}");
                }
            }
            None => self.out.flush()?,
        }
        Ok(())
    }

    fn cursors(&mut self) -> Result<Option<Vec<StreamCursor>>, HandlerError> {
        match &mut self.store {
            Some(store) => store.cursors(),
            None => Ok(None),
        }
    }

    /// The store's fsync runs on the client's checkpoint thread.
    fn syncer(&mut self) -> Option<Syncer> {
        self.store.as_mut()?.syncer()
    }

    fn caught_up(&mut self) {
        // Live events are shown as they are applied, not at the next checkpoint (up to
        // 20 ms later); a replay still writes in large buffered runs.
        if let Err(e) = self.out.flush() {
            log::warn!("writing to stdout: {e}");
        }
    }
}

impl Printer {
    fn print(&mut self, e: &Event) -> Result<(), HandlerError> {
        if !self.quiet {
            if self.json {
                let line = json!({
                    "stream_id": e.stream_id,
                    "seq": e.seq,
                    "kind": e.kind,
                    "payload_hash": display(&payload_hash(&e.payload)),
                    "chain_hash": display(&e.chain_hash),
                });
                writeln!(self.out, "{line}")?;
            } else {
                writeln!(self.out, "{} {} {} {}", e.stream_id, e.seq, e.kind, String::from_utf8_lossy(&e.payload))?;
            }
        }
        Ok(())
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn default_checkpoint(database: &str, streams: &[String]) -> PathBuf {
    let mut sorted = streams.to_vec();
    sorted.sort();
    let digest = khala_proto::hash::payload_hash(sorted.join("\n").as_bytes());
    khala_tools::paths::data_home().join("khala").join("client").join(format!("{database}-{}.checkpoint", &hex::encode(digest)[..12]))
}

/// Peak resident set size of this process, in MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

pub fn run(args: TailArgs) -> anyhow::Result<()> {
    let token_file = args.target.token_file.clone().ok_or_else(|| anyhow::anyhow!("no token: pass --token-file or set KHALA_TOKEN_FILE"))?;
    let checkpoint = match (&args.sqlite, &args.checkpoint) {
        (Some(db), _) => db.clone(),
        (None, Some(file)) => file.clone(),
        (None, None) => default_checkpoint(&args.target.database, &args.streams),
    };
    let store = match &args.sqlite {
        Some(path) => {
            let commit = if args.sqlite_commit == SqliteCommit::Event { Commit::Event } else { Commit::Batch };
            Some(SqliteStore::open(path, commit).map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?)
        }
        None => None,
    };
    let mut config = ClientConfig::new(&args.target.server, &args.target.database, token_file, &checkpoint);
    config.streams = args.streams.clone();
    config.ack = !args.no_ack;
    config.replay_slots = args.replay_slots;
    let stop = Arc::new(AtomicBool::new(false));
    let printer = Printer { store, json: args.json, quiet: args.quiet, applied: 0, max_events: args.max_events, stop: stop.clone(), out: std::io::BufWriter::new(std::io::stdout()) };
    if let Some(addr) = args.metrics_addr {
        // Before the client exists: a corrupt checkpoint is counted when it is loaded.
        khala_tools::prometheus::install(addr, None)?;
    }
    let mut client = SyncClient::new(config, printer)?;
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
    }
    let health = client.health();
    let watcher_stop = stop.clone();
    let exit_when_live = args.exit_when_live;
    let mut bar = ReplayBar::new(args.quiet);
    // Since when every stream has been caught up, without a break.
    let live_since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watcher_live_since = live_since.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        if INTERRUPTED.load(Ordering::Relaxed) {
            watcher_stop.store(true, Ordering::Relaxed);
        }
        let h = health.get();
        bar.show(&h);
        let caught_up = h.state == ConnectionState::Live as i32 && h.streams.iter().all(|s| s.lag == 0);
        let since = {
            let mut since = watcher_live_since.lock().unwrap();
            *since = if caught_up { Some(since.unwrap_or_else(Instant::now)) } else { None };
            *since
        };
        if exit_when_live && since.is_some_and(|t| t.elapsed() >= LIVE_SETTLE) {
            watcher_stop.store(true, Ordering::Relaxed);
        }
        if watcher_stop.load(Ordering::Relaxed) {
            bar.show(&Default::default());
            return;
        }
    });
    let started = Instant::now();
    let result = client.run(&stop);
    // With --exit-when-live, the time until it caught up for good, not the second after.
    let caught_up_at = live_since.lock().unwrap().filter(|_| exit_when_live);
    let secs = caught_up_at.unwrap_or_else(Instant::now).saturating_duration_since(started).as_secs_f64();
    let applied = client.handler().applied;
    if args.report {
        let report = json!({
            "applied": applied,
            "secs": (secs * 1000.0).round() / 1000.0,
            "events_per_sec": (applied as f64 / secs).round(),
            "peak_rss_mib": (peak_rss_mib() * 10.0).round() / 10.0,
            "cpu_secs": (cpu_secs() * 1000.0).round() / 1000.0,
            "cursors": client.cursors(),
            "health": health::to_json(&client.health().get()),
            "sqlite": client.handler().store.as_ref().map(|s| {
                let st = s.stats();
                json!({ "applied": st.applied, "committed": st.committed, "commits": st.commits, "rolled_back": st.rolled_back })
            }),
        });
        eprintln!("{report}");
    }
    result?;
    Ok(())
}

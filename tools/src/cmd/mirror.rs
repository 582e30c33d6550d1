//! `khala mirror` (authority events into the module, docs/MIRROR.md) and `khala
//! gen-events` (synthetic input for measuring it). The work is in `khala_tools::mirror`;
//! this file turns flags into its `Config`, handles Ctrl-C and prints the summary.

use super::Target;
use clap::{Args, ValueEnum};
use khala_tools::mirror::{self, Config, Input, OnDivergence, OnGap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MirrorArgs {
    #[command(flatten)]
    pub target: MirrorTarget,
    /// A JSONL file of AuthorityEvents to mirror (default: stdin, spooled to the state dir).
    #[arg(long, conflicts_with = "postgres")]
    pub input: Option<PathBuf>,
    /// Mirror the Postgres outbox at this connection string instead
    /// (`postgres://user@host:port/db` or `host=.. port=.. user=.. dbname=..`).
    #[arg(long)]
    pub postgres: Option<String>,
    /// Apply the outbox schema (tools/migrations) to the --postgres database, then exit.
    #[arg(long, requires = "postgres")]
    pub migrate: bool,
    /// Stop once the outbox is mirrored and durable, instead of following it.
    #[arg(long, requires = "postgres")]
    pub once: bool,
    /// The outbox cursor's row in khala_mirror_cursor (default: the database name).
    #[arg(long, requires = "postgres")]
    pub cursor_name: Option<String>,
    /// Keep reading the --input file as it grows.
    #[arg(long, conflicts_with = "postgres")]
    pub follow: bool,
    /// Cursor, stdin spool, dead letters and lock (default: one dir per database and input
    /// under the user's data dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Most events in one publish call.
    #[arg(long, default_value_t = 1000)]
    pub batch_events: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub batch_ms: u64,
    /// How long after an acknowledgement a head read confirms it durable (the engine fsyncs
    /// every 500 ms).
    #[arg(long, default_value_t = 2000)]
    pub durable_after_ms: u64,
    /// The dead-letter file (default: dead-letter.jsonl in the state dir).
    #[arg(long)]
    pub dead_letter: Option<PathBuf>,
    /// What a hole in a stream's seqs does: hold the stream, or skip it with a marker event.
    #[arg(long, value_enum, default_value_t = GapPolicy::Hold)]
    pub on_gap: GapPolicy,
    /// What an event the module holds that differs from the authority's does: hold the
    /// stream, or end the run.
    #[arg(long, value_enum, default_value_t = DivergencePolicy::Hold)]
    pub on_divergence: DivergencePolicy,
    /// Run with the database owner's token. The mirror is meant to run as a publisher
    /// identity with publish grants (least privilege); the owner can replace the module.
    #[arg(long)]
    pub allow_owner: bool,
    /// Largest canonical payload accepted, in bytes (the module's default limit).
    #[arg(long, default_value_t = khala_proto::limits::DEFAULT_MAX_PAYLOAD_BYTES as usize)]
    pub max_payload_bytes: usize,
    /// A topic → stream rule, `TOPIC_PREFIX*TOPIC_SUFFIX=STREAM_PREFIX*STREAM_SUFFIX`
    /// (e.g. `run:*:events=runtime.run.*.events`); repeat for more. Given any, they
    /// replace the default rules (docs/MIRROR.md).
    #[arg(long = "map")]
    pub map: Vec<String>,
    /// Stream prefix of topics no rule matches (`:` and `.` swapped after it).
    #[arg(long, default_value = "runtime.topic.")]
    pub general_prefix: String,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Publish calls in flight at once (at most one per stream).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// How publish calls reach the module: `sdk` (WebSocket, BSATN, pipelined on one
    /// connection) or `http` (JSON, one request per call).
    #[arg(long, value_enum, default_value_t = mirror::publisher::Transport::Sdk)]
    pub transport: mirror::publisher::Transport,
    /// How often the outbox is polled when no notification arrives, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
}

/// Where the mirror publishes, and as whom: the mirror's own publisher identity (`khala up`
/// writes its token file to `KHALA_MIRROR_TOKEN_FILE`), never the owner by default.
#[derive(Args, Debug, Clone)]
pub struct MirrorTarget {
    /// Server URL.
    #[arg(long, env = "KHALA_SERVER_URL", default_value = "http://127.0.0.1:3000")]
    pub server: String,
    /// Database name.
    #[arg(long, env = "KHALA_DATABASE", default_value = "khala-dev")]
    pub database: String,
    /// File holding the mirror identity's token.
    #[arg(long, env = "KHALA_MIRROR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl MirrorTarget {
    fn token(&self) -> anyhow::Result<String> {
        let target = Target { server: self.server.clone(), database: self.database.clone(), token_file: self.token_file.clone() };
        target.token().map_err(|_| anyhow::anyhow!("no mirror token: pass --token-file or set KHALA_MIRROR_TOKEN_FILE (`khala up` makes a mirror identity)"))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GapPolicy {
    Hold,
    Skip,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DivergencePolicy {
    Hold,
    Fail,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The first Ctrl-C (or SIGTERM) asks for a clean stop; the second one ends the process.
fn stop_on_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESETHAND, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            log::warn!("cannot handle {signal}: {e}");
        }
    }
}

pub fn run(args: MirrorArgs) -> anyhow::Result<()> {
    if args.migrate {
        let url = args.postgres.as_deref().unwrap_or_default();
        let applied = mirror::outbox::migrate(url)?;
        match applied.is_empty() {
            true => println!("the outbox schema is up to date"),
            false => println!("applied {}", applied.join(", ")),
        }
        return Ok(());
    }
    let input = match (&args.postgres, &args.input) {
        (Some(url), _) => Input::Postgres { url: url.clone(), cursor_name: args.cursor_name.clone().unwrap_or_else(|| args.target.database.clone()) },
        (None, Some(path)) => Input::File(path.clone()),
        (None, None) => Input::Stdin,
    };
    let mapping: &'static mirror::mapping::Mapping = if args.map.is_empty() && args.general_prefix == "runtime.topic." {
        &mirror::mapping::DEFAULT_MAPPING
    } else {
        let rules = args.map.iter().map(|r| mirror::mapping::Rule::parse(r)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
        let rules = if rules.is_empty() { mirror::mapping::DEFAULT_MAPPING.rules().to_vec() } else { rules };
        Box::leak(Box::new(mirror::mapping::Mapping::new(rules, &args.general_prefix).map_err(anyhow::Error::msg)?))
    };
    let config = Config {
        server: args.target.server.clone(),
        database: args.target.database.clone(),
        token: args.target.token()?,
        state_dir: args.state_dir.clone().unwrap_or_else(|| mirror::default_state_dir(&args.target.database, &input)),
        follow: if args.postgres.is_some() { !args.once } else { args.follow },
        input,
        batch_events: args.batch_events,
        batch_wait: Duration::from_millis(args.batch_ms),
        durable_after: Duration::from_millis(args.durable_after_ms),
        dead_letter: args.dead_letter.clone(),
        on_gap: match args.on_gap {
            GapPolicy::Hold => OnGap::Hold,
            GapPolicy::Skip => OnGap::Skip,
        },
        on_divergence: match args.on_divergence {
            DivergencePolicy::Hold => OnDivergence::Hold,
            DivergencePolicy::Fail => OnDivergence::Fail,
        },
        allow_owner: args.allow_owner,
        max_payload_bytes: args.max_payload_bytes,
        mapping,
        metrics_addr: args.metrics_addr,
        parallel: args.parallel,
        transport: args.transport,
        poll_interval: Duration::from_millis(args.poll_ms),
        stop: &STOP,
    };
    stop_on_signals();
    let report = mirror::run(config)?;
    eprintln!("{}", report.summary.text());
    println!("{}", serde_json::to_string(&report.summary)?);
    match report.error {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

#[derive(Args, Debug)]
pub struct GenEventsArgs {
    /// How many events.
    #[arg(long)]
    pub count: u64,
    /// Canonical payload size of each event, in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// How many topics (`run:<n>:events`) the events are spread over, round-robin.
    #[arg(long, default_value_t = 4)]
    pub topics: u32,
    /// Seed of the payload noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Writes synthetic AuthorityEvents as JSONL to stdout.
pub fn gen_events(args: GenEventsArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    mirror::gen::write_events(&mut out, args.count, args.payload_bytes, args.topics, args.seed)?;
    Ok(())
}

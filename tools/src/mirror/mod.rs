//! `khala mirror`: authority events into the module's `publish` reducer, losing nothing
//! and, in effect, publishing nothing twice (docs/MIRROR.md).
//!
//! # Layout
//! - [`source`]: the source interface and the JSONL file source; [`spool`]: stdin made
//!   replayable; [`outbox`]: the Postgres outbox and its migration.
//! - [`event`]: parsing and checking an `AuthorityEvent`; [`mapping`]: topic ↔ stream id.
//! - [`batcher`]: per-stream lanes and batches; [`publisher`]: the publish calls.
//! - [`durability`]: acknowledgements → durable cursor; [`cursor`]: the cursor file.
//! - [`deadletter`]: refused events; [`metrics`]: counters, gauges, the summary.
//! - [`run`]: the loop that ties them together (its retry backoff is the client's,
//!   `khala_client::backoff`); [`error`], [`gen`].

pub mod batcher;
pub mod cursor;
pub mod deadletter;
pub mod durability;
pub mod error;
pub mod event;
pub mod gen;
pub mod mapping;
pub mod metrics;
pub mod outbox;
pub mod publisher;
pub mod run;
pub mod source;
pub mod spool;
pub mod verify;

pub use error::{MirrorError, Result};
pub use metrics::Summary;

use event::Limits;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Where the events come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// JSONL on stdin, spooled to disk first.
    Stdin,
    /// A JSONL file, read in place.
    File(PathBuf),
    /// The `khala_outbox` table, with the cursor row `cursor_name`.
    Postgres { url: String, cursor_name: String },
}

/// What to do when a stream's seqs have a hole (docs/MIRROR.md, "Gaps").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnGap {
    /// Stop publishing the stream and report it (the default).
    Hold,
    /// Publish a `khala.gap` marker in place of each missing event.
    Skip,
}

/// What to do when an event the module holds differs from the authority's
/// (`authority_divergence`, docs/MIRROR.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDivergence {
    /// Stop publishing the stream and report it (the default); the cursor stays before it.
    Hold,
    /// End the run with the error.
    Fail,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: String,
    pub database: String,
    pub token: String,
    pub input: Input,
    pub state_dir: PathBuf,
    pub follow: bool,
    pub batch_events: usize,
    pub batch_wait: Duration,
    pub durable_after: Duration,
    pub dead_letter: Option<PathBuf>,
    pub on_gap: OnGap,
    pub on_divergence: OnDivergence,
    /// Run even with the database owner's token.
    pub allow_owner: bool,
    pub max_payload_bytes: usize,
    /// How topics name streams (`mapping::DEFAULT_MAPPING` unless configured).
    pub mapping: &'static mapping::Mapping,
    pub metrics_addr: Option<SocketAddr>,
    pub parallel: usize,
    /// How publish calls reach the module.
    pub transport: publisher::Transport,
    pub poll_interval: Duration,
    /// Set (by Ctrl-C) to stop after what was read is durable.
    pub stop: &'static AtomicBool,
}

/// How a run ended: its summary, and the error that ended it early, if any.
#[derive(Debug)]
pub struct Report {
    pub summary: Summary,
    pub error: Option<MirrorError>,
}

/// The default state dir: one per database and input, under the user's data dir.
pub fn default_state_dir(database: &str, input: &Input) -> PathBuf {
    let short = |text: &str| hex::encode(&Sha256::digest(text.as_bytes())[..6]);
    let key = match input {
        Input::Stdin => "stdin".to_string(),
        Input::File(path) => format!("file-{}", short(&std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()).to_string_lossy())),
        Input::Postgres { cursor_name, .. } => format!("postgres-{}", short(cursor_name)),
    };
    crate::paths::data_home().join("khala").join("mirror").join(database).join(key)
}

/// Takes the state dir's lock, so two mirrors never share one cursor. The lock goes with
/// the process, however it ends.
fn lock_state_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| MirrorError::io(format!("creating the state dir {}", dir.display()), e))?;
    let file = File::create(dir.join("lock")).map_err(|e| MirrorError::io("creating the state dir lock", e))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(MirrorError::StateLocked { dir: dir.into() });
    }
    Ok(file)
}

/// Longest wait for one HTTP call to the server. A half-open connection (accepted, never
/// answered) holds a call until this runs out; the call is then transient and retried
/// after a reconcile. Was reqwest's 120 s, which stalled the mirror for two minutes per
/// blackholed connection in the network drill (docs/RELIABILITY.md); a publish of a full
/// batch takes milliseconds.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the mirror until its input is drained and durable (or it is stopped).
pub fn run(config: Config) -> Result<Report> {
    if config.batch_events == 0 || config.parallel == 0 {
        return Err(MirrorError::Usage("--batch-events and --parallel must be at least 1".into()));
    }
    if config.durable_after < Duration::from_millis(600) {
        log::warn!("--durable-after-ms {} is below the engine's 500 ms sync interval plus margin: a server crash may lose events the cursor has passed", config.durable_after.as_millis());
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    if let Some(addr) = config.metrics_addr {
        metrics::serve(addr)?;
    }
    let limits = Limits { max_payload_bytes: config.max_payload_bytes, mapping: config.mapping };
    let (source, dead_letter_id): (Box<dyn source::Source>, String) = match &config.input {
        Input::Stdin => {
            // The spool thread reads its own copy of fd 0, unbuffered, so that polling the
            // descriptor tells whether more input is waiting.
            // SAFETY: dup of fd 0; the new descriptor is owned by the File alone.
            let fd = unsafe { libc::dup(std::io::stdin().as_raw_fd()) };
            if fd < 0 {
                return Err(MirrorError::io("duplicating stdin", std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            (Box::new(spool::SpoolSource::open(&config.state_dir, file, 64 << 20, limits)?), "stdin-spool".into())
        }
        Input::File(path) => {
            let file = source::FileSource::open(path, &config.state_dir, config.follow, limits)?;
            let id = source::Source::describe(&file);
            (Box::new(file), id)
        }
        Input::Postgres { url, cursor_name } => {
            let outbox = outbox::Outbox::open(url, cursor_name, config.follow, config.poll_interval, limits)?;
            (Box::new(outbox), format!("postgres:{cursor_name}"))
        }
    };
    let dead_letter = config.dead_letter.clone().unwrap_or_else(|| config.state_dir.join("dead-letter.jsonl"));
    let dead = deadletter::DeadLetters::open(&dead_letter, &dead_letter_id)?;
    let settings = run::Settings {
        batch_events: config.batch_events,
        batch_wait: config.batch_wait,
        durable_after: config.durable_after,
        on_gap: config.on_gap,
        on_divergence: config.on_divergence,
        allow_owner: config.allow_owner,
        parallel: config.parallel,
        transport: config.transport,
        stop: config.stop,
    };
    let start = source.start();
    let mut mirror = run::Mirror::new(settings, crate::api::Api::with_timeout(&config.server, REQUEST_TIMEOUT), config.database.clone(), config.token.clone(), source, dead);
    log::info!("mirroring {} into {} database {} from {:?} (state in {})", mirror.source_name(), config.server, config.database, start, config.state_dir.display());
    let error = mirror.run().err();
    let summary = mirror.stats.summary(mirror.source_name(), mirror.durable(), mirror.held(), mirror.dead_letter_path());
    let error = error.or_else(|| {
        let held = &summary.held_streams;
        (!held.is_empty()).then(|| MirrorError::StreamsHeld { streams: held.clone() })
    });
    Ok(Report { summary, error })
}

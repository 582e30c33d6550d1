//! `khala bench`: measurements that print their figures and the command that made them.
//! They run against a private server on a free loopback port, never the one `khala up`
//! started, and are not part of the test suite.

use anyhow::Context;
use clap::{Args, Subcommand};
use khala_tools::api::{publish_event_arg, Api};
use khala_tools::engine::Engine;
use khala_tools::grants;
use khala_tools::server::{Lifetime, ServerDir, ServerProcess};
use rand::RngCore;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../bench/all.rs"]
mod all;
#[path = "../bench/chart.rs"]
mod chart;
#[path = "../bench/latency.rs"]
mod latency;
#[path = "../bench/mirror.rs"]
mod mirror;
#[path = "../bench/server_account.rs"]
mod server_account;
#[path = "../bench/redis.rs"]
mod redis_base;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand, Debug)]
pub enum Which {
    /// Publish a backlog, then time a fresh client (`khala tail`) replaying it to live.
    Replay(ReplayArgs),
    /// Publish throughput through the `publish` reducer, over the SDK and HTTP JSON, with
    /// a bare insert-only module as the baseline in the same run.
    Publish(PublishArgs),
    /// Low-rate publishing (one event per call): publish rate over time and segment
    /// rows, with compaction on and off.
    SmallSegments(SmallArgs),
    /// Every throughput scenario in one run with both baselines (the bare module and Redis
    /// Streams): batched and unbatched publish, the 0→N curve, replay; writes
    /// `bench.md`, `bench.json` and `bench.svg` under `--out`.
    All(all::AllArgs),
    /// How long `publish` runs inside the module per call, as the server reports it
    /// (`spacetime-execution-duration-micros`): the module's own work without transport.
    /// Compares modules (for example ablation builds) on one server, alternating them,
    /// against the bare module's one-row `insert` of the same segment.
    ReducerTime(ReducerTimeArgs),
    /// `khala mirror` end to end (JSONL file, and with `--postgres` the outbox → the
    /// module, durable cursor on) over the SDK and HTTP transports, against the bare
    /// module fed the same events in the same run.
    Mirror(mirror::MirrorBenchArgs),
    /// Publish → client handler and publish → durable checkpoint at a steady rate to N
    /// subscribers of one stream, with the bare module's fan-out as the engine's figure
    /// (from a public table, and from one behind a row-level-security rule).
    Latency(latency::LatencyArgs),
}

#[derive(Args, Debug)]
pub struct ReducerTimeArgs {
    /// A module to time, as `NAME=PATH.wasm`; repeat to compare. Without any, the
    /// module built from this checkout.
    #[arg(long = "wasm", value_name = "NAME=PATH")]
    pub wasm: Vec<String>,
    /// Calls per stream; the figure is their median.
    #[arg(long, default_value_t = 30)]
    pub calls: u64,
    /// Events per call.
    #[arg(long, default_value_t = 1_000)]
    pub batch: u64,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Rounds over the modules, each on a fresh stream; modules alternate within a round.
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// The reducers to time (each module must have them); repeat to compare.
    #[arg(long = "reducer", value_enum, default_values_t = [IngestReducer::Publish, IngestReducer::PublishSegment])]
    pub reducers: Vec<IngestReducer>,
}

/// The module's two ways in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestReducer {
    /// `publish`: a list of `PublishEvent`s.
    Publish,
    /// `publish_segment`: one segment, encoded as the module stores it.
    PublishSegment,
}

impl IngestReducer {
    fn name(self) -> &'static str {
        match self {
            IngestReducer::Publish => "publish",
            IngestReducer::PublishSegment => "publish_segment",
        }
    }
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Events per run.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Events per call.
    #[arg(long, default_value_t = 1_000)]
    pub batch: u64,
    /// Streams, each with one call in flight.
    #[arg(long, default_value_t = 4)]
    pub streams: u64,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Also report the rate over each successive slice of this many events (the curve of
    /// rate against events already held); 0 for none.
    #[arg(long, default_value_t = 0)]
    pub curve_every: u64,
    /// Leave out the HTTP JSON run (it is the slowest; for long runs).
    #[arg(long)]
    pub skip_http: bool,
    /// SDK connections per publisher, the streams dealt among them (the bare module's
    /// publisher gets as many).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
}

/// A run's rate, and its rate per slice of `curve_every` events.
struct Rate {
    events_per_sec: f64,
    /// `(events held when the slice ended, events/s over the slice)`.
    curve: Vec<(u64, f64)>,
}

#[derive(Args, Debug)]
pub struct SmallArgs {
    /// One-event publishes per run.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// Publishing threads (one stream each).
    #[arg(long, default_value_t = 4)]
    pub threads: u64,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Events in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Random payload bytes per event.
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Events per publish call (one segment each).
    #[arg(long, default_value_t = 1_000)]
    pub batch: u64,
    /// Also time a second fresh client storing the backlog in a SQLite store
    /// (`khala tail --sqlite`, events and cursors in one transaction per batch).
    #[arg(long)]
    pub sqlite: bool,
    /// The SQLite store's commits: `batch` or `event` (one transaction per event).
    #[arg(long, value_enum, default_value_t = super::tail::SqliteCommit::Batch, requires = "sqlite")]
    pub sqlite_commit: super::tail::SqliteCommit,
    /// Streams the backlog is spread over (the client follows them all).
    #[arg(long, default_value_t = 1)]
    pub streams: u64,
    /// The client's `--replay-slots`: streams that catch up at once (0: no limit).
    #[arg(long, default_value_t = khala_client::config::DEFAULT_REPLAY_SLOTS)]
    pub replay_slots: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Which::Replay(a) => replay(a),
        Which::SmallSegments(a) => small_segments(a),
        Which::Publish(a) => publish(a),
        Which::All(a) => all::all(a),
        Which::ReducerTime(a) => reducer_time(a),
        Which::Mirror(a) => mirror::mirror(a),
        Which::Latency(a) => latency::latency(a),
    }
}

/// A private server in a temp dir, killed when this process ends.
pub(super) fn private_server() -> anyhow::Result<(ServerProcess, tempfile::TempDir)> {
    let engine = Engine::locate()?;
    let dir = tempfile::Builder::new().prefix("khala-bench-").tempdir()?;
    let server_dir = ServerDir::open_or_create(dir.path())?;
    let server = ServerProcess::start_on_a_free_port(&engine, &server_dir, Lifetime::TiedToThisProcess, Duration::from_secs(60))?;
    Ok((server, dir))
}

fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.streams >= 1, "--streams must be at least 1");
    let mut command = format!("khala bench replay --events {} --payload-bytes {} --batch {}", args.events, args.payload_bytes, args.batch);
    if args.streams > 1 || args.replay_slots != khala_client::config::DEFAULT_REPLAY_SLOTS {
        command.push_str(&format!(" --streams {} --replay-slots {}", args.streams, args.replay_slots));
    }
    if args.sqlite {
        command.push_str(&format!(" --sqlite --sqlite-commit {}", if args.sqlite_commit == super::tail::SqliteCommit::Event { "event" } else { "batch" }));
    }
    let (server, dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    api.publish_module("bench", &wasm, &owner.token, false)?;
    let streams: Vec<String> = if args.streams == 1 { vec!["bench.replay".into()] } else { (0..args.streams).map(|i| format!("bench.replay.{i}")).collect() };
    let per_stream = args.events / args.streams;
    let events_total = per_stream * args.streams;
    let stream_refs: Vec<&str> = streams.iter().map(String::as_str).collect();
    grants::make_publisher(&api, "bench", &owner.token, &owner.identity, &stream_refs, 24 * 3600)?;

    let started = Instant::now();
    let progress = khala_tools::progress::bar(events_total, "publishing the history");
    let mut rng = rand::thread_rng();
    let mut payload = vec![0u8; args.payload_bytes];
    for stream in &streams {
        let mut seq = 1;
        while seq <= per_stream {
            let upto = (seq + args.batch).min(per_stream + 1);
            let events: Vec<Value> = (seq..upto)
                .map(|s| {
                    rng.fill_bytes(&mut payload);
                    publish_event_arg(&format!("k{s}"), "bench", &payload, Some(s), 0)
                })
                .collect();
            api.call("bench", "publish", json!([stream, events]), &owner.token)?;
            progress.inc(upto - seq);
            seq = upto;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let reader = api.new_identity()?;
    for stream in &streams {
        api.call("bench", "grant", json!([reader.identity_arg(), stream, ["subscribe"], 3600]), &owner.token)?;
    }
    let token = dir.path().join("reader.token");
    std::fs::write(&token, &reader.token)?;
    let slots = args.replay_slots.to_string();
    let replay_with = |what: &str, store: &[&str]| {
        let store: Vec<&str> = store.iter().copied().chain(["--replay-slots", slots.as_str()]).collect();
        replay_client(&server.url(), "bench", &token, &streams, events_total, what, &store)
    };
    let checkpoint = dir.path().join("replay.checkpoint");
    let report = replay_with("a client", &["--checkpoint", &checkpoint.to_string_lossy()])?;
    let mut result = json!({
        "command": command,
        "events": events_total,
        "streams": args.streams,
        "replay_slots": args.replay_slots,
        "payload_bytes": args.payload_bytes,
        "publish_events_per_sec": (events_total as f64 / publish_secs).round(),
        "replay_secs": report["secs"],
        "replay_events_per_sec": report["events_per_sec"],
        "client_peak_rss_mib": report["peak_rss_mib"],
        "client_cpu_secs": report["cpu_secs"],
    });
    if args.sqlite {
        let db = dir.path().join("replay.db");
        let commit = if args.sqlite_commit == super::tail::SqliteCommit::Event { "event" } else { "batch" };
        let store = replay_with("a client with a SQLite store", &["--sqlite", &db.to_string_lossy(), "--sqlite-commit", commit])?;
        let store_db = khala_client::store::sqlite::SqliteStore::open_read_only(&db)?;
        for stream in &streams {
            let stored = store_db.extent(stream)?;
            anyhow::ensure!(stored == (per_stream, per_stream), "the SQLite store holds {stored:?} (events, last seq) of {stream}, not {per_stream}");
        }
        result["sqlite"] = json!({
            "commit": commit,
            "replay_secs": store["secs"],
            "replay_events_per_sec": store["events_per_sec"],
            "client_peak_rss_mib": store["peak_rss_mib"],
            "client_cpu_secs": store["cpu_secs"],
            "commits": store["sqlite"]["commits"],
            "db_mib": ((std::fs::metadata(&db)?.len() as f64 / 1_048_576.0) * 10.0).round() / 10.0,
        });
    }
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Runs a fresh `khala tail` over `streams` of `db` until it is live, checks it applied
/// `expected` events, and returns its report (events/s, peak RSS, CPU). `store` picks
/// where it keeps its cursors (`--checkpoint FILE` or `--sqlite FILE ...`).
fn replay_client(url: &str, db: &str, token: &Path, streams: &[String], expected: u64, what: &str, store: &[&str]) -> anyhow::Result<Value> {
    let replaying = khala_tools::progress::spinner(format!("{what} replays {expected} events"));
    let mut tail = std::process::Command::new(std::env::current_exe()?);
    tail.args(["tail", "--quiet", "--exit-when-live", "--report", "--no-ack"]);
    for stream in streams {
        tail.args(["--stream", stream]);
    }
    let out = tail
        .args(["--server", url, "--database", db])
        .arg("--token-file")
        .arg(token)
        .args(store)
        .env("RUST_LOG", khala_tools::CHILD_LOG_FILTER)
        .output()
        .context("running khala tail")?;
    replaying.finish_and_clear();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = stderr.lines().rev().find_map(|l| serde_json::from_str(l).ok()).with_context(|| format!("no report from khala tail:\n{stderr}"))?;
    let applied = report["applied"].as_u64().unwrap_or(0);
    anyhow::ensure!(out.status.success() && applied == expected, "the replay applied {applied} of {expected} events:\n{stderr}");
    Ok(report)
}

/// One run of `small_segments`: the publish rate of each tenth of the run and the
/// segment rows left at the end.
fn small_run(api: &Api, db: &str, token: &str, args: &SmallArgs) -> anyhow::Result<Value> {
    let per_thread = args.events / args.threads;
    let tenth = (per_thread / 10).max(1);
    let rates: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let stream = format!("bench.small.{t}");
                    let mut rates = Vec::new();
                    let mut slice = Instant::now();
                    for seq in 1..=per_thread {
                        let event = publish_event_arg(&format!("k{seq}"), "bench", &[b'x'; 256], Some(seq), 0);
                        api.call(db, "publish", json!([stream, [event]]), token)?;
                        if seq % tenth == 0 {
                            rates.push(tenth as f64 / slice.elapsed().as_secs_f64());
                            slice = Instant::now();
                        }
                    }
                    Ok(rates)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("publisher thread")).collect::<anyhow::Result<Vec<_>>>()
    })?;
    // Events/s of all threads together, per tenth of the run.
    let slices = rates.iter().map(Vec::len).min().unwrap_or(0);
    let per_slice: Vec<f64> = (0..slices).map(|i| rates.iter().map(|r| r[i]).sum::<f64>().round()).collect();
    std::thread::sleep(Duration::from_secs(6));
    let segments = api.sql(db, "SELECT id FROM stream_segment", token)?.rows.len();
    Ok(json!({ "events_per_sec_by_tenth": per_slice, "segment_rows_at_end": segments }))
}

fn small_segments(args: SmallArgs) -> anyhow::Result<()> {
    let command = format!("khala bench small-segments --events {} --threads {}", args.events, args.threads);
    let (server, _dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let mut runs = serde_json::Map::new();
    for (label, min_age) in [("compaction-off", u32::MAX as u64), ("compaction-on", 0)] {
        api.publish_module(label, &wasm, &owner.token, false)?;
        api.call(label, "set_compaction", json!([min_age]), &owner.token)?;
        grants::make_publisher(&api, label, &owner.token, &owner.identity, &["bench.*"], 24 * 3600)?;
        runs.insert(label.into(), small_run(&api, label, &owner.token, &args)?);
    }
    println!("{}", serde_json::to_string_pretty(&json!({ "command": command, "runs": runs }))?);
    Ok(())
}

/// `n` events with random payloads, seqs from `from`.
fn sdk_events(from: u64, n: u64, payload_bytes: usize, rng: &mut impl RngCore) -> Vec<khala_client::module_bindings::PublishEvent> {
    segment_events(from, n, payload_bytes, rng)
        .into_iter()
        .map(|e| khala_client::module_bindings::PublishEvent { idempotency_key: e.idempotency_key, kind: e.kind, payload: e.payload, authority_seq: Some(e.seq), occurred_at_micros: 0 })
        .collect()
}

/// The same events encoded as one segment (what the bare module and `publish_segment` take).
fn segment_data(from: u64, n: u64, payload_bytes: usize, rng: &mut impl RngCore) -> Vec<u8> {
    khala_proto::segment::encode(segment_events(from, n, payload_bytes, rng))
}

/// The same events as segment events.
fn segment_events(from: u64, n: u64, payload_bytes: usize, rng: &mut impl RngCore) -> Vec<khala_proto::SegmentEvent> {
    (from..from + n)
        .map(|seq| {
            let mut payload = vec![0u8; payload_bytes];
            rng.fill_bytes(&mut payload);
            khala_proto::SegmentEvent { seq, kind: "bench".into(), payload, idempotency_key: format!("k{seq}"), occurred_at_micros: 0 }
        })
        .collect()
}

/// The same events in the server's JSON encoding, for `publish` over HTTP.
fn json_events(from: u64, n: u64, payload_bytes: usize, rng: &mut impl RngCore) -> Vec<Value> {
    sdk_events(from, n, payload_bytes, rng).into_iter().map(|e| publish_event_arg(&e.idempotency_key, &e.kind, &e.payload, e.authority_seq, 0)).collect()
}

/// Keeps one call in flight on each of `args.streams` streams until `args.events` events
/// are sent, and returns events per second. `send(stream, first_seq, n)` sends a call of
/// `n` events; `next` waits for an outcome.
fn drive(
    label: &str,
    args: &PublishArgs,
    mut send: impl FnMut(&str, u64, u64) -> anyhow::Result<()>,
    next: impl Fn(Duration) -> Option<khala_tools::sdk_publish::Outcome>,
) -> anyhow::Result<Rate> {
    use khala_tools::sdk_publish::Outcome;
    let per_stream = args.events / args.streams;
    let progress = khala_tools::progress::bar(per_stream * args.streams, label);
    let mut next_seq: Vec<u64> = vec![1; args.streams as usize];
    let started = Instant::now();
    let (mut committed, mut slice_start, mut slice_events) = (0u64, started, 0u64);
    let mut curve = Vec::new();
    // The size of each stream's call in flight.
    let mut sent: Vec<u64> = vec![0; args.streams as usize];
    let mut in_flight = 0;
    for (s, n) in next_seq.iter_mut().enumerate() {
        send(&format!("bench.pub.{s}"), *n, args.batch.min(per_stream))?;
        sent[s] = args.batch.min(per_stream);
        *n += sent[s];
        in_flight += 1;
    }
    while in_flight > 0 {
        match next(Duration::from_secs(30)) {
            Some(Outcome::Committed { stream_id }) => {
                in_flight -= 1;
                let s: usize = stream_id.rsplit('.').next().and_then(|n| n.parse().ok()).context("stream index")?;
                committed += sent[s];
                slice_events += sent[s];
                progress.inc(sent[s]);
                if args.curve_every > 0 && slice_events >= args.curve_every {
                    curve.push((committed, (slice_events as f64 / slice_start.elapsed().as_secs_f64()).round()));
                    (slice_start, slice_events) = (Instant::now(), 0);
                }
                if next_seq[s] <= per_stream {
                    let n = args.batch.min(per_stream - next_seq[s] + 1);
                    send(&stream_id, next_seq[s], n)?;
                    sent[s] = n;
                    next_seq[s] += n;
                    in_flight += 1;
                }
            }
            Some(Outcome::Failed { stream_id, error }) => anyhow::bail!("publish on {stream_id} failed: {error}"),
            Some(Outcome::Disconnected(e)) => anyhow::bail!("disconnected: {e}"),
            None => anyhow::bail!("no publish result within 30 s"),
        }
    }
    let events_per_sec = (per_stream * args.streams) as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok(Rate { events_per_sec, curve })
}

/// Khala's ingest over the SDK as the mirror does it: one pre-encoded segment per
/// `publish_segment` call.
fn publish_sdk(url: &str, db: &str, token: &str, args: &PublishArgs) -> anyhow::Result<Rate> {
    let publisher = khala_tools::sdk_publish::SdkPublisher::connect_many(url, db, token, args.connections)?;
    let mut rng = rand::thread_rng();
    drive(
        "khala publish_segment (SDK)",
        args,
        |stream, first, n| Ok(publisher.send_segment(stream, segment_data(first, n, args.payload_bytes, &mut rng))?),
        |t| publisher.next(t),
    )
}

/// Khala's `publish` over the SDK: the events as a list of `PublishEvent` structs.
fn publish_sdk_events(url: &str, db: &str, token: &str, args: &PublishArgs) -> anyhow::Result<Rate> {
    let publisher = khala_tools::sdk_publish::SdkPublisher::connect_many(url, db, token, args.connections)?;
    let mut rng = rand::thread_rng();
    drive("khala publish (SDK)", args, |stream, first, n| Ok(publisher.send(stream, sdk_events(first, n, args.payload_bytes, &mut rng))?), |t| publisher.next(t))
}

/// The baseline: the same events, packed into one segment per call by the caller, into
/// the bare insert-only module (`bench/bare-module`) over the SDK.
fn publish_bare(url: &str, db: &str, token: &str, args: &PublishArgs) -> anyhow::Result<Rate> {
    let publisher = khala_tools::sdk_publish::BarePublisher::connect_many(url, db, token, args.connections)?;
    let mut rng = rand::thread_rng();
    drive(
        "bare insert (SDK)",
        args,
        |stream, first, n| Ok(publisher.send(stream, first, first + n - 1, segment_data(first, n, args.payload_bytes, &mut rng))?),
        |t| publisher.next(t),
    )
}

fn publish_http(api: &Api, db: &str, token: &str, args: &PublishArgs) -> anyhow::Result<f64> {
    let per_stream = args.events / args.streams;
    let progress = khala_tools::progress::bar(per_stream * args.streams, "khala publish (HTTP)");
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..args.streams)
            .map(|s| {
                let progress = progress.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut rng = rand::thread_rng();
                    let mut seq = 1;
                    while seq <= per_stream {
                        let n = args.batch.min(per_stream - seq + 1);
                        let events = json_events(seq, n, args.payload_bytes, &mut rng);
                        api.call(db, "publish", json!([format!("bench.pub.{s}"), events]), token)?;
                        progress.inc(n);
                        seq += n;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("publisher thread")?;
        }
        Ok(())
    })?;
    let events_per_sec = (per_stream * args.streams) as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok(events_per_sec)
}

fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let command = format!(
        "khala bench publish --events {} --batch {} --streams {} --payload-bytes {} --connections {}{}{}",
        args.events,
        args.batch,
        args.streams,
        args.payload_bytes,
        args.connections,
        if args.curve_every > 0 { format!(" --curve-every {}", args.curve_every) } else { String::new() },
        if args.skip_http { " --skip-http" } else { "" }
    );
    let (server, _dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let bare_wasm = std::fs::read(khala_tools::module_wasm::build_bare_module()?)?;
    api.publish_module("pub-bare", &bare_wasm, &owner.token, false)?;
    api.publish_module("pub-http", &wasm, &owner.token, false)?;
    api.publish_module("pub-sdk", &wasm, &owner.token, false)?;
    api.publish_module("pub-sdk-events", &wasm, &owner.token, false)?;
    for db in ["pub-http", "pub-sdk", "pub-sdk-events"] {
        grants::make_publisher(&api, db, &owner.token, &owner.identity, &["bench.*"], 24 * 3600)?;
    }
    // Baseline first, then Khala, on the same server in the same run (ratios are the figures to trust).
    use server_account::ServerWatch;
    let (bare, bare_server) = ServerWatch::around(&api, "pub-bare", "insert", || publish_bare(&server.url(), "pub-bare", &owner.token, &args))?;
    let (sdk, sdk_server) = ServerWatch::around(&api, "pub-sdk", "publish_segment", || publish_sdk(&server.url(), "pub-sdk", &owner.token, &args))?;
    let (events, events_server) = ServerWatch::around(&api, "pub-sdk-events", "publish", || publish_sdk_events(&server.url(), "pub-sdk-events", &owner.token, &args))?;
    let ratio = |x: f64| (x / bare.events_per_sec * 1000.0).round() / 1000.0;
    let mut out = json!({
        "command": command,
        "bare_sdk_events_per_sec": bare.events_per_sec.round(),
        "sdk_segment_events_per_sec": sdk.events_per_sec.round(),
        "sdk_segment_to_bare": ratio(sdk.events_per_sec),
        "sdk_bsatn_events_per_sec": events.events_per_sec.round(),
        "sdk_bsatn_to_bare": ratio(events.events_per_sec),
        // The database's own account of each path (per call: reducer and subscription
        // update CPU on its thread, waits for it, how busy it was).
        "bare_server": bare_server,
        "sdk_segment_server": sdk_server,
        "sdk_bsatn_server": events_server,
    });
    if !args.skip_http {
        let http = publish_http(&api, "pub-http", &owner.token, &args)?;
        out["http_json_events_per_sec"] = json!(http.round());
        out["http_to_bare"] = json!(ratio(http));
    }
    if args.curve_every > 0 {
        out["bare_curve_events_per_sec"] = json!(bare.curve);
        out["sdk_curve_events_per_sec"] = json!(sdk.curve);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `publish`'s time inside the module per call, median over `args.calls` calls per stream,
/// for each module given, alternating modules round by round on one server.
fn reducer_time(args: ReducerTimeArgs) -> anyhow::Result<()> {
    let mut modules: Vec<(String, std::path::PathBuf)> = Vec::new();
    for spec in &args.wasm {
        let (name, path) = spec.split_once('=').with_context(|| format!("--wasm {spec}: expected NAME=PATH"))?;
        modules.push((name.to_string(), path.into()));
    }
    if modules.is_empty() {
        modules.push(("khala".into(), khala_tools::module_wasm::build_module()?));
    }
    let command = format!(
        "khala bench reducer-time{} --calls {} --batch {} --payload-bytes {} --rounds {}{}",
        args.wasm.iter().map(|w| format!(" --wasm {w}")).collect::<String>(),
        args.calls,
        args.batch,
        args.payload_bytes,
        args.rounds,
        args.reducers.iter().map(|r| format!(" --reducer {}", r.name().replace('_', "-"))).collect::<String>()
    );
    // The bare module's insert first, the baseline; then every (module, reducer) pair,
    // alternating within each round.
    let mut pairs: Vec<(String, String, Option<IngestReducer>)> = vec![("rt-bare".into(), "bare insert".into(), None)];
    pairs.extend(modules.iter().enumerate().flat_map(|(i, (name, _))| args.reducers.iter().map(move |r| (format!("rt-{i}"), format!("{name} {}", r.name()), Some(*r)))));
    let (server, _dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    api.publish_module("rt-bare", &std::fs::read(khala_tools::module_wasm::build_bare_module()?)?, &owner.token, false)?;
    for (i, (name, path)) in modules.iter().enumerate() {
        let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let db = format!("rt-{i}");
        api.publish_module(&db, &wasm, &owner.token, false).with_context(|| format!("publishing {name}"))?;
        grants::make_publisher(&api, &db, &owner.token, &owner.identity, &["bench.*"], 24 * 3600)?;
    }
    let mut rng = rand::thread_rng();
    let mut medians: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for round in 0..args.rounds {
        for (p, (db, name, reducer)) in pairs.iter().enumerate() {
            let stream = format!("bench.rt.{round}.{}", reducer.map_or("insert", IngestReducer::name));
            let mut micros = Vec::with_capacity(args.calls as usize);
            for call in 0..args.calls {
                let first = call * args.batch + 1;
                let segment = |rng: &mut rand::rngs::ThreadRng| khala_tools::api::bytes_arg(&segment_data(first, args.batch, args.payload_bytes, rng));
                let arg = match reducer {
                    None => json!([stream, first, first + args.batch - 1, segment(&mut rng)]),
                    Some(IngestReducer::Publish) => json!([stream, json_events(first, args.batch, args.payload_bytes, &mut rng)]),
                    Some(IngestReducer::PublishSegment) => json!([stream, segment(&mut rng)]),
                };
                let took = api
                    .call_timed(db, reducer.map_or("insert", IngestReducer::name), arg, &owner.token)?
                    .with_context(|| format!("{name}: the server reported no execution time"))?;
                micros.push(took.as_secs_f64() * 1e6);
            }
            micros.sort_by(f64::total_cmp);
            medians[p].push(micros[micros.len() / 2]);
        }
    }
    let base = medians[0].iter().sum::<f64>() / medians[0].len() as f64;
    let rows: Vec<Value> = pairs
        .iter()
        .map(|(_, name, _)| name)
        .zip(&medians)
        .map(|(name, m)| {
            let mean = m.iter().sum::<f64>() / m.len() as f64;
            json!({
                "module": name,
                "p50_micros_per_call": m.iter().map(|x| x.round()).collect::<Vec<_>>(),
                "micros_per_event": (mean / args.batch as f64 * 100.0).round() / 100.0,
                "vs_bare": (mean / base * 100.0).round() / 100.0,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&json!({ "command": command, "modules": rows }))?);
    Ok(())
}

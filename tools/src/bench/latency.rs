//! `khala bench latency`: publish → client handler, and publish → durable checkpoint, at a
//! steady rate to N subscribers of one stream; and the same fan-out through the bare
//! module (no Khala code on either side) as the engine's own figure from the same run,
//! once from its public table and once from a table behind one row-level-security rule
//! (a query plan per subscriber, as Khala's rules give).
//!
//! Every event is one `publish` call over the SDK carrying, in its first 8 payload bytes,
//! the wall-clock microseconds at which it was sent. Each subscriber is a real
//! [`SyncClient`] as a granted non-owner identity (row-level security applies), in this
//! process; its handler reads the send time back when it applies the event, and again in
//! `persist`, which the client calls right before each checkpoint write (with `--sqlite`,
//! in the store's syncer instead, once the commit is on disk).

use super::private_server;
use super::server_account::ServerWatch;
use anyhow::Context;
use clap::Args;
use khala_client::store::sqlite::{Commit, SqliteStore};
use khala_client::{ClientConfig, Event, Handler, HandlerError, SyncClient, Syncer};
use khala_proto::StaleCursor;
use khala_tools::api::{identity_arg, Api};
use khala_tools::faults::rig::unix_micros;
use khala_tools::grants;
use khala_tools::sdk_publish::{BarePublisher, Outcome, SdkPublisher};
use rand::RngCore;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct LatencyArgs {
    /// Subscribers of the stream, each its own identity and connection.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Events per second, one per `publish` call.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// How long to publish.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Subscribers do not ack (acks are reducer calls: one per subscriber and stream at
    /// most every 500 ms).
    #[arg(long)]
    pub no_ack: bool,
    /// Leave out the bare module's fan-out (public and behind an RLS rule).
    #[arg(long)]
    pub skip_bare: bool,
    /// Subscribers keep events and cursors in SQLite (`store::sqlite`, exactly-once
    /// effects): `persist()` is its commit, its syncer (on the client's checkpoint thread)
    /// makes it durable, and no checkpoint file is written.
    #[arg(long)]
    pub sqlite: bool,
    /// Warm the subscribers' SDK row caches before timing: publish a first window's worth
    /// of one-event segments (seqs 2..=8,200), let the clients close that window, then
    /// time from seq 8,201 within the second window. The SDK's cache (a hash table keyed
    /// by row) rehashes as it first grows, in every client at once; a long-running client
    /// has paid that already (docs/BENCHMARKS.md). Adds about 20 s. `rate × seconds` must
    /// fit in the second window (at most 8,183 events).
    #[arg(long)]
    pub warm_clients: bool,
}

const STREAM: &str = "bench.lat.0";
/// The last seq of the warm-up with `--warm-clients`: past the first window's bucket.
const WARM_LAST_SEQ: u64 = khala_proto::hash::WINDOW_EVENTS + 8;
/// How long the warm-up settles before timing: the clients close the window they left
/// (each waits up to [`khala_client::sync::driver::windows::CLOSE_SPREAD`], 4 s, after 4 s
/// live), and compaction merges the warm-up's segments once they are 10 s old (the default
/// `compact_min_age_secs`), 8,192 of them in two or three runs that hold the database's
/// thread for tens of milliseconds each: timed, they were the first second's tail.
const WARM_SETTLE: Duration = Duration::from_secs(15);
/// How long delivery may stall after the last send before the rest counts as missing.
const DRAIN: Duration = Duration::from_secs(10);
/// The longest wait for deliveries after the last send, stalled or not.
const DRAIN_MAX: Duration = Duration::from_secs(60);

/// One latency run's settings.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub subscribers: usize,
    pub rate: u64,
    pub seconds: u64,
    pub payload_bytes: usize,
    pub ack: bool,
    /// Subscribers store through `SqliteStore` (see [`LatencyArgs::sqlite`]).
    pub sqlite: bool,
    /// The clients' caches are warmed first (see [`LatencyArgs::warm_clients`]).
    pub warm: bool,
}

impl Load {
    /// The first seq timed: 2 (seq 1 wakes the subscribers up), or after the warm-up.
    fn first_timed(&self) -> u64 {
        if self.warm {
            WARM_LAST_SEQ + 1
        } else {
            2
        }
    }
}

/// What the subscribers saw, shared by all of them.
#[derive(Default)]
struct Seen {
    /// `(subscriber, seq)` of every event applied, in the order applied.
    applied: Vec<(usize, u64)>,
    /// Send time and send → handler, microseconds (the warm-up event excluded).
    handler_micros: Vec<(i64, i64)>,
    /// Send → the handler's `persist` before the checkpoint write (with a store: the end
    /// of the sync after its commit), microseconds.
    durable_micros: Vec<i64>,
}

struct LatencyHandler {
    subscriber: usize,
    /// Events before this seq are not timed.
    first_timed: u64,
    seen: Arc<Mutex<Seen>>,
    /// Send times of events applied since the last `persist`.
    unpersisted: Vec<i64>,
    /// Where events and cursors are stored, when the handler owns its cursors.
    store: Option<SqliteStore>,
    /// Send times of events committed to the store and not yet synced, once the store's
    /// syncer (which takes the durable times) has been taken.
    committed: Option<Arc<Mutex<Vec<i64>>>>,
}

fn sent_micros(payload: &[u8]) -> i64 {
    payload.get(..8).map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
}

impl Handler for LatencyHandler {
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError> {
        if let Some(store) = &mut self.store {
            store.apply(event)?;
        }
        let now = unix_micros();
        let sent = sent_micros(&event.payload);
        let mut seen = self.seen.lock().expect("latency samples");
        seen.applied.push((self.subscriber, event.seq));
        if event.seq >= self.first_timed {
            seen.handler_micros.push((sent, now - sent));
            self.unpersisted.push(sent);
        }
        Ok(())
    }

    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError> {
        match &mut self.store {
            Some(store) => store.rebootstrap(stale),
            None => Ok(()),
        }
    }

    /// With a store, the time is taken once its commit is durable (in [`Handler::syncer`]
    /// when the store has one); without one, before the client writes its checkpoint file
    /// (on its writer thread).
    fn persist(&mut self) -> Result<(), HandlerError> {
        if let Some(store) = &mut self.store {
            store.persist()?;
            if let Some(committed) = &self.committed {
                committed.lock().expect("committed").append(&mut self.unpersisted);
                return Ok(());
            }
        }
        if self.unpersisted.is_empty() {
            return Ok(());
        }
        let now = unix_micros();
        let mut seen = self.seen.lock().expect("latency samples");
        seen.durable_micros.extend(self.unpersisted.drain(..).map(|sent| now - sent));
        Ok(())
    }

    fn cursors(&mut self) -> Result<Option<Vec<khala_proto::StreamCursor>>, HandlerError> {
        match &mut self.store {
            Some(store) => store.cursors(),
            None => Ok(None),
        }
    }

    /// The store's syncer, timing each event it makes durable.
    fn syncer(&mut self) -> Option<Syncer> {
        let mut sync = self.store.as_mut()?.syncer()?;
        let committed = self.committed.insert(Arc::default()).clone();
        let seen = self.seen.clone();
        Some(Box::new(move || {
            // What was committed before the sync began is durable once it returns.
            let sent = std::mem::take(&mut *committed.lock().expect("committed"));
            if let Err(e) = sync() {
                committed.lock().expect("committed").extend(sent);
                return Err(e);
            }
            let now = unix_micros();
            seen.lock().expect("latency samples").durable_micros.extend(sent.into_iter().map(|sent| now - sent));
            Ok(())
        }))
    }
}

/// `payload_bytes` random bytes led by the send time.
fn payload(payload_bytes: usize, rng: &mut impl RngCore) -> Vec<u8> {
    let mut p = vec![0u8; payload_bytes.max(8)];
    rng.fill_bytes(&mut p[8..]);
    p[..8].copy_from_slice(&unix_micros().to_le_bytes());
    p
}

/// p50 / p90 / p99 / max in milliseconds.
fn percentiles(mut micros: Vec<i64>) -> Value {
    if micros.is_empty() {
        return json!(null);
    }
    micros.sort_unstable();
    let at = |p: f64| micros[((micros.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    let ms = |x: f64| (x * 100.0).round() / 100.0;
    json!({ "samples": micros.len(), "p50_ms": ms(at(0.5)), "p90_ms": ms(at(0.9)), "p99_ms": ms(at(0.99)), "max_ms": ms(at(1.0)) })
}

/// Send → delivery percentiles for each second of sending, from `(sent, micros)`
/// samples: a stall (a window closing, a compaction, a rehash) shows where it happened
/// instead of only in the run's p99.
fn per_second(samples: &[(i64, i64)]) -> Value {
    let Some(first) = samples.iter().map(|(sent, _)| *sent).min() else {
        return json!([]);
    };
    let mut seconds: std::collections::BTreeMap<i64, Vec<i64>> = std::collections::BTreeMap::new();
    for (sent, micros) in samples {
        seconds.entry((sent - first) / 1_000_000).or_default().push(*micros);
    }
    Value::Array(
        seconds
            .into_iter()
            .map(|(second, micros)| {
                let mut row = percentiles(micros);
                row["second"] = json!(second);
                row
            })
            .collect(),
    )
}

/// Calls `send(seq)` at `rate` per second from seq `first` until `seconds` have passed,
/// draining `next` between sends; returns how many were sent and how many failed.
fn paced(first: u64, rate: u64, seconds: u64, mut send: impl FnMut(u64) -> anyhow::Result<()>, next: impl Fn() -> Option<Outcome>) -> anyhow::Result<(u64, u64)> {
    let total = rate * seconds;
    let started = Instant::now();
    let (mut failed, mut answered) = (0u64, 0u64);
    let tally = |o: Outcome, failed: &mut u64, answered: &mut u64| {
        *answered += 1;
        if !matches!(o, Outcome::Committed { .. }) {
            log::warn!("publish: {o:?}");
            *failed += 1;
        }
    };
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        while let Some(o) = next() {
            tally(o, &mut failed, &mut answered);
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(first + i)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered < total && Instant::now() < deadline {
        match next() {
            Some(o) => tally(o, &mut failed, &mut answered),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    Ok((total, failed + (total - answered)))
}

/// `--warm-clients`: publishes seqs 2..=[`WARM_LAST_SEQ`] one per call (as the timed run
/// does, so the clients' caches hold as many rows as it will), waits until every
/// subscriber applied them, then [`WARM_SETTLE`].
fn warm_clients(sdk: &SdkPublisher, mut send: impl FnMut(u64) -> khala_tools::error::Result<()>, applied: impl Fn() -> usize, subscribers: usize) -> anyhow::Result<()> {
    let progress = khala_tools::progress::spinner(format!("khala: warming {subscribers} subscribers' caches ({WARM_LAST_SEQ} events)"));
    let mut outcomes = Vec::new();
    for seq in 2..=WARM_LAST_SEQ {
        send(seq)?;
        outcomes.extend(std::iter::from_fn(|| sdk.next(Duration::ZERO)));
    }
    let started = Instant::now();
    while (outcomes.len() as u64) < WARM_LAST_SEQ - 1 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the warm-up's publish calls were not all answered within 60 s");
        outcomes.extend(sdk.next(Duration::from_millis(20)));
    }
    let failed = outcomes.iter().filter(|o| !matches!(o, Outcome::Committed { .. })).count();
    anyhow::ensure!(failed == 0, "{failed} of the warm-up's publish calls failed");
    wait_applied(WARM_LAST_SEQ as usize * subscribers, applied, "the warm-up's events", started)?;
    std::thread::sleep(WARM_SETTLE);
    progress.finish_and_clear();
    Ok(())
}

/// Waits until `applied()` reaches `want`, until 120 s after `since` at most: the
/// subscribers applying `what`, untimed.
fn wait_applied(want: usize, applied: impl Fn() -> usize, what: &str, since: Instant) -> anyhow::Result<()> {
    while applied() < want {
        anyhow::ensure!(since.elapsed() < Duration::from_secs(120), "the subscribers did not all apply {what} within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until `delivered()` reaches `want` or stops growing for [`DRAIN`].
fn drain(want: usize, delivered: impl Fn() -> usize) {
    let started = Instant::now();
    let (mut last, mut since) = (delivered(), Instant::now());
    while last < want && since.elapsed() < DRAIN && started.elapsed() < DRAIN_MAX {
        std::thread::sleep(Duration::from_millis(20));
        let now = delivered();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

pub fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let command = format!(
        "khala bench latency --subscribers {} --rate {} --seconds {} --payload-bytes {}{}{}{}{}",
        args.subscribers,
        args.rate,
        args.seconds,
        args.payload_bytes,
        if args.no_ack { " --no-ack" } else { "" },
        if args.skip_bare { " --skip-bare" } else { "" },
        if args.sqlite { " --sqlite" } else { "" },
        if args.warm_clients { " --warm-clients" } else { "" }
    );
    let load = Load {
        subscribers: args.subscribers,
        rate: args.rate,
        seconds: args.seconds,
        payload_bytes: args.payload_bytes,
        ack: !args.no_ack,
        sqlite: args.sqlite,
        warm: args.warm_clients,
    };
    let room = 2 * khala_proto::hash::WINDOW_EVENTS - load.first_timed();
    anyhow::ensure!(
        !load.warm || load.rate * load.seconds <= room,
        "invalid_argument: --warm-clients times within the second window: rate x seconds must be at most {room}"
    );
    let (server, dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let khala = khala_latency(&api, &owner.token, "lat", dir.path(), load)?;
    let (bare, bare_rls) = if args.skip_bare {
        (Value::Null, Value::Null)
    } else {
        (bare_fan_out(&api, &owner.token, "lat-bare", load, BareTable::Public)?, bare_fan_out(&api, &owner.token, "lat-bare-rls", load, BareTable::Guarded)?)
    };
    println!("{}", serde_json::to_string_pretty(&json!({ "command": command, "khala": khala, "bare": bare, "bare_rls": bare_rls }))?);
    Ok(())
}

/// Publishes `load` into a fresh database `db` of Khala's module and measures it at
/// `load.subscribers` real clients.
pub fn khala_latency(api: &Api, owner_token: &str, db: &str, dir: &std::path::Path, load: Load) -> anyhow::Result<Value> {
    let url = api.base_url().to_string();
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    api.publish_module(db, &wasm, owner_token, false)?;
    let publisher = api.new_identity()?;
    grants::make_publisher(api, db, owner_token, &publisher.identity, &["bench.*"], 24 * 3600)?;

    // The subscribers, each a granted non-owner identity running a real client.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..load.subscribers {
        let reader = api.new_identity()?;
        api.call(db, "grant", json!([identity_arg(&reader.identity), STREAM, ["subscribe", "ack"], 3600]), owner_token)?;
        let token_file = dir.join(format!("{db}-reader-{n}.token"));
        std::fs::write(&token_file, &reader.token)?;
        let mut config = ClientConfig::new(url.clone(), db, token_file, dir.join(format!("{db}-reader-{n}.checkpoint")));
        config.streams = vec![STREAM.to_string()];
        config.ack = load.ack;
        let store = match load.sqlite {
            true => Some(SqliteStore::open(dir.join(format!("{db}-reader-{n}.sqlite")), Commit::Batch).map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?),
            false => None,
        };
        let handler = LatencyHandler { subscriber: n, first_timed: load.first_timed(), seen: seen.clone(), unpersisted: Vec::new(), store, committed: None };
        let mut client = SyncClient::new(config, handler)?;
        let stop = stop.clone();
        clients.push(std::thread::Builder::new().name(format!("khala-bench-sub-{n}")).spawn(move || client.run(&stop))?);
    }

    // Seq 1 warms every subscriber up (connected, subscribed, window open), untimed.
    let sdk = SdkPublisher::connect(&url, db, &publisher.token)?;
    let mut rng = rand::thread_rng();
    let event = |seq: u64, rng: &mut rand::rngs::ThreadRng| khala_client::module_bindings::PublishEvent {
        idempotency_key: format!("k{seq}"),
        kind: "bench.lat".into(),
        payload: payload(load.payload_bytes, rng),
        authority_seq: Some(seq),
        occurred_at_micros: 0,
    };
    sdk.send(STREAM, vec![event(1, &mut rng)])?;
    wait_applied(load.subscribers, || seen.lock().expect("samples").applied.len(), "the warm-up event", Instant::now())?;
    while sdk.next(Duration::ZERO).is_some() {}
    if load.warm {
        warm_clients(&sdk, |seq| sdk.send(STREAM, vec![event(seq, &mut rng)]), || seen.lock().expect("samples").applied.len(), load.subscribers)?;
    }

    let progress = khala_tools::progress::spinner(format!("khala: {} events/s to {} subscribers", load.rate, load.subscribers));
    let server = ServerWatch::start(api, db)?;
    let first = load.first_timed();
    let (sent, failed) = paced(first, load.rate, load.seconds, |seq| Ok(sdk.send(STREAM, vec![event(seq, &mut rng)])?), || sdk.next(Duration::ZERO))?;
    // Every event before the first timed one was delivered to every subscriber too.
    let want = (sent as usize + first as usize - 1) * load.subscribers;
    drain(want, || seen.lock().expect("samples").applied.len());
    // One more checkpoint interval, so the last events reach `persist`.
    std::thread::sleep(Duration::from_millis(200));
    let server = server.finish(api, "publish")?;
    progress.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("a subscriber thread panicked"))?.context("a subscriber failed")?;
    }
    let seen = std::mem::take(&mut *seen.lock().expect("samples"));
    // The warm-up events were delivered to every subscriber and are not counted.
    let mut figures = deliveries(load, sent, failed, seen.applied.into_iter().filter(|(_, seq)| *seq >= first).collect());
    figures["publish_to_handler"] = percentiles(seen.handler_micros.iter().map(|(_, m)| *m).collect());
    figures["publish_to_handler_per_second"] = per_second(&seen.handler_micros);
    figures["publish_to_durable_checkpoint"] = percentiles(seen.durable_micros);
    figures["server"] = server;
    Ok(figures)
}

/// The counts of a run: `applied` holds `(subscriber, seq)` of every delivery.
fn deliveries(load: Load, sent: u64, failed: u64, applied: Vec<(usize, u64)>) -> Value {
    let expected = sent as usize * load.subscribers;
    let applied_len = applied.len();
    let mut unique = applied;
    unique.sort_unstable();
    unique.dedup();
    json!({
        "subscribers": load.subscribers,
        "rate": load.rate,
        "sent": sent,
        "publish_failed": failed,
        "expected_deliveries": expected,
        "delivered": unique.len(),
        "missing": expected.saturating_sub(unique.len()),
        "applied_twice": applied_len - unique.len(),
    })
}

/// Which table of the bare module the fan-out baseline publishes to and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareTable {
    /// `bare_segment`: public, so every subscriber shares one query plan and one encoded
    /// update per commit.
    Public,
    /// `bare_guarded_segment`: behind one row-level-security rule on `:sender`, so each
    /// subscriber has a plan of its own, evaluated and encoded for it at every commit, as
    /// with Khala's rules.
    Guarded,
}

/// The same rate into the bare module, one row per call, to as many connections (each
/// its own identity) subscribed to the whole of `table`: the engine's own fan-out, with no Khala code.
pub fn bare_fan_out(api: &Api, owner_token: &str, db: &str, load: Load, table: BareTable) -> anyhow::Result<Value> {
    let url = api.base_url().to_string();
    use khala_tools::bare_bindings::{BareGuardedSegmentTableAccess, BareSegment, BareSegmentTableAccess, DbConnection, EventContext};
    use spacetimedb_sdk::{DbContext, Table};
    let wasm = std::fs::read(khala_tools::module_wasm::build_bare_module()?)?;
    api.publish_module(db, &wasm, owner_token, false)?;
    let micros = Arc::new(Mutex::new(Vec::<(usize, u64, i64, i64)>::new()));
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut conns = Vec::new();
    for n in 0..load.subscribers {
        let reader = api.new_identity()?;
        if table == BareTable::Guarded {
            api.call(db, "add_reader", json!([identity_arg(&reader.identity), STREAM]), owner_token)?;
        }
        let conn = DbConnection::builder()
            .with_uri(&url)
            .with_module_name(db)
            .with_token(Some(reader.token))
            .with_compression(spacetimedb_sdk::Compression::None)
            .build()
            .context("connecting a bare subscriber")?;
        let micros = micros.clone();
        // Both tables hold `BareSegment` rows.
        let record = move |_: &EventContext, row: &BareSegment| {
            let now = unix_micros();
            let sent = sent_micros(&row.data);
            micros.lock().expect("samples").push((n, row.first_seq, sent, now - sent));
        };
        let query = match table {
            BareTable::Public => {
                conn.db.bare_segment().on_insert(record);
                "SELECT * FROM bare_segment"
            }
            BareTable::Guarded => {
                conn.db.bare_guarded_segment().on_insert(record);
                "SELECT * FROM bare_guarded_segment"
            }
        };
        let (subscribed, refused) = (subscribed_tx.clone(), subscribed_tx.clone());
        conn.subscription_builder()
            .on_applied(move |_| {
                let _ = subscribed.send(Ok(()));
            })
            .on_error(move |_, e| {
                let _ = refused.send(Err(e.to_string()));
            })
            .subscribe([query]);
        conn.run_threaded();
        conns.push(conn);
    }
    for _ in 0..load.subscribers {
        subscribed_rx
            .recv_timeout(Duration::from_secs(60))
            .context("a bare subscription was not applied within 60 s")?
            .map_err(|e| anyhow::anyhow!("a bare subscription was refused: {e}"))?;
    }
    let publisher = BarePublisher::connect(&url, db, owner_token)?;
    let mut rng = rand::thread_rng();
    let send = |seq: u64, data: Vec<u8>| match table {
        BareTable::Public => publisher.send(STREAM, seq, seq, data),
        BareTable::Guarded => publisher.send_guarded(STREAM, seq, seq, data),
    };
    let server = ServerWatch::start(api, db)?;
    let (sent, failed) = paced(2, load.rate, load.seconds, |seq| Ok(send(seq, payload(load.payload_bytes, &mut rng))?), || publisher.next(Duration::ZERO))?;
    let want = sent as usize * load.subscribers;
    drain(want, || micros.lock().expect("samples").len());
    let server = server.finish(api, if table == BareTable::Public { "insert" } else { "insert_guarded" })?;
    for conn in &conns {
        let _ = conn.disconnect();
    }
    let samples = std::mem::take(&mut *micros.lock().expect("samples"));
    let mut figures = deliveries(load, sent, failed, samples.iter().map(|(n, seq, _, _)| (*n, *seq)).collect());
    figures["publish_to_callback"] = percentiles(samples.iter().map(|(_, _, _, m)| *m).collect());
    figures["publish_to_callback_per_second"] = per_second(&samples.iter().map(|(_, _, sent, m)| (*sent, *m)).collect::<Vec<_>>());
    figures["server"] = server;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use khala_proto::hash::{bucket, WINDOW_EVENTS};

    /// The warm-up ends past the first window, so its close is behind the timed run; the
    /// timed run fits the second window, so no close falls in it.
    #[test]
    fn a_warm_run_is_timed_within_the_second_window() {
        let load = Load { subscribers: 1, rate: 1, seconds: 1, payload_bytes: 8, ack: true, sqlite: false, warm: true };
        assert_eq!(bucket(WARM_LAST_SEQ), 1);
        assert_eq!(bucket(load.first_timed()), 1);
        let room = 2 * WINDOW_EVENTS - load.first_timed();
        assert_eq!(bucket(load.first_timed() + room - 1), 1, "the last seq the room allows");
        assert_eq!(Load { warm: false, ..load }.first_timed(), 2);
    }

    #[test]
    fn per_second_groups_samples_by_send_second_from_the_first_send() {
        let t0 = 1_700_000_000_000_000;
        // Two samples in the first second, one stalled sample in the third; none in the second.
        let samples = [(t0 + 900_000, 2_000), (t0, 1_000), (t0 + 2_000_001, 300_000)];
        let rows = per_second(&samples);
        let rows = rows.as_array().expect("an array");
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0]["second"].as_i64(), rows[0]["samples"].as_u64(), rows[0]["max_ms"].as_f64()), (Some(0), Some(2), Some(2.0)));
        assert_eq!((rows[1]["second"].as_i64(), rows[1]["samples"].as_u64(), rows[1]["p50_ms"].as_f64()), (Some(2), Some(1), Some(300.0)));
        assert_eq!(per_second(&[]), json!([]));
    }
}

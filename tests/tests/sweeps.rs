//! The scheduled sweeps on a real server, under a log far larger than one run's budget:
//! many streams of small segments next to streams of large events, one of them with
//! segments larger than a whole run's budget. Compaction and then retention must reach
//! every stream within a bounded time, and `reset_stream` must work in bounded steps.
//! The figures printed here are quoted in docs/SEGMENTS.md ("Sweeps").

use khala_tests::verify::{count, verify_stream};
use khala_tests::{event_json, publish_range, shared_server, TestDb};
use khala_client::module_bindings::PublishEvent;
use khala_tools::api::Credentials;
use khala_tools::sdk_publish::{Outcome, SdkPublisher};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SMALL_STREAMS: usize = 200;
const SMALL_EVENTS: u64 = 12;
const LARGE_STREAMS: usize = 4;
const LARGE_EVENTS: u64 = 48;
const LARGE_PAYLOAD: usize = 200 * 1024;
/// Events of the one batch that makes each of the huge stream's two segments: 12 MiB,
/// more than a whole run's byte budget (8 MiB).
const HUGE_BATCH: u64 = 48;
const HUGE_PAYLOAD: usize = 256 * 1024;
const MIB: f64 = 1024.0 * 1024.0;
/// How long each sweep may take over the whole backlog (about 2 s measured here).
const DEADLINE: Duration = Duration::from_secs(20);
/// A run's byte budget (`RETENTION_BYTES`, `COMPACT_SCAN_BYTES`).
const RUN_BYTES: u64 = 8 * 1024 * 1024;

/// One `stream` row, with the columns these tests follow.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    epoch: u64,
    head_seq: u64,
    oldest_seq: u64,
    segment_count: u64,
    compacted_through: u64,
}

fn rows(db: &TestDb) -> BTreeMap<String, Row> {
    let sql = db.sql("SELECT * FROM stream");
    let num = |r: &[Value], c: &str| sql.get(r, c).and_then(Value::as_u64).unwrap_or(0);
    sql.rows
        .iter()
        .map(|r| {
            let id = sql.get(r, "stream_id").and_then(Value::as_str).unwrap_or("").to_string();
            let row = Row {
                epoch: num(r, "epoch"),
                head_seq: num(r, "head_seq"),
                oldest_seq: num(r, "oldest_seq"),
                segment_count: num(r, "segment_count"),
                compacted_through: num(r, "compacted_through"),
            };
            (id, row)
        })
        .collect()
}

/// One sweep's `sweep_state` counters: runs that loaded segments, and what they loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Loads {
    runs: u64,
    segments: u64,
    bytes: u64,
    max_run_segments: u64,
    max_run_bytes: u64,
}

impl Loads {
    fn since(self, before: Loads) -> Loads {
        Loads { runs: self.runs - before.runs, segments: self.segments - before.segments, bytes: self.bytes - before.bytes, ..self }
    }
}

impl std::fmt::Display for Loads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} runs loaded {} segments, {:.1} MiB (the most any run loaded: {} segments, {:.1} MiB)",
            self.runs,
            self.segments,
            self.bytes as f64 / MIB,
            self.max_run_segments,
            self.max_run_bytes as f64 / MIB
        )
    }
}

/// `(retention, compaction)` counters from the private `sweep_state` rows.
fn loads(db: &TestDb) -> (Loads, Loads) {
    let sql = db.sql("SELECT * FROM sweep_state");
    let num = |r: &[Value], c: &str| sql.get(r, c).and_then(Value::as_u64).unwrap_or(0);
    let mut out = (Loads::default(), Loads::default());
    for r in &sql.rows {
        let l = Loads {
            runs: num(r, "loading_runs"),
            segments: num(r, "segments_loaded"),
            bytes: num(r, "bytes_loaded"),
            max_run_segments: num(r, "max_run_segments"),
            max_run_bytes: num(r, "max_run_bytes"),
        };
        if num(r, "sweep") == 0 {
            out.0 = l;
        } else {
            out.1 = l;
        }
    }
    out
}

/// A payload of `len` bytes, distinct per `(stream, seq)`.
fn payload(stream_id: &str, seq: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{stream_id}:{seq}:").into_bytes();
    p.resize(len, b'x');
    p
}

/// Publishes events `from..from + n` of `len` bytes, `batch` per call, with keys
/// `k<seq>` and no `authority_seq`: a stream addressed by key, so that every event has an
/// idempotency key row for retention and `reset_stream` to delete.
fn publish_keyed(db: &TestDb, who: &Credentials, stream_id: &str, from: u64, n: u64, batch: u64, len: usize) {
    let mut seq = from;
    while seq < from + n {
        let upto = (seq + batch).min(from + n);
        let events: Vec<Value> = (seq..upto).map(|s| event_json(&format!("k{s}"), "test.keyed", &payload(stream_id, s, len), None)).collect();
        db.call_as(who, "publish", json!([stream_id, events])).unwrap_or_else(|e| panic!("publishing {stream_id} {seq}..{upto}: {e}"));
        seq = upto;
    }
}

/// Publishes `n` events of `len` bytes from seq 1, `batch` events per call, over the SDK's
/// WebSocket: a batch of more than a few MiB is too large for one HTTP request.
fn publish_over_sdk(db: &TestDb, who: &Credentials, stream_id: &str, n: u64, batch: u64, len: usize) {
    let sdk = SdkPublisher::connect(&db.url, &db.name, &who.token).unwrap_or_else(|e| panic!("{e}"));
    let mut seq = 1;
    while seq <= n {
        let upto = (seq + batch - 1).min(n);
        let events: Vec<PublishEvent> = (seq..=upto)
            .map(|s| PublishEvent {
                idempotency_key: format!("k{s}"),
                kind: "test.huge".into(),
                payload: payload(stream_id, s, len),
                authority_seq: None,
                occurred_at_micros: 0,
            })
            .collect();
        sdk.send(stream_id, events).unwrap_or_else(|e| panic!("{e}"));
        match sdk.next(Duration::from_secs(30)) {
            Some(Outcome::Committed { .. }) => {}
            other => panic!("publishing {stream_id} {seq}..={upto} over the SDK: {other:?}"),
        }
        seq = upto + 1;
    }
}

/// Payload bytes of one event of stream `id` in this test.
fn event_bytes(id: &str) -> u64 {
    match id.split('.').next() {
        Some("large") => LARGE_PAYLOAD as u64,
        Some("huge") => HUGE_PAYLOAD as u64,
        _ => khala_tests::test_payload(id, 10).len() as u64,
    }
}

/// Segments stored, and payload bytes below the streams' floors (trimmed), over all streams.
/// `(first_seq, last_seq)` of `stream_id`'s oldest segment.
fn oldest_segment(db: &TestDb, stream_id: &str) -> Option<(u64, u64)> {
    let rows = db.sql(&format!("SELECT first_seq, last_seq FROM stream_segment WHERE stream_id = '{stream_id}'"));
    rows.rows.iter().filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?))).min()
}

fn totals(all: &BTreeMap<String, Row>) -> (u64, u64) {
    let segments = all.values().map(|r| r.segment_count).sum();
    let trimmed = all.iter().map(|(id, r)| (r.oldest_seq - 1) * event_bytes(id)).sum();
    (segments, trimmed)
}

/// Runs `f` while another thread publishes one small event to `probe.0` every 50 ms,
/// timing each call: how long a sweep's transaction holds a `publish` up.
fn with_probe<T>(db: &TestDb, who: &Credentials, next_seq: &mut u64, f: impl FnOnce() -> T) -> (T, Latency) {
    let stop = AtomicBool::new(false);
    let seq = *next_seq;
    let (out, times) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut times = Vec::new();
            let mut seq = seq;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                publish_keyed(db, who, "probe.0", seq, 1, 1, 64);
                times.push(t.elapsed());
                seq += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            times
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        (out, prober.join().expect("the probe thread"))
    });
    *next_seq += times.len() as u64;
    (out, Latency::of(times))
}

/// Publish latencies: median, 99th percentile and maximum, in milliseconds.
#[derive(Debug)]
struct Latency {
    calls: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut times: Vec<Duration>) -> Self {
        times.sort();
        let at = |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        Latency { calls: times.len(), p50: at(0.5), p99: at(0.99), max: at(1.0) }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} publishes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", self.calls, self.p50, self.p99, self.max)
    }
}

/// Waits until `done(id, row)` holds for every stream, printing every 250 ms how many
/// streams of each kind are done. Returns the seconds since `start` and, per kind, the
/// second at which its last stream was done.
fn follow(db: &TestDb, what: &str, start: Instant, done: impl Fn(&str, &Row) -> bool) -> (f64, BTreeMap<String, f64>) {
    let mut next_print = 0.0;
    let mut finished: BTreeMap<String, f64> = BTreeMap::new();
    loop {
        let t = start.elapsed().as_secs_f64();
        let all = rows(db);
        let mut per_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (id, row) in &all {
            let kind = id.split('.').next().unwrap_or("").to_string();
            let entry = per_kind.entry(kind).or_default();
            entry.1 += 1;
            if done(id, row) {
                entry.0 += 1;
            }
        }
        for (kind, (ok, total)) in &per_kind {
            if ok == total {
                finished.entry(kind.clone()).or_insert(t);
            }
        }
        let all_done = per_kind.values().all(|(ok, total)| ok == total);
        if t >= next_print || all_done {
            let summary: Vec<String> = per_kind.iter().map(|(k, (ok, total))| format!("{k} {ok}/{total}")).collect();
            let segments: u64 = all.values().map(|r| r.segment_count).sum();
            eprintln!("{what} t={t:4.2}s streams done: {}; segments {segments}", summary.join(", "));
            next_print = t + 0.25;
        }
        if all_done {
            return (t, finished);
        }
        assert!(start.elapsed() < DEADLINE, "{what}: not done after {DEADLINE:?}: {per_kind:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sweeps_reach_every_stream_under_a_log_far_larger_than_their_budget() {
    let db = shared_server().new_database("sweeps");
    let publisher = db.publisher();
    // Publish everything first, then let the sweeps loose on the whole backlog at once.
    db.call("set_compaction", json!([3600]));
    let small: Vec<String> = (0..SMALL_STREAMS).map(|i| format!("small.{i:03}")).collect();
    let large: Vec<String> = (0..LARGE_STREAMS).map(|i| format!("large.{i}")).collect();
    let t = Instant::now();
    std::thread::scope(|scope| {
        for chunk in small.chunks(SMALL_STREAMS / 4) {
            let (db, publisher) = (&db, &publisher);
            scope.spawn(move || chunk.iter().for_each(|s| publish_range(db, publisher, s, 1, SMALL_EVENTS, 1)));
        }
        for s in &large {
            let (db, publisher) = (&db, &publisher);
            scope.spawn(move || publish_keyed(db, publisher, s, 1, LARGE_EVENTS, 1, LARGE_PAYLOAD));
        }
    });
    publish_over_sdk(&db, &publisher, "huge.0", 2 * HUGE_BATCH, HUGE_BATCH, HUGE_PAYLOAD);
    let published = rows(&db);
    let payload: u64 = published.iter().map(|(id, r)| r.head_seq * event_bytes(id)).sum();
    let (segments_before, _) = totals(&published);
    eprintln!(
        "published {} streams ({SMALL_STREAMS} x {SMALL_EVENTS} one-event segments; {LARGE_STREAMS} x {LARGE_EVENTS} one-event segments of {} KiB; \
         1 x 2 segments of {} MiB): {segments_before} segments, {:.1} MiB of payload, in {:.1} s",
        published.len(),
        LARGE_PAYLOAD / 1024,
        HUGE_BATCH as usize * HUGE_PAYLOAD / (1024 * 1024),
        payload as f64 / MIB,
        t.elapsed().as_secs_f64()
    );

    let mut probe_seq = 1;
    let ((), idle) = with_probe(&db, &publisher, &mut probe_seq, || std::thread::sleep(Duration::from_secs(2)));
    eprintln!("no sweep work: {idle}");

    // Compaction: each small stream merges into one segment, each large one into 1 MiB
    // segments of 5 events; the huge stream's 12 MiB segments (each over a run's whole
    // byte budget) are never loaded: they are not small, so publish moved compaction
    // past them.
    let (_, compaction_before) = loads(&db);
    let start = Instant::now();
    db.call("set_compaction", json!([0]));
    let per_large = LARGE_EVENTS.div_ceil(5);
    // The largest segment: one batch of the huge stream, with a little framing per event.
    let huge_segment = HUGE_BATCH * (HUGE_PAYLOAD as u64 + 64);
    let ((secs, finished), during) = with_probe(&db, &publisher, &mut probe_seq, || {
        follow(&db, "compaction", start, |id, row| match id.split('.').next() {
            Some("small") => row.segment_count == 1,
            Some("large") => row.segment_count == per_large,
            Some("huge") => row.compacted_through == row.head_seq,
            _ => true,
        })
    });
    let (segments_after, _) = totals(&rows(&db));
    let compaction = loads(&db).1.since(compaction_before);
    eprintln!(
        "compaction: every stream done {secs:.1} s after set_compaction(0) (small streams by {:.1} s, large by {:.1} s, huge by {:.1} s); \
         {segments_before} -> {segments_after} segments ({:.0} merged away/s), {:.1} MiB of payload held ({:.1} MiB/s); meanwhile {during}",
        finished["small"],
        finished["large"],
        finished["huge"],
        (segments_before - segments_after) as f64 / secs,
        payload as f64 / MIB,
        payload as f64 / MIB / secs
    );
    eprintln!("compaction, from set_compaction(0) on: {compaction}");
    assert!(compaction.max_run_bytes < RUN_BYTES + huge_segment, "a run loads at most its budget and one segment more");
    for s in small.iter().take(10).chain(&large[..1]) {
        verify_stream(&db, s).unwrap_or_else(|e| panic!("{e}"));
    }

    // Retention: small streams lose everything by age (1 s), large streams keep their
    // newest 10 events in whole segments (from the start of the segment that holds seq
    // 39: where compaction's 5-event segments begin depends on where its runs' budgets
    // fell), the huge stream its newest 48 (its first 12 MiB segment goes, more than a
    // run's whole byte budget).
    let first_kept = LARGE_EVENTS - 10 + 1;
    let (retention_before, _) = loads(&db);
    let ((secs, finished), during) = with_probe(&db, &publisher, &mut probe_seq, || {
        let start = Instant::now();
        for s in &small {
            db.call("set_retention", json!([s, 0, 1]));
        }
        for s in &large {
            db.call("set_retention", json!([s, 10, 0]));
        }
        db.call("set_retention", json!(["huge.0", HUGE_BATCH, 0]));
        eprintln!("retention: {} policies set in {:.1} s", SMALL_STREAMS + LARGE_STREAMS + 1, start.elapsed().as_secs_f64());
        follow(&db, "retention", start, |id, row| match id.split('.').next() {
            Some("small") => row.oldest_seq == row.head_seq + 1,
            Some("large") => oldest_segment(&db, id).is_some_and(|(first, last)| first == row.oldest_seq && first <= first_kept && last >= first_kept),
            Some("huge") => row.oldest_seq == HUGE_BATCH + 1,
            _ => true,
        })
    });
    let all = rows(&db);
    let (segments_left, trimmed) = totals(&all);
    let retention = loads(&db).0.since(retention_before);
    eprintln!(
        "retention: every stream done {secs:.1} s after the first set_retention (small streams by {:.1} s, large by {:.1} s, huge by {:.1} s); \
         {segments_after} -> {segments_left} segments, {:.1} MiB of payload deleted ({:.1} MiB/s); meanwhile {during}",
        finished["small"],
        finished["large"],
        finished["huge"],
        trimmed as f64 / MIB,
        trimmed as f64 / MIB / secs
    );
    eprintln!("retention, from the first set_retention on: {retention}");
    assert!(retention.max_run_bytes < RUN_BYTES + huge_segment, "a run loads at most its budget and one segment more");
    for s in &large {
        // At most 14 events (from seq 35 on) in segments of at most 5.
        assert!((1..=3).contains(&all[s].segment_count), "{s}: {:?}", all[s]);
    }
    let oldest = all[&large[0]].oldest_seq;
    assert_eq!(verify_stream(&db, &large[0]).unwrap_or_else(|e| panic!("{e}")), (oldest..=LARGE_EVENTS).collect::<Vec<_>>());
    assert_eq!((all["huge.0"].segment_count, all["huge.0"].oldest_seq), (1, HUGE_BATCH + 1));
    assert!(small.iter().all(|s| all[s].segment_count == 0));
    let kept = large.iter().map(|s| LARGE_EVENTS - all[s].oldest_seq + 1).sum::<u64>() + HUGE_BATCH + all["probe.0"].head_seq;
    assert_eq!(count(&db, "event_key") as u64, kept, "trimmed events' keys went with them");

    // With nothing left to do, no run loads a segment: the hints skip every stream
    // (including the small streams' trailing runs, which were rescanned every second).
    // Compaction may still have the probe's last one-event segments to merge (published
    // while retention ran; a CI run saw it load them in the idle window), so first wait
    // for a sweep interval and a half in which no run loaded anything. Sweeps that never
    // go quiet fail here.
    let quiet_by = Instant::now() + DEADLINE;
    let mut before = loads(&db);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = loads(&db);
        let quiet = (now.0.runs, now.1.runs) == (before.0.runs, before.1.runs);
        before = now;
        if quiet {
            break;
        }
        assert!(Instant::now() < quiet_by, "the sweeps still loaded segments {DEADLINE:?} after retention was done");
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (r, c) = loads(&db);
    eprintln!("idle for 2.5 s: retention {}, compaction {}", r.since(before.0), c.since(before.1));
    assert_eq!((r.runs, c.runs), (before.0.runs, before.1.runs), "an idle sweep loads nothing");
}

/// Calls `reset_stream` until the stream's epoch changes; returns the rows seen after
/// each call.
fn reset(db: &TestDb, stream_id: &str) -> Vec<Row> {
    let epoch = rows(db)[stream_id].epoch;
    let mut seen = Vec::new();
    for _ in 0..100 {
        db.call("reset_stream", json!([stream_id]));
        let row = rows(db)[stream_id].clone();
        seen.push(row.clone());
        if row.epoch != epoch {
            return seen;
        }
    }
    panic!("{stream_id}: still not reset after 100 calls: {seen:?}");
}

#[test]
fn reset_stream_deletes_in_bounded_steps_and_then_starts_a_new_epoch() {
    let db = shared_server().new_database("reset");
    let publisher = db.publisher();
    db.call("set_compaction", json!([3600]));
    // 600 one-event segments: three steps of at most 256 segments (`retention_chunk_segments`).
    publish_keyed(&db, &publisher, "s.r", 1, 600, 1, 64);
    publish_keyed(&db, &publisher, "s.other", 1, 3, 1, 64);
    let steps = reset(&db, "s.r");
    let summary: Vec<(u64, u64, u64)> = steps.iter().map(|r| (r.epoch, r.oldest_seq, r.segment_count)).collect();
    eprintln!("reset_stream of 600 segments: (epoch, oldest_seq, segments) after each call: {summary:?}");
    assert_eq!(summary, vec![(1, 257, 344), (1, 513, 88), (2, 1, 0)]);
    assert_eq!(steps[2].head_seq, 0);
    assert_eq!(count(&db, "event_key"), 3, "only the other stream's keys are left");
    // The same keys publish again as new events of the new epoch.
    publish_keyed(&db, &publisher, "s.r", 1, 5, 5, 64);
    assert_eq!(verify_stream(&db, "s.r").unwrap(), (1..=5).collect::<Vec<_>>());
    // A stream that fits in one step is reset by one call.
    assert_eq!(reset(&db, "s.other").len(), 1);
}

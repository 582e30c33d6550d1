//! Exactly-once effects in a local SQLite store: `khala tail --sqlite` is SIGKILLed at
//! random points while it replays a backlog and live events keep arriving; at the end its
//! `events` table holds every event exactly once, checked by seq and by the chain hash
//! recomputed from GENESIS over the payloads the test published.

use khala_client::store::sqlite::SqliteStore;
use khala_proto::hash::{chain_hash, payload_hash, GENESIS};
use khala_tests::bin::{isolated_khala, khala_bin};
use khala_tests::{publish_range, shared_server, test_payload, TestDb};
use rand::Rng;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM: &str = "s.sqlite";
const KILLS: usize = 20;
/// The backlog: 20 incarnations, each killed within 150 ms of its first commit,
/// do not finish it (a debug build replays about 10k events/s on 2 cores).
const BACKLOG: u64 = 100_000;

fn tail(db: &TestDb, dir: &Path, token: &Path, run: usize, exit_when_live: bool) -> Child {
    let log = std::fs::File::create(dir.join(format!("tail-{run}.log"))).unwrap();
    let mut command = isolated_khala(dir);
    command
        .args(["tail", "--quiet", "--no-ack", "--stream", STREAM, "--server", &db.url, "--database", &db.name])
        .arg("--token-file")
        .arg(token)
        .arg("--sqlite")
        .arg(dir.join("app.db"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if exit_when_live {
        command.arg("--exit-when-live");
    }
    command.spawn().unwrap()
}

/// Committed events and the highest seq (0, 0 before the file exists).
fn extent(path: &Path) -> (u64, u64) {
    if !path.exists() {
        return (0, 0);
    }
    SqliteStore::open_read_only(path).and_then(|s| s.extent(STREAM)).unwrap_or((0, 0))
}

/// The store's own invariant after a crash: the cursor is the last stored event.
fn assert_cursor_matches_events(path: &Path) {
    let store = SqliteStore::open_read_only(path).unwrap();
    let (count, max) = store.extent(STREAM).unwrap();
    let cursors = store.stored_cursors().unwrap();
    if count == 0 {
        assert!(cursors.is_empty(), "a cursor without events: {cursors:?}");
        return;
    }
    assert_eq!(count, max, "gaps or duplicates after a kill: {count} rows up to seq {max}");
    let cursor = cursors.iter().find(|c| c.stream_id == STREAM).expect("events without a cursor");
    let last = store.events(STREAM).unwrap().pop().unwrap();
    assert_eq!((cursor.seq, &cursor.chain_hash), (last.seq, &last.chain_hash), "the cursor and the events disagree");
}

fn kill_drill(label: &str, backlog: u64) {
    let started = Instant::now();
    let db = shared_server().new_database(label);
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, STREAM, &["subscribe"], 3600);
    let dir = tempfile::tempdir().unwrap();
    let token = khala_tests::client::token_file(dir.path(), &reader);
    let file = dir.path().join("app.db");
    // Built (or found built) before the clock matters.
    khala_bin();

    publish_range(&db, &publisher, STREAM, 1, backlog, 1000);
    eprintln!("backlog of {backlog} published in {:.1} s", started.elapsed().as_secs_f64());

    // Live traffic through the whole drill: 20 events every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let head = Arc::new(AtomicU64::new(backlog));
    let live = std::thread::scope(|scope| {
        let (stop2, head2, db2, publisher2) = (stop.clone(), head.clone(), &db, &publisher);
        let live = scope.spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let from = head2.load(Ordering::Relaxed) + 1;
                publish_range(db2, publisher2, STREAM, from, 20, 20);
                head2.store(from + 19, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });

        let mut rng = rand::thread_rng();
        let (mut mid_run, mut mid_replay) = (0, 0);
        for run in 1..=KILLS {
            let (before, _) = extent(&file);
            let mut child = tail(&db, dir.path(), &token, run, false);
            // Kill at a random point after this incarnation's first commit.
            let deadline = Instant::now() + Duration::from_secs(20);
            while extent(&file).0 <= before && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            // One commit interval (the client persists every 20 ms while it applies), so
            // the kill lands anywhere in the batch being applied, and 20 kills, each a
            // commit or more apart, all land within the 100k backlog: at 0..150 ms one run
            // reached 100,144 at the 20th kill, and at 0..60 ms one on a faster day 102,144.
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
            let alive = child.try_wait().unwrap().is_none();
            let published = head.load(Ordering::Relaxed);
            child.kill().unwrap();
            child.wait().unwrap();
            let (after, _) = extent(&file);
            assert_cursor_matches_events(&file);
            let landed = alive && after > before && after < published;
            mid_run += usize::from(landed);
            mid_replay += usize::from(landed && after < backlog);
            eprintln!("kill {run}: alive {alive}, stored {before} -> {after} of {published} published");
        }
        stop.store(true, Ordering::Relaxed);
        live.join().unwrap();
        (mid_run, mid_replay)
    });
    let (mid_run, mid_replay) = live;
    let published = head.load(Ordering::Relaxed);

    let mut last = tail(&db, dir.path(), &token, KILLS + 1, true);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = last.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the last run did not reach live");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the last run failed: {}", std::fs::read_to_string(dir.path().join(format!("tail-{}.log", KILLS + 1))).unwrap());

    // No incarnation had an event refused by the store (a duplicate or a gap).
    let mut refused = 0;
    for run in 1..=KILLS + 1 {
        let log = std::fs::read_to_string(dir.path().join(format!("tail-{run}.log"))).unwrap();
        refused += log.lines().filter(|l| l.contains("handler failed") || l.contains("store_")).count();
    }

    let store = SqliteStore::open_read_only(&file).unwrap();
    let events = store.events(STREAM).unwrap();
    let mut chain = GENESIS;
    let (mut duplicates, mut gaps, mut bad_chain) = (0u64, 0u64, 0u64);
    let mut expect = 1;
    for e in &events {
        duplicates += u64::from(e.seq < expect);
        gaps += e.seq.saturating_sub(expect);
        expect = e.seq + 1;
        let payload = test_payload(STREAM, e.seq);
        chain = chain_hash(&chain, STREAM, e.seq, "test.event", &payload_hash(&payload));
        bad_chain += u64::from(e.payload != payload || e.chain_hash != chain);
    }
    gaps += published.saturating_sub(expect - 1);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sqlite kill drill: {KILLS} SIGKILLs ({mid_run} mid-run, {mid_replay} mid-replay of the {backlog}-event backlog), \
         {published} events published, {} stored: {duplicates} duplicates, {gaps} gaps, {bad_chain} chain mismatches, \
         {refused} refused by the store; {secs:.1} s",
        events.len()
    );
    assert_eq!(events.len() as u64, published);
    assert_eq!((duplicates, gaps, bad_chain, refused), (0, 0, 0, 0));
    let cursor = store.stored_cursors().unwrap().pop().unwrap();
    assert_eq!((cursor.seq, cursor.chain_hash.as_slice()), (published, &chain[..]));
    assert_eq!(mid_run, KILLS, "every kill must land while the process was alive, after it stored some and before it stored all");
    assert_eq!(mid_replay, KILLS, "every kill must land during the backlog's replay");
}

#[test]
fn sigkill_20_times_during_a_100k_replay_and_live_traffic_stores_every_event_exactly_once() {
    kill_drill("sqlite-kill", BACKLOG);
}

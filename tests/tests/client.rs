//! The client on a real server: resume from the checkpoint, bounded replay windows,
//! acks, handler retries, stale cursors, revocation, corrupt checkpoints, and a handler's
//! syncer.

use khala_client::{Event, Handler, HandlerError, SyncClient, Syncer};
use khala_proto::v1::{ConnectionState, RebootstrapReason};
use khala_proto::{StaleCursor, StreamCursor};
use khala_tests::client::{config, token_file, RunningClient};
use khala_tests::{publish_range, shared_server, wait_for};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_restart_resumes_from_the_checkpoint_with_no_gap_and_no_double_apply() {
    let db = shared_server().new_database("resume");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.a", &["subscribe", "ack"], 600);
    db.grant(&reader, "s.b", &["subscribe", "ack"], 600);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.a", "s.b"]);

    publish_range(&db, &publisher, "s.a", 1, 120, 7);
    publish_range(&db, &publisher, "s.b", 1, 30, 30);
    let first = RunningClient::start(cfg.clone(), None, 0);
    first.wait_applied("s.a", 120, T);
    first.wait_applied("s.b", 30, T);
    // Live: events published now arrive through the live window.
    publish_range(&db, &publisher, "s.a", 121, 10, 1);
    first.wait_applied("s.a", 130, T);
    first.wait_state("s.a", ConnectionState::Live, T);
    assert_eq!(first.applied("s.a"), (1..=130).collect::<Vec<_>>());
    // Acks reach the module after the checkpoint.
    wait_for("the ack of s.a at 130", T, || {
        let rows = db.sql("SELECT * FROM client_ack WHERE stream_id = 's.a'");
        rows.rows.first().and_then(|r| rows.get(r, "acked_seq").cloned()).filter(|v| *v == json!(130))
    });
    first.stop().unwrap();

    publish_range(&db, &publisher, "s.a", 131, 50, 10);
    let second = RunningClient::start(cfg, None, 0);
    second.wait_applied("s.a", 180, T);
    assert_eq!(second.applied("s.a"), (131..=180).collect::<Vec<_>>(), "resumed exactly after the checkpoint");
    assert!(second.applied("s.b").is_empty(), "nothing of s.b was applied twice");
    assert!(second.seen.lock().unwrap().rebootstraps.is_empty());
    second.stop().unwrap();
}

#[test]
fn a_backlog_larger_than_the_window_replays_in_order() {
    let db = shared_server().new_database("windows");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.w", &["subscribe"], 600);
    // Three window buckets and a bit: the client must move its windows to get them all.
    let backlog = 3 * khala_proto::hash::WINDOW_EVENTS + 500;
    publish_range(&db, &publisher, "s.w", 1, backlog, 1_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.w"]);
    cfg.ack = false;
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.w", backlog, Duration::from_secs(60));
    client.wait_state("s.w", ConnectionState::Live, T);
    publish_range(&db, &publisher, "s.w", backlog + 1, 300, 1);
    client.wait_applied("s.w", backlog + 300, T);
    assert_eq!(client.applied("s.w"), (1..=backlog + 300).collect::<Vec<_>>());
    // The windows follow the cursor: at most five stay open (the cursor's, two ahead, the
    // one before it when a segment may straddle, and the one just left, until its close
    // delay has passed).
    let windows = db.sql("SELECT * FROM client_window");
    assert!(windows.rows.len() <= 5, "{} windows open", windows.rows.len());
    client.stop().unwrap();
}

#[test]
fn a_failing_handler_is_retried_from_the_same_seq_never_skipped() {
    let db = shared_server().new_database("handler");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.h", &["subscribe"], 600);
    publish_range(&db, &publisher, "s.h", 1, 20, 20);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.h"]);
    let client = RunningClient::start(cfg, Some(7), 3);
    client.wait_applied("s.h", 20, T);
    assert_eq!(client.applied("s.h"), (1..=20).collect::<Vec<_>>());
    assert_eq!(client.seen.lock().unwrap().failures, 3);
    client.stop().unwrap();
}

#[test]
fn retention_overtaking_the_cursor_rebootstraps_with_the_numbers() {
    let db = shared_server().new_database("stale");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.r", &["subscribe"], 600);
    db.call("create_stream", json!(["s.r", 10, 0]));
    publish_range(&db, &publisher, "s.r", 1, 10, 10);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.r"]);
    let client = RunningClient::start(cfg.clone(), None, 0);
    client.wait_applied("s.r", 10, T);
    client.stop().unwrap();

    publish_range(&db, &publisher, "s.r", 11, 50, 5);
    wait_for("the floor to pass the cursor", T, || {
        khala_tests::verify::stream(&db, "s.r").filter(|s| s.oldest_seq > 11)
    });
    let floor = khala_tests::verify::stream(&db, "s.r").unwrap().oldest_seq;
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.r", 60, T);
    let seen = client.seen.lock().unwrap();
    assert_eq!(seen.rebootstraps.len(), 1, "{:?}", seen.rebootstraps);
    let stale = &seen.rebootstraps[0];
    assert_eq!(stale.reason, RebootstrapReason::StaleCursor as i32);
    assert_eq!((stale.requested, stale.oldest_available, stale.head), (10, floor - 1, 60));
    let applied: Vec<u64> = seen.applied.iter().map(|(_, s)| *s).collect();
    assert_eq!(applied, (floor..=60).collect::<Vec<_>>(), "rebuilt from the floor, deterministically");
    drop(seen);
    client.stop().unwrap();
}

#[test]
fn a_rebootstrap_the_handler_has_not_taken_is_not_checkpointed() {
    let db = shared_server().new_database("stale-durable");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.d", &["subscribe"], 600);
    db.call("create_stream", json!(["s.d", 10, 0]));
    publish_range(&db, &publisher, "s.d", 1, 10, 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.d"]);
    cfg.ack = false;
    let client = RunningClient::start(cfg.clone(), None, 0);
    client.wait_applied("s.d", 10, T);
    client.stop().unwrap();
    publish_range(&db, &publisher, "s.d", 11, 50, 5);
    wait_for("the floor to pass the cursor", T, || khala_tests::verify::stream(&db, "s.d").filter(|s| s.oldest_seq > 11));

    // The handler refuses the rebootstrap; the process stops before it ever succeeds.
    let recorder = khala_tests::client::Recorder { seen: Default::default(), fail_at: None, fail_times: 0, fail_rebootstraps: true };
    let refusing = RunningClient::start_with(cfg.clone(), recorder);
    wait_for("a refused rebootstrap", T, || (refusing.seen.lock().unwrap().failures > 0).then_some(()));
    refusing.stop().unwrap();
    let stored = khala_client::checkpoint::CheckpointFile::new(&cfg.checkpoint).load().unwrap().unwrap();
    assert_eq!(stored[0].seq, 10, "the old cursor stays until the handler has dropped the stream");

    // The next run is told again, and rebuilds.
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.d", 60, T);
    assert_eq!(client.seen.lock().unwrap().rebootstraps.len(), 1);
    client.stop().unwrap();
}

#[test]
fn a_revoked_stream_reports_forbidden() {
    let db = shared_server().new_database("forbidden");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.f", &["subscribe"], 600);
    publish_range(&db, &publisher, "s.f", 1, 5, 5);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.f"]);
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.f", 5, T);
    db.revoke(&reader, "s.f");
    client.wait_state("s.f", ConnectionState::Forbidden, T);
    publish_range(&db, &publisher, "s.f", 6, 5, 5);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(client.applied("s.f"), (1..=5).collect::<Vec<_>>(), "nothing arrives after the revoke");
    client.stop().unwrap();
}

#[test]
fn a_corrupt_checkpoint_is_reported_set_aside_and_recovered() {
    let db = shared_server().new_database("corrupt");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.c", &["subscribe"], 600);
    publish_range(&db, &publisher, "s.c", 1, 8, 4);
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("cp");
    std::fs::write(&checkpoint, b"KHCP\0\x01 this is not a checkpoint").unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &checkpoint, &["s.c"]);
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.c", 8, T);
    assert_eq!(client.applied("s.c"), (1..=8).collect::<Vec<_>>());
    let seen = client.seen.lock().unwrap();
    assert_eq!(seen.rebootstraps.len(), 1);
    assert_eq!(seen.rebootstraps[0].reason, RebootstrapReason::CorruptCheckpoint as i32);
    drop(seen);
    assert!(client.health.get().last_error.contains("checkpoint_corrupt"));
    let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("cp.corrupt-")).collect();
    assert_eq!(aside.len(), 1, "the corrupt file was moved aside, not deleted");
    client.stop().unwrap();
    assert!(khala_client::checkpoint::CheckpointFile::new(&checkpoint).load().unwrap().is_some());
}

#[test]
fn an_incompatible_client_stops_retrying() {
    let db = shared_server().new_database("upgrade");
    db.call("set_protocol_window", json!([1, 1, "9.0.0"]));
    let reader = db.new_identity();
    db.grant(&reader, "s.u", &["subscribe"], 600);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.u"]);
    let client = RunningClient::start(cfg, None, 0);
    wait_for("the upgrade_required state", T, || (client.health.get().state == ConnectionState::UpgradeRequired as i32).then_some(()));
    let err = client.stop().unwrap_err();
    assert_eq!(err.code(), "upgrade_required");
}

#[test]
fn compaction_under_a_live_client_applies_nothing_twice() {
    let db = shared_server().new_database("compaction");
    db.call("set_compaction", json!([0]));
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.k", &["subscribe"], 600);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.k"]);
    cfg.ack = false;
    let client = RunningClient::start(cfg.clone(), None, 0);
    // Low-rate publishing: one event per call, one small segment each.
    publish_range(&db, &publisher, "s.k", 1, 150, 1);
    client.wait_applied("s.k", 150, T);
    let compacted = wait_for("compaction", T, || khala_tests::verify::stream(&db, "s.k").filter(|s| s.segment_count < 10));
    assert_eq!(khala_tests::verify::verify_stream(&db, "s.k").unwrap(), (1..=150).collect::<Vec<_>>());
    publish_range(&db, &publisher, "s.k", 151, 10, 1);
    client.wait_applied("s.k", 160, T);
    assert_eq!(client.applied("s.k"), (1..=160).collect::<Vec<_>>(), "merged segments were not applied twice");
    client.stop().unwrap();
    eprintln!("150 one-event segments compacted to {}", compacted.segment_count);
    // A fresh client replays the compacted log.
    let fresh = RunningClient::start({ cfg.checkpoint = dir.path().join("cp2"); cfg }, None, 0);
    fresh.wait_applied("s.k", 160, T);
    assert_eq!(fresh.applied("s.k"), (1..=160).collect::<Vec<_>>());
    fresh.stop().unwrap();
}

#[test]
fn an_epoch_change_rebootstraps_the_stream() {
    let db = shared_server().new_database("epoch");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.e", &["subscribe"], 600);
    publish_range(&db, &publisher, "s.e", 1, 20, 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.e"]);
    cfg.ack = false;
    let client = RunningClient::start(cfg, None, 0);
    client.wait_applied("s.e", 20, T);
    db.call("reset_stream", json!(["s.e"]));
    assert_eq!(khala_tests::verify::stream(&db, "s.e").map(|s| (s.epoch, s.head_seq)), Some((2, 0)));
    publish_range(&db, &publisher, "s.e", 1, 5, 5);
    wait_for("the rebootstrap", T, || (!client.seen.lock().unwrap().rebootstraps.is_empty()).then_some(()));
    wait_for("the new history", T, || (client.applied("s.e").len() == 25).then_some(()));
    let seen = client.seen.lock().unwrap();
    assert_eq!(seen.rebootstraps[0].reason, RebootstrapReason::EpochChanged as i32);
    assert_eq!(seen.rebootstraps[0].epoch, 2);
    let applied: Vec<u64> = seen.applied.iter().map(|(_, s)| *s).collect();
    assert_eq!(applied, (1..=20).chain(1..=5).collect::<Vec<_>>());
    drop(seen);
    client.stop().unwrap();
}

/// A live event is handed over and then reported caught up at once (what `khala tail`
/// flushes its output on), not at the next checkpoint; a replay is reported caught up
/// only between runs of events, not after each one.
#[test]
fn the_handler_hears_it_is_caught_up_after_each_live_event() {
    let db = shared_server().new_database("caught-up");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.c", &["subscribe"], 600);
    publish_range(&db, &publisher, "s.c", 1, 3000, 1000);
    let dir = tempfile::tempdir().unwrap();
    let client = RunningClient::start(config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.c"]), None, 0);
    client.wait_applied("s.c", 3000, T);
    wait_for("caught up after the replay", T, || client.seen.lock().unwrap().caught_up_at.contains(&3000).then_some(()));
    let during_replay = client.seen.lock().unwrap().caught_up_at.len();
    assert!(during_replay < 100, "a replay of 3000 events was reported caught up {during_replay} times");
    for seq in 3001..=3005 {
        publish_range(&db, &publisher, "s.c", seq, 1, 1);
        let n = seq as usize;
        wait_for("caught up after a live event", Duration::from_secs(2), || client.seen.lock().unwrap().caught_up_at.contains(&n).then_some(()));
    }
    client.stop().unwrap();
}

/// A handler that owns its cursors in memory, commits at `persist`, records the seqs it
/// applied, and hands over the syncer its test gives it: a stand-in for a store whose
/// fsync is slow, or fails.
struct SyncedInMemory {
    applied: Arc<Mutex<Vec<u64>>>,
    pending: Option<StreamCursor>,
    committed: Option<StreamCursor>,
    sync: Option<Syncer>,
}

impl SyncedInMemory {
    fn new(sync: Syncer) -> SyncedInMemory {
        SyncedInMemory { applied: Arc::default(), pending: None, committed: None, sync: Some(sync) }
    }
}

impl Handler for SyncedInMemory {
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError> {
        self.applied.lock().unwrap().push(event.seq);
        self.pending = Some(event.cursor(0));
        Ok(())
    }

    fn rebootstrap(&mut self, _stale: &StaleCursor) -> Result<(), HandlerError> {
        Err("no rebootstrap in this test".into())
    }

    fn persist(&mut self) -> Result<(), HandlerError> {
        if let Some(cursor) = self.pending.take() {
            self.committed = Some(cursor);
        }
        Ok(())
    }

    fn cursors(&mut self) -> Result<Option<Vec<StreamCursor>>, HandlerError> {
        self.pending = None;
        Ok(Some(self.committed.iter().cloned().collect()))
    }

    fn syncer(&mut self) -> Option<Syncer> {
        self.sync.take()
    }
}

/// A handler's syncer runs off the sync loop: events keep being applied while it waits,
/// and nothing it has not synced is acked (an ack says the client durably has it).
#[test]
fn a_handlers_sync_holds_back_its_acks_and_not_its_applies() {
    let db = shared_server().new_database("syncer");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.y", &["subscribe", "ack"], 600);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.y"]);
    cfg.ack = true;
    // The syncer waits at a gate the test opens and closes.
    let gate = Arc::new((Mutex::new(true), Condvar::new()));
    let syncs_started = Arc::new(AtomicU64::new(0));
    let (waits_at, started) = (gate.clone(), syncs_started.clone());
    let handler = SyncedInMemory::new(Box::new(move || {
        started.fetch_add(1, Ordering::SeqCst);
        let (open, opened) = &*waits_at;
        let _open = opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
        Ok(())
    }));
    let applied = handler.applied.clone();
    let mut client = SyncClient::new(cfg, handler).unwrap();
    assert_eq!(syncs_started.load(Ordering::SeqCst), 1, "the client syncs as it is made, before it trusts the handler's cursors");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || client.run(&flag));
    let applied_up_to = |seq: u64| applied.lock().unwrap().last().is_some_and(|s| *s >= seq);
    let acked = || {
        let rows = db.sql("SELECT * FROM client_ack WHERE stream_id = 's.y'");
        rows.rows.first().and_then(|r| rows.get(r, "acked_seq").cloned())
    };
    let set_gate = |open: bool| {
        *gate.0.lock().unwrap() = open;
        gate.1.notify_all();
    };

    publish_range(&db, &publisher, "s.y", 1, 20, 20);
    wait_for("s.y applied up to 20", T, || applied_up_to(20).then_some(()));
    wait_for("the ack of s.y at 20", T, || acked().filter(|v| *v == json!(20)));

    set_gate(false);
    let before = syncs_started.load(Ordering::SeqCst);
    publish_range(&db, &publisher, "s.y", 21, 20, 20);
    wait_for("s.y applied up to 40", T, || applied_up_to(40).then_some(()));
    wait_for("a sync to start at the gate", T, || (syncs_started.load(Ordering::SeqCst) > before).then_some(()));
    // The sync waits at the gate; the loop does not.
    publish_range(&db, &publisher, "s.y", 41, 20, 5);
    wait_for("s.y applied up to 60 while the sync waits", T, || applied_up_to(60).then_some(()));
    // Acks go out every 500 ms at most: three intervals without a new one.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(acked(), Some(json!(20)), "an ack went past what the handler's sync had returned for");
    assert_eq!(syncs_started.load(Ordering::SeqCst), before + 1, "a second sync started while the first was in flight");

    set_gate(true);
    wait_for("the ack of s.y at 60", T, || acked().filter(|v| *v == json!(60)));
    assert_eq!(*applied.lock().unwrap(), (1..=60).collect::<Vec<_>>());
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap().unwrap();
}

/// A syncer that fails at its `fail_at`-th call (the first is the one made as the client
/// is made), counting its calls in `calls`.
fn failing_at(fail_at: u64, calls: Arc<AtomicU64>) -> Syncer {
    Box::new(move || match calls.fetch_add(1, Ordering::SeqCst) + 1 {
        n if n == fail_at => Err("injected fsync failure".into()),
        _ => Ok(()),
    })
}

/// A failed sync ends `run` with `handler_sync_failed`, acks nothing it was to vouch
/// for, and is never run again: a `run` called again ends the same way.
#[test]
fn a_failed_sync_ends_run_and_is_never_retried() {
    let db = shared_server().new_database("sync-fails");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.f", &["subscribe", "ack"], 600);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &token_file(dir.path(), &reader), &dir.path().join("cp"), &["s.f"]);
    cfg.ack = true;
    publish_range(&db, &publisher, "s.f", 1, 10, 10);

    // At a checkpoint: the third call (after the one as it is made, and the one before
    // the connection reads the handler's cursors).
    let calls = Arc::new(AtomicU64::new(0));
    let handler = SyncedInMemory::new(failing_at(3, calls.clone()));
    let mut client = SyncClient::new(cfg.clone(), handler).unwrap();
    let stop = AtomicBool::new(false);
    let err = client.run(&stop).expect_err("a failed sync ends run");
    assert_eq!(err.code(), "handler_sync_failed");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Were the syncer run again (and succeed), this run would go on until the stop.
    let again = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            stop.store(true, Ordering::Relaxed);
        });
        client.run(&stop)
    });
    let err = again.expect_err("a run called again ends the same way");
    assert_eq!(err.code(), "handler_sync_failed");
    stop.store(false, Ordering::Relaxed);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the syncer ran again after it failed");
    let rows = db.sql("SELECT * FROM client_ack WHERE stream_id = 's.f'");
    assert!(rows.rows.is_empty(), "an ack went out for what the failed sync was to vouch for");
    drop(client);

    // Before a connection reads the handler's cursors: the session stops, and says why.
    let calls = Arc::new(AtomicU64::new(0));
    let handler = SyncedInMemory::new(failing_at(2, calls.clone()));
    let mut client = SyncClient::new(cfg, handler).unwrap();
    let err = client.run(&stop).expect_err("a failed sync ends run");
    assert_eq!(err.code(), "handler_sync_failed");
    assert!(client.health().get().last_error.starts_with("handler_sync_failed"), "health says: {:?}", client.health().get().last_error);
    // That stopped the client for good: a `run` called again ends at once, the same way
    // (it used to wait on a session that would never start, until its stop).
    let again = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            stop.store(true, Ordering::Relaxed);
        });
        client.run(&stop)
    });
    assert_eq!(again.expect_err("a run after a stop for good ends with its failure").code(), "handler_sync_failed");
}

//! The module on a real server, exercised as non-owner identities: roles and grants,
//! row-level security (live delivery, eviction on revoke and on lease expiry), publish
//! dedupe and sequence checks, the hash chain, acks, retention, bad input, republish.

use khala_client::module_bindings::*;
use khala_proto::hash::GENESIS;
use khala_proto::ErrorCode;
use khala_tests::verify::{count, segments, stream, stream_view as view, verify_stream};
use khala_tests::{event_json, sdk, shared_server, wait_for, TestDb};
use khala_tools::api::{bytes_arg, Credentials};
use khala_tools::ToolError;
use serde_json::{json, Value};
use spacetimedb_sdk::{DbContext, Table};
use std::time::Duration;

fn code(result: Result<(), ToolError>) -> ErrorCode {
    match result {
        Err(ToolError::Reducer { error, .. }) => error.code,
        other => panic!("expected a reducer error, got {other:?}"),
    }
}

fn message(result: Result<(), ToolError>) -> String {
    match result {
        Err(ToolError::Reducer { error, .. }) => error.message,
        other => panic!("expected a reducer error, got {other:?}"),
    }
}

/// A batch of `n` events with seqs `from..from+n` and keys `k<seq>`.
fn batch(from: u64, n: u64) -> Value {
    Value::Array((from..from + n).map(|s| event_json(&format!("k{s}"), "test.event", format!("{{\"n\":{s}}}").as_bytes(), Some(s))).collect())
}

fn publish(db: &TestDb, who: &Credentials, stream_id: &str, events: Value) -> Result<(), ToolError> {
    db.call_as(who, "publish", json!([stream_id, events]))
}

#[test]
fn unauthorised_calls_are_refused_with_their_code_and_write_nothing() {
    let db = shared_server().new_database("unauth");
    let stranger = db.new_identity();
    let publisher = db.publisher();
    publish(&db, &publisher, "s.a", batch(1, 1)).unwrap();

    assert_eq!(code(publish(&db, &stranger, "s.a", batch(2, 1))), ErrorCode::ForbiddenStream);
    assert_eq!(code(db.call_as(&stranger, "grant", json!([stranger.identity_arg(), "s.a", ["subscribe"], 60]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&stranger, "revoke", json!([stranger.identity_arg(), "s.a"]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&stranger, "create_stream", json!(["s.new", 0, 0]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&stranger, "reset_stream", json!(["s.a"]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&stranger, "set_compaction", json!([0]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&stranger, "set_role", json!([stranger.identity_arg(), "admin", true]))), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&publisher, "set_role", json!([publisher.identity_arg(), "admin", true]))), ErrorCode::Unauthorized);
    let head_hash = stream(&db, "s.a").unwrap().head_hash;
    assert_eq!(code(db.call_as(&stranger, "ack", json!(["s.a", 1, bytes_arg(&head_hash)]))), ErrorCode::ForbiddenStream);
    // A subscribe-only grant does not allow acks.
    db.grant(&stranger, "s.a", &["subscribe"], 60);
    assert_eq!(code(db.call_as(&stranger, "ack", json!(["s.a", 1, bytes_arg(&head_hash)]))), ErrorCode::ForbiddenStream);

    assert_eq!(stream(&db, "s.a").unwrap().head_seq, 1);
    assert!(stream(&db, "s.new").is_none());
    assert_eq!(count(&db, "stream_grant"), 1);
    assert_eq!(count(&db, "client_ack"), 0);
    // Scheduled reducers refuse outside callers, the owner included.
    let sweep = json!([{ "scheduled_id": 1, "scheduled_at": { "Interval": { "__time_duration_micros__": 1000 } } }]);
    assert_eq!(code(db.call_as(&db.owner.clone(), "sweep_retention", sweep.clone())), ErrorCode::Unauthorized);
    assert_eq!(code(db.call_as(&db.owner.clone(), "sweep_grants", sweep)), ErrorCode::Unauthorized);
}

#[test]
fn a_subscriber_sees_only_granted_streams_live_and_loses_them_on_revoke() {
    let db = shared_server().new_database("rls");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.a", &["subscribe"], 600);
    db.grant(&reader, "s.sentinel", &["subscribe"], 600);
    let conn = sdk::connect(&db, &reader);
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment", "SELECT * FROM stream", "SELECT * FROM stream_grant", "SELECT * FROM presence", "SELECT * FROM connection"]);
    db.open_window(&reader, "s.a", 0);
    db.open_window(&reader, "s.sentinel", 0);
    // No window can be opened on a stream without a subscribe grant.
    assert_eq!(code(db.call_as(&reader, "open_window", json!(["s.b", 0]))), ErrorCode::ForbiddenStream);

    // B is published first: if B were visible, its rows would arrive before A's.
    publish(&db, &publisher, "s.b", batch(1, 3)).unwrap();
    publish(&db, &publisher, "s.a", batch(1, 2)).unwrap();
    wait_for("A's segment", Duration::from_secs(10), || conn.db.stream_segment().iter().find(|s| s.stream_id == "s.a"));
    assert!(conn.db.stream_segment().iter().all(|s| s.stream_id == "s.a"), "a segment of an ungranted stream was delivered");
    assert!(conn.db.stream().iter().all(|s| s.stream_id == "s.a"));
    // It sees its own grants only, no presence count (not an admin), its own connection only.
    assert_eq!(conn.db.stream_grant().count(), 2);
    assert_eq!(conn.db.presence().count(), 0);
    assert!(conn.db.connection().iter().all(|c| c.identity.to_hex().to_string() == reader.identity));

    db.revoke(&reader, "s.a");
    wait_for("A's rows to be evicted", Duration::from_secs(10), || {
        (conn.db.stream_segment().iter().all(|s| s.stream_id != "s.a") && conn.db.stream().iter().all(|s| s.stream_id != "s.a")).then_some(())
    });
    assert_eq!(count(&db, "client_window"), 1, "revoke closed the windows on s.a");
    publish(&db, &publisher, "s.a", batch(3, 1)).unwrap();
    publish(&db, &publisher, "s.sentinel", batch(1, 1)).unwrap();
    wait_for("the sentinel", Duration::from_secs(10), || conn.db.stream_segment().iter().find(|s| s.stream_id == "s.sentinel"));
    assert!(conn.db.stream_segment().iter().all(|s| s.stream_id != "s.a"), "events arrived after revoke");
    let _ = conn.disconnect();
}

#[test]
fn an_expired_lease_ends_delivery_like_a_revoke() {
    let db = shared_server().new_database("lease");
    let publisher = db.publisher();
    let reader = db.new_identity();
    publish(&db, &publisher, "s.a", batch(1, 1)).unwrap();
    db.grant(&reader, "s.a", &["subscribe", "ack"], 2);
    let conn = sdk::connect(&db, &reader);
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment", "SELECT * FROM stream"]);
    db.open_window(&reader, "s.a", 0);
    wait_for("the segment", Duration::from_secs(5), || (conn.db.stream_segment().count() == 1).then_some(()));
    wait_for("the expired grant's rows to be evicted", Duration::from_secs(10), || (conn.db.stream_segment().count() == 0).then_some(()));
    assert_eq!(count(&db, "stream_grant"), 0, "the sweep deleted the expired grant");
    let head = stream(&db, "s.a").unwrap();
    assert_eq!(code(db.call_as(&reader, "ack", json!(["s.a", 1, bytes_arg(&head.head_hash)]))), ErrorCode::ForbiddenStream);
    let _ = conn.disconnect();
}

#[test]
fn republishing_a_batch_adds_nothing_and_conflicts_are_named() {
    let db = shared_server().new_database("dedupe");
    let publisher = db.publisher();
    // Addressed by seq (as the mirror publishes): a duplicate is found by its seq and
    // compared with the stored event; no per-event index is kept.
    publish(&db, &publisher, "s.a", batch(1, 5)).unwrap();
    publish(&db, &publisher, "s.a", batch(1, 5)).unwrap();
    publish(&db, &publisher, "s.a", batch(3, 4)).unwrap();
    let row = stream(&db, "s.a").unwrap();
    assert_eq!((row.head_seq, row.segment_count, row.duplicates), (6, 2, 8), "3..=5 were duplicates, 6 was new");
    assert_eq!(count(&db, "event_key"), 0);
    // The same seq with another payload, kind or key.
    for other in [event_json("k3", "test.event", b"{\"n\":999}", Some(3)), event_json("k3", "other.kind", b"{\"n\":3}", Some(3)), event_json("x3", "test.event", b"{\"n\":3}", Some(3))] {
        let err = publish(&db, &publisher, "s.a", json!([other]));
        assert_eq!(message(err), "event=0: seq=3 of stream s.a holds another event (key ".to_string() + other["idempotency_key"].as_str().unwrap() + ")");
    }
    // A stream keeps the addressing of its first publish.
    let no_seq = json!([event_json("k7", "test.event", b"{}", None)]);
    assert_eq!(code(publish(&db, &publisher, "s.a", no_seq)), ErrorCode::InvalidArgument);
    let half = Value::Array(vec![event_json("k7", "test.event", b"{}", Some(7)), event_json("k8", "test.event", b"{}", None)]);
    assert_eq!(code(publish(&db, &publisher, "s.a", half)), ErrorCode::InvalidArgument);

    // A wrong authority_seq names both numbers.
    let err = publish(&db, &publisher, "s.a", batch(9, 1)).unwrap_err();
    let ToolError::Reducer { error, .. } = err else { panic!("{err}") };
    assert_eq!(error.code, ErrorCode::SequenceConflict);
    assert_eq!((error.field("expected"), error.field("actual")), (Some("7"), Some("9")));

    // A failing batch writes nothing, even its valid first events.
    let mixed = Value::Array(vec![event_json("k7", "test.event", b"{}", Some(7)), event_json("k8", "test.event", b"{}", Some(99))]);
    assert_eq!(code(publish(&db, &publisher, "s.a", mixed)), ErrorCode::SequenceConflict);
    assert_eq!(stream(&db, "s.a").unwrap().head_seq, 6);

    // Addressed by key: the key index finds duplicates and conflicts.
    let keyed = |n: u64, body: &str| Value::Array((1..=n).map(|s| event_json(&format!("k{s}"), "test.event", format!("{{\"n\":{s}{body}}}").as_bytes(), None)).collect());
    publish(&db, &publisher, "s.k", keyed(5, "")).unwrap();
    publish(&db, &publisher, "s.k", keyed(5, "")).unwrap();
    let row = stream(&db, "s.k").unwrap();
    assert_eq!((row.head_seq, row.segment_count, row.duplicates), (5, 1, 5));
    assert_eq!(code(publish(&db, &publisher, "s.k", keyed(1, ",\"x\":1"))), ErrorCode::IdempotencyConflict);
    assert_eq!(code(publish(&db, &publisher, "s.k", batch(6, 1))), ErrorCode::InvalidArgument);
    assert_eq!(count(&db, "event_key"), 5);

    // Keys are per stream: the same key on another stream is a new event.
    publish(&db, &publisher, "s.b", batch(1, 1)).unwrap();
    assert_eq!(stream(&db, "s.b").unwrap().head_seq, 1);
}

/// Segment data for seqs `from..from+n`: the same events as [`batch`].
fn segment(from: u64, n: u64) -> Vec<u8> {
    khala_proto::segment::encode((from..from + n).map(segment_event).collect())
}

fn segment_event(s: u64) -> khala_proto::SegmentEvent {
    khala_proto::SegmentEvent { seq: s, kind: "test.event".into(), payload: format!("{{\"n\":{s}}}").into_bytes(), idempotency_key: format!("k{s}"), occurred_at_micros: 0 }
}

fn publish_segment(db: &TestDb, who: &Credentials, stream_id: &str, data: &[u8]) -> Result<(), ToolError> {
    db.call_as(who, "publish_segment", json!([stream_id, bytes_arg(data)]))
}

#[test]
fn a_published_segment_is_stored_as_sent_and_checked_like_publish() {
    let db = shared_server().new_database("segment");
    let publisher = db.publisher();
    publish_segment(&db, &publisher, "s.a", &segment(1, 5)).unwrap();
    // The same history through `publish`, on another stream.
    publish(&db, &publisher, "s.b", batch(1, 5)).unwrap();
    let (a, b) = (segments(&db, "s.a"), segments(&db, "s.b"));
    assert_eq!(a[0].events, (1..=5).map(segment_event).collect::<Vec<_>>());
    assert_eq!(a[0].events, b[0].events, "the same events stored either way");
    // The chain, recomputed natively from the stored events, is the module's.
    assert_eq!(verify_stream(&db, "s.a").unwrap(), (1..=5).collect::<Vec<_>>());

    // A duplicate is skipped; an overlap stores only what is new, chained on.
    publish_segment(&db, &publisher, "s.a", &segment(1, 5)).unwrap();
    publish_segment(&db, &publisher, "s.a", &segment(3, 5)).unwrap();
    let row = stream(&db, "s.a").unwrap();
    assert_eq!((row.head_seq, row.segment_count, row.duplicates), (7, 2, 8), "1..=5 twice and 3..=5 were duplicates");
    assert_eq!(segments(&db, "s.a")[1].events, (6..=7).map(segment_event).collect::<Vec<_>>());
    assert_eq!(verify_stream(&db, "s.a").unwrap(), (1..=7).collect::<Vec<_>>());

    // Conflicts and gaps are named as publish names them.
    let other = khala_proto::segment::encode(vec![khala_proto::SegmentEvent { payload: b"{\"n\":999}".to_vec(), ..segment_event(3) }]);
    assert_eq!(message(publish_segment(&db, &publisher, "s.a", &other)), "event=0: seq=3 of stream s.a holds another event (key k3)");
    let err = publish_segment(&db, &publisher, "s.a", &segment(9, 1)).unwrap_err();
    let ToolError::Reducer { error, .. } = err else { panic!("{err}") };
    assert_eq!((error.code, error.field("expected"), error.field("actual")), (ErrorCode::SequenceConflict, Some("8"), Some("9")));
    let big = khala_proto::segment::encode(vec![segment_event(8), khala_proto::SegmentEvent { payload: vec![b'x'; 300 * 1024], ..segment_event(9) }]);
    let err = publish_segment(&db, &publisher, "s.a", &big).unwrap_err();
    let ToolError::Reducer { error, .. } = err else { panic!("{err}") };
    assert_eq!((error.code, error.event_index()), (ErrorCode::PayloadTooLarge, Some(1)));

    // Data that is not one canonical, contiguous segment is refused whole.
    let gap = khala_proto::segment::encode(vec![segment_event(8), segment_event(10)]);
    let mut riding = segment(8, 1);
    riding.extend_from_slice(&[0x4a, 1, 0]);
    let mut version = segment(8, 1);
    version[0] = 9;
    for bad in [gap, riding, version, Vec::new(), vec![1, 0xff]] {
        assert_eq!(code(publish_segment(&db, &publisher, "s.a", &bad)), ErrorCode::InvalidArgument, "{bad:?}");
    }
    // Not without a publish grant; not onto a stream addressed by key.
    let stranger = db.new_identity();
    assert_eq!(code(publish_segment(&db, &stranger, "s.a", &segment(8, 1))), ErrorCode::ForbiddenStream);
    publish(&db, &publisher, "s.k", json!([event_json("k1", "test.event", b"{}", None)])).unwrap();
    assert_eq!(code(publish_segment(&db, &publisher, "s.k", &segment(2, 1))), ErrorCode::InvalidArgument);
    assert_eq!(stream(&db, "s.a").unwrap().head_seq, 7, "nothing refused was written");
}

#[test]
fn the_native_chain_equals_the_modules() {
    let db = shared_server().new_database("chain");
    let publisher = db.publisher();
    for (from, n) in [(1, 1), (2, 7), (9, 3)] {
        publish(&db, &publisher, "runtime.run.42.events", batch(from, n)).unwrap();
    }
    let seqs = verify_stream(&db, "runtime.run.42.events").unwrap();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    let segs = segments(&db, "runtime.run.42.events");
    assert_eq!(segs[0].prev_hash, GENESIS.to_vec());
    assert_eq!(segs.len(), 3);
}

#[test]
fn acks_are_monotonic_and_checked_against_the_chain() {
    let db = shared_server().new_database("acks");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.a", &["subscribe", "ack"], 600);
    publish(&db, &publisher, "s.a", batch(1, 4)).unwrap();
    publish(&db, &publisher, "s.a", batch(5, 4)).unwrap();
    let segs = segments(&db, "s.a");
    let chain_at = |seq: usize| {
        let events: Vec<_> = segs.iter().flat_map(|s| s.events.clone()).take(seq).collect();
        khala_proto::segment::chain_through(&GENESIS, "s.a", &events).to_vec()
    };
    let ack = |seq: u64, hash: &[u8]| db.call_as(&reader, "ack", json!(["s.a", seq, bytes_arg(hash)]));
    ack(6, &chain_at(6)).unwrap();
    // Lower acks are no-ops, not errors, and do not move the ack back.
    ack(2, &chain_at(2)).unwrap();
    let acked = db.sql("SELECT * FROM client_ack");
    assert_eq!(acked.get(&acked.rows[0], "acked_seq"), Some(&json!(6)));
    assert_eq!(code(ack(9, &chain_at(8))), ErrorCode::AckBeyondHead);
    assert!(message(ack(9, &chain_at(8))).contains("head=8"));
    assert_eq!(code(ack(7, &chain_at(6))), ErrorCode::ChainMismatch);
    ack(8, &chain_at(8)).unwrap();
    ack(4, &chain_at(4)).unwrap();
    let acked = db.sql("SELECT * FROM client_ack");
    assert_eq!(acked.get(&acked.rows[0], "acked_seq"), Some(&json!(8)));
}

#[test]
fn the_retention_sweep_raises_the_floor_and_removes_rows() {
    let db = shared_server().new_database("retention");
    let publisher = db.publisher();
    db.call("create_stream", json!(["s.r", 10, 0]));
    for i in 0..6 {
        publish(&db, &publisher, "s.r", batch(1 + i * 5, 5)).unwrap();
    }
    let row = wait_for("the sweep", Duration::from_secs(10), || stream(&db, "s.r").filter(|s| s.oldest_seq > 1));
    assert_eq!((row.oldest_seq, row.head_seq, row.segment_count), (21, 30, 2));
    assert_eq!(segments(&db, "s.r").first().map(|s| s.first_seq), Some(21));
    assert_eq!(count(&db, "event_key"), 0, "a stream addressed by seq keeps no per-event index");
    assert_eq!(verify_stream(&db, "s.r").unwrap(), (21..=30).collect::<Vec<_>>());
    // An ack below the floor can no longer be checked.
    let reader = db.new_identity();
    db.grant(&reader, "s.r", &["subscribe", "ack"], 60);
    assert_eq!(code(db.call_as(&reader, "ack", json!(["s.r", 5, bytes_arg(&[0; 32])]))), ErrorCode::StaleCursor);
    // An ack-only grantee may not read the stream: it learns neither the floor nor the head.
    let acker = db.new_identity();
    db.grant(&acker, "s.r", &["ack"], 60);
    for seq in [5, 31] {
        let refused = db.call_as(&acker, "ack", json!(["s.r", seq, bytes_arg(&[0; 32])]));
        assert_eq!(message(refused), format!("stream s.r seq={seq}: not a position of this stream"));
    }
    let head_hash = stream(&db, "s.r").unwrap().head_hash;
    db.call_as(&acker, "ack", json!(["s.r", 30, bytes_arg(&head_hash)])).unwrap();
    // An unknown stream's retention cannot be set.
    assert_eq!(code(db.call_as(&db.owner.clone(), "set_retention", json!(["s.none", 1, 0]))), ErrorCode::UnknownStream);
}

fn sorted_rows(mut rows: Vec<Vec<Value>>) -> Vec<String> {
    let mut out: Vec<String> = rows.drain(..).map(|r| Value::Array(r).to_string()).collect();
    out.sort();
    out
}

/// The first integer in a JSON value, however deep (a schedule's time).
fn first_number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::Array(items) => items.iter().find_map(first_number),
        Value::Object(fields) => fields.values().find_map(first_number),
        _ => None,
    }
}

/// The streams the sweeps will look at without a change: pending rows and wake-ups.
fn planned(db: &TestDb) -> Vec<String> {
    let mut planned = Vec::new();
    for table in ["sweep_pending", "retention_wake", "compaction_wake"] {
        let rows = db.sql(&format!("SELECT * FROM {table}"));
        planned.extend(rows.rows.iter().map(|r| format!("{table}: {}", rows.get(r, "stream_id").and_then(Value::as_str).unwrap())));
    }
    planned.sort();
    planned
}

#[test]
fn the_sweeps_come_back_on_their_own_when_work_is_due_and_leave_idle_streams_alone() {
    let db = shared_server().new_database("due");
    let publisher = db.publisher();
    db.call("set_compaction", json!([1]));
    db.call("create_stream", json!(["s.age", 0, 2])); // every segment expires 2 s after its publish
    db.call("create_stream", json!(["s.count", 100, 0])); // nothing expires by count here
    // Age limits further ahead than the engine schedules (about 795 days): their wake-ups
    // must be capped, or every retention run would fail, s.age's trims with it.
    db.call("create_stream", json!(["s.long", 0, 3 * 365 * 86_400]));
    db.call("create_stream", json!(["s.max", 0, u64::MAX]));
    for seq in 1..=3 {
        for stream_id in ["s.age", "s.count", "s.plain", "s.long", "s.max"] {
            publish(&db, &publisher, stream_id, batch(seq, 1)).unwrap();
        }
    }
    // Nothing is published from here on: each sweep must come back when a time it knows of
    // comes (the segments' expiry, their merge age), not because something changed.
    let aged = wait_for("s.age to expire", Duration::from_secs(10), || stream(&db, "s.age").filter(|s| s.oldest_seq > s.head_seq));
    assert_eq!((aged.head_seq, aged.segment_count), (3, 0));
    for stream_id in ["s.count", "s.plain", "s.long", "s.max"] {
        wait_for("the small segments to merge", Duration::from_secs(10), || (segments(&db, stream_id).len() == 1).then_some(()));
    }
    // Idle, and nothing left to come but the long limits' wake-ups, at most 30 days ahead:
    // no stream is pending, so a run reads no stream at all.
    let wakes_only = vec!["retention_wake: s.long".to_string(), "retention_wake: s.max".to_string()];
    wait_for("nothing planned but the long limits' wake-ups", Duration::from_secs(5), || (planned(&db) == wakes_only).then_some(()));
    // Idle runs look at no stream at all (a run that read every stream would count each).
    let visits = |db: &TestDb| sorted_rows(db.sql("SELECT * FROM sweep_visits").rows);
    let before = visits(&db);
    assert_eq!(before.len(), 2, "both sweeps have looked at streams: {before:?}");
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(visits(&db), before, "idle runs looked at streams");
    let wakes = db.sql("SELECT * FROM retention_wake");
    let month_ahead = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64 + 30 * 86_400 * 1_000_000;
    for row in &wakes.rows {
        let at = first_number(wakes.get(row, "scheduled_at").unwrap()).unwrap();
        assert!(at <= month_ahead + 60_000_000, "a wake-up more than 30 days ahead: {row:?}");
    }
    // A publish makes the stream pending again: its new segment merges with the old ones.
    publish(&db, &publisher, "s.count", batch(4, 1)).unwrap();
    wait_for("the new segment to merge", Duration::from_secs(10), || {
        let segs = segments(&db, "s.count");
        (segs.len() == 1 && segs[0].last_seq == 4).then_some(())
    });
    assert_eq!(verify_stream(&db, "s.count").unwrap(), (1..=4).collect::<Vec<_>>());
    wait_for("nothing planned again", Duration::from_secs(5), || (planned(&db) == wakes_only).then_some(()));
}

/// A quiet stream whose small segments are too young to merge is not visited by every
/// run until they are old enough: compaction leaves a wake-up for then and forgets the
/// stream meanwhile. A shorter age (`set_compaction`) has every stream looked at again.
#[test]
fn compaction_waits_for_young_segments_with_a_wake_up_not_a_visit_every_run() {
    let db = shared_server().new_database("young");
    let publisher = db.publisher();
    db.call("set_compaction", json!([4]));
    let compaction_visits = |db: &TestDb| {
        let rows = db.sql("SELECT * FROM sweep_visits");
        rows.rows.iter().find(|r| rows.get(r, "sweep").and_then(Value::as_u64) == Some(1)).and_then(|r| rows.get(r, "visits").and_then(Value::as_u64)).unwrap_or(0)
    };
    let start = compaction_visits(&db);
    for seq in 1..=3 {
        publish(&db, &publisher, "s.young", batch(seq, 1)).unwrap();
    }
    // The runs find the three segments too young: once the stream is quiet (a second
    // after its last publish), a wake-up instead of a visit every run.
    wait_for("a wake-up for s.young", Duration::from_secs(4), || (planned(&db) == vec!["compaction_wake: s.young".to_string()]).then_some(()));
    let quiet = compaction_visits(&db);
    assert!((start + 1..=start + 3).contains(&quiet), "{} visits before the wake-up", quiet - start);
    // Still too young for about two more seconds: the runs meanwhile look at nothing.
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(compaction_visits(&db), quiet, "runs looked at a stream whose segments were too young");
    assert_eq!(segments(&db, "s.young").len(), 3, "merged before its age");
    // The wake-up brings compaction back, and the segments merge.
    wait_for("the young segments to merge", Duration::from_secs(6), || (segments(&db, "s.young").len() == 1).then_some(()));
    assert_eq!(verify_stream(&db, "s.young").unwrap(), (1..=3).collect::<Vec<_>>());
    wait_for("nothing planned", Duration::from_secs(3), || planned(&db).is_empty().then_some(()));

    // A shorter age brings a wake-up set under the longer one forward.
    db.call("set_compaction", json!([3_600]));
    for seq in 4..=6 {
        publish(&db, &publisher, "s.young", batch(seq, 1)).unwrap();
    }
    wait_for("an hour's wake-up", Duration::from_secs(5), || (planned(&db) == vec!["compaction_wake: s.young".to_string()]).then_some(()));
    db.call("set_compaction", json!([1]));
    wait_for("the new segments to merge at the new age", Duration::from_secs(6), || {
        let segs = segments(&db, "s.young");
        (segs.len() == 1 && segs[0].last_seq == 6).then_some(())
    });
}

/// What subscribers read of a stream: the view trails the publishes (it is not written by
/// every publish, which is its point) and catches up within its refresh; a raised floor,
/// a new epoch and a new stream are written at once; a database from before views gets
/// every stream's view once.
#[test]
fn the_stream_view_trails_publishes_briefly_and_shows_floor_and_epoch_at_once() {
    let db = shared_server().new_database("view");
    let publisher = db.publisher();
    publish(&db, &publisher, "s.v", batch(1, 5)).unwrap();
    assert_eq!(view(&db, "s.v").map(|v| (v.epoch, v.head_seq, v.oldest_seq)), Some((1, 5, 1)), "a new stream has its view at once");
    let mut trailed = 0;
    for i in 1..=20 {
        publish(&db, &publisher, "s.v", batch(1 + i * 5, 5)).unwrap();
        let head = view(&db, "s.v").unwrap().head_seq;
        assert!(head <= 5 + i * 5, "the view is ahead of the stream");
        trailed += u32::from(head < 5 + i * 5);
    }
    assert!(trailed > 0, "every publish wrote the view at once");
    let row = stream(&db, "s.v").unwrap();
    assert_eq!(row.head_seq, 105);
    let caught_up = wait_for("the view to catch up", Duration::from_secs(3), || view(&db, "s.v").filter(|v| v.head_seq == 105));
    assert_eq!(caught_up.head_hash, row.head_hash, "the view's head hash is the stream's");
    assert_eq!(db.sql("SELECT * FROM view_stale").rows.len(), 0, "refreshed views are no longer stale");
    assert_eq!(db.sql("SELECT * FROM view_refresh").rows.len(), 1, "one refresh, repeating");
    publish(&db, &publisher, "s.v", batch(106, 5)).unwrap();
    wait_for("the view to follow the next publish", Duration::from_secs(3), || view(&db, "s.v").filter(|v| v.head_seq == 110));

    // Publishers that never pause, on four streams at once: every view reaches its
    // stream's head once they stop. (Refreshes scheduled one-shot by the publishes left
    // a stream stale with no refresh to come: a cold replay found a view 207,000 events
    // behind.)
    let busy = ["s.v0", "s.v1", "s.v2", "s.v3"];
    std::thread::scope(|scope| {
        for id in busy {
            let (db, publisher) = (&db, &publisher);
            scope.spawn(move || {
                let until = std::time::Instant::now() + Duration::from_secs(3);
                let mut next = 1;
                while std::time::Instant::now() < until {
                    publish(db, publisher, id, batch(next, 20)).unwrap();
                    next += 20;
                }
            });
        }
    });
    std::thread::sleep(Duration::from_millis(1_000));
    for id in busy {
        let head = stream(&db, id).unwrap().head_seq;
        assert_eq!(view(&db, id).map(|v| v.head_seq), Some(head), "{id}: the view stopped short of the head a second after the last publish");
    }

    // Retention raises the floor, and the view with it in the same transaction (nothing
    // is stale by now: no refresh would bring it).
    db.call("set_retention", json!(["s.v", 10, 0]));
    let trimmed = wait_for("the sweep", Duration::from_secs(10), || stream(&db, "s.v").filter(|s| s.oldest_seq > 1));
    assert_eq!(view(&db, "s.v").map(|v| v.oldest_seq), Some(trimmed.oldest_seq), "the view's floor is the stream's");

    // A reset starts a new epoch; the view shows it with the empty head.
    db.call("reset_stream", json!(["s.v"]));
    assert_eq!(view(&db, "s.v").map(|v| (v.epoch, v.head_seq, v.oldest_seq)), Some((2, 0, 1)));

    // A database from before views: every stream's view is written once.
    db.sql("DELETE FROM stream_view");
    db.sql("DELETE FROM sweep_seeded WHERE sweep = 2");
    wait_for("the views to be seeded", Duration::from_secs(5), || view(&db, "s.v"));
    assert_eq!(db.sql("SELECT * FROM sweep_seeded WHERE sweep = 2").rows.len(), 1, "seeded once, and recorded");
}

/// A segment that is not small never joins a merge, so compaction has no reason to load
/// it: a batched publisher's log would otherwise all be read again once it is old enough.
#[test]
fn compaction_loads_only_segments_it_could_merge() {
    let db = shared_server().new_database("bigseg");
    let publisher = db.publisher();
    db.call("set_compaction", json!([1]));
    for b in 0..3 {
        publish(&db, &publisher, "s.big", batch(1 + b * 64, 64)).unwrap();
    }
    let rows = db.sql("SELECT compacted_through FROM stream WHERE stream_id = 's.big'");
    assert_eq!(rows.rows[0][0].as_u64(), Some(192), "publish moved compaction past the large segments");
    // Runs every second, segments old enough after one: without that move, these runs
    // would load all three segments to find nothing to merge.
    std::thread::sleep(Duration::from_millis(3_000));
    let loaded = db.sql("SELECT segments_loaded FROM sweep_state WHERE sweep = 1");
    let loaded = loaded.rows.first().and_then(|r| r[0].as_u64()).unwrap_or(0);
    assert_eq!(loaded, 0, "compaction loaded segments it could not merge");
    assert_eq!(segments(&db, "s.big").len(), 3);
    // A small segment after them is compaction's again.
    publish(&db, &publisher, "s.big", batch(193, 1)).unwrap();
    publish(&db, &publisher, "s.big", batch(194, 1)).unwrap();
    wait_for("the two small segments to merge", Duration::from_secs(10), || (segments(&db, "s.big").len() == 4).then_some(()));
    assert_eq!(verify_stream(&db, "s.big").unwrap(), (1..=194).collect::<Vec<_>>());
}

/// A database made before `sweep_pending` existed holds streams with work and no pending
/// flag. Made here by changing a policy behind the module's back (owner SQL), and then
/// removing retention's `sweep_seeded` row, as such a database has none.
#[test]
fn a_database_from_before_the_pending_table_is_swept_once_seeded() {
    let db = shared_server().new_database("seed");
    let publisher = db.publisher();
    db.call("set_compaction", json!([86_400]));
    for seq in 1..=6 {
        publish(&db, &publisher, "s.old", batch(seq, 1)).unwrap();
    }
    db.sql("UPDATE stream SET retain_max_events = 2 WHERE stream_id = 's.old'");
    // Nothing marked the stream for retention: runs pass it by.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(segments(&db, "s.old").len(), 6, "the stream must have work that no flag announces");
    db.sql("DELETE FROM sweep_seeded WHERE sweep = 0");
    let row = wait_for("the seeded run to trim s.old", Duration::from_secs(5), || stream(&db, "s.old").filter(|s| s.oldest_seq > 1));
    assert_eq!((row.oldest_seq, row.head_seq, row.segment_count), (5, 6, 2));
    assert_eq!(db.sql("SELECT * FROM sweep_seeded WHERE sweep = 0").rows.len(), 1, "seeded once, and recorded");
}

#[test]
fn bad_input_gets_a_clear_code_and_never_traps() {
    let db = shared_server().new_database("badinput");
    let publisher = db.publisher();
    db.call("set_limits", json!([64, 0, 0]));
    let big = json!([event_json("k1", "test.event", &[b'x'; 65], Some(1))]);
    assert_eq!(code(publish(&db, &publisher, "s.a", big)), ErrorCode::PayloadTooLarge);
    for bad in ["", "has space", "'; DROP TABLE stream; --", ".leading-dot", &"x".repeat(129)] {
        let err = publish(&db, &publisher, bad, batch(1, 1));
        assert_eq!(code(err), ErrorCode::InvalidArgument, "stream id {bad:?}");
    }
    assert_eq!(code(publish(&db, &publisher, "s.a", json!([]))), ErrorCode::InvalidArgument);
    assert_eq!(code(publish(&db, &publisher, "s.a", json!([event_json("", "k", b"{}", None)]))), ErrorCode::InvalidArgument);
    assert_eq!(code(publish(&db, &publisher, "s.a", json!([event_json("k", "", b"{}", None)]))), ErrorCode::InvalidArgument);
    db.call("set_limits", json!([0, 2, 0]));
    assert_eq!(code(publish(&db, &publisher, "s.a", batch(1, 3))), ErrorCode::BatchTooLarge);
    let owner = db.owner.clone();
    assert_eq!(code(db.call_as(&owner, "grant", json!([publisher.identity_arg(), "s.a", ["write"], 60]))), ErrorCode::InvalidArgument);
    assert_eq!(code(db.call_as(&owner, "grant", json!([publisher.identity_arg(), "s.a", ["subscribe"], 0]))), ErrorCode::InvalidArgument);
    assert_eq!(code(db.call_as(&owner, "set_role", json!([owner.identity_arg(), "admin", false]))), ErrorCode::InvalidArgument);
    assert_eq!(code(db.call_as(&owner, "set_role", json!([owner.identity_arg(), "root", true]))), ErrorCode::InvalidArgument);
    assert_eq!(count(&db, "stream"), 0, "nothing was written");
}

#[test]
fn hello_checks_the_compatibility_window_in_order() {
    let db = shared_server().new_database("hello");
    let client = db.new_identity();
    let hello = |protocol: u32, build: &str| db.call_as(&client, "hello", json!([protocol, build]));
    hello(khala_proto::PROTOCOL_VERSION, "0.1.0").unwrap();
    assert_eq!(code(hello(1, "")), ErrorCode::InvalidArgument);
    assert_eq!(code(hello(99, "0.1.0")), ErrorCode::UnsupportedProtocolVersion);
    assert_eq!(code(hello(1, "not-a-version")), ErrorCode::InvalidArgument);
    db.call("set_protocol_window", json!([1, 1, "2.0.0"]));
    assert_eq!(code(hello(1, "1.9.9")), ErrorCode::UpgradeRequired);
    hello(1, "2.0.1-beta").unwrap();
}

#[test]
fn admins_see_the_connected_count() {
    let db = shared_server().new_database("presence");
    let admin = db.new_identity();
    db.call("set_role", json!([admin.identity_arg(), "admin", true]));
    let conn = sdk::connect(&db, &admin);
    sdk::subscribe(&conn, &["SELECT * FROM presence"]);
    let other = db.new_identity();
    let other_conn = sdk::connect(&db, &other);
    wait_for("two connected", Duration::from_secs(10), || conn.db.presence().iter().find(|p| p.connected >= 2));
    let _ = other_conn.disconnect();
    wait_for("one connected", Duration::from_secs(10), || conn.db.presence().iter().find(|p| p.connected == 1));
    let _ = conn.disconnect();
}

#[test]
fn republishing_the_module_keeps_the_data_and_connected_clients_keep_working() {
    let server = shared_server();
    let db = server.new_database("republish");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.a", &["subscribe"], 600);
    publish(&db, &publisher, "s.a", batch(1, 3)).unwrap();
    let conn = sdk::connect(&db, &reader);
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment"]);
    db.open_window(&reader, "s.a", 0);
    server.api().publish_module(&db.name, khala_tests::module_wasm(), &db.owner.token, false).unwrap();
    assert_eq!(verify_stream(&db, "s.a").unwrap(), vec![1, 2, 3]);
    publish(&db, &publisher, "s.a", batch(4, 1)).unwrap();
    wait_for("the live update after republish", Duration::from_secs(10), || conn.db.stream_segment().iter().find(|s| s.last_seq == 4));
    let _ = conn.disconnect();
}

#[test]
fn windows_need_a_grant_are_bounded_and_show_only_their_bucket() {
    let db = shared_server().new_database("windows");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "s.w", &["subscribe"], 600);
    let w = khala_proto::hash::WINDOW_EVENTS;
    // Segments starting in bucket 0 and in bucket 1.
    khala_tests::publish_range(&db, &publisher, "s.w", 1, 10, 10);
    khala_tests::publish_range(&db, &publisher, "s.w", 11, w - 10, 10_000);
    khala_tests::publish_range(&db, &publisher, "s.w", w + 1, 5, 5);
    let conn = sdk::connect(&db, &reader);
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment"]);
    db.open_window(&reader, "s.w", 1);
    wait_for("bucket 1", Duration::from_secs(10), || conn.db.stream_segment().iter().find(|s| s.first_seq == w + 1));
    assert!(conn.db.stream_segment().iter().all(|s| s.first_seq / w == 1), "only bucket 1 is visible");
    for b in 2..9 {
        db.open_window(&reader, "s.w", b);
    }
    assert_eq!(code(db.call_as(&reader, "open_window", json!(["s.w", 20]))), ErrorCode::RateLimited);
    db.call_as(&reader, "close_window", json!(["s.w", 1])).unwrap();
    wait_for("bucket 1 to be evicted", Duration::from_secs(10), || (conn.db.stream_segment().count() == 0).then_some(()));
    // A batch larger than a window cannot be allowed.
    assert_eq!(code(db.call_as(&db.owner.clone(), "set_limits", json!([0, w + 1, 0]))), ErrorCode::InvalidArgument);
    let _ = conn.disconnect();
}

/// Server time of a `Timestamp` column as the SQL endpoint writes it (`[micros]`).
fn micros(value: &Value) -> i64 {
    value[0].as_i64().unwrap_or_else(|| panic!("not a timestamp: {value}"))
}

/// RLS rules cannot read the clock, so each grant schedules its own removal at
/// `expires_at`. Measured here: how long after `expires_at` a subscriber still receives
/// segments, while one publisher writes single events to its stream as fast as it can and
/// another keeps the database busy with 1000-event batches. The bound goes in
/// docs/SECURITY.md.
#[test]
fn a_lease_ends_for_reads_on_time_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let db = shared_server().new_database("lease-time");
    let publisher = db.publisher();
    let reader = db.new_identity();
    publish(&db, &publisher, "s.live", Value::Array(vec![event_json("first", "k", b"{}", None)])).unwrap();
    db.grant(&reader, "s.live", &["subscribe"], 3);
    let expires_at = micros(&db.sql("SELECT expires_at FROM stream_grant").rows[0][0]);
    let conn = sdk::connect(&db, &reader);
    let delivered: Arc<Mutex<Vec<i64>>> = Arc::default();
    let sink = delivered.clone();
    conn.db.stream_segment().on_insert(move |_, s| sink.lock().unwrap().push(s.published_at.to_micros_since_unix_epoch()));
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment"]);
    db.open_window(&reader, "s.live", 0);

    let stop = Arc::new(AtomicBool::new(false));
    let published_after = Arc::new(AtomicU64::new(0));
    let live = {
        let (db_name, api, token, stop, after) = (db.name.clone(), db.api.clone(), publisher.token.clone(), stop.clone(), published_after.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let event = event_json(&format!("live{n}"), "k", b"{}", None);
                api.call(&db_name, "publish", json!(["s.live", [event]]), &token).unwrap();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
                if now > expires_at {
                    after.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let load = {
        let (db_name, api, token, stop) = (db.name.clone(), db.api.clone(), publisher.token.clone(), stop.clone());
        std::thread::spawn(move || {
            let payload = vec![7u8; 256];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Value> = (0..1000).map(|i| event_json(&format!("load{n}.{i}"), "k", &payload, None)).collect();
                api.call(&db_name, "publish", json!(["s.load", events]), &token).unwrap();
                n += 1;
            }
        })
    };
    let wait_until = Duration::from_micros((expires_at + 2_000_000 - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64).max(0) as u64);
    std::thread::sleep(wait_until);
    stop.store(true, Ordering::Relaxed);
    live.join().unwrap();
    load.join().unwrap();

    let delivered = delivered.lock().unwrap().clone();
    let before = delivered.iter().filter(|t| **t <= expires_at).count();
    let last = delivered.iter().copied().max().unwrap_or(0);
    let total = delivered.len();
    let late_ms = (last - expires_at) as f64 / 1000.0;
    let after = published_after.load(Ordering::Relaxed);
    eprintln!("lease end: {total} segments delivered ({before} published before expiry), {after} events published after expiry; last delivered segment published {late_ms:.1} ms after expires_at");
    assert!(before >= 10, "the reader received too little before expiry to measure anything ({before})");
    assert!(after >= 10, "publishing did not go on past expiry ({after} events)");
    assert!(late_ms < 250.0, "delivery went on {late_ms:.1} ms past the lease");
    assert_eq!(count(&db, "stream_grant"), 0, "the expired grant is gone");
    let _ = conn.disconnect();
}

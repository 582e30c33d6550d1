//! Property and table tests of the apply engine.

use super::*;
use khala_proto::hash::GENESIS;
use khala_proto::segment::chain_through;
use khala_proto::v1::RebootstrapReason;
use khala_proto::{SegmentEvent, StreamCursor};
use proptest::prelude::*;

const STREAM: &str = "runtime.run.1.events";

fn events(n: u64) -> Vec<SegmentEvent> {
    (1..=n)
        .map(|seq| SegmentEvent {
            seq,
            kind: if seq % 3 == 0 { "a".into() } else { "b".into() },
            payload: format!("{{\"n\":{seq}}}").into_bytes(),
            idempotency_key: format!("k{seq}"),
            occurred_at_micros: 0,
        })
        .collect()
}

/// Cuts `all` into segments at `cuts` (sizes), with correct prev/last hashes.
fn segments(all: &[SegmentEvent], sizes: &[usize], epoch: u32) -> Vec<SegmentIn> {
    let mut out = Vec::new();
    let mut prev = GENESIS;
    let mut i = 0;
    let mut k = 0;
    while i < all.len() {
        let size = sizes.get(k).copied().unwrap_or(1).max(1).min(all.len() - i);
        let chunk = all[i..i + size].to_vec();
        let last = chain_through(&prev, STREAM, &chunk);
        out.push(SegmentIn::new(STREAM, epoch, chunk[0].seq, chunk[chunk.len() - 1].seq, prev, last, chunk.into_iter().map(Into::into).collect()));
        prev = last;
        i += size;
        k += 1;
    }
    out
}

fn fresh() -> StreamEngine {
    StreamEngine::new(&StreamCursor { stream_id: STREAM.into(), ..Default::default() })
}

/// Applies everything ready, as a driver would, recording what was applied.
fn drain(engine: &mut StreamEngine, applied: &mut Vec<u64>) {
    while let Some(e) = engine.next_ready() {
        let seq = e.seq;
        applied.push(seq);
        engine.mark_applied(seq);
    }
}

#[derive(Debug, Clone)]
enum Step {
    Deliver(usize),
    Restart,
    /// Offers a segment, and the handler fails on the first event that becomes ready.
    HandlerFails(usize),
    /// Offers a segment and applies at most this many ready events: the cursor may stop
    /// inside a segment.
    Partial(usize, usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => any::<usize>().prop_map(Step::Deliver),
        1 => Just(Step::Restart),
        2 => any::<usize>().prop_map(Step::HandlerFails),
        2 => (any::<usize>(), 0usize..4).prop_map(|(i, k)| Step::Partial(i, k)),
    ]
}

proptest! {
    /// Random interleavings of duplicates, reorders, gaps, handler failures and restarts
    /// (from the durable cursor) still apply exactly the published sequence, once each,
    /// after the transport finally resends from the cursor. And whenever the engine says
    /// the next segment cannot straddle into the bucket before (`may_straddle`), the next
    /// event is buffered or begins a segment, so the windows it leaves closed hold
    /// nothing it needs.
    #[test]
    fn applies_exactly_once_in_order(n in 1u64..120, sizes in proptest::collection::vec(1usize..9, 1..60), steps in proptest::collection::vec(step(), 0..80)) {
        let all = events(n);
        let segs = segments(&all, &sizes, 1);
        let mut engine = fresh();
        let mut applied = Vec::new();
        for step in steps {
            match step {
                Step::Deliver(i) => {
                    let _ = engine.offer(segs[i % segs.len()].clone());
                    drain(&mut engine, &mut applied);
                }
                Step::Restart => engine = StreamEngine::new(&engine.cursor(0)),
                Step::Partial(i, k) => {
                    let _ = engine.offer(segs[i % segs.len()].clone());
                    for _ in 0..k {
                        let Some(seq) = engine.next_ready().map(|e| e.seq) else { break };
                        applied.push(seq);
                        engine.mark_applied(seq);
                    }
                }
                Step::HandlerFails(i) => {
                    let _ = engine.offer(segs[i % segs.len()].clone());
                    let (applied_before, chain_before) = (engine.applied(), engine.cursor(0).chain_hash);
                    if let Some(seq) = engine.next_ready().map(|e| e.seq) {
                        // The handler did not return Ok, so nothing is marked: the cursor
                        // stays, and the same event is offered again, never the one after.
                        prop_assert_eq!(seq, applied_before + 1);
                        prop_assert_eq!(engine.applied(), applied_before);
                        prop_assert_eq!(engine.cursor(0).chain_hash, chain_before);
                        prop_assert_eq!(engine.next_ready().map(|e| e.seq), Some(seq));
                    }
                }
            }
            let next = engine.applied() + 1;
            if !engine.may_straddle() && engine.mode() == &StreamMode::Normal && next <= n {
                prop_assert!(engine.next_ready().is_some() || segs.iter().any(|s| s.first_seq == next), "{next} is neither buffered nor a segment's first seq");
            }
        }
        // The transport resubscribes from the cursor and delivers the rest in order.
        let from = engine.fetch_after();
        for seg in segs.iter().filter(|s| s.last_seq > from) {
            let _ = engine.offer(seg.clone());
            drain(&mut engine, &mut applied);
        }
        let expected: Vec<u64> = (1..=n).collect();
        prop_assert_eq!(&applied, &expected);
        let cursor = engine.cursor(0);
        prop_assert_eq!(cursor.chain_hash, segs.last().unwrap().last_hash.to_vec());
    }
}

#[test]
fn a_gap_holds_later_events_and_asks_for_a_resubscribe() {
    let segs = segments(&events(6), &[2, 2, 2], 1);
    let mut engine = fresh();
    let offer = engine.offer(segs[1].clone());
    assert_eq!(offer.alerts, vec![Alert::Gap { cursor: 0, next_seen: 3 }]);
    assert!(engine.next_ready().is_none(), "never skip the missing 1..=2");
    engine.offer(segs[0].clone());
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![1, 2, 3, 4]);
}

#[test]
fn a_stale_cursor_rebootstraps_with_the_numbers() {
    let segs = segments(&events(10), &[5, 5], 1);
    let mut engine = StreamEngine::new(&StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 2, chain_hash: chain_through(&GENESIS, STREAM, &events(2)).to_vec(), updated_at_micros: 0 });
    assert!(engine.recheck().is_empty(), "no server view yet");
    let info = StreamInfo { epoch: 1, head_seq: 10, oldest_seq: 6, head_hash: segs[1].last_hash };
    let alerts = engine.observe(info);
    match &alerts[..] {
        [Alert::Rebootstrap(s)] => {
            assert_eq!((s.requested, s.oldest_available, s.head, s.reason), (2, 5, 10, RebootstrapReason::StaleCursor as i32));
        }
        other => panic!("expected one rebootstrap, got {other:?}"),
    }
    assert_eq!(engine.fetch_after(), 5);
    engine.offer(segs[1].clone());
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![6, 7, 8, 9, 10]);
}

#[test]
fn a_cursor_ahead_of_the_head_holds_then_resumes_on_equal_chain() {
    let all = events(8);
    let segs = segments(&all, &[4, 4], 1);
    let cursor = StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 6, chain_hash: chain_through(&GENESIS, STREAM, &all[..6]).to_vec(), updated_at_micros: 0 };
    let mut engine = StreamEngine::new(&cursor);
    let alerts = engine.observe(StreamInfo { epoch: 1, head_seq: 4, oldest_seq: 1, head_hash: segs[0].last_hash });
    assert_eq!(alerts, vec![Alert::ServerBehind { cursor: 6, head: 4 }]);
    assert!(engine.next_ready().is_none());
    // The mirror republishes 5..=8 with the same seqs and hashes.
    engine.observe(StreamInfo { epoch: 1, head_seq: 8, oldest_seq: 1, head_hash: segs[1].last_hash });
    let offer = engine.offer(segs[1].clone());
    assert!(offer.alerts.contains(&Alert::Resumed { cursor: 6, refetch: false }), "{offer:?}");
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![7, 8], "no double apply, no rebootstrap");
}

/// A hold drops the segments past the cursor that come before the one that settles it:
/// the resume asks for them again (`refetch`), and only then. (At a session's start a
/// cursor past the view's head holds like this, and a newly opened window's rows come in
/// any order.)
#[test]
fn a_hold_that_dropped_segments_past_the_cursor_resumes_with_a_refetch() {
    let all = events(12);
    let segs = segments(&all, &[4, 4, 4], 1);
    let cursor = StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 4, chain_hash: chain_through(&GENESIS, STREAM, &all[..4]).to_vec(), updated_at_micros: 0 };
    let mut engine = StreamEngine::new(&cursor);
    let alerts = engine.observe(StreamInfo { epoch: 1, head_seq: 2, oldest_seq: 1, head_hash: chain_through(&GENESIS, STREAM, &all[..2]) });
    assert_eq!(alerts, vec![Alert::ServerBehind { cursor: 4, head: 2 }]);
    assert_eq!(engine.offer(segs[2].clone()).accepted, 0, "9..=12 comes before the cursor is settled");
    let offer = engine.offer(segs[1].clone());
    assert!(offer.alerts.contains(&Alert::Resumed { cursor: 4, refetch: true }), "{offer:?}");
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![5, 6, 7, 8]);

    // The same hold, settled by the first segment to come: nothing to fetch again.
    let mut engine = StreamEngine::new(&cursor);
    engine.observe(StreamInfo { epoch: 1, head_seq: 2, oldest_seq: 1, head_hash: chain_through(&GENESIS, STREAM, &all[..2]) });
    let offer = engine.offer(segs[1].clone());
    assert!(offer.alerts.contains(&Alert::Resumed { cursor: 4, refetch: false }), "{offer:?}");
}

/// The segment holding the cursor comes back cut differently after the server lost it:
/// the cursor that ended a segment is now inside one, so the bucket before must stay
/// reachable once nothing is buffered.
#[test]
fn a_recut_segment_makes_the_cursor_straddle_again() {
    let all = events(8);
    let before = segments(&all, &[4, 4], 1);
    let mut engine = fresh();
    engine.offer(before[0].clone());
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert!(!engine.may_straddle(), "the cursor ends the segment 1..=4");
    // The server lost 3..=4; the mirror republishes 3..=8 as one segment.
    engine.observe(StreamInfo { epoch: 1, head_seq: 2, oldest_seq: 1, head_hash: chain_through(&GENESIS, STREAM, &all[..2]) });
    assert!(engine.may_straddle());
    let after = segments(&all, &[2, 6], 1);
    engine.observe(StreamInfo { epoch: 1, head_seq: 8, oldest_seq: 1, head_hash: after[1].last_hash });
    let offer = engine.offer(after[1].clone());
    assert!(offer.alerts.contains(&Alert::Resumed { cursor: 4, refetch: false }), "{offer:?}");
    assert!(!engine.may_straddle(), "5 is buffered");
    engine.clear_pending();
    assert!(engine.may_straddle(), "4 is inside 3..=8 now: the segment may begin a bucket earlier");
    engine.offer(after[1].clone());
    drain(&mut engine, &mut applied);
    assert_eq!(applied, (1..=8).collect::<Vec<_>>());
    assert!(!engine.may_straddle(), "the cursor ends 3..=8");
}

#[test]
fn a_cursor_ahead_of_the_head_with_other_history_rebootstraps() {
    let all = events(8);
    let cursor = StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 6, chain_hash: chain_through(&GENESIS, STREAM, &all[..6]).to_vec(), updated_at_micros: 0 };
    let mut engine = StreamEngine::new(&cursor);
    let mut other = all.clone();
    other[5].payload = b"different".to_vec();
    let segs = segments(&other, &[4, 4], 1);
    engine.observe(StreamInfo { epoch: 1, head_seq: 4, oldest_seq: 1, head_hash: segs[0].last_hash });
    engine.observe(StreamInfo { epoch: 1, head_seq: 8, oldest_seq: 1, head_hash: segs[1].last_hash });
    let offer = engine.offer(segs[1].clone());
    assert!(matches!(&offer.alerts[..], [Alert::Rebootstrap(s)] if s.reason == RebootstrapReason::ChainMismatch as i32), "{offer:?}");
    assert_eq!(engine.applied(), 0);
    for seg in &segs {
        engine.offer(seg.clone());
    }
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, (1..=8).collect::<Vec<_>>());
}

#[test]
fn an_epoch_change_rebootstraps() {
    let segs = segments(&events(3), &[3], 2);
    let mut engine = StreamEngine::new(&StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 3, chain_hash: vec![7; 32], updated_at_micros: 0 });
    let alerts = engine.observe(StreamInfo { epoch: 2, head_seq: 3, oldest_seq: 1, head_hash: segs[0].last_hash });
    assert!(matches!(&alerts[..], [Alert::Rebootstrap(s)] if s.reason == RebootstrapReason::EpochChanged as i32));
    engine.offer(segs[0].clone());
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![1, 2, 3]);
}

#[test]
fn a_tampered_segment_is_refused_whole() {
    let segs = segments(&events(4), &[4], 1);
    let mut events = segs[0].events.clone();
    events[2].payload = bytes::Bytes::from_static(b"tampered");
    let tampered = SegmentIn::new(STREAM, 1, 1, 4, segs[0].prev_hash, segs[0].last_hash, events);
    let mut engine = fresh();
    let offer = engine.offer(tampered);
    assert_eq!(offer.accepted, 0);
    assert_eq!(offer.alerts, vec![Alert::CorruptSegment { first_seq: 1, last_seq: 4 }]);
    assert!(engine.next_ready().is_none());
}

#[test]
fn a_segment_whose_row_misnumbers_its_events_is_refused_whole() {
    let segs = segments(&events(10), &[5, 2, 3], 1);
    let mut engine = fresh();
    let mut applied = Vec::new();
    for seg in &segs[..2] {
        engine.offer(seg.clone());
    }
    drain(&mut engine, &mut applied);
    assert_eq!(engine.applied(), 7);
    // The row says 1..=12 but holds 1..=5: the cursor (7) lies past its events' end.
    let overstated = SegmentIn::new(STREAM, 1, 1, 12, GENESIS, segs[0].last_hash, segs[0].events.clone());
    assert_eq!(engine.offer(overstated).alerts, vec![Alert::CorruptSegment { first_seq: 1, last_seq: 12 }]);
    // The row says 8..=10 but its events, hashing soundly, are 6..=8.
    let sound = segments(&events(10), &[5, 3, 2], 1).swap_remove(1);
    let shifted = SegmentIn::new(STREAM, 1, 8, 10, sound.prev_hash, sound.last_hash, sound.events.clone());
    assert_eq!(engine.offer(shifted).alerts, vec![Alert::CorruptSegment { first_seq: 8, last_seq: 10 }]);
    assert_eq!(engine.applied(), 7);
    engine.offer(segs[2].clone());
    drain(&mut engine, &mut applied);
    assert_eq!(applied, (1..=10).collect::<Vec<_>>());
}

#[test]
fn a_fully_trimmed_stream_needs_no_floor_segment() {
    let all = events(10);
    let head_hash = chain_through(&GENESIS, STREAM, &all);
    let mut engine = StreamEngine::new(&StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 2, chain_hash: chain_through(&GENESIS, STREAM, &all[..2]).to_vec(), updated_at_micros: 0 });
    let alerts = engine.observe(StreamInfo { epoch: 1, head_seq: 10, oldest_seq: 11, head_hash });
    assert!(matches!(&alerts[..], [Alert::Rebootstrap(_)]));
    assert_eq!((engine.mode(), engine.applied()), (&StreamMode::Normal, 10));
    assert!(!engine.starved());
}

#[test]
fn a_buffered_event_from_another_history_is_dropped_not_applied() {
    let all = events(6);
    let segs = segments(&all, &[2, 2, 2], 1);
    let mut other = all.clone();
    other[2].payload = b"other".to_vec();
    let others = segments(&other, &[2, 2, 2], 1);
    let mut engine = fresh();
    engine.offer(segs[0].clone());
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    // 5..=6 of the old history are buffered, then 3..=4 of a new one arrive.
    engine.offer(segs[2].clone());
    engine.offer(others[1].clone());
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![1, 2, 3, 4], "the old 5..=6 do not follow the new 4");
    assert_eq!(engine.pending_len(), 0);
    engine.offer(others[2].clone());
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(engine.cursor(0).chain_hash, others[2].last_hash.to_vec());
}

#[test]
fn a_rebootstrap_resumes_from_the_floor_segment_and_asks_for_the_rest() {
    let segs = segments(&events(9), &[3, 3, 3], 1);
    let mut engine = StreamEngine::new(&StreamCursor { stream_id: STREAM.into(), epoch: 1, seq: 1, chain_hash: chain_through(&GENESIS, STREAM, &events(1)).to_vec(), updated_at_micros: 0 });
    engine.observe(StreamInfo { epoch: 1, head_seq: 9, oldest_seq: 4, head_hash: segs[2].last_hash });
    // A later segment arrives before the floor: it is not kept...
    assert_eq!(engine.offer(segs[2].clone()).accepted, 0);
    let offer = engine.offer(segs[1].clone());
    assert!(offer.alerts.contains(&Alert::Resumed { cursor: 3, refetch: true }), "{offer:?}");
    let mut applied = Vec::new();
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![4, 5, 6]);
    // ...and the engine says it is starved, so the driver fetches it again.
    assert!(engine.starved());
    engine.offer(segs[2].clone());
    drain(&mut engine, &mut applied);
    assert_eq!(applied, vec![4, 5, 6, 7, 8, 9]);
}

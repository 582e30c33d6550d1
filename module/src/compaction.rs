//! Compaction: merges runs of small segments into larger ones.
//!
//! Low-rate publishing makes one small segment per call, and small segments behave like
//! the per-event rows that slow this engine's inserts down as the table grows
//! (docs/SEGMENTS.md). A scheduled sweep merges runs of adjacent small segments of one
//! stream, once they are older than `compact_min_age_secs` (default 10 s; live clients
//! have them by then),
//! into one segment of up to `COMPACT_TARGET_EVENTS` events. Seqs, chain hashes and
//! idempotency keys are unchanged; a merged segment stays in the window bucket of its
//! first event, and never holds more than a window's worth of events. A client that
//! sees the merged segment skips the events it already applied.

use crate::streams::{stream, stream_segment, Stream, StreamSegment};
use crate::{fail, ReducerResult};
use khala_proto::hash::{bucket, window_key};
use khala_proto::{segment, ErrorCode};
use spacetimedb::{reducer, table, ReducerContext, ScheduleAt, Table, TimeDuration};
use std::time::Duration;

/// Segments with fewer events than this are small.
pub const SMALL_SEGMENT_EVENTS: u64 = 64;
/// A merged segment holds at most this many events.
pub const COMPACT_TARGET_EVENTS: u64 = 1_024;
/// Most segments one sweep examines, so that a sweep stays short.
pub const COMPACT_SCAN_SEGMENTS: usize = 4_096;
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(1);

#[table(name = compaction_schedule, scheduled(compact_segments))]
pub struct CompactionSchedule {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
}

pub fn schedule(ctx: &ReducerContext) {
    ctx.db.compaction_schedule().insert(CompactionSchedule {
        scheduled_id: 0,
        scheduled_at: ScheduleAt::Interval(TimeDuration::from_duration(COMPACT_INTERVAL)),
    });
}

fn events_in(s: &StreamSegment) -> u64 {
    s.last_seq - s.first_seq + 1
}

/// Merges one run of adjacent segments into one. Returns false (and changes nothing)
/// if a segment does not decode.
fn merge(ctx: &ReducerContext, run: &[StreamSegment]) -> bool {
    let mut events = Vec::new();
    for s in run {
        match segment::decode(&s.data) {
            Ok(mut e) => events.append(&mut e),
            Err(e) => {
                log::error!("segment {} of {} does not decode ({e}); not compacting it", s.id, s.stream_id);
                return false;
            }
        }
    }
    let (first, last) = (&run[0], &run[run.len() - 1]);
    let merged = StreamSegment {
        id: 0,
        stream_id: first.stream_id.clone(),
        window_key: window_key(&first.stream_id, bucket(first.first_seq)),
        epoch: first.epoch,
        first_seq: first.first_seq,
        last_seq: last.last_seq,
        prev_hash: first.prev_hash.clone(),
        last_hash: last.last_hash.clone(),
        published_at: last.published_at,
        publisher: last.publisher,
        data: segment::encode(events),
    };
    for s in run {
        ctx.db.stream_segment().id().delete(s.id);
    }
    ctx.db.stream_segment().insert(merged);
    true
}

/// Compacts one stream from where the last sweep stopped; returns segments examined.
fn compact_stream(ctx: &ReducerContext, mut row: Stream, budget: usize) -> usize {
    let min_age = Duration::from_secs(crate::config::config(ctx).compact_min_age_secs);
    let old_enough = |s: &StreamSegment| ctx.timestamp.duration_since(s.published_at).is_some_and(|age| age >= min_age);
    let scanned: Vec<StreamSegment> = ctx
        .db
        .stream_segment()
        .by_stream_last()
        .filter((row.stream_id.as_str(), row.compacted_through + 1..))
        .take(budget)
        .take_while(|s| old_enough(s))
        .collect();
    if scanned.is_empty() {
        return 0;
    }
    let mut merged_away = 0u64;
    let mut run: Vec<StreamSegment> = Vec::new();
    let mut flush = |run: &mut Vec<StreamSegment>| {
        if run.len() >= 2 && merge(ctx, run) {
            merged_away += run.len() as u64 - 1;
        }
        run.clear();
    };
    for s in &scanned {
        let small = events_in(s) < SMALL_SEGMENT_EVENTS;
        let fits = run.first().is_some_and(|f| {
            bucket(f.first_seq) == bucket(s.first_seq) && s.last_seq - f.first_seq < COMPACT_TARGET_EVENTS && s.epoch == f.epoch
        });
        if !small || !fits {
            flush(&mut run);
        }
        if small {
            run.push(s.clone());
        }
    }
    // A trailing run that is still small may grow with the next segments: merge what is
    // here, and look at it again next sweep (at low rates runs arrive one at a time).
    let trailing = run.first().map(|f| (f.first_seq, run.iter().map(events_in).sum::<u64>()));
    flush(&mut run);
    row.compacted_through = match trailing {
        Some((first_seq, events)) if events < SMALL_SEGMENT_EVENTS => first_seq - 1,
        _ => scanned.last().map_or(row.compacted_through, |s| s.last_seq),
    };
    row.segment_count = row.segment_count.saturating_sub(merged_away);
    ctx.db.stream().stream_id().update(row);
    scanned.len()
}

/// Merges small segments of every stream, examining at most `COMPACT_SCAN_SEGMENTS`
/// segments per run. Only the scheduler may call it.
#[reducer]
pub fn compact_segments(ctx: &ReducerContext, _schedule: CompactionSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "compact_segments is run by the scheduler only"));
    }
    let mut budget = COMPACT_SCAN_SEGMENTS;
    let candidates: Vec<Stream> = ctx.db.stream().iter().filter(|s| s.head_seq > s.compacted_through).collect();
    for row in candidates {
        if budget == 0 {
            break;
        }
        budget = budget.saturating_sub(compact_stream(ctx, row, budget));
    }
    Ok(())
}

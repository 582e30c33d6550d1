//! Compaction: merges runs of small segments into larger ones.
//!
//! Low-rate publishing makes one small segment per call, and small segments behave like
//! the per-event rows that slow this engine's inserts down as the table grows
//! (docs/SEGMENTS.md). A scheduled sweep merges runs of adjacent small segments of one
//! stream, once they are older than `compact_min_age_secs` (default 10 s; live clients
//! have them by then), into one segment of at most [`COMPACT_TARGET_EVENTS`] events and
//! [`COMPACT_MAX_BYTES`] bytes. Seqs, chain hashes and idempotency keys are unchanged; a
//! merged segment stays in the window bucket of its first event. A client that sees the
//! merged segment skips the events it already applied.
//!
//! A run loads at most [`COMPACT_SCAN_SEGMENTS`] segments and [`COMPACT_SCAN_BYTES`]
//! bytes (plus the one segment that crosses the limit), holds only the run it is
//! building, visits the streams pending (`sweep_pending`) in turn from where the last run
//! stopped, and skips streams whose hints say there is nothing to merge yet (`sweep.rs`).
//! A stream is pending when it has new segments, and stays pending while a visit finds
//! segments too young to merge. A run that used its whole budget asks for another one
//! [`CATCH_UP_DELAY`] later.

use crate::streams::{stream, stream_segment, Stream, StreamSegment};
use crate::sweep::{self, Budget, Next, StreamSweep, Sweep, SweepPending, Walk};
use crate::{fail, ReducerResult};
use khala_proto::hash::{bucket, window_key};
use khala_proto::{segment, ErrorCode};
use spacetimedb::{reducer, table, ReducerContext, ScheduleAt, Table, TimeDuration, Timestamp};
use std::time::Duration;

/// Segments with fewer events than this are small...
pub const SMALL_SEGMENT_EVENTS: u64 = 64;
/// ...unless they hold this many bytes or more: at least four small segments fit in one
/// merged segment, so a merge always saves rows.
pub const SMALL_SEGMENT_BYTES: u64 = COMPACT_MAX_BYTES / 4;
/// A merged segment holds at most this many events...
pub const COMPACT_TARGET_EVENTS: u64 = 1_024;
/// ...and at most this many bytes of `data`: a client holds a whole segment to check its
/// chain, and a run holds one merged segment at a time.
pub const COMPACT_MAX_BYTES: u64 = 1024 * 1024;
/// Most segments one run loads.
pub const COMPACT_SCAN_SEGMENTS: u64 = 4_096;
/// Most bytes of segment `data` one run loads.
pub const COMPACT_SCAN_BYTES: u64 = 8 * 1024 * 1024;
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a run that used its whole budget runs again.
pub const CATCH_UP_DELAY: Duration = Duration::from_millis(100);

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

fn is_small(s: &StreamSegment) -> bool {
    is_small_len(events_in(s), s.data.len() as u64)
}

/// Whether a segment of `events` events and `bytes` bytes of `data` is small, so that
/// compaction may merge it. A segment that is not small never joins a merge.
pub fn is_small_len(events: u64, bytes: u64) -> bool {
    events < SMALL_SEGMENT_EVENTS && bytes < SMALL_SEGMENT_BYTES
}

/// Adjacent small segments that will become one.
#[derive(Default)]
struct Run {
    segments: Vec<StreamSegment>,
    bytes: u64,
}

impl Run {
    /// Whether `s` can join: small, same bucket and epoch, and the merged segment stays
    /// within both caps.
    fn accepts(&self, s: &StreamSegment) -> bool {
        self.segments.first().is_some_and(|f| {
            is_small(s)
                && bucket(f.first_seq) == bucket(s.first_seq)
                && s.epoch == f.epoch
                && s.last_seq - f.first_seq < COMPACT_TARGET_EVENTS
                && self.bytes + s.data.len() as u64 <= COMPACT_MAX_BYTES
        })
    }

    fn push(&mut self, s: StreamSegment) {
        self.bytes += s.data.len() as u64;
        self.segments.push(s);
    }

    /// Whether the merged segment would itself be small (so later segments may join it).
    fn still_small(&self) -> bool {
        let events = self.segments.iter().map(events_in).sum::<u64>();
        !self.segments.is_empty() && events < SMALL_SEGMENT_EVENTS && self.bytes < SMALL_SEGMENT_BYTES
    }

    /// Merges the run if it has two segments or more; returns how many rows went.
    fn flush(&mut self, ctx: &ReducerContext) -> u64 {
        let run = std::mem::take(self);
        if run.segments.len() >= 2 && merge(ctx, &run.segments) {
            run.segments.len() as u64 - 1
        } else {
            0
        }
    }
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

/// Whether a segment published at `at` is old enough to merge.
fn old_enough(ctx: &ReducerContext, at: Timestamp, min_age: Duration) -> bool {
    ctx.timestamp.duration_since(at).is_some_and(|age| age >= min_age)
}

/// What a visit that found segments too young to merge (the first published at
/// `young_at`) waits for. A stream published to within the last run's interval stays
/// pending: its next publish would mark it again anyway, and clearing it would cost a
/// pending row's delete and insert every run. A stream gone quiet gets a wake-up for when
/// the segment is old enough, and no visit until then.
fn wait_until_old_enough(ctx: &ReducerContext, row: &Stream, young_at: Timestamp, min_age: Duration) -> Next {
    let publishing = ctx.timestamp.duration_since(row.updated_at).is_none_or(|since| since < COMPACT_INTERVAL);
    if publishing {
        Next::NextRun
    } else {
        Next::At(sweep::wake_time(young_at, min_age, ctx.timestamp))
    }
}

/// Whether the hints say a visit would find nothing to merge (only an unchanged trailing
/// run is left, or the next segment is still too young), and if so what the next visit
/// waits for.
fn nothing_to_do(ctx: &ReducerContext, row: &Stream, hint: &StreamSweep, min_age: Duration) -> Option<Next> {
    let unchanged_tail = hint.compact_seen_head != 0 && hint.compact_seen_head == row.head_seq;
    let still_young = hint.compact_young_at != Timestamp::UNIX_EPOCH && !old_enough(ctx, hint.compact_young_at, min_age);
    if still_young {
        Some(wait_until_old_enough(ctx, row, hint.compact_young_at, min_age))
    } else if unchanged_tail {
        Some(Next::OnChange)
    } else {
        None
    }
}

/// Compacts one stream from where the last visit stopped, within `budget`; returns how
/// its walk ended and what the next visit waits for.
fn compact_stream(
    ctx: &ReducerContext,
    mut row: Stream,
    budget: &mut Budget,
    min_age: Duration,
    stored: Option<&StreamSweep>,
    mut hint: StreamSweep,
) -> (Walk, Next) {
    let stream_id = row.stream_id.clone();
    let from = row.compacted_through.saturating_add(1).max(row.oldest_seq);
    let (mut run, mut merged_away, mut examined_through, mut young_at) = (Run::default(), 0u64, None, None);
    let walk = sweep::walk(ctx, &stream_id, from, row.head_seq, budget, |s| {
        if !old_enough(ctx, s.published_at, min_age) {
            young_at = Some(s.published_at);
            return false;
        }
        examined_through = Some(s.last_seq);
        if !run.accepts(&s) {
            merged_away += run.flush(ctx);
        }
        if is_small(&s) {
            run.push(s);
        }
        true
    });
    // A trailing run that is still small may grow with the next segments: merge what is
    // here, and look at it again on a later visit (at low rates runs arrive one at a time).
    let trailing = run.still_small().then(|| run.segments[0].first_seq);
    merged_away += run.flush(ctx);
    let compacted_through = match (trailing, examined_through) {
        (Some(first_seq), _) => first_seq - 1,
        (None, Some(through)) => through,
        (None, None) => row.compacted_through,
    };
    if compacted_through != row.compacted_through || merged_away > 0 {
        row.compacted_through = compacted_through;
        row.segment_count = row.segment_count.saturating_sub(merged_away);
        ctx.db.stream().stream_id().update(row.clone());
    }
    hint.compact_seen_head = if walk == Walk::End && compacted_through < row.head_seq { row.head_seq } else { 0 };
    hint.compact_young_at = young_at.unwrap_or(Timestamp::UNIX_EPOCH);
    let next = young_at.map_or(Next::OnChange, |at| wait_until_old_enough(ctx, &row, at, min_age));
    sweep::save_hint(ctx, stored, hint);
    (walk, next)
}

/// Visits one pending stream: skips it when it has nothing unexamined or its hints say
/// there is nothing to merge yet, else compacts it.
fn visit(ctx: &ReducerContext, pending: &SweepPending, budget: &mut Budget, min_age: Duration) -> (Walk, Next) {
    let Some(row) = ctx.db.stream().stream_id().find(&pending.stream_id) else { return (Walk::End, Next::OnChange) };
    if row.head_seq <= row.compacted_through {
        return (Walk::End, Next::OnChange);
    }
    let (stored, hint) = sweep::hint_for(ctx, &row);
    if let Some(next) = nothing_to_do(ctx, &row, &hint, min_age) {
        return (Walk::End, next);
    }
    compact_stream(ctx, row, budget, min_age, stored.as_ref(), hint)
}

/// Asks for one more run soon, unless one is already pending.
fn catch_up(ctx: &ReducerContext, running: u64) {
    let pending = ctx.db.compaction_schedule().iter().any(|s| s.scheduled_id != running && matches!(s.scheduled_at, ScheduleAt::Time(_)));
    if !pending {
        let at = ctx.timestamp.checked_add_duration(CATCH_UP_DELAY).unwrap_or(ctx.timestamp);
        ctx.db.compaction_schedule().insert(CompactionSchedule { scheduled_id: 0, scheduled_at: ScheduleAt::Time(at) });
    }
}

/// Merges small segments, one budget per run, visiting streams in turn. Only the
/// scheduler may call it.
#[reducer]
pub fn compact_segments(ctx: &ReducerContext, schedule: CompactionSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "compact_segments is run by the scheduler only"));
    }
    let min_age = Duration::from_secs(crate::config::config(ctx).compact_min_age_secs);
    // Events cost nothing until decoded, and only small segments are decoded: bytes bound that.
    let mut budget = Budget::new(COMPACT_SCAN_SEGMENTS, u64::MAX, COMPACT_SCAN_BYTES);
    sweep::run(ctx, Sweep::Compaction, &mut budget, |pending, budget| visit(ctx, pending, budget, min_age));
    if !budget.has_room() {
        catch_up(ctx, schedule.scheduled_id);
    }
    Ok(())
}

//! Retention: a scheduled sweep trims whole segments, oldest first, and raises each
//! stream's `oldest_seq`, which is how clients learn that a cursor has gone stale.
//!
//! A run loads at most one [`budget`] of segments (`retention_chunk_segments` segments,
//! [`RETENTION_EVENTS`] events, [`RETENTION_BYTES`] of `data`, plus the one segment that
//! crosses the limit), visits the streams pending (`sweep_pending`) in turn from where the
//! last run stopped, and skips a stream whose oldest segment it has already seen
//! unexpired (`sweep.rs`). A stream with a policy is pending when it has new events or
//! a new policy, and again when its oldest segment expires by age (`retention_wake`). A
//! run that used its whole budget asks for another run [`CATCH_UP_DELAY`] later, so a
//! backlog drains at several budgets a second while each transaction stays short.
//! `reset_stream` deletes through the same [`trim_oldest`].

use crate::config::config;
use crate::streams::{event_key, keyed_stream, stream, stream_segment, Stream, StreamSegment};
use crate::sweep::{self, Budget, Next, Sweep, SweepPending, Walk};
use crate::{fail, ReducerResult};
use khala_proto::hash::key_hash;
use khala_proto::{segment, ErrorCode};
use spacetimedb::{reducer, table, ReducerContext, ScheduleAt, Table, TimeDuration, Timestamp};
use std::time::Duration;

/// How often the sweep runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(1);
/// Most events one run loads: each costs an `event_key` delete.
pub const RETENTION_EVENTS: u64 = 65_536;
/// Most bytes of segment `data` one run loads (it decodes them for their keys).
pub const RETENTION_BYTES: u64 = 8 * 1024 * 1024;
/// How soon a run that used its whole budget runs again.
pub const CATCH_UP_DELAY: Duration = Duration::from_millis(100);

#[table(name = retention_schedule, scheduled(sweep_retention))]
pub struct RetentionSchedule {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
}

pub fn schedule(ctx: &ReducerContext) {
    ctx.db.retention_schedule().insert(RetentionSchedule {
        scheduled_id: 0,
        scheduled_at: ScheduleAt::Interval(TimeDuration::from_duration(RETENTION_INTERVAL)),
    });
}

/// What one retention run (or one `reset_stream` step) may load.
pub fn budget(ctx: &ReducerContext) -> Budget {
    Budget::new(u64::from(config(ctx).retention_chunk_segments.max(1)), RETENTION_EVENTS, RETENTION_BYTES)
}

/// Whether `stream` has a retention policy (a count or an age limit).
pub fn has_policy(stream: &Stream) -> bool {
    Policy::of(stream).any()
}

/// A stream's policy and head, copied out so that checking a segment does not borrow
/// the row being trimmed.
#[derive(Clone, Copy)]
struct Policy {
    head_seq: u64,
    retain_max_events: u64,
    retain_max_age_secs: u64,
}

impl Policy {
    fn of(stream: &Stream) -> Self {
        Policy { head_seq: stream.head_seq, retain_max_events: stream.retain_max_events, retain_max_age_secs: stream.retain_max_age_secs }
    }

    fn any(&self) -> bool {
        self.retain_max_events > 0 || self.retain_max_age_secs > 0
    }

    /// What a visit waits for when the oldest segment left was published at
    /// `published_at`: its expiry by age, or, without an age limit, new events (it can
    /// only expire by count). An expiry more than [`sweep::MAX_WAKE_AHEAD`] away wakes the sweep
    /// at that horizon instead, and that visit looks again: the engine refuses to schedule
    /// further than about 795 days ahead, and a refused insert would fail every run.
    fn next_visit(&self, published_at: Timestamp, now: Timestamp) -> Next {
        if self.retain_max_age_secs == 0 {
            return Next::OnChange;
        }
        Next::At(sweep::wake_time(published_at, Duration::from_secs(self.retain_max_age_secs), now))
    }

    /// Whether a segment may go: it lies wholly below the newest `retain_max_events`, or
    /// it is older than `retain_max_age_secs`. Whole segments only, so a stream keeps at
    /// least its policy and at most one segment more.
    fn expired(&self, last_seq: u64, published_at: Timestamp, now: Timestamp) -> bool {
        let by_count = self.retain_max_events > 0 && last_seq.saturating_add(self.retain_max_events) <= self.head_seq;
        let by_age = self.retain_max_age_secs > 0
            && now.duration_since(published_at).is_some_and(|age| age.as_secs() >= self.retain_max_age_secs);
        by_count || by_age
    }
}

/// What [`trim_oldest`] did.
pub struct Trimmed {
    pub segments: u64,
    /// The first segment it loaded and kept (`first_seq`, `last_seq`, `published_at`).
    pub kept: Option<(u64, u64, Timestamp)>,
    pub walk: Walk,
}

/// Deletes one segment and, for a stream addressed by key, its `event_key` rows (a
/// stream addressed by seq has none).
fn delete_segment(ctx: &ReducerContext, stream_id: &str, seg: &StreamSegment) {
    if ctx.db.keyed_stream().stream_id().find(stream_id.to_string()).is_none() {
        ctx.db.stream_segment().id().delete(seg.id);
        return;
    }
    match segment::idempotency_keys(&seg.data) {
        Ok(keys) => {
            for key in keys {
                ctx.db.event_key().key_hash().delete(key_hash(stream_id, &key));
            }
        }
        Err(e) => log::error!("segment {} of {stream_id} does not decode ({e}); its idempotency keys stay", seg.id),
    }
    ctx.db.stream_segment().id().delete(seg.id);
}

/// Deletes `row`'s oldest segments, and their idempotency keys, while `doomed` holds and
/// `budget` lasts. Raises `oldest_seq`, lowers `segment_count` and writes the row if any
/// segment went.
pub fn trim_oldest(ctx: &ReducerContext, row: &mut Stream, budget: &mut Budget, doomed: impl Fn(&StreamSegment) -> bool) -> Trimmed {
    let stream_id = row.stream_id.clone();
    let (mut segments, mut kept, mut oldest) = (0u64, None, row.oldest_seq);
    let walk = sweep::walk(ctx, &stream_id, row.oldest_seq, row.head_seq, budget, |seg| {
        if !doomed(&seg) {
            kept = Some((seg.first_seq, seg.last_seq, seg.published_at));
            return false;
        }
        delete_segment(ctx, &stream_id, &seg);
        oldest = seg.last_seq + 1;
        segments += 1;
        true
    });
    if segments > 0 {
        row.oldest_seq = oldest;
        row.segment_count = row.segment_count.saturating_sub(segments);
        row.updated_at = ctx.timestamp;
        crate::stream_view::write(ctx, row);
        ctx.db.stream().stream_id().update(row.clone());
    }
    Trimmed { segments, kept, walk }
}

/// Asks for one more run soon, unless one is already pending.
fn catch_up(ctx: &ReducerContext, running: u64) {
    let pending = ctx.db.retention_schedule().iter().any(|s| s.scheduled_id != running && matches!(s.scheduled_at, ScheduleAt::Time(_)));
    if !pending {
        let at = ctx.timestamp.checked_add_duration(CATCH_UP_DELAY).unwrap_or(ctx.timestamp);
        ctx.db.retention_schedule().insert(RetentionSchedule { scheduled_id: 0, scheduled_at: ScheduleAt::Time(at) });
    }
}

/// Visits one pending stream: trims what has expired, unless its hints say the oldest
/// segment has not. Returns how the walk ended and what the next visit waits for.
fn visit(ctx: &ReducerContext, pending: &SweepPending, budget: &mut Budget) -> (Walk, Next) {
    let now = ctx.timestamp;
    let Some(mut row) = ctx.db.stream().stream_id().find(&pending.stream_id) else { return (Walk::End, Next::OnChange) };
    let policy = Policy::of(&row);
    if !policy.any() || row.oldest_seq > row.head_seq {
        return (Walk::End, Next::OnChange);
    }
    let (stored, mut hint) = sweep::hint_for(ctx, &row);
    let known = hint.oldest_first_seq != 0 && hint.oldest_first_seq == row.oldest_seq;
    if known && !policy.expired(hint.oldest_last_seq, hint.oldest_published_at, now) {
        return (Walk::End, policy.next_visit(hint.oldest_published_at, now));
    }
    let trimmed = trim_oldest(ctx, &mut row, budget, |s| policy.expired(s.last_seq, s.published_at, now));
    let Some((first_seq, last_seq, published_at)) = trimmed.kept else { return (trimmed.walk, Next::OnChange) };
    hint.oldest_first_seq = first_seq;
    hint.oldest_last_seq = last_seq;
    hint.oldest_published_at = published_at;
    sweep::save_hint(ctx, stored.as_ref(), hint);
    (trimmed.walk, policy.next_visit(published_at, now))
}

/// Applies the retention policies, one budget per run, visiting streams in turn.
/// Only the scheduler may call it.
#[reducer]
pub fn sweep_retention(ctx: &ReducerContext, schedule: RetentionSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "sweep_retention is run by the scheduler only"));
    }
    crate::stream_view::seed_once(ctx);
    let mut budget = budget(ctx);
    sweep::run(ctx, Sweep::Retention, &mut budget, |pending, budget| visit(ctx, pending, budget));
    if !budget.has_room() {
        catch_up(ctx, schedule.scheduled_id);
    }
    Ok(())
}

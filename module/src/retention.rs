//! Retention: a scheduled sweep trims whole segments in bounded chunks and raises each
//! stream's `oldest_seq`, which is how clients learn that a cursor has gone stale.

use crate::config::config;
use crate::streams::{event_key, stream, stream_segment, Stream};
use crate::{fail, ReducerResult};
use khala_proto::hash::key_hash;
use khala_proto::{segment, ErrorCode};
use spacetimedb::{reducer, table, ReducerContext, ScheduleAt, Table, TimeDuration, Timestamp};
use std::time::Duration;

/// How often the sweep runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(1);

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

/// Whether a segment may go: it lies wholly below the newest `retain_max_events`, or it
/// is older than `retain_max_age_secs`. Whole segments only, so a stream keeps at least
/// its policy and at most one segment more.
fn expired(stream: &Stream, last_seq: u64, published_at: Timestamp, now: Timestamp) -> bool {
    let by_count = stream.retain_max_events > 0 && last_seq.saturating_add(stream.retain_max_events) <= stream.head_seq;
    let by_age = stream.retain_max_age_secs > 0
        && now.duration_since(published_at).is_some_and(|age| age.as_secs() >= stream.retain_max_age_secs);
    by_count || by_age
}

/// Trims at most `budget` segments of one stream, oldest first. Returns how many it trimmed.
fn trim(ctx: &ReducerContext, mut row: Stream, budget: usize) -> usize {
    let doomed: Vec<_> = ctx
        .db
        .stream_segment()
        .by_stream_last()
        .filter((row.stream_id.as_str(), 0u64..))
        .take_while(|s| expired(&row, s.last_seq, s.published_at, ctx.timestamp))
        .take(budget)
        .collect();
    if doomed.is_empty() {
        return 0;
    }
    for seg in &doomed {
        match segment::decode(&seg.data) {
            Ok(events) => {
                for e in events {
                    ctx.db.event_key().key_hash().delete(key_hash(&row.stream_id, &e.idempotency_key));
                }
            }
            Err(e) => log::error!("segment {} of {} does not decode ({e}); its idempotency keys stay", seg.id, row.stream_id),
        }
        ctx.db.stream_segment().id().delete(seg.id);
        row.oldest_seq = seg.last_seq + 1;
    }
    row.segment_count = row.segment_count.saturating_sub(doomed.len() as u64);
    row.updated_at = ctx.timestamp;
    ctx.db.stream().stream_id().update(row);
    doomed.len()
}

/// Applies every stream's retention policy, at most `retention_chunk_segments` segments
/// per run. Only the scheduler may call it.
#[reducer]
pub fn sweep_retention(ctx: &ReducerContext, _schedule: RetentionSchedule) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "sweep_retention is run by the scheduler only"));
    }
    let mut budget = config(ctx).retention_chunk_segments as usize;
    let mut with_policy: Vec<Stream> =
        ctx.db.stream().iter().filter(|s| s.retain_max_events > 0 || s.retain_max_age_secs > 0).collect();
    // Least recently changed first: a trimmed (or busy) stream moves to the back, so one
    // stream cannot take every sweep's budget.
    with_policy.sort_by_key(|s| s.updated_at);
    for row in with_policy {
        if budget == 0 {
            break;
        }
        budget -= trim(ctx, row, budget);
    }
    Ok(())
}

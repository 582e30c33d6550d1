//! `stream_view`: what a subscriber reads of a stream, kept apart from the `stream` row
//! that every publish rewrites.
//!
//! Behind a rule on `:sender`, every subscriber has query plans of its own, evaluated for
//! each changed row of a table it watches (docs/BENCHMARKS.md, "A hundred subscribers"
//! and "Subscribers watch a view, not the stream row"). A publish changed three rows that
//! subscribers watched: the segment, and the stream row's delete and insert. Subscribers
//! now watch this view instead of `stream`: it changes at once when the epoch or the
//! retention floor does, and otherwise brings the head up at most every [`VIEW_EVERY`].
//! A subscriber follows the head from the segments it receives; the view tells it where
//! the stream stands before it has any (docs/CLIENT.md, "The head").
//!
//! `stream` stays the record: publish, ack and the sweeps read it, and publishers (the
//! mirror) still see it whole.

use crate::streams::{stream, Stream};
use crate::sweep::{sweep_seeded, SweepSeeded};
use crate::{fail, ReducerResult};
use khala_proto::ErrorCode;
use spacetimedb::{client_visibility_filter, reducer, table, Filter, ReducerContext, ScheduleAt, Table, TimeDuration};
use std::time::Duration;

/// How often published streams' views are refreshed: the longest the view's head trails
/// the stream's while the database keeps up (a refresh waits its turn behind a backlog of
/// calls like any reducer).
pub const VIEW_EVERY: Duration = Duration::from_millis(250);
/// Most views one refresh writes; the rest wait for the next.
pub const REFRESH_BATCH: usize = 4096;
/// `sweep_seeded` key of the views: a database made before `stream_view` existed has no
/// row there, and its first refresh (or retention run) writes every stream's view.
pub const VIEWS_SEEDED: u8 = 2;

/// A stream's epoch, retention floor and a recent head: the fields a client's
/// `StreamInfo` takes. While the stream is published its head is refreshed every
/// [`VIEW_EVERY`] (later behind a backlog of calls); it never runs ahead of
/// `stream.head_seq`.
#[table(name = stream_view, public)]
#[derive(Clone, PartialEq, Debug)]
pub struct StreamView {
    #[primary_key]
    pub stream_id: String,
    /// `stream.epoch`, written in the transaction that changes it.
    pub epoch: u32,
    /// A seq the stream's head has reached: `stream.head_seq` as of the last refresh.
    pub head_seq: u64,
    /// `stream.oldest_seq`, written in the transaction that raises it.
    pub oldest_seq: u64,
    /// The chain hash at `head_seq`.
    pub head_hash: Vec<u8>,
}

/// A client sees a stream's view while it holds a subscribe grant on it, as it sees the
/// `stream` row (the grant stands on the left for the same reason).
#[client_visibility_filter]
const VIEW_VISIBILITY: Filter = Filter::Sql(
    "SELECT stream_view.* FROM stream_grant JOIN stream_view ON stream_grant.stream_id = stream_view.stream_id \
     WHERE stream_grant.grantee = :sender AND stream_grant.subscribe = true",
);

/// A publisher sees the views of the streams its publish grants reach, as it sees their
/// `stream` rows. Rules on one table are ORed.
#[client_visibility_filter]
const VIEW_BY_PUBLISH_GRANT: Filter = Filter::Sql(
    "SELECT stream_view.* FROM stream_publisher JOIN stream_view ON stream_publisher.stream_id = stream_view.stream_id \
     WHERE stream_publisher.grantee = :sender",
);

/// Streams published since their view was last written. Private.
#[table(name = view_stale)]
pub struct ViewStale {
    #[primary_key]
    pub stream_id: String,
}

/// The refresh of stale views, every [`VIEW_EVERY`]. Private; run by the engine's
/// scheduler. An idle refresh reads the empty `view_stale` and writes nothing.
///
/// Not a one-shot per publish burst: a publish cannot tell a pending one-shot from one
/// that has just run and whose row the scheduler has not deleted yet, and a stale mark
/// left with no refresh to come froze a view for good (a cold replay found a stream's
/// view 207,000 events behind it).
#[table(name = view_refresh, scheduled(refresh_views))]
pub struct ViewRefresh {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
}

/// The view `row` gives.
fn view_of(row: &Stream) -> StreamView {
    StreamView {
        stream_id: row.stream_id.clone(),
        epoch: row.epoch,
        head_seq: row.head_seq,
        oldest_seq: row.oldest_seq,
        head_hash: row.head_hash.clone(),
    }
}

/// Writes `row`'s view now, unless it already says the same: for a new stream, a new
/// epoch, a raised floor, and a refresh.
pub fn write(ctx: &ReducerContext, row: &Stream) {
    let view = view_of(row);
    match ctx.db.stream_view().stream_id().find(&row.stream_id) {
        Some(old) if old == view => {}
        Some(_) => {
            ctx.db.stream_view().stream_id().update(view);
        }
        None => {
            ctx.db.stream_view().insert(view);
        }
    }
}

/// A publish moved `stream_id`'s head: its view is written by the next refresh (every
/// [`VIEW_EVERY`]). One lookup when the stream is stale already (a stream being
/// published), an insert otherwise.
pub fn mark_stale(ctx: &ReducerContext, stream_id: &str) {
    let stale = ctx.db.view_stale();
    if stale.stream_id().find(stream_id.to_string()).is_none() {
        stale.insert(ViewStale { stream_id: stream_id.to_string() });
    }
}

fn schedule(ctx: &ReducerContext) {
    let every = ScheduleAt::Interval(TimeDuration::from_duration(VIEW_EVERY));
    ctx.db.view_refresh().insert(ViewRefresh { scheduled_id: 0, scheduled_at: every });
}

/// A fresh database has no streams: its views start seeded, and refreshed from now on.
pub fn init(ctx: &ReducerContext) {
    ctx.db.sweep_seeded().insert(SweepSeeded { sweep: VIEWS_SEEDED, at: ctx.timestamp });
    schedule(ctx);
}

/// On a database made before views existed, writes every stream's view once; and starts
/// the refresh wherever none runs. A lookup and a count when both are done already; the
/// retention sweep calls it every run, so an upgraded database has its views within a
/// run.
pub fn seed_once(ctx: &ReducerContext) {
    if ctx.db.view_refresh().count() == 0 {
        schedule(ctx);
    }
    if ctx.db.sweep_seeded().sweep().find(VIEWS_SEEDED).is_some() {
        return;
    }
    let mut seeded = 0u64;
    for row in ctx.db.stream().iter() {
        write(ctx, &row);
        seeded += 1;
    }
    log::info!("stream_view: wrote the views of {seeded} streams once");
    ctx.db.sweep_seeded().insert(SweepSeeded { sweep: VIEWS_SEEDED, at: ctx.timestamp });
}

/// Writes the views of the streams published since their last refresh, at most
/// [`REFRESH_BATCH`] per run. Only the scheduler may call it.
#[reducer]
pub fn refresh_views(ctx: &ReducerContext, _refresh: ViewRefresh) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        return Err(fail(ErrorCode::Unauthorized, "refresh_views is run by the scheduler only"));
    }
    let stale: Vec<String> = ctx.db.view_stale().iter().take(REFRESH_BATCH).map(|s| s.stream_id).collect();
    for stream_id in &stale {
        if let Some(row) = ctx.db.stream().stream_id().find(stream_id) {
            write(ctx, &row);
        }
        ctx.db.view_stale().stream_id().delete(stream_id);
    }
    Ok(())
}

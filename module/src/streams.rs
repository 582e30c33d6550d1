//! Streams and their log, stored as segments.
//!
//! The log of a stream is a run of `stream_segment` rows, one per publish batch, each
//! holding its events packed in `data` (format: `khala_proto::segment`). Measured on
//! this engine, rows with a large var-len column go to the blob store and keep inserts
//! flat as the table grows, while per-event rows slow down with table size
//! (docs/SEGMENTS.md). Per-event lookups that must stay exact (idempotency) live in the
//! fixed-size `event_key` table.

use crate::access;
use crate::retention;
use crate::sweep::{self, Walk};
use crate::{fail, ReducerResult};
use khala_proto::hash::GENESIS;
use khala_proto::ErrorCode;
use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, Table, Timestamp};

pub use khala_proto::limits::MAX_STREAM_ID_LEN;

/// One stream's head, retention floor and policy.
#[table(name = stream, public)]
#[derive(Clone)]
pub struct Stream {
    #[primary_key]
    pub stream_id: String,
    /// Starts at 1; a client that sees it change rebuilds the stream.
    pub epoch: u32,
    /// Seq of the newest event; 0 before the first publish.
    pub head_seq: u64,
    /// Lowest retained seq (`head_seq + 1` when nothing is retained). A client whose
    /// cursor is below `oldest_seq - 1` is stale and must rebootstrap.
    pub oldest_seq: u64,
    /// Chain hash at `head_seq` (32 bytes).
    pub head_hash: Vec<u8>,
    /// Keep at least this many newest events; 0 = no count limit.
    pub retain_max_events: u64,
    /// Drop segments older than this; 0 = no age limit.
    pub retain_max_age_secs: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Segments currently retained.
    pub segment_count: u64,
    /// Events skipped as idempotency duplicates, over the stream's life.
    pub duplicates: u64,
    /// Compaction has examined the segments up to this seq (see `compaction.rs`).
    pub compacted_through: u64,
}

/// A client sees a stream only while it holds a subscribe grant on it.
///
/// The grant table stands on the left of the join on purpose: `stream_grant` has an RLS
/// rule of its own, and SpacetimeDB 1.2 expands a rule-bearing table on the right of a
/// join into a filtered cross join, which subscriptions refuse ("Subscriptions require
/// indexes on join columns"). On the left it stays an index join.
#[client_visibility_filter]
const STREAM_VISIBILITY: Filter = Filter::Sql(
    "SELECT stream.* FROM stream_grant JOIN stream ON stream_grant.stream_id = stream.stream_id \
     WHERE stream_grant.grantee = :sender AND stream_grant.subscribe = true",
);

/// A publisher sees the streams its publish grants reach (heads and head hashes for the
/// mirror's reconciliation). Rules on one table are ORed.
#[client_visibility_filter]
const STREAM_BY_PUBLISH_GRANT: Filter = Filter::Sql(
    "SELECT stream.* FROM stream_publisher JOIN stream ON stream_publisher.stream_id = stream.stream_id \
     WHERE stream_publisher.grantee = :sender",
);

/// One publish batch of one stream: events `first_seq..=last_seq`.
#[table(name = stream_segment, public, index(name = by_stream_last, btree(columns = [stream_id, last_seq])))]
#[derive(Clone)]
pub struct StreamSegment {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub stream_id: String,
    /// `window_key(stream_id, first_seq / WINDOW_EVENTS)`: the RLS join column.
    #[index(btree)]
    pub window_key: u128,
    pub epoch: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Chain hash at `first_seq - 1`, so a client can verify a segment on its own.
    pub prev_hash: Vec<u8>,
    /// Chain hash at `last_seq`.
    pub last_hash: Vec<u8>,
    pub published_at: Timestamp,
    pub publisher: Identity,
    /// `khala_proto::segment` encoding: a version byte, then the packed events.
    pub data: Vec<u8>,
}

/// A client sees the segments of the windows it opened (`windows.rs`); a window can only
/// be opened, and stays open only, while the client holds a live subscribe grant.
#[client_visibility_filter]
const SEGMENT_VISIBILITY: Filter = Filter::Sql(
    "SELECT stream_segment.* FROM client_window JOIN stream_segment ON client_window.window_key = stream_segment.window_key \
     WHERE client_window.grantee = :sender",
);

/// A publisher sees the segments of the streams its publish grants reach, so that the
/// mirror can compare what the module holds with the authority (divergence checks).
/// An identity that publishes should not also subscribe: this rule has no windows.
#[client_visibility_filter]
const SEGMENT_BY_PUBLISH_GRANT: Filter = Filter::Sql(
    "SELECT stream_segment.* FROM stream_publisher JOIN stream_segment ON stream_publisher.stream_id = stream_segment.stream_id \
     WHERE stream_publisher.grantee = :sender",
);

/// The per-stream idempotency index: fixed-size columns only, so it stays fast as it
/// grows. `key_hash` already includes the stream id (`khala_proto::hash::key_hash`).
/// Rows are removed with their segment by the retention sweep. Private.
#[table(name = event_key)]
pub struct EventKey {
    #[primary_key]
    pub key_hash: u128,
    pub seq: u64,
    /// First 16 bytes of the payload hash.
    pub payload_hash: u128,
}

/// The segment of `stream_id` that holds `seq`, if retained.
///
/// The engine materialises a whole index range before the first row is read, so an open
/// range (`seq..`) would cost the rest of the stream. A segment never holds more than a
/// window of events (publish batches and merges are capped below it), so the holder's
/// `last_seq` lies in `seq..seq + WINDOW_EVENTS`; the ranges probed grow by 4 from one seq
/// to that bound, and stop at the first that holds a segment ending at or after `seq`.
pub fn segment_holding(ctx: &ReducerContext, stream_id: &str, seq: u64) -> Option<StreamSegment> {
    let mut width = 1u64;
    loop {
        let found = ctx.db.stream_segment().by_stream_last().filter((stream_id, seq..seq.saturating_add(width))).min_by_key(|s| s.last_seq);
        if let Some(s) = found {
            return (s.first_seq <= seq).then_some(s);
        }
        if width >= khala_proto::hash::WINDOW_EVENTS {
            return None;
        }
        width = (width * 4).min(khala_proto::hash::WINDOW_EVENTS);
    }
}

/// Streams addressed by idempotency key (published without `authority_seq`): only their
/// events have `event_key` rows. Streams addressed by seq (the mirror's) keep no
/// per-event index at all. Private.
#[table(name = keyed_stream)]
pub struct KeyedStream {
    #[primary_key]
    pub stream_id: String,
}

/// Stream ids are 1..=128 bytes of `[A-Za-z0-9._:-]`, starting with a letter or digit.
/// This keeps them safe in file names, logs and SQL literals (clients quote anyway).
pub fn validate_stream_id(stream_id: &str) -> ReducerResult {
    if stream_id.is_empty() {
        return Err(fail(ErrorCode::InvalidArgument, "stream_id is empty"));
    }
    if stream_id.len() > MAX_STREAM_ID_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("stream_id is {} bytes; the limit is {MAX_STREAM_ID_LEN}", stream_id.len())));
    }
    if !khala_proto::limits::valid_stream_id(stream_id) {
        return Err(fail(
            ErrorCode::InvalidArgument,
            format!("stream_id {stream_id:?} must start with a letter or digit and use only A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(())
}

/// Stores a stream that did not exist (its `new_stream` row, published to or not): the
/// row, its view, and the reach of the prefix grants that cover it. Publishing and
/// `create_stream` both create streams this one way.
pub fn insert_new(ctx: &ReducerContext, row: Stream) {
    crate::stream_view::write(ctx, &row);
    let created = ctx.db.stream().insert(row);
    access::on_stream_created(ctx, &created.stream_id);
}

/// A new, empty stream row.
pub fn new_stream(ctx: &ReducerContext, stream_id: String) -> Stream {
    Stream {
        stream_id,
        epoch: 1,
        head_seq: 0,
        oldest_seq: 1,
        head_hash: GENESIS.to_vec(),
        retain_max_events: 0,
        retain_max_age_secs: 0,
        created_at: ctx.timestamp,
        updated_at: ctx.timestamp,
        segment_count: 0,
        duplicates: 0,
        compacted_through: 0,
    }
}

/// Creates a stream ahead of its first publish (admin only), with a retention policy.
/// Publishing to an unknown stream also creates it, with no retention limit; creating a
/// stream that exists only updates its policy.
#[reducer]
pub fn create_stream(ctx: &ReducerContext, stream_id: String, retain_max_events: u64, retain_max_age_secs: u64) -> ReducerResult {
    access::require_admin(ctx)?;
    validate_stream_id(&stream_id)?;
    let existing = ctx.db.stream().stream_id().find(&stream_id);
    let mut row = existing.clone().unwrap_or_else(|| new_stream(ctx, stream_id));
    row.retain_max_events = retain_max_events;
    row.retain_max_age_secs = retain_max_age_secs;
    row.updated_at = ctx.timestamp;
    sweep::mark_changed(ctx, &row);
    if existing.is_some() {
        ctx.db.stream().stream_id().update(row);
    } else {
        insert_new(ctx, row);
    }
    Ok(())
}

/// Changes an existing stream's retention policy (admin only).
#[reducer]
pub fn set_retention(ctx: &ReducerContext, stream_id: String, retain_max_events: u64, retain_max_age_secs: u64) -> ReducerResult {
    access::require_admin(ctx)?;
    validate_stream_id(&stream_id)?;
    let Some(mut row) = ctx.db.stream().stream_id().find(&stream_id) else {
        return Err(fail(ErrorCode::UnknownStream, format!("no stream {stream_id:?}")));
    };
    row.retain_max_events = retain_max_events;
    row.retain_max_age_secs = retain_max_age_secs;
    row.updated_at = ctx.timestamp;
    sweep::mark_changed(ctx, &row);
    ctx.db.stream().stream_id().update(row);
    Ok(())
}

/// Starts a stream's history over (admin only), in bounded steps. Each call deletes at
/// most one retention budget (`retention::budget`) of the oldest segments with their
/// idempotency keys, raising `oldest_seq` as retention does. The call that leaves no
/// segment behind also sets the head back to 0 and the epoch up by one; clients see the
/// new epoch and rebuild the stream (`epoch_changed`); acks keep the epoch they were
/// made in. Until then the epoch is unchanged and the caller calls again (a stream that
/// fits in one budget is reset by one call). "Call again" cannot be an error: an error
/// would roll the step's deletions back with it. A publisher that keeps writing to the
/// stream meanwhile can outpace the steps; stop it first.
#[reducer]
pub fn reset_stream(ctx: &ReducerContext, stream_id: String) -> ReducerResult {
    access::require_admin(ctx)?;
    validate_stream_id(&stream_id)?;
    let Some(mut row) = ctx.db.stream().stream_id().find(&stream_id) else {
        return Err(fail(ErrorCode::UnknownStream, format!("no stream {stream_id:?}")));
    };
    let mut budget = retention::budget(ctx);
    let step = retention::trim_oldest(ctx, &mut row, &mut budget, |_| true);
    if step.walk != Walk::End {
        let (segments, events, bytes) = budget.used();
        log::info!(
            "reset_stream {stream_id}: deleted {segments} segments ({events} events, {bytes} bytes); {} remain, call again",
            row.segment_count
        );
        return Ok(());
    }
    sweep::forget(ctx, &stream_id);
    row.epoch = row.epoch.saturating_add(1);
    row.head_seq = 0;
    row.oldest_seq = 1;
    row.head_hash = GENESIS.to_vec();
    row.segment_count = 0;
    row.compacted_through = 0;
    row.updated_at = ctx.timestamp;
    crate::stream_view::write(ctx, &row);
    ctx.db.stream().stream_id().update(row);
    Ok(())
}

//! The `publish` reducer: one batch of events onto one stream, in one transaction.

use crate::access;
use crate::config::config;
use crate::streams::{event_key, new_stream, stream, stream_segment, validate_stream_id, EventKey, StreamSegment};
use crate::{fail, ReducerResult};
use khala_proto::hash::{bucket, chain_hash, from_slice, key_hash, payload_hash, truncate, window_key, GENESIS};
use khala_proto::{segment, ErrorCode, SegmentEvent};
use spacetimedb::{reducer, ReducerContext, SpacetimeType, Table};

/// Longest idempotency key and kind, in bytes.
pub const MAX_KEY_LEN: usize = 512;
pub const MAX_KIND_LEN: usize = 128;

/// One event as a publisher sends it.
#[derive(SpacetimeType, Clone, Debug)]
pub struct PublishEvent {
    /// Unique per stream; the mirror uses `topic:<topic>:seq:<n>:kind:<kind>`.
    pub idempotency_key: String,
    pub kind: String,
    pub payload: Vec<u8>,
    /// The authority's own seq for this event. When set it must equal `head_seq + 1`.
    pub authority_seq: Option<u64>,
    /// When the authority saw the event, in microseconds since the Unix epoch; 0 if unknown.
    pub occurred_at_micros: i64,
}

fn validate_event(index: usize, event: &PublishEvent, max_payload: u32) -> ReducerResult {
    if event.idempotency_key.is_empty() || event.idempotency_key.len() > MAX_KEY_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("event {index}: idempotency_key must be 1..={MAX_KEY_LEN} bytes")));
    }
    if event.kind.is_empty() || event.kind.len() > MAX_KIND_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("event {index}: kind must be 1..={MAX_KIND_LEN} bytes")));
    }
    if event.payload.len() > max_payload as usize {
        return Err(fail(
            ErrorCode::PayloadTooLarge,
            format!("event {index} (key {}) has {} bytes; the limit is {max_payload}", event.idempotency_key, event.payload.len()),
        ));
    }
    Ok(())
}

/// Appends `events` to `stream_id`. Needs the publisher role and a live publish grant
/// reaching the stream, checked before anything else (`forbidden_stream` otherwise, the
/// same whether or not the stream exists). Creates the stream on first publish.
///
/// Per event: a key already published with the same payload hash is skipped and counted
/// as a duplicate; the same key with another payload is `idempotency_conflict`; an
/// `authority_seq` other than `head + 1` is `sequence_conflict expected=.. actual=..`.
/// Any error rolls the whole batch back. The new events form one segment row.
#[reducer]
pub fn publish(ctx: &ReducerContext, stream_id: String, events: Vec<PublishEvent>) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    access::require_publish(ctx, &stream_id)?;
    let cfg = config(ctx);
    if events.is_empty() {
        return Err(fail(ErrorCode::InvalidArgument, "a publish batch needs at least one event"));
    }
    if events.len() > cfg.max_batch_events as usize {
        return Err(fail(ErrorCode::BatchTooLarge, format!("{} events in one batch; the limit is {}", events.len(), cfg.max_batch_events)));
    }
    let batch_bytes: usize = events.iter().map(|e| e.payload.len()).sum();
    if batch_bytes > cfg.max_batch_bytes as usize {
        return Err(fail(ErrorCode::BatchTooLarge, format!("{batch_bytes} payload bytes in one batch; the limit is {}", cfg.max_batch_bytes)));
    }

    let existing = ctx.db.stream().stream_id().find(&stream_id);
    let existed = existing.is_some();
    let mut row = existing.unwrap_or_else(|| new_stream(ctx, stream_id.clone()));
    let prev_hash = from_slice(&row.head_hash).unwrap_or(GENESIS);
    let mut chain = prev_hash;
    let mut head = row.head_seq;
    let mut packed = Vec::with_capacity(events.len());
    let mut duplicates = 0u64;

    for (index, event) in events.into_iter().enumerate() {
        validate_event(index, &event, cfg.max_payload_bytes)?;
        let phash = payload_hash(&event.payload);
        let khash = key_hash(&stream_id, &event.idempotency_key);
        if let Some(seen) = ctx.db.event_key().key_hash().find(khash) {
            if seen.payload_hash == truncate(&phash) {
                duplicates += 1;
                continue;
            }
            return Err(fail(
                ErrorCode::IdempotencyConflict,
                format!("event {index}: key {} was published at seq={} with another payload", event.idempotency_key, seen.seq),
            ));
        }
        let seq = head + 1;
        if let Some(actual) = event.authority_seq {
            if actual != seq {
                return Err(fail(
                    ErrorCode::SequenceConflict,
                    format!("stream {stream_id} event {index}: expected={seq} actual={actual}"),
                ));
            }
        }
        chain = chain_hash(&chain, &stream_id, seq, &event.kind, &phash);
        ctx.db.event_key().insert(EventKey { key_hash: khash, seq, payload_hash: truncate(&phash) });
        packed.push(SegmentEvent {
            seq,
            kind: event.kind,
            payload: event.payload,
            idempotency_key: event.idempotency_key,
            occurred_at_micros: event.occurred_at_micros,
        });
        head = seq;
    }

    if !packed.is_empty() {
        let first_seq = row.head_seq + 1;
        ctx.db.stream_segment().insert(StreamSegment {
            id: 0,
            window_key: window_key(&stream_id, bucket(first_seq)),
            stream_id: stream_id.clone(),
            epoch: row.epoch,
            first_seq,
            last_seq: head,
            prev_hash: prev_hash.to_vec(),
            last_hash: chain.to_vec(),
            published_at: ctx.timestamp,
            publisher: ctx.sender,
            data: segment::encode(packed),
        });
        row.segment_count += 1;
        if row.oldest_seq > row.head_seq {
            // The stream was empty (new, or fully trimmed): its floor is this segment.
            row.oldest_seq = row.head_seq + 1;
        }
        row.head_seq = head;
        row.head_hash = chain.to_vec();
    }
    row.duplicates += duplicates;
    row.updated_at = ctx.timestamp;
    if existed {
        ctx.db.stream().stream_id().update(row);
    } else {
        ctx.db.stream().insert(row);
        access::on_stream_created(ctx, &stream_id);
    }
    Ok(())
}

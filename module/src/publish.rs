//! The `publish` reducer: one batch of events onto one stream, in one transaction.

use crate::access;
use crate::config::config;
use crate::streams::{event_key, keyed_stream, new_stream, stream, stream_segment, validate_stream_id, EventKey, KeyedStream, StreamSegment};
use crate::sweep;
use crate::{fail, ReducerResult};
use khala_proto::hash::{bucket, chain_hash, from_slice, key_hash, payload_hash, truncate, window_key, Hash32, GENESIS};
use khala_proto::{segment, ErrorCode, SegmentEvent};
use spacetimedb::{reducer, ReducerContext, SpacetimeType, Table};

pub use khala_proto::limits::{MAX_KEY_LEN, MAX_KIND_LEN};

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

/// The checks every event passes, whichever reducer brought it.
fn validate_event(index: usize, key: &str, kind: &str, payload_len: usize, max_payload: u32) -> ReducerResult {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("event={index}: idempotency_key must be 1..={MAX_KEY_LEN} bytes")));
    }
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err(fail(ErrorCode::InvalidArgument, format!("event={index}: kind must be 1..={MAX_KIND_LEN} bytes")));
    }
    if payload_len > max_payload as usize {
        return Err(fail(ErrorCode::PayloadTooLarge, format!("event={index} (key {key}) has {payload_len} bytes; the limit is {max_payload}")));
    }
    Ok(())
}

/// The batch limits (`khala_config`): events per call and payload bytes per call.
fn check_batch(cfg: &crate::config::KhalaConfig, events: usize, payload_bytes: usize) -> ReducerResult {
    if events == 0 {
        return Err(fail(ErrorCode::InvalidArgument, "a publish batch needs at least one event"));
    }
    if events > cfg.max_batch_events as usize {
        return Err(fail(ErrorCode::BatchTooLarge, format!("{events} events in one batch; the limit is {}", cfg.max_batch_events)));
    }
    if payload_bytes > cfg.max_batch_bytes as usize {
        return Err(fail(ErrorCode::BatchTooLarge, format!("{payload_bytes} payload bytes in one batch; the limit is {}", cfg.max_batch_bytes)));
    }
    Ok(())
}

/// How a batch names where its events go: every event carries `authority_seq`, or none does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Addressing {
    /// The authority's seqs: a duplicate is recognised by its seq (`seq <= head`) and
    /// compared with the stored event, so no per-event index is kept.
    BySeq,
    /// Idempotency keys only: each key is kept in the `event_key` index.
    ByKey,
}

fn addressing(events: &[PublishEvent]) -> Result<Addressing, String> {
    let with_seq = events.iter().filter(|e| e.authority_seq.is_some()).count();
    match with_seq {
        0 => Ok(Addressing::ByKey),
        n if n == events.len() => Ok(Addressing::BySeq),
        _ => Err(fail(ErrorCode::InvalidArgument, "a batch gives authority_seq for every event or for none")),
    }
}

/// Appends `events` to `stream_id`. Needs the publisher role and a live publish grant
/// reaching the stream, checked before anything else (`forbidden_stream` otherwise, the
/// same whether or not the stream exists). Creates the stream on first publish.
///
/// A stream is addressed by seq or by key, fixed by its first publish (`keyed_stream`
/// marks the keyed ones); a batch of the other kind is `invalid_argument`.
/// - By seq (the mirror): an event at `head + 1` is appended; at or below the head it is
///   compared with the stored event at that seq: the same key, kind and payload is skipped
///   and counted as a duplicate, anything else is `idempotency_conflict`; below the
///   retention floor or above `head + 1` it is `sequence_conflict expected=.. actual=..`.
/// - By key: a key already published with the same payload hash is skipped; with another
///   payload it is `idempotency_conflict`.
///
/// Any error rolls the whole batch back. The new events form one segment row.
#[reducer]
pub fn publish(ctx: &ReducerContext, stream_id: String, events: Vec<PublishEvent>) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    access::require_publish(ctx, &stream_id)?;
    let cfg = config(ctx);
    check_batch(&cfg, events.len(), events.iter().map(|e| e.payload.len()).sum())?;
    let addressing = addressing(&events)?;

    let (row, existed) = stream_row(ctx, &stream_id);
    let keyed = ctx.db.keyed_stream().stream_id().find(&stream_id).is_some();
    match (addressing, keyed) {
        (Addressing::BySeq, true) => return Err(addressed_by_key(&stream_id)),
        (Addressing::ByKey, false) if row.head_seq > 0 || row.epoch > 1 => {
            return Err(fail(ErrorCode::InvalidArgument, format!("stream {stream_id} is addressed by seq: give every event its authority_seq")));
        }
        (Addressing::ByKey, false) => {
            ctx.db.keyed_stream().insert(KeyedStream { stream_id: stream_id.clone() });
        }
        _ => {}
    }

    let mut batch = Batch::new(&stream_id, &row, events.len());
    let mut stored = StoredEvents::new(&row);
    for (index, event) in events.into_iter().enumerate() {
        validate_event(index, &event.idempotency_key, &event.kind, event.payload.len(), cfg.max_payload_bytes)?;
        match addressing {
            Addressing::BySeq => batch.by_seq(ctx, &mut stored, index, event)?,
            Addressing::ByKey => batch.by_key(ctx, index, event)?,
        }
    }
    let data = (!batch.packed.is_empty()).then(|| segment::encode(std::mem::take(&mut batch.packed)));
    commit(ctx, row, existed, batch, data);
    Ok(())
}

/// Appends a publisher's segment, already encoded as the module stores it
/// (`[SEGMENT_FORMAT_V1] ‖ SegmentBody`, docs/SEGMENTS.md), to `stream_id`: the mirror's
/// way in. Every event's `seq` is the authority's, as `authority_seq` is in [`publish`],
/// and the checks, errors and duplicate handling are `publish`'s for a stream addressed
/// by seq (`event=N` counts events in the segment). The module does not decode the
/// events into structs nor encode a segment: when every event is new, the bytes sent are
/// the bytes stored. `invalid_argument` when the data does not decode, its seqs are not
/// contiguous, or it is not in the canonical form `segment::encode` writes
/// (`segment::decode_borrowed`: nothing else rides along in the bytes stored).
#[reducer]
pub fn publish_segment(ctx: &ReducerContext, stream_id: String, data: Vec<u8>) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    access::require_publish(ctx, &stream_id)?;
    let cfg = config(ctx);
    let events = segment::decode_borrowed(&data).map_err(|e| fail(ErrorCode::InvalidArgument, format!("the segment for stream {stream_id}: {e}")))?;
    check_batch(&cfg, events.len(), events.iter().map(|e| e.payload.len()).sum())?;

    let (row, existed) = stream_row(ctx, &stream_id);
    if ctx.db.keyed_stream().stream_id().find(&stream_id).is_some() {
        return Err(addressed_by_key(&stream_id));
    }
    let mut batch = Batch::new(&stream_id, &row, 0);
    let mut stored = StoredEvents::new(&row);
    // The seqs are contiguous: duplicates (at or below the head) come first, then the
    // new events, from `first_new` on.
    let mut first_new = None;
    for (index, event) in events.iter().enumerate() {
        validate_event(index, event.idempotency_key, event.kind, event.payload.len(), cfg.max_payload_bytes)?;
        if event.seq == batch.head + 1 {
            batch.link(event.kind, &payload_hash(event.payload));
            first_new.get_or_insert(index);
        } else if event.seq > batch.head || event.seq == 0 {
            return Err(batch.sequence_conflict(index, event.seq));
        } else {
            batch.duplicate(ctx, &mut stored, index, event.seq, event.idempotency_key, event.kind, event.payload)?;
        }
    }
    let data = match first_new {
        None => None,
        Some(0) => Some(data),
        Some(i) => Some(segment::encode_refs(&events[i..])),
    };
    commit(ctx, row, existed, batch, data);
    Ok(())
}

/// The stream's row, and whether it is stored yet (`commit` stores a new one).
#[allow(clippy::ptr_arg)] // the unique index looks up by `&String`
fn stream_row(ctx: &ReducerContext, stream_id: &String) -> (crate::streams::Stream, bool) {
    match ctx.db.stream().stream_id().find(stream_id) {
        Some(row) => (row, true),
        None => (new_stream(ctx, stream_id.clone()), false),
    }
}

/// The refusal of events addressed by seq to a stream addressed by key.
fn addressed_by_key(stream_id: &str) -> String {
    fail(ErrorCode::InvalidArgument, format!("stream {stream_id} is addressed by key: publish it without authority_seq"))
}

/// Stores a batch: the segment row of its new events (`data`, when there are any) and the
/// stream's new head, or the stream itself when this publish created it.
fn commit(ctx: &ReducerContext, mut row: crate::streams::Stream, existed: bool, batch: Batch, data: Option<Vec<u8>>) {
    let Batch { stream_id, prev_hash, chain, head, duplicates, .. } = batch;
    let stream_id = stream_id.to_string();
    let data_stored = data.is_some();
    if let Some(data) = data {
        let first_seq = row.head_seq + 1;
        // Compaction would only look at a segment that is not small and move past it: when
        // it has looked at everything before, move past it here, so that it never loads
        // the segment (a batched publisher's segments would otherwise all be read again).
        let examined_all = row.compacted_through == row.head_seq;
        let small = crate::compaction::is_small_len(head - row.head_seq, data.len() as u64);
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
            data,
        });
        row.segment_count += 1;
        if row.oldest_seq > row.head_seq {
            // The stream was empty (new, or fully trimmed): its floor is this segment.
            row.oldest_seq = row.head_seq + 1;
        }
        row.head_seq = head;
        row.head_hash = chain.to_vec();
        if examined_all && !small {
            row.compacted_through = head;
        }
    }
    row.duplicates += duplicates;
    row.updated_at = ctx.timestamp;
    if data_stored {
        sweep::mark_changed(ctx, &row);
    }
    if existed {
        if data_stored {
            crate::stream_view::mark_stale(ctx, &stream_id);
        }
        ctx.db.stream().stream_id().update(row);
    } else {
        crate::streams::insert_new(ctx, row);
    }
}

/// The batch being built: the chain and head after its new events, and (for `publish`)
/// the new events themselves.
struct Batch<'a> {
    stream_id: &'a str,
    /// The chain hash at the stream's head before this batch.
    prev_hash: Hash32,
    chain: Hash32,
    head: u64,
    packed: Vec<SegmentEvent>,
    duplicates: u64,
}

impl<'a> Batch<'a> {
    fn new(stream_id: &'a str, row: &crate::streams::Stream, capacity: usize) -> Self {
        let prev_hash = from_slice(&row.head_hash).unwrap_or(GENESIS);
        Batch { stream_id, prev_hash, chain: prev_hash, head: row.head_seq, packed: Vec::with_capacity(capacity), duplicates: 0 }
    }

    /// Links the next event (at `head + 1`) into the chain.
    fn link(&mut self, kind: &str, phash: &Hash32) {
        self.head += 1;
        self.chain = chain_hash(&self.chain, self.stream_id, self.head, kind, phash);
    }

    fn append(&mut self, event: PublishEvent, phash: &Hash32) {
        self.link(&event.kind, phash);
        self.packed.push(SegmentEvent {
            seq: self.head,
            kind: event.kind,
            payload: event.payload,
            idempotency_key: event.idempotency_key,
            occurred_at_micros: event.occurred_at_micros,
        });
    }

    fn sequence_conflict(&self, index: usize, actual: u64) -> String {
        fail(ErrorCode::SequenceConflict, format!("stream {} event={index}: expected={} actual={actual}", self.stream_id, self.head + 1))
    }

    fn by_seq(&mut self, ctx: &ReducerContext, stored: &mut StoredEvents, index: usize, event: PublishEvent) -> ReducerResult {
        let seq = event.authority_seq.unwrap_or_default();
        if seq == self.head + 1 {
            let phash = payload_hash(&event.payload);
            self.append(event, &phash);
            return Ok(());
        }
        if seq > self.head || seq == 0 {
            return Err(self.sequence_conflict(index, seq));
        }
        self.duplicate(ctx, stored, index, seq, &event.idempotency_key, &event.kind, &event.payload)
    }

    /// An event at or below the head must be the one held at that seq (in this batch or
    /// stored): then it is a duplicate, skipped and counted; otherwise
    /// `idempotency_conflict`, or `sequence_conflict` below the retention floor.
    #[allow(clippy::too_many_arguments)]
    fn duplicate(&mut self, ctx: &ReducerContext, stored: &mut StoredEvents, index: usize, seq: u64, key: &str, kind: &str, payload: &[u8]) -> ReducerResult {
        let first_new = self.head + 1 - self.packed.len() as u64;
        let held = if seq >= first_new {
            Some(&self.packed[(seq - first_new) as usize])
        } else {
            stored.at(ctx, self.stream_id, seq)?
        };
        match held {
            None => Err(self.sequence_conflict(index, seq)),
            Some(e) if e.idempotency_key == key && e.kind == kind && e.payload == payload => {
                self.duplicates += 1;
                Ok(())
            }
            Some(_) => Err(fail(ErrorCode::IdempotencyConflict, format!("event={index}: seq={seq} of stream {} holds another event (key {key})", self.stream_id))),
        }
    }

    fn by_key(&mut self, ctx: &ReducerContext, index: usize, event: PublishEvent) -> ReducerResult {
        let phash = payload_hash(&event.payload);
        let khash = key_hash(self.stream_id, &event.idempotency_key);
        if let Some(seen) = ctx.db.event_key().key_hash().find(khash) {
            if seen.payload_hash == truncate(&phash) {
                self.duplicates += 1;
                return Ok(());
            }
            return Err(fail(
                ErrorCode::IdempotencyConflict,
                format!("event={index}: key {} was published at seq={} with another payload", event.idempotency_key, seen.seq),
            ));
        }
        ctx.db.event_key().insert(EventKey { key_hash: khash, seq: self.head + 1, payload_hash: truncate(&phash) });
        self.append(event, &phash);
        Ok(())
    }
}

/// Stored events of one stream, read a segment at a time for the duplicate path.
struct StoredEvents {
    oldest_seq: u64,
    segment: Vec<SegmentEvent>,
}

impl StoredEvents {
    fn new(row: &crate::streams::Stream) -> StoredEvents {
        StoredEvents { oldest_seq: row.oldest_seq, segment: Vec::new() }
    }

    /// The stored event at `seq`, or `None` below the retention floor.
    fn at(&mut self, ctx: &ReducerContext, stream_id: &str, seq: u64) -> Result<Option<&SegmentEvent>, String> {
        if seq < self.oldest_seq {
            return Ok(None);
        }
        let cached = self.segment.first().is_some_and(|f| f.seq <= seq) && self.segment.last().is_some_and(|l| l.seq >= seq);
        if !cached {
            let Some(holder) = crate::streams::segment_holding(ctx, stream_id, seq) else {
                return Ok(None);
            };
            self.segment = segment::decode(&holder.data).map_err(|e| fail(ErrorCode::Internal, format!("segment {} of {stream_id}: {e}", holder.id)))?;
        }
        let first = self.segment.first().map_or(0, |f| f.seq);
        Ok(self.segment.get((seq - first) as usize))
    }
}

//! Client acks: how far each grantee has durably applied each stream.

use crate::access;
use crate::streams::{stream, validate_stream_id, Stream};
use crate::{fail, ReducerResult};
use khala_proto::hash::{from_slice, Hash32, GENESIS};
use khala_proto::{segment, CodedError, ErrorCode};
use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, Table, Timestamp};

/// One grantee's acknowledged position on one stream. Only moves forward.
#[table(name = client_ack, public)]
pub struct ClientAck {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub grantee: Identity,
    #[index(btree)]
    pub stream_id: String,
    pub acked_seq: u64,
    /// Chain hash at `acked_seq`, as checked against the stream.
    pub acked_hash: Vec<u8>,
    pub epoch: u32,
    pub updated_at: Timestamp,
}

/// A client sees only its own acks.
#[client_visibility_filter]
const ACK_VISIBILITY: Filter = Filter::Sql("SELECT * FROM client_ack WHERE grantee = :sender");

/// The chain hash at `seq`, from the stream head or the segment that holds `seq`.
/// `stale_cursor` when retention has already removed it.
pub fn chain_at(ctx: &ReducerContext, stream: &Stream, seq: u64) -> Result<Hash32, CodedError> {
    if seq == stream.head_seq {
        return Ok(from_slice(&stream.head_hash).unwrap_or(GENESIS));
    }
    if seq == 0 {
        return Ok(GENESIS);
    }
    let stale = || {
        CodedError::new(
            ErrorCode::StaleCursor,
            format!("stream {} seq={seq} is below the retention floor oldest_available={}", stream.stream_id, stream.oldest_seq.saturating_sub(1)),
        )
    };
    // The chain at `seq` is the prev hash of the segment starting at `seq + 1`, or lies
    // inside the segment holding `seq`.
    if let Some(next) = crate::streams::segment_holding(ctx, &stream.stream_id, seq + 1).filter(|s| s.first_seq == seq + 1) {
        return Ok(from_slice(&next.prev_hash).unwrap_or(GENESIS));
    }
    let holder = crate::streams::segment_holding(ctx, &stream.stream_id, seq).ok_or_else(stale)?;
    let prev = from_slice(&holder.prev_hash).unwrap_or(GENESIS);
    let events = segment::decode(&holder.data).map_err(|e| CodedError::new(ErrorCode::Internal, format!("segment {}: {e}", holder.id)))?;
    let upto = (seq - holder.first_seq + 1) as usize;
    Ok(segment::chain_through(&prev, &stream.stream_id, &events[..upto.min(events.len())]))
}

/// Records that the caller has durably applied `stream_id` up to `seq`, whose chain hash
/// is `chain_hash`. Needs a live grant with the `ack` scope. An ack at or below the
/// current one is a no-op (acks never move back).
///
/// A grantee with `ack` but not `subscribe` may not read the stream, so it learns only
/// whether its `(seq, chain_hash)` is a position of the stream: beyond the head, below the
/// floor, an unknown stream and a wrong hash all read `chain_mismatch`, never the head.
#[reducer]
pub fn ack(ctx: &ReducerContext, stream_id: String, seq: u64, chain_hash: Vec<u8>) -> ReducerResult {
    validate_stream_id(&stream_id)?;
    let may_read = match access::live_grant(ctx, ctx.sender, &stream_id) {
        Some(g) if g.ack => g.subscribe,
        _ => return Err(fail(ErrorCode::ForbiddenStream, format!("no live ack grant on stream {stream_id}"))),
    };
    match record_ack(ctx, stream_id.clone(), seq, chain_hash) {
        Ok(()) => Ok(()),
        Err(e) if may_read || e.code == ErrorCode::Internal => Err(e.to_string()),
        Err(_) => Err(fail(ErrorCode::ChainMismatch, format!("stream {stream_id} seq={seq}: not a position of this stream"))),
    }
}

fn record_ack(ctx: &ReducerContext, stream_id: String, seq: u64, chain_hash: Vec<u8>) -> Result<(), CodedError> {
    let Some(stream) = ctx.db.stream().stream_id().find(&stream_id) else {
        return Err(CodedError::new(ErrorCode::UnknownStream, format!("no stream {stream_id:?}")));
    };
    if seq > stream.head_seq {
        return Err(CodedError::new(ErrorCode::AckBeyondHead, format!("stream {stream_id} seq={seq} head={}", stream.head_seq)));
    }
    let existing = ctx.db.client_ack().grantee().filter(ctx.sender).find(|a| a.stream_id == stream_id);
    if existing.as_ref().is_some_and(|a| a.acked_seq >= seq && a.epoch == stream.epoch) {
        return Ok(());
    }
    let expected = chain_at(ctx, &stream, seq)?;
    if expected.as_slice() != chain_hash.as_slice() {
        return Err(CodedError::new(ErrorCode::ChainMismatch, format!("stream {stream_id} seq={seq}: the chain hash differs from the stream's")));
    }
    let row = ClientAck {
        id: existing.as_ref().map_or(0, |a| a.id),
        grantee: ctx.sender,
        stream_id,
        acked_seq: seq,
        acked_hash: chain_hash,
        epoch: stream.epoch,
        updated_at: ctx.timestamp,
    };
    if existing.is_some() {
        ctx.db.client_ack().id().update(row);
    } else {
        ctx.db.client_ack().insert(row);
    }
    Ok(())
}

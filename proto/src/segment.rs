//! The encoding of a segment row's `data` column (docs/SEGMENTS.md).
//!
//! `data = [SEGMENT_FORMAT_V1] ‖ protobuf(SegmentBody)`. The version byte lets a future
//! format coexist with stored segments: a reader refuses versions it does not know
//! instead of misreading them.

use crate::hash::{chain_hash, payload_hash, Hash32};
use crate::v1::{SegmentBody, SegmentEvent};
use prost::Message;

/// Version byte of the current segment format.
pub const SEGMENT_FORMAT_V1: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment data is empty")]
    Empty,
    #[error("unknown segment format version {0}")]
    UnknownVersion(u8),
    #[error("segment body does not decode: {0}")]
    Malformed(String),
    #[error("segment events are not contiguous: seq {found} follows {previous}")]
    NotContiguous { previous: u64, found: u64 },
}

/// Encodes events (already in ascending, contiguous seq order) into segment data.
pub fn encode(events: Vec<SegmentEvent>) -> Vec<u8> {
    let body = SegmentBody { events };
    let mut data = Vec::with_capacity(1 + body.encoded_len());
    data.push(SEGMENT_FORMAT_V1);
    body.encode(&mut data).expect("a Vec grows as needed");
    data
}

/// Decodes segment data and checks that its seqs are contiguous.
pub fn decode(data: &[u8]) -> Result<Vec<SegmentEvent>, SegmentError> {
    let (&version, body) = data.split_first().ok_or(SegmentError::Empty)?;
    if version != SEGMENT_FORMAT_V1 {
        return Err(SegmentError::UnknownVersion(version));
    }
    let body = SegmentBody::decode(body).map_err(|e| SegmentError::Malformed(e.to_string()))?;
    for pair in body.events.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(SegmentError::NotContiguous { previous: pair[0].seq, found: pair[1].seq });
        }
    }
    Ok(body.events)
}

/// The idempotency keys of segment data, in seq order, without copying payloads: what
/// the module needs to delete a segment's `event_key` rows (retention, `reset_stream`).
/// Checks the version byte and seq contiguity like [`decode`].
pub fn idempotency_keys(data: &[u8]) -> Result<Vec<String>, SegmentError> {
    let (&version, body) = data.split_first().ok_or(SegmentError::Empty)?;
    if version != SEGMENT_FORMAT_V1 {
        return Err(SegmentError::UnknownVersion(version));
    }
    let body = KeysBody::decode(body).map_err(|e| SegmentError::Malformed(e.to_string()))?;
    for pair in body.events.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(SegmentError::NotContiguous { previous: pair[0].seq, found: pair[1].seq });
        }
    }
    Ok(body.events.into_iter().map(|e| e.idempotency_key).collect())
}

/// `SegmentBody` seen through only the fields [`idempotency_keys`] needs; prost skips the
/// other fields (the payloads among them) without allocating them.
#[derive(Clone, PartialEq, prost::Message)]
struct KeysBody {
    #[prost(message, repeated, tag = "1")]
    events: Vec<KeysEvent>,
}

/// `SegmentEvent`'s `seq` (tag 1) and `idempotency_key` (tag 4).
#[derive(Clone, PartialEq, prost::Message)]
struct KeysEvent {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(string, tag = "4")]
    idempotency_key: String,
}

/// The chain hash of `event` given its predecessor's chain hash.
pub fn event_chain(prev: &Hash32, stream_id: &str, event: &SegmentEvent) -> Hash32 {
    chain_hash(prev, stream_id, event.seq, &event.kind, &payload_hash(&event.payload))
}

/// The chain hash after the last of `events`, starting from `prev`.
pub fn chain_through(prev: &Hash32, stream_id: &str, events: &[SegmentEvent]) -> Hash32 {
    events.iter().fold(*prev, |acc, e| event_chain(&acc, stream_id, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(seq: u64, payload: Vec<u8>) -> SegmentEvent {
        SegmentEvent { seq, kind: "k".into(), payload, idempotency_key: format!("key:{seq}"), occurred_at_micros: 0 }
    }

    proptest! {
        #[test]
        fn round_trips(first in 1u64..1_000_000, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20)) {
            let events: Vec<_> = payloads.into_iter().enumerate().map(|(i, p)| event(first + i as u64, p)).collect();
            prop_assert_eq!(decode(&encode(events.clone())).unwrap(), events);
        }

        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
            let _ = idempotency_keys(&data);
        }

        #[test]
        fn keys_are_the_decoded_keys(first in 1u64..1_000_000, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20)) {
            let events: Vec<_> = payloads.into_iter().enumerate().map(|(i, p)| event(first + i as u64, p)).collect();
            let keys: Vec<String> = events.iter().map(|e| e.idempotency_key.clone()).collect();
            prop_assert_eq!(idempotency_keys(&encode(events)).unwrap(), keys);
        }
    }

    #[test]
    fn refuses_unknown_versions_and_gaps() {
        assert_eq!(decode(&[]), Err(SegmentError::Empty));
        assert_eq!(decode(&[9, 0]), Err(SegmentError::UnknownVersion(9)));
        let gap = encode(vec![event(1, vec![]), event(3, vec![])]);
        assert_eq!(decode(&gap), Err(SegmentError::NotContiguous { previous: 1, found: 3 }));
        assert_eq!(idempotency_keys(&[]), Err(SegmentError::Empty));
        assert_eq!(idempotency_keys(&[9, 0]), Err(SegmentError::UnknownVersion(9)));
        assert_eq!(idempotency_keys(&gap), Err(SegmentError::NotContiguous { previous: 1, found: 3 }));
    }
}

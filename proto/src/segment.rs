//! The encoding of a segment row's `data` column (docs/SEGMENTS.md).
//!
//! `data = [SEGMENT_FORMAT_V1] ‖ protobuf(SegmentBody)`. The version byte lets a future
//! format coexist with stored segments: a reader refuses versions it does not know
//! instead of misreading them.

use crate::hash::{chain_hash, payload_hash, Hash32};
use crate::v1::{SegmentBody, SegmentEvent};
use prost::encoding::WireType;
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
    #[error("segment data is not in canonical form (a field out of order, repeated, unknown or at its default value, or a padded varint)")]
    NotCanonical,
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
    let body = SegmentBody::decode(body(data)?).map_err(|e| SegmentError::Malformed(e.to_string()))?;
    contiguous(body.events.iter().map(|e| e.seq))?;
    Ok(body.events)
}

/// The protobuf body of segment data, after its version byte is checked.
fn body(data: &[u8]) -> Result<&[u8], SegmentError> {
    match data.split_first() {
        None => Err(SegmentError::Empty),
        Some((&SEGMENT_FORMAT_V1, body)) => Ok(body),
        Some((&version, _)) => Err(SegmentError::UnknownVersion(version)),
    }
}

/// Checks that `seqs` follow one another.
fn contiguous(mut seqs: impl Iterator<Item = u64>) -> Result<(), SegmentError> {
    let Some(mut previous) = seqs.next() else { return Ok(()) };
    for found in seqs {
        if found != previous + 1 {
            return Err(SegmentError::NotContiguous { previous, found });
        }
        previous = found;
    }
    Ok(())
}

/// Decodes segment data for a reader, as [`decode`] does, but without a copy per event:
/// each payload is a slice of `data`, and the idempotency keys (the module's business)
/// are skipped. The client's replay decodes every segment this way.
pub fn decode_view(data: bytes::Bytes) -> Result<Vec<EventView>, SegmentError> {
    body(&data)?;
    let body = ViewBody::decode(data.slice(1..)).map_err(|e| SegmentError::Malformed(e.to_string()))?;
    contiguous(body.events.iter().map(|e| e.seq))?;
    Ok(body.events)
}

/// `SegmentBody` seen through [`EventView`].
#[derive(Clone, PartialEq, prost::Message)]
struct ViewBody {
    #[prost(message, repeated, tag = "1")]
    events: Vec<EventView>,
}

/// A `SegmentEvent` as a reader sees it: every field but `idempotency_key` (tag 4), with
/// the payload a slice of the segment's buffer. The tags are `SegmentEvent`'s; the tests
/// decode the same bytes both ways.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EventView {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(bytes = "bytes", tag = "3")]
    pub payload: bytes::Bytes,
    #[prost(int64, tag = "5")]
    pub occurred_at_micros: i64,
}

impl EventView {
    /// The chain hash of this event given its predecessor's, as [`event_chain`] computes it.
    pub fn chain(&self, prev: &Hash32, stream_id: &str) -> Hash32 {
        chain_hash(prev, stream_id, self.seq, &self.kind, &payload_hash(&self.payload))
    }
}

impl From<SegmentEvent> for EventView {
    fn from(e: SegmentEvent) -> Self {
        EventView { seq: e.seq, kind: e.kind, payload: e.payload.into(), occurred_at_micros: e.occurred_at_micros }
    }
}

/// A `SegmentEvent` borrowed from segment data: what the module checks of a publisher's
/// segment (`publish_segment`) without a copy or an allocation per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub seq: u64,
    pub kind: &'a str,
    pub payload: &'a [u8],
    pub idempotency_key: &'a str,
    pub occurred_at_micros: i64,
}

impl From<EventRef<'_>> for SegmentEvent {
    fn from(e: EventRef<'_>) -> Self {
        SegmentEvent { seq: e.seq, kind: e.kind.into(), payload: e.payload.into(), idempotency_key: e.idempotency_key.into(), occurred_at_micros: e.occurred_at_micros }
    }
}

impl EventRef<'_> {
    /// The length of this event's protobuf message, fields at their default left out.
    fn body_len(&self) -> usize {
        use prost::encoding::{encoded_len_varint as varint_len, key_len};
        let bytes = |tag: u32, len: usize| if len == 0 { 0 } else { key_len(tag) + varint_len(len as u64) + len };
        let scalar = |tag: u32, value: u64| if value == 0 { 0 } else { key_len(tag) + varint_len(value) };
        scalar(1, self.seq) + bytes(2, self.kind.len()) + bytes(3, self.payload.len()) + bytes(4, self.idempotency_key.len()) + scalar(5, self.occurred_at_micros as u64)
    }

    /// Writes this event's fields as prost writes a `SegmentEvent`'s: in tag order, each
    /// left out at its default value.
    fn encode_fields(&self, buf: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint};
        let bytes = |tag: u32, value: &[u8], buf: &mut Vec<u8>| {
            if !value.is_empty() {
                encode_key(tag, WireType::LengthDelimited, buf);
                encode_varint(value.len() as u64, buf);
                buf.extend_from_slice(value);
            }
        };
        let scalar = |tag: u32, value: u64, buf: &mut Vec<u8>| {
            if value != 0 {
                encode_key(tag, WireType::Varint, buf);
                encode_varint(value, buf);
            }
        };
        scalar(1, self.seq, buf);
        bytes(2, self.kind.as_bytes(), buf);
        bytes(3, self.payload, buf);
        bytes(4, self.idempotency_key.as_bytes(), buf);
        scalar(5, self.occurred_at_micros as u64, buf);
    }
}

/// Encodes borrowed events into exactly the bytes [`encode`] makes of the same events
/// owned, without copying each into a `SegmentEvent` first: the mirror's batches.
pub fn encode_refs(events: &[EventRef<'_>]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len};
    let total: usize = events.iter().map(|e| key_len(1) + encoded_len_varint(e.body_len() as u64) + e.body_len()).sum();
    let mut data = Vec::with_capacity(1 + total);
    data.push(SEGMENT_FORMAT_V1);
    for event in events {
        encode_key(1, WireType::LengthDelimited, &mut data);
        encode_varint(event.body_len() as u64, &mut data);
        event.encode_fields(&mut data);
    }
    data
}

/// Decodes a publisher's segment data for the module, borrowing every field from `data`
/// (prost's wire-format primitives over the bytes; prost's generated decoding allocates a
/// `String` per field and cost the module about 1 µs per event). Besides the version
/// byte, the wire format and contiguous seqs, the data must be in canonical form, exactly
/// as [`encode`] writes those events: fields in tag order, each at most once, none at its
/// default value, no unknown field, minimal varints. So nothing rides along in the bytes
/// the module stores, and every reader decodes them to exactly the events it checked.
pub fn decode_borrowed(data: &[u8]) -> Result<Vec<EventRef<'_>>, SegmentError> {
    let mut body = body(data)?;
    let mut events = Vec::new();
    while !body.is_empty() {
        if field(&mut body)? != (1, WireType::LengthDelimited) {
            return Err(SegmentError::NotCanonical);
        }
        events.push(event(length_delimited(&mut body)?)?);
    }
    contiguous(events.iter().map(|e| e.seq))?;
    Ok(events)
}

/// One event's fields, strictly in canonical form (see [`decode_borrowed`]).
fn event(mut buf: &[u8]) -> Result<EventRef<'_>, SegmentError> {
    let mut e = EventRef { seq: 0, kind: "", payload: &[], idempotency_key: "", occurred_at_micros: 0 };
    let mut last_tag = 0;
    while !buf.is_empty() {
        let (tag, wire) = field(&mut buf)?;
        if tag <= last_tag {
            return Err(SegmentError::NotCanonical);
        }
        last_tag = tag;
        match (tag, wire) {
            (1, WireType::Varint) => e.seq = varint(&mut buf)?,
            (2, WireType::LengthDelimited) => e.kind = text(length_delimited(&mut buf)?)?,
            (3, WireType::LengthDelimited) => e.payload = length_delimited(&mut buf)?,
            (4, WireType::LengthDelimited) => e.idempotency_key = text(length_delimited(&mut buf)?)?,
            (5, WireType::Varint) => e.occurred_at_micros = varint(&mut buf)? as i64,
            _ => return Err(SegmentError::NotCanonical),
        }
        // A field at its default value is one the encoder would have left out.
        if (tag == 1 && e.seq == 0) || (tag == 2 && e.kind.is_empty()) || (tag == 3 && e.payload.is_empty()) || (tag == 4 && e.idempotency_key.is_empty()) || (tag == 5 && e.occurred_at_micros == 0) {
            return Err(SegmentError::NotCanonical);
        }
    }
    Ok(e)
}

fn malformed(e: impl std::fmt::Display) -> SegmentError {
    SegmentError::Malformed(e.to_string())
}

/// A field key: its tag and wire type.
fn field(buf: &mut &[u8]) -> Result<(u32, WireType), SegmentError> {
    let key = varint(buf)?;
    let wire = WireType::try_from(key & 7).map_err(malformed)?;
    Ok(((key >> 3) as u32, wire))
}

/// A varint, refused unless minimally encoded.
fn varint(buf: &mut &[u8]) -> Result<u64, SegmentError> {
    let before = buf.len();
    let value = prost::encoding::decode_varint(buf).map_err(malformed)?;
    if before - buf.len() != prost::encoding::encoded_len_varint(value) {
        return Err(SegmentError::NotCanonical);
    }
    Ok(value)
}

/// A length-delimited field's bytes, borrowed.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], SegmentError> {
    let len = varint(buf)?;
    if len > buf.len() as u64 {
        return Err(malformed(format!("a field of {len} bytes with {} left", buf.len())));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

fn text(bytes: &[u8]) -> Result<&str, SegmentError> {
    std::str::from_utf8(bytes).map_err(malformed)
}

/// The idempotency keys of segment data, in seq order, without copying payloads: what
/// the module needs to delete a segment's `event_key` rows (retention, `reset_stream`).
/// Checks the version byte and seq contiguity like [`decode`].
pub fn idempotency_keys(data: &[u8]) -> Result<Vec<String>, SegmentError> {
    let body = KeysBody::decode(body(data)?).map_err(|e| SegmentError::Malformed(e.to_string()))?;
    contiguous(body.events.iter().map(|e| e.seq))?;
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
        fn the_view_reads_what_decode_reads(first in 1u64..1_000_000, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20)) {
            let events: Vec<_> = payloads.into_iter().enumerate().map(|(i, p)| SegmentEvent { occurred_at_micros: i as i64 - 3, ..event(first + i as u64, p) }).collect();
            let data = bytes::Bytes::from(encode(events.clone()));
            let view = decode_view(data.clone()).unwrap();
            prop_assert_eq!(&view, &events.iter().cloned().map(EventView::from).collect::<Vec<_>>());
            let mut prev = [7u8; 32];
            for (v, e) in view.iter().zip(&events) {
                prop_assert_eq!(v.chain(&prev, "s"), event_chain(&prev, "s", e));
                prev = v.chain(&prev, "s");
                // Each payload is a slice of the segment's buffer, not a copy.
                let range = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
                prop_assert!(v.payload.is_empty() || range.contains(&(v.payload.as_ptr() as usize)));
            }
        }

        #[test]
        fn borrowed_reads_what_decode_reads(first in 1u64..1_000_000, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20), occurred in any::<i64>()) {
            let events: Vec<_> = payloads.into_iter().enumerate().map(|(i, p)| SegmentEvent { occurred_at_micros: occurred.wrapping_add(i as i64 - 3), ..event(first + i as u64, p) }).collect();
            let data = encode(events.clone());
            let borrowed = decode_borrowed(&data).unwrap();
            prop_assert_eq!(borrowed.into_iter().map(SegmentEvent::from).collect::<Vec<_>>(), events);
        }

        #[test]
        fn encode_refs_writes_what_encode_writes(first in 0u64..1_000_000, fields in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..200), "[a-z.]{0,3}", "[a-z:0-9]{0,3}", any::<i64>(), 0u8..3), 0..12)) {
            let events: Vec<SegmentEvent> = fields
                .into_iter()
                .enumerate()
                .map(|(i, (payload, kind, key, occurred, zero))| SegmentEvent {
                    seq: first + i as u64,
                    kind,
                    payload,
                    idempotency_key: key,
                    occurred_at_micros: if zero == 0 { 0 } else { occurred },
                })
                .collect();
            let refs: Vec<EventRef> = events
                .iter()
                .map(|e| EventRef { seq: e.seq, kind: &e.kind, payload: &e.payload, idempotency_key: &e.idempotency_key, occurred_at_micros: e.occurred_at_micros })
                .collect();
            let data = encode_refs(&refs);
            prop_assert_eq!(data.len(), data.capacity(), "the length was computed exactly");
            prop_assert_eq!(data, encode(events));
        }

        /// Anything appended to a canonical segment is refused, never stored along.
        #[test]
        fn borrowed_refuses_anything_riding_along(first in 1u64..1_000_000, n in 1usize..5, tail in proptest::collection::vec(any::<u8>(), 1..16)) {
            let events: Vec<_> = (0..n).map(|i| event(first + i as u64, vec![i as u8; 3])).collect();
            let mut data = encode(events);
            // An unknown field (tag 9, length-delimited) of the body.
            data.push(0x4a);
            data.push(tail.len() as u8);
            data.extend_from_slice(&tail);
            prop_assert!(decode(&data).is_ok(), "prost itself skips the unknown field");
            let refused = matches!(decode_borrowed(&data), Err(SegmentError::NotCanonical));
            prop_assert!(refused, "the unknown field was not refused");
        }

        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_borrowed(&data);
            let _ = decode(&data);
            let _ = idempotency_keys(&data);
            let _ = decode_view(data.into());
        }

        #[test]
        fn keys_are_the_decoded_keys(first in 1u64..1_000_000, payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20)) {
            let events: Vec<_> = payloads.into_iter().enumerate().map(|(i, p)| event(first + i as u64, p)).collect();
            let keys: Vec<String> = events.iter().map(|e| e.idempotency_key.clone()).collect();
            prop_assert_eq!(idempotency_keys(&encode(events)).unwrap(), keys);
        }
    }

    /// What prost's decoding takes and the canonical form does not: each is refused.
    #[test]
    fn borrowed_refuses_every_non_canonical_form() {
        let one = |fields: &[u8]| {
            let mut data = vec![SEGMENT_FORMAT_V1, 0x0a, fields.len() as u8];
            data.extend_from_slice(fields);
            data
        };
        let canonical = one(&[0x08, 0x05, 0x12, 0x01, b'k', 0x22, 0x01, b'x']);
        assert_eq!(decode_borrowed(&canonical).unwrap(), vec![EventRef { seq: 5, kind: "k", payload: &[], idempotency_key: "x", occurred_at_micros: 0 }]);
        for bad in [
            one(&[0x12, 0x01, b'k', 0x08, 0x05, 0x22, 0x01, b'x']),             // out of order
            one(&[0x08, 0x05, 0x08, 0x05, 0x12, 0x01, b'k', 0x22, 0x01, b'x']), // repeated
            one(&[0x08, 0x85, 0x00, 0x12, 0x01, b'k', 0x22, 0x01, b'x']),       // padded varint
            one(&[0x08, 0x05, 0x12, 0x01, b'k', 0x1a, 0x00, 0x22, 0x01, b'x']), // empty payload written
            one(&[0x08, 0x05, 0x12, 0x01, b'k', 0x22, 0x01, b'x', 0x28, 0x00]), // occurred_at 0 written
            one(&[0x08, 0x05, 0x12, 0x01, b'k', 0x22, 0x01, b'x', 0x30, 0x01]), // unknown tag 6
        ] {
            assert!(decode(&bad).is_ok(), "prost takes {bad:?}");
            assert!(matches!(decode_borrowed(&bad), Err(SegmentError::NotCanonical)), "{bad:?}");
        }
        assert!(matches!(decode_borrowed(&one(&[0x08, 0x05, 0x12, 0x01, 0xff])), Err(SegmentError::Malformed(_))), "a kind that is not UTF-8");
        assert!(matches!(decode_borrowed(&one(&[0x08, 0x05, 0x12, 0x09, b'k'])), Err(SegmentError::Malformed(_))), "a field longer than the data");
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
        assert_eq!(decode_view(bytes::Bytes::new()), Err(SegmentError::Empty));
        assert_eq!(decode_view(vec![9, 0].into()), Err(SegmentError::UnknownVersion(9)));
        assert_eq!(decode_view(gap.into()), Err(SegmentError::NotContiguous { previous: 1, found: 3 }));
    }
}

//! Canonical hashing rules (docs/HASHING.md), with fixed test vectors in
//! `proto/vectors/hashing.json` that were computed by an independent implementation
//! (`proto/vectors/hashing.py`, a plain-Python BLAKE3).
//!
//! Every hash is BLAKE3 (32 bytes). SHA-256 cost about 1 µs per 64-byte block inside the
//! module's wasm, most of the `publish` reducer's time; BLAKE3 does the same work in
//! about half (docs/BENCHMARKS.md).
//!
//! - payload hash: `BLAKE3(payload)`
//! - chain hash at seq n: `BLAKE3(chain[n-1] ‖ u32be(len(stream_id)) ‖ stream_id ‖ u64be(n)
//!   ‖ u32be(len(kind)) ‖ kind ‖ payload_hash)`, with `chain[0]` = 32 zero bytes ([`GENESIS`])
//! - idempotency key hash: the first 16 bytes, big-endian, of
//!   `BLAKE3(u32be(len(stream_id)) ‖ stream_id ‖ key)`: per stream by construction.
//!
//! Lengths are prefixed so that no two different inputs hash the same bytes.

/// A BLAKE3 digest.
pub type Hash32 = [u8; 32];

/// The chain hash "before the first event" of every stream.
pub const GENESIS: Hash32 = [0u8; 32];

/// `BLAKE3(payload)`.
pub fn payload_hash(payload: &[u8]) -> Hash32 {
    blake3::hash(payload).into()
}

/// The chain hash of the event `seq` whose predecessor's chain hash is `prev`.
///
/// The input is laid out in one buffer and hashed in one call: in the module's wasm that
/// is about twice as fast as feeding a `Hasher` field by field (the same bytes either way).
pub fn chain_hash(prev: &Hash32, stream_id: &str, seq: u64, kind: &str, payload_hash: &Hash32) -> Hash32 {
    let len = 32 + 4 + stream_id.len() + 8 + 4 + kind.len() + 32;
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    for part in [prev.as_slice(), &(stream_id.len() as u32).to_be_bytes(), stream_id.as_bytes(), &seq.to_be_bytes(), &(kind.len() as u32).to_be_bytes(), kind.as_bytes(), payload_hash] {
        buf[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    blake3::hash(buf).into()
}

/// The per-stream idempotency key hash stored in the module's fixed-size dedupe index.
pub fn key_hash(stream_id: &str, key: &str) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&(stream_id.len() as u32).to_be_bytes());
    h.update(stream_id.as_bytes());
    h.update(key.as_bytes());
    truncate(h.finalize().as_bytes())
}

/// Events per replay window bucket. A segment belongs to bucket `first_seq / WINDOW_EVENTS`;
/// no batch may hold more events than this, so the segment holding seq `n` is always in
/// bucket `n / WINDOW_EVENTS` or the one before.
pub const WINDOW_EVENTS: u64 = 8_192;

/// The window bucket of a seq.
pub fn bucket(seq: u64) -> u64 {
    seq / WINDOW_EVENTS
}

/// The key that ties a segment to the windows clients open on it: the first 16 bytes of
/// `BLAKE3("khala.window" ‖ u32be(len(stream_id)) ‖ stream_id ‖ u64be(bucket))`.
pub fn window_key(stream_id: &str, bucket: u64) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(b"khala.window");
    h.update(&(stream_id.len() as u32).to_be_bytes());
    h.update(stream_id.as_bytes());
    h.update(&bucket.to_be_bytes());
    truncate(h.finalize().as_bytes())
}

/// The first 16 bytes of a digest as a big-endian `u128` (fixed-size index columns).
pub fn truncate(hash: &Hash32) -> u128 {
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_be_bytes(first)
}

/// `blake3:<hex>`, the display form used in logs, JSON output and docs.
pub fn display(hash: &[u8]) -> String {
    format!("blake3:{}", hex::encode(hash))
}

/// Reads a 32-byte hash from a slice, e.g. a `Vec<u8>` column.
pub fn from_slice(bytes: &[u8]) -> Option<Hash32> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        serde_json::from_str(include_str!("../vectors/hashing.json")).unwrap()
    }

    #[test]
    fn payload_vectors() {
        for v in vectors()["payload"].as_array().unwrap() {
            let payload = v["payload_utf8"].as_str().unwrap();
            assert_eq!(hex::encode(payload_hash(payload.as_bytes())), v["payload_hash"].as_str().unwrap());
        }
    }

    #[test]
    fn chain_vectors() {
        let v = &vectors()["chain"];
        let stream_id = v["stream_id"].as_str().unwrap();
        let mut prev = GENESIS;
        for e in v["events"].as_array().unwrap() {
            let payload = e["payload_utf8"].as_str().unwrap().as_bytes();
            let next = chain_hash(&prev, stream_id, e["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap(), &payload_hash(payload));
            assert_eq!(hex::encode(next), e["chain_hash"].as_str().unwrap());
            prev = next;
        }
    }

    #[test]
    fn key_hash_vectors() {
        for v in vectors()["key"].as_array().unwrap() {
            let got = key_hash(v["stream_id"].as_str().unwrap(), v["key"].as_str().unwrap());
            assert_eq!(format!("{got:032x}"), v["key_hash"].as_str().unwrap());
        }
    }

    #[test]
    fn window_key_vectors() {
        for v in vectors()["window"].as_array().unwrap() {
            let got = window_key(v["stream_id"].as_str().unwrap(), v["bucket"].as_u64().unwrap());
            assert_eq!(format!("{got:032x}"), v["window_key"].as_str().unwrap());
        }
        assert_eq!((bucket(0), bucket(WINDOW_EVENTS - 1), bucket(WINDOW_EVENTS)), (0, 0, 1));
    }

    #[test]
    fn length_prefixes_separate_stream_and_key() {
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        let p = payload_hash(b"x");
        assert_ne!(chain_hash(&GENESIS, "ab", 1, "c", &p), chain_hash(&GENESIS, "a", 1, "bc", &p));
    }
}

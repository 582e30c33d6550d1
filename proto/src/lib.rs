//! Khala's wire contracts, shared by the module (wasm32), the client and the tools.
//!
//! This crate is the only owner of the wire encoding: the prost types generated from
//! `proto/khala/sync/v1/sync.proto`, the `code: message` error convention, the canonical
//! hashing rules (payload hash, chain hash, idempotency key hash) and the segment codec.
//! It does no I/O, so the module can use it inside a reducer.
//!
//! # Layout
//! - [`error`]: `ErrorCode` names and the `code: message` reducer error format.
//! - [`limits`]: stream id, key, kind and payload limits of the contract.
//! - [`hash`]: SHA-256 payload and chain hashes, checked against fixed test vectors.
//! - [`segment`]: the versioned encoding of a segment row's `data` column.
//! - [`json`] (feature `json`): canonical JSON for payloads.
//!
//! ```
//! use khala_proto::hash::{chain_hash, payload_hash, GENESIS};
//! let first = chain_hash(&GENESIS, "runtime.run.1.events", 1, "run.started", &payload_hash(b"{}"));
//! assert_eq!(first.len(), 32);
//! ```

pub mod error;
pub mod hash;
pub mod limits;
#[cfg(feature = "json")]
pub mod json;
pub mod segment;

/// Generated prost types of package `khala.sync.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/khala.sync.v1.rs"));
}

pub use error::{CodedError, ErrorCode};
pub use v1::{AuthorityEvent, Checkpoint, SegmentBody, SegmentEvent, StaleCursor, StreamCursor};

/// The protocol version this build of Khala speaks (`hello(protocol_version, ..)`).
pub const PROTOCOL_VERSION: u32 = 1;

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
    include!(concat!(env!("OUT_DIR"), "/snake_names.rs"));
}

/// The snake_case name of a proto enum value, as JSON, metrics labels and reducer errors
/// show it: the value's proto name without the enum's prefix, lowercased
/// (`REBOOTSTRAP_REASON_STALE_CURSOR` → `stale_cursor`). build.rs implements it for every
/// enum of the contract from the descriptors, so no crate keeps its own table.
pub trait SnakeName: Sized {
    fn snake_name(self) -> &'static str;
    /// The value named `name` (`unspecified` included).
    fn from_snake_name(name: &str) -> Option<Self>;
}

pub use error::{CodedError, ErrorCode};
pub use v1::{AuthorityEvent, Checkpoint, SegmentBody, SegmentEvent, StaleCursor, StreamCursor};

/// The protocol version this build of Khala speaks (`hello(protocol_version, ..)`).
pub const PROTOCOL_VERSION: u32 = 1;

#[cfg(test)]
mod snake_name_tests {
    use super::v1::{ConnectionState, RebootstrapReason};
    use super::{ErrorCode, SnakeName};

    /// Every value of `E` (numbers 0..64) against prost's own proto name, both ways.
    fn check<E: SnakeName + Copy + PartialEq + std::fmt::Debug + TryFrom<i32>>(prefix: &str, proto_name: fn(E) -> &'static str) -> usize {
        let values: Vec<E> = (0..64).filter_map(|n| E::try_from(n).ok()).collect();
        for v in &values {
            assert_eq!(v.snake_name(), proto_name(*v).strip_prefix(prefix).unwrap().to_ascii_lowercase());
            assert_eq!(E::from_snake_name(v.snake_name()), Some(*v));
        }
        values.len()
    }

    #[test]
    fn every_enum_has_its_proto_names() {
        assert_eq!(check::<ErrorCode>("ERROR_CODE_", |v| v.as_str_name()), 19);
        assert_eq!(check::<RebootstrapReason>("REBOOTSTRAP_REASON_", |v| v.as_str_name()), 5);
        assert_eq!(check::<ConnectionState>("CONNECTION_STATE_", |v| v.as_str_name()), 11);
        assert_eq!(ConnectionState::UpgradeRequired.snake_name(), "upgrade_required");
        assert_eq!(RebootstrapReason::from_snake_name("corrupt_checkpoint"), Some(RebootstrapReason::CorruptCheckpoint));
        assert_eq!(ConnectionState::from_snake_name("nope"), None);
    }
}

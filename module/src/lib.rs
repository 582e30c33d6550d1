//! Khala's SpacetimeDB module: the only writer of the stream log, and the gate for who
//! may publish, read and ack it.
//!
//! # Layout
//! - [`config`]: the singleton settings row, `init`, and the `hello` compatibility check.
//! - [`access`]: roles (`admin`, `publisher`), per-stream grants with leases, and the
//!   row-level security rules that make each client see only what it is granted.
//! - [`streams`]: the `stream` and `stream_segment` tables, stream ids, stream creation.
//! - [`stream_view`]: what subscribers read of a stream, apart from the row each publish
//!   rewrites.
//! - [`publish`]: the batch `publish` reducer: dedupe, `authority_seq`, seqs, hash chain.
//! - [`ack`]: monotonic, chain-checked client acks.
//! - [`retention`]: per-stream retention and the scheduled sweep that raises `oldest_seq`.
//! - [`compaction`]: the scheduled merge of small segments into larger ones.
//! - [`sweep`]: what both sweeps share: per-run budgets, bounded segment walks, the
//!   round-robin cursor and per-stream hints.
//! - [`windows`]: the replay windows clients open; the segment RLS rule joins on them.
//! - [`presence`]: `connection` rows and an admin-visible connected count.
//!
//! Every reducer error is `code: message` with `code` from `khala.sync.v1.ErrorCode`
//! (see [`fail`]); reducers never panic on input, because a panic traps the instance and
//! the caller would only see a generic error.

pub mod access;
pub mod ack;
pub mod compaction;
pub mod config;
#[cfg(feature = "deploy-probe")] mod deploy_probe;
pub mod presence;
pub mod publish;
pub mod retention;
pub mod stream_view;
pub mod streams;
pub mod sweep;
pub mod system_tables;
pub mod windows;

use khala_proto::{CodedError, ErrorCode};

/// The result every reducer returns: `Err` holds `code: message`.
pub type ReducerResult = Result<(), String>;

/// Formats a reducer error as `code: message`.
pub fn fail(code: ErrorCode, message: impl Into<String>) -> String {
    CodedError::new(code, message).to_string()
}

//! The baseline for `khala bench publish`: what the engine does with no Khala logic at all.
//!
//! One reducer stores one pre-packed row per call (a batch of events already encoded by
//! the caller, as Khala's segments are), with no checks, no hashing and no index beyond
//! the stream id. Khala's `publish` does the same insert plus its guarantees, so the ratio
//! of the two rates, measured on one server in one run, is what those guarantees cost.

use spacetimedb::{reducer, table, ReducerContext, Table};

#[table(name = bare_segment, public)]
pub struct BareSegment {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub stream_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub data: Vec<u8>,
}

/// Stores one row, nothing else.
#[reducer]
pub fn insert(ctx: &ReducerContext, stream_id: String, first_seq: u64, last_seq: u64, data: Vec<u8>) {
    ctx.db.bare_segment().insert(BareSegment { id: 0, stream_id, first_seq, last_seq, data });
}

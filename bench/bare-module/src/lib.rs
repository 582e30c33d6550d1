//! The baseline for `khala bench publish`: what the engine does with no Khala logic at all.
//!
//! One reducer stores one pre-packed row per call (a batch of events already encoded by
//! the caller, as Khala's segments are), with no checks, no hashing and no index beyond
//! the stream id. Khala's `publish` does the same insert plus its guarantees, so the ratio
//! of the two rates, measured on one server in one run, is what those guarantees cost.

use spacetimedb::{client_visibility_filter, reducer, table, Filter, Identity, ReducerContext, Table};

/// One pre-packed batch of one stream. Two tables hold these rows: `bare_segment`, which
/// every subscriber sees, and `bare_guarded_segment`, the same rows behind one
/// row-level-security rule (`GUARDED_VISIBILITY`) for `khala bench latency`'s second
/// baseline: a subscriber sees the rows of the streams it has a [`BareReader`] row for.
/// A rule that names `:sender` gives every subscriber a query plan of its own, evaluated
/// and encoded for each of them at every commit, as Khala's rules do; that table measures
/// what this costs the engine with no Khala code around it.
#[table(name = bare_segment, public)]
#[table(name = bare_guarded_segment, public)]
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

/// Who may read which stream of `bare_guarded_segment` (one grant, Khala's `stream_grant`).
/// Public because a rule may only join tables the subscriber can see; each sees its own.
#[table(name = bare_reader, public)]
pub struct BareReader {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub reader: Identity,
    #[index(btree)]
    pub stream_id: String,
}

#[client_visibility_filter]
const READER_VISIBILITY: Filter = Filter::Sql("SELECT * FROM bare_reader WHERE reader = :sender");

#[client_visibility_filter]
const GUARDED_VISIBILITY: Filter = Filter::Sql(
    "SELECT bare_guarded_segment.* FROM bare_reader JOIN bare_guarded_segment ON bare_reader.stream_id = bare_guarded_segment.stream_id \
     WHERE bare_reader.reader = :sender",
);

/// Stores one guarded row, nothing else.
#[reducer]
pub fn insert_guarded(ctx: &ReducerContext, stream_id: String, first_seq: u64, last_seq: u64, data: Vec<u8>) {
    ctx.db.bare_guarded_segment().insert(BareSegment { id: 0, stream_id, first_seq, last_seq, data });
}

/// Lets `reader` see `stream_id` in `bare_guarded_segment`. Unchecked, like everything in
/// this fixture: the rule is what is measured, not who may change it.
#[reducer]
pub fn add_reader(ctx: &ReducerContext, reader: Identity, stream_id: String) {
    ctx.db.bare_reader().insert(BareReader { id: 0, reader, stream_id });
}

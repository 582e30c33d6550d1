//! Checks of the module's stored state, recomputed natively from the rows.

use crate::TestDb;
use khala_proto::hash::GENESIS;
use khala_proto::segment;
use serde_json::Value;

/// One stored segment, as SQL returns it.
#[derive(Debug, Clone)]
pub struct StoredSegment {
    pub first_seq: u64,
    pub last_seq: u64,
    pub prev_hash: Vec<u8>,
    pub last_hash: Vec<u8>,
    pub events: Vec<khala_proto::SegmentEvent>,
}

/// A stream's row, as SQL returns it.
#[derive(Debug, Clone)]
pub struct StoredStream {
    pub stream_id: String,
    pub epoch: u64,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub head_hash: Vec<u8>,
    pub segment_count: u64,
    pub duplicates: u64,
}

/// A stream's `stream_view` row, as SQL returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredView {
    pub epoch: u64,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub head_hash: Vec<u8>,
}

fn bytes(v: Option<&Value>) -> Vec<u8> {
    v.and_then(Value::as_str).map(|s| hex::decode(s).expect("hex bytes")).unwrap_or_default()
}

fn num(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

/// SQL string literal with `'` doubled.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn streams(db: &TestDb) -> Vec<StoredStream> {
    let rows = db.sql("SELECT * FROM stream");
    rows.rows
        .iter()
        .map(|r| StoredStream {
            stream_id: rows.get(r, "stream_id").and_then(Value::as_str).unwrap_or("").to_string(),
            epoch: num(rows.get(r, "epoch")),
            head_seq: num(rows.get(r, "head_seq")),
            oldest_seq: num(rows.get(r, "oldest_seq")),
            head_hash: bytes(rows.get(r, "head_hash")),
            segment_count: num(rows.get(r, "segment_count")),
            duplicates: num(rows.get(r, "duplicates")),
        })
        .collect()
}

pub fn stream(db: &TestDb, stream_id: &str) -> Option<StoredStream> {
    streams(db).into_iter().find(|s| s.stream_id == stream_id)
}

/// The stream's `stream_view` row (what subscribers read of it), as the owner reads it.
pub fn stream_view(db: &TestDb, stream_id: &str) -> Option<StoredView> {
    let rows = db.sql(&format!("SELECT * FROM stream_view WHERE stream_id = {}", quote(stream_id)));
    let r = rows.rows.first()?;
    let n = |c: &str| rows.get(r, c).and_then(Value::as_u64).unwrap_or_else(|| panic!("stream_view.{c}"));
    Some(StoredView { epoch: n("epoch"), head_seq: n("head_seq"), oldest_seq: n("oldest_seq"), head_hash: bytes(rows.get(r, "head_hash")) })
}

/// The stream's segments in seq order, decoded.
pub fn segments(db: &TestDb, stream_id: &str) -> Vec<StoredSegment> {
    let rows = db.sql(&format!("SELECT * FROM stream_segment WHERE stream_id = {}", quote(stream_id)));
    let mut out: Vec<StoredSegment> = rows
        .rows
        .iter()
        .map(|r| StoredSegment {
            first_seq: num(rows.get(r, "first_seq")),
            last_seq: num(rows.get(r, "last_seq")),
            prev_hash: bytes(rows.get(r, "prev_hash")),
            last_hash: bytes(rows.get(r, "last_hash")),
            events: segment::decode(&bytes(rows.get(r, "data"))).expect("a stored segment decodes"),
        })
        .collect();
    out.sort_by_key(|s| s.first_seq);
    out
}

/// Recomputes a stream's chain natively from its stored segments and checks it against
/// every stored hash and the head. Returns the seqs stored, in order.
pub fn verify_stream(db: &TestDb, stream_id: &str) -> Result<Vec<u64>, String> {
    let row = stream(db, stream_id).ok_or_else(|| format!("no stream {stream_id}"))?;
    let segs = segments(db, stream_id);
    let mut seqs = Vec::new();
    let mut expected_first = row.oldest_seq;
    let mut chain: Option<[u8; 32]> = if row.oldest_seq == 1 { Some(GENESIS) } else { None };
    for seg in &segs {
        if seg.first_seq != expected_first {
            return Err(format!("{stream_id}: segment starts at {} but {} was expected", seg.first_seq, expected_first));
        }
        let prev: [u8; 32] = seg.prev_hash.as_slice().try_into().map_err(|_| "prev_hash is not 32 bytes".to_string())?;
        if let Some(c) = chain {
            if c != prev {
                return Err(format!("{stream_id}: prev_hash of segment at {} does not follow the chain", seg.first_seq));
            }
        }
        let last = segment::chain_through(&prev, stream_id, &seg.events);
        if last.as_slice() != seg.last_hash.as_slice() {
            return Err(format!("{stream_id}: recomputed chain at {} differs from last_hash", seg.last_seq));
        }
        seqs.extend(seg.events.iter().map(|e| e.seq));
        chain = Some(last);
        expected_first = seg.last_seq + 1;
    }
    if expected_first != row.head_seq + 1 {
        return Err(format!("{stream_id}: stored segments end at {} but head_seq is {}", expected_first - 1, row.head_seq));
    }
    if let Some(c) = chain {
        if c.as_slice() != row.head_hash.as_slice() {
            return Err(format!("{stream_id}: recomputed head chain differs from head_hash"));
        }
    }
    if row.segment_count != segs.len() as u64 {
        return Err(format!("{stream_id}: segment_count {} but {} segments stored", row.segment_count, segs.len()));
    }
    Ok(seqs)
}

/// How many rows `SELECT * FROM table` returns to the owner.
pub fn count(db: &TestDb, table: &str) -> usize {
    db.sql(&format!("SELECT * FROM {table}")).rows.len()
}

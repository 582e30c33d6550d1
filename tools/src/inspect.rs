//! Typed reads of the module's stream and segment rows over SQL (`/v1/database/NAME/sql`).
//!
//! What a caller sees follows its identity: the owner sees every row, a publisher the
//! streams its publish grants reach, a subscriber its granted streams (docs/SECURITY.md).

use crate::api::{Api, SqlRows};
use crate::error::{Result, ToolError};
use serde_json::Value;

/// One `stream` row, as far as readers need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRow {
    pub stream_id: String,
    pub epoch: u32,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub head_hash: Vec<u8>,
    pub segment_count: u64,
}

/// One `stream_segment` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRow {
    pub first_seq: u64,
    pub last_seq: u64,
    pub prev_hash: Vec<u8>,
    pub last_hash: Vec<u8>,
    /// `khala_proto::segment` encoding.
    pub data: Vec<u8>,
}

/// A SQL string literal.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn malformed(what: &str, detail: String) -> ToolError {
    ToolError::Http { what: format!("reading {what} rows"), detail }
}

fn u64_at(rows: &SqlRows, row: &[Value], column: &str) -> Result<u64> {
    rows.get(row, column).and_then(Value::as_u64).ok_or_else(|| malformed("stream", format!("column {column} is missing or not a number")))
}

/// Byte columns come back as hex strings.
fn bytes_at(rows: &SqlRows, row: &[Value], column: &str) -> Result<Vec<u8>> {
    let text = rows.get(row, column).and_then(Value::as_str).ok_or_else(|| malformed("stream", format!("column {column} is missing")))?;
    hex::decode(text).map_err(|e| malformed("stream", format!("column {column}: {e}")))
}

fn stream_rows(rows: &SqlRows) -> Result<Vec<StreamRow>> {
    rows.rows
        .iter()
        .map(|row| {
            Ok(StreamRow {
                stream_id: rows.get(row, "stream_id").and_then(Value::as_str).ok_or_else(|| malformed("stream", "no stream_id".into()))?.to_string(),
                epoch: u64_at(rows, row, "epoch")? as u32,
                head_seq: u64_at(rows, row, "head_seq")?,
                oldest_seq: u64_at(rows, row, "oldest_seq")?,
                head_hash: bytes_at(rows, row, "head_hash")?,
                segment_count: u64_at(rows, row, "segment_count")?,
            })
        })
        .collect()
}

/// Every stream the caller may see.
pub fn streams(api: &Api, database: &str, token: &str) -> Result<Vec<StreamRow>> {
    stream_rows(&api.sql(database, "SELECT * FROM stream", token)?)
}

/// One stream, if the caller may see it and it exists.
pub fn stream(api: &Api, database: &str, token: &str, stream_id: &str) -> Result<Option<StreamRow>> {
    let rows = api.sql(database, &format!("SELECT * FROM stream WHERE stream_id = {}", quote(stream_id)), token)?;
    Ok(stream_rows(&rows)?.into_iter().next())
}

/// The segments of `stream_id` that hold any seq in `from..=to`, in seq order.
pub fn segments(api: &Api, database: &str, token: &str, stream_id: &str, from: u64, to: u64) -> Result<Vec<SegmentRow>> {
    segment_rows(api, database, token, &format!("SELECT * FROM stream_segment WHERE stream_id = {} AND last_seq >= {from} AND first_seq <= {to}", quote(stream_id)))
}

/// Every segment of `stream_id` the caller may see, in seq order.
pub fn all_segments(api: &Api, database: &str, token: &str, stream_id: &str) -> Result<Vec<SegmentRow>> {
    segment_rows(api, database, token, &format!("SELECT * FROM stream_segment WHERE stream_id = {}", quote(stream_id)))
}

fn segment_rows(api: &Api, database: &str, token: &str, query: &str) -> Result<Vec<SegmentRow>> {
    let rows = api.sql(database, query, token)?;
    let mut out = rows
        .rows
        .iter()
        .map(|row| {
            Ok(SegmentRow {
                first_seq: u64_at(&rows, row, "first_seq")?,
                last_seq: u64_at(&rows, row, "last_seq")?,
                prev_hash: bytes_at(&rows, row, "prev_hash")?,
                last_hash: bytes_at(&rows, row, "last_hash")?,
                data: bytes_at(&rows, row, "data")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_sql_literals() {
        assert_eq!(quote("a'b"), "'a''b'");
    }
}

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
    /// Who published it: hex, without `0x`.
    pub publisher: String,
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
                publisher: identity_at(&rows, row, "stream_segment", "publisher")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// One grant: a `stream_grant` row (subscribe/ack on one stream) or a `publish_grant`
/// row (publish on a stream id or a `prefix*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    /// The grantee's identity, hex without `0x`.
    pub grantee: String,
    /// A stream id, or a pattern ending in `*` for a prefix publish grant.
    pub stream: String,
    pub scopes: Vec<&'static str>,
    pub expires_at_micros: i64,
}

/// One `identity_role` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRow {
    pub identity: String,
    pub role: String,
}

/// An identity column, rendered by the SQL endpoint as `["0x…"]`.
fn identity_at(rows: &SqlRows, row: &[Value], what: &str, column: &str) -> Result<String> {
    let value = rows.get(row, column).ok_or_else(|| malformed(what, format!("no column {column}")))?;
    let text = match value {
        Value::Array(items) => items.first().and_then(Value::as_str),
        Value::Object(fields) => fields.values().next().and_then(Value::as_str),
        other => other.as_str(),
    };
    text.map(|t| t.trim_start_matches("0x").to_string()).ok_or_else(|| malformed(what, format!("column {column} is not an identity: {value}")))
}

/// A timestamp column, rendered by the SQL endpoint as `[micros]`.
pub(crate) fn micros_at(rows: &SqlRows, row: &[Value], what: &str, column: &str) -> Result<i64> {
    let value = rows.get(row, column).ok_or_else(|| malformed(what, format!("no column {column}")))?;
    let micros = match value {
        Value::Array(items) => items.first().and_then(Value::as_i64),
        Value::Object(fields) => fields.values().next().and_then(Value::as_i64),
        other => other.as_i64(),
    };
    micros.ok_or_else(|| malformed(what, format!("column {column} is not a timestamp: {value}")))
}

fn bool_at(rows: &SqlRows, row: &[Value], what: &str, column: &str) -> Result<bool> {
    rows.get(row, column).and_then(Value::as_bool).ok_or_else(|| malformed(what, format!("column {column} is missing or not a bool")))
}

fn text_at(rows: &SqlRows, row: &[Value], what: &str, column: &str) -> Result<String> {
    rows.get(row, column).and_then(Value::as_str).map(str::to_string).ok_or_else(|| malformed(what, format!("column {column} is missing or not text")))
}

/// Every grant the caller may see (an admin sees all; anyone else its own), stream
/// grants first, each group by stream then grantee.
pub fn grants(api: &Api, database: &str, token: &str) -> Result<Vec<GrantRow>> {
    let stream_rows = api.sql(database, "SELECT * FROM stream_grant", token)?;
    let mut out = Vec::new();
    for row in &stream_rows.rows {
        let (subscribe, ack) = (bool_at(&stream_rows, row, "stream_grant", "subscribe")?, bool_at(&stream_rows, row, "stream_grant", "ack")?);
        let scopes = [("subscribe", subscribe), ("ack", ack)].into_iter().filter(|(_, on)| *on).map(|(name, _)| name).collect();
        out.push(GrantRow {
            grantee: identity_at(&stream_rows, row, "stream_grant", "grantee")?,
            stream: text_at(&stream_rows, row, "stream_grant", "stream_id")?,
            scopes,
            expires_at_micros: micros_at(&stream_rows, row, "stream_grant", "expires_at")?,
        });
    }
    let mut publish: Vec<GrantRow> = publish_grants(api, database, token)?
        .into_iter()
        .map(|g| GrantRow {
            stream: if g.prefix { format!("{}*", g.pattern) } else { g.pattern },
            grantee: g.grantee,
            scopes: vec!["publish"],
            expires_at_micros: g.expires_at_micros,
        })
        .collect();
    out.sort_by(|a, b| (&a.stream, &a.grantee).cmp(&(&b.stream, &b.grantee)));
    publish.sort_by(|a, b| (&a.stream, &a.grantee).cmp(&(&b.stream, &b.grantee)));
    out.extend(publish);
    Ok(out)
}

/// One `publish_grant` row: an exact stream id, or a prefix when `prefix`.
struct PublishGrantRow {
    grantee: String,
    pattern: String,
    prefix: bool,
    expires_at_micros: i64,
}

fn publish_grants(api: &Api, database: &str, token: &str) -> Result<Vec<PublishGrantRow>> {
    let rows = api.sql(database, "SELECT * FROM publish_grant", token)?;
    rows.rows
        .iter()
        .map(|row| {
            Ok(PublishGrantRow {
                grantee: identity_at(&rows, row, "publish_grant", "grantee")?,
                pattern: text_at(&rows, row, "publish_grant", "pattern")?,
                prefix: bool_at(&rows, row, "publish_grant", "prefix")?,
                expires_at_micros: micros_at(&rows, row, "publish_grant", "expires_at")?,
            })
        })
        .collect()
}

/// The publish reach of `identity`: its live publish grants, as `(pattern, prefix)`.
/// A non-admin sees only its own grants; an admin's view is filtered to `identity`.
/// Reads only `publish_grant` (the mirror calls this at every reconcile).
pub fn publish_reach(api: &Api, database: &str, token: &str, identity: &str, now_micros: i64) -> Result<PublishReach> {
    let patterns = publish_grants(api, database, token)?
        .into_iter()
        .filter(|g| g.grantee == identity && g.expires_at_micros > now_micros)
        .map(|g| (g.pattern, g.prefix))
        .collect();
    Ok(PublishReach { patterns })
}

/// Which streams an identity may publish to, by its publish grants (module/src/access.rs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReach {
    pub patterns: Vec<(String, bool)>,
}

impl PublishReach {
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a grant covers `stream_id`: equal to an exact pattern, or starting with a prefix.
    pub fn covers(&self, stream_id: &str) -> bool {
        self.patterns.iter().any(|(pattern, prefix)| if *prefix { stream_id.starts_with(pattern.as_str()) } else { stream_id == pattern })
    }
}

/// Every role the caller may see, by identity.
pub fn roles(api: &Api, database: &str, token: &str) -> Result<Vec<RoleRow>> {
    let rows = api.sql(database, "SELECT * FROM identity_role", token)?;
    let mut out = rows
        .rows
        .iter()
        .map(|row| Ok(RoleRow { identity: identity_at(&rows, row, "identity_role", "identity")?, role: text_at(&rows, row, "identity_role", "role")? }))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| (&a.identity, &a.role).cmp(&(&b.identity, &b.role)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_reach_covers_exact_ids_and_prefixes() {
        let reach = PublishReach { patterns: vec![("runtime.".into(), true), ("audit.log".into(), false)] };
        assert!(reach.covers("runtime.run.1.events"));
        assert!(reach.covers("audit.log"));
        assert!(!reach.covers("audit.log.2"));
        assert!(!reach.covers("other.stream"));
        assert!(PublishReach { patterns: vec![(String::new(), true)] }.covers("anything"));
        assert!(PublishReach::default().is_empty());
    }

    #[test]
    fn quotes_sql_literals() {
        assert_eq!(quote("a'b"), "'a''b'");
    }
}

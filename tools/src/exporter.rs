//! `khala exporter`: the module's state as Prometheus gauges, read every few seconds
//! over the SQL endpoint with a token that sees every row (the owner's; docs/METRICS.md).
//!
//! SQL rather than an SDK subscription: a subscription to `stream_segment` would load
//! every segment's data into this process, and the gauges need only small reads. The
//! one costly figure, bytes per stream, is kept per segment id: each segment's `data` is
//! read once, when its id first appears, and forgotten when the id goes (retention,
//! compaction), so a quiet module costs a handful of small queries per scrape.
//!
//! A stream that is gone stops being set, and the recorder drops gauges not set for
//! [`forget_after`] (so it leaves the output rather than showing 0). A failed read sets
//! `khala_module_up` to 0 and counts `khala_module_scrape_errors_total`; the process keeps
//! serving and tries again at the next interval.

use crate::api::{Api, SqlRows};
use crate::inspect::GrantRow;
use crate::error::{Result, ToolError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A grant whose lease ends within this is "expiring soon".
pub const EXPIRING_SOON: Duration = Duration::from_secs(300);
/// Segments whose `data` one query reads, at most (a segment holds up to 16 MiB).
const SEGMENTS_PER_READ: usize = 8;

/// What `khala exporter` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: String,
    pub database: String,
    pub token: String,
    pub metrics_addr: SocketAddr,
    pub interval: Duration,
}

/// One stream's gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamGauges {
    pub stream_id: String,
    pub epoch: u64,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub segments: u64,
    pub duplicates: u64,
    /// Bytes of segment `data` retained.
    pub bytes: u64,
}

/// Everything one read found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub streams: Vec<StreamGauges>,
    /// Live grants by scope (`subscribe`, `ack`, `publish`).
    pub grants: BTreeMap<&'static str, u64>,
    pub expiring_soon: u64,
    pub connected: u64,
    /// The numeric settings of `khala_config`, by column.
    pub config: BTreeMap<String, f64>,
}

/// Gauges not set for this long leave the output: a little over two intervals, so one
/// failed read does not drop them.
pub fn forget_after(interval: Duration) -> Duration {
    interval * 2 + Duration::from_secs(5)
}

fn malformed(what: &str, detail: impl Into<String>) -> ToolError {
    ToolError::Http { what: format!("reading {what}"), detail: detail.into() }
}

fn u64_col(rows: &SqlRows, row: &[Value], what: &str, column: &str) -> Result<u64> {
    rows.get(row, column).and_then(Value::as_u64).ok_or_else(|| malformed(what, format!("column {column} is missing or not a number")))
}

/// Segment sizes by id, so that each segment's `data` is read once.
#[derive(Debug, Default)]
pub struct SegmentBytes {
    known: HashMap<u64, (String, u64)>,
}

impl SegmentBytes {
    /// Brings the sizes up to date with the segments there are now; returns the bytes per
    /// stream.
    pub fn refresh(&mut self, api: &Api, database: &str, token: &str) -> Result<BTreeMap<String, u64>> {
        let listed = api.sql(database, "SELECT id, stream_id FROM stream_segment", token)?;
        let mut now = HashMap::with_capacity(listed.rows.len());
        for row in &listed.rows {
            let id = u64_col(&listed, row, "segments", "id")?;
            let stream = listed.get(row, "stream_id").and_then(Value::as_str).ok_or_else(|| malformed("segments", "no stream_id"))?;
            now.insert(id, stream.to_string());
        }
        self.known.retain(|id, _| now.contains_key(id));
        let missing: BTreeSet<u64> = now.keys().filter(|id| !self.known.contains_key(id)).copied().collect();
        let missing: Vec<u64> = missing.into_iter().collect();
        for chunk in missing.chunks(SEGMENTS_PER_READ) {
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            let rows = api.sql(database, &format!("SELECT id, data FROM stream_segment WHERE id >= {first} AND id <= {last}"), token)?;
            for row in &rows.rows {
                let id = u64_col(&rows, row, "segments", "id")?;
                // Bytes come back as hex.
                let hex_len = rows.get(row, "data").and_then(Value::as_str).ok_or_else(|| malformed("segments", "no data"))?.len() as u64;
                if let Some(stream) = now.get(&id) {
                    self.known.insert(id, (stream.clone(), hex_len / 2));
                }
            }
        }
        let mut bytes = BTreeMap::new();
        for (stream, size) in self.known.values() {
            *bytes.entry(stream.clone()).or_default() += size;
        }
        Ok(bytes)
    }
}

/// Builds the stream gauges from `stream` rows and the bytes per stream.
pub fn streams(rows: &SqlRows, bytes: &BTreeMap<String, u64>) -> Result<Vec<StreamGauges>> {
    rows.rows
        .iter()
        .map(|row| {
            let stream_id = rows.get(row, "stream_id").and_then(Value::as_str).ok_or_else(|| malformed("streams", "no stream_id"))?.to_string();
            Ok(StreamGauges {
                epoch: u64_col(rows, row, "streams", "epoch")?,
                head_seq: u64_col(rows, row, "streams", "head_seq")?,
                oldest_seq: u64_col(rows, row, "streams", "oldest_seq")?,
                segments: u64_col(rows, row, "streams", "segment_count")?,
                duplicates: u64_col(rows, row, "streams", "duplicates")?,
                bytes: bytes.get(&stream_id).copied().unwrap_or(0),
                stream_id,
            })
        })
        .collect()
}

/// Live grants by scope and how many end within [`EXPIRING_SOON`] of `now_micros`
/// (inspect's typed grant rows). A row past its lease that the module has not removed
/// yet is not live.
pub fn grants(rows: &[GrantRow], now_micros: i64) -> (BTreeMap<&'static str, u64>, u64) {
    let soon = now_micros + EXPIRING_SOON.as_micros() as i64;
    let mut by_scope: BTreeMap<&'static str, u64> = [("subscribe", 0), ("ack", 0), ("publish", 0)].into_iter().collect();
    let mut expiring = 0;
    for grant in rows.iter().filter(|g| g.expires_at_micros > now_micros) {
        for scope in &grant.scopes {
            *by_scope.entry(scope).or_default() += 1;
        }
        if grant.expires_at_micros <= soon {
            expiring += 1;
        }
    }
    (by_scope, expiring)
}

/// Every numeric column of the `khala_config` row but its key.
pub fn config(rows: &SqlRows) -> BTreeMap<String, f64> {
    let Some(row) = rows.rows.first() else { return BTreeMap::new() };
    rows.columns.iter().zip(row).filter(|(name, _)| name.as_str() != "id").filter_map(|(name, v)| Some((name.clone(), v.as_f64()?))).collect()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Reads the module's state once.
pub fn read(api: &Api, database: &str, token: &str, bytes: &mut SegmentBytes) -> Result<Snapshot> {
    let stream_rows = api.sql(database, "SELECT * FROM stream", token)?;
    let per_stream = bytes.refresh(api, database, token)?;
    let (grants, expiring_soon) = grants(&crate::inspect::grants(api, database, token)?, now_micros());
    let presence = api.sql(database, "SELECT connected FROM presence", token)?;
    let connected = presence.rows.first().and_then(|r| presence.get(r, "connected")).and_then(Value::as_u64).unwrap_or(0);
    let config = config(&api.sql(database, "SELECT * FROM khala_config", token)?);
    Ok(Snapshot { streams: streams(&stream_rows, &per_stream)?, grants, expiring_soon, connected, config })
}

/// Sets the gauges of a successful read.
pub fn record(s: &Snapshot) {
    use metrics::gauge;
    gauge!("khala_module_up").set(1.0);
    for st in &s.streams {
        let id = st.stream_id.clone();
        gauge!("khala_module_stream_head", "stream" => id.clone()).set(st.head_seq as f64);
        gauge!("khala_module_stream_floor", "stream" => id.clone()).set(st.oldest_seq as f64);
        gauge!("khala_module_stream_epoch", "stream" => id.clone()).set(st.epoch as f64);
        gauge!("khala_module_stream_segments", "stream" => id.clone()).set(st.segments as f64);
        gauge!("khala_module_stream_bytes", "stream" => id.clone()).set(st.bytes as f64);
        gauge!("khala_module_stream_duplicates", "stream" => id).set(st.duplicates as f64);
    }
    for (scope, n) in &s.grants {
        gauge!("khala_module_grants", "scope" => *scope).set(*n as f64);
    }
    gauge!("khala_module_grants_expiring_soon").set(s.expiring_soon as f64);
    gauge!("khala_module_connected_clients").set(s.connected as f64);
    for (key, value) in &s.config {
        gauge!("khala_module_config", "key" => key.clone()).set(*value);
    }
}

/// Serves the gauges on `config.metrics_addr` and reads the module every interval until
/// `stop` is set. Only a metrics address that cannot be served ends it early.
pub fn run(config: &Config, stop: &AtomicBool) -> Result<()> {
    crate::prometheus::install(config.metrics_addr, Some(forget_after(config.interval)))?;
    // A hung server must read as down within a few intervals, not after the default 120 s.
    let api = Api::with_timeout(&config.server, (config.interval * 2).max(Duration::from_secs(5)));
    let mut bytes = SegmentBytes::default();
    let errors = metrics::counter!("khala_module_scrape_errors_total");
    errors.absolute(0);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match read(&api, &config.database, &config.token, &mut bytes) {
            Ok(snapshot) => {
                record(&snapshot);
                log::debug!("read {} streams in {} ms", snapshot.streams.len(), started.elapsed().as_millis());
            }
            Err(e) => {
                metrics::gauge!("khala_module_up").set(0.0);
                errors.increment(1);
                log::warn!("reading the module: {}: {e}", e.code());
            }
        }
        let next = started + config.interval;
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(next.saturating_duration_since(Instant::now())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(columns: &[&str], rows: Vec<Value>) -> SqlRows {
        SqlRows { columns: columns.iter().map(|c| c.to_string()).collect(), rows: rows.into_iter().map(|r| r.as_array().unwrap().clone()).collect() }
    }

    #[test]
    fn grants_count_live_leases_by_scope_and_those_ending_soon() {
        let now = 1_000_000_000_000;
        let min = 60_000_000;
        let grant = |scopes: &[&'static str], expires_at_micros| GrantRow { grantee: "c200".into(), stream: "s".into(), scopes: scopes.to_vec(), expires_at_micros };
        let all = [
            grant(&["subscribe", "ack"], now + 60 * min),
            grant(&["subscribe"], now + 2 * min),
            // Past its lease, not swept yet: not live.
            grant(&["subscribe", "ack"], now - 1),
            grant(&["publish"], now + 4 * min),
            grant(&["publish"], now + 6 * min),
        ];
        let (by_scope, soon) = grants(&all, now);
        assert_eq!(by_scope, [("ack", 1), ("publish", 2), ("subscribe", 2)].into_iter().collect());
        assert_eq!(soon, 2);
    }

    #[test]
    fn config_keeps_numeric_settings() {
        let r = rows(&["id", "max_payload_bytes", "min_client_build", "compact_min_age_secs"], vec![json!([0, 262144, "0.1.0", 10])]);
        assert_eq!(config(&r), [("compact_min_age_secs".to_string(), 10.0), ("max_payload_bytes".to_string(), 262144.0)].into_iter().collect());
    }

    #[test]
    fn streams_take_their_bytes() {
        let r = rows(&["stream_id", "epoch", "head_seq", "oldest_seq", "segment_count", "duplicates"], vec![json!(["a", 1, 10, 3, 2, 1]), json!(["b", 2, 0, 1, 0, 0])]);
        let bytes = [("a".to_string(), 700)].into_iter().collect();
        let s = streams(&r, &bytes).unwrap();
        assert_eq!(s[0], StreamGauges { stream_id: "a".into(), epoch: 1, head_seq: 10, oldest_seq: 3, segments: 2, duplicates: 1, bytes: 700 });
        assert_eq!((s[1].bytes, s[1].epoch), (0, 2));
    }
}

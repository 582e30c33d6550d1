//! Health for a UI: one snapshot of the connection and of each stream, shared between
//! the sync loop and whoever displays it, and written as JSON beside the checkpoint.

use khala_proto::v1::{ConnectionState, HealthSnapshot, StreamHealth};
use khala_proto::SnakeName;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A shared, cheaply cloned handle on the latest snapshot.
#[derive(Debug, Clone, Default)]
pub struct HealthHandle(Arc<Mutex<HealthSnapshot>>);

impl HealthHandle {
    pub fn get(&self) -> HealthSnapshot {
        self.0.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub fn update(&self, f: impl FnOnce(&mut HealthSnapshot)) {
        if let Ok(mut h) = self.0.lock() {
            f(&mut h);
        }
    }
}

/// The snake_case name of a state, as JSON shows it (`unspecified` for an unknown number).
pub fn state_name(state: i32) -> &'static str {
    ConnectionState::try_from(state).unwrap_or_default().snake_name()
}

/// The health file's JSON (what [`write_json`] writes, [`read_json`] reads and
/// `khala status --client` shows), as one type on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// [`state_name`] of the overall state.
    pub state: String,
    pub connect_attempts: u32,
    pub next_retry_ms: u64,
    pub last_error: String,
    pub streams: Vec<StreamReport>,
}

/// One stream of a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub stream_id: String,
    pub state: String,
    pub cursor: u64,
    pub target: u64,
    pub lag: u64,
    /// Cursor over target, in percent with one decimal (100 for an empty stream).
    pub progress_pct: f64,
    /// `None` when no lease is known.
    pub lease_secs_left: Option<i64>,
}

impl From<&StreamHealth> for StreamReport {
    fn from(s: &StreamHealth) -> Self {
        let progress = if s.target == 0 { 100.0 } else { (s.cursor as f64 / s.target as f64 * 100.0).min(100.0) };
        StreamReport {
            stream_id: s.stream_id.clone(),
            state: state_name(s.state).to_string(),
            cursor: s.cursor,
            target: s.target,
            lag: s.lag,
            progress_pct: (progress * 10.0).round() / 10.0,
            lease_secs_left: (s.lease_secs_left >= 0).then_some(s.lease_secs_left),
        }
    }
}

impl From<&HealthSnapshot> for HealthReport {
    fn from(h: &HealthSnapshot) -> Self {
        HealthReport {
            state: state_name(h.state).to_string(),
            connect_attempts: h.connect_attempts,
            next_retry_ms: h.next_retry_ms,
            last_error: h.last_error.clone(),
            streams: h.streams.iter().map(StreamReport::from).collect(),
        }
    }
}

/// The snapshot as JSON (what `khala status --client` prints).
pub fn to_json(h: &HealthSnapshot) -> Value {
    serde_json::to_value(HealthReport::from(h)).unwrap_or_default()
}

/// Writes the snapshot as JSON, atomically (temp + rename; no fsync: it is advisory).
pub fn write_json(path: &Path, h: &HealthSnapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("health.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&HealthReport::from(h))?)?;
    std::fs::rename(tmp, path)
}

/// Reads a health file; one that does not parse is an `InvalidData` error.
pub fn read_json(path: &Path) -> std::io::Result<HealthReport> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_as_the_same_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.health.json");
        let h = HealthSnapshot {
            state: ConnectionState::Replaying as i32,
            connect_attempts: 2,
            next_retry_ms: 0,
            last_error: "disconnected: x".into(),
            streams: vec![
                StreamHealth { stream_id: "a".into(), state: ConnectionState::Replaying as i32, cursor: 1, target: 3, lag: 2, lease_secs_left: 90 },
                StreamHealth { stream_id: "b".into(), state: ConnectionState::Live as i32, cursor: 0, target: 0, lag: 0, lease_secs_left: -1 },
            ],
        };
        write_json(&path, &h).unwrap();
        let back = read_json(&path).unwrap();
        assert_eq!(back, HealthReport::from(&h));
        assert_eq!((back.state.as_str(), back.streams[0].progress_pct, back.streams[0].lease_secs_left), ("replaying", 33.3, Some(90)));
        assert_eq!((back.streams[1].progress_pct, back.streams[1].lease_secs_left), (100.0, None));
        std::fs::write(&path, b"{\"state\": 3}").unwrap();
        assert_eq!(read_json(&path).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}

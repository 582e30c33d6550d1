//! Health for a UI: one snapshot of the connection and of each stream, shared between
//! the sync loop and whoever displays it, and written as JSON beside the checkpoint.

use khala_proto::v1::{ConnectionState, HealthSnapshot, StreamHealth};
use serde_json::{json, Value};
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

/// The snake_case name of a state, as JSON shows it.
pub fn state_name(state: i32) -> &'static str {
    match ConnectionState::try_from(state).unwrap_or(ConnectionState::Unspecified) {
        ConnectionState::Unspecified => "unspecified",
        ConnectionState::Connecting => "connecting",
        ConnectionState::Replaying => "replaying",
        ConnectionState::Live => "live",
        ConnectionState::Backoff => "backoff",
        ConnectionState::Stale => "stale",
        ConnectionState::Unauthorized => "unauthorized",
        ConnectionState::UpgradeRequired => "upgrade_required",
        ConnectionState::ServerBehind => "server_behind",
        ConnectionState::Forbidden => "forbidden",
    }
}

fn stream_json(s: &StreamHealth) -> Value {
    let progress = if s.target == 0 { 100.0 } else { (s.cursor as f64 / s.target as f64 * 100.0).min(100.0) };
    json!({
        "stream_id": s.stream_id,
        "state": state_name(s.state),
        "cursor": s.cursor,
        "target": s.target,
        "lag": s.lag,
        "progress_pct": (progress * 10.0).round() / 10.0,
        "lease_secs_left": if s.lease_secs_left < 0 { Value::Null } else { json!(s.lease_secs_left) },
    })
}

/// The snapshot as JSON (what `khala status --client` prints).
pub fn to_json(h: &HealthSnapshot) -> Value {
    json!({
        "state": state_name(h.state),
        "connect_attempts": h.connect_attempts,
        "next_retry_ms": h.next_retry_ms,
        "last_error": h.last_error,
        "streams": h.streams.iter().map(stream_json).collect::<Vec<_>>(),
    })
}

/// Writes the snapshot as JSON, atomically (temp + rename; no fsync: it is advisory).
pub fn write_json(path: &Path, h: &HealthSnapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("health.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&to_json(h)).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

//! The health snapshot, read from the driver's state and changing none of it.

use super::session::Phase;
use super::stream::StreamState;
use super::{Driver, Now};
use crate::apply::StreamMode;
use khala_proto::v1::{ConnectionState, HealthSnapshot, StreamHealth};

/// Where one stream stands, as health shows it.
pub fn stream_state(s: &StreamState) -> ConnectionState {
    let head = s.engine.info().map_or(0, |i| i.head_seq);
    if s.grant.forbidden() {
        ConnectionState::Forbidden
    } else if s.corrupt_ahead().is_some() {
        ConnectionState::Corrupt
    } else if matches!(s.engine.mode(), StreamMode::ServerBehind { .. }) {
        // Within its grace a hold may only be a view that trails the checkpoint: not
        // reported behind yet, and not live either.
        if s.hold.behind_confirmed() {
            ConnectionState::ServerBehind
        } else {
            ConnectionState::Replaying
        }
    } else if s.rebuilding() {
        ConnectionState::Stale
    } else if s.engine.applied() < head || !s.windows.live(s.engine.fetch_after() + 1) {
        ConnectionState::Replaying
    } else {
        ConnectionState::Live
    }
}

impl Driver {
    /// The client's overall state: the connection's while it is not subscribed; then
    /// live, unless a stream (other than a forbidden one) is not.
    pub fn overall(&self) -> ConnectionState {
        match &self.session.phase {
            Phase::Backoff { state, .. } | Phase::Stopped { state } => *state,
            Phase::Up { subscribed: true } => {
                let mut overall = ConnectionState::Live;
                for s in self.streams.values() {
                    let state = stream_state(s);
                    if state != ConnectionState::Live && state != ConnectionState::Forbidden && overall == ConnectionState::Live {
                        overall = if state == ConnectionState::ServerBehind { ConnectionState::ServerBehind } else { ConnectionState::Replaying };
                    }
                }
                overall
            }
            _ => ConnectionState::Connecting,
        }
    }

    /// The health snapshot a UI shows (and `khala status --client` reads from the file).
    pub fn health(&self, now: Now) -> HealthSnapshot {
        let mut notes = Vec::new();
        let streams = self
            .streams
            .iter()
            .map(|(id, s)| {
                let head = s.engine.info().map_or(0, |i| i.head_seq);
                let applied = s.engine.applied();
                if let Some((first, last)) = s.corrupt_ahead() {
                    notes.push(format!("{id}: segment_corrupt: seqs {first}..={last} do not verify (refused at cursor {applied})"));
                }
                if let Some(behind) = s.hold.reported_behind_for(now.at) {
                    notes.push(format!("{id}: server behind the checkpoint for {}s (head {head}, checkpoint {applied})", behind.as_secs()));
                }
                StreamHealth {
                    stream_id: id.clone(),
                    state: stream_state(s) as i32,
                    cursor: applied,
                    target: head,
                    lag: head.saturating_sub(applied),
                    lease_secs_left: s.grant.lease_secs_left(now.unix_micros),
                }
            })
            .collect();
        let overall = self.overall();
        HealthSnapshot {
            state: overall as i32,
            connect_attempts: if overall == ConnectionState::Live { 0 } else { self.connect_attempts },
            next_retry_ms: if matches!(self.session.phase, Phase::Backoff { .. }) { self.next_retry_ms } else { 0 },
            last_error: if notes.is_empty() { self.last_error.clone() } else { notes.join("; ") },
            streams,
        }
    }
}

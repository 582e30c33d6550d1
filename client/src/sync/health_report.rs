//! The health snapshot the sync loop keeps for a UI, per stream and overall.

use super::{now_micros, SyncClient};
use crate::apply::StreamMode;
use crate::handler::Handler;
use crate::health;
use khala_proto::hash::bucket;
use khala_proto::v1::{ConnectionState, StreamHealth};
use std::time::{Duration, Instant};

impl<H: Handler> SyncClient<H> {
    pub(super) fn update_health(&mut self) {
        let now = now_micros();
        let limit = self.config.server_behind_limit;
        let mut overall = ConnectionState::Live;
        let mut notes = Vec::new();
        let mut streams = Vec::new();
        for (id, s) in self.streams.iter_mut() {
            let head = s.engine.info().map_or(0, |i| i.head_seq);
            let applied = s.engine.applied();
            let b0 = bucket(s.engine.fetch_after() + 1);
            let live_window = !s.windows_usable || (s.open.contains(&b0) && s.open.contains(&(b0 + 1)));
            let state = if s.granted == Some(false) && !s.row_visible {
                ConnectionState::Forbidden
            } else if let StreamMode::ServerBehind { head } = s.engine.mode() {
                if let Some(since) = s.behind_since {
                    if since.elapsed() > limit && !s.behind_reported {
                        log::error!("{id}: the server has been behind the checkpoint for over {limit:?} (head {head}, checkpoint {applied})");
                        s.behind_reported = true;
                    }
                    if s.behind_reported {
                        notes.push(format!("{id}: server behind the checkpoint for {}s (head {head}, checkpoint {applied})", since.elapsed().as_secs()));
                    }
                }
                ConnectionState::ServerBehind
            } else if matches!(s.engine.mode(), StreamMode::Rebootstrapping { .. }) || s.rebootstrap_due.is_some() {
                ConnectionState::Stale
            } else if applied < head || !live_window {
                ConnectionState::Replaying
            } else {
                ConnectionState::Live
            };
            if state != ConnectionState::Live && state != ConnectionState::Forbidden && overall == ConnectionState::Live {
                overall = if state == ConnectionState::ServerBehind { ConnectionState::ServerBehind } else { ConnectionState::Replaying };
            }
            s.metrics.health(applied, head, s.lease_expires_micros, state, now);
            streams.push(StreamHealth {
                stream_id: id.clone(),
                state: state as i32,
                cursor: applied,
                target: head,
                lag: head.saturating_sub(applied),
                lease_secs_left: s.lease_expires_micros.map_or(-1, |t| (t - now) / 1_000_000),
            });
        }
        if overall == ConnectionState::Live {
            self.backoff.reset();
        }
        self.metrics.state(overall as i32);
        self.metrics.streams(streams.iter().map(|s| s.state));
        self.health.update(|h| {
            h.state = overall as i32;
            h.streams = streams;
            h.next_retry_ms = 0;
            if overall == ConnectionState::Live {
                h.connect_attempts = 0;
            }
            if !notes.is_empty() {
                h.last_error = notes.join("; ");
            }
        });
        self.write_health(false);
    }

    pub(super) fn write_health(&mut self, now: bool) {
        if now || self.last_health_write.elapsed() >= Duration::from_millis(500) {
            if let Err(e) = health::write_json(&self.config.health_file(), &self.health.get()) {
                log::debug!("writing the health file: {e}");
            }
            self.last_health_write = Instant::now();
        }
    }
}

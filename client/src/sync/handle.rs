//! What the sync loop does with each message from the connection, and with the engine's
//! alerts.

use super::SyncClient;
use crate::apply::{Alert, StreamInfo};
use crate::error::ClientError;
use crate::handler::Handler;
use crate::transport::Msg;
use khala_proto::v1::RebootstrapReason;
use khala_proto::{CodedError, ErrorCode};
use std::time::{Duration, Instant};

impl<H: Handler> SyncClient<H> {
    pub(super) fn handle(&mut self, msg: Msg) -> Result<(), ClientError> {
        match msg {
            Msg::Disconnected(e) => return Err(ClientError::Disconnected(e.unwrap_or_else(|| "the server closed the connection".into()))),
            Msg::SubscriptionError(tag, e) => return Err(ClientError::Subscription(format!("subscription {tag}: {e}"))),
            Msg::Segment(stream_id, segment, published_at_micros) => {
                let Some(state) = self.streams.get_mut(&stream_id) else { return Ok(()) };
                match segment {
                    Ok(segment) => {
                        state.metrics.segment(segment.first_seq, segment.last_seq, published_at_micros);
                        let offer = state.engine.offer(segment);
                        self.alerts(&stream_id, offer.alerts);
                    }
                    // A gap follows, and the windows are reopened if it stays.
                    Err(e) => log::error!("{e}"),
                }
            }
            Msg::Stream(row) => {
                let Some(state) = self.streams.get_mut(&row.stream_id) else { return Ok(()) };
                state.row_visible = true;
                let alerts = state.engine.observe(StreamInfo {
                    epoch: row.epoch,
                    head_seq: row.head_seq,
                    oldest_seq: row.oldest_seq,
                    head_hash: row.head_hash,
                });
                self.alerts(&row.stream_id, alerts);
            }
            Msg::StreamGone(id) => {
                if let Some(state) = self.streams.get_mut(&id) {
                    state.row_visible = false;
                }
            }
            Msg::Grant(g) if Some(g.grantee) == self.me => {
                if let Some(state) = self.streams.get_mut(&g.stream_id) {
                    state.granted = Some(g.subscribe);
                    state.can_ack = g.ack;
                    state.lease_expires_micros = Some(g.expires_at_micros);
                }
            }
            Msg::GrantGone(g) if Some(g.grantee) == self.me => {
                if let Some(state) = self.streams.get_mut(&g.stream_id) {
                    log::warn!("the grant on {} is gone (revoked or expired)", g.stream_id);
                    crate::metrics::lease_ended(&g.stream_id);
                    state.granted = Some(false);
                    state.lease_expires_micros = None;
                }
            }
            Msg::WindowOpen(w) if Some(w.grantee) == self.me => {
                if let Some(state) = self.streams.get_mut(&w.stream_id) {
                    state.opening.remove(&w.bucket);
                    state.open.insert(w.bucket);
                }
            }
            Msg::WindowClosed(w) if Some(w.grantee) == self.me => {
                if let Some(state) = self.streams.get_mut(&w.stream_id) {
                    state.closing.remove(&w.bucket);
                    state.open.remove(&w.bucket);
                    state.mine.remove(&w.bucket);
                }
            }
            Msg::WindowCall { stream_id, bucket, open, result: Err(text) } => {
                if let Some(state) = self.streams.get_mut(&stream_id) {
                    let e = CodedError::parse(&text);
                    log::warn!("{stream_id}: {} window {bucket} failed: {e}", if open { "opening" } else { "closing" });
                    state.opening.remove(&bucket);
                    state.closing.remove(&bucket);
                    state.window_retry_at = Some(Instant::now() + Duration::from_secs(1));
                    if e.code == ErrorCode::ForbiddenStream {
                        crate::metrics::auth_failure("forbidden");
                    }
                    if e.code == ErrorCode::ForbiddenStream && state.row_visible && state.granted != Some(true) {
                        // Only the owner sees a stream without a grant; it sees every
                        // segment without windows too.
                        state.windows_usable = false;
                    }
                }
            }
            Msg::Applied(_) | Msg::WindowOpen(_) | Msg::WindowClosed(_) | Msg::WindowCall { .. } => {}
            Msg::Acked { stream_id, seq, result } => {
                if let Some(state) = self.streams.get_mut(&stream_id) {
                    state.ack_in_flight = false;
                    match result {
                        // A reply from before a rebootstrap does not move the new ack.
                        Ok(()) if seq <= state.durable.seq => state.acked = state.acked.max(seq),
                        Ok(()) => {}
                        Err(text) => {
                            let e = CodedError::parse(&text);
                            log::warn!("ack of {stream_id} at {seq} failed: {e}");
                            if e.code == ErrorCode::ForbiddenStream {
                                crate::metrics::auth_failure("forbidden");
                                state.can_ack = false;
                            }
                        }
                    }
                }
            }
            Msg::Grant(_) | Msg::GrantGone(_) | Msg::Connected(_) | Msg::Hello(_) => {}
        }
        Ok(())
    }

    pub(super) fn alerts(&mut self, stream_id: &str, alerts: Vec<Alert>) {
        let Some(state) = self.streams.get_mut(stream_id) else { return };
        for alert in alerts {
            match alert {
                Alert::Gap { cursor, next_seen } => {
                    // Rows of one window may arrive in any order: wait; if the gap stays,
                    // the windows are reopened (see `maintain_windows`).
                    log::debug!("{stream_id}: waiting for seqs after {cursor} (next seen {next_seen})");
                    state.gap_since.get_or_insert_with(Instant::now);
                }
                Alert::Rebootstrap(stale) => {
                    log::warn!(
                        "{stream_id}: rebootstrap ({:?}): requested {}, oldest available {}, head {}",
                        RebootstrapReason::try_from(stale.reason).unwrap_or_default(),
                        stale.requested,
                        stale.oldest_available,
                        stale.head
                    );
                    state.metrics.rebootstrap(stream_id, stale.reason);
                    state.rebootstrap_due = Some(stale);
                    state.reset_windows = true;
                    state.acked = 0;
                    self.dirty = true;
                }
                Alert::ServerBehind { cursor, head } => {
                    log::warn!("{stream_id}: the server's head {head} is behind the checkpoint {cursor} (it lost commits in a crash); holding");
                    state.behind_since = Some(Instant::now());
                    state.reset_windows = true;
                }
                Alert::Resumed { cursor } => {
                    log::info!("{stream_id}: applying again from {cursor}");
                    state.behind_since = None;
                    state.behind_reported = false;
                    // Segments after the cursor that arrived while held were not kept.
                    state.reset_windows = true;
                }
            }
        }
    }
}

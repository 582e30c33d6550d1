//! The handler's side of one stream: a rebootstrap it has not taken yet, and the backoff
//! after it failed (on an event or on a rebootstrap).

use crate::backoff;
use khala_proto::StaleCursor;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct HandlerRetry {
    /// A rebootstrap the handler must take before anything else of this stream. While
    /// it is pending the durable cursor stays what it was, so a restart tells the
    /// handler again.
    pub rebootstrap_due: Option<StaleCursor>,
    /// The last rebootstrap, kept to tell the handler again (see `StreamState::resume_from`).
    last_stale: Option<StaleCursor>,
    /// Failures in a row (the backoff attempt).
    failures: u32,
    /// Nothing is handed to the handler for this stream before this.
    retry_at: Option<Instant>,
}

impl HandlerRetry {
    /// Failures in a row, on an event or a rebootstrap.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the handler may be called for this stream now.
    pub fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }

    /// The handler failed; `unit` is a draw from `[0, 1)` for the jitter.
    pub fn failed(&mut self, now: Instant, unit: f64) {
        self.retry_at = Some(now + backoff::delay(self.failures, unit));
        self.failures = self.failures.saturating_add(1);
    }

    /// The handler succeeded.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    /// The stream must restart from its floor: the handler is told first.
    pub fn rebootstrap(&mut self, stale: StaleCursor) {
        self.last_stale = Some(stale.clone());
        self.rebootstrap_due = Some(stale);
    }

    /// Tells the handler the last rebootstrap again (when it is not due already).
    pub fn repeat_rebootstrap(&mut self) {
        if self.rebootstrap_due.is_none() {
            self.rebootstrap_due = self.last_stale.clone();
        }
    }

    /// The handler took the rebootstrap.
    pub fn rebootstrapped(&mut self) {
        self.rebootstrap_due = None;
        self.succeeded();
    }
}

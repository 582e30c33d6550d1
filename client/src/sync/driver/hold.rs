//! Waiting on the server: events held behind a missing seq (a gap), and a stream held
//! because the server's head is behind the durable cursor (`server_behind`).

use std::time::{Duration, Instant};

/// How long events may wait behind a missing seq before the windows are reopened.
pub const GAP_PATIENCE: Duration = Duration::from_secs(2);
/// How long a cursor may stand past the head the client knows before the server is
/// reported behind. At a session's start the client knows only the `stream_view` row,
/// whose head is refreshed every 250 ms while the stream is published: the hold that
/// follows is settled as soon as the segment holding the cursor arrives, and a server
/// that lost commits stays behind for longer than this.
pub const BEHIND_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct Hold {
    /// Since when events wait behind a missing seq (or nothing applicable is here
    /// although the head is further on).
    gap_since: Option<Instant>,
    /// Since when the server has been behind the durable cursor.
    behind_since: Option<Instant>,
    /// That hold outlasted [`BEHIND_GRACE`] (and was logged once): the server is behind.
    behind_confirmed: bool,
    /// Whether that hold has outlasted the limit (and was logged once).
    behind_reported: bool,
    /// A gap outlasted [`GAP_PATIENCE`] and the stream has not moved since: the bucket
    /// before the cursor's is opened too (see [`Hold::widened`]).
    widened: bool,
}

impl Hold {
    /// A gap was seen (the first sighting starts the clock).
    pub fn gap(&mut self, now: Instant) {
        self.gap_since.get_or_insert(now);
    }

    /// An event was applied: whatever gap there was has filled.
    pub fn progressed(&mut self) {
        self.gap_since = None;
        self.widened = false;
    }

    /// Whether a gap has lasted past [`GAP_PATIENCE`]; it is then forgotten (the windows
    /// are reopened and the clock starts again if it stays).
    pub fn gap_expired(&mut self, now: Instant) -> bool {
        let expired = self.gap_since.is_some_and(|t| now.saturating_duration_since(t) > GAP_PATIENCE);
        if expired {
            self.gap_since = None;
            self.widened = true;
        }
        expired
    }

    /// Whether the windows should take in the bucket before the cursor's although the
    /// cursor ended a segment: a gap did not fill. Segment boundaries are not fixed: a
    /// server that lost commits gets them published again in the mirror's batches, so
    /// the segment holding the next event may now begin before the cursor, in the bucket
    /// before (a segment spans at most one bucket boundary). Without this such a stream
    /// reopened the same buckets for ever (the driver's proptest found it).
    pub fn widened(&self) -> bool {
        self.widened
    }

    /// A new hold starts: its own grace and its own reports.
    pub fn server_behind(&mut self, now: Instant) {
        self.behind_since = Some(now);
        self.behind_confirmed = false;
        self.behind_reported = false;
    }

    /// The hold ended; returns whether it had been confirmed.
    pub fn resumed(&mut self) -> bool {
        self.behind_since = None;
        self.behind_reported = false;
        std::mem::take(&mut self.behind_confirmed)
    }

    /// Marks a hold longer than [`BEHIND_GRACE`] as confirmed; true the first time only.
    pub fn confirm_behind(&mut self, now: Instant) -> bool {
        first_past(self.behind_since, BEHIND_GRACE, now, &mut self.behind_confirmed)
    }

    /// Whether the server is known to be behind the durable cursor (the hold outlasted
    /// [`BEHIND_GRACE`]).
    pub fn behind_confirmed(&self) -> bool {
        self.behind_confirmed
    }

    /// Marks a hold longer than `limit` as reported; true the first time only.
    pub fn behind_too_long(&mut self, limit: Duration, now: Instant) -> bool {
        first_past(self.behind_since, limit, now, &mut self.behind_reported)
    }

    /// How long the server has been behind, once that is reported.
    pub fn reported_behind_for(&self, now: Instant) -> Option<Duration> {
        self.behind_since.filter(|_| self.behind_reported).map(|t| now.saturating_duration_since(t))
    }
}

/// Whether what began at `since` has lasted past `limit` at `now` for the first time:
/// sets `marked` then, and is false while it stays set.
fn first_past(since: Option<Instant>, limit: Duration, now: Instant, marked: &mut bool) -> bool {
    let over = since.is_some_and(|t| now.saturating_duration_since(t) > limit);
    let first = over && !*marked;
    *marked |= over;
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each hold has its own grace: one that ended without a resume (in a rebootstrap)
    /// left its confirmation behind, and the next hold, such as the brief one at a
    /// session's start, was reported at once.
    #[test]
    fn a_new_hold_starts_its_own_grace() {
        let t0 = Instant::now();
        let mut hold = Hold::default();
        hold.server_behind(t0);
        assert!(!hold.confirm_behind(t0 + BEHIND_GRACE / 2));
        assert!(hold.confirm_behind(t0 + BEHIND_GRACE * 2), "reported once it outlasts the grace");
        assert!(!hold.confirm_behind(t0 + BEHIND_GRACE * 3), "and only once");
        let t1 = t0 + BEHIND_GRACE * 4;
        hold.server_behind(t1);
        assert!(!hold.behind_confirmed(), "a new hold is not confirmed by the one before");
        assert!(!hold.confirm_behind(t1 + BEHIND_GRACE / 2));
        assert!(!hold.resumed(), "resumed within its grace: never reported");
    }
}

//! Acks: telling the server how far this client has durably applied a stream. One ack
//! in flight per stream, always for the newest durable cursor (acks coalesce), never
//! beyond it, and at most one per [`ACK_EVERY`].

use std::time::{Duration, Instant};

/// No ack for this long after a refused one (it would be refused again at once).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The least time between two acks of one stream in a session. Acks feed retention's
/// view of how far clients have got and the ack-lag figures, which move in seconds. Sent
/// after every checkpoint (each 20 ms under load), they were a sixth of the server's CPU
/// at 10 subscribers × 500 events/s (docs/BENCHMARKS.md, "Latency").
pub const ACK_EVERY: Duration = Duration::from_millis(500);
/// An ack unanswered for this long counts as lost (a call the server dropped, e.g.
/// while the module was being republished) and the durable cursor is acked again.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Acks {
    /// The highest seq the server confirmed in this session (0 after a reconnect: the
    /// server may have lost the last ack in a crash before its fsync).
    acked: u64,
    /// The seq of the ack in flight, and when it was sent.
    in_flight: Option<(u64, Instant)>,
    /// When the last ack of this session was sent (none yet: the next goes at once).
    last_sent: Option<Instant>,
    /// A rebootstrap started a new history: no ack until a checkpoint has made a cursor
    /// of that history durable (the old durable cursor belongs to the old one).
    new_history: bool,
    retry_at: Option<Instant>,
}

impl Acks {
    /// The seq to ack now, if any: the durable seq when it is past the last confirmed
    /// one and the last ack is [`ACK_EVERY`] old. The caller checks the grant, the
    /// stream's mode and the `ack` setting.
    pub fn due(&self, durable_seq: u64, now: Instant) -> Option<u64> {
        let answered = self.in_flight.is_none_or(|(_, at)| now.saturating_duration_since(at) > ANSWER_WITHIN);
        let spaced = self.last_sent.is_none_or(|at| now.saturating_duration_since(at) >= ACK_EVERY);
        let idle = answered && spaced && !self.new_history && self.retry_at.is_none_or(|t| t <= now);
        (idle && durable_seq > self.acked).then_some(durable_seq)
    }

    pub fn sent(&mut self, seq: u64, now: Instant) {
        self.in_flight = Some((seq, now));
        self.last_sent = Some(now);
    }

    /// The server's answer to the ack of `seq`; `durable_seq` is the durable cursor now
    /// (a confirmation of an ack from before a rebootstrap moves nothing).
    pub fn answered(&mut self, seq: u64, ok: bool, durable_seq: u64, now: Instant) {
        if self.in_flight.is_some_and(|(s, _)| s == seq) {
            self.in_flight = None;
        }
        if !ok {
            self.retry_at = Some(now + RETRY_AFTER);
        } else if seq <= durable_seq {
            self.acked = self.acked.max(seq);
        }
    }

    /// The session ended: the answer in flight is lost, and the next session acks the
    /// durable cursor again, even on a quiet stream (acks never move back on the server,
    /// so a repeat is a no-op there).
    pub fn reconnected(&mut self) {
        self.acked = 0;
        self.in_flight = None;
        self.last_sent = None;
        self.retry_at = None;
    }

    /// The stream restarts from its floor.
    pub fn rebootstrapped(&mut self) {
        self.acked = 0;
        self.in_flight = None;
        self.last_sent = None;
        self.new_history = true;
    }

    /// A checkpoint made a cursor of the current history durable.
    pub fn durable_again(&mut self) {
        self.new_history = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_spaced_by_ack_every_but_the_first_of_a_session_goes_at_once() {
        let t0 = Instant::now();
        let mut acks = Acks::default();
        assert_eq!(acks.due(5, t0), Some(5));
        acks.sent(5, t0);
        acks.answered(5, true, 5, t0 + Duration::from_millis(2));
        // A newer durable cursor waits out the interval, then the newest one goes.
        assert_eq!(acks.due(9, t0 + Duration::from_millis(20)), None);
        assert_eq!(acks.due(9, t0 + ACK_EVERY - Duration::from_millis(1)), None);
        assert_eq!(acks.due(12, t0 + ACK_EVERY), Some(12));
        acks.sent(12, t0 + ACK_EVERY);
        // A new session acks again at once, even what was confirmed before.
        acks.reconnected();
        assert_eq!(acks.due(12, t0 + ACK_EVERY + Duration::from_millis(1)), Some(12));
    }
}

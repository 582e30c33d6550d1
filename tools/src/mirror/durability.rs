//! From acknowledgements to a durable cursor.
//!
//! A `Committed` reply from SpacetimeDB 1.2.0 is not on disk yet: the server fsyncs its
//! commit log every 500 ms, and a kill -9 loses what was acknowledged since. So an
//! acknowledged `(stream, seq)` only counts as durable once a head read that *started*
//! at least `after` (default 2 s) after the acknowledgement shows `head_seq >= seq`.
//! If the server kept running, that read proves the sync interval has passed since the
//! commit; if it crashed in between, the read shows what survived on disk. A read that
//! shows a head below an earlier acknowledgement is a loss: the caller reconciles and
//! publishes again from the source.
//!
//! Input records are queued in source order with what each needs; the durable cursor is
//! the end of the longest prefix whose needs are all met. Only that cursor is persisted.

use super::source::Mark;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a record needs before the cursor may move past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing more (a dead letter, once the dead-letter file is synced).
    Nothing,
    /// Event `seq` of lane `lane` durable in the module.
    Durable { lane: usize, seq: u64 },
    /// Check `ticket` of lane `lane` (an event the module already held) agreed with the
    /// module (`verify.rs`).
    Verified { lane: usize, ticket: u64 },
}

/// What a head read revealed about one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Fine,
    /// The head is below an acknowledged seq: acknowledged commits were lost.
    Lost { acked: u64, head: u64 },
}

#[derive(Debug, Default)]
struct Lane {
    /// Acknowledged seqs not yet known durable, with when the acknowledgement arrived.
    acks: VecDeque<(u64, Instant)>,
    durable: u64,
    /// Checks up to this ticket agreed.
    verified: u64,
}

/// Acknowledgements, confirmations and the ordered queue behind the durable cursor.
#[derive(Debug)]
pub struct Durability {
    after: Duration,
    lanes: Vec<Lane>,
    queue: VecDeque<(Mark, Need)>,
    cursor: Mark,
}

impl Durability {
    pub fn new(after: Duration, cursor: Mark) -> Durability {
        Durability { after, lanes: Vec::new(), queue: VecDeque::new(), cursor }
    }

    /// Forgets everything after the durable cursor (before a rewind).
    pub fn reset(&mut self) {
        self.lanes.clear();
        self.queue.clear();
    }

    /// Registers a new lane; lanes are numbered in registration order.
    pub fn add_lane(&mut self) -> usize {
        self.lanes.push(Lane::default());
        self.lanes.len() - 1
    }

    /// Queues the record ending at `end`.
    pub fn push(&mut self, end: Mark, need: Need) {
        self.queue.push_back((end, need));
    }

    /// `seq` of `lane` was acknowledged (or seen in a head read) at `at`.
    pub fn ack(&mut self, lane: usize, seq: u64, at: Instant) {
        let state = &mut self.lanes[lane];
        let newest = state.acks.back().map_or(state.durable, |a| a.0);
        if seq > newest {
            state.acks.push_back((seq, at));
        }
    }

    /// Checks of `lane` up to `ticket` agreed with the module.
    pub fn verified(&mut self, lane: usize, ticket: u64) {
        let state = &mut self.lanes[lane];
        state.verified = state.verified.max(ticket);
    }

    /// Whether a head read now could confirm something.
    pub fn check_due(&self, now: Instant) -> bool {
        self.lanes.iter().any(|l| l.acks.front().is_some_and(|(_, at)| *at + self.after <= now))
    }

    /// Whether acknowledgements wait for confirmation.
    pub fn unconfirmed(&self) -> bool {
        self.lanes.iter().any(|l| !l.acks.is_empty())
    }

    /// Applies a head read of `lane` that started at `read_started`.
    pub fn observe(&mut self, lane: usize, head: u64, read_started: Instant) -> Observation {
        let after = self.after;
        let state = &mut self.lanes[lane];
        if let Some(&(acked, _)) = state.acks.iter().rev().find(|(_, at)| *at <= read_started) {
            if head < acked {
                return Observation::Lost { acked, head };
            }
        }
        if head < state.durable {
            return Observation::Lost { acked: state.durable, head };
        }
        while let Some(&(seq, at)) = state.acks.front() {
            if at + after > read_started || seq > head {
                break;
            }
            state.durable = seq;
            state.acks.pop_front();
        }
        Observation::Fine
    }

    /// Moves the cursor past every leading record whose need is met; returns it if it moved.
    pub fn advance(&mut self) -> Option<Mark> {
        let mut moved = None;
        while let Some(&(end, need)) = self.queue.front() {
            let met = match need {
                Need::Nothing => true,
                Need::Durable { lane, seq } => self.lanes[lane].durable >= seq,
                Need::Verified { lane, ticket } => self.lanes[lane].verified >= ticket,
            };
            if !met {
                break;
            }
            self.cursor = end;
            moved = Some(end);
            self.queue.pop_front();
        }
        moved
    }

    pub fn cursor(&self) -> Mark {
        self.cursor
    }

    /// Records read but not yet behind the durable cursor.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// The lane the oldest waiting record belongs to, if any.
    pub fn blocking_lane(&self) -> Option<usize> {
        self.queue.iter().find_map(|(_, need)| match need {
            Need::Durable { lane, .. } | Need::Verified { lane, .. } => Some(*lane),
            Need::Nothing => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(line: u64) -> Mark {
        Mark { segment: 0, offset: line * 10, line }
    }

    #[test]
    fn an_ack_is_durable_only_after_a_late_enough_read() {
        let t0 = Instant::now();
        let after = Duration::from_secs(2);
        let mut d = Durability::new(after, Mark::default());
        let lane = d.add_lane();
        d.push(mark(1), Need::Durable { lane, seq: 1 });
        d.push(mark(2), Need::Nothing);
        d.push(mark(3), Need::Durable { lane, seq: 2 });
        d.ack(lane, 1, t0);
        d.ack(lane, 2, t0 + Duration::from_secs(1));
        assert!(!d.check_due(t0 + Duration::from_millis(1999)));
        assert!(d.check_due(t0 + after));
        // A read that started too early confirms nothing, even with the head past both.
        assert_eq!(d.observe(lane, 2, t0 + Duration::from_millis(1500)), Observation::Fine);
        assert_eq!(d.advance(), None);
        assert_eq!(d.observe(lane, 2, t0 + after), Observation::Fine);
        assert_eq!(d.advance(), Some(mark(2)));
        assert!(d.unconfirmed());
        assert_eq!(d.observe(lane, 2, t0 + Duration::from_secs(3)), Observation::Fine);
        assert_eq!(d.advance(), Some(mark(3)));
        assert!(!d.unconfirmed());
        assert_eq!(d.cursor(), mark(3));
    }

    #[test]
    fn a_head_below_an_ack_is_a_loss() {
        let t0 = Instant::now();
        let mut d = Durability::new(Duration::from_secs(2), Mark::default());
        let lane = d.add_lane();
        d.ack(lane, 10, t0);
        d.ack(lane, 20, t0 + Duration::from_millis(100));
        // Acks that arrived after the read started do not count against it.
        assert_eq!(d.observe(lane, 10, t0 + Duration::from_millis(50)), Observation::Fine);
        assert_eq!(d.observe(lane, 12, t0 + Duration::from_millis(200)), Observation::Lost { acked: 20, head: 12 });
        assert_eq!(d.observe(lane, 20, t0 + Duration::from_secs(3)), Observation::Fine);
        // Below what was confirmed durable: reported, never silently accepted.
        assert_eq!(d.observe(lane, 5, t0 + Duration::from_secs(4)), Observation::Lost { acked: 20, head: 5 });
    }

    #[test]
    fn a_waiting_record_blocks_the_ones_behind_it() {
        let t0 = Instant::now();
        let mut d = Durability::new(Duration::ZERO, Mark::default());
        let (a, b) = (d.add_lane(), d.add_lane());
        d.push(mark(1), Need::Durable { lane: a, seq: 1 });
        d.push(mark(2), Need::Durable { lane: b, seq: 1 });
        d.ack(b, 1, t0);
        d.observe(b, 1, t0);
        assert_eq!(d.advance(), None);
        assert_eq!(d.blocking_lane(), Some(a));
        d.ack(a, 1, t0);
        d.observe(a, 1, t0);
        assert_eq!(d.advance(), Some(mark(2)));
        assert_eq!(d.pending(), 0);
        d.reset();
        assert_eq!(d.cursor(), mark(2));
    }

    #[test]
    fn an_unchecked_duplicate_blocks_the_cursor_until_it_agrees() {
        let mut d = Durability::new(Duration::ZERO, Mark::default());
        let lane = d.add_lane();
        d.push(mark(1), Need::Verified { lane, ticket: 1 });
        d.push(mark(2), Need::Verified { lane, ticket: 2 });
        assert_eq!(d.advance(), None);
        d.verified(lane, 1);
        assert_eq!(d.advance(), Some(mark(1)));
        assert_eq!(d.blocking_lane(), Some(lane));
        d.verified(lane, 2);
        assert_eq!(d.advance(), Some(mark(2)));
    }
}

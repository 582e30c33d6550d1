//! Divergence checks: an authority event at a seq the module already holds must be the
//! event the module holds there.
//!
//! Reconciliation skips what the module has (`seq <= head`). Skipping blindly would let a
//! rogue or buggy write stand in for the authority's event for ever, so each skipped event
//! leaves a [`Fingerprint`] (seq, kind, payload hash) here. The loop fetches the module's
//! segments for a lane's pending range in one read and [`compare`]s; a mismatch is
//! `authority_divergence`, named with both hashes, and holds the stream. The durable
//! cursor never passes an event whose check has not come back (`Need::Verified`), so a
//! crash cannot lose a check either.
//!
//! Only the duplicate path pays: an event the mirror publishes is never checked here
//! (the module computes its hashes from what was sent).

use khala_proto::hash::{display, payload_hash, Hash32};
use khala_proto::SegmentEvent;
use std::collections::{BTreeMap, BTreeSet};

/// What one event is, for comparing: seq, kind and payload hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub seq: u64,
    pub kind: String,
    pub payload_hash: Hash32,
}

impl Fingerprint {
    pub fn of(seq: u64, kind: &str, payload: &[u8]) -> Fingerprint {
        Fingerprint { seq, kind: kind.to_string(), payload_hash: payload_hash(payload) }
    }

    pub fn of_segment_event(event: &SegmentEvent) -> Fingerprint {
        Fingerprint::of(event.seq, &event.kind, &event.payload)
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.kind, display(&self.payload_hash))
    }
}

/// The module's side of a check: its events in the range read, and the stream's bounds.
#[derive(Debug, Default)]
pub struct ModuleRange {
    pub events: BTreeMap<u64, Fingerprint>,
    /// Seqs where the module holds a gap marker this mirror's identity published
    /// (`--on-gap skip`): the authority's event there was missing or refused, and a copy of
    /// it read again later (a reconcile, a restart, a late arrival) stays behind the marker.
    pub own_markers: BTreeSet<u64>,
    /// Lowest retained seq (`oldest_seq`); below it nothing can be compared.
    pub oldest_seq: u64,
    pub head_seq: u64,
}

/// An authority event and the module's event at the same seq differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub seq: u64,
    pub authority: Fingerprint,
    pub module: Fingerprint,
}

impl Divergence {
    /// `seq=.. authority=<kind>/blake3:.. module=<kind>/blake3:..`, the machine-readable
    /// fields of an `authority_divergence` message.
    pub fn fields(&self) -> String {
        format!("seq={} authority={} module={}", self.seq, self.authority.describe(), self.module.describe())
    }
}

/// What a check of pending fingerprints (in the order they were read) found: the first
/// `agreed` match (or lie below the retention floor, counted in `below_floor`); then, if
/// any, the one at `agreed` is why the check stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub agreed: usize,
    pub below_floor: u64,
    /// Of `agreed`, events whose seq holds one of the mirror's own gap markers.
    pub behind_markers: u64,
    pub stop: Option<Stop>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Diverged(Divergence),
    /// The module no longer holds a seq it held at the heads read: a server crash lost
    /// commits since. Reconcile (the event is republished), then check again.
    Missing { seq: u64 },
}

/// Compares the authority's fingerprints with the module's range, stopping at the first
/// that does not agree.
pub fn compare(expected: &[Fingerprint], module: &ModuleRange) -> Verdict {
    let mut below_floor = 0;
    let mut behind_markers = 0;
    for (i, want) in expected.iter().enumerate() {
        if want.seq < module.oldest_seq && want.seq <= module.head_seq {
            below_floor += 1;
            continue;
        }
        let stop = match module.events.get(&want.seq) {
            Some(have) if have == want => continue,
            Some(_) if module.own_markers.contains(&want.seq) => {
                behind_markers += 1;
                continue;
            }
            Some(have) => Stop::Diverged(Divergence { seq: want.seq, authority: want.clone(), module: have.clone() }),
            None => Stop::Missing { seq: want.seq },
        };
        return Verdict { agreed: i, below_floor, behind_markers, stop: Some(stop) };
    }
    Verdict { agreed: expected.len(), below_floor, behind_markers, stop: None }
}

/// Checks waiting per lane, numbered by tickets so the durable cursor can wait for them.
#[derive(Debug, Default)]
pub struct Pending {
    lanes: Vec<LaneChecks>,
}

#[derive(Debug, Default)]
struct LaneChecks {
    /// `(ticket, fingerprint)` in read order.
    waiting: Vec<(u64, Fingerprint)>,
    issued: u64,
    /// The module is known to hold the stream through this seq (the head read at the
    /// reconcile, then each committed batch). A duplicate of an event still in flight is
    /// checked only once its batch committed.
    held_through: u64,
}

impl Pending {
    /// Forgets everything (lanes are renumbered at a reconcile).
    pub fn clear(&mut self) {
        self.lanes.clear();
    }

    fn lane(&mut self, lane: usize) -> &mut LaneChecks {
        if self.lanes.len() <= lane {
            self.lanes.resize_with(lane + 1, LaneChecks::default);
        }
        &mut self.lanes[lane]
    }

    /// Queues a check on `lane`; returns its ticket (1, 2, ...).
    pub fn expect(&mut self, lane: usize, fingerprint: Fingerprint) -> u64 {
        let checks = self.lane(lane);
        checks.issued += 1;
        let ticket = checks.issued;
        checks.waiting.push((ticket, fingerprint));
        ticket
    }

    /// The module holds `lane`'s stream through `seq`.
    pub fn module_holds(&mut self, lane: usize, seq: u64) {
        let checks = self.lane(lane);
        checks.held_through = checks.held_through.max(seq);
    }

    /// Lanes with checks waiting, and how many.
    pub fn waiting(&self) -> Vec<(usize, usize)> {
        self.lanes.iter().enumerate().filter(|(_, c)| !c.waiting.is_empty()).map(|(i, c)| (i, c.waiting.len())).collect()
    }

    /// Whether `lane` has a check that can be made now waiting (see [`Pending::ready`]):
    /// it publishes nothing more until it agrees, so the authority's events are never
    /// chained onto an event that is not theirs. A check of an event the lane itself still
    /// has to send (the input repeated a queued event) does not block: it can only be
    /// made once that event is sent and committed, so blocking on it hung the mirror.
    pub fn blocks(&self, lane: usize) -> bool {
        self.lanes.get(lane).and_then(|c| c.waiting.first().map(|(_, f)| f.seq <= c.held_through)).unwrap_or(false)
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|c| c.waiting.is_empty())
    }

    /// The fingerprints waiting on `lane` that can be checked now, in read order: the
    /// leading run of seqs the module is known to hold.
    pub fn ready(&self, lane: usize) -> Vec<Fingerprint> {
        let Some(checks) = self.lanes.get(lane) else { return Vec::new() };
        checks.waiting.iter().take_while(|(_, f)| f.seq <= checks.held_through).map(|(_, f)| f.clone()).collect()
    }

    /// Drops the first `n` checks of `lane` (they agreed); returns the last ticket dropped.
    pub fn settle(&mut self, lane: usize, n: usize) -> Option<u64> {
        let checks = self.lane(lane);
        let done: Vec<(u64, Fingerprint)> = checks.waiting.drain(..n.min(checks.waiting.len())).collect();
        done.last().map(|(ticket, _)| *ticket)
    }

    /// Drops every check of `lane` (the lane is held: its cursor stops anyway).
    pub fn abandon(&mut self, lane: usize) {
        self.lane(lane).waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(seq: u64, payload: &str) -> Fingerprint {
        Fingerprint::of(seq, "k", payload.as_bytes())
    }

    fn module(events: &[(u64, &str)], oldest_seq: u64, head_seq: u64) -> ModuleRange {
        ModuleRange { events: events.iter().map(|(s, p)| (*s, fp(*s, p))).collect(), own_markers: BTreeSet::new(), oldest_seq, head_seq }
    }

    #[test]
    fn an_event_behind_the_mirrors_own_gap_marker_agrees_and_anothers_marker_diverges() {
        let mut m = module(&[(1, "a"), (3, "c")], 1, 3);
        m.events.insert(2, Fingerprint::of(2, crate::mirror::event::GAP_KIND, br#"{"reason":"payload_too_large","seq":2,"topic":"t"}"#));
        // Another publisher's marker (or one before the token's rotation): a divergence.
        assert!(matches!(compare(&[fp(1, "a"), fp(2, "b"), fp(3, "c")], &m), Verdict { agreed: 1, stop: Some(Stop::Diverged(_)), .. }));
        m.own_markers.insert(2);
        assert_eq!(compare(&[fp(1, "a"), fp(2, "b"), fp(3, "c")], &m), Verdict { agreed: 3, below_floor: 0, behind_markers: 1, stop: None });
    }

    #[test]
    fn only_a_check_the_module_can_answer_blocks_its_lane() {
        let mut pending = Pending::default();
        pending.module_holds(0, 4);
        // A repeat of seq 6, still queued on the lane: the lane must go on to send it.
        pending.expect(0, fp(6, "f"));
        assert!(!pending.blocks(0) && pending.ready(0).is_empty());
        // Once its batch committed the check is made, and the lane waits for it.
        pending.module_holds(0, 8);
        assert!(pending.blocks(0));
        assert_eq!(pending.ready(0), vec![fp(6, "f")]);
        assert_eq!(pending.settle(0, 1), Some(1));
        assert!(!pending.blocks(0));
        // A repeat of an event the module held at the reconcile blocks at once.
        pending.expect(1, fp(2, "b"));
        pending.module_holds(1, 3);
        assert!(pending.blocks(1));
    }

    #[test]
    fn equal_events_agree_and_trimmed_ones_are_counted_apart() {
        let m = module(&[(3, "c"), (4, "d")], 3, 4);
        let verdict = compare(&[fp(1, "a"), fp(2, "b"), fp(3, "c"), fp(4, "d")], &m);
        assert_eq!(verdict, Verdict { agreed: 4, below_floor: 2, behind_markers: 0, stop: None });
    }

    #[test]
    fn another_payload_or_kind_is_a_divergence_with_both_sides() {
        let m = module(&[(1, "a"), (2, "rogue")], 1, 2);
        let Verdict { agreed, stop: Some(Stop::Diverged(d)), .. } = compare(&[fp(1, "a"), fp(2, "b")], &m) else { panic!() };
        assert_eq!(agreed, 1);
        assert_eq!(d.seq, 2);
        assert_eq!(d.authority, fp(2, "b"));
        assert_eq!(d.module, fp(2, "rogue"));
        assert!(d.fields().starts_with("seq=2 authority=k/blake3:"));
        let other_kind = ModuleRange { events: [(1, Fingerprint::of(1, "other", b"a"))].into_iter().collect(), own_markers: BTreeSet::new(), oldest_seq: 1, head_seq: 1 };
        assert!(matches!(compare(&[fp(1, "a")], &other_kind), Verdict { agreed: 0, stop: Some(Stop::Diverged(_)), .. }));
    }

    #[test]
    fn a_seq_above_the_head_is_missing_not_trimmed() {
        let m = module(&[(1, "a")], 1, 1);
        assert_eq!(compare(&[fp(1, "a"), fp(2, "b")], &m), Verdict { agreed: 1, below_floor: 0, behind_markers: 0, stop: Some(Stop::Missing { seq: 2 }) });
        // An empty stream (oldest 1, head 0) holds nothing to compare: missing.
        assert_eq!(compare(&[fp(1, "a")], &module(&[], 1, 0)), Verdict { agreed: 0, below_floor: 0, behind_markers: 0, stop: Some(Stop::Missing { seq: 1 }) });
    }

    #[test]
    fn tickets_settle_in_order() {
        let mut p = Pending::default();
        assert_eq!(p.expect(2, fp(1, "a")), 1);
        assert_eq!(p.expect(2, fp(2, "b")), 2);
        assert_eq!(p.waiting(), vec![(2, 2)]);
        assert!(p.ready(2).is_empty(), "nothing is known held yet");
        p.module_holds(2, 1);
        assert_eq!(p.ready(2), vec![fp(1, "a")]);
        p.module_holds(2, 2);
        assert_eq!(p.settle(2, 1), Some(1));
        assert_eq!(p.ready(2), vec![fp(2, "b")]);
        p.abandon(2);
        assert!(p.is_empty());
        assert_eq!(p.settle(0, 5), None);
    }
}

//! Replay slots: how many streams may catch up at once.
//!
//! A stream that is catching up keeps [`MAX_WANTED`](super::windows::MAX_WANTED) buckets
//! of segments open, all of them full, and the SDK holds each row twice (its bytes and
//! the decoded row) besides the client's own copy: about 50–65 MB per stream at 256-byte
//! payloads. A client of many streams that starts far behind on all of them would hold
//! that for every stream at once. So only the streams holding a slot keep windows while
//! they catch up; the others close theirs and wait their turn. A stream that is caught
//! up (its backlog within the buckets a live stream keeps open) needs no slot, so live
//! events keep flowing to every stream that has them.
//!
//! Slots are handed out in stream id order and kept until the holder has caught up (or
//! can no longer subscribe), so a replay is never cut off half way and every stream
//! waiting gets one in turn. A holder that is stuck (its handler keeps failing, or the
//! segment it needs next is corrupt) gives its slot to a stream that waits and is not;
//! it gets one again once it is unstuck, or once no other stream waits. One stuck stream
//! held the only slot for good, and every other stream far behind waited for ever.

use std::collections::BTreeSet;

/// The streams holding a replay slot.
#[derive(Debug)]
pub struct ReplaySlots {
    /// Streams that may catch up at once; 0 for no limit.
    limit: usize,
    holders: BTreeSet<String>,
}

impl ReplaySlots {
    pub fn new(limit: usize) -> Self {
        ReplaySlots { limit, holders: BTreeSet::new() }
    }

    /// Hands out the slots for this round, given each stream that can use windows,
    /// whether it is catching up and whether it is stuck (in stream id order): a holder
    /// that no longer catches up gives its slot back, and so does a stuck one while a
    /// stream that is not stuck waits; then free slots go to the first streams waiting,
    /// those not stuck first.
    pub fn assign<'a>(&mut self, streams: impl IntoIterator<Item = (&'a str, bool, bool)>) {
        let catching_up: Vec<(&str, bool)> = streams.into_iter().filter(|(_, behind, _)| *behind).map(|(id, _, stuck)| (id, stuck)).collect();
        let able_waits = catching_up.iter().any(|(id, stuck)| !stuck && !self.holders.contains(*id));
        self.holders.retain(|holder| catching_up.iter().any(|(id, stuck)| id == holder && !(*stuck && able_waits)));
        for take_stuck in [false, true] {
            for (id, stuck) in &catching_up {
                if self.limit != 0 && self.holders.len() >= self.limit {
                    return;
                }
                if *stuck == take_stuck {
                    self.holders.insert(id.to_string());
                }
            }
        }
    }

    /// Whether `stream_id` may keep windows while it catches up.
    pub fn holds(&self, stream_id: &str) -> bool {
        self.limit == 0 || self.holders.contains(stream_id)
    }

    /// Whether `stream_id`, catching up or not, waits for a slot (and keeps no windows).
    pub fn waits(&self, stream_id: &str, catching_up: bool) -> bool {
        catching_up && !self.holds(stream_id)
    }

    /// The streams holding a slot now.
    pub fn holders(&self) -> impl Iterator<Item = &str> {
        self.holders.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(slots: &ReplaySlots) -> Vec<&str> {
        slots.holders().collect()
    }

    #[test]
    fn slots_go_in_order_and_are_kept_until_the_holder_caught_up() {
        let mut slots = ReplaySlots::new(1);
        slots.assign([("a", true, false), ("b", true, false), ("c", true, false)]);
        assert_eq!(holders(&slots), ["a"]);
        assert!(slots.holds("a") && !slots.holds("b"));
        // `c` is first in no order but its own: the holder keeps the slot.
        slots.assign([("a", true, false), ("b", true, false), ("c", true, false)]);
        assert_eq!(holders(&slots), ["a"]);
        slots.assign([("a", false, false), ("b", true, false), ("c", true, false)]);
        assert_eq!(holders(&slots), ["b"]);
        // A stream that falls behind again waits for the holder.
        slots.assign([("a", true, false), ("b", true, false), ("c", true, false)]);
        assert_eq!(holders(&slots), ["b"]);
        // A holder that can no longer use windows (not listed) gives its slot back.
        slots.assign([("a", true, false), ("c", true, false)]);
        assert_eq!(holders(&slots), ["a"]);
    }

    #[test]
    fn a_stuck_holder_gives_its_slot_to_a_stream_that_is_not() {
        let mut slots = ReplaySlots::new(1);
        slots.assign([("a", true, false), ("b", true, false)]);
        assert_eq!(holders(&slots), ["a"]);
        // `a`'s handler keeps failing: `b` goes on meanwhile.
        slots.assign([("a", true, true), ("b", true, false)]);
        assert_eq!(holders(&slots), ["b"]);
        // Unstuck, `a` waits its turn; once `b` has caught up it is `a`'s again.
        slots.assign([("a", true, false), ("b", true, false)]);
        assert_eq!(holders(&slots), ["b"]);
        slots.assign([("a", true, true), ("b", false, false)]);
        assert_eq!(holders(&slots), ["a"], "stuck, but no other stream waits");
        // Two stuck streams keep the one they have.
        slots.assign([("a", true, true), ("b", true, true)]);
        assert_eq!(holders(&slots), ["a"]);
    }

    #[test]
    fn two_slots_and_no_limit() {
        let mut two = ReplaySlots::new(2);
        two.assign([("a", true, false), ("b", false, false), ("c", true, false), ("d", true, false)]);
        assert_eq!(holders(&two), ["a", "c"]);
        let mut all = ReplaySlots::new(0);
        all.assign([("a", true, false), ("b", true, false)]);
        assert!(all.holds("a") && all.holds("b") && all.holds("z"));
    }
}

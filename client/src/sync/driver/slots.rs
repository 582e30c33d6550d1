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
//! waiting gets one in turn.

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

    /// Hands out the slots for this round, given each stream that can use windows and
    /// whether it is catching up (in stream id order): a holder that no longer is gives
    /// its slot back, then free slots go to the first streams waiting.
    pub fn assign<'a>(&mut self, streams: impl IntoIterator<Item = (&'a str, bool)>) {
        let catching_up: Vec<&str> = streams.into_iter().filter(|(_, behind)| *behind).map(|(id, _)| id).collect();
        self.holders.retain(|id| catching_up.contains(&id.as_str()));
        for id in catching_up {
            if self.limit != 0 && self.holders.len() >= self.limit {
                break;
            }
            self.holders.insert(id.to_string());
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
        slots.assign([("a", true), ("b", true), ("c", true)]);
        assert_eq!(holders(&slots), ["a"]);
        assert!(slots.holds("a") && !slots.holds("b"));
        // `c` is first in no order but its own: the holder keeps the slot.
        slots.assign([("a", true), ("b", true), ("c", true)]);
        assert_eq!(holders(&slots), ["a"]);
        slots.assign([("a", false), ("b", true), ("c", true)]);
        assert_eq!(holders(&slots), ["b"]);
        // A stream that falls behind again waits for the holder.
        slots.assign([("a", true), ("b", true), ("c", true)]);
        assert_eq!(holders(&slots), ["b"]);
        // A holder that can no longer use windows (not listed) gives its slot back.
        slots.assign([("a", true), ("c", true)]);
        assert_eq!(holders(&slots), ["a"]);
    }

    #[test]
    fn two_slots_and_no_limit() {
        let mut two = ReplaySlots::new(2);
        two.assign([("a", true), ("b", false), ("c", true), ("d", true)]);
        assert_eq!(holders(&two), ["a", "c"]);
        let mut all = ReplaySlots::new(0);
        all.assign([("a", true), ("b", true)]);
        assert!(all.holds("a") && all.holds("b") && all.holds("z"));
    }
}

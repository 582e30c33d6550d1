//! [`Pending`]: the verified events a stream holds after its cursor, by seq.
//!
//! Events arrive almost always in runs of consecutive seqs and leave from the front, one
//! at a time. A `BTreeMap<u64, Event>` shifted its node's events on every removal from
//! the front (the replay profile's largest memmove); a ring indexed by `seq - base` reads,
//! adds and removes in O(1) and moves nothing.

use super::Event;
use std::collections::VecDeque;

/// Widest span of seqs held at once (first to last, gaps included). Past it, later
/// events are refused (never skipped: they are fetched again after the resubscribe).
pub const MAX_SPAN: u64 = 200_000;

/// Buffered events by seq. Invariant: when not empty, the first slot holds an event.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// Seq of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Event>>,
    len: usize,
}

impl Pending {
    /// Events held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The lowest seq held.
    pub fn first_seq(&self) -> Option<u64> {
        (!self.slots.is_empty()).then_some(self.base)
    }

    pub fn get(&self, seq: u64) -> Option<&Event> {
        let index = seq.checked_sub(self.base)?;
        self.slots.get(usize::try_from(index).ok()?)?.as_ref()
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Whether an event at `seq` can be held without stretching the span past
    /// [`MAX_SPAN`].
    pub fn fits(&self, seq: u64) -> bool {
        let Some(last) = (self.slots.len() as u64).checked_sub(1).map(|n| self.base + n) else { return true };
        seq.max(last) - seq.min(self.base) < MAX_SPAN
    }

    /// Holds `event` at `event.seq` (replacing what was there); `false`, holding
    /// nothing, when it does not [`fit`](Pending::fits).
    pub fn insert(&mut self, event: Event) -> bool {
        let seq = event.seq;
        if !self.fits(seq) {
            return false;
        }
        if self.slots.is_empty() {
            self.base = seq;
            self.slots.push_back(Some(event));
            self.len = 1;
            return true;
        }
        if seq < self.base {
            for _ in seq + 1..self.base {
                self.slots.push_front(None);
            }
            self.slots.push_front(Some(event));
            self.base = seq;
            self.len += 1;
            return true;
        }
        let index = (seq - self.base) as usize;
        if index >= self.slots.len() {
            self.slots.resize(index + 1, None);
        }
        if self.slots[index].replace(event).is_none() {
            self.len += 1;
        }
        true
    }

    /// Takes the event at `seq` if it is the first one held.
    pub fn pop_first(&mut self, seq: u64) -> Option<Event> {
        if self.slots.is_empty() || seq != self.base {
            return None;
        }
        let event = self.slots.pop_front().flatten();
        self.len -= 1;
        self.base += 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        event
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use khala_proto::hash::GENESIS;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn event(seq: u64) -> Event {
        Event {
            stream_id: "s".into(),
            epoch: 1,
            seq,
            kind: "k".into(),
            payload: seq.to_be_bytes().to_vec().into(),
            chain_hash: GENESIS,
            prev_chain: GENESIS,
            occurred_at_micros: 0,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        PopFirst,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1u64..400).prop_map(Op::Insert),
            // Far seqs exercise the span limit.
            1 => (MAX_SPAN - 50..MAX_SPAN + 450).prop_map(Op::Insert),
            4 => Just(Op::PopFirst),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// The ring answers every question as a `BTreeMap` holding the same events would,
        /// except that it refuses what would stretch it past `MAX_SPAN`.
        #[test]
        fn behaves_as_a_sorted_map_within_its_span(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ring = Pending::default();
            let mut model: BTreeMap<u64, Event> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(seq) => {
                        let lo = model.keys().next().copied().unwrap_or(seq).min(seq);
                        let hi = model.keys().last().copied().unwrap_or(seq).max(seq);
                        let fits = hi - lo < MAX_SPAN;
                        prop_assert_eq!(ring.fits(seq), fits);
                        prop_assert_eq!(ring.insert(event(seq)), fits);
                        if fits {
                            model.insert(seq, event(seq));
                        }
                    }
                    Op::PopFirst => {
                        let first = model.keys().next().copied();
                        // Popping any other seq takes nothing.
                        prop_assert_eq!(ring.pop_first(first.unwrap_or(0) + 1).is_some(), false);
                        prop_assert_eq!(ring.pop_first(first.unwrap_or(0)), first.and_then(|s| model.remove(&s)));
                    }
                    Op::Clear => {
                        ring.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(ring.len(), model.len());
                prop_assert_eq!(ring.first_seq(), model.keys().next().copied());
                for seq in 0..420 {
                    prop_assert_eq!(ring.get(seq), model.get(&seq));
                }
            }
        }
    }
}

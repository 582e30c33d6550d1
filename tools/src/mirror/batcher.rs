//! Per-stream lanes: the events waiting to be published on each stream, the next seq the
//! stream expects, whether a batch of it is in flight, and whether it is held.
//!
//! A lane sends one batch at a time, so a stream's events reach the module in order; a
//! batch leaves when it is full (`--batch-events`, or [`MAX_REQUEST_BYTES`] of request),
//! when its oldest event has waited `--batch-ms`, or when the input is drained.

use super::event::Event;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most bytes of JSON request in one batch: the server refuses request bodies over 2 MiB
/// (HTTP 413), and the JSON carries each payload in hex, twice its size.
pub const MAX_REQUEST_BYTES: usize = 1_500_000;

/// One stream's lane.
#[derive(Debug)]
pub struct Lane {
    pub stream_id: String,
    pub topic: String,
    /// The seq the next queued event must have (head + 1 + events queued or sent).
    pub next: u64,
    pub queue: VecDeque<Event>,
    /// When the oldest queued event arrived.
    pub waiting_since: Option<Instant>,
    pub in_flight: bool,
    /// Why the lane publishes nothing more, if it is held.
    pub held: Option<String>,
    /// Lowered when the module says a batch is too large.
    pub max_batch: usize,
}

/// Every lane of the current pass over the source.
#[derive(Debug, Default)]
pub struct Lanes {
    lanes: Vec<Lane>,
    by_stream: HashMap<String, usize>,
    queued: usize,
}

impl Lanes {
    pub fn clear(&mut self) {
        *self = Lanes::default();
    }

    pub fn find(&self, stream_id: &str) -> Option<usize> {
        self.by_stream.get(stream_id).copied()
    }

    /// Adds a lane expecting `next`; lanes are numbered in the order they are added.
    pub fn add(&mut self, stream_id: &str, topic: &str, next: u64, max_batch: usize) -> usize {
        let index = self.lanes.len();
        self.lanes.push(Lane {
            stream_id: stream_id.into(),
            topic: topic.into(),
            next,
            queue: VecDeque::new(),
            waiting_since: None,
            in_flight: false,
            held: None,
            max_batch,
        });
        self.by_stream.insert(stream_id.into(), index);
        index
    }

    pub fn lane(&self, index: usize) -> &Lane {
        &self.lanes[index]
    }

    pub fn lane_mut(&mut self, index: usize) -> &mut Lane {
        &mut self.lanes[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &Lane)> {
        self.lanes.iter().enumerate()
    }

    /// Queues `event` (whose seq is the lane's `next`) and moves `next` on.
    pub fn push(&mut self, index: usize, event: Event, now: Instant) {
        let lane = &mut self.lanes[index];
        debug_assert_eq!(event.seq, lane.next);
        lane.next = event.seq + 1;
        lane.waiting_since.get_or_insert(now);
        lane.queue.push_back(event);
        self.queued += 1;
    }

    /// Puts `events` back at the front of a lane's queue, in order (after a failed batch).
    pub fn requeue_front(&mut self, index: usize, events: Vec<Event>, now: Instant) {
        let lane = &mut self.lanes[index];
        self.queued += events.len();
        for event in events.into_iter().rev() {
            lane.queue.push_front(event);
        }
        if !lane.queue.is_empty() {
            lane.waiting_since.get_or_insert(now);
        }
    }

    /// Drops everything queued on a lane (when it becomes held); returns how many.
    pub fn drop_queue(&mut self, index: usize) -> usize {
        let lane = &mut self.lanes[index];
        let dropped = lane.queue.len();
        lane.queue.clear();
        lane.waiting_since = None;
        self.queued -= dropped;
        dropped
    }

    /// Events queued on all lanes.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Lanes with a batch to send now: not in flight, and full, or waited long enough,
    /// or `flush` (the input is drained). Longest waiting first, so that no stream
    /// starves and the durable cursor, which waits for the slowest stream, keeps moving.
    pub fn ready(&self, now: Instant, batch_events: usize, batch_wait: Duration, flush: bool) -> Vec<usize> {
        let mut ready: Vec<(Instant, usize)> = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.in_flight && !l.queue.is_empty())
            .filter(|(_, l)| flush || l.queue.len() >= batch_events.min(l.max_batch) || l.waiting_since.is_some_and(|t| now.duration_since(t) >= batch_wait))
            .map(|(i, l)| (l.waiting_since.unwrap_or(now), i))
            .collect();
        ready.sort_unstable();
        ready.into_iter().map(|(_, i)| i).collect()
    }

    /// Takes the next batch of a lane: at most `batch_events` events and, past the first,
    /// at most [`MAX_REQUEST_BYTES`] of request.
    pub fn take_batch(&mut self, index: usize, batch_events: usize, now: Instant) -> Vec<Event> {
        let lane = &mut self.lanes[index];
        let limit = batch_events.min(lane.max_batch).max(1);
        let mut batch = Vec::with_capacity(limit.min(lane.queue.len()));
        let mut bytes = 0;
        while let Some(event) = lane.queue.front() {
            if batch.len() >= limit || (!batch.is_empty() && bytes + event.request_bytes() > MAX_REQUEST_BYTES) {
                break;
            }
            bytes += event.request_bytes();
            batch.extend(lane.queue.pop_front());
        }
        lane.waiting_since = if lane.queue.is_empty() { None } else { Some(now) };
        self.queued -= batch.len();
        batch
    }

    /// `(stream, reason)` of every held lane.
    pub fn held(&self) -> Vec<(String, String)> {
        self.lanes.iter().filter_map(|l| l.held.clone().map(|why| (l.stream_id.clone(), why))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::source::Origin;

    fn event(seq: u64, bytes: usize) -> Event {
        Event {
            stream_id: "s".into(),
            topic: "t".into(),
            seq,
            kind: "k".into(),
            payload: vec![b'x'; bytes],
            occurred_at_micros: 0,
            origin: Origin::Line(seq),
        }
    }

    #[test]
    fn batches_by_count_time_bytes_and_flush() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(50);
        let mut lanes = Lanes::default();
        let lane = lanes.add("s", "t", 1, usize::MAX);
        for seq in 1..=3 {
            lanes.push(lane, event(seq, 10), t0);
        }
        assert!(lanes.ready(t0, 4, wait, false).is_empty());
        assert_eq!(lanes.ready(t0 + wait, 4, wait, false), vec![lane]);
        assert_eq!(lanes.ready(t0, 4, wait, true), vec![lane]);
        lanes.push(lane, event(4, 10), t0);
        assert_eq!(lanes.ready(t0, 4, wait, false), vec![lane]);
        let batch = lanes.take_batch(lane, 3, t0);
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!((lanes.queued(), lanes.lane(lane).next), (1, 5));
        lanes.requeue_front(lane, batch, t0);
        assert_eq!(lanes.lane(lane).queue.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        lanes.drop_queue(lane);
        assert_eq!(lanes.queued(), 0);

        // The lane that waited longest goes first.
        let other = lanes.add("s2", "t2", 1, usize::MAX);
        lanes.push(other, Event { stream_id: "s2".into(), ..event(1, 10) }, t0);
        lanes.push(lane, event(5, 10), t0 + wait);
        assert_eq!(lanes.ready(t0 + wait, 4, wait, true), vec![other, lane]);
        lanes.take_batch(lane, 10, t0);

        lanes.push(lane, event(6, MAX_REQUEST_BYTES / 2 - 100), t0);
        lanes.push(lane, event(7, 10), t0);
        assert_eq!(lanes.take_batch(lane, 100, t0).len(), 1);
        assert_eq!(lanes.take_batch(lane, 100, t0).len(), 1);
    }
}

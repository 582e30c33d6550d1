//! [`StreamEngine`]: the state machine of one stream's cursor.

use khala_proto::hash::{Hash32, GENESIS};
use khala_proto::segment::EventView;
use khala_proto::v1::RebootstrapReason;
use khala_proto::{StaleCursor, StreamCursor};
use super::pending::Pending;
use std::collections::BTreeSet;

/// The server's view of a stream: its `stream_view` row, whose head the module refreshes
/// every `VIEW_EVERY` (250 ms) while the stream is published.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    pub epoch: u32,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub head_hash: Hash32,
}

/// One segment as the transport received it, with the chain hash after each of its
/// events computed by [`SegmentIn::new`] (which may run on another thread: hashing is
/// the costly part of applying).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentIn {
    pub epoch: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub prev_hash: Hash32,
    pub last_hash: Hash32,
    pub events: Vec<EventView>,
    chains: Vec<Hash32>,
}

impl SegmentIn {
    pub fn new(stream_id: &str, epoch: u32, first_seq: u64, last_seq: u64, prev_hash: Hash32, last_hash: Hash32, events: Vec<EventView>) -> Self {
        let mut chain = prev_hash;
        let chains = events
            .iter()
            .map(|e| {
                chain = e.chain(&chain, stream_id);
                chain
            })
            .collect();
        SegmentIn { epoch, first_seq, last_seq, prev_hash, last_hash, events, chains }
    }
}

/// An event ready for the application, with the chain hash at its seq.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub stream_id: String,
    pub epoch: u32,
    pub seq: u64,
    pub kind: String,
    /// A slice of the segment's buffer (cheap to clone; derefs to `[u8]`).
    pub payload: bytes::Bytes,
    pub chain_hash: Hash32,
    /// Chain hash at `seq - 1`, as the event's segment states it.
    pub prev_chain: Hash32,
    pub occurred_at_micros: i64,
}

impl Event {
    /// The stream's cursor once this event is applied: what a handler that owns its
    /// cursors stores with the event's effects.
    pub fn cursor(&self, now_micros: i64) -> StreamCursor {
        StreamCursor {
            stream_id: self.stream_id.clone(),
            epoch: self.epoch,
            seq: self.seq,
            chain_hash: self.chain_hash.to_vec(),
            updated_at_micros: now_micros,
        }
    }
}

/// Where a stream stands.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamMode {
    /// Applying in order.
    Normal,
    /// The cursor is ahead of the server's head (`head`); wait for the head to pass it.
    ServerBehind { head: u64 },
    /// Rebuilding from `from` (the floor); the next segment starting at `from + 1` is trusted.
    Rebootstrapping { from: u64 },
}

/// Something the driver must act on or report.
#[derive(Debug, Clone, PartialEq)]
pub enum Alert {
    /// Events after the cursor are missing: resubscribe from `cursor`.
    Gap { cursor: u64, next_seen: u64 },
    /// A segment that does not verify was refused whole: its events do not decode, do not
    /// number the seqs its row names, or do not hash to the chain hashes it carries.
    /// Refetching may bring a sound copy; the server's data may also be corrupt.
    CorruptSegment { first_seq: u64, last_seq: u64 },
    /// The stream restarts from the floor; the application must drop its projection of
    /// this stream before applying what follows.
    Rebootstrap(StaleCursor),
    /// The server is behind the durable cursor; held.
    ServerBehind { cursor: u64, head: u64 },
    /// The server caught up and its chain at the cursor matched (or a rebuild's floor
    /// segment came): applying resumes. `refetch`: segments past the cursor that came
    /// meanwhile were not kept, and must be delivered again.
    Resumed { cursor: u64, refetch: bool },
}

/// What offering one segment did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Offer {
    /// Events at or below the cursor, skipped.
    pub duplicates: u64,
    /// Events buffered for application.
    pub accepted: u64,
    pub alerts: Vec<Alert>,
}

/// The apply state of one stream.
#[derive(Debug, Clone)]
pub struct StreamEngine {
    stream_id: String,
    epoch: u32,
    /// Last applied seq.
    applied: u64,
    /// While held behind the server: a segment past the cursor was dropped.
    held_dropped: bool,
    /// Chain hash at `applied`.
    chain: Hash32,
    mode: StreamMode,
    /// Verified events after `applied`, by seq, with their chain hashes.
    pending: Pending,
    /// The last seqs of the segments the buffered events came in: applying one puts the
    /// cursor on a segment's end. Cleared with `pending`.
    segment_ends: BTreeSet<u64>,
    /// The cursor is the last seq of a segment (or 0), so the next event starts one.
    at_segment_end: bool,
    /// The last `stream_view` row, for stale checks and health.
    info: Option<StreamInfo>,
}

impl StreamEngine {
    /// Starts from a durable cursor (`seq = 0`, epoch 0 for a stream never seen).
    pub fn new(cursor: &StreamCursor) -> StreamEngine {
        StreamEngine {
            stream_id: cursor.stream_id.clone(),
            epoch: cursor.epoch,
            applied: cursor.seq,
            held_dropped: false,
            chain: khala_proto::hash::from_slice(&cursor.chain_hash).unwrap_or(GENESIS),
            mode: StreamMode::Normal,
            pending: Pending::default(),
            segment_ends: BTreeSet::new(),
            at_segment_end: cursor.seq == 0,
            info: None,
        }
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn mode(&self) -> &StreamMode {
        &self.mode
    }

    pub fn info(&self) -> Option<&StreamInfo> {
        self.info.as_ref()
    }

    /// The durable form of the current position.
    pub fn cursor(&self, now_micros: i64) -> StreamCursor {
        StreamCursor {
            stream_id: self.stream_id.clone(),
            epoch: self.epoch,
            seq: self.applied,
            chain_hash: self.chain.to_vec(),
            updated_at_micros: now_micros,
        }
    }

    /// The seq the transport should fetch from (exclusive): the cursor; the floor while
    /// rebootstrapping; one below the cursor while the server is behind, so that the
    /// segment holding the cursor comes back and its chain hash can be compared.
    pub fn fetch_after(&self) -> u64 {
        match self.mode {
            StreamMode::Rebootstrapping { from } => from,
            StreamMode::ServerBehind { .. } => self.applied.saturating_sub(1),
            StreamMode::Normal => self.applied,
        }
    }

    fn rebootstrap(&mut self, info: &StreamInfo, reason: RebootstrapReason) -> Alert {
        let from = info.oldest_seq.saturating_sub(1);
        let alert = Alert::Rebootstrap(StaleCursor {
            stream_id: self.stream_id.clone(),
            requested: self.applied,
            oldest_available: from,
            head: info.head_seq,
            epoch: info.epoch,
            reason: reason as i32,
        });
        self.epoch = info.epoch;
        self.clear_pending();
        if from == 0 {
            self.applied = 0;
            self.chain = GENESIS;
            self.mode = StreamMode::Normal;
            self.at_segment_end = true;
        } else if from == info.head_seq {
            // Everything was trimmed: there is no floor segment to wait for.
            self.applied = from;
            self.chain = info.head_hash;
            self.mode = StreamMode::Normal;
            self.at_segment_end = true;
        } else {
            self.mode = StreamMode::Rebootstrapping { from };
        }
        alert
    }

    /// Holds at the cursor while the server's head is `head`, behind it or not yet past
    /// the segment holding it. That segment may come back cut differently, so the cursor
    /// is no longer known to end one.
    fn hold_behind(&mut self, head: u64) {
        self.mode = StreamMode::ServerBehind { head };
        self.at_segment_end = false;
    }

    /// Takes in the server's `stream_view` row.
    ///
    /// The view is refreshed every `VIEW_EVERY` while the stream is published, and a live
    /// client applies past it in between; but a view row that arrives within a session is
    /// never behind what this client has applied: the client applies segments of commits
    /// delivered before that row, so of a head the view had reached. A checkpoint from an
    /// earlier session can be past it: a cursor past the
    /// view's head then holds as if the server were behind, and the segment holding the
    /// cursor settles it ([`StreamEngine::offer`]); the driver reports the hold only if
    /// it lasts (docs/CLIENT.md, "The head").
    pub fn observe(&mut self, info: StreamInfo) -> Vec<Alert> {
        let mut alerts = Vec::new();
        self.info = Some(info.clone());
        if self.epoch == 0 {
            self.epoch = info.epoch;
        }
        if info.epoch != self.epoch {
            alerts.push(self.rebootstrap(&info, RebootstrapReason::EpochChanged));
            return alerts;
        }
        if matches!(self.mode, StreamMode::Rebootstrapping { .. }) {
            // The floor may have moved again while rebuilding: restart from the new one.
            if let StreamMode::Rebootstrapping { from } = self.mode {
                if info.oldest_seq.saturating_sub(1) > from {
                    alerts.push(self.rebootstrap(&info, RebootstrapReason::StaleCursor));
                }
            }
            return alerts;
        }
        if self.applied > info.head_seq {
            if self.mode == StreamMode::Normal {
                alerts.push(Alert::ServerBehind { cursor: self.applied, head: info.head_seq });
                self.held_dropped = false;
                // What was buffered came from the history the server lost.
                self.clear_pending();
            }
            self.hold_behind(info.head_seq);
            return alerts;
        }
        if let StreamMode::ServerBehind { .. } = self.mode {
            if info.head_seq == self.applied {
                if info.head_hash == self.chain {
                    self.mode = StreamMode::Normal;
                    // The head is the last seq of the last segment.
                    self.at_segment_end = true;
                    alerts.push(Alert::Resumed { cursor: self.applied, refetch: std::mem::take(&mut self.held_dropped) });
                } else {
                    alerts.push(self.rebootstrap(&info, RebootstrapReason::ChainMismatch));
                }
                return alerts;
            }
            // head > applied: the segment holding the cursor decides (see `offer`).
            self.hold_behind(info.head_seq);
        }
        if self.applied + 1 < info.oldest_seq && self.pending.first_seq() != Some(self.applied + 1) {
            alerts.push(self.rebootstrap(&info, RebootstrapReason::StaleCursor));
        }
        alerts
    }

    /// Takes in one segment: verifies its chain, skips what is already applied, buffers
    /// the rest, and reports gaps, mismatches and the end of a server-behind hold.
    pub fn offer(&mut self, segment: SegmentIn) -> Offer {
        let mut offer = Offer::default();
        if segment.epoch != self.epoch && self.epoch != 0 {
            // Another epoch's data; `observe` handles the switch.
            return offer;
        }
        // Verify the whole segment first: its seqs are the row's, and its events hash to
        // its own chain hashes. (A row whose `last_seq` overstated its events was read past
        // their end, and the sync thread panicked.)
        let numbered = segment.events.first().is_some_and(|e| e.seq == segment.first_seq)
            && segment.last_seq == segment.first_seq + segment.events.len() as u64 - 1;
        let mut prev = segment.prev_hash;
        let mut verified = Vec::with_capacity(segment.events.len());
        for chain in &segment.chains {
            verified.push((prev, *chain));
            prev = *chain;
        }
        if !numbered || segment.chains.len() != segment.events.len() || prev != segment.last_hash {
            // A corrupt segment: refuse it whole; the transport will refetch.
            offer.alerts.push(Alert::CorruptSegment { first_seq: segment.first_seq, last_seq: segment.last_seq });
            return offer;
        }
        if let StreamMode::Rebootstrapping { from } = self.mode {
            if segment.first_seq != from + 1 {
                // Only the floor segment can restart the chain; the rest comes again
                // once the windows are reset (`Alert::Resumed`).
                return offer;
            }
            self.applied = from;
            self.chain = segment.prev_hash;
            self.mode = StreamMode::Normal;
            self.at_segment_end = true;
            offer.alerts.push(Alert::Resumed { cursor: from, refetch: true });
        }
        // The chain at the cursor, where this segment covers it, must equal ours.
        let at_cursor = if self.applied + 1 == segment.first_seq {
            Some(segment.prev_hash)
        } else if (segment.first_seq..=segment.last_seq).contains(&self.applied) {
            Some(verified[(self.applied - segment.first_seq) as usize].1)
        } else {
            None
        };
        if let Some(hash) = at_cursor {
            if hash != self.chain {
                let info = self.info.clone().unwrap_or(StreamInfo { epoch: self.epoch, head_seq: segment.last_seq, oldest_seq: 1, head_hash: segment.last_hash });
                offer.alerts.push(self.rebootstrap(&info, RebootstrapReason::ChainMismatch));
                return offer;
            }
            if let StreamMode::ServerBehind { .. } = self.mode {
                self.mode = StreamMode::Normal;
                offer.alerts.push(Alert::Resumed { cursor: self.applied, refetch: std::mem::take(&mut self.held_dropped) });
            }
        }
        // Where this segment meets buffered events, the hashes must agree as well. If
        // they do not, the buffer holds another history (the server lost and re-took
        // commits): drop it; the cursor itself was checked above.
        let joins_before = segment.first_seq > self.applied + 1
            && self.pending.get(segment.first_seq - 1).is_some_and(|p| p.chain_hash != segment.prev_hash);
        let joins_after = self.pending.get(segment.last_seq + 1).is_some_and(|n| n.prev_chain != segment.last_hash);
        if joins_before || joins_after {
            self.clear_pending();
        }
        if let StreamMode::ServerBehind { .. } = self.mode {
            // Nothing beyond the cursor may be applied before the cursor is confirmed.
            offer.duplicates += segment.events.iter().filter(|e| e.seq <= self.applied).count() as u64;
            self.held_dropped |= segment.last_seq > self.applied;
            return offer;
        }
        for (e, (prev_chain, hash)) in segment.events.into_iter().zip(verified) {
            if e.seq <= self.applied {
                offer.duplicates += 1;
                continue;
            }
            if let Some(buffered) = self.pending.get(e.seq) {
                if buffered.chain_hash == hash {
                    offer.duplicates += 1;
                    continue;
                }
                // Two histories disagree (the server lost and re-took commits): keep
                // only what this newer delivery says.
                self.clear_pending();
            }
            let event = Event {
                stream_id: self.stream_id.clone(),
                epoch: segment.epoch,
                seq: e.seq,
                kind: e.kind,
                payload: e.payload,
                chain_hash: hash,
                prev_chain,
                occurred_at_micros: e.occurred_at_micros,
            };
            // Too far from what is held: refused, and fetched again after the
            // resubscribe. The next event to apply is always taken, in place of the rest.
            if e.seq == self.applied + 1 && !self.pending.fits(e.seq) {
                self.clear_pending();
            }
            if self.pending.insert(event) {
                offer.accepted += 1;
            }
        }
        if self.pending.contains(segment.last_seq) {
            self.segment_ends.insert(segment.last_seq);
        } else if segment.last_seq == self.applied {
            self.at_segment_end = true;
        }
        if let Some(first) = self.pending.first_seq() {
            if first > self.applied + 1 {
                offer.alerts.push(Alert::Gap { cursor: self.applied, next_seen: first });
            }
        }
        offer
    }

    /// The next event the application may apply, if it is here and its chain follows
    /// from the cursor's (buffered events were checked against their neighbours when
    /// offered, so this is O(1)). A buffered event from another history is dropped with
    /// everything buffered, to be fetched again.
    pub fn next_ready(&mut self) -> Option<&Event> {
        if self.mode != StreamMode::Normal {
            return None;
        }
        let seq = self.applied + 1;
        if self.pending.get(seq).is_some_and(|e| e.prev_chain != self.chain) {
            self.clear_pending();
        }
        self.pending.get(seq)
    }

    /// Drops everything buffered (after a reconnect: it may come from a history the
    /// server no longer has).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.segment_ends.clear();
    }

    /// Whether the segment holding the next event may have begun in the window bucket
    /// before that event's, so that the bucket must stay open: not when the next event
    /// is buffered already, nor when the cursor ends a segment (the next one begins at
    /// the next seq), nor while waiting for a rebuild's floor segment (it begins there).
    /// So a live stream keeps the bucket before its cursor's, all applied, closed.
    pub fn may_straddle(&self) -> bool {
        match self.mode {
            StreamMode::Rebootstrapping { .. } => false,
            StreamMode::ServerBehind { .. } => true,
            StreamMode::Normal => !self.at_segment_end && !self.pending.contains(self.applied + 1),
        }
    }

    /// Checks the last server view again (a stale cursor is found even when no new
    /// `stream` row arrives).
    pub fn recheck(&mut self) -> Vec<Alert> {
        match self.info.clone() {
            Some(info) => self.observe(info),
            None => Vec::new(),
        }
    }

    /// Whether the stream waits for events the server has: nothing applicable is
    /// buffered, yet the head is past the cursor.
    pub fn starved(&self) -> bool {
        self.mode == StreamMode::Normal
            && !self.pending.contains(self.applied + 1)
            && self.info.as_ref().is_some_and(|i| i.head_seq > self.applied)
    }

    /// Records that the application applied `seq` (its handler returned Ok).
    pub fn mark_applied(&mut self, seq: u64) {
        if seq != self.applied + 1 {
            return;
        }
        if let Some(event) = self.pending.pop_first(seq) {
            self.applied = seq;
            self.chain = event.chain_hash;
            self.at_segment_end = self.segment_ends.remove(&seq);
            while self.segment_ends.first().is_some_and(|end| *end < seq) {
                self.segment_ends.pop_first();
            }
        }
    }

    /// Events buffered beyond the cursor.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

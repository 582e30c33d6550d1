//! One stream's state: the pure apply engine and the durable cursor, with the sub-states
//! that each do one job (windows, grant, acks, hold, handler retry).

use super::acks::Acks;
use super::grant::Grant;
use super::hold::Hold;
use super::retry::HandlerRetry;
use super::windows::Windows;
use super::Note;
use crate::apply::{Alert, StreamEngine, StreamMode};
use khala_proto::hash::bucket;
use khala_proto::v1::RebootstrapReason;
use khala_proto::{StaleCursor, StreamCursor};
use std::time::Instant;

/// Handler failures in a row after which a stream counts as stuck (their backoff
/// ceilings add up to 1.75 s by then).
pub const STUCK_AFTER_FAILURES: u32 = 3;

#[derive(Debug)]
pub struct StreamState {
    pub engine: StreamEngine,
    /// The cursor the last checkpoint made durable (the file's, or the handler's own).
    /// While a rebootstrap is pending it stays what it was, so a restart tells the
    /// handler again.
    pub durable: StreamCursor,
    pub windows: Windows,
    pub grant: Grant,
    pub acks: Acks,
    pub hold: Hold,
    pub retry: HandlerRetry,
    /// Events the handler may still take in this round (see `APPLY_PER_ROUND`).
    pub budget: usize,
    /// The seqs of the refused segment (failing its own chain hashes) nearest the
    /// cursor. The stream reads as corrupt while the cursor is below its end.
    pub corrupt: Option<(u64, u64)>,
    /// Counts the histories this process has followed the stream in (each rebootstrap,
    /// or a resume from the handler's own cursor, starts one). A checkpoint is answered
    /// after other inputs, so its answer makes acks current again only if the stream is
    /// still in the history its cursor was offered in.
    pub history: u64,
}

impl StreamState {
    /// `seed` draws the stream's window close delays ([`Windows::new`]).
    pub fn new(cursor: &StreamCursor, seed: u64) -> Self {
        StreamState {
            engine: StreamEngine::new(cursor),
            durable: cursor.clone(),
            windows: Windows::new(seed),
            grant: Grant::default(),
            acks: Acks::default(),
            hold: Hold::default(),
            retry: HandlerRetry::default(),
            budget: 0,
            corrupt: None,
            history: 0,
        }
    }

    /// Rebuilding from the floor: the handler has not taken the rebootstrap yet, or the
    /// floor segment has not arrived. The durable cursor does not move meanwhile.
    pub fn rebuilding(&self) -> bool {
        self.retry.rebootstrap_due.is_some() || matches!(self.engine.mode(), StreamMode::Rebootstrapping { .. })
    }

    /// Whether the stream's backlog reaches past the buckets a live stream keeps open
    /// (the cursor's and the next): it is catching up, and needs a replay slot
    /// ([`super::slots`]) to keep windows. A stream whose head is not known yet is not.
    pub fn catching_up(&self) -> bool {
        self.engine.info().is_some_and(|i| bucket(i.head_seq) > bucket(self.engine.fetch_after() + 1) + 1)
    }

    /// Whether the stream cannot go on by itself for now: its handler has failed
    /// [`STUCK_AFTER_FAILURES`] times in a row (on an event or a rebootstrap), or the
    /// segment it needs next was refused as corrupt. It then yields its replay slot
    /// ([`super::slots`]) to a stream that can use it.
    pub fn stuck(&self) -> bool {
        self.retry.failures() >= STUCK_AFTER_FAILURES || self.corrupt_ahead().is_some()
    }

    /// The refused corrupt segment the cursor has not passed, if any.
    pub fn corrupt_ahead(&self) -> Option<(u64, u64)> {
        self.corrupt.filter(|(_, last)| self.engine.applied() < *last)
    }

    /// Waiting for one segment the server has: the floor segment of a rebuild, or (held
    /// behind a server that lost commits and has them again) the one holding the cursor.
    pub fn awaits_segment(&self) -> bool {
        let head = self.engine.info().map_or(0, |i| i.head_seq);
        match self.engine.mode() {
            StreamMode::Rebootstrapping { from } => head > *from,
            StreamMode::ServerBehind { .. } => head >= self.engine.applied(),
            StreamMode::Normal => false,
        }
    }

    /// The stream starts from the floor because the checkpoint could not be read.
    pub fn corrupt_checkpoint(&mut self, id: &str) -> Note {
        let stale = StaleCursor { stream_id: id.to_string(), reason: RebootstrapReason::CorruptCheckpoint as i32, ..Default::default() };
        self.retry.rebootstrap(stale);
        Note::Rebootstrap { stream_id: id.to_string(), reason: RebootstrapReason::CorruptCheckpoint as i32 }
    }

    /// Acts on the engine's alerts; returns whether the checkpoint needs writing, and
    /// pushes what is worth counting to `notes`.
    pub fn alerts(&mut self, id: &str, alerts: Vec<Alert>, now: Instant, notes: &mut Vec<Note>) -> bool {
        let mut dirty = false;
        for alert in alerts {
            match alert {
                Alert::Gap { cursor, next_seen } => {
                    // Rows of one window may arrive in any order: wait; if the gap stays,
                    // the windows are reopened.
                    log::debug!("{id}: waiting for seqs after {cursor} (next seen {next_seen})");
                    self.hold.gap(now);
                }
                Alert::CorruptSegment { first_seq, last_seq } => {
                    // Never applied; refetched like a gap, in case only this copy is bad.
                    log::error!("{id}: segment_corrupt: seqs {first_seq}..={last_seq} do not verify (decode, number or hash as the row says); refused, nothing past {} is applied", self.engine.applied());
                    // The one nearest the cursor is the one that stops the stream.
                    self.corrupt = match self.corrupt_ahead() {
                        Some(nearer) if nearer.0 <= first_seq => Some(nearer),
                        _ => Some((first_seq, last_seq)),
                    };
                    notes.push(Note::CorruptSegment { stream_id: id.to_string() });
                    self.hold.gap(now);
                }
                Alert::Rebootstrap(stale) => {
                    log::warn!(
                        "{id}: rebootstrap ({:?}): requested {}, oldest available {}, head {}",
                        RebootstrapReason::try_from(stale.reason).unwrap_or_default(),
                        stale.requested,
                        stale.oldest_available,
                        stale.head
                    );
                    notes.push(Note::Rebootstrap { stream_id: id.to_string(), reason: stale.reason });
                    // A hold behind the server ends here too (its chain differed).
                    self.hold.resumed();
                    self.corrupt = None;
                    self.retry.rebootstrap(stale);
                    self.windows.reset();
                    self.acks.rebootstrapped();
                    self.history += 1;
                    dirty = true;
                }
                Alert::ServerBehind { cursor, head } => {
                    // Reported once it lasts (`Hold::confirm_behind`): at a session's
                    // start the view's head may only trail the stream's.
                    log::debug!("{id}: the known head {head} is behind the checkpoint {cursor}; holding until the segment holding it comes");
                    self.hold.server_behind(now);
                    self.windows.reset();
                }
                Alert::Resumed { cursor, refetch } => {
                    if self.hold.resumed() {
                        log::info!("{id}: the server caught up; applying again from {cursor}");
                    } else {
                        log::debug!("{id}: applying from {cursor}");
                    }
                    if refetch {
                        // Segments after the cursor that arrived while held were not kept.
                        self.windows.reset();
                    }
                }
            }
        }
        dirty
    }

    /// A handler that owns its cursors stored `stored`: when this process stands
    /// elsewhere (the handler rolled back a batch it could not commit), restart from the
    /// stored cursor. A stream being rebuilt keeps its state, and the handler is told the
    /// rebootstrap again: it may have rolled that back too, and dropping a dropped stream
    /// changes nothing.
    pub fn resume_from(&mut self, id: &str, stored: StreamCursor) {
        if self.rebuilding() {
            self.retry.repeat_rebootstrap();
            return;
        }
        let here = self.engine.cursor(stored.updated_at_micros);
        if (here.seq, &here.chain_hash) != (stored.seq, &stored.chain_hash) {
            log::warn!("{id}: the handler stored seq {}, this process stood at {}; resuming from the handler's", stored.seq, here.seq);
            self.engine = StreamEngine::new(&stored);
            self.durable = stored;
            self.windows.reset();
            self.history += 1;
        }
    }
}

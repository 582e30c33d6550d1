//! The application interface: what the client hands over, in order, per stream.

use crate::apply::Event;
use khala_proto::{StaleCursor, StreamCursor};

/// Any error a handler returns; the event is retried from the same seq with backoff.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Waits for the disk on behalf of a handler whose [`Handler::persist`] commits without
/// waiting for it ([`Handler::syncer`]). Runs on the client's checkpoint thread.
pub type Syncer = Box<dyn FnMut() -> Result<(), HandlerError> + Send>;

/// Receives each stream's events in seq order. An event counts as applied only when
/// [`Handler::apply`] returns `Ok`; until then the same event is offered again.
pub trait Handler {
    /// Apply one event.
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError>;

    /// The stream restarts from the server's floor (`stale.oldest_available`): drop what
    /// was built from this stream; the events that follow rebuild it.
    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError>;

    /// Makes the effects of the events applied so far durable (or, for a handler with a
    /// [`Handler::syncer`], commits them, and the syncer makes them durable). Called
    /// before each checkpoint write, so the checkpoint never runs ahead of what the
    /// handler kept; an error postpones the checkpoint (nothing is lost, the write is
    /// tried again).
    ///
    /// A handler that owns its cursors ([`Handler::cursors`]) commits here, in one
    /// transaction, its effects and the cursor of the last event applied on each stream
    /// ([`Event::cursor`]): then a crash can lose a batch, never split it. For such a
    /// handler an error also ends the session (`handler_persist_failed`, retried): its
    /// batch may be gone (a database can roll a transaction back by itself), so the next
    /// session reads [`Handler::cursors`] again and offers what follows them.
    fn persist(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }

    /// The handler's own resume points, kept in the same transaction as its effects.
    /// `Some` (an empty list for a store never written) makes the client resume from them
    /// and never read or write its checkpoint file: exactly-once effects across a crash.
    /// `None` (the default): the client keeps the cursors in its checkpoint file, and up
    /// to one checkpoint interval of events is offered again after a crash.
    ///
    /// Read when the client starts and at every reconnect. A stream's cursor must be
    /// `(epoch, seq, chain hash at seq)` of the last event whose effects are stored;
    /// after [`Handler::rebootstrap`] the stream has no cursor (or its floor's).
    fn cursors(&mut self) -> Result<Option<Vec<StreamCursor>>, HandlerError> {
        Ok(None)
    }

    /// For a handler whose [`Handler::persist`] commits atomically but without waiting
    /// for the disk (SQLite's WAL with `synchronous = NORMAL`, say): what makes every
    /// commit made so far durable. Taken once, when the client is made.
    ///
    /// An fsync on a busy disk takes tens of milliseconds, and the sync loop applies
    /// nothing while it waits; the client calls the syncer on its checkpoint thread
    /// instead, after each `persist` (and before the checkpoint file, if it writes one),
    /// while the loop goes on applying. Acks wait for it, so an ack never claims what a
    /// power loss could take back; the handler's cursors are synced before they are read
    /// at a reconnect, and once when the client is made (a crashed process may have left
    /// commits that are not on disk). A syncer that fails ends `run`
    /// (`handler_sync_failed`): an fsync tried again can succeed without the pages the
    /// kernel failed to write, so retrying is not safe.
    fn syncer(&mut self) -> Option<Syncer> {
        None
    }

    /// Everything that has arrived is applied (live, or between replay windows): a cheap
    /// moment to show it, such as flushing an output buffer. Not a durability point
    /// (that is [`Handler::persist`], which runs at the checkpoint cadence of 20 ms).
    fn caught_up(&mut self) {}
}

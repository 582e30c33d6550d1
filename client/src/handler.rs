//! The application interface: what the client hands over, in order, per stream.

use crate::apply::Event;
use khala_proto::StaleCursor;

/// Any error a handler returns; the event is retried from the same seq with backoff.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Receives each stream's events in seq order. An event counts as applied only when
/// [`Handler::apply`] returns `Ok`; until then the same event is offered again.
pub trait Handler {
    /// Apply one event.
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError>;

    /// The stream restarts from the server's floor (`stale.oldest_available`): drop what
    /// was built from this stream; the events that follow rebuild it.
    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError>;

    /// Makes the effects of the events applied so far durable. Called before each
    /// checkpoint write, so the checkpoint never runs ahead of what the handler kept; an
    /// error postpones the checkpoint (nothing is lost, the write is tried again).
    fn persist(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Everything that has arrived is applied (live, or between replay windows): a cheap
    /// moment to show it, such as flushing an output buffer. Not a durability point
    /// (that is [`Handler::persist`], which runs at the checkpoint cadence of 20 ms).
    fn caught_up(&mut self) {}
}

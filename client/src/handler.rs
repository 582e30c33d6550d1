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

    /// Called after each batch has been applied and checkpointed (optional).
    fn checkpointed(&mut self) {}
}

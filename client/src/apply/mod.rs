//! The pure apply engine: one [`StreamEngine`] per stream decides, for everything the
//! transport hands it, what the application may apply next. It does no I/O and reads no
//! clock, so its guarantees are property-tested in isolation (`apply/tests.rs`).
//!
//! Guarantees, per stream:
//! - events reach the application in seq order, each exactly once, and only after the
//!   chain hash of every event up to it has been verified;
//! - a gap is never skipped: the events after it wait, and the transport is told to
//!   resubscribe from the cursor;
//! - a chain mismatch, an epoch change or a cursor below the retention floor leads to an
//!   explicit, deterministic rebootstrap of this stream only;
//! - a cursor ahead of the server's head (the server lost acknowledged commits in a
//!   crash) holds the stream until the head passes the cursor again and the chain hash at
//!   the cursor is compared.

mod engine;
mod pending;
#[cfg(test)]
mod tests;

pub use engine::{Alert, Event, Offer, SegmentIn, StreamEngine, StreamInfo, StreamMode};

//! Khala's desktop client library: subscribes to granted streams, replays from its
//! checkpoint in bounded windows, then follows live, and hands every event to the
//! application exactly once, in `(stream_id, seq)` order.
//!
//! # Layout
//! - [`apply`]: the pure apply engine (no I/O): ordering, exactly-once, gaps, stale
//!   cursors, server-behind holds.
//! - [`sync`]: the sync loop ([`SyncClient`]): connect, hello, windows, apply, checkpoint, ack.
//! - [`transport`]: the SDK glue: one connection per attempt, callbacks into a channel.
//! - [`checkpoint`]: atomic, checksummed checkpoint files (the default keeper of cursors).
//! - [`store`]: handlers that keep the cursors with their effects (feature `sqlite`:
//!   `store::sqlite::SqliteStore`), for exactly-once effects across a crash.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`handler`]: the [`Handler`] trait the application implements.
//! - [`health`]: the health snapshot a UI shows; [`metrics`]: the same and more through the `metrics` facade.
//! - [`config`], [`error`].
//! - [`module_bindings`]: generated SpacetimeDB bindings of the module (never edit).

pub mod apply;
pub mod backoff;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod handler;
pub mod health;
pub mod metrics;
pub mod store;
#[allow(clippy::all, unused)]
pub mod module_bindings;
pub mod sync;
pub mod transport;

pub use apply::Event;
pub use config::ClientConfig;
pub use error::ClientError;
pub use handler::{Handler, HandlerError, Syncer};
pub use sync::SyncClient;

//! Khala's desktop client library.
//!
//! # Layout
//! - [`apply`]: the pure apply engine (no I/O): ordering, exactly-once, gaps, stale
//!   cursors, server-behind holds.
//! - [`module_bindings`]: generated SpacetimeDB bindings of the module (never edit).

pub mod apply;
#[allow(clippy::all, unused)]
pub mod module_bindings;

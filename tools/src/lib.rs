//! The library behind the `khala` command, shared with the integration tests so that
//! tests start servers and publish the module exactly the way users do.
//!
//! # Layout
//! - [`engine`]: find or install the pinned SpacetimeDB 1.2.0 binaries.
//! - [`server`]: run `spacetimedb-standalone` on loopback; pid file; kill -9 and restart.
//! - [`api`]: the server's HTTP API (identities, publish, reducer calls, SQL).
//! - [`module_wasm`]: build the module to wasm.
//! - [`envfile`]: the `khala.env` file `khala up` writes.
//! - [`paths`]: default locations.
//! - [`error`]: [`ToolError`] with stable codes.

pub mod api;
pub mod engine;
pub mod envfile;
pub mod error;
pub mod module_wasm;
pub mod paths;
pub mod server;

pub use error::ToolError;

//! The library behind the `khala` command, shared with the integration tests so that
//! tests start servers and publish the module exactly the way users do.
//!
//! # Layout
//! - [`engine`]: find or install the pinned SpacetimeDB 1.2.0 binaries.
//! - [`server`]: run `spacetimedb-standalone` on loopback; pid file; kill -9 and restart.
//! - [`api`]: the server's HTTP API (identities, publish, reducer calls, SQL).
//! - [`sdk_publish`]: `publish` calls over the SDK's WebSocket (BSATN).
//! - [`module_wasm`]: build the module to wasm.
//! - [`envfile`]: the `khala.env` file `khala up` writes.
//! - [`mirror`]: `khala mirror`, authority events into the module (docs/MIRROR.md).
//! - [`faults`]: the fault-injecting proxy and the drills of `khala chaos`.
//! - [`parity`]: authority vs module vs client logs, by seq and hash.
//! - [`paths`]: default locations.
//! - [`progress`]: indicatif bars on a terminal only.
//! - [`prometheus`]: serving metrics; [`exporter`]: the module's state as metrics (docs/METRICS.md);
//!   [`metrics_text`]: reading a server's.
//! - [`error`]: [`ToolError`] with stable codes.

pub mod api;
/// Generated SDK bindings of the bench's bare baseline module (`bench/bare-module`;
/// `scripts/generate-bindings` writes them, never edit).
#[allow(irrefutable_let_patterns)]
pub mod bare_bindings;
pub mod deploy;
pub mod engine;
pub mod envfile;
pub mod exporter;
pub mod grants;
pub mod error;
pub mod faults;
pub mod inspect;
pub mod metrics_text;
pub mod mirror;
pub mod module_wasm;
pub mod parity;
pub mod paths;
pub mod progress;
pub mod prometheus;
pub mod sdk_publish;
pub mod server;
pub mod smoke;

pub use error::ToolError;

/// `RUST_LOG` for the `khala` processes a command starts and reads the output of (the
/// demo's mirror and client, a bench's mirror): warnings, but not the SDK's, which logs a
/// server's normal close of a finished connection as one (`khala`'s default filter drops
/// them too).
pub const CHILD_LOG_FILTER: &str = "warn,spacetimedb_sdk=error";

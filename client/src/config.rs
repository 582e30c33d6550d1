//! What a client needs to know to sync.

use std::path::PathBuf;
use std::time::Duration;

/// Streams that catch up at once by default: one, so that a client far behind on many
/// streams holds about one stream's replay windows, not all of them.
pub const DEFAULT_REPLAY_SLOTS: usize = 1;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `http://127.0.0.1:3000`.
    pub server_url: String,
    pub database: String,
    /// Read at every connection attempt, so a refreshed token is picked up.
    pub token_file: PathBuf,
    /// The streams to sync, by exact id.
    pub streams: Vec<String>,
    /// The checkpoint file; the health snapshot is written beside it (`.health.json`).
    pub checkpoint: PathBuf,
    /// Sent in `hello`; checked against the module's minimum build.
    pub client_build: String,
    /// How long a stream may wait for the server to catch up with the checkpoint
    /// (after a server crash) before it is reported.
    pub server_behind_limit: Duration,
    /// Ack each stream's durable cursor, at most every `ACK_EVERY` (500 ms; needs the
    /// `ack` scope).
    pub ack: bool,
    /// Ask the server to gzip large messages. `None` decides by address: off on
    /// loopback (compression only costs CPU there), on elsewhere. The SDK's own default,
    /// brotli, cost more CPU than it saved on every measurement here.
    pub compress: Option<bool>,
    /// Streams that may catch up at once (replay windows cost about 50–65 MB per stream
    /// catching up; live streams need no slot); 0 for no limit. See docs/CLIENT.md.
    pub replay_slots: usize,
}

impl ClientConfig {
    pub fn new(server_url: impl Into<String>, database: impl Into<String>, token_file: impl Into<PathBuf>, checkpoint: impl Into<PathBuf>) -> Self {
        ClientConfig {
            server_url: server_url.into(),
            database: database.into(),
            token_file: token_file.into(),
            streams: Vec::new(),
            checkpoint: checkpoint.into(),
            client_build: env!("CARGO_PKG_VERSION").to_string(),
            server_behind_limit: Duration::from_secs(60),
            ack: true,
            compress: None,
            replay_slots: DEFAULT_REPLAY_SLOTS,
        }
    }

    /// Whether to ask for compression (see [`ClientConfig::compress`]).
    pub fn wants_compression(&self) -> bool {
        self.compress.unwrap_or_else(|| {
            let host = self.server_url.split("://").nth(1).unwrap_or(&self.server_url);
            !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]"))
        })
    }

    pub fn health_file(&self) -> PathBuf {
        let mut p = self.checkpoint.clone().into_os_string();
        p.push(".health.json");
        PathBuf::from(p)
    }
}

//! Publishing through the SDK's WebSocket (BSATN) instead of HTTP JSON: the same
//! `publish` reducer, without hex-encoding every payload and one HTTP request per call.
//! Results come back by callback; with at most one call in flight per stream, the
//! stream id names the call a result belongs to.

use crate::error::{Result, ToolError};
use khala_client::module_bindings::{publish as _, publish_segment as _, DbConnection, PublishEvent};
use khala_proto::CodedError;
use spacetimedb_sdk::{DbContext, Status};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

/// What a publish call came to.
#[derive(Debug)]
pub enum Outcome {
    Committed { stream_id: String },
    Failed { stream_id: String, error: CodedError },
    Disconnected(String),
}

/// A reducer call's status as an [`Outcome`] (the status carries the reducer's
/// `code: message` error).
fn outcome(stream_id: &str, status: &Status) -> Outcome {
    match status {
        Status::Committed => Outcome::Committed { stream_id: stream_id.to_string() },
        Status::Failed(m) => Outcome::Failed { stream_id: stream_id.to_string(), error: CodedError::parse(m) },
        Status::OutOfEnergy => Outcome::Failed { stream_id: stream_id.to_string(), error: CodedError::new(khala_proto::ErrorCode::RateLimited, "out of energy") },
    }
}

fn next_outcome(results: &Receiver<Outcome>, timeout: Duration) -> Option<Outcome> {
    match results.recv_timeout(timeout) {
        Ok(o) => Some(o),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => Some(Outcome::Disconnected("the connection thread ended".into())),
    }
}

/// Opens a connection with [`khala_client::transport::build_within`]'s limit on the
/// handshake (the client's own), so a half-open connection cannot hang the caller.
fn connect_within<C: DbContext + Send + 'static>(what: &str, build: impl FnOnce() -> std::result::Result<C, spacetimedb_sdk::Error> + Send + 'static) -> Result<C> {
    let limit = khala_client::transport::CONNECT_TIMEOUT;
    match khala_client::transport::build_within(limit, build) {
        Some(Ok(conn)) => Ok(conn),
        Some(Err(e)) => Err(ToolError::Http { what: what.into(), detail: e.to_string() }),
        None => Err(ToolError::Http { what: what.into(), detail: format!("no WebSocket handshake within {} s", limit.as_secs()) }),
    }
}

/// One SDK connection used for `publish` calls.
pub struct SdkPublisher {
    conn: DbConnection,
    results: Receiver<Outcome>,
}

impl SdkPublisher {
    pub fn connect(url: &str, database: &str, token: &str) -> Result<SdkPublisher> {
        let (tx, results) = mpsc::channel();
        let on_disconnect = tx.clone();
        let (url, database, token) = (url.to_string(), database.to_string(), token.to_string());
        let conn = connect_within(
            "connecting the SDK publisher",
            move || {
                DbConnection::builder()
                    .with_uri(url)
                    .with_module_name(database)
                    .with_token(Some(token))
                    .with_compression(spacetimedb_sdk::Compression::None)
                    .with_light_mode(true)
                    .on_disconnect(move |_, e| {
                        let _ = on_disconnect.send(Outcome::Disconnected(e.map_or_else(|| "closed".to_string(), |e| e.to_string())));
                    })
                    .build()
            },
        )?;
        let lost = tx.clone();
        let segments = tx.clone();
        conn.reducers.on_publish(move |ctx, stream_id, _| {
            let _ = tx.send(outcome(stream_id, &ctx.event.status));
        });
        conn.reducers.on_publish_segment(move |ctx, stream_id, _| {
            let _ = segments.send(outcome(stream_id, &ctx.event.status));
        });
        khala_client::transport::on_runner_panic(conn.run_threaded(), move || {
            let _ = lost.send(Outcome::Disconnected("the SDK's connection thread panicked".into()));
        });
        Ok(SdkPublisher { conn, results })
    }

    /// Sends one `publish` call; its [`Outcome`] arrives through [`SdkPublisher::next`].
    pub fn send(&self, stream_id: &str, events: Vec<PublishEvent>) -> Result<()> {
        use khala_client::module_bindings::publish;
        self.conn
            .reducers
            .publish(stream_id.to_string(), events)
            .map_err(|e| ToolError::Http { what: format!("sending publish for {stream_id}"), detail: e.to_string() })
    }

    /// Sends one `publish_segment` call with segment `data` as the module stores it
    /// (`khala_proto::segment::encode`); its [`Outcome`] arrives through [`SdkPublisher::next`].
    pub fn send_segment(&self, stream_id: &str, data: Vec<u8>) -> Result<()> {
        use khala_client::module_bindings::publish_segment;
        self.conn
            .reducers
            .publish_segment(stream_id.to_string(), data)
            .map_err(|e| ToolError::Http { what: format!("sending publish_segment for {stream_id}"), detail: e.to_string() })
    }

    /// The next outcome, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Outcome> {
        next_outcome(&self.results, timeout)
    }
}

impl Drop for SdkPublisher {
    fn drop(&mut self) {
        khala_client::transport::disconnect_contained(|| {
            let _ = self.conn.disconnect();
        });
    }
}

/// The same, for the bench's bare baseline module: one pre-packed row per `insert` call.
pub struct BarePublisher {
    conn: crate::bare_bindings::DbConnection,
    results: Receiver<Outcome>,
}

impl BarePublisher {
    pub fn connect(url: &str, database: &str, token: &str) -> Result<BarePublisher> {
        use crate::bare_bindings::{insert as _, DbConnection};
        let (tx, results) = mpsc::channel();
        let on_disconnect = tx.clone();
        let (url, database, token) = (url.to_string(), database.to_string(), token.to_string());
        let conn = connect_within(
            "connecting the bare publisher",
            move || {
                DbConnection::builder()
                    .with_uri(url)
                    .with_module_name(database)
                    .with_token(Some(token))
                    .with_compression(spacetimedb_sdk::Compression::None)
                    .with_light_mode(true)
                    .on_disconnect(move |_, e| {
                        let _ = on_disconnect.send(Outcome::Disconnected(e.map_or_else(|| "closed".to_string(), |e| e.to_string())));
                    })
                    .build()
            },
        )?;
        let lost = tx.clone();
        conn.reducers.on_insert(move |ctx, stream_id, _, _, _| {
            let _ = tx.send(outcome(stream_id, &ctx.event.status));
        });
        khala_client::transport::on_runner_panic(conn.run_threaded(), move || {
            let _ = lost.send(Outcome::Disconnected("the SDK's connection thread panicked".into()));
        });
        Ok(BarePublisher { conn, results })
    }

    /// Sends one `insert` of a pre-packed segment; its [`Outcome`] arrives through `next`.
    pub fn send(&self, stream_id: &str, first_seq: u64, last_seq: u64, data: Vec<u8>) -> Result<()> {
        use crate::bare_bindings::insert;
        self.conn
            .reducers
            .insert(stream_id.to_string(), first_seq, last_seq, data)
            .map_err(|e| ToolError::Http { what: format!("sending insert for {stream_id}"), detail: e.to_string() })
    }

    pub fn next(&self, timeout: Duration) -> Option<Outcome> {
        next_outcome(&self.results, timeout)
    }
}

impl Drop for BarePublisher {
    fn drop(&mut self) {
        use spacetimedb_sdk::DbContext as _;
        khala_client::transport::disconnect_contained(|| {
            let _ = self.conn.disconnect();
        });
    }
}

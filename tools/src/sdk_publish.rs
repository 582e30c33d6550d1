//! Publishing through the SDK's WebSocket (BSATN) instead of HTTP JSON: the same
//! `publish` reducer, without hex-encoding every payload and one HTTP request per call.
//! Results come back by callback; with at most one call in flight per stream, the
//! stream id names the call a result belongs to.
//!
//! A publisher may hold several connections. The server takes a connection's next message
//! only once it has answered the one before, so the calls in flight on one connection
//! queue behind each other's decoding, execution and reply; on several, the database
//! works on one call while the next is being decoded. Each stream keeps to one connection.

use crate::error::{Result, ToolError};
use khala_client::module_bindings::{publish as _, publish_segment as _, DbConnection, PublishEvent};
use khala_proto::CodedError;
use spacetimedb_sdk::__codegen::SpacetimeModule;
use spacetimedb_sdk::{DbConnectionBuilder, DbContext, Status};
use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
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

/// Opens a publisher's connection to `database`: light mode (no subscriptions), no
/// compression, [`khala_client::transport::build_within`]'s limit on the handshake (the
/// client's own, so a half-open connection cannot hang the caller), and a closed
/// connection reported on `lost` as [`Outcome::Disconnected`]. `wire` registers the
/// reducer callbacks before the connection starts running; a panic of the SDK's
/// connection thread is reported on `lost` too. Both publishers connect this way; only
/// their generated module types differ.
fn connect<M, C>(
    what: &str,
    builder: fn() -> DbConnectionBuilder<M>,
    run: fn(&C) -> std::thread::JoinHandle<()>,
    (url, database, token): (&str, &str, &str),
    lost: Sender<Outcome>,
    wire: impl FnOnce(&C),
) -> Result<C>
where
    M: SpacetimeModule<DbConnection = C>,
    C: DbContext + Send + 'static,
{
    let on_disconnect = lost.clone();
    let (url, database, token) = (url.to_string(), database.to_string(), token.to_string());
    let limit = khala_client::transport::CONNECT_TIMEOUT;
    let built = khala_client::transport::build_within(limit, move || {
        builder()
            .with_uri(url)
            .with_module_name(database)
            .with_token(Some(token))
            .with_compression(spacetimedb_sdk::Compression::None)
            .with_light_mode(true)
            .on_disconnect(move |_, e| {
                let _ = on_disconnect.send(Outcome::Disconnected(e.map_or_else(|| "closed".to_string(), |e| e.to_string())));
            })
            .build()
    });
    let conn = match built {
        Some(Ok(conn)) => conn,
        Some(Err(e)) => return Err(ToolError::Http { what: what.into(), detail: e.to_string() }),
        None => return Err(ToolError::Http { what: what.into(), detail: format!("no WebSocket handshake within {} s", limit.as_secs()) }),
    };
    wire(&conn);
    khala_client::transport::on_runner_panic(run(&conn), move || {
        let _ = lost.send(Outcome::Disconnected("the SDK's connection thread panicked".into()));
    });
    Ok(conn)
}

/// Closes a publisher's connection, containing the SDK's panic on a poisoned lock.
fn disconnect(conn: &impl DbContext) {
    khala_client::transport::disconnect_contained(|| {
        let _ = conn.disconnect();
    });
}

/// A publisher's connections, and which one each stream takes (dealt round robin as
/// streams first appear, so a few streams spread evenly).
struct Connections<C: DbContext> {
    conns: Vec<C>,
    by_stream: Mutex<HashMap<String, usize>>,
}

impl<C: DbContext> Connections<C> {
    /// Opens `count` (at least one) connections with `open`, every result on one channel.
    fn open(count: usize, mut open: impl FnMut(Sender<Outcome>) -> Result<C>) -> Result<(Connections<C>, Receiver<Outcome>)> {
        let (tx, results) = mpsc::channel();
        let mut conns = Vec::new();
        for _ in 0..count.max(1) {
            match open(tx.clone()) {
                Ok(conn) => conns.push(conn),
                Err(e) => {
                    conns.iter().for_each(disconnect);
                    return Err(e);
                }
            }
        }
        Ok((Connections { conns, by_stream: Mutex::new(HashMap::new()) }, results))
    }

    /// The connection `stream_id`'s calls go on. (The map of streams is kept only with
    /// more than one connection, which the benches use, over a fixed set of streams.)
    fn for_stream(&self, stream_id: &str) -> &C {
        if self.conns.len() == 1 {
            return &self.conns[0];
        }
        let mut by_stream = self.by_stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dealt = by_stream.len();
        let slot = *by_stream.entry(stream_id.to_string()).or_insert(dealt % self.conns.len());
        &self.conns[slot]
    }
}

impl<C: DbContext> Drop for Connections<C> {
    fn drop(&mut self) {
        self.conns.iter().for_each(disconnect);
    }
}

/// SDK connections used for `publish` calls.
pub struct SdkPublisher {
    conns: Connections<DbConnection>,
    results: Receiver<Outcome>,
}

impl SdkPublisher {
    /// One connection.
    pub fn connect(url: &str, database: &str, token: &str) -> Result<SdkPublisher> {
        SdkPublisher::connect_many(url, database, token, 1)
    }

    /// `connections` connections, each stream's calls on one of them.
    pub fn connect_many(url: &str, database: &str, token: &str, connections: usize) -> Result<SdkPublisher> {
        let (conns, results) = Connections::open(connections, |tx| {
            let (published, segments) = (tx.clone(), tx.clone());
            connect("connecting the SDK publisher", DbConnection::builder, DbConnection::run_threaded, (url, database, token), tx, |conn: &DbConnection| {
                conn.reducers.on_publish(move |ctx, stream_id, _| {
                    let _ = published.send(outcome(stream_id, &ctx.event.status));
                });
                conn.reducers.on_publish_segment(move |ctx, stream_id, _| {
                    let _ = segments.send(outcome(stream_id, &ctx.event.status));
                });
            })
        })?;
        Ok(SdkPublisher { conns, results })
    }

    /// Sends one `publish` call; its [`Outcome`] arrives through [`SdkPublisher::next`].
    pub fn send(&self, stream_id: &str, events: Vec<PublishEvent>) -> Result<()> {
        use khala_client::module_bindings::publish;
        self.conns
            .for_stream(stream_id)
            .reducers
            .publish(stream_id.to_string(), events)
            .map_err(|e| ToolError::Http { what: format!("sending publish for {stream_id}"), detail: e.to_string() })
    }

    /// Sends one `publish_segment` call with segment `data` as the module stores it
    /// (`khala_proto::segment::encode`); its [`Outcome`] arrives through [`SdkPublisher::next`].
    pub fn send_segment(&self, stream_id: &str, data: Vec<u8>) -> Result<()> {
        use khala_client::module_bindings::publish_segment;
        self.conns
            .for_stream(stream_id)
            .reducers
            .publish_segment(stream_id.to_string(), data)
            .map_err(|e| ToolError::Http { what: format!("sending publish_segment for {stream_id}"), detail: e.to_string() })
    }

    /// The next outcome, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Outcome> {
        next_outcome(&self.results, timeout)
    }
}


/// The same, for the bench's bare baseline module: one pre-packed row per `insert` call.
pub struct BarePublisher {
    conns: Connections<crate::bare_bindings::DbConnection>,
    results: Receiver<Outcome>,
}

impl BarePublisher {
    /// One connection.
    pub fn connect(url: &str, database: &str, token: &str) -> Result<BarePublisher> {
        BarePublisher::connect_many(url, database, token, 1)
    }

    /// `connections` connections, each stream's calls on one of them.
    pub fn connect_many(url: &str, database: &str, token: &str, connections: usize) -> Result<BarePublisher> {
        use crate::bare_bindings::{insert as _, insert_guarded as _, DbConnection};
        let (conns, results) = Connections::open(connections, |tx| {
            let (inserted, guarded) = (tx.clone(), tx.clone());
            connect("connecting the bare publisher", DbConnection::builder, DbConnection::run_threaded, (url, database, token), tx, |conn: &DbConnection| {
                conn.reducers.on_insert(move |ctx, stream_id, _, _, _| {
                    let _ = inserted.send(outcome(stream_id, &ctx.event.status));
                });
                conn.reducers.on_insert_guarded(move |ctx, stream_id, _, _, _| {
                    let _ = guarded.send(outcome(stream_id, &ctx.event.status));
                });
            })
        })?;
        Ok(BarePublisher { conns, results })
    }

    /// Sends one `insert` of a pre-packed segment; its [`Outcome`] arrives through `next`.
    pub fn send(&self, stream_id: &str, first_seq: u64, last_seq: u64, data: Vec<u8>) -> Result<()> {
        use crate::bare_bindings::insert;
        self.conns
            .for_stream(stream_id)
            .reducers
            .insert(stream_id.to_string(), first_seq, last_seq, data)
            .map_err(|e| ToolError::Http { what: format!("sending insert for {stream_id}"), detail: e.to_string() })
    }

    /// The same into `bare_guarded_segment`, the table behind one row-level-security rule.
    pub fn send_guarded(&self, stream_id: &str, first_seq: u64, last_seq: u64, data: Vec<u8>) -> Result<()> {
        use crate::bare_bindings::insert_guarded;
        self.conns
            .for_stream(stream_id)
            .reducers
            .insert_guarded(stream_id.to_string(), first_seq, last_seq, data)
            .map_err(|e| ToolError::Http { what: format!("sending insert_guarded for {stream_id}"), detail: e.to_string() })
    }

    pub fn next(&self, timeout: Duration) -> Option<Outcome> {
        next_outcome(&self.results, timeout)
    }
}


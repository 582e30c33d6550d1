//! The SDK side of the client: a new `DbConnection` per attempt (the 1.x SDK has no
//! reconnect), and callbacks that forward everything into one channel for the sync loop.
//!
//! The client's subscription queries are fixed and unfiltered ([`queries`]); stream ids
//! travel only as typed reducer arguments, never inside SQL text, so no stream id can
//! change a query (fault 10 of the system Khala replaces escaped `"` but not `'`).

use crate::apply::SegmentIn;
use crate::error::ClientError;
use khala_proto::hash::{from_slice, Hash32, GENESIS};
use crate::module_bindings::*;
use khala_proto::CodedError;
use spacetimedb_sdk::{DbContext, Status, Table, TableWithPrimaryKey};
use std::sync::mpsc::Sender;

/// Everything the connection reports, in the order it happened: plain data (rows are
/// copied out of the generated types), so the pure [`Driver`](crate::sync::driver::Driver)
/// takes it as it is and its tests build it without a server.
#[derive(Debug, Clone)]
pub enum Msg {
    Connected(spacetimedb_sdk::Identity),
    Disconnected(Option<String>),
    /// A segment, decoded and hashed on the SDK's thread, and its `published_at` (micros,
    /// for the delivery latency metric).
    Segment(String, Result<SegmentIn, Unreadable>, i64),
    Stream(StreamRow),
    StreamGone(String),
    Grant(GrantRow),
    GrantGone(GrantRow),
    WindowOpen(WindowRow),
    WindowClosed(WindowRow),
    /// The result of an `open_window` / `close_window` call.
    WindowCall { stream_id: String, bucket: u64, open: bool, result: Result<(), String> },
    Applied(u64),
    SubscriptionError(u64, String),
    Hello(Result<(), String>),
    Acked { stream_id: String, seq: u64, result: Result<(), String> },
    /// Not the SDK's: the checkpoint writer (`sync/writer.rs`) has an answer. It wakes
    /// the sync loop, which takes the answer from the writer; the driver never sees it.
    CheckpointWritten,
}

/// What the client reads of a `stream_view` row (module/src/stream_view.rs): the
/// stream's epoch and floor, and a head refreshed every 250 ms while it is published.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRow {
    pub stream_id: String,
    pub epoch: u32,
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub head_hash: Hash32,
}

/// What the client reads of a `stream_grant` row.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantRow {
    pub grantee: spacetimedb_sdk::Identity,
    pub stream_id: String,
    pub subscribe: bool,
    pub ack: bool,
    pub expires_at_micros: i64,
}

/// What the client reads of a `client_window` row.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub grantee: spacetimedb_sdk::Identity,
    pub stream_id: String,
    pub bucket: u64,
}

impl From<&StreamView> for StreamRow {
    fn from(r: &StreamView) -> Self {
        StreamRow { stream_id: r.stream_id.clone(), epoch: r.epoch, head_seq: r.head_seq, oldest_seq: r.oldest_seq, head_hash: from_slice(&r.head_hash).unwrap_or(GENESIS) }
    }
}

impl From<&StreamGrant> for GrantRow {
    fn from(r: &StreamGrant) -> Self {
        GrantRow { grantee: r.grantee, stream_id: r.stream_id.clone(), subscribe: r.subscribe, ack: r.ack, expires_at_micros: r.expires_at.to_micros_since_unix_epoch() }
    }
}

impl From<&ClientWindow> for WindowRow {
    fn from(r: &ClientWindow) -> Self {
        WindowRow { grantee: r.grantee, stream_id: r.stream_id.clone(), bucket: r.bucket }
    }
}

fn status(s: &Status) -> Result<(), String> {
    match s {
        Status::Committed => Ok(()),
        Status::Failed(message) => Err(message.to_string()),
        Status::OutOfEnergy => Err(CodedError::new(khala_proto::ErrorCode::RateLimited, "out of energy").to_string()),
    }
}

/// The subscription queries of a client. They are unfiltered on purpose: row-level
/// security already narrows them to the caller's grants and open windows, and 1.2 cannot
/// plan a filter on a table whose RLS rule is a join (see `module/src/windows.rs`).
pub fn queries() -> Vec<String> {
    ["stream_grant", "stream_view", "client_window", "stream_segment"].iter().map(|t| format!("SELECT * FROM {t}")).collect()
}

/// A segment row whose events do not decode: refused like one that does not verify.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub first_seq: u64,
    pub last_seq: u64,
    pub detail: String,
}

/// Decodes a segment row and computes its chain hashes.
fn segment_in(row: &StreamSegment) -> Result<SegmentIn, Unreadable> {
    // One copy of the row's bytes; every payload is then a slice of it.
    let events = khala_proto::segment::decode_view(bytes::Bytes::copy_from_slice(&row.data))
        .map_err(|e| Unreadable { first_seq: row.first_seq, last_seq: row.last_seq, detail: format!("segment {} of {} does not decode: {e}", row.id, row.stream_id) })?;
    Ok(SegmentIn::new(
        &row.stream_id,
        row.epoch,
        row.first_seq,
        row.last_seq,
        from_slice(&row.prev_hash).unwrap_or(GENESIS),
        from_slice(&row.last_hash).unwrap_or(GENESIS),
        events,
    ))
}

/// The HTTP status the server refused the WebSocket handshake with, as tungstenite's
/// typed field.
///
/// SDK 1.2.0 wraps the failure as `Error::FailedToConnect { source: InternalError }`;
/// `InternalError` hides its cause from `source()` but gives it out through the
/// deprecated `cause()`: the SDK's `WsError::Tungstenite`, whose `source()` is
/// tungstenite's own `Error::Http(response)`.
fn handshake_status(err: &spacetimedb_sdk::Error) -> Option<u16> {
    let spacetimedb_sdk::Error::FailedToConnect { source } = err else { return None };
    #[allow(deprecated)]
    let ws = std::error::Error::cause(source)?;
    match ws.source()?.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// How long opening the WebSocket may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Calls `on_panic` if the SDK's connection thread (`run_threaded`'s `runner`) panics.
/// SDK 1.2.0's thread panics instead of reporting a disconnect when a reducer call is
/// queued just as the socket closes (db_connection.rs:353): no disconnect callback runs,
/// and without this the caller would wait for results that never come. Found by the
/// network drills (docs/RELIABILITY.md).
pub fn on_runner_panic(runner: std::thread::JoinHandle<()>, on_panic: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        if runner.join().is_err() {
            on_panic();
        }
    });
}

/// Runs an SDK `disconnect()`, which panics on the sender lock that the panic above
/// poisoned: contained, since the connection is gone either way.
pub fn disconnect_contained(disconnect: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(disconnect));
}

/// Runs an SDK `build()` on a thread of its own and waits at most `limit` for it: the
/// SDK's `build()` waits for the WebSocket handshake with no time limit, so a connection
/// that is accepted and never answered (half-open) would hang the caller for ever.
/// `None` when the limit passed; a connection that arrives after that is closed by the
/// thread. Found by the network drills (docs/RELIABILITY.md).
pub fn build_within<C: DbContext + Send + 'static>(
    limit: std::time::Duration,
    build: impl FnOnce() -> Result<C, spacetimedb_sdk::Error> + Send + 'static,
) -> Option<Result<C, spacetimedb_sdk::Error>> {
    let (built_tx, built) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::SendError(Ok(late))) = built_tx.send(build()) {
            let _ = late.disconnect();
        }
    });
    built.recv_timeout(limit).ok()
}

/// Opens a connection and registers the callbacks that feed `tx`.
pub fn connect(url: &str, database: &str, token: &str, compress: bool, tx: &Sender<Msg>) -> Result<DbConnection, ClientError> {
    let on_connect = tx.clone();
    let on_disconnect = tx.clone();
    let (url, database, token) = (url.to_string(), database.to_string(), token.to_string());
    let built = build_within(CONNECT_TIMEOUT, move || {
        DbConnection::builder()
            .with_uri(url)
            .with_module_name(database)
            .with_token(Some(token))
            .with_compression(if compress { spacetimedb_sdk::Compression::Gzip } else { spacetimedb_sdk::Compression::None })
            // Light mode: no copy of other callers' reducer arguments (a whole publish batch)
            // rides along with each update. Our own calls' results still arrive.
            .with_light_mode(true)
            .on_connect(move |_, identity, _| {
                let _ = on_connect.send(Msg::Connected(identity));
            })
            .on_disconnect(move |_, err| {
                let _ = on_disconnect.send(Msg::Disconnected(err.map(|e| e.to_string())));
            })
            .build()
    });
    let conn = built
        .ok_or_else(|| ClientError::Connect(format!("no WebSocket handshake within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| match handshake_status(&e) {
            Some(401) => ClientError::Unauthorized(e.to_string()),
            _ => ClientError::Connect(e.to_string()),
        })?;

    let t = tx.clone();
    conn.db.stream_segment().on_insert(move |_, row| {
        let _ = t.send(Msg::Segment(row.stream_id.clone(), segment_in(row), row.published_at.to_micros_since_unix_epoch()));
    });
    let t = tx.clone();
    conn.db.stream_view().on_insert(move |_, row| {
        let _ = t.send(Msg::Stream(row.into()));
    });
    let t = tx.clone();
    conn.db.stream_view().on_update(move |_, _, row| {
        let _ = t.send(Msg::Stream(row.into()));
    });
    let t = tx.clone();
    conn.db.stream_view().on_delete(move |_, row| {
        let _ = t.send(Msg::StreamGone(row.stream_id.clone()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_insert(move |_, row| {
        let _ = t.send(Msg::Grant(row.into()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_update(move |_, _, row| {
        let _ = t.send(Msg::Grant(row.into()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_delete(move |_, row| {
        let _ = t.send(Msg::GrantGone(row.into()));
    });
    let t = tx.clone();
    conn.db.client_window().on_insert(move |_, row| {
        let _ = t.send(Msg::WindowOpen(row.into()));
    });
    let t = tx.clone();
    conn.db.client_window().on_delete(move |_, row| {
        let _ = t.send(Msg::WindowClosed(row.into()));
    });
    let t = tx.clone();
    conn.reducers.on_open_window(move |ctx, stream_id, bucket| {
        let _ = t.send(Msg::WindowCall { stream_id: stream_id.clone(), bucket: *bucket, open: true, result: status(&ctx.event.status) });
    });
    let t = tx.clone();
    conn.reducers.on_close_window(move |ctx, stream_id, bucket| {
        let _ = t.send(Msg::WindowCall { stream_id: stream_id.clone(), bucket: *bucket, open: false, result: status(&ctx.event.status) });
    });
    let t = tx.clone();
    conn.reducers.on_hello(move |ctx, _, _| {
        let _ = t.send(Msg::Hello(status(&ctx.event.status)));
    });
    let t = tx.clone();
    conn.reducers.on_ack(move |ctx, stream_id, seq, _| {
        let _ = t.send(Msg::Acked { stream_id: stream_id.clone(), seq: *seq, result: status(&ctx.event.status) });
    });
    let t = tx.clone();
    on_runner_panic(conn.run_threaded(), move || {
        let _ = t.send(Msg::Disconnected(Some("the SDK's connection thread panicked".into())));
    });
    Ok(conn)
}

/// Subscribes `queries` under `tag`; `Applied(tag)` or `SubscriptionError(tag, ..)` follows.
pub fn subscribe(conn: &DbConnection, tag: u64, queries: Vec<String>, tx: &Sender<Msg>) -> SubscriptionHandle {
    let applied = tx.clone();
    let failed = tx.clone();
    conn.subscription_builder()
        .on_applied(move |_| {
            let _ = applied.send(Msg::Applied(tag));
        })
        .on_error(move |_, e| {
            let _ = failed.send(Msg::SubscriptionError(tag, e.to_string()));
        })
        .subscribe(queries)
}

#[cfg(test)]
mod tests {
    use super::handshake_status;
    use spacetimedb_sdk::__codegen::InternalError;

    /// The SDK's `WsError::Tungstenite` as far as the chain goes: its text names the URI,
    /// its source is tungstenite's error.
    #[derive(Debug)]
    struct Ws(&'static str, tungstenite::Error);
    impl std::fmt::Display for Ws {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "Error in WebSocket connection with {}: {}", self.0, self.1)
        }
    }
    impl std::error::Error for Ws {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    fn failed(uri: &'static str, inner: tungstenite::Error) -> spacetimedb_sdk::Error {
        spacetimedb_sdk::Error::FailedToConnect { source: InternalError::failed_parse("x", "y").with_cause(Ws(uri, inner)) }
    }

    fn refused(status: u16) -> tungstenite::Error {
        let response = tungstenite::http::Response::builder().status(status).body(None).unwrap();
        tungstenite::Error::Http(response)
    }

    #[test]
    fn reads_the_handshake_status_from_tungstenites_typed_error() {
        assert_eq!(handshake_status(&failed("ws://127.0.0.1:3000/v1/database/d/subscribe", refused(401))), Some(401));
        assert_eq!(handshake_status(&failed("ws://127.0.0.1:3000/", refused(404))), Some(404));
        // A port or a path that looks like a status is never read; other errors have none.
        let io = tungstenite::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(handshake_status(&failed("ws://127.0.0.1:34017/v1/database/401/subscribe", io)), None);
        assert_eq!(handshake_status(&spacetimedb_sdk::Error::Disconnected), None);
    }
}

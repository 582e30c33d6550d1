//! The SDK side of the client: a new `DbConnection` per attempt (the 1.x SDK has no
//! reconnect), and callbacks that forward everything into one channel for the sync loop.
//!
//! The client's subscription queries are fixed and unfiltered ([`queries`]); stream ids
//! travel only as typed reducer arguments, never inside SQL text, so no stream id can
//! change a query (fault 10 of the system Khala replaces escaped `"` but not `'`).

use crate::apply::SegmentIn;
use crate::error::ClientError;
use khala_proto::hash::{from_slice, GENESIS};
use crate::module_bindings::*;
use khala_proto::CodedError;
use spacetimedb_sdk::{DbContext, Status, Table, TableWithPrimaryKey};
use std::sync::mpsc::Sender;

/// Everything the connection reports, in the order it happened.
#[derive(Debug)]
pub enum Msg {
    Connected(spacetimedb_sdk::Identity),
    Disconnected(Option<String>),
    /// A segment, decoded and hashed on the SDK's thread, and its `published_at` (micros,
    /// for the delivery latency metric).
    Segment(String, Result<SegmentIn, String>, i64),
    Stream(Stream),
    StreamGone(String),
    Grant(StreamGrant),
    GrantGone(StreamGrant),
    WindowOpen(ClientWindow),
    WindowClosed(ClientWindow),
    /// The result of an `open_window` / `close_window` call.
    WindowCall { stream_id: String, bucket: u64, open: bool, result: Result<(), String> },
    Applied(u64),
    SubscriptionError(u64, String),
    Hello(Result<(), String>),
    Acked { stream_id: String, seq: u64, result: Result<(), String> },
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
    ["stream_grant", "stream", "client_window", "stream_segment"].iter().map(|t| format!("SELECT * FROM {t}")).collect()
}

/// Decodes a segment row and computes its chain hashes.
fn segment_in(row: &StreamSegment) -> Result<SegmentIn, String> {
    let events = khala_proto::segment::decode(&row.data).map_err(|e| format!("segment {} of {} does not decode: {e}", row.id, row.stream_id))?;
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

/// The HTTP status the server refused the WebSocket handshake with. The SDK keeps
/// tungstenite's typed error only behind `InternalError::cause`, which it hides from
/// `source()` and which cannot be downcast (not `'static`), so the status is read where
/// tungstenite writes it, `HTTP error: 401 Unauthorized`, and nowhere else in the text
/// (the URI in the same message may hold a port such as 34017).
fn handshake_status(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("HTTP error: ")?;
    rest.get(..3).filter(|code| code.bytes().all(|b| b.is_ascii_digit())).and_then(|code| code.parse().ok())
}

/// How long opening the WebSocket may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Opens a connection and registers the callbacks that feed `tx`.
pub fn connect(url: &str, database: &str, token: &str, compress: bool, tx: &Sender<Msg>) -> Result<DbConnection, ClientError> {
    let on_connect = tx.clone();
    let on_disconnect = tx.clone();
    // The SDK's `build()` waits for the WebSocket handshake with no time limit, so a
    // connection that is accepted and never answered (half-open) would hang the client
    // for ever: it runs on its own thread, and we give up after CONNECT_TIMEOUT (a late
    // connection is closed by that thread). Found by the network drill (docs/RELIABILITY.md).
    let (url, database, token) = (url.to_string(), database.to_string(), token.to_string());
    let (built_tx, built) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = DbConnection::builder()
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
            .build();
        if let Err(std::sync::mpsc::SendError(Ok(late))) = built_tx.send(result) {
            let _ = late.disconnect();
        }
    });
    let conn = built
        .recv_timeout(CONNECT_TIMEOUT)
        .map_err(|_| ClientError::Connect(format!("no WebSocket handshake within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| {
            let text = e.to_string();
            match handshake_status(&text) {
                Some(401) => ClientError::Unauthorized(text),
                _ => ClientError::Connect(text),
            }
        })?;

    let t = tx.clone();
    conn.db.stream_segment().on_insert(move |_, row| {
        let _ = t.send(Msg::Segment(row.stream_id.clone(), segment_in(row), row.published_at.to_micros_since_unix_epoch()));
    });
    let t = tx.clone();
    conn.db.stream().on_insert(move |_, row| {
        let _ = t.send(Msg::Stream(row.clone()));
    });
    let t = tx.clone();
    conn.db.stream().on_update(move |_, _, row| {
        let _ = t.send(Msg::Stream(row.clone()));
    });
    let t = tx.clone();
    conn.db.stream().on_delete(move |_, row| {
        let _ = t.send(Msg::StreamGone(row.stream_id.clone()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_insert(move |_, row| {
        let _ = t.send(Msg::Grant(row.clone()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_update(move |_, _, row| {
        let _ = t.send(Msg::Grant(row.clone()));
    });
    let t = tx.clone();
    conn.db.stream_grant().on_delete(move |_, row| {
        let _ = t.send(Msg::GrantGone(row.clone()));
    });
    let t = tx.clone();
    conn.db.client_window().on_insert(move |_, row| {
        let _ = t.send(Msg::WindowOpen(row.clone()));
    });
    let t = tx.clone();
    conn.db.client_window().on_delete(move |_, row| {
        let _ = t.send(Msg::WindowClosed(row.clone()));
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
    let runner = conn.run_threaded();
    let t = tx.clone();
    std::thread::spawn(move || {
        // SDK 1.2.0's thread panics instead of reporting a disconnect when a reducer call
        // is queued just as the socket closes (db_connection.rs:353): without this the
        // session would wait for messages that never come. Found by the network drill.
        if runner.join().is_err() {
            let _ = t.send(Msg::Disconnected(Some("the SDK's connection thread panicked".into())));
        }
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

    #[test]
    fn reads_the_handshake_status_and_nothing_else() {
        let refused = "Failed to connect: Failed to initiate WebSocket connection: Error in WebSocket connection with ws://127.0.0.1:3000/v1/database/d/subscribe: HTTP error: 401 Unauthorized";
        assert_eq!(handshake_status(refused), Some(401));
        assert_eq!(handshake_status("Error in WebSocket connection with ws://127.0.0.1:34017/v1/database/unauthorized/subscribe: IO error: refused"), None);
        assert_eq!(handshake_status("HTTP error: 404 Not Found"), Some(404));
    }
}

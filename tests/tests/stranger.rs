//! The module as an attacker sees it. Every other suite is written by the author of the
//! feature it tests; this one is written against the module: it builds a small world
//! whose every table holds rows, then reads and writes as identities that should get
//! nothing of it, over every door the server has: HTTP SQL (reads and DML), HTTP reducer
//! calls, SDK subscriptions, the raw WebSocket protocol (which does not depend on the
//! generated bindings and shows other callers' reducer arguments, if any leak), the
//! plan cache, the engine's system tables and the database's management endpoints.
//!
//! The world (per test, on a fresh database): the owner creates `s.a` and `s.b`; a
//! publisher of `*` publishes to both; the *victim* holds a subscribe+ack grant on `s.b`,
//! is connected through the SDK, has a replay window open on `s.b` and has acked it; a
//! subscriber of `s.a` (also connected, window open, acked) and an ack-only grantee of
//! `s.b` round it off.
//!
//! The attackers:
//! - `stranger`: a fresh identity with no role and no grant;
//! - `anonymous`: HTTP requests with no `Authorization` header at all (the server mints a
//!   throwaway identity per request) and an SDK connection without a token;
//! - `pub_a`: a publisher whose only publish grant is `s.a`, aiming at `s.b`;
//! - `sub_a`: a subscribe+ack grantee of `s.a`, aiming at `s.b`;
//! - and, for SQL and the reducers, `ack_b`, an ack-only grantee of `s.b` probing for
//!   its head.
//!
//! Tables and reducers are listed from the running module, not by hand: a new public
//! table or reducer fails the suite until its attack is written here.
//!
//! Checked to fail (by publishing deliberately broken builds of the module): no RLS rule
//! on `stream_grant`; the stream rule ignoring the `subscribe` flag; `publish` checking
//! the grant after the batch; `expire_grant` callable by anyone; an ack-only grantee told
//! the real error; an exact publish grant reaching every stream; no `system_tables.rs`.
//!
//! Each test also checks what the attacker *is* allowed (its own rows, `s.a`), so that a
//! test that sees nothing because nothing works fails instead of passing.
//!
//! The database owner bypasses row-level security, so the owner only sets up and takes
//! snapshots; attackers are always other identities.

use khala_client::module_bindings::*;
use khala_proto::{CodedError, ErrorCode};
use khala_tests::verify::stream;
use khala_tests::{event_json, sdk, shared_server, test_payload, wait_for, TestDb};
use khala_tools::api::{bytes_arg, identity_arg, Credentials, SqlRows};
use khala_tools::ToolError;
use serde_json::{json, Value};
use spacetimedb_sdk::{DbContext, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a test waits for something that should arrive.
const ARRIVE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------
// Raw HTTP and WebSocket: no client library, so no Authorization header unless we add
// one, and subscriptions that do not depend on the generated bindings.
// ------------------------------------------------------------------------------------

mod raw {
    use serde_json::{json, Value};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    fn authority(url: &str) -> String {
        url.trim_end_matches('/').trim_start_matches("http://").to_string()
    }

    pub struct Response {
        pub status: u16,
        pub body: String,
    }

    /// One HTTP/1.1 request; `token: None` sends no `Authorization` header at all.
    pub fn http(url: &str, method: &str, path: &str, token: Option<&str>, content_type: Option<&str>, body: &[u8]) -> Response {
        let host = authority(url);
        let mut stream = TcpStream::connect(&host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if let Some(token) = token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut body = raw[split + 4..].to_vec();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status");
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        Response { status, body: String::from_utf8_lossy(&body).into_owned() }
    }

    fn dechunk(mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&data[..eol]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
            data = &data[eol + 2..];
            if size == 0 || data.len() < size {
                break;
            }
            out.extend_from_slice(&data[..size]);
            data = &data[(size + 2).min(data.len())..];
        }
        out
    }

    /// Writes one masked client frame.
    fn write_frame(w: &mut TcpStream, opcode: u8, data: &[u8]) -> std::io::Result<()> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x80 | opcode];
        let len = data.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len < 65_536 {
            frame.push(0x80 | 126);
            frame.extend((len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend((len as u64).to_be_bytes());
        }
        frame.extend(mask);
        frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        w.write_all(&frame)
    }

    /// Reads one whole data message (text or binary), answering pings on the way.
    fn read_message(r: &mut TcpStream, w: &Mutex<TcpStream>) -> std::io::Result<Vec<u8>> {
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; 2];
            r.read_exact(&mut h)?;
            let fin = h[0] & 0x80 != 0;
            let opcode = h[0] & 0x0f;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                r.read_exact(&mut b)?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                r.read_exact(&mut b)?;
                len = u64::from_be_bytes(b);
            }
            let mask = if h[1] & 0x80 != 0 {
                let mut m = [0u8; 4];
                r.read_exact(&mut m)?;
                Some(m)
            } else {
                None
            };
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            if let Some(m) = mask {
                data.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
            }
            match opcode {
                0x8 => return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, format!("closed: {}", String::from_utf8_lossy(&data)))),
                0x9 => write_frame(&mut w.lock().unwrap(), 0xA, &data)?,
                0xA => {}
                _ => {
                    payload.extend(data);
                    if fin {
                        return Ok(payload);
                    }
                }
            }
        }
    }

    #[derive(Default)]
    pub struct Received {
        pub messages: Vec<Value>,
        pub closed: Option<String>,
    }

    /// A WebSocket client speaking SpacetimeDB's JSON protocol (`v1.json.spacetimedb`).
    /// It keeps every message, so a test can search the raw text for what must not be
    /// there, reducer arguments of other callers included.
    pub struct Socket {
        writer: Arc<Mutex<TcpStream>>,
        received: Arc<(Mutex<Received>, Condvar)>,
        next_id: AtomicU32,
    }

    impl Socket {
        pub fn connect(url: &str, database: &str, token: Option<&str>) -> Socket {
            let host = authority(url);
            let mut stream = TcpStream::connect(&host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
            let mut req = format!(
                "GET /v1/database/{database}/subscribe?compression=None HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Protocol: v1.json.spacetimedb\r\n"
            );
            if let Some(token) = token {
                req.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            req.push_str("\r\n");
            stream.write_all(req.as_bytes()).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).expect("a WebSocket upgrade answer");
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "WebSocket upgrade refused: {head}");
            let mut reader = stream.try_clone().unwrap();
            let writer = Arc::new(Mutex::new(stream));
            let received: Arc<(Mutex<Received>, Condvar)> = Arc::default();
            let (w, rx) = (writer.clone(), received.clone());
            std::thread::spawn(move || loop {
                match read_message(&mut reader, &w) {
                    Ok(bytes) => {
                        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
                        rx.0.lock().unwrap().messages.push(value);
                        rx.1.notify_all();
                    }
                    Err(e) => {
                        rx.0.lock().unwrap().closed = Some(e.to_string());
                        rx.1.notify_all();
                        return;
                    }
                }
            });
            let socket = Socket { writer, received, next_id: AtomicU32::new(1) };
            socket.wait_for("the IdentityToken message", |m| m.get("IdentityToken").is_some(), 0);
            socket
        }

        fn send(&self, message: &Value) {
            write_frame(&mut self.writer.lock().unwrap(), 0x1, message.to_string().as_bytes()).expect("sending a WebSocket frame");
        }

        /// Waits for a message at index `from` or later that satisfies `pred`.
        fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool, from: usize) -> Value {
            let deadline = Instant::now() + Duration::from_secs(20);
            let (lock, cvar) = &*self.received;
            let mut got = lock.lock().unwrap();
            loop {
                if let Some(m) = got.messages.iter().skip(from).find(|m| pred(m)) {
                    return m.clone();
                }
                if let Some(closed) = &got.closed {
                    panic!("the WebSocket closed while waiting for {what}: {closed}");
                }
                let now = Instant::now();
                if now >= deadline {
                    panic!("timed out waiting for {what}");
                }
                got = cvar.wait_timeout(got, deadline - now).unwrap().0;
            }
        }

        pub fn message_count(&self) -> usize {
            self.received.0.lock().unwrap().messages.len()
        }

        /// The identity the server gave this connection (from its token).
        pub fn identity(&self) -> String {
            let m = self.wait_for("the IdentityToken message", |m| m.get("IdentityToken").is_some(), 0);
            let token = m["IdentityToken"]["token"].as_str().expect("a token");
            khala_tools::api::token_identity(token).expect("a SpacetimeDB token")
        }

        /// Subscribes to `queries` (one `SubscribeMulti`); `Err` holds the server's error.
        pub fn subscribe(&self, queries: &[&str]) -> Result<(), String> {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let from = self.message_count();
            self.send(&json!({ "SubscribeMulti": { "query_strings": queries, "request_id": id, "query_id": { "id": id } } }));
            let answer = self.wait_for(
                "the subscription's answer",
                |m| m.get("SubscriptionError").is_some() || m["SubscribeMultiApplied"]["request_id"] == json!(id),
                from,
            );
            match answer.get("SubscriptionError") {
                Some(e) => Err(e["error"].as_str().map_or_else(|| e.to_string(), str::to_string)),
                None => Ok(()),
            }
        }

        /// Every message received so far, as one text, for searching.
        pub fn text(&self) -> String {
            self.received.0.lock().unwrap().messages.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
        }

        /// The distinct rows of `table` this connection holds now (inserts minus deletes,
        /// in order), each as the JSON text the server sent.
        pub fn rows(&self, table: &str) -> Vec<String> {
            fn walk(v: &Value, table: &str, rows: &mut Vec<String>) {
                match v {
                    Value::Object(map) => {
                        if map.get("table_name").and_then(Value::as_str) == Some(table) {
                            for update in map.get("updates").and_then(Value::as_array).into_iter().flatten() {
                                for d in update["deletes"].as_array().into_iter().flatten() {
                                    let d = d.as_str().map_or_else(|| d.to_string(), str::to_string);
                                    if let Some(i) = rows.iter().position(|r| *r == d) {
                                        rows.remove(i);
                                    }
                                }
                                for i in update["inserts"].as_array().into_iter().flatten() {
                                    rows.push(i.as_str().map_or_else(|| i.to_string(), str::to_string));
                                }
                            }
                        } else {
                            map.values().for_each(|x| walk(x, table, rows));
                        }
                    }
                    Value::Array(items) => items.iter().for_each(|x| walk(x, table, rows)),
                    _ => {}
                }
            }
            let mut rows = Vec::new();
            for m in &self.received.0.lock().unwrap().messages {
                walk(m, table, &mut rows);
            }
            // Overlapping subscriptions (a table alone, then `*`) deliver a row once each.
            rows.sort();
            rows.dedup();
            rows
        }

        pub fn close(&self) {
            let _ = write_frame(&mut self.writer.lock().unwrap(), 0x8, &[]);
            let _ = self.writer.lock().unwrap().shutdown(std::net::Shutdown::Both);
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            self.close();
        }
    }
}

// ------------------------------------------------------------------------------------
// The world and its attackers.
// ------------------------------------------------------------------------------------

/// The victim's stream, and the one every attacker aims at.
const SB: &str = "s.b";
/// The stream some attackers may legitimately use.
const SA: &str = "s.a";
/// The victim side's stream addressed by key.
const SB_KEYED: &str = "s.b.keyed";
/// A stream that does not exist: refusals about it must read like refusals about `s.b`.
const NOWHERE: &str = "s.zz";
/// Events in `s.b` after set-up (its head).
const SB_HEAD: u64 = 7;
/// Events in `s.a` after set-up.
const SA_HEAD: u64 = 3;

struct World {
    db: TestDb,
    pub_all: Credentials,
    victim: Credentials,
    victim_conn: DbConnection,
    sub_a: Credentials,
    _sub_a_conn: DbConnection,
    pub_a: Credentials,
    stranger: Credentials,
    /// Ack scope on `s.b` and on the nonexistent `s.zz`, no subscribe.
    ack_b: Credentials,
}

/// A batch of events `from..from+n` of `stream_id`, keys `k<seq>`, `authority_seq = seq`.
fn batch(stream_id: &str, from: u64, n: u64) -> Value {
    Value::Array((from..from + n).map(|s| event_json(&format!("k{s}"), "test.event", &test_payload(stream_id, s), Some(s))).collect())
}

/// The same events as [`batch`], as one encoded segment (`publish_segment`'s argument).
fn segment_arg(stream_id: &str, from: u64, n: u64) -> Value {
    let events = (from..from + n)
        .map(|s| khala_proto::SegmentEvent { seq: s, kind: "test.event".into(), payload: test_payload(stream_id, s), idempotency_key: format!("k{s}"), occurred_at_micros: 0 })
        .collect();
    bytes_arg(&khala_proto::segment::encode(events))
}

fn head_hash(db: &TestDb, stream_id: &str) -> Vec<u8> {
    stream(db, stream_id).unwrap_or_else(|| panic!("stream {stream_id}")).head_hash
}

fn world(label: &str) -> World {
    let db = shared_server().new_database(label);
    // Compaction would merge the small set-up segments after 10 s and change
    // `stream_segment` under a before/after snapshot; a day keeps them as they are.
    db.call("set_compaction", json!([86_400]));
    db.call("create_stream", json!([SA, 0, 0]));
    // A policy (never reached here) makes the retention sweep visit `s.b` and write its
    // private hint rows and a wake-up for a day later, so those tables hold something
    // worth hiding too.
    db.call("create_stream", json!([SB, 1_000, 86_400]));
    let pub_all = db.publisher();
    let publish = |stream_id: &str, from: u64, n: u64| {
        db.call_as(&pub_all, "publish", json!([stream_id, batch(stream_id, from, n)])).unwrap_or_else(|e| panic!("publish {stream_id}: {e}"));
    };
    publish(SA, 1, SA_HEAD);
    publish(SB, 1, 4);
    publish(SB, 5, SB_HEAD - 4);
    // A stream addressed by idempotency key (no authority_seq), so the per-key index and
    // the keyed-stream table hold rows too. Its id starts with `s.b`: the leak searches
    // cover it, and no attacker may see it either.
    let keyed = json!([event_json("key-1", "test.event", b"{}", None), event_json("key-2", "test.event", b"{}", None)]);
    db.call_as(&pub_all, "publish", json!([SB_KEYED, keyed])).unwrap_or_else(|e| panic!("publish {SB_KEYED}: {e}"));
    let pub_a = db.publisher_for(&[SA]);

    let victim = db.new_identity();
    db.grant(&victim, SB, &["subscribe", "ack"], 3_600);
    let victim_conn = sdk::connect(&db, &victim);
    sdk::subscribe(&victim_conn, &["SELECT * FROM stream", "SELECT * FROM stream_segment"]);
    victim_conn.reducers.hello(khala_proto::PROTOCOL_VERSION, "0.1.0".into()).unwrap();
    db.open_window(&victim, SB, 0);
    db.call_as(&victim, "ack", json!([SB, SB_HEAD, bytes_arg(&head_hash(&db, SB))])).unwrap();
    wait_for("the victim's segments of s.b", ARRIVE, || {
        (victim_conn.db.stream_segment().iter().filter(|s| s.stream_id == SB).count() == 2).then_some(())
    });

    let sub_a = db.new_identity();
    db.grant(&sub_a, SA, &["subscribe", "ack"], 3_600);
    let sub_a_conn = sdk::connect(&db, &sub_a);
    db.open_window(&sub_a, SA, 0);
    db.call_as(&sub_a, "ack", json!([SA, SA_HEAD, bytes_arg(&head_hash(&db, SA))])).unwrap();

    let ack_b = db.new_identity();
    db.grant(&ack_b, SB, &["ack"], 3_600);
    db.grant(&ack_b, NOWHERE, &["ack"], 3_600);
    let stranger = db.new_identity();
    // The publishes' views are written by a refresh 250 ms later: settled before any
    // snapshot is taken.
    wait_for("the stream views to be refreshed", ARRIVE, || db.sql("SELECT * FROM view_stale").rows.is_empty().then_some(()));
    World { db, pub_all, victim, victim_conn, sub_a, _sub_a_conn: sub_a_conn, pub_a, stranger, ack_b }
}

/// One attacker: its credentials (`None`: no `Authorization` header at all), the hex
/// identity whose rows it may see (empty for anonymous: a new one per request), and the
/// streams it may read (grant or publish reach).
struct Attacker {
    name: &'static str,
    creds: Option<Credentials>,
    identity: String,
    streams: &'static [&'static str],
}

impl World {
    fn attackers(&self) -> Vec<Attacker> {
        let who = |name, c: &Credentials, streams| Attacker { name, creds: Some(c.clone()), identity: c.identity.to_ascii_lowercase(), streams };
        vec![
            who("stranger", &self.stranger, &[]),
            Attacker { name: "anonymous", creds: None, identity: String::new(), streams: &[] },
            who("pub_a", &self.pub_a, &[SA]),
            who("sub_a", &self.sub_a, &[SA]),
        ]
    }

    /// Identities no attacker may see a row of.
    fn others(&self) -> Vec<String> {
        vec![self.victim.identity.to_ascii_lowercase(), self.ack_b.identity.to_ascii_lowercase()]
    }

    fn sql_as(&self, who: &Attacker, query: &str) -> Result<SqlRows, String> {
        match &who.creds {
            Some(c) => self.db.api.sql(&self.db.name, query, &c.token).map_err(|e| e.to_string()),
            None => {
                let r = raw::http(&self.db.url, "POST", &format!("/v1/database/{}/sql", self.db.name), None, None, query.as_bytes());
                if !(200..300).contains(&r.status) {
                    return Err(format!("HTTP {}: {}", r.status, r.body.trim()));
                }
                Ok(parse_sql_body(&r.body))
            }
        }
    }

    fn call_as(&self, who: &Attacker, reducer: &str, args: Value) -> Result<(), ToolError> {
        match &who.creds {
            Some(c) => self.db.call_as(c, reducer, args),
            None => {
                let path = format!("/v1/database/{}/call/{reducer}", self.db.name);
                let r = raw::http(&self.db.url, "POST", &path, None, Some("application/json"), args.to_string().as_bytes());
                match r.status {
                    200..=299 => Ok(()),
                    530 => Err(ToolError::Reducer { reducer: reducer.into(), error: CodedError::parse(&r.body) }),
                    s => Err(ToolError::HttpStatus { what: format!("calling {reducer}"), status: s, body: r.body.trim().into() }),
                }
            }
        }
    }
}

/// The body of `/sql` as [`SqlRows`] (the same reading as `Api::sql`).
fn parse_sql_body(body: &str) -> SqlRows {
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("SQL answer {body}: {e}"));
    let statement = &body[0];
    let columns = statement["schema"]["elements"]
        .as_array()
        .map(|els| els.iter().map(|e| e["name"]["some"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default();
    let rows = statement["rows"].as_array().map(|rows| rows.iter().map(|r| r.as_array().cloned().unwrap_or_default()).collect()).unwrap_or_default();
    SqlRows { columns, rows }
}

/// An identity cell as lowercase hex without `0x`: SQL renders one as `["0x.."]`.
fn identity_hex(v: &Value) -> String {
    match v {
        Value::Array(items) if items.len() == 1 => identity_hex(&items[0]),
        Value::String(text) => text.trim_start_matches("0x").to_ascii_lowercase(),
        other => other["__identity__"].as_str().unwrap_or_default().trim_start_matches("0x").to_ascii_lowercase(),
    }
}

fn code(result: Result<(), ToolError>) -> ErrorCode {
    match result {
        Err(ToolError::Reducer { error, .. }) => error.code,
        other => panic!("expected a reducer error, got {other:?}"),
    }
}

fn refusal(result: Result<(), ToolError>) -> CodedError {
    match result {
        Err(ToolError::Reducer { error, .. }) => error,
        other => panic!("expected a reducer error, got {other:?}"),
    }
}

/// The module's tables as the owner sees them in `st_table`: name and whether public.
fn user_tables(db: &TestDb) -> BTreeMap<String, bool> {
    let rows = db.sql("SELECT * FROM st_table");
    rows.rows
        .iter()
        .filter(|r| rows.get(r, "table_type").is_some_and(|t| t.to_string().to_ascii_lowercase().contains("user")))
        .map(|r| {
            let name = rows.get(r, "table_name").and_then(Value::as_str).unwrap_or_default().to_string();
            let public = rows.get(r, "table_access").is_some_and(|a| a.to_string().to_ascii_lowercase().contains("public"));
            (name, public)
        })
        .collect()
}

/// Who may see a row of a public table.
enum Scope {
    /// Rows of the streams the caller may read (`stream_id` column).
    Streams,
    /// The caller's own rows (this identity column).
    Own(&'static str),
    /// Nobody but admins (no attacker is one).
    Admins,
}

/// Every public table with the rule an attacker's view must follow. A public table that
/// is not listed fails the suite: a new public table needs its attack reviewed here.
fn scope(table: &str) -> Scope {
    match table {
        "stream" | "stream_view" | "stream_segment" => Scope::Streams,
        "stream_grant" | "publish_grant" | "stream_publisher" | "client_ack" | "client_window" => Scope::Own("grantee"),
        "identity_role" | "connection" => Scope::Own("identity"),
        "presence" => Scope::Admins,
        other => panic!("public table {other} has no attacker expectation in tests/tests/stranger.rs; add one"),
    }
}

/// The rows of `table` (from the owner's `all`) that `who` may see.
fn allowed(all: &SqlRows, table: &str, who: &Attacker) -> Vec<String> {
    let keep = |r: &Vec<Value>| match scope(table) {
        Scope::Streams => all.get(r, "stream_id").and_then(Value::as_str).is_some_and(|s| who.streams.contains(&s)),
        Scope::Own(col) => !who.identity.is_empty() && all.get(r, col).is_some_and(|v| identity_hex(v) == who.identity),
        Scope::Admins => false,
    };
    sorted(all.rows.iter().filter(|r| keep(r)).cloned().collect())
}

fn sorted(rows: Vec<Vec<Value>>) -> Vec<String> {
    let mut out: Vec<String> = rows.iter().map(|r| Value::Array(r.clone()).to_string()).collect();
    out.sort();
    out
}

/// Fails if `text` names `s.b` or one of `others`' identities.
fn assert_clean(text: &str, others: &[String], context: &str) {
    let lower = text.to_ascii_lowercase();
    assert!(!lower.contains(SB), "{context}: {SB} leaked: {}", excerpt(&lower, SB));
    for id in others {
        assert!(!lower.contains(id.as_str()), "{context}: identity {id} leaked: {}", excerpt(&lower, id));
    }
}

fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at].char_indices().rev().nth(200).map_or(0, |(i, _)| i);
    text[start..].chars().take(400 + needle.len()).collect()
}

// ------------------------------------------------------------------------------------
// 1. Plain HTTP SQL.
// ------------------------------------------------------------------------------------

#[test]
fn sql_shows_each_attacker_exactly_its_own_rows_and_refuses_its_writes() {
    let w = world("sql");
    let db = &w.db;
    let tables = user_tables(db);
    // Every table has rows to leak (the sweep writes its private hints within a second).
    // A table listed here is empty: extend `world` so that it holds rows to attack. But
    // `sweep_pending`: a row there lives until the next sweep run (under a second), since
    // segments too young to merge leave a `compaction_wake` instead; it is private, and
    // refused to every attacker below whatever it holds.
    // `view_stale` and `view_refresh` hold a published stream until its view's refresh,
    // 250 ms later.
    let transient = ["sweep_pending", "view_stale", "view_refresh"];
    let empty = || -> Vec<&String> { tables.keys().filter(|t| !transient.contains(&t.as_str()) && db.sql(&format!("SELECT * FROM {t}")).rows.is_empty()).collect() };
    let deadline = std::time::Instant::now() + ARRIVE;
    while !empty().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(empty().is_empty(), "tables without rows to attack: {:?}", empty());
    for private in ["khala_config", "event_key", "window_churn", "grant_expiry_schedule", "grant_sweep_schedule", "grant_sweep_state", "retention_schedule", "compaction_schedule", "sweep_pending", "retention_wake", "compaction_wake", "sweep_seeded", "sweep_visits", "view_stale", "view_refresh"] {
        assert_eq!(tables.get(private), Some(&false), "{private} is a private table");
    }
    let owner_view: BTreeMap<&String, SqlRows> = tables.keys().map(|t| (t, db.sql(&format!("SELECT * FROM {t}")))).collect();
    // Here the ack-only grantee of s.b attacks too: its own grants name s.b, so for it
    // only the identities are searched; the exact comparison still holds it to them.
    let mut attackers = w.attackers();
    attackers.push(Attacker { name: "ack_b", creds: Some(w.ack_b.clone()), identity: w.ack_b.identity.to_ascii_lowercase(), streams: &[] });
    let others = |who: &Attacker| -> Vec<String> { w.others().into_iter().filter(|id| *id != who.identity).collect() };
    let clean = |who: &Attacker, text: &str, context: &str| {
        let text = if who.name == "ack_b" { text.replace(SB, "") } else { text.to_string() };
        assert_clean(&text, &others(who), context);
    };

    for who in &attackers {
        for (table, public) in &tables {
            let query = format!("SELECT * FROM {table}");
            let got = w.sql_as(who, &query);
            let context = format!("{} ran `{query}`", who.name);
            if !public {
                // Refused exactly as a table that does not exist (or, were that to change,
                // empty).
                match &got {
                    Err(e) => assert!(e.contains(&format!("`{table}` is not a valid table")), "{context}: {e}"),
                    Ok(rows) => assert!(rows.rows.is_empty(), "{context}: a private table answered {:?}", rows.rows),
                }
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{context}: {e}"));
            clean(who, &Value::from(got.rows.iter().map(|r| Value::Array(r.clone())).collect::<Vec<_>>()).to_string(), &context);
            assert_eq!(sorted(got.rows.clone()), allowed(&owner_view[table], table, who), "{context}: not exactly its own rows");
        }
    }

    // Positive controls: what the s.a grantees must see (the exact comparison above
    // would pass on an empty database; these cannot).
    let (stranger, anonymous, pub_a, sub_a, ack_b) = (&attackers[0], &attackers[1], &attackers[2], &attackers[3], &attackers[4]);
    let count = |who: &Attacker, q: &str| w.sql_as(who, q).unwrap_or_else(|e| panic!("{q}: {e}")).rows.len();
    assert_eq!(count(sub_a, "SELECT * FROM stream"), 1, "sub_a sees s.a's stream row");
    assert_eq!(count(sub_a, "SELECT * FROM stream_view"), 1, "sub_a sees s.a's view");
    assert_eq!(count(pub_a, "SELECT * FROM stream_view"), 1, "pub_a sees s.a's view (its publish reach)");
    assert_eq!(count(ack_b, "SELECT * FROM stream_view"), 0, "an ack scope does not show the view");
    assert_eq!(count(sub_a, "SELECT * FROM stream_segment"), 1, "sub_a sees s.a's segment through its window");
    assert_eq!(count(sub_a, "SELECT * FROM stream_grant"), 1, "sub_a sees its own grant");
    assert_eq!(count(sub_a, "SELECT * FROM client_ack"), 1, "sub_a sees its own ack");
    assert_eq!(count(sub_a, "SELECT * FROM client_window"), 1, "sub_a sees its own window");
    assert_eq!(count(sub_a, "SELECT * FROM connection"), 1, "sub_a sees its own connection");
    assert_eq!(count(pub_a, "SELECT * FROM stream"), 1, "pub_a sees s.a's stream row (its publish reach)");
    assert_eq!(count(pub_a, "SELECT * FROM stream_segment"), 1, "pub_a sees s.a's segment (divergence checks)");
    assert_eq!(count(pub_a, "SELECT * FROM publish_grant"), 1, "pub_a sees its own publish grant");
    assert_eq!(count(pub_a, "SELECT * FROM stream_publisher"), 1, "pub_a sees its own reach row");
    assert_eq!(count(pub_a, "SELECT * FROM identity_role"), 1, "pub_a sees its own publisher role");
    assert_eq!(count(ack_b, "SELECT * FROM stream_grant"), 2, "ack_b sees its own two grants");
    assert_eq!(count(ack_b, "SELECT * FROM stream"), 0, "an ack scope does not show the stream");
    for who in [stranger, anonymous] {
        for table in tables.iter().filter(|(_, public)| **public).map(|(t, _)| t) {
            assert_eq!(count(who, &format!("SELECT * FROM {table}")), 0, "{} sees nothing of {table}", who.name);
        }
    }

    // Crafted reads: filters, joins, aggregates, limits. RLS applies to every table a
    // query names, so none of them reaches s.b.
    let crafted = [
        format!("SELECT * FROM stream WHERE stream_id = '{SB}'"),
        format!("SELECT * FROM stream_view WHERE stream_id = '{SB}'"),
        format!("SELECT * FROM stream_segment WHERE stream_id = '{SB}'"),
        format!("SELECT * FROM client_ack WHERE stream_id = '{SB}'"),
        format!("SELECT * FROM stream_grant WHERE grantee = 0x{}", w.victim.identity),
        format!("SELECT * FROM connection WHERE identity = 0x{}", w.victim.identity),
        format!("SELECT stream.* FROM stream JOIN stream_grant ON stream.stream_id = stream_grant.stream_id WHERE stream_grant.stream_id = '{SB}'"),
        format!("SELECT stream_segment.* FROM stream_segment JOIN stream ON stream_segment.stream_id = stream.stream_id WHERE stream.stream_id = '{SB}'"),
        format!("SELECT COUNT(*) AS n FROM stream_segment WHERE stream_id = '{SB}'"),
        "SELECT * FROM stream LIMIT 100".to_string(),
    ];
    for who in &attackers {
        for q in &crafted {
            match w.sql_as(who, q) {
                Err(e) => panic!("{} ran `{q}`: {e} (a well-formed read answers, with what RLS allows)", who.name),
                Ok(rows) => {
                    let text = Value::from(rows.rows.iter().map(|r| Value::Array(r.clone())).collect::<Vec<_>>()).to_string();
                    clean(who, &text, &format!("{} ran `{q}`", who.name));
                    if q.starts_with("SELECT COUNT") {
                        assert_eq!(rows.rows.first().and_then(|r| r.first()), Some(&json!(0)), "{} counted s.b's segments", who.name);
                    } else if !q.contains("LIMIT") {
                        assert!(rows.rows.is_empty(), "{} ran `{q}` and got {:?}", who.name, rows.rows);
                    }
                }
            }
        }
        let n = w.sql_as(who, "SELECT COUNT(*) AS n FROM stream").unwrap();
        assert_eq!(n.rows[0][0], json!(who.streams.len()), "{} counts only the streams it may read", who.name);
        for q in ["SELECT COUNT(*) AS n FROM event_key", "SELECT stream.* FROM stream JOIN event_key ON stream.head_seq = event_key.seq"] {
            if let Ok(rows) = w.sql_as(who, q) {
                let zero = rows.rows.is_empty() || rows.rows[0].first() == Some(&json!(0));
                assert!(zero, "{} read the private event_key through `{q}`: {:?}", who.name, rows.rows);
            }
        }
    }

    // Writes through SQL (DML) are the owner's alone.
    let before = snapshot(db);
    let dml = [
        "DELETE FROM client_ack".to_string(),
        "DELETE FROM stream_grant".to_string(),
        format!("UPDATE stream SET head_seq = 0 WHERE stream_id = '{SB}'"),
        format!("UPDATE stream_grant SET stream_id = '{SB}'"),
        format!("DELETE FROM stream_segment WHERE stream_id = '{SB}'"),
        "UPDATE khala_config SET max_batch_events = 1".to_string(),
        "INSERT INTO event_key (key_hash, seq, payload_hash) VALUES (1, 1, 1)".to_string(),
        "INSERT INTO khala_config (id, max_payload_bytes, max_batch_events, max_batch_bytes, protocol_min, protocol_max, min_client_build, \
         retention_chunk_segments, compact_min_age_secs) VALUES (7, 1, 1, 1, 1, 1, '0.1.0', 1, 1)"
            .to_string(),
        // 1.2's SQL has no timestamp literals and every public table has a timestamp
        // column, so INSERTs are aimed at private tables; escalation goes by UPDATE.
        "UPDATE identity_role SET role = 'admin'".to_string(),
        format!("UPDATE stream_grant SET grantee = 0x{} WHERE stream_id = '{SB}'", w.stranger.identity),
        "SET row_limit = 1".to_string(),
    ];
    for who in &attackers {
        for q in &dml {
            let err = w.sql_as(who, q).err().unwrap_or_else(|| panic!("{} ran `{q}` and it was accepted", who.name));
            // Statements on public tables are well-formed, so they are refused for who
            // asks, not for their form; private tables do not exist for a non-owner.
            let private = tables.iter().any(|(t, public)| !public && q.contains(&format!(" {t} ")));
            let why = if private { "is not a valid table" } else { "Only owners are authorized to run SQL DML statements" };
            assert!(err.contains(why), "{} ran `{q}`: {err}", who.name);
        }
    }
    assert_unchanged(&before, &snapshot(db));
    // And the DML checks can fail: the owner's own DELETE works.
    db.sql(&format!("DELETE FROM client_ack WHERE stream_id = '{SA}'"));
    assert_eq!(db.sql("SELECT * FROM client_ack").rows.len(), 1);
}

// ------------------------------------------------------------------------------------
// Snapshots of every table, as the owner.
// ------------------------------------------------------------------------------------

/// Tables that change on their own while a test runs, whatever the attackers do:
/// - `sweep_state`, `stream_sweep`, `sweep_pending`, `retention_wake`, `compaction_wake`,
///   `sweep_visits`: the retention and compaction sweeps (every second) rewrite their
///   private cursor, per-stream hints, pending streams, wake-ups and visit counts;
/// - `view_stale`, `view_refresh`: a publish's mark and the refresh 250 ms later;
/// - `presence`: every HTTP reducer call connects and disconnects its caller, and each
///   recounts, so `updated_at` moves; its `connected` count is still compared.
const SELF_CHANGING: [&str; 9] = ["sweep_state", "stream_sweep", "sweep_pending", "retention_wake", "compaction_wake", "sweep_visits", "view_stale", "view_refresh", "presence"];

/// Every user table's rows (sorted), as the owner sees them.
fn snapshot(db: &TestDb) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = user_tables(db)
        .keys()
        .filter(|t| !SELF_CHANGING.contains(&t.as_str()))
        .map(|t| (t.clone(), sorted(db.sql(&format!("SELECT * FROM {t}")).rows)))
        .collect();
    let presence = db.sql("SELECT * FROM presence");
    out.insert("presence.connected".into(), presence.rows.iter().map(|r| presence.get(r, "connected").cloned().unwrap_or_default().to_string()).collect());
    out
}

fn assert_unchanged(before: &BTreeMap<String, Vec<String>>, after: &BTreeMap<String, Vec<String>>) {
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "the set of tables changed");
    for (table, rows) in before {
        assert_eq!(rows, &after[table], "table {table} changed");
    }
}

// ------------------------------------------------------------------------------------
// 2. Reducers over HTTP.
// ------------------------------------------------------------------------------------

/// The reducer names the module exposes, from its schema.
fn reducers(db: &TestDb) -> BTreeSet<String> {
    let r = raw::http(&db.url, "GET", &format!("/v1/database/{}/schema?version=9", db.name), None, None, b"");
    assert_eq!(r.status, 200, "schema: {}", r.body);
    let schema: Value = serde_json::from_str(&r.body).unwrap();
    schema["reducers"].as_array().expect("reducers in the schema").iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn every_reducer_refuses_the_attackers_tells_them_nothing_and_changes_nothing() {
    let w = world("reducers");
    let db = &w.db;
    let sb_hash = head_hash(db, SB);
    let victim_grant = db.sql("SELECT * FROM stream_grant");
    let victim_grant_id = victim_grant
        .rows
        .iter()
        .find(|r| victim_grant.get(r, "grantee").is_some_and(|g| identity_hex(g) == w.victim.identity.to_ascii_lowercase()))
        .and_then(|r| victim_grant.get(r, "id").cloned())
        .expect("the victim's grant");
    let interval = json!({ "Interval": { "__time_duration_micros__": 1_000_000 } });
    let now = json!({ "Time": { "__timestamp_micros_since_unix_epoch__": 0 } });
    let schedule = json!([{ "scheduled_id": 1, "scheduled_at": interval }]);
    let victim = w.victim.identity_arg();
    let owner = w.db.owner.identity_arg();

    // What each attack is and what it must get. `self` arguments are filled in per
    // attacker (the anonymous one names the stranger: it has no stable identity).
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Expect {
        Refused(ErrorCode),
        /// A no-op on the caller's own rows (allowed to anyone), checked by the snapshot.
        Allowed,
        /// Refused by the server before the module runs (lifecycle reducers).
        NotCallable,
    }
    use Expect::*;
    let attacks = |me: &Value| -> Vec<(&'static str, Value, Expect)> {
        vec![
            ("publish", json!([SB, batch(SB, SB_HEAD + 1, 1)]), Refused(ErrorCode::ForbiddenStream)),
            ("publish_segment", json!([SB, segment_arg(SB, SB_HEAD + 1, 1)]), Refused(ErrorCode::ForbiddenStream)),
            ("ack", json!([SB, SB_HEAD, bytes_arg(&sb_hash)]), Refused(ErrorCode::ForbiddenStream)),
            ("grant", json!([me, SB, ["subscribe", "ack", "publish"], 600]), Refused(ErrorCode::Unauthorized)),
            ("grant", json!([me, "*", ["publish"], 600]), Refused(ErrorCode::Unauthorized)),
            ("revoke", json!([victim, SB]), Refused(ErrorCode::Unauthorized)),
            ("revoke", json!([w.pub_all.identity_arg(), "*"]), Refused(ErrorCode::Unauthorized)),
            ("set_role", json!([me, "admin", true]), Refused(ErrorCode::Unauthorized)),
            ("set_role", json!([me, "publisher", true]), Refused(ErrorCode::Unauthorized)),
            ("set_role", json!([owner, "admin", false]), Refused(ErrorCode::Unauthorized)),
            ("create_stream", json!([SB, 1, 1]), Refused(ErrorCode::Unauthorized)),
            ("create_stream", json!(["s.new", 0, 0]), Refused(ErrorCode::Unauthorized)),
            ("set_retention", json!([SB, 1, 1]), Refused(ErrorCode::Unauthorized)),
            ("reset_stream", json!([SB]), Refused(ErrorCode::Unauthorized)),
            ("set_limits", json!([1, 1, 1]), Refused(ErrorCode::Unauthorized)),
            ("set_compaction", json!([0]), Refused(ErrorCode::Unauthorized)),
            ("set_protocol_window", json!([99, 99, "9.9.9"]), Refused(ErrorCode::Unauthorized)),
            ("open_window", json!([SB, 0]), Refused(ErrorCode::ForbiddenStream)),
            ("close_window", json!([SB, 0]), Allowed),
            ("hello", json!([khala_proto::PROTOCOL_VERSION, "0.1.0"]), Allowed),
            ("sweep_grants", schedule.clone(), Refused(ErrorCode::Unauthorized)),
            ("sweep_retention", schedule.clone(), Refused(ErrorCode::Unauthorized)),
            ("compact_segments", schedule.clone(), Refused(ErrorCode::Unauthorized)),
            ("refresh_views", schedule.clone(), Refused(ErrorCode::Unauthorized)),
            ("wake_retention", json!([{ "scheduled_id": 1, "scheduled_at": now, "stream_id": SB }]), Refused(ErrorCode::Unauthorized)),
            ("wake_compaction", json!([{ "scheduled_id": 1, "scheduled_at": now, "stream_id": SB }]), Refused(ErrorCode::Unauthorized)),
            (
                "expire_grant",
                json!([{ "scheduled_id": 1, "scheduled_at": now, "grant_id": victim_grant_id, "publish": false }]),
                Refused(ErrorCode::Unauthorized),
            ),
            ("init", json!([]), NotCallable),
            ("client_connected", json!([]), NotCallable),
            ("client_disconnected", json!([]), NotCallable),
        ]
    };
    let attacked: BTreeSet<String> = attacks(&json!(null)).iter().map(|(r, _, _)| r.to_string()).collect();
    let exposed = reducers(db);
    assert_eq!(exposed, attacked, "every reducer the module exposes is attacked here (add new ones to this test)");

    let before = snapshot(db);
    let attackers = w.attackers();
    let others = w.others();
    for who in &attackers {
        let me = match &who.creds {
            Some(c) => c.identity_arg(),
            None => w.stranger.identity_arg(),
        };
        for (reducer, args, expect) in attacks(&me) {
            let context = format!("{} called {reducer}({args})", who.name);
            let result = w.call_as(who, reducer, args);
            match expect {
                Refused(c) => {
                    let err = refusal(result);
                    assert_eq!(err.code, c, "{context}: {err}");
                    // The caller named s.b itself; nothing else of it or of others may show.
                    assert_clean(&err.message.replace(SB, "<named>"), &others, &context);
                }
                Allowed => result.unwrap_or_else(|e| panic!("{context}: {e}")),
                NotCallable => match result {
                    Err(ToolError::HttpStatus { status, body, .. }) => assert_eq!(status, 400, "{context}: {body}"),
                    other => panic!("{context}: expected the server to refuse a lifecycle reducer, got {other:?}"),
                },
            }
        }
        // A refusal about s.b reads exactly like one about a stream that does not exist,
        // whatever the batch would have done (dedupe, sequence conflict, success).
        let nowhere = |reducer: &str, args: Value| refusal(w.call_as(who, reducer, args));
        let forbidden_publish = nowhere("publish", json!([NOWHERE, batch(NOWHERE, 1, 1)]));
        for probe in [batch(SB, 1, 1), batch(SB, 3, 1), batch(SB, SB_HEAD + 1, 2), json!([event_json("k1", "x", b"other", None)])] {
            let err = refusal(w.call_as(who, "publish", json!([SB, probe])));
            assert_eq!(err.code, forbidden_publish.code, "{}", who.name);
            assert_eq!(err.message, forbidden_publish.message.replace(NOWHERE, SB), "{}: publish to s.b", who.name);
            for tell in ["expected=", "head=", "seq="] {
                assert!(!err.message.contains(tell), "{}: {}", who.name, err.message);
            }
            assert!(!err.message.chars().any(|c| c.is_ascii_digit()), "{}: a number in {}", who.name, err.message);
        }
        // The same for a segment, bad data included: the check runs before decoding.
        let forbidden_segment = nowhere("publish_segment", json!([NOWHERE, segment_arg(NOWHERE, 1, 1)]));
        for probe in [segment_arg(SB, 1, 1), segment_arg(SB, 3, 1), segment_arg(SB, SB_HEAD + 1, 2), bytes_arg(&[9, 0])] {
            let err = refusal(w.call_as(who, "publish_segment", json!([SB, probe])));
            assert_eq!((err.code, err.message), (forbidden_segment.code, forbidden_segment.message.replace(NOWHERE, SB)), "{}: publish_segment to s.b", who.name);
        }
        let ack_nowhere = nowhere("ack", json!([NOWHERE, 1, bytes_arg(&[0; 32])]));
        let ack_sb = refusal(w.call_as(who, "ack", json!([SB, 1, bytes_arg(&[0; 32])])));
        assert_eq!((ack_sb.code, ack_sb.message), (ack_nowhere.code, ack_nowhere.message.replace(NOWHERE, SB)), "{}: ack", who.name);
        let window_nowhere = nowhere("open_window", json!([NOWHERE, 0]));
        let window_sb = refusal(w.call_as(who, "open_window", json!([SB, 0])));
        assert_eq!(window_sb.message, window_nowhere.message.replace(NOWHERE, SB), "{}: open_window", who.name);
    }

    // The ack-only grantee of s.b learns only whether (seq, hash) is a position of s.b:
    // beyond the head, a wrong hash and a stream that does not exist all read alike.
    let ack_b = &w.ack_b;
    let probe = |stream_id: &str, seq: u64, hash: &[u8]| refusal(db.call_as(ack_b, "ack", json!([stream_id, seq, bytes_arg(hash)])));
    let unknown = probe(NOWHERE, 999, &[0; 32]);
    assert_eq!(unknown.code, ErrorCode::ChainMismatch);
    for (seq, hash) in [(999, vec![0; 32]), (SB_HEAD + 1, sb_hash.clone()), (1, vec![0; 32]), (SB_HEAD, vec![1; 32])] {
        let err = probe(SB, seq, &hash);
        assert_eq!(err.code, ErrorCode::ChainMismatch, "ack_b probing seq {seq}: {err}");
        assert_eq!(err.message, unknown.message.replace(NOWHERE, SB).replace("999", &seq.to_string()), "ack_b probing seq {seq}");
        assert!(!err.message.contains("head="), "{err}");
    }
    assert_eq!(code(db.call_as(ack_b, "open_window", json!([SB, 0]))), ErrorCode::ForbiddenStream, "ack scope does not open windows");

    assert_unchanged(&before, &snapshot(db));

    // Positive controls: the same identities are refused for what they asked, not for
    // being unable to call at all.
    db.call_as(&w.pub_a, "publish", json!([SA, batch(SA, SA_HEAD + 1, 1)])).expect("pub_a publishes to s.a");
    let beyond = refusal(db.call_as(&w.sub_a, "ack", json!([SA, SA_HEAD + 9, bytes_arg(&[0; 32])])));
    assert_eq!((beyond.code, beyond.field("head")), (ErrorCode::AckBeyondHead, Some("4")), "sub_a may read s.a, so it is told s.a's head");
    db.call_as(ack_b, "ack", json!([SB, SB_HEAD, bytes_arg(&sb_hash)])).expect("ack_b acks a real position of s.b");
    let acks = db.sql("SELECT * FROM client_ack");
    assert_eq!(acks.rows.len(), 3, "ack_b's ack was recorded");
}

// ------------------------------------------------------------------------------------
// 3. SDK (and raw protocol) subscriptions.
// ------------------------------------------------------------------------------------

/// Subscribes and waits; `Err` holds the subscription error.
fn try_subscribe(conn: &DbConnection, queries: &[&str]) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let err_tx = tx.clone();
    conn.subscription_builder()
        .on_applied(move |_| {
            let _ = tx.send(Ok(()));
        })
        .on_error(move |_, e| {
            let _ = err_tx.send(Err(e.to_string()));
        })
        .subscribe(queries.iter().map(|q| q.to_string()).collect::<Vec<_>>());
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no answer to subscribing {queries:?}"))
}

fn connect_anonymous(db: &TestDb) -> DbConnection {
    let (tx, rx) = std::sync::mpsc::channel();
    let conn = DbConnection::builder()
        .with_uri(db.url.as_str())
        .with_module_name(db.name.as_str())
        .on_connect(move |_, _, _| {
            let _ = tx.send(());
        })
        .build()
        .expect("an anonymous SDK connection");
    conn.run_threaded();
    rx.recv_timeout(Duration::from_secs(20)).expect("the anonymous connection came up");
    conn
}

/// Tables the committed client bindings can decode. The SDK rejects a whole message
/// that names a table it does not know, so `SELECT * FROM *` through the SDK needs them
/// to cover every public table (the raw-protocol client below covers it regardless).
fn tables_in_bindings() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/src/module_bindings");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix("_table.rs").map(str::to_string))
        .collect()
}

/// Everything in `conn`'s cache that names `s.b` or an identity other than `me`.
fn sdk_leaks(conn: &DbConnection, me: &str) -> Vec<String> {
    let mine = |id: &spacetimedb_sdk::Identity| id.to_hex().to_string() == me;
    let mut out = Vec::new();
    out.extend(conn.db.stream().iter().filter(|s| s.stream_id == SB).map(|s| format!("stream {s:?}")));
    out.extend(conn.db.stream_segment().iter().filter(|s| s.stream_id == SB).map(|s| format!("segment {}..{} of {}", s.first_seq, s.last_seq, s.stream_id)));
    out.extend(conn.db.stream_grant().iter().filter(|g| !mine(&g.grantee) || g.stream_id == SB).map(|g| format!("grant {g:?}")));
    out.extend(conn.db.client_ack().iter().filter(|a| !mine(&a.grantee) || a.stream_id == SB).map(|a| format!("ack {a:?}")));
    out.extend(conn.db.client_window().iter().filter(|x| !mine(&x.grantee) || x.stream_id == SB).map(|x| format!("window {x:?}")));
    out.extend(conn.db.identity_role().iter().filter(|r| !mine(&r.identity)).map(|r| format!("role {r:?}")));
    out.extend(conn.db.connection().iter().filter(|c| !mine(&c.identity)).map(|c| format!("connection {c:?}")));
    out.extend(conn.db.presence().iter().map(|p| format!("presence {p:?}")));
    out
}

#[test]
fn subscriptions_deliver_nothing_of_s_b_now_or_later() {
    let w = world("subs");
    let db = &w.db;
    let public: Vec<String> = user_tables(db).into_iter().filter(|(_, p)| *p).map(|(t, _)| t).collect();
    let private: Vec<String> = user_tables(db).into_iter().filter(|(_, p)| !*p).map(|(t, _)| t).collect();
    let known = tables_in_bindings();
    let sdk_can_take_all = public.iter().all(|t| known.contains(t));
    if !sdk_can_take_all {
        println!("the committed bindings lack {:?}: SDK `SELECT * FROM *` skipped (run scripts/generate-bindings); the raw client covers it", public.iter().filter(|t| !known.contains(*t)).collect::<Vec<_>>());
    }

    // SDK connections: one per attacker; anonymous has no token at all.
    let conns: Vec<(&str, DbConnection)> = vec![
        ("stranger", sdk::connect(db, &w.stranger)),
        ("anonymous", connect_anonymous(db)),
        ("pub_a", sdk::connect(db, &w.pub_a)),
        ("sub_a", sdk::connect(db, &w.sub_a)),
    ];
    // Every insert any attacker's cache receives, by table, for the "nothing later" check.
    let inserted: Arc<Mutex<Vec<String>>> = Arc::default();
    for (name, conn) in &conns {
        let (log, who) = (inserted.clone(), name.to_string());
        conn.db.stream_segment().on_insert(move |_, s| log.lock().unwrap().push(format!("{who}: segment {}..{} of {}", s.first_seq, s.last_seq, s.stream_id)));
        let (log, who) = (inserted.clone(), name.to_string());
        conn.db.stream().on_insert(move |_, s| log.lock().unwrap().push(format!("{who}: stream {}", s.stream_id)));
        let own: Vec<String> = public.iter().filter(|t| known.contains(*t)).map(|t| format!("SELECT * FROM {t}")).collect();
        for q in &own {
            try_subscribe(conn, &[q]).unwrap_or_else(|e| panic!("{name} subscribing `{q}`: {e}"));
        }
        if sdk_can_take_all {
            try_subscribe(conn, &["SELECT * FROM *"]).unwrap_or_else(|e| panic!("{name}: SELECT * FROM *: {e}"));
        }
        for t in private.iter().filter(|t| known.contains(*t)) {
            let q = format!("SELECT * FROM {t}");
            assert!(try_subscribe(conn, &[&q]).is_err(), "{name} subscribed to the private table {t}");
        }
    }
    // Raw-protocol clients: every public table one by one, and `SELECT * FROM *`.
    let sockets: Vec<(&str, raw::Socket)> = vec![
        ("stranger", raw::Socket::connect(&db.url, &db.name, Some(&w.stranger.token))),
        ("anonymous", raw::Socket::connect(&db.url, &db.name, None)),
        ("pub_a", raw::Socket::connect(&db.url, &db.name, Some(&w.pub_a.token))),
        ("sub_a", raw::Socket::connect(&db.url, &db.name, Some(&w.sub_a.token))),
    ];
    for (name, socket) in &sockets {
        for t in &public {
            socket.subscribe(&[&format!("SELECT * FROM {t}")]).unwrap_or_else(|e| panic!("{name}: {t}: {e}"));
        }
        socket.subscribe(&["SELECT * FROM *"]).unwrap_or_else(|e| panic!("{name}: SELECT * FROM *: {e}"));
        for t in &private {
            assert!(socket.subscribe(&[&format!("SELECT * FROM {t}")]).is_err(), "{name} subscribed to the private table {t}");
        }
    }

    let ids: Vec<String> = conns.iter().map(|(_, c)| c.identity().to_hex().to_string()).collect();
    let check = |when: &str| {
        for ((name, conn), me) in conns.iter().zip(&ids) {
            let leaks = sdk_leaks(conn, me);
            assert!(leaks.is_empty(), "{when}: {name}'s SDK cache holds {leaks:?}");
        }
        for (name, socket) in &sockets {
            let me = socket.identity();
            let mut others = w.others();
            others.extend(ids.iter().filter(|id| **id != me).cloned());
            assert_clean(&socket.text(), &others, &format!("{when}: {name}'s raw subscription"));
        }
    };
    check("initially");
    // Positive controls: what the s.a grantees and everyone's own rows look like.
    let [(_, stranger_conn), _, (_, pub_a_conn), (_, sub_a_conn)] = &conns[..] else { unreachable!() };
    assert_eq!(stranger_conn.db.stream().count() + stranger_conn.db.stream_grant().count(), 0, "the stranger holds nothing");
    assert!(stranger_conn.db.connection().count() >= 1, "the stranger sees its own connection");
    assert_eq!(sub_a_conn.db.stream().iter().map(|s| s.stream_id).collect::<Vec<_>>(), vec![SA.to_string()]);
    assert_eq!(sub_a_conn.db.stream_segment().count(), 1, "sub_a's window on s.a");
    assert_eq!(sub_a_conn.db.client_ack().count(), 1);
    assert_eq!(pub_a_conn.db.stream().iter().map(|s| s.stream_id).collect::<Vec<_>>(), vec![SA.to_string()]);
    assert_eq!(pub_a_conn.db.identity_role().count(), 1, "pub_a's publisher role");
    for (name, socket) in &sockets {
        assert!(!socket.rows("connection").is_empty(), "{name}'s raw client sees its own connection");
        let me = socket.identity();
        assert!(socket.text().to_ascii_lowercase().contains(&me), "{name}: its own identity is visible to it, so the leak search can find one");
    }
    let sub_a_socket = &sockets[3].1;
    assert_eq!(sub_a_socket.rows("stream").len(), 1, "sub_a's raw client sees s.a's stream row");
    assert!(sub_a_socket.text().contains(SA), "the search for a stream id finds one that is visible");

    // Later: more events on s.b (the victim gets them), then a sentinel each attacker
    // does see (a grant on a stream that does not exist). Updates reach a client in
    // commit order, so anything of s.b would have arrived before the sentinel.
    let seen_before = inserted.lock().unwrap().len();
    db.call_as(&w.pub_all, "publish", json!([SB, batch(SB, SB_HEAD + 1, 2)])).unwrap();
    wait_for("the victim's live s.b update", ARRIVE, || w.victim_conn.db.stream_segment().iter().find(|s| s.stream_id == SB && s.last_seq == SB_HEAD + 2));
    for ((name, conn), me) in conns.iter().zip(&ids) {
        db.call("grant", json!([identity_arg(me), "s.sentinel", ["subscribe"], 600]));
        wait_for(&format!("{name}'s sentinel"), ARRIVE, || conn.db.stream_grant().iter().find(|g| g.stream_id == "s.sentinel"));
    }
    for (name, socket) in &sockets {
        let me = socket.identity();
        if !ids.contains(&me) {
            // Only the anonymous raw client has an identity of its own (new per connection).
            db.call("grant", json!([identity_arg(&me), "s.sentinel", ["subscribe"], 600]));
        }
        wait_for(&format!("{name}'s raw sentinel"), ARRIVE, || socket.text().contains("s.sentinel").then_some(()));
    }
    let later: Vec<String> = inserted.lock().unwrap()[seen_before..].to_vec();
    assert!(later.is_empty(), "attackers' caches received {later:?}");
    check("after more events on s.b");

    // Attackers leaving (their SDK connections may share the victim's ConnectionId: the
    // Rust SDK uses one per process) closes nothing of the victim's.
    for (_, conn) in &conns {
        let _ = conn.disconnect();
    }
    drop(sockets);
    let stayed = [w.victim.identity.to_ascii_lowercase(), w.sub_a.identity.to_ascii_lowercase()];
    wait_for("the attackers' disconnects", ARRIVE, || {
        let c = db.sql("SELECT * FROM connection");
        c.rows.iter().all(|r| c.get(r, "identity").is_some_and(|i| stayed.contains(&identity_hex(i)))).then_some(())
    });
    let windows = db.sql("SELECT * FROM client_window");
    assert!(
        windows.rows.iter().any(|r| windows.get(r, "grantee").is_some_and(|g| identity_hex(g) == w.victim.identity.to_ascii_lowercase())),
        "the victim's window survived the attackers' disconnects"
    );
    let connections = db.sql("SELECT * FROM connection");
    assert!(connections.rows.iter().any(|r| connections.get(r, "identity").is_some_and(|g| identity_hex(g) == w.victim.identity.to_ascii_lowercase())));
}

// ------------------------------------------------------------------------------------
// 4. The plan cache.
// ------------------------------------------------------------------------------------

#[test]
fn a_query_the_victim_subscribed_first_gives_a_stranger_nothing() {
    let w = world("plancache");
    let db = &w.db;
    // The byte-identical texts the victim subscribes first; the server caches compiled
    // plans by query text (and caller, when row-level security makes it parameterised).
    let texts = [
        "SELECT * FROM stream",
        "SELECT * FROM stream_segment",
        "SELECT * FROM client_ack",
        "SELECT * FROM client_window",
        "SELECT * FROM stream_grant",
        "SELECT * FROM connection",
    ];
    for q in texts {
        try_subscribe(&w.victim_conn, &[q]).unwrap_or_else(|e| panic!("victim `{q}`: {e}"));
    }
    assert_eq!(w.victim_conn.db.client_ack().count(), 1, "the victim's own ack is in its cache");
    assert_eq!(w.victim_conn.db.client_window().count(), 1, "and its window");
    let victim_socket = raw::Socket::connect(&db.url, &db.name, Some(&w.victim.token));
    for q in texts {
        victim_socket.subscribe(&[q]).unwrap();
    }
    assert_eq!(victim_socket.rows("stream").len(), 1, "the victim sees s.b through the raw protocol too");

    let stranger = sdk::connect(db, &w.stranger);
    let stranger_socket = raw::Socket::connect(&db.url, &db.name, Some(&w.stranger.token));
    let anonymous_socket = raw::Socket::connect(&db.url, &db.name, None);
    for q in texts {
        try_subscribe(&stranger, &[q]).unwrap_or_else(|e| panic!("stranger `{q}`: {e}"));
        stranger_socket.subscribe(&[q]).unwrap();
        anonymous_socket.subscribe(&[q]).unwrap();
    }
    let me = w.stranger.identity.to_ascii_lowercase();
    assert!(sdk_leaks(&stranger, &me).is_empty(), "{:?}", sdk_leaks(&stranger, &me));
    assert_eq!(stranger.db.stream().count() + stranger.db.stream_segment().count() + stranger.db.client_ack().count(), 0);
    for socket in [&stranger_socket, &anonymous_socket] {
        assert_clean(&socket.text(), &w.others(), "the stranger's cached-plan subscription");
        assert!(socket.rows("stream").is_empty() && socket.rows("stream_segment").is_empty());
    }

    // Live: the victim gets the next s.b events; the stranger gets its sentinel only.
    db.call_as(&w.pub_all, "publish", json!([SB, batch(SB, SB_HEAD + 1, 1)])).unwrap();
    wait_for("the victim's update", ARRIVE, || w.victim_conn.db.stream_segment().iter().find(|s| s.last_seq == SB_HEAD + 1));
    wait_for("the victim's raw update", ARRIVE, || (victim_socket.rows("stream_segment").len() == 3).then_some(()));
    db.call("grant", json!([identity_arg(&me), "s.sentinel", ["subscribe"], 600]));
    db.call("grant", json!([identity_arg(&anonymous_socket.identity()), "s.sentinel", ["subscribe"], 600]));
    wait_for("the stranger's sentinel", ARRIVE, || stranger.db.stream_grant().iter().find(|g| g.stream_id == "s.sentinel"));
    for socket in [&stranger_socket, &anonymous_socket] {
        wait_for("the raw sentinel", ARRIVE, || socket.text().contains("s.sentinel").then_some(()));
        assert_clean(&socket.text(), &w.others(), "the stranger after live s.b events");
    }
    assert!(sdk_leaks(&stranger, &me).is_empty(), "{:?}", sdk_leaks(&stranger, &me));
    let _ = stranger.disconnect();
}

// ------------------------------------------------------------------------------------
// 5. The engine's system tables.
// ------------------------------------------------------------------------------------

#[test]
fn system_tables_hide_clients_and_the_module_and_show_only_the_schema() {
    let w = world("systables");
    let db = &w.db;
    let victim = w.victim.identity.to_ascii_lowercase();
    let text = |rows: &SqlRows| serde_json::to_string(&rows.rows).unwrap().to_ascii_lowercase();

    // The owner sees the connected victim and the module (the rules do not hide from it).
    assert!(text(&db.sql("SELECT * FROM st_client")).contains(&victim), "the owner sees the connected victim in st_client");
    let module = db.sql("SELECT * FROM st_module");
    assert_eq!(module.rows.len(), 1);
    assert!(module.get(&module.rows[0], "program_bytes").and_then(Value::as_str).is_some_and(|wasm| wasm.starts_with("0061736d")), "the owner reads the wasm");

    // Without module/src/system_tables.rs, SpacetimeDB 1.2.0 shows every non-owner (the
    // anonymous one included) each connected identity in st_client, live, and the owner
    // identity and full wasm in st_module. With it, they see neither.
    for who in w.attackers() {
        for q in [
            "SELECT * FROM st_client".to_string(),
            "SELECT * FROM st_module".to_string(),
            "SELECT * FROM st_client WHERE connection_id > 0".to_string(),
            "SELECT COUNT(*) AS n FROM st_client".to_string(),
        ] {
            let rows = w.sql_as(&who, &q).unwrap_or_else(|e| panic!("{} ran `{q}`: {e}", who.name));
            let empty = rows.rows.is_empty() || rows.rows == vec![vec![json!(0)]];
            assert!(empty, "{} ran `{q}` and read {:?}", who.name, rows.rows);
        }
    }
    // Subscriptions too, and later connections are not announced.
    let stranger = raw::Socket::connect(&db.url, &db.name, Some(&w.stranger.token));
    let anonymous = raw::Socket::connect(&db.url, &db.name, None);
    for socket in [&stranger, &anonymous] {
        socket.subscribe(&["SELECT * FROM st_client", "SELECT * FROM st_module", "SELECT * FROM stream_grant"]).unwrap();
    }
    let latecomer = db.new_identity();
    let late = raw::Socket::connect(&db.url, &db.name, Some(&latecomer.token));
    for socket in [&stranger, &anonymous] {
        db.call("grant", json!([identity_arg(&socket.identity()), "s.sentinel", ["subscribe"], 600]));
        wait_for("the sentinel", ARRIVE, || socket.text().contains("s.sentinel").then_some(()));
        assert!(socket.rows("st_client").is_empty() && socket.rows("st_module").is_empty());
        let mut others = w.others();
        others.push(latecomer.identity.to_ascii_lowercase());
        assert_clean(&socket.text().replace("s.sentinel", ""), &others, "a raw subscription to st_client and st_module");
        assert!(!socket.text().contains("0061736d"), "no wasm");
    }
    drop(late);

    // Known and accepted (asserted, so that an engine change is noticed): the schema
    // tables are readable by anyone, which says nothing GET /v1/database/NAME/schema
    // (no token needed) does not; st_sequence shows allocation watermarks, which move
    // in blocks of 4096 ids; st_var holds engine settings (none set here).
    let stranger_reads = |q: &str| w.sql_as(&w.attackers()[0], q).unwrap_or_else(|e| panic!("{q}: {e}"));
    assert!(text(&stranger_reads("SELECT * FROM st_table")).contains("\"event_key\""), "st_table lists private tables");
    assert!(!stranger_reads("SELECT * FROM st_column").rows.is_empty());
    assert!(!stranger_reads("SELECT * FROM st_index").rows.is_empty());
    assert!(!stranger_reads("SELECT * FROM st_constraint").rows.is_empty());
    assert!(text(&stranger_reads("SELECT * FROM st_scheduled")).contains("grant_sweep_schedule"));
    let rules = text(&stranger_reads("SELECT * FROM st_row_level_security"));
    assert!(rules.contains(":sender") && rules.contains("st_client"), "st_row_level_security shows the rules, these included");
    let sequences = stranger_reads("SELECT * FROM st_sequence");
    assert!(text(&sequences).contains("stream_segment_id_seq"), "st_sequence is readable");
    let _ = stranger_reads("SELECT * FROM st_var");
    let schema = raw::http(&db.url, "GET", &format!("/v1/database/{}/schema?version=9", db.name), None, None, b"");
    assert!(schema.status == 200 && schema.body.contains("event_key"), "the schema is public without a token");
}

// ------------------------------------------------------------------------------------
// The database's management endpoints.
// ------------------------------------------------------------------------------------

#[test]
fn management_endpoints_refuse_the_attackers() {
    let w = world("mgmt");
    let db = &w.db;
    let path = format!("/v1/database/{}", db.name);
    let wasm = khala_tests::module_wasm();
    let program_hash = || {
        let m = db.sql("SELECT * FROM st_module");
        m.get(&m.rows[0], "program_hash").cloned()
    };
    let hash_before = program_hash();
    let before = snapshot(db);
    for (name, token) in [("stranger", Some(w.stranger.token.as_str())), ("anonymous", None), ("pub_a", Some(w.pub_a.token.as_str()))] {
        let attempts = [
            ("PUT", format!("{path}?clear=true"), Some("application/wasm"), wasm.to_vec()),
            ("PUT", path.clone(), Some("application/wasm"), wasm.to_vec()),
            ("DELETE", path.clone(), None, Vec::new()),
            ("PUT", format!("{path}/names"), Some("application/json"), br#"["hijacked-name"]"#.to_vec()),
            ("GET", format!("{path}/logs?num_lines=100"), None, Vec::new()),
        ];
        for (method, target, content_type, body) in attempts {
            let r = raw::http(&db.url, method, &target, token, content_type, &body);
            assert!(!(200..300).contains(&r.status), "{name}: {method} {target} was accepted ({}): {}", r.status, r.body);
        }
    }
    assert_eq!(program_hash(), hash_before, "the module is the owner's");
    let hijacked = raw::http(&db.url, "GET", "/v1/database/hijacked-name", None, None, b"");
    assert_eq!(hijacked.status, 404, "no name was set: {}", hijacked.body);

    // Known engine limit (SpacetimeDB 1.2.0 standalone, asserted so that a change is
    // noticed): `POST /v1/database/NAME/names` checks only that the caller owns the new
    // name's top-level domain, which it registers on the spot, not that it owns the
    // database. So anyone may add an alias for anyone's database. It gives no access (the
    // alias is the same database, under the same rules, and an existing name cannot be
    // taken over), but it squats names and shows in the database's name list: resolve
    // Khala databases by identity where that matters.
    let alias = format!("alias-{}", std::process::id());
    let r = raw::http(&db.url, "POST", &format!("{path}/names"), Some(&w.stranger.token), None, alias.as_bytes());
    assert_eq!(r.status, 200, "a stranger adds an alias of someone else's database: {}", r.body);
    let taken = raw::http(&db.url, "POST", &format!("/v1/database/{alias}/names"), Some(&w.stranger.token), None, db.name.as_bytes());
    assert!(!(200..300).contains(&taken.status), "an existing name is not taken over: {}", taken.body);
    let through_alias = w.db.api.sql(&alias, "SELECT * FROM stream", &w.stranger.token).expect("SQL through the alias");
    assert!(through_alias.rows.is_empty(), "the alias is the same database under the same rules");
    assert_eq!(w.db.api.sql(&alias, "SELECT * FROM stream", &db.owner.token).unwrap().rows.len(), 3, "it is the victim's database");
    assert_unchanged(&before, &snapshot(db));
    // Positive control: the owner may read its logs, so the refusals above are about who asked.
    let logs = raw::http(&db.url, "GET", &format!("{path}/logs?num_lines=10"), Some(&db.owner.token), None, b"");
    assert_eq!(logs.status, 200, "{}", logs.body);
    // Known: who owns a database is public (GET /v1/database/NAME needs no token).
    let info = raw::http(&db.url, "GET", &path, None, None, b"");
    assert!(info.status == 200 && info.body.to_ascii_lowercase().contains(&db.owner.identity.to_ascii_lowercase()), "{}", info.body);
}

// ------------------------------------------------------------------------------------
// A hole this suite found, now closed.
// ------------------------------------------------------------------------------------

/// Taking the `publisher` role away must stop reads as well as `publish`: the stream
/// and segment RLS rules join only `stream_publisher`, so `set_role(.., "publisher",
/// false)` revokes the identity's publish grants and their reach rows. Before that fix a
/// demoted publisher (say, a leaked mirror token) kept reading the heads and the full
/// segments of every stream its grants reached, live, until the grants expired.
#[test]
fn a_demoted_publisher_reads_nothing_more() {
    let w = world("demoted");
    let db = &w.db;
    let reads = |t: &str| db.api.sql(&db.name, &format!("SELECT * FROM {t}"), &w.pub_a.token).unwrap().rows.len();
    assert_eq!((reads("stream"), reads("stream_segment")), (1, 1), "pub_a reads s.a while it is a publisher");
    db.call("set_role", json!([w.pub_a.identity_arg(), "publisher", false]));
    assert_eq!(code(db.call_as(&w.pub_a, "publish", json!([SA, batch(SA, SA_HEAD + 1, 1)]))), ErrorCode::ForbiddenStream);
    assert_eq!((reads("stream"), reads("stream_segment")), (0, 0), "a demoted publisher still reads s.a");
}

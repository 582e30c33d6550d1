//! The sync loop: connect, `hello`, subscribe, replay in bounded windows, follow live,
//! apply through the handler, checkpoint, ack; on any failure, back off and reconnect.
//!
//! Files: this one (the loop, applying, checkpoints, acks), `handle.rs` (each message and
//! each engine alert), `windows.rs` (which buckets stay open), `health_report.rs`.
//!
//! Everything the SDK reports arrives as a [`Msg`] on one channel, so all state lives on
//! this one thread and every decision about order is made by the pure
//! [`StreamEngine`](crate::apply::StreamEngine).

use crate::apply::{StreamEngine, StreamMode};
use crate::backoff::Backoff;
use crate::checkpoint::{CheckpointError, CheckpointFile};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::handler::Handler;
use crate::health::HealthHandle;
use crate::metrics::{ClientMetrics, StreamMetrics};
use crate::module_bindings::{ack as _, hello as _, DbConnection};
use crate::transport::{self, Msg};
use windows::maintain_windows;

pub mod driver;
mod handle;
mod health_report;
mod windows;
use khala_proto::hash::GENESIS;
use khala_proto::v1::{ConnectionState, RebootstrapReason};
use khala_proto::{CodedError, ErrorCode, StaleCursor, StreamCursor};
use spacetimedb_sdk::DbContext;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The subscription tag of the stream and grant rows.
const META: u64 = 0;
const TICK: Duration = Duration::from_millis(100);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most events applied per stream between two looks at the clock and the channel.
const APPLY_PER_PUMP: usize = 2_048;
/// Least time between two checkpoint writes while events keep coming.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);

/// The client's state for one stream.
struct StreamState {
    engine: StreamEngine,
    /// Window buckets open on the server (from this identity's `client_window` rows).
    open: BTreeSet<u64>,
    /// Buckets asked for and not confirmed yet.
    opening: BTreeSet<u64>,
    /// Buckets asked to close and not confirmed yet.
    closing: BTreeSet<u64>,
    /// Close every window and reopen, so their rows are delivered again.
    reset_windows: bool,
    /// No `open_window` before this (after a refused call).
    window_retry_at: Option<Instant>,
    /// Whether windows can be opened at all (the owner sees every row without them).
    windows_usable: bool,
    /// Since when events wait behind a missing seq.
    gap_since: Option<Instant>,
    /// Buckets this process opened (another process of the same identity may hold
    /// others; it is not ours to close them).
    mine: BTreeSet<u64>,
    /// The cursor last written to the checkpoint file. While a rebootstrap is pending it
    /// stays what it was, so a restart tells the handler again.
    durable: StreamCursor,
    /// `None` until the grant rows are in; then whether a subscribe grant is held.
    granted: Option<bool>,
    /// Whether the server shows this client the stream's row (the owner sees it
    /// without a grant: it bypasses row-level security).
    row_visible: bool,
    can_ack: bool,
    lease_expires_micros: Option<i64>,
    acked: u64,
    ack_in_flight: bool,
    behind_since: Option<Instant>,
    behind_reported: bool,
    rebootstrap_due: Option<StaleCursor>,
    handler_backoff: Backoff,
    handler_retry_at: Option<Instant>,
    metrics: StreamMetrics,
}

impl StreamState {
    fn new(cursor: &StreamCursor) -> Self {
        StreamState {
            engine: StreamEngine::new(cursor),
            open: BTreeSet::new(),
            opening: BTreeSet::new(),
            closing: BTreeSet::new(),
            reset_windows: false,
            window_retry_at: None,
            windows_usable: true,
            gap_since: None,
            mine: BTreeSet::new(),
            durable: cursor.clone(),
            granted: None,
            row_visible: false,
            can_ack: true,
            lease_expires_micros: None,
            acked: 0,
            ack_in_flight: false,
            behind_since: None,
            behind_reported: false,
            rebootstrap_due: None,
            handler_backoff: Backoff::default(),
            handler_retry_at: None,
            metrics: StreamMetrics::new(&cursor.stream_id),
        }
    }
}

pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A sync client for a set of streams, applying through `H`.
pub struct SyncClient<H: Handler> {
    config: ClientConfig,
    handler: H,
    health: HealthHandle,
    checkpoint: CheckpointFile,
    streams: BTreeMap<String, StreamState>,
    backoff: Backoff,
    dirty: bool,
    /// The corrupt checkpoint's reason, until every handler rebootstrap it caused has
    /// succeeded; the file stays in place (and nothing is written) until then.
    corrupt: Option<String>,
    /// Cursors of streams this client does not sync now, kept as they were.
    other_cursors: Vec<StreamCursor>,
    /// This connection's identity: grant rows of other identities (visible to the owner)
    /// are ignored.
    me: Option<spacetimedb_sdk::Identity>,
    last_checkpoint: Instant,
    last_health_write: Instant,
    metrics: ClientMetrics,
    /// The handler stores the cursors with its effects: resume from its cursors, and keep
    /// no checkpoint file.
    handler_owns_cursors: bool,
}

impl<H: Handler> SyncClient<H> {
    /// Loads the checkpoint. A corrupt checkpoint is reported and every stream is rebuilt
    /// from the server's floor; once the handler has been told (for every stream) the
    /// file is moved aside and a fresh checkpoint written.
    ///
    /// A handler that owns its cursors ([`Handler::cursors`]) is resumed from them
    /// instead, and the checkpoint file is neither read nor written.
    pub fn new(config: ClientConfig, mut handler: H) -> Result<Self, ClientError> {
        if config.streams.is_empty() {
            return Err(ClientError::Config("no streams to sync".into()));
        }
        let checkpoint = CheckpointFile::new(&config.checkpoint);
        let health = HealthHandle::default();
        let owned = handler.cursors().map_err(|e| ClientError::HandlerCursors(e.to_string()))?;
        let handler_owns_cursors = owned.is_some();
        let loaded = match owned {
            Some(cursors) => Ok(Some(cursors)),
            None => checkpoint.load(),
        };
        let (stored, corrupt) = match loaded {
            Ok(stored) => (stored.unwrap_or_default(), None),
            Err(CheckpointError::Corrupt { path, reason }) => {
                log::error!("checkpoint {} is corrupt ({reason}); rebuilding every stream", path.display());
                health.update(|h| h.last_error = format!("checkpoint_corrupt: {reason}"));
                (Vec::new(), Some(reason))
            }
            Err(e) => return Err(e.into()),
        };
        let mut streams = BTreeMap::new();
        for id in &config.streams {
            let cursor = stored
                .iter()
                .find(|c| &c.stream_id == id)
                .cloned()
                .unwrap_or_else(|| StreamCursor { stream_id: id.clone(), chain_hash: GENESIS.to_vec(), ..Default::default() });
            let mut state = StreamState::new(&cursor);
            if corrupt.is_some() {
                state.rebootstrap_due = Some(StaleCursor {
                    stream_id: id.clone(),
                    reason: RebootstrapReason::CorruptCheckpoint as i32,
                    ..Default::default()
                });
                state.metrics.rebootstrap(id, RebootstrapReason::CorruptCheckpoint as i32);
            }
            streams.insert(id.clone(), state);
        }
        let other_cursors = stored.into_iter().filter(|c| !streams.contains_key(&c.stream_id)).collect();
        let past = Instant::now() - Duration::from_secs(1);
        Ok(SyncClient {
            config,
            handler,
            health,
            checkpoint,
            streams,
            backoff: Backoff::default(),
            dirty: false,
            corrupt,
            other_cursors,
            me: None,
            last_checkpoint: past,
            last_health_write: past,
            metrics: ClientMetrics::default(),
            handler_owns_cursors,
        })
    }

    pub fn health(&self) -> HealthHandle {
        self.health.clone()
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    pub fn into_handler(self) -> H {
        self.handler
    }

    /// The last applied seq of each stream.
    pub fn cursors(&self) -> BTreeMap<String, u64> {
        self.streams.iter().map(|(id, s)| (id.clone(), s.engine.applied())).collect()
    }

    /// Syncs until `shutdown` is set (returns `Ok`) or a failure retrying cannot fix.
    pub fn run(&mut self, shutdown: &AtomicBool) -> Result<(), ClientError> {
        loop {
            if shutdown.load(Ordering::Relaxed) {
                return Ok(());
            }
            let attempts = self.backoff.attempts() + 1;
            self.metrics.connect_attempt();
            self.set_state(ConnectionState::Connecting, |h| h.connect_attempts = attempts);
            let err = match self.session(shutdown) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            log::warn!("session ended: {err}");
            if matches!(err, ClientError::Unauthorized(_)) {
                crate::metrics::auth_failure("unauthorized");
            }
            // What was applied before the session ended is made durable now, so that
            // neither a retry nor a stop applies it again.
            self.store_checkpoint()?;
            for s in self.streams.values_mut() {
                // Window rows come back with the next subscription; calls in flight are lost.
                s.open.clear();
                s.opening.clear();
                s.closing.clear();
                s.ack_in_flight = false;
                // The server may have lost the last ack (a crash before its fsync): the next
                // session acks the durable cursor again, even on a quiet stream. Acks never
                // move back, so a repeat is a no-op.
                s.acked = 0;
            }
            if !err.is_retryable() {
                let state = match &err {
                    ClientError::Incompatible(e) if e.code == ErrorCode::UpgradeRequired => ConnectionState::UpgradeRequired,
                    ClientError::Incompatible(_) => ConnectionState::UpgradeRequired,
                    _ => ConnectionState::Unspecified,
                };
                let text = format!("{}: {err}", err.code());
                self.set_state(state, |h| h.last_error = text);
                self.write_health(true);
                return Err(err);
            }
            let delay = self.backoff.next_delay();
            let state = if matches!(err, ClientError::Unauthorized(_)) { ConnectionState::Unauthorized } else { ConnectionState::Backoff };
            let text = format!("{}: {err}", err.code());
            self.set_state(state, |h| {
                h.next_retry_ms = delay.as_millis() as u64;
                h.last_error = text;
            });
            self.write_health(true);
            let until = Instant::now() + delay;
            while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
            }
        }
    }

    fn set_state(&self, state: ConnectionState, f: impl FnOnce(&mut khala_proto::v1::HealthSnapshot)) {
        self.health.update(|h| {
            h.state = state as i32;
            f(h);
        });
        self.metrics.state(state as i32);
    }

    fn session(&mut self, shutdown: &AtomicBool) -> Result<(), ClientError> {
        let token = std::fs::read_to_string(&self.config.token_file)
            .map_err(|e| ClientError::Token(format!("{}: {e}", self.config.token_file.display())))?;
        let (tx, rx) = mpsc::channel();
        let conn = transport::connect(&self.config.server_url, &self.config.database, token.trim(), self.config.wants_compression(), &tx)?;
        let result = self.session_on(&conn, &tx, &rx, shutdown);
        // After SDK 1.2.0's connection thread panicked holding its sender lock (see
        // `transport::connect`), `disconnect` panics on the poisoned lock: contain it,
        // the connection is gone either way.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.disconnect()));
        result
    }

    fn handshake(&mut self, conn: &DbConnection, rx: &Receiver<Msg>) -> Result<(), ClientError> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut hello_sent = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Connected(identity)) if !hello_sent => {
                    self.me = Some(identity);
                    conn.reducers
                        .hello(khala_proto::PROTOCOL_VERSION, self.config.client_build.clone())
                        .map_err(|e| ClientError::Connect(e.to_string()))?;
                    hello_sent = true;
                }
                Ok(Msg::Hello(Ok(()))) => return Ok(()),
                Ok(Msg::Hello(Err(text))) => {
                    let e = CodedError::parse(&text);
                    return Err(match e.code {
                        ErrorCode::UpgradeRequired | ErrorCode::UnsupportedProtocolVersion | ErrorCode::InvalidArgument => ClientError::Incompatible(e),
                        ErrorCode::Unauthorized => ClientError::Unauthorized(e.message),
                        _ => ClientError::Connect(text),
                    });
                }
                Ok(Msg::Disconnected(e)) => return Err(ClientError::Disconnected(e.unwrap_or_else(|| "closed during handshake".into()))),
                Ok(_) => {}
                Err(_) => return Err(ClientError::Connect("no answer to hello within 15 s".into())),
            }
        }
    }

    fn session_on(&mut self, conn: &DbConnection, tx: &mpsc::Sender<Msg>, rx: &Receiver<Msg>, shutdown: &AtomicBool) -> Result<(), ClientError> {
        self.handshake(conn, rx)?;
        self.metrics.session_up();
        for s in self.streams.values_mut() {
            // Buffered events may come from a history the server no longer has.
            s.engine.clear_pending();
        }
        self.resume_from_handler()?;
        let _subscription = transport::subscribe(conn, META, transport::queries(), tx);
        let mut meta_applied = false;
        let mut more_ready = false;
        loop {
            let wait = if more_ready {
                Duration::ZERO
            } else if self.dirty {
                CHECKPOINT_EVERY
            } else {
                TICK
            };
            match rx.recv_timeout(wait) {
                Ok(msg) => {
                    meta_applied |= matches!(msg, Msg::Applied(META));
                    self.handle(msg)?;
                    while let Ok(msg) = rx.try_recv() {
                        meta_applied |= matches!(msg, Msg::Applied(META));
                        self.handle(msg)?;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Disconnected("the connection thread ended".into())),
            }
            if meta_applied {
                for s in self.streams.values_mut() {
                    s.granted.get_or_insert(false);
                }
                more_ready = self.pump(conn)?;
            }
            if shutdown.load(Ordering::Relaxed) {
                self.store_checkpoint()?;
                self.write_health(true);
                return Ok(());
            }
        }
    }

    /// Applies what is ready (at most [`APPLY_PER_PUMP`] events per stream, so that
    /// checkpoints keep up during a replay), checkpoints, acks, moves windows, updates
    /// health. Returns whether more events are ready.
    fn pump(&mut self, conn: &DbConnection) -> Result<bool, ClientError> {
        let now = Instant::now();
        let mut more_ready = false;
        let mut applied_any = false;
        for (id, state) in self.streams.iter_mut() {
            if let Some(stale) = state.rebootstrap_due.clone() {
                if state.handler_retry_at.is_some_and(|t| t > now) {
                    continue;
                }
                match self.handler.rebootstrap(&stale) {
                    Ok(()) => {
                        state.rebootstrap_due = None;
                        state.handler_retry_at = None;
                        state.handler_backoff.reset();
                    }
                    Err(e) => {
                        log::warn!("{id}: handler failed on rebootstrap: {e}; retrying");
                        state.handler_retry_at = Some(now + state.handler_backoff.next_delay());
                        continue;
                    }
                }
            }
            let mut budget = APPLY_PER_PUMP;
            while let Some(event) = state.engine.next_ready() {
                if state.handler_retry_at.is_some_and(|t| t > now) {
                    break;
                }
                if budget == 0 {
                    more_ready = true;
                    break;
                }
                budget -= 1;
                let occurred_at_micros = event.occurred_at_micros;
                match self.handler.apply(event) {
                    Ok(()) => {
                        applied_any = true;
                        let seq = event.seq;
                        state.engine.mark_applied(seq);
                        state.metrics.applied(&self.metrics, seq, occurred_at_micros);
                        state.gap_since = None;
                        state.handler_retry_at = None;
                        state.handler_backoff.reset();
                        self.dirty = true;
                    }
                    Err(e) => {
                        log::warn!("{id}: handler failed at seq {}: {e}; retrying from that seq", event.seq);
                        state.handler_retry_at = Some(now + state.handler_backoff.next_delay());
                        break;
                    }
                }
            }
        }
        if applied_any && !more_ready {
            self.handler.caught_up();
        }
        let mut rechecked = Vec::new();
        for (id, state) in self.streams.iter_mut() {
            if state.engine.starved() {
                // Nothing applicable is here although the head is further on: the floor
                // may have passed the cursor, or rows were dropped; wait, then refetch.
                rechecked.push((id.clone(), state.engine.recheck()));
                if state.opening.is_empty() {
                    state.gap_since.get_or_insert(now);
                }
            }
        }
        for (id, alerts) in rechecked {
            self.alerts(&id, alerts);
        }
        if self.dirty && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.store_checkpoint()?;
        }
        self.send_acks(conn);
        for (id, state) in self.streams.iter_mut() {
            maintain_windows(id, state, conn);
        }
        self.update_health();
        Ok(more_ready)
    }

    fn store_checkpoint(&mut self) -> Result<(), ClientError> {
        if !self.dirty {
            return Ok(());
        }
        if self.corrupt.is_some() {
            if self.streams.values().any(|s| s.rebootstrap_due.is_some()) {
                // The corrupt file stays until the handler has dropped every stream.
                return Ok(());
            }
            let aside = self.checkpoint.set_aside()?;
            log::warn!("the corrupt checkpoint was moved to {}", aside.display());
            let reason = self.corrupt.take().unwrap_or_default();
            self.health.update(|h| h.last_error = format!("checkpoint_corrupt: {reason}; moved to {}", aside.display()));
        }
        if let Err(e) = self.handler.persist() {
            log::warn!("the handler could not persist its effects ({e}); the checkpoint waits");
            return Ok(());
        }
        let now = now_micros();
        for s in self.streams.values_mut() {
            let rebuilding = s.rebootstrap_due.is_some() || matches!(s.engine.mode(), StreamMode::Rebootstrapping { .. });
            if !rebuilding {
                s.durable = s.engine.cursor(now);
            }
        }
        if !self.handler_owns_cursors {
            let cursors = self.streams.values().map(|s| s.durable.clone()).chain(self.other_cursors.iter().cloned()).collect();
            self.checkpoint.store(cursors)?;
        }
        self.dirty = false;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// At each session's start, a handler that owns its cursors is asked for them again:
    /// a stream whose stored cursor differs from where this process stands (the handler
    /// rolled back a batch it could not commit) restarts from the stored one. A stream
    /// with a rebootstrap under way keeps its state: the handler has dropped it, or will.
    fn resume_from_handler(&mut self) -> Result<(), ClientError> {
        if !self.handler_owns_cursors {
            return Ok(());
        }
        let stored = self.handler.cursors().map_err(|e| ClientError::HandlerCursors(e.to_string()))?.unwrap_or_default();
        for (id, s) in self.streams.iter_mut() {
            if s.rebootstrap_due.is_some() || matches!(s.engine.mode(), StreamMode::Rebootstrapping { .. }) {
                continue;
            }
            let cursor = stored
                .iter()
                .find(|c| &c.stream_id == id)
                .cloned()
                .unwrap_or_else(|| StreamCursor { stream_id: id.clone(), chain_hash: GENESIS.to_vec(), ..Default::default() });
            let here = s.engine.cursor(cursor.updated_at_micros);
            if (here.seq, &here.chain_hash) != (cursor.seq, &cursor.chain_hash) {
                log::warn!("{id}: the handler stored seq {}, this process stood at {}; resuming from the handler's", cursor.seq, here.seq);
                s.engine = StreamEngine::new(&cursor);
                s.durable = cursor;
                s.reset_windows = true;
            }
        }
        Ok(())
    }

    /// One ack in flight per stream, for the newest durable cursor (acks coalesce).
    fn send_acks(&mut self, conn: &DbConnection) {
        if !self.config.ack {
            return;
        }
        for (id, state) in self.streams.iter_mut() {
            let durable = &state.durable;
            let due = state.granted == Some(true) && state.can_ack && !state.ack_in_flight && durable.seq > state.acked;
            if due && state.engine.mode() == &StreamMode::Normal && conn.reducers.ack(id.clone(), durable.seq, durable.chain_hash.clone()).is_ok() {
                state.ack_in_flight = true;
            }
        }
    }

}

//! The sync loop: connect, `hello`, subscribe, replay in bounded windows, follow live,
//! apply through the handler, checkpoint, ack; on any failure, back off and reconnect.
//!
//! Every decision is the pure [`Driver`]'s (`driver/`, property-tested without a
//! server). This file is the shell around it: it turns messages and time into
//! [`Input`]s, and carries out the driver's [`Command`]s against the SDK connection, the
//! handler, the checkpoint file, the health file and the metrics, feeding each result
//! back. Everything the SDK reports arrives as a [`Msg`] on one channel, so all state
//! lives on this one thread; only checkpoint files (and the fsync of a handler with a
//! [`Syncer`](crate::handler::Syncer)) are written on another (`writer.rs`), whose answers
//! ring that channel.

pub mod driver;
mod writer;

use crate::checkpoint::{CheckpointError, CheckpointFile};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::handler::Handler;
use crate::health::{self, HealthHandle};
use crate::metrics::{ClientMetrics, StreamMetrics};
use crate::module_bindings::{ack as _, close_window as _, hello as _, open_window as _, DbConnection};
use crate::transport::{self, Msg};
use driver::{Command, Driver, Input, Note, Now, Settings, Stored, META};
use spacetimedb_sdk::DbContext;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};
use writer::{CheckpointWriter, WriteFailed};

pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn now() -> Now {
    Now { at: Instant::now(), unix_micros: now_micros() }
}

/// One SDK connection and the channel its callbacks feed.
struct Connection {
    db: DbConnection,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    _subscription: Option<crate::module_bindings::SubscriptionHandle>,
}

/// A sync client for a set of streams, applying through `H`.
pub struct SyncClient<H: Handler> {
    config: ClientConfig,
    handler: H,
    health: HealthHandle,
    writer: CheckpointWriter,
    driver: Driver,
    conn: Option<Connection>,
    metrics: ClientMetrics,
    stream_metrics: BTreeMap<String, StreamMetrics>,
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
        let mut syncer = handler.syncer();
        if let Some(sync) = syncer.as_mut() {
            // A process that crashed may have left commits that are not on disk yet: they
            // must be before its cursors count as durable (and are acked).
            sync().map_err(|e| ClientError::HandlerSync(e.to_string()))?;
        }
        let owned = handler.cursors().map_err(|e| ClientError::HandlerCursors(e.to_string()))?;
        let handler_owns_cursors = owned.is_some();
        let stored = match owned.map(Ok).unwrap_or_else(|| checkpoint.load().map(Option::unwrap_or_default)) {
            Ok(cursors) => Stored::Cursors(cursors),
            Err(CheckpointError::Corrupt { path, reason }) => {
                log::error!("checkpoint {} is corrupt ({reason}); rebuilding every stream", path.display());
                Stored::Corrupt(reason)
            }
            Err(e) => return Err(e.into()),
        };
        let settings = Settings {
            streams: config.streams.clone(),
            ack: config.ack,
            server_behind_limit: config.server_behind_limit,
            handler_owns_cursors,
            seed: rand::random(),
            replay_slots: config.replay_slots,
        };
        let driver = Driver::new(settings, stored);
        let health = HealthHandle::default();
        let snapshot = driver.health(now());
        health.update(|h| *h = snapshot);
        let stream_metrics = config.streams.iter().map(|id| (id.clone(), StreamMetrics::new(id))).collect();
        let writer = CheckpointWriter::spawn(checkpoint, syncer).map_err(|source| CheckpointError::Io { path: config.checkpoint.clone(), source })?;
        Ok(SyncClient { config, handler, health, writer, driver, conn: None, metrics: ClientMetrics::default(), stream_metrics })
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
        self.driver.applied()
    }

    /// Syncs until `shutdown` is set (returns `Ok`) or a failure retrying cannot fix.
    pub fn run(&mut self, shutdown: &AtomicBool) -> Result<(), ClientError> {
        loop {
            // A write that finished while no connection could be rung.
            if let Some(end) = self.take_written(shutdown) {
                return end;
            }
            if shutdown.load(Ordering::Relaxed) {
                if let Some(end) = self.step(Input::Shutdown, shutdown) {
                    return end;
                }
            }
            let Some(conn) = &self.conn else {
                if let Some(end) = self.step(Input::Tick, shutdown) {
                    return end;
                }
                if self.conn.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            };
            // Everything that has arrived, then a tick: the driver plans a round of work
            // after each batch of messages.
            let first = match conn.rx.recv_timeout(self.driver.wait()) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Msg::Disconnected(Some("the connection thread ended".into()))),
            };
            let mut next = first;
            while let Some(msg) = next {
                if let Msg::CheckpointWritten = msg {
                    if let Some(end) = self.take_written(shutdown) {
                        return end;
                    }
                    next = self.conn.as_ref().and_then(|c| c.rx.try_recv().ok());
                    continue;
                }
                if let Msg::Segment(id, Ok(segment), published_at) = &msg {
                    if let Some(m) = self.stream_metrics.get_mut(id) {
                        m.segment(segment.first_seq, segment.last_seq, *published_at);
                    }
                }
                if let Some(end) = self.step(Input::Msg(msg), shutdown) {
                    return end;
                }
                next = self.conn.as_ref().and_then(|c| c.rx.try_recv().ok());
            }
            if let Some(end) = self.step(Input::Tick, shutdown) {
                return end;
            }
        }
    }

    /// Steps the driver with `input` and carries out its commands in order, each
    /// command's own result first (depth first). `Some` ends the run.
    fn step(&mut self, input: Input, shutdown: &AtomicBool) -> Option<Result<(), ClientError>> {
        self.step_at(input, now(), shutdown)
    }

    /// [`SyncClient::step`] at a time already read (the apply loop reads the clock once
    /// per pump, not twice per event).
    fn step_at(&mut self, input: Input, at: Now, shutdown: &AtomicBool) -> Option<Result<(), ClientError>> {
        for command in self.driver.step(input, at) {
            let next = match self.execute(command, shutdown) {
                Ok(Some(next)) => next,
                Ok(None) => continue,
                Err(end) => return Some(end),
            };
            if let Some(end) = self.step(next, shutdown) {
                return Some(end);
            }
        }
        None
    }

    /// Carries out one command; `Ok(Some(input))` is its result for the driver,
    /// `Err(end)` ends the run (a stop, or a checkpoint that cannot be written).
    fn execute(&mut self, command: Command, shutdown: &AtomicBool) -> Result<Option<Input>, Result<(), ClientError>> {
        let conn = self.conn.as_ref();
        match command {
            Command::Connect => {
                self.metrics.connect_attempt();
                return Ok(Some(match self.connect() {
                    Ok(()) => Input::Opened,
                    Err(e) => Input::Failed(e),
                }));
            }
            Command::Hello => {
                if let Some(c) = conn {
                    if let Err(e) = c.db.reducers.hello(khala_proto::PROTOCOL_VERSION, self.config.client_build.clone()) {
                        return Ok(Some(Input::Failed(ClientError::Connect(e.to_string()))));
                    }
                }
            }
            Command::ReadHandlerCursors => {
                // What the handler committed counts as durable once read: sync it first. A
                // failure ends the session with an error retrying cannot fix, so the driver
                // stops (and says why in the health it reports).
                if let Err(failed) = self.writer.sync_now() {
                    return Ok(Some(Input::Failed(failed.into())));
                }
                return Ok(Some(match self.handler.cursors() {
                    Ok(cursors) => Input::HandlerCursors(cursors.unwrap_or_default()),
                    Err(e) => Input::Failed(ClientError::HandlerCursors(e.to_string())),
                }));
            }
            Command::Subscribe => {
                self.metrics.session_up();
                if let Some(c) = self.conn.as_mut() {
                    c._subscription = Some(transport::subscribe(&c.db, META, transport::queries(), &c.tx));
                }
            }
            // A call that cannot be sent means the connection is gone: its disconnect
            // follows on the channel.
            Command::OpenWindow { stream_id, bucket } => {
                if let Some(c) = conn {
                    let _ = c.db.reducers.open_window(stream_id, bucket);
                }
            }
            Command::CloseWindow { stream_id, bucket } => {
                if let Some(c) = conn {
                    let _ = c.db.reducers.close_window(stream_id, bucket);
                }
            }
            Command::Ack { stream_id, seq, chain_hash } => {
                if let Some(c) = conn {
                    let _ = c.db.reducers.ack(stream_id, seq, chain_hash);
                }
            }
            Command::Rebootstrap(stale) => {
                let ok = match self.handler.rebootstrap(&stale) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("{}: handler failed on rebootstrap: {e}; retrying", stale.stream_id);
                        false
                    }
                };
                return Ok(Some(Input::Rebootstrapped { stream_id: stale.stream_id, ok }));
            }
            Command::Apply { stream_id } => return self.apply(stream_id, shutdown).map(|()| None),
            Command::CaughtUp => self.handler.caught_up(),
            Command::Checkpoint { cursors, set_aside } => {
                if let Err(e) = self.handler.persist() {
                    log::warn!("the handler could not persist its effects ({e}); the checkpoint waits");
                    return Ok(Some(Input::Checkpointed { set_aside_to: None, persisted: false }));
                }
                if cursors.is_none() && !set_aside && !self.writer.syncs() {
                    // The handler owns its cursors and its persist waited for the disk:
                    // that was the checkpoint.
                    return Ok(Some(Input::Checkpointed { set_aside_to: None, persisted: true }));
                }
                // The handler's effects are committed; the writer makes them durable (its
                // syncer), then the file may say so. The answer rings the connection's
                // channel (`run` takes it).
                self.writer.submit(cursors, set_aside, self.conn.as_ref().map(|c| c.tx.clone()));
            }
            Command::ReportHealth { write_file } => self.report_health(write_file),
            Command::Note(note) => match note {
                Note::Rebootstrap { stream_id, reason } => {
                    if let Some(m) = self.stream_metrics.get_mut(&stream_id) {
                        m.rebootstrap(&stream_id, reason);
                    }
                }
                Note::LeaseEnded { stream_id } => crate::metrics::lease_ended(&stream_id),
                Note::CorruptSegment { stream_id } => crate::metrics::corrupt_segment(&stream_id),
                Note::AuthFailure(kind) => crate::metrics::auth_failure(kind),
            },
            Command::Reconnect { delay } => {
                self.disconnect();
                let until = Instant::now() + delay;
                while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
                }
            }
            Command::Stop(end) => {
                // The driver stops only after its checkpoint's answer, so nothing is in
                // flight here; were it otherwise, the write would still finish first.
                if let Some(Err(failed)) = self.writer.wait() {
                    self.disconnect();
                    return Err(Err(self.not_written(failed)));
                }
                self.disconnect();
                return Err(end);
            }
        }
        Ok(None)
    }

    /// Feeds the checkpoint write that has finished, if one has, to the driver. A file
    /// that cannot be written ends the run, and a `run` called again writes it; a
    /// handler's sync that failed ends this run and every one after it (the writer never
    /// runs that syncer again).
    fn take_written(&mut self, shutdown: &AtomicBool) -> Option<Result<(), ClientError>> {
        match self.writer.try_take()? {
            Ok(set_aside_to) => self.step(Input::Checkpointed { set_aside_to, persisted: true }, shutdown),
            Err(failed) => Some(Err(self.not_written(failed))),
        }
    }

    /// Tells the driver its checkpoint was not written; the error that ends the run.
    fn not_written(&mut self, failed: WriteFailed) -> ClientError {
        self.driver.checkpoint_not_written(failed.set_aside_to());
        failed.into()
    }

    /// Hands the stream's ready events to the handler, one at a time, each result to
    /// the driver (which says when to stop).
    fn apply(&mut self, stream_id: String, shutdown: &AtomicBool) -> Result<(), Result<(), ClientError>> {
        let at = now();
        while let Some(event) = self.driver.next_event(&stream_id, at) {
            let (seq, occurred_at_micros) = (event.seq, event.occurred_at_micros);
            let input = match self.handler.apply(event) {
                Ok(()) => {
                    if let Some(m) = self.stream_metrics.get_mut(&stream_id) {
                        m.applied(&self.metrics, seq, occurred_at_micros);
                    }
                    Input::Applied { stream_id: stream_id.clone(), seq }
                }
                Err(e) => {
                    log::warn!("{stream_id}: handler failed at seq {seq}: {e}; retrying from that seq");
                    Input::ApplyFailed { stream_id: stream_id.clone(), seq }
                }
            };
            let failed = matches!(input, Input::ApplyFailed { .. });
            if let Some(end) = self.step_at(input, at, shutdown) {
                return Err(end);
            }
            if failed {
                break;
            }
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<(), ClientError> {
        let token = std::fs::read_to_string(&self.config.token_file)
            .map_err(|e| ClientError::Token(format!("{}: {e}", self.config.token_file.display())))?;
        let (tx, rx) = mpsc::channel();
        let db = transport::connect(&self.config.server_url, &self.config.database, token.trim(), self.config.wants_compression(), &tx)?;
        self.conn = Some(Connection { db, tx, rx, _subscription: None });
        Ok(())
    }

    fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            crate::transport::disconnect_contained(|| {
                let _ = c.db.disconnect();
            });
        }
    }

    /// Publishes the driver's health to the handle, the metrics and (when asked) the file.
    fn report_health(&mut self, write_file: bool) {
        let at = now();
        let snapshot = self.driver.health(at);
        for s in &snapshot.streams {
            if let Some(m) = self.stream_metrics.get_mut(&s.stream_id) {
                let state = khala_proto::v1::ConnectionState::try_from(s.state).unwrap_or_default();
                m.health(s.cursor, s.target, self.driver.lease_expires_micros(&s.stream_id), state, at.unix_micros);
            }
        }
        self.metrics.state(snapshot.state);
        self.metrics.streams(snapshot.streams.iter().map(|s| s.state));
        if write_file {
            if let Err(e) = health::write_json(&self.config.health_file(), &snapshot) {
                log::debug!("writing the health file: {e}");
            }
        }
        self.health.update(|h| *h = snapshot);
    }
}

//! The sync driver: every decision of the sync loop, and nothing else. [`Driver::step`]
//! takes one [`Input`] (a message from the connection, a tick, the result of a command)
//! and the time, and returns the [`Command`]s to carry out, in order. It makes no SDK
//! call, touches no file, reads no clock and starts no thread: the shell
//! ([`SyncClient`](super::SyncClient)) does those, and feeds each result back as an
//! input. So the sync layer's guarantees are tested here, without a server
//! (`driver/tests.rs`).
//!
//! Per stream, one small sub-state per job: [`windows`] (which buckets are open),
//! [`grant`] (grant, lease, visibility), [`acks`], [`hold`] (gaps and server-behind
//! holds), [`retry`] (the handler's rebootstrap and backoff), composed in [`stream`]
//! around the pure apply engine ([`StreamEngine`](crate::apply::StreamEngine)).
//! [`session`] is the connection's life and its backoff; [`slots`] shares the replay
//! windows among the streams catching up; [`health`] reads the state.

pub mod acks;
pub mod grant;
pub mod health;
pub mod hold;
pub mod retry;
pub mod session;
pub mod slots;
pub mod stream;
pub mod windows;
#[cfg(test)]
mod tests;

use crate::apply::{Alert, Event, StreamInfo, StreamMode};
use crate::error::ClientError;
use crate::transport::Msg;
use khala_proto::hash::GENESIS;
use khala_proto::v1::ConnectionState;
use khala_proto::{CodedError, ErrorCode, StaleCursor, StreamCursor};
use session::{Phase, Session, HANDSHAKE_TIMEOUT};
use slots::ReplaySlots;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use stream::StreamState;
use windows::WindowCall;

/// The subscription tag of the client's queries.
pub const META: u64 = 0;
/// The longest wait between two ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// Least time between two checkpoint writes while events keep coming.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);
/// Most events applied per stream in one round, so checkpoints, acks and windows keep
/// up during a replay.
pub const APPLY_PER_ROUND: usize = 2_048;
/// Least time between two writes of the health file.
const HEALTH_FILE_EVERY: Duration = Duration::from_millis(500);

/// The time of a step: the monotonic clock for timers, the wall clock for cursors and
/// leases. The shell reads both; the driver never does.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub unix_micros: i64,
}

/// What the driver needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub streams: Vec<String>,
    /// Send acks after each durable checkpoint.
    pub ack: bool,
    /// How long a server-behind hold lasts before it is reported.
    pub server_behind_limit: Duration,
    /// The handler keeps the cursors with its effects: resume from its cursors (read
    /// again at every session) and keep no checkpoint file.
    pub handler_owns_cursors: bool,
    /// Seeds the backoff's jitter.
    pub seed: u64,
    /// Streams that may catch up at once, each with its replay windows ([`slots`]);
    /// 0 for no limit.
    pub replay_slots: usize,
}

/// Where the streams start: stored cursors, or a checkpoint that could not be read.
#[derive(Debug, Clone)]
pub enum Stored {
    Cursors(Vec<StreamCursor>),
    Corrupt(String),
}

/// Everything that happens to the driver.
#[derive(Debug)]
pub enum Input {
    /// Time passed (nothing else happened); timers are checked and, when connected, a
    /// round of work is planned.
    Tick,
    /// A message from the connection.
    Msg(Msg),
    /// [`Command::Connect`] opened a connection.
    Opened,
    /// [`Command::Connect`], [`Command::Hello`] or [`Command::ReadHandlerCursors`] failed.
    Failed(ClientError),
    /// The handler's own cursors ([`Command::ReadHandlerCursors`]).
    HandlerCursors(Vec<StreamCursor>),
    /// The handler applied the event at `seq`.
    Applied { stream_id: String, seq: u64 },
    /// The handler failed on the event at `seq`.
    ApplyFailed { stream_id: String, seq: u64 },
    /// The handler's answer to [`Command::Rebootstrap`].
    Rebootstrapped { stream_id: String, ok: bool },
    /// [`Command::Checkpoint`] ran: the corrupt file went to `set_aside_to` (when asked);
    /// `persisted` is false when the handler could not persist (nothing was written).
    Checkpointed { set_aside_to: Option<PathBuf>, persisted: bool },
    /// Stop: flush, report, and end.
    Shutdown,
}

/// What the shell must do.
#[derive(Debug)]
pub enum Command {
    /// Open a connection (then [`Input::Opened`] or [`Input::Failed`]).
    Connect,
    /// Call `hello` (its answer comes as [`Msg::Hello`]).
    Hello,
    /// Ask the handler for its cursors (then [`Input::HandlerCursors`] or [`Input::Failed`]).
    ReadHandlerCursors,
    /// Subscribe the client's queries under [`META`].
    Subscribe,
    OpenWindow { stream_id: String, bucket: u64 },
    CloseWindow { stream_id: String, bucket: u64 },
    Ack { stream_id: String, seq: u64, chain_hash: Vec<u8> },
    /// Tell the handler the stream restarts from its floor (then [`Input::Rebootstrapped`]).
    Rebootstrap(StaleCursor),
    /// Hand the stream's ready events to the handler: take each from
    /// [`Driver::next_event`] and answer with [`Input::Applied`] or [`Input::ApplyFailed`].
    Apply { stream_id: String },
    /// Everything that arrived is applied ([`Handler::caught_up`](crate::Handler::caught_up)).
    CaughtUp,
    /// Have the handler persist; only if it did, set the corrupt checkpoint file aside
    /// (when `set_aside`) and write `cursors` to the checkpoint file (`None`: the handler
    /// owns its cursors, no file); then [`Input::Checkpointed`], at once or after other
    /// inputs (the shell writes the file on a thread of its own). Until that answer no
    /// other checkpoint is asked for. (A corrupt file set aside before the handler's drop
    /// of every stream is durable would let a crash restart from nothing, over the
    /// handler's old state.)
    Checkpoint { cursors: Option<Vec<StreamCursor>>, set_aside: bool },
    /// Publish [`Driver::health`] (and write the health file when `write_file`).
    ReportHealth { write_file: bool },
    /// Count something (metrics).
    Note(Note),
    /// Drop the connection, wait `delay` (or until shutdown), then tick.
    Reconnect { delay: Duration },
    /// Drop the connection and return this from `run`.
    Stop(Result<(), ClientError>),
}

/// Something worth counting.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    Rebootstrap { stream_id: String, reason: i32 },
    LeaseEnded { stream_id: String },
    /// A segment of the stream failed its own chain hashes and was refused.
    CorruptSegment { stream_id: String },
    /// A refused token (`unauthorized`) or a refused stream call (`forbidden`).
    AuthFailure(&'static str),
}

/// A checkpoint asked for and not answered yet: per stream, the cursor offered and, when
/// it is of the stream's current history (not a rebuild's old cursor), that history
/// ([`StreamState::history`]).
type Offered = Vec<(String, StreamCursor, Option<u64>)>;

/// A stop waiting for its checkpoint: the checkpoint in flight is answered first (the
/// shell writes files on another thread), then what was applied since is offered once,
/// and only its answer lets [`Command::Stop`] out.
#[derive(Debug)]
struct Stopping {
    result: Result<(), ClientError>,
    flushed: bool,
}

/// The sync loop's state and decisions (see the module doc).
#[derive(Debug)]
pub struct Driver {
    settings: Settings,
    streams: BTreeMap<String, StreamState>,
    /// Cursors of streams this client does not sync now, kept as they were.
    other_cursors: Vec<StreamCursor>,
    session: Session,
    slots: ReplaySlots,
    /// This connection's identity: rows of other identities (the owner sees them) are
    /// ignored.
    me: Option<spacetimedb_sdk::Identity>,
    /// The corrupt checkpoint's reason, until every rebootstrap it caused has been taken
    /// by the handler; the file stays in place (and nothing is written) until then.
    corrupt: Option<String>,
    /// The reason of a corrupt checkpoint being set aside now.
    setting_aside: Option<String>,
    /// Applied events (or a rebootstrap) not yet in a checkpoint.
    dirty: bool,
    offered: Option<Offered>,
    /// A stop asked for and waiting for its checkpoint; no other input moves the driver.
    stopping: Option<Stopping>,
    /// A session ended while a checkpoint was in flight: checkpoint again at its answer,
    /// as a session's end does.
    flush_at_answer: bool,
    last_checkpoint: Option<Instant>,
    last_health_file: Option<Instant>,
    /// Handler work was handed out in the last round; it is settled at the next tick.
    worked: bool,
    applied_any: bool,
    /// A stream ran out of its round's budget with events still ready.
    more_ready: bool,
    last_error: String,
    /// The failure retrying cannot fix that stopped the client for good: its code and text.
    stopped_for: Option<(&'static str, String)>,
    connect_attempts: u32,
    next_retry_ms: u64,
    notes: Vec<Note>,
}

/// The client's seed mixed with a stream's id, so that its streams draw different window
/// close delays.
fn stream_seed(seed: u64, stream_id: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    (seed, stream_id).hash(&mut hasher);
    hasher.finish()
}

impl Driver {
    pub fn new(settings: Settings, stored: Stored) -> Self {
        let (cursors, corrupt) = match stored {
            Stored::Cursors(c) => (c, None),
            Stored::Corrupt(reason) => (Vec::new(), Some(reason)),
        };
        let mut notes = Vec::new();
        let mut streams = BTreeMap::new();
        for id in &settings.streams {
            let cursor = cursors.iter().find(|c| &c.stream_id == id).cloned().unwrap_or_else(|| genesis(id));
            let mut state = StreamState::new(&cursor, stream_seed(settings.seed, id));
            if corrupt.is_some() {
                notes.push(state.corrupt_checkpoint(id));
            }
            streams.insert(id.clone(), state);
        }
        let other_cursors = cursors.into_iter().filter(|c| !streams.contains_key(&c.stream_id)).collect();
        Driver {
            session: Session::new(settings.seed),
            slots: ReplaySlots::new(settings.replay_slots),
            settings,
            streams,
            other_cursors,
            me: None,
            last_error: corrupt.as_ref().map(|r| format!("checkpoint_corrupt: {r}")).unwrap_or_default(),
            stopped_for: None,
            corrupt,
            setting_aside: None,
            dirty: false,
            offered: None,
            stopping: None,
            flush_at_answer: false,
            last_checkpoint: None,
            last_health_file: None,
            worked: false,
            applied_any: false,
            more_ready: false,
            connect_attempts: 0,
            next_retry_ms: 0,
            notes,
        }
    }

    /// The last applied seq of each stream.
    pub fn applied(&self) -> BTreeMap<String, u64> {
        self.streams.iter().map(|(id, s)| (id.clone(), s.engine.applied())).collect()
    }

    /// The durable cursor of a stream (what the last checkpoint wrote).
    pub fn durable(&self, stream_id: &str) -> Option<&StreamCursor> {
        self.streams.get(stream_id).map(|s| &s.durable)
    }

    pub fn lease_expires_micros(&self, stream_id: &str) -> Option<i64> {
        self.streams.get(stream_id).and_then(|s| s.grant.lease_expires_micros)
    }

    pub fn phase(&self) -> &Phase {
        &self.session.phase
    }

    /// Buckets open or being opened for a stream.
    pub fn windows_held(&self, stream_id: &str) -> usize {
        self.streams.get(stream_id).map_or(0, |s| s.windows.open.union(&s.windows.opening).count())
    }

    /// How long the shell may wait for a message before the next [`Input::Tick`].
    pub fn wait(&self) -> Duration {
        // A stop waits for the checkpoint's answer, which rings the loop.
        if self.stopping.is_some() || !self.session.subscribed() {
            TICK
        } else if self.worked {
            Duration::ZERO
        } else if self.dirty {
            CHECKPOINT_EVERY
        } else {
            TICK
        }
    }

    /// The next event of `stream_id` the handler may take in this round (see
    /// [`Command::Apply`]).
    pub fn next_event(&mut self, stream_id: &str, now: Now) -> Option<&Event> {
        let s = self.streams.get_mut(stream_id)?;
        if s.retry.rebootstrap_due.is_some() || !s.retry.ready(now.at) {
            return None;
        }
        if s.budget == 0 {
            self.more_ready |= s.engine.next_ready().is_some();
            return None;
        }
        s.engine.next_ready()
    }

    /// Takes one input; returns what to do, in order.
    pub fn step(&mut self, input: Input, now: Now) -> Vec<Command> {
        let mut out = Vec::new();
        if self.stopping.is_some() {
            // Stopping: only the checkpoint's answer moves the driver on (or a tick, once
            // a write that failed must be tried again).
            match input {
                Input::Checkpointed { .. } => {}
                Input::Tick => {
                    self.continue_stop(now, &mut out);
                    return out;
                }
                _ => return out,
            }
        }
        match input {
            Input::Tick => self.tick(now, &mut out),
            Input::Msg(msg) => self.message(msg, now, &mut out),
            Input::Opened => {
                if matches!(self.session.phase, Phase::Connecting { .. }) {
                    self.session.phase = Phase::Handshaking { deadline: now.at + HANDSHAKE_TIMEOUT, hello_sent: false };
                }
            }
            Input::Failed(e) => self.session_ended(e, now, &mut out),
            Input::HandlerCursors(stored) => {
                for (id, s) in self.streams.iter_mut() {
                    let cursor = stored.iter().find(|c| &c.stream_id == id).cloned().unwrap_or_else(|| genesis(id));
                    s.resume_from(id, cursor);
                }
                out.push(Command::Subscribe);
            }
            Input::Applied { stream_id, seq } => {
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    s.engine.mark_applied(seq);
                    s.hold.progressed();
                    s.retry.succeeded();
                    s.budget = s.budget.saturating_sub(1);
                    self.dirty = true;
                    self.applied_any = true;
                }
            }
            Input::ApplyFailed { stream_id, seq } => {
                let unit = self.session.unit();
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    log::debug!("{stream_id}: retrying from seq {seq}");
                    s.retry.failed(now.at, unit);
                }
            }
            Input::Rebootstrapped { stream_id, ok } => {
                let unit = self.session.unit();
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    if ok {
                        s.retry.rebootstrapped();
                        // The new position (the floor, or the head of a trimmed or new
                        // epoch) is checkpointed even if no event follows.
                        self.dirty = true;
                    } else {
                        s.retry.failed(now.at, unit);
                    }
                }
            }
            Input::Checkpointed { set_aside_to, persisted } => {
                let owner_failed = !persisted && self.settings.handler_owns_cursors && self.offered.is_some();
                self.checkpointed(set_aside_to, persisted);
                if owner_failed {
                    // The handler's batch may be gone, not waiting: read its cursors again.
                    self.session_ended(ClientError::HandlerPersist, now, &mut out);
                }
                if std::mem::take(&mut self.flush_at_answer) {
                    self.checkpoint(now, &mut out);
                }
                self.continue_stop(now, &mut out);
            }
            Input::Shutdown => self.stop(Ok(()), now, &mut out),
        }
        out.extend(self.notes.drain(..).map(Command::Note));
        out
    }

    fn tick(&mut self, now: Now, out: &mut Vec<Command>) {
        match self.session.phase {
            Phase::Idle => self.connect(now, out),
            Phase::Backoff { until, .. } if now.at >= until => self.connect(now, out),
            Phase::Handshaking { deadline, .. } if now.at > deadline => {
                self.session_ended(ClientError::Connect(format!("no answer to hello within {} s", HANDSHAKE_TIMEOUT.as_secs())), now, out)
            }
            Phase::Up { subscribed: true } => self.round(now, out),
            // A `run` called again after a stop for good ends at once, with that failure
            // (before, it waited on a session that would never start).
            Phase::Stopped { .. } => {
                if let Some((code, message)) = &self.stopped_for {
                    out.push(Command::Stop(Err(ClientError::StoppedEarlier { code, message: message.clone() })));
                }
            }
            _ => {}
        }
    }

    fn connect(&mut self, now: Now, out: &mut Vec<Command>) {
        self.session.phase = Phase::Connecting { since: now.at };
        self.connect_attempts = self.session.attempt();
        out.push(Command::ReportHealth { write_file: false });
        out.push(Command::Connect);
    }

    /// Ends the session: flush the checkpoint, forget what the connection held, and
    /// either back off and reconnect or stop (a failure retrying cannot fix).
    fn session_ended(&mut self, err: ClientError, now: Now, out: &mut Vec<Command>) {
        if matches!(self.session.phase, Phase::Stopped { .. } | Phase::Backoff { .. }) {
            return;
        }
        log::warn!("session ended: {err}");
        if matches!(err, ClientError::Unauthorized(_)) {
            self.notes.push(Note::AuthFailure("unauthorized"));
        }
        // What was applied before the session ended is made durable now, so that
        // neither a retry nor a stop applies it again (at the answer of a checkpoint in
        // flight, if one is).
        self.flush_at_answer = self.offered.is_some();
        self.checkpoint(now, out);
        for s in self.streams.values_mut() {
            s.windows.disconnected();
            s.acks.reconnected();
        }
        self.worked = false;
        self.last_error = format!("{}: {err}", err.code());
        if !err.is_retryable() {
            let state = match &err {
                ClientError::Incompatible(_) => ConnectionState::UpgradeRequired,
                _ => ConnectionState::Unspecified,
            };
            self.session.phase = Phase::Stopped { state };
            self.stopped_for = Some((err.code(), err.to_string()));
            self.stop(Err(err), now, out);
            return;
        }
        let delay = self.session.failed();
        let state = if matches!(err, ClientError::Unauthorized(_)) { ConnectionState::Unauthorized } else { ConnectionState::Backoff };
        self.session.phase = Phase::Backoff { until: now.at + delay, state };
        self.next_retry_ms = delay.as_millis() as u64;
        out.push(Command::ReportHealth { write_file: true });
        out.push(Command::Reconnect { delay });
    }

    /// The client's subscription is applied: from now on a stream without a grant row
    /// has no grant.
    fn meta_applied(&mut self) {
        if self.session.phase == (Phase::Up { subscribed: false }) {
            self.session.phase = Phase::Up { subscribed: true };
            for s in self.streams.values_mut() {
                s.grant.rows_known();
            }
        }
    }

    fn message(&mut self, msg: Msg, now: Now, out: &mut Vec<Command>) {
        match msg {
            Msg::Disconnected(e) if !matches!(self.session.phase, Phase::Idle) => {
                let text = e.unwrap_or_else(|| "the server closed the connection".into());
                self.session_ended(ClientError::Disconnected(text), now, out);
            }
            Msg::Disconnected(_) => {}
            Msg::SubscriptionError(tag, e) => self.session_ended(ClientError::Subscription(format!("subscription {tag}: {e}")), now, out),
            Msg::Connected(identity) => {
                if let Phase::Handshaking { deadline, hello_sent: false } = self.session.phase {
                    self.me = Some(identity);
                    self.session.phase = Phase::Handshaking { deadline, hello_sent: true };
                    out.push(Command::Hello);
                }
            }
            Msg::Hello(Ok(())) => {
                if matches!(self.session.phase, Phase::Handshaking { .. }) {
                    self.session.phase = Phase::Up { subscribed: false };
                    for s in self.streams.values_mut() {
                        // Buffered events may come from a history the server no longer has.
                        s.engine.clear_pending();
                    }
                    out.push(if self.settings.handler_owns_cursors { Command::ReadHandlerCursors } else { Command::Subscribe });
                }
            }
            Msg::Hello(Err(text)) => {
                let e = CodedError::parse(&text);
                let err = match e.code {
                    ErrorCode::UpgradeRequired | ErrorCode::UnsupportedProtocolVersion | ErrorCode::InvalidArgument => ClientError::Incompatible(e),
                    ErrorCode::Unauthorized => ClientError::Unauthorized(e.message),
                    _ => ClientError::Connect(text),
                };
                self.session_ended(err, now, out);
            }
            Msg::Applied(META) => self.meta_applied(),
            msg if matches!(self.session.phase, Phase::Up { .. }) => self.row(msg, now),
            _ => {}
        }
    }

    /// A row change or a call's result, while the session is up.
    fn row(&mut self, msg: Msg, now: Now) {
        let me = self.me;
        match msg {
            Msg::Segment(stream_id, segment, _) => {
                let Some(s) = self.streams.get_mut(&stream_id) else { return };
                let alerts = match segment {
                    Ok(segment) => s.engine.offer(segment).alerts,
                    // Refused as a corrupt one is: named in health and metrics, refetched.
                    Err(unreadable) => {
                        log::error!("{stream_id}: {}", unreadable.detail);
                        vec![Alert::CorruptSegment { first_seq: unreadable.first_seq, last_seq: unreadable.last_seq }]
                    }
                };
                self.dirty |= s.alerts(&stream_id, alerts, now.at, &mut self.notes);
            }
            Msg::Stream(row) => {
                let Some(s) = self.streams.get_mut(&row.stream_id) else { return };
                s.grant.row_visible = true;
                let alerts = s.engine.observe(StreamInfo { epoch: row.epoch, head_seq: row.head_seq, oldest_seq: row.oldest_seq, head_hash: row.head_hash });
                self.dirty |= s.alerts(&row.stream_id, alerts, now.at, &mut self.notes);
            }
            Msg::StreamGone(id) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.grant.row_visible = false;
                }
            }
            Msg::Grant(g) if Some(g.grantee) == me => {
                if let Some(s) = self.streams.get_mut(&g.stream_id) {
                    s.grant.granted(g.subscribe, g.ack, g.expires_at_micros);
                }
            }
            Msg::GrantGone(g) if Some(g.grantee) == me => {
                if let Some(s) = self.streams.get_mut(&g.stream_id) {
                    log::warn!("the grant on {} is gone (revoked or expired)", g.stream_id);
                    self.notes.push(Note::LeaseEnded { stream_id: g.stream_id.clone() });
                    s.grant.ended();
                }
            }
            Msg::WindowOpen(w) if Some(w.grantee) == me => {
                if let Some(s) = self.streams.get_mut(&w.stream_id) {
                    s.windows.opened(w.bucket);
                }
            }
            Msg::WindowClosed(w) if Some(w.grantee) == me => {
                if let Some(s) = self.streams.get_mut(&w.stream_id) {
                    s.windows.closed(w.bucket);
                }
            }
            Msg::WindowCall { stream_id, bucket, open, result: Err(text) } => {
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    let e = CodedError::parse(&text);
                    log::warn!("{stream_id}: {} window {bucket} failed: {e}", if open { "opening" } else { "closing" });
                    let forbidden = e.code == ErrorCode::ForbiddenStream;
                    if forbidden {
                        self.notes.push(Note::AuthFailure("forbidden"));
                    }
                    // Only the owner sees a stream without a grant; it sees every segment
                    // without windows too.
                    s.windows.refused(WindowCall::on(bucket, open), now.at, forbidden && s.grant.owner_without_grant());
                }
            }
            Msg::WindowCall { stream_id, bucket, open, result: Ok(()) } => {
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    s.windows.answered(WindowCall::on(bucket, open));
                }
            }
            Msg::Acked { stream_id, seq, result } => {
                if let Some(s) = self.streams.get_mut(&stream_id) {
                    if let Err(text) = &result {
                        let e = CodedError::parse(text);
                        log::warn!("ack of {stream_id} at {seq} failed: {e}");
                        if e.code == ErrorCode::ForbiddenStream {
                            self.notes.push(Note::AuthFailure("forbidden"));
                            s.grant.can_ack = false;
                        }
                    }
                    s.acks.answered(seq, result.is_ok(), s.durable.seq, now.at);
                }
            }
            _ => {}
        }
    }

    /// One round while subscribed: settle the last round's handler work, check stalled
    /// streams, checkpoint, ack, move windows, report health, then hand out new work.
    fn round(&mut self, now: Now, out: &mut Vec<Command>) {
        if std::mem::take(&mut self.worked) && std::mem::take(&mut self.applied_any) && !self.more_ready {
            out.push(Command::CaughtUp);
        }
        self.applied_any = false;
        self.more_ready = false;
        self.slots.assign(self.streams.iter().filter(|(_, s)| s.windows.usable && s.grant.subscribed()).map(|(id, s)| (id.as_str(), s.catching_up(), s.stuck())));
        for (id, s) in self.streams.iter_mut() {
            if self.slots.waits(id, s.catching_up()) {
                // Waiting for a replay slot: nothing is expected to arrive.
                continue;
            }
            if s.engine.starved() {
                // Nothing applicable is here although the head is further on: the floor
                // may have passed the cursor, or rows were dropped; wait, then refetch.
                let alerts = s.engine.recheck();
                if s.windows.opening.is_empty() {
                    s.hold.gap(now.at);
                }
                self.dirty |= s.alerts(id, alerts, now.at, &mut self.notes);
            } else if s.awaits_segment() && s.windows.opening.is_empty() {
                // The segment a rebuild or a hold waits for may have been dropped too.
                s.hold.gap(now.at);
            }
        }
        if self.dirty && self.last_checkpoint.is_none_or(|t| now.at.saturating_duration_since(t) >= CHECKPOINT_EVERY) {
            self.checkpoint(now, out);
        }
        for (id, s) in self.streams.iter_mut() {
            // Only once the server's row of the stream has shown the durable cursor's
            // epoch: a process started from a checkpoint file may hold a cursor of a
            // history the server has since replaced (and its handler may have rebuilt).
            let same_history = s.engine.info().is_some_and(|info| info.epoch == s.durable.epoch);
            if self.settings.ack && s.grant.subscribed() && s.grant.can_ack && s.engine.mode() == &StreamMode::Normal && !s.rebuilding() && same_history {
                if let Some(seq) = s.acks.due(s.durable.seq, now.at) {
                    s.acks.sent(seq, now.at);
                    out.push(Command::Ack { stream_id: id.clone(), seq, chain_hash: s.durable.chain_hash.clone() });
                }
            }
            if s.windows.usable && s.grant.subscribed() {
                if s.hold.gap_expired(now.at) {
                    log::warn!("{id}: a gap after {} did not fill; reopening the windows", s.engine.applied());
                    s.windows.reset();
                }
                let mut calls = s.windows.expire(now.at);
                for call in &calls {
                    log::warn!("{id}: window call {call:?} had no answer within {} s; making it again", windows::ANSWER_WITHIN.as_secs());
                }
                calls.extend(if self.slots.waits(id, s.catching_up()) { s.windows.release(now.at) } else { s.windows.plan(s.engine.fetch_after(), s.engine.may_straddle() || s.hold.widened(), !s.catching_up(), now.at) });
                for call in calls {
                    out.push(match call {
                        WindowCall::Open(bucket) => Command::OpenWindow { stream_id: id.clone(), bucket },
                        WindowCall::Close(bucket) => Command::CloseWindow { stream_id: id.clone(), bucket },
                    });
                }
            }
            if let StreamMode::ServerBehind { head } = s.engine.mode() {
                if s.hold.confirm_behind(now.at) {
                    log::warn!("{id}: the server's head {head} is behind the checkpoint {} (it lost commits in a crash); holding", s.engine.applied());
                }
                if s.hold.behind_too_long(self.settings.server_behind_limit, now.at) {
                    log::error!("{id}: the server has been behind the checkpoint for over {:?} (head {head}, checkpoint {})", self.settings.server_behind_limit, s.engine.applied());
                }
            }
        }
        if self.overall() == ConnectionState::Live {
            self.session.live();
            self.connect_attempts = 0;
        }
        let write_file = self.last_health_file.is_none_or(|t| now.at.saturating_duration_since(t) >= HEALTH_FILE_EVERY);
        if write_file {
            self.last_health_file = Some(now.at);
        }
        out.push(Command::ReportHealth { write_file });
        for (id, s) in self.streams.iter_mut() {
            if !s.retry.ready(now.at) {
                continue;
            }
            s.budget = APPLY_PER_ROUND;
            if let Some(stale) = &s.retry.rebootstrap_due {
                out.push(Command::Rebootstrap(stale.clone()));
                self.worked = true;
            }
            if s.engine.next_ready().is_some() {
                out.push(Command::Apply { stream_id: id.clone() });
                self.worked = true;
            }
        }
    }

    /// Stops with `result` once what was applied is checkpointed (see [`Stopping`]).
    fn stop(&mut self, result: Result<(), ClientError>, now: Now, out: &mut Vec<Command>) {
        self.stopping = Some(Stopping { result, flushed: false });
        self.continue_stop(now, out);
    }

    /// Moves a stop on: waits while a checkpoint is in flight, then offers the last one
    /// once, then stops.
    fn continue_stop(&mut self, now: Now, out: &mut Vec<Command>) {
        if self.offered.is_some() {
            return;
        }
        let Some(stopping) = self.stopping.as_mut() else { return };
        if !stopping.flushed {
            stopping.flushed = true;
            self.checkpoint(now, out);
            if self.offered.is_some() {
                return;
            }
        }
        if let Some(stopping) = self.stopping.take() {
            out.push(Command::ReportHealth { write_file: true });
            out.push(Command::Stop(stopping.result));
        }
    }

    /// Asks for a checkpoint when something changed, except while a corrupt file waits
    /// for the handler to drop every stream.
    fn checkpoint(&mut self, now: Now, out: &mut Vec<Command>) {
        if !self.dirty || self.offered.is_some() {
            return;
        }
        let set_aside = self.corrupt.is_some();
        if set_aside && self.streams.values().any(|s| s.retry.rebootstrap_due.is_some()) {
            return;
        }
        self.setting_aside = self.corrupt.take();
        let offered: Offered = self
            .streams
            .iter()
            .map(|(id, s)| if s.rebuilding() { (id.clone(), s.durable.clone(), None) } else { (id.clone(), s.engine.cursor(now.unix_micros), Some(s.history)) })
            .collect();
        let cursors = (!self.settings.handler_owns_cursors)
            .then(|| offered.iter().map(|(_, c, _)| c.clone()).chain(self.other_cursors.iter().cloned()).collect());
        self.offered = Some(offered);
        self.dirty = false;
        self.last_checkpoint = Some(now.at);
        out.push(Command::Checkpoint { cursors, set_aside });
    }

    fn checkpointed(&mut self, set_aside_to: Option<PathBuf>, persisted: bool) {
        if !persisted {
            log::warn!("the handler could not persist its effects; the checkpoint waits");
            return self.not_written(None);
        }
        let Some(offered) = self.offered.take() else { return };
        self.note_set_aside(set_aside_to);
        for (id, cursor, history) in offered {
            if let Some(s) = self.streams.get_mut(&id) {
                s.durable = cursor;
                // A rebootstrap taken since the offer: the cursor is of the old history.
                if history == Some(s.history) {
                    s.acks.durable_again();
                }
            }
        }
    }

    /// The checkpoint offered last was not written (the file could not be set aside or
    /// stored, and `run` returned that error), though the corrupt file was moved to
    /// `set_aside_to` if that is `Some`: the next round offers one again (a stop that
    /// waited for it, at the next tick). Without this a `run` called again after such an error
    /// waited for ever on the answer to a checkpoint nobody would write.
    pub fn checkpoint_not_written(&mut self, set_aside_to: Option<PathBuf>) {
        if self.offered.is_some() {
            if let Some(stopping) = &mut self.stopping {
                // `run` ends with the write's error; a `run` called again tries the last
                // checkpoint again at its first tick, then stops.
                stopping.flushed = false;
            }
        }
        self.not_written(set_aside_to);
    }

    /// The checkpoint offered last was not written: offer one again at the next chance.
    fn not_written(&mut self, set_aside_to: Option<PathBuf>) {
        if self.offered.take().is_none() {
            return;
        }
        self.dirty = true;
        match set_aside_to {
            Some(path) => self.note_set_aside(Some(path)),
            // A corrupt file stays until a checkpoint replaces it.
            None => self.corrupt = self.setting_aside.take(),
        }
    }

    /// The corrupt checkpoint file was moved to `to` (if `Some`).
    fn note_set_aside(&mut self, to: Option<PathBuf>) {
        if let (Some(path), Some(reason)) = (to, self.setting_aside.take()) {
            log::warn!("the corrupt checkpoint was moved to {}", path.display());
            self.last_error = format!("checkpoint_corrupt: {reason}; moved to {}", path.display());
        }
    }
}

/// The cursor of a stream never applied.
fn genesis(id: &str) -> StreamCursor {
    StreamCursor { stream_id: id.to_string(), chain_hash: GENESIS.to_vec(), ..Default::default() }
}

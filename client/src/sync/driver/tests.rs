//! The driver against a simulated server, handler and checkpoint file: deterministic
//! tests of single behaviours, and a property test over random interleavings of
//! everything that can happen to a client.
//!
//! The simulation is the shell's job done in memory: each [`Command`] is carried out
//! at once and its result fed back, and the server answers calls and pushes row changes
//! into one ordered queue per connection, which the test delivers message by message.

use super::windows::{close_delay, WindowCall, Windows, CLOSE_SPREAD, MAX_WANTED};
use super::*;
use crate::apply::SegmentIn;
use crate::transport::{GrantRow, StreamRow, WindowRow};
use khala_proto::hash::{bucket, Hash32, GENESIS, WINDOW_EVENTS};
use khala_proto::segment::event_chain;
use khala_proto::SegmentEvent;
use proptest::prelude::*;
use spacetimedb_sdk::Identity;
use std::collections::{BTreeSet, VecDeque};

const STREAMS: [&str; 2] = ["s.a", "s.b"];
const MAX_WINDOWS_PER_STREAM: usize = 8;

fn me() -> Identity {
    Identity::from_byte_array([7; 32])
}

fn coded(code: ErrorCode, message: &str) -> String {
    CodedError::new(code, message).to_string()
}

/// One epoch of a stream's history, as the authority has it (a republish after a server
/// crash brings back exactly these events and hashes).
#[derive(Debug, Clone, Default)]
struct Truth {
    events: Vec<SegmentEvent>,
    /// The chain hash after each event (`chains[seq - 1]`).
    chains: Vec<Hash32>,
}

impl Truth {
    fn chain(&self, seq: u64) -> Hash32 {
        if seq == 0 {
            GENESIS
        } else {
            self.chains[seq as usize - 1]
        }
    }

    fn extend_to(&mut self, stream: &str, epoch: u32, seq: u64) {
        while (self.events.len() as u64) < seq {
            let n = self.events.len() as u64 + 1;
            let event = SegmentEvent { seq: n, kind: "k".into(), payload: format!("{epoch}.{n}").into_bytes(), idempotency_key: format!("{epoch}.{n}"), occurred_at_micros: 0 };
            let chain = event_chain(&self.chain(n - 1), stream, &event);
            self.events.push(event);
            self.chains.push(chain);
        }
    }
}

/// One stream on the simulated server.
#[derive(Debug)]
struct ServerStream {
    id: &'static str,
    epoch: u32,
    truths: BTreeMap<u32, Truth>,
    head: u64,
    /// The last seq retention dropped.
    trimmed_to: u64,
    /// Retained segments, `(first, last)`.
    segments: Vec<(u64, u64)>,
    granted: bool,
    windows: BTreeSet<u64>,
    acked: u64,
    /// The `stream_view` row as the server holds it: written at once by epoch changes,
    /// retention and grants, and by a publish only when views do not lag
    /// ([`Sim::lag_views`]); otherwise by [`Sim::refresh_view`], as the module's refresh.
    view: Option<StreamRow>,
}

impl ServerStream {
    fn new(id: &'static str) -> Self {
        ServerStream { id, epoch: 1, truths: BTreeMap::from([(1, Truth::default())]), head: 0, trimmed_to: 0, segments: Vec::new(), granted: true, windows: BTreeSet::new(), acked: 0, view: None }
    }

    fn truth(&self) -> &Truth {
        &self.truths[&self.epoch]
    }

    fn oldest(&self) -> u64 {
        self.segments.first().map_or(self.head + 1, |s| s.0)
    }

    fn row(&self) -> StreamRow {
        StreamRow { stream_id: self.id.into(), epoch: self.epoch, head_seq: self.head, oldest_seq: self.oldest(), head_hash: self.truth().chain(self.head) }
    }

    /// Writes the view from the stream as it is now, and returns it.
    fn write_view(&mut self) -> StreamRow {
        let row = self.row();
        self.view = Some(row.clone());
        row
    }

    /// The view as the server holds it.
    fn view_row(&self) -> StreamRow {
        self.view.clone().unwrap_or_else(|| self.row())
    }

    fn segment(&self, (first, last): (u64, u64)) -> Msg {
        let t = self.truth();
        let events = t.events[first as usize - 1..last as usize].to_vec();
        Msg::Segment(self.id.into(), Ok(SegmentIn::new(self.id, self.epoch, first, last, t.chain(first - 1), t.chain(last), events.into_iter().map(Into::into).collect())), 0)
    }

    fn visible_segments(&self, b: u64) -> Vec<Msg> {
        self.segments.iter().filter(|s| bucket(s.0) == b).map(|s| self.segment(*s)).collect()
    }

    fn grant_row(&self) -> GrantRow {
        GrantRow { grantee: me(), stream_id: self.id.into(), subscribe: true, ack: true, expires_at_micros: i64::MAX / 2 }
    }

    fn window_row(&self, b: u64) -> WindowRow {
        WindowRow { grantee: me(), stream_id: self.id.into(), bucket: b }
    }
}

/// One stream's projection in the handler: the events applied since `base`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Projection {
    epoch: u32,
    base: u64,
    events: Vec<(u64, Hash32)>,
}

impl Projection {
    fn last(&self) -> u64 {
        self.base + self.events.len() as u64
    }

    fn hash_at(&self, seq: u64) -> Option<Hash32> {
        seq.checked_sub(self.base + 1).and_then(|i| self.events.get(i as usize)).map(|e| e.1)
    }
}

/// Faults armed by the test, each used once.
#[derive(Debug, Default)]
struct Faults {
    apply: u32,
    persist: u32,
    rebootstrap: u32,
    ack: u32,
    /// The server takes the next ack but its answer is lost.
    ack_answer: u32,
    /// The server drops the next window call: nothing changes and no answer comes.
    window_call: u32,
    /// The process dies between the handler's persist and the checkpoint file's write.
    crash_in_checkpoint: bool,
    /// The checkpoint file cannot be written (`run` returns the error and is called again).
    checkpoint_write: u32,
    /// The next checkpoint file write is slow: its answer comes only at
    /// [`Sim::finish_write`], as the shell's writer thread gives it, after other inputs.
    slow_write: u32,
}

/// The client process, the server and the handler.
struct Sim {
    base: Instant,
    elapsed: Duration,
    owns: bool,
    server: BTreeMap<&'static str, ServerStream>,
    /// The connection's queue; `None` when there is no connection.
    conn: Option<VecDeque<Msg>>,
    /// The server still serves the connection (it is not dropped yet on its side).
    alive: bool,
    /// The connection subscribed: row changes reach it.
    subscribed: bool,
    driver: Driver,
    /// The checkpoint file: `Err` when corrupt.
    file: Option<Result<Vec<StreamCursor>, String>>,
    current: BTreeMap<String, Projection>,
    persisted: BTreeMap<String, Projection>,
    /// `(stream, epoch, seq)` applied in this process since the stream's last rebootstrap.
    this_process: BTreeSet<(String, u32, u64)>,
    faults: Faults,
    stopped: bool,
    /// The process dies at the end of the current action.
    crash_due: bool,
    /// Publishes leave the `stream_view` row behind until [`Sim::refresh_view`].
    lag_views: bool,
    /// A checkpoint file write in flight (see `Faults::slow_write`): the cursors it
    /// stores when it finishes, and where the corrupt file it set aside went.
    write_in_flight: Option<(Vec<StreamCursor>, Option<PathBuf>)>,
    /// Figures for the record.
    applied: u64,
    reoffered: u64,
    rebootstraps: u64,
    acks_sent: u64,
    /// Segments refused as corrupt (`Note::CorruptSegment`).
    corrupt_notes: u64,
    seed: u64,
}

fn settings(owns: bool, seed: u64) -> Settings {
    Settings {
        streams: STREAMS.iter().map(|s| s.to_string()).collect(),
        ack: true,
        server_behind_limit: Duration::from_secs(60),
        handler_owns_cursors: owns,
        seed,
        replay_slots: crate::config::DEFAULT_REPLAY_SLOTS,
    }
}

impl Sim {
    fn new(owns: bool) -> Sim {
        Sim {
            base: Instant::now(),
            elapsed: Duration::ZERO,
            owns,
            server: STREAMS.iter().map(|s| (*s, ServerStream::new(s))).collect(),
            conn: None,
            alive: false,
            subscribed: false,
            driver: Driver::new(settings(owns, 1), Stored::Cursors(Vec::new())),
            file: None,
            current: BTreeMap::new(),
            persisted: BTreeMap::new(),
            this_process: BTreeSet::new(),
            faults: Faults::default(),
            stopped: false,
            crash_due: false,
            lag_views: false,
            write_in_flight: None,
            applied: 0,
            reoffered: 0,
            rebootstraps: 0,
            acks_sent: 0,
            corrupt_notes: 0,
            seed: 1,
        }
    }

    fn now(&self) -> Now {
        Now { at: self.base + self.elapsed, unix_micros: 1_700_000_000_000_000 + self.elapsed.as_micros() as i64 }
    }

    fn push(&mut self, msg: Msg) {
        let row = matches!(msg, Msg::Segment(..) | Msg::Stream(_) | Msg::StreamGone(_) | Msg::Grant(_) | Msg::GrantGone(_) | Msg::WindowOpen(_) | Msg::WindowClosed(_));
        if !self.alive || row && !self.subscribed {
            return;
        }
        if let Some(q) = self.conn.as_mut() {
            q.push_back(msg);
        }
    }

    fn feed(&mut self, input: Input) {
        let now = self.now();
        let trace = std::env::var_os("KHALA_SIM_TRACE").is_some();
        if trace {
            eprintln!("in  {input:?}");
        }
        for command in self.driver.step(input, now) {
            if trace {
                eprintln!("out {command:?}");
            }
            self.exec(command);
        }
    }

    /// Ticks as the shell does: again at once while the driver has work to settle.
    fn tick(&mut self) {
        self.feed(Input::Tick);
        for _ in 0..20 {
            if self.stopped || self.driver.wait() != Duration::ZERO {
                break;
            }
            self.feed(Input::Tick);
        }
        self.check_always();
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        self.tick();
    }

    fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(msg) = self.conn.as_mut().and_then(|q| q.pop_front()) else { break };
            let closes = matches!(msg, Msg::Disconnected(_));
            self.feed(Input::Msg(msg));
            if closes {
                break;
            }
        }
        self.tick();
    }

    /// The server loses the connection: its windows go with it.
    fn drop_connection(&mut self, why: &str) {
        if let Some(q) = self.conn.as_mut() {
            q.clear();
            q.push_back(Msg::Disconnected(Some(why.into())));
        }
        self.alive = false;
        for s in self.server.values_mut() {
            s.windows.clear();
        }
    }

    fn exec(&mut self, command: Command) {
        let now = self.now();
        let call = matches!(command, Command::Hello | Command::Subscribe | Command::OpenWindow { .. } | Command::CloseWindow { .. } | Command::Ack { .. });
        if call && !self.alive {
            // A call on a connection the server dropped goes nowhere.
            return;
        }
        match command {
            Command::Connect => {
                self.alive = true;
                self.subscribed = false;
                self.conn = Some(VecDeque::from([Msg::Connected(me())]));
                self.feed(Input::Opened);
            }
            Command::Hello => self.push(Msg::Hello(Ok(()))),
            Command::ReadHandlerCursors => {
                // Like the SQLite store, the handler drops a batch it could not commit
                // before telling its cursors: those events come again, once.
                self.current = self.persisted.clone();
                let kept = self.persisted.clone();
                // Only what the persisted projection holds stays applied: of its epoch (the
                // events of a new epoch applied since, not yet persisted, are dropped even
                // where the old epoch's projection reaches past their seqs).
                self.this_process.retain(|(s, epoch, seq)| kept.get(s).is_some_and(|p| p.epoch == *epoch && *seq <= p.last()));
                let cursors = self.handler_cursors();
                self.feed(Input::HandlerCursors(cursors));
            }
            Command::Subscribe => {
                let mut rows = Vec::new();
                for s in self.server.values() {
                    if s.granted {
                        rows.push(Msg::Grant(s.grant_row()));
                        rows.push(Msg::Stream(s.view_row()));
                        for b in &s.windows {
                            rows.push(Msg::WindowOpen(s.window_row(*b)));
                            rows.extend(s.visible_segments(*b));
                        }
                    }
                }
                rows.push(Msg::Applied(META));
                self.subscribed = true;
                for r in rows {
                    self.push(r);
                }
            }
            Command::OpenWindow { .. } | Command::CloseWindow { .. } if std::mem::take(&mut self.faults.window_call) > 0 => {}
            Command::OpenWindow { stream_id, bucket: b } => {
                let s = self.server.get_mut(stream_id.as_str()).unwrap();
                let mut out = Vec::new();
                if !s.granted {
                    out.push(Msg::WindowCall { stream_id, bucket: b, open: true, result: Err(coded(ErrorCode::ForbiddenStream, "no live subscribe grant")) });
                } else {
                    if !s.windows.contains(&b) {
                        assert!(s.windows.len() < MAX_WINDOWS_PER_STREAM, "more than {MAX_WINDOWS_PER_STREAM} windows on {}: {:?} opening {b}", s.id, s.windows);
                        s.windows.insert(b);
                        out.push(Msg::WindowOpen(s.window_row(b)));
                        out.extend(s.visible_segments(b));
                    }
                    out.push(Msg::WindowCall { stream_id, bucket: b, open: true, result: Ok(()) });
                }
                for m in out {
                    self.push(m);
                }
            }
            Command::CloseWindow { stream_id, bucket: b } => {
                let s = self.server.get_mut(stream_id.as_str()).unwrap();
                if s.windows.remove(&b) {
                    let row = s.window_row(b);
                    self.push(Msg::WindowClosed(row));
                }
                self.push(Msg::WindowCall { stream_id, bucket: b, open: false, result: Ok(()) });
            }
            Command::Ack { stream_id, seq, chain_hash } => {
                self.acks_sent += 1;
                // Never beyond the durable cursor, nor beyond what the handler persisted.
                let durable = self.driver.durable(&stream_id).unwrap().clone();
                assert!(seq <= durable.seq, "an ack of {stream_id} at {seq} beyond the durable {}", durable.seq);
                assert!(self.persisted_has(&stream_id, seq, &chain_hash), "an ack of {stream_id} at {seq} the handler has not persisted ({:?})", self.persisted.get(&stream_id));
                let s = self.server.get_mut(stream_id.as_str()).unwrap();
                let result = if std::mem::take(&mut self.faults.ack) > 0 {
                    Err(coded(ErrorCode::RateLimited, "refused"))
                } else if !s.granted {
                    Err(coded(ErrorCode::ForbiddenStream, "no live ack grant"))
                } else if seq > s.head {
                    Err(coded(ErrorCode::AckBeyondHead, "beyond the head"))
                } else if s.truth().chain(seq).to_vec() != chain_hash {
                    Err(coded(ErrorCode::ChainMismatch, "other chain"))
                } else {
                    s.acked = s.acked.max(seq);
                    Ok(())
                };
                if std::mem::take(&mut self.faults.ack_answer) > 0 {
                    return;
                }
                self.push(Msg::Acked { stream_id, seq, result });
            }
            Command::Rebootstrap(stale) => {
                let ok = self.faults.rebootstrap == 0;
                self.faults.rebootstrap = self.faults.rebootstrap.saturating_sub(1);
                if ok {
                    self.rebootstraps += 1;
                    self.current.insert(stale.stream_id.clone(), Projection { epoch: stale.epoch, base: stale.oldest_available, events: Vec::new() });
                    self.this_process.retain(|(s, _, _)| s != &stale.stream_id);
                }
                self.feed(Input::Rebootstrapped { stream_id: stale.stream_id, ok });
            }
            Command::Apply { stream_id } => loop {
                let Some(event) = self.driver.next_event(&stream_id, now).cloned() else { break };
                if self.faults.apply > 0 {
                    self.faults.apply -= 1;
                    self.feed(Input::ApplyFailed { stream_id: stream_id.clone(), seq: event.seq });
                    break;
                }
                self.apply(&event);
                self.feed(Input::Applied { stream_id: stream_id.clone(), seq: event.seq });
            },
            Command::CaughtUp => {}
            Command::Checkpoint { cursors, set_aside } => {
                if std::mem::take(&mut self.faults.persist) > 0 {
                    self.feed(Input::Checkpointed { set_aside_to: None, persisted: false });
                    return;
                }
                self.persisted = self.current.clone();
                if std::mem::take(&mut self.faults.crash_in_checkpoint) {
                    self.crash_due = true;
                    return;
                }
                if set_aside {
                    assert!(matches!(self.file, Some(Err(_))), "set aside a checkpoint that is not corrupt");
                    assert!(self.driver.streams.values().all(|s| s.retry.rebootstrap_due.is_none()), "the corrupt file went before every stream was dropped");
                    self.file = None;
                }
                let set_aside_to = set_aside.then(|| PathBuf::from("cp.corrupt-1"));
                if cursors.is_some() && std::mem::take(&mut self.faults.checkpoint_write) > 0 {
                    self.driver.checkpoint_not_written(set_aside_to);
                    return;
                }
                if let Some(cursors) = cursors {
                    assert!(!self.owns, "a checkpoint file for a handler that owns its cursors");
                    let before = match &self.file {
                        Some(Ok(c)) => c.clone(),
                        _ => Vec::new(),
                    };
                    for c in &cursors {
                        // Never ahead of what the handler persisted: the cursor is a
                        // position of the handler's projection (or, while the stream is
                        // rebuilt, the cursor the file held before).
                        let kept = before.iter().any(|b| (&b.stream_id, b.epoch, b.seq, &b.chain_hash) == (&c.stream_id, c.epoch, c.seq, &c.chain_hash)) || c.seq == 0;
                        let held = self.persisted_has(&c.stream_id, c.seq, &c.chain_hash);
                        assert!(kept || held, "checkpoint {} at {} is not in the handler's persisted projection {:?}", c.stream_id, c.seq, self.persisted.get(&c.stream_id));
                    }
                    assert!(self.write_in_flight.is_none(), "a checkpoint asked for while a write is in flight");
                    if std::mem::take(&mut self.faults.slow_write) > 0 {
                        self.write_in_flight = Some((cursors, set_aside_to));
                        return;
                    }
                    self.file = Some(Ok(cursors));
                }
                self.feed(Input::Checkpointed { set_aside_to, persisted: true });
            }
            Command::ReportHealth { .. } => {
                let _ = self.driver.health(now);
            }
            Command::Note(Note::CorruptSegment { .. }) => self.corrupt_notes += 1,
            Command::Note(_) => {}
            Command::Reconnect { delay } => {
                self.alive = false;
                if self.conn.take().is_some() {
                    for s in self.server.values_mut() {
                        s.windows.clear();
                    }
                }
                self.elapsed += delay;
                self.feed(Input::Tick);
            }
            Command::Stop(result) => {
                assert!(result.is_ok(), "the client stopped: {result:?}");
                self.stopped = true;
            }
        }
    }

    /// The handler applies one event: in order, once, never past a gap, and of the
    /// server's history.
    fn apply(&mut self, event: &crate::apply::Event) {
        let id = event.stream_id.clone();
        let truth = &self.server[id.as_str()].truths[&event.epoch];
        assert_eq!(event.chain_hash, truth.chain(event.seq), "{id} {}: a hash that is not the history's", event.seq);
        let key = (id.clone(), event.epoch, event.seq);
        assert!(!self.this_process.contains(&key), "{id} {} applied twice in one process", event.seq);
        self.this_process.insert(key);
        let p = self.current.entry(id.clone()).or_default();
        if p.events.is_empty() && event.seq == 1 {
            // A dropped stream holds nothing: a restart from a cursor of no epoch (the
            // checkpoint of a stream never applied) starts it over.
            *p = Projection::default();
        }
        if event.seq == p.last() + 1 {
            if p.events.is_empty() && p.epoch == 0 {
                p.epoch = event.epoch;
            }
            assert_eq!(p.epoch, event.epoch, "{id} {}: another epoch without a rebootstrap", event.seq);
            p.events.push((event.seq, event.chain_hash));
            self.applied += 1;
        } else {
            panic!("{id}: {} offered after {} (twice, past a gap, or of another history)", event.seq, p.last());
        }
    }

    /// Whether the handler persisted the position `(seq, hash)` of `stream`: one of its
    /// events, or the floor it was rebuilt from.
    fn persisted_has(&self, stream: &str, seq: u64, hash: &[u8]) -> bool {
        let Some(p) = self.persisted.get(stream) else { return false };
        if seq == p.base && (p.events.is_empty() || p.base > 0) {
            let s = &self.server[stream];
            return s.truths.get(&p.epoch).is_some_and(|t| (t.events.len() as u64) >= seq && t.chain(seq).as_slice() == hash);
        }
        p.hash_at(seq).is_some_and(|h| h.as_slice() == hash)
    }

    fn handler_cursors(&self) -> Vec<StreamCursor> {
        self.persisted
            .iter()
            .filter(|(_, p)| !p.events.is_empty())
            .map(|(id, p)| StreamCursor { stream_id: id.clone(), epoch: p.epoch, seq: p.last(), chain_hash: p.hash_at(p.last()).unwrap().to_vec(), updated_at_micros: 0 })
            .collect()
    }

    fn check_always(&self) {
        for id in STREAMS {
            assert!(self.driver.windows_held(id) <= 2 * MAX_WANTED, "{id}: {} windows held", self.driver.windows_held(id));
        }
        // After a round: a stream catching up without a replay slot keeps no window of
        // its own, so at most `replay_slots` streams hold a replay's windows.
        if matches!(self.driver.session.phase, Phase::Up { subscribed: true }) {
            let limit = self.driver.settings.replay_slots;
            let holders = self.driver.slots.holders().count();
            assert!(limit == 0 || holders <= limit, "{holders} streams hold one of {limit} replay slots");
            for (id, s) in &self.driver.streams {
                // (A stream without a live grant has no windows to keep: the module
                // closes them.)
                if s.windows.usable && s.grant.subscribed() && self.driver.slots.waits(id, s.catching_up()) {
                    assert!(s.windows.mine.is_empty(), "{id} waits for a replay slot but keeps windows {:?}", s.windows.mine);
                }
            }
        }
    }

    /// A burst far beyond the client's windows: five segments of 4,000 events each.
    fn burst(&mut self, i: usize) {
        for _ in 0..5 {
            self.publish(i, 4_000);
        }
    }

    // The things that happen.

    fn publish(&mut self, i: usize, k: u64) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        let (first, last) = (s.head + 1, s.head + k);
        let epoch = s.epoch;
        s.truths.get_mut(&epoch).unwrap().extend_to(s.id, epoch, last);
        s.head = last;
        s.segments.push((first, last));
        let mut out = Vec::new();
        if s.granted {
            if s.windows.contains(&bucket(first)) {
                out.push(s.segment((first, last)));
            }
            if !self.lag_views {
                out.push(Msg::Stream(s.write_view()));
            }
        }
        for m in out {
            self.push(m);
        }
    }

    /// The module's refresh of a stream's view (every 250 ms while it is published).
    fn refresh_view(&mut self, i: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        if s.view.as_ref() == Some(&s.row()) {
            return;
        }
        let row = s.write_view();
        if s.granted {
            self.push(Msg::Stream(row));
        }
    }

    /// The mirror republishes what the server lost, in batches as it publishes (a
    /// segment holds at most `max_batch_events`, which the module keeps within a window
    /// bucket; one segment of all of it, 12,000 events after a burst, began two buckets
    /// before its end, where no client looks for a segment, and the stream never caught
    /// up).
    fn republish(&mut self, i: usize, mut k: u64) {
        while k > 0 {
            let batch = k.min(4_000);
            self.publish(i, batch);
            k -= batch;
        }
    }

    fn duplicate(&mut self, i: usize, pick: usize) {
        let s = &self.server[STREAMS[i]];
        if s.granted && !s.segments.is_empty() {
            let seg = s.segments[pick % s.segments.len()];
            if s.windows.contains(&bucket(seg.0)) {
                let m = s.segment(seg);
                self.push(m);
            }
        }
    }

    /// Rows of one window may arrive in any order.
    fn swap(&mut self) {
        if let Some(q) = self.conn.as_mut() {
            if q.len() >= 2 && matches!(q[0], Msg::Segment(..)) && matches!(q[1], Msg::Segment(..)) {
                q.swap(0, 1);
            }
        }
    }

    fn lose_segment(&mut self) {
        if let Some(q) = self.conn.as_mut() {
            if matches!(q.front(), Some(Msg::Segment(..))) {
                q.pop_front();
            }
        }
    }

    fn revoke(&mut self, i: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        if !s.granted {
            return;
        }
        s.granted = false;
        let mut out: Vec<Msg> = s.windows.iter().map(|b| Msg::WindowClosed(s.window_row(*b))).collect();
        s.windows.clear();
        out.push(Msg::GrantGone(s.grant_row()));
        out.push(Msg::StreamGone(s.id.into()));
        for m in out {
            self.push(m);
        }
    }

    fn renew(&mut self, i: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        s.granted = true;
        let out = [Msg::Grant(s.grant_row()), Msg::Stream(s.view_row())];
        for m in out {
            self.push(m);
        }
    }

    /// The server crashes and loses its last `k` segments of stream `i` (and the acks
    /// not yet on disk); the connection goes.
    fn server_restart(&mut self, i: usize, k: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        let keep = s.segments.len().saturating_sub(k);
        s.segments.truncate(keep);
        s.head = s.segments.last().map_or(s.trimmed_to.min(s.head), |last| last.1);
        // The view is written from the stream in a transaction: one the crash kept never
        // runs ahead of the head it kept.
        if s.view.as_ref().is_some_and(|v| v.head_seq > s.head) {
            s.write_view();
        }
        for s in self.server.values_mut() {
            s.acked = 0;
        }
        self.drop_connection("the server restarted");
    }

    fn epoch_change(&mut self, i: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        s.epoch += 1;
        s.truths.insert(s.epoch, Truth::default());
        s.head = 0;
        s.trimmed_to = 0;
        s.segments.clear();
        s.acked = 0;
        let row = s.write_view();
        if s.granted {
            self.push(Msg::Stream(row));
        }
    }

    /// Retention drops the oldest `k` segments.
    fn retention(&mut self, i: usize, k: usize) {
        let s = self.server.get_mut(STREAMS[i]).unwrap();
        let k = k.min(s.segments.len());
        if let Some(last) = s.segments.drain(..k).next_back() {
            s.trimmed_to = last.1;
        }
        let row = s.write_view();
        if s.granted {
            self.push(Msg::Stream(row));
        }
    }

    /// The slow checkpoint write in flight lands, and its answer reaches the driver.
    /// A pending `FailCheckpointWrite` fails it: the driver hears it as the shell tells
    /// it, and `run` is called again.
    fn finish_write(&mut self) {
        if let Some((cursors, set_aside_to)) = self.write_in_flight.take() {
            if std::mem::take(&mut self.faults.checkpoint_write) > 0 {
                self.driver.checkpoint_not_written(set_aside_to);
            } else {
                self.file = Some(Ok(cursors));
                self.feed(Input::Checkpointed { set_aside_to, persisted: true });
            }
            self.tick();
        }
    }

    /// The client process is killed and started again.
    fn crash(&mut self, corrupt: bool) {
        // A write in flight is lost with the process (the file keeps the one before).
        self.write_in_flight = None;
        self.alive = false;
        if self.conn.take().is_some() {
            for s in self.server.values_mut() {
                s.windows.clear();
            }
        }
        if corrupt && !self.owns {
            self.file = Some(Err("checksum mismatch".into()));
        }
        if !self.owns {
            // A handler that leaves the cursors to the file keeps, across a crash, what it
            // persisted up to the checkpoint (the contract: what follows the checkpoint is
            // offered again): a projection the file's cursor is in is cut there; any other
            // starts over.
            let file = match &self.file {
                Some(Ok(c)) => c.clone(),
                _ => Vec::new(),
            };
            for (id, p) in self.persisted.iter_mut() {
                match file.iter().find(|c| &c.stream_id == id) {
                    Some(c) if c.seq == p.base || p.hash_at(c.seq).is_some_and(|h| h.as_slice() == c.chain_hash.as_slice()) => {
                        self.reoffered += p.last() - c.seq;
                        p.events.truncate((c.seq - p.base) as usize);
                    }
                    // The file's cursor is not in the projection (the handler took a
                    // rebootstrap the file does not show yet): the handler rebuilds. See
                    // docs/DURABILITY.md: the file mode is at-least-once across a crash.
                    Some(_) | None => {
                        self.reoffered += p.events.len() as u64;
                        *p = Projection::default();
                    }
                }
            }
        }
        self.current = self.persisted.clone();
        self.this_process.clear();
        self.seed += 1;
        let stored = if self.owns {
            Stored::Cursors(self.handler_cursors())
        } else {
            match &self.file {
                None => Stored::Cursors(Vec::new()),
                Some(Ok(c)) => Stored::Cursors(c.clone()),
                Some(Err(reason)) => Stored::Corrupt(reason.clone()),
            }
        };
        self.driver = Driver::new(settings(self.owns, self.seed), stored);
        self.stopped = false;
        self.tick();
    }

    /// Lets everything settle: grants renewed, faults cleared, the mirror caught up,
    /// every message delivered, time passed for gaps and backoffs.
    fn heal(&mut self) {
        self.faults = Faults::default();
        self.finish_write();
        for (i, id) in STREAMS.iter().enumerate() {
            if !self.server[id].granted {
                self.renew(i);
            }
            let s = &self.server[id];
            let lost = s.truth().events.len() as u64 - s.head;
            if lost > 0 {
                self.republish(i, lost);
            }
            self.refresh_view(i);
        }
        for _ in 0..60 {
            self.deliver(10_000);
            self.advance(Duration::from_secs(3));
        }
    }

    fn check_settled(&self) {
        for id in STREAMS {
            let s = &self.server[id];
            let p = self.current.get(id).cloned().unwrap_or_default();
            assert_eq!(self.driver.applied()[id], s.head, "{id}: not caught up with the head {}", s.head);
            if !p.events.is_empty() {
                assert_eq!(p.last(), s.head, "{id}: the handler is not at the head {}", s.head);
            }
            if s.head > 0 {
                assert_eq!(p.epoch, s.epoch, "{id}: the projection is of another epoch");
                if s.head > p.base {
                    assert_eq!(p.hash_at(s.head), Some(s.truth().chain(s.head)), "{id}: the projection's chain differs");
                }
            }
            for (seq, hash) in &p.events {
                assert_eq!(*hash, s.truth().chain(*seq), "{id} {seq}: not the server's history");
            }
            let durable = self.driver.durable(id).unwrap();
            assert_eq!(durable.seq, s.head, "{id}: the durable cursor lags");
            // Acks are re-sent after reconnects (the server lost them in its restarts).
            assert_eq!(s.acked, s.head, "{id}: acked {} of a durable {}", s.acked, durable.seq);
            assert!(s.windows.len() <= MAX_WANTED, "{id}: {} windows open when settled", s.windows.len());
        }
        assert!(!self.stopped);
    }
}

#[derive(Debug, Clone)]
enum Action {
    Publish(usize, u64),
    /// [`Sim::burst`].
    Burst(usize),
    Deliver(usize),
    Tick(u64),
    Duplicate(usize, usize),
    Swap,
    LoseSegment,
    FailApply(u32),
    FailPersist,
    FailCheckpointWrite,
    FailRebootstrap,
    RefuseAck,
    LoseAckAnswer,
    DropWindowCall,
    Revoke(usize),
    Renew(usize),
    Disconnect,
    ServerRestart(usize, usize),
    EpochChange(usize),
    Retention(usize, usize),
    Crash,
    CrashInCheckpoint,
    CorruptCheckpoint,
    /// [`Sim::refresh_view`].
    RefreshView(usize),
    /// The next checkpoint write is slow (`Faults::slow_write`).
    SlowCheckpointWrite,
    /// [`Sim::finish_write`].
    FinishWrite,
}

fn action() -> impl Strategy<Value = Action> {
    let stream = 0..STREAMS.len();
    prop_oneof![
        10 => (stream.clone(), 1u64..6).prop_map(|(i, k)| Action::Publish(i, k)),
        14 => (1usize..12).prop_map(Action::Deliver),
        6 => prop_oneof![Just(0u64), Just(30), Just(600), Just(2_500)].prop_map(Action::Tick),
        3 => (stream.clone(), any::<usize>()).prop_map(|(i, p)| Action::Duplicate(i, p)),
        2 => Just(Action::Swap),
        1 => Just(Action::LoseSegment),
        2 => (1u32..4).prop_map(Action::FailApply),
        1 => Just(Action::FailPersist),
        1 => Just(Action::FailCheckpointWrite),
        1 => Just(Action::FailRebootstrap),
        1 => Just(Action::RefuseAck),
        1 => Just(Action::LoseAckAnswer),
        1 => Just(Action::DropWindowCall),
        1 => stream.clone().prop_map(Action::Revoke),
        1 => stream.clone().prop_map(Action::Renew),
        1 => Just(Action::Disconnect),
        1 => (stream.clone(), 1usize..3).prop_map(|(i, k)| Action::ServerRestart(i, k)),
        1 => stream.clone().prop_map(Action::EpochChange),
        1 => (stream.clone(), 1usize..3).prop_map(|(i, k)| Action::Retention(i, k)),
        1 => Just(Action::Crash),
        1 => Just(Action::CrashInCheckpoint),
        1 => Just(Action::CorruptCheckpoint),
        3 => stream.prop_map(Action::RefreshView),
        2 => Just(Action::SlowCheckpointWrite),
        3 => Just(Action::FinishWrite),
    ]
}

/// The actions, with bursts far beyond the windows now and then.
fn action_with_bursts() -> impl Strategy<Value = Action> {
    prop_oneof![1 => (0..STREAMS.len()).prop_map(Action::Burst), 10 => action()]
}

/// Cases the main property test runs (`PROPTEST_CASES` overrides it).
const CASES: u32 = 2048;

fn run_case(owns: bool, actions: &[Action]) -> Sim {
    run_case_with(owns, false, actions)
}

/// [`run_case`], with `stream_view` rows that lag the publishes when `lag_views`.
fn run_case_with(owns: bool, lag_views: bool, actions: &[Action]) -> Sim {
    let mut sim = Sim::new(owns);
    sim.lag_views = lag_views;
    sim.tick();
    for a in actions {
        match a.clone() {
            Action::Publish(i, k) => sim.publish(i, k),
            Action::Burst(i) => sim.burst(i),
            Action::Deliver(n) => sim.deliver(n),
            Action::Tick(ms) => sim.advance(Duration::from_millis(ms)),
            Action::Duplicate(i, p) => sim.duplicate(i, p),
            Action::Swap => sim.swap(),
            Action::LoseSegment => sim.lose_segment(),
            Action::FailApply(n) => sim.faults.apply = n,
            Action::FailPersist => sim.faults.persist = 1,
            Action::FailCheckpointWrite => sim.faults.checkpoint_write = 1,
            Action::FailRebootstrap => sim.faults.rebootstrap = 1,
            Action::RefuseAck => sim.faults.ack = 1,
            Action::LoseAckAnswer => sim.faults.ack_answer = 1,
            Action::DropWindowCall => sim.faults.window_call = 1,
            Action::Revoke(i) => sim.revoke(i),
            Action::Renew(i) => sim.renew(i),
            Action::Disconnect => sim.drop_connection("network"),
            Action::ServerRestart(i, k) => sim.server_restart(i, k),
            Action::EpochChange(i) => sim.epoch_change(i),
            Action::Retention(i, k) => sim.retention(i, k),
            Action::Crash => sim.crash(false),
            Action::CrashInCheckpoint => sim.faults.crash_in_checkpoint = true,
            Action::CorruptCheckpoint => sim.crash(true),
            Action::RefreshView(i) => sim.refresh_view(i),
            Action::SlowCheckpointWrite => sim.faults.slow_write = 1,
            Action::FinishWrite => sim.finish_write(),
        }
        if std::mem::take(&mut sim.crash_due) {
            sim.crash(false);
        }
    }
    sim.heal();
    sim.check_settled();
    sim
}

/// Totals over the cases run: cases, actions, events applied, events offered again
/// after a crash (file checkpoint mode), rebootstraps taken, acks sent.
static TOTALS: [std::sync::atomic::AtomicU64; 6] = [const { std::sync::atomic::AtomicU64::new(0) }; 6];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Random interleavings of publishes, duplicate and reordered and lost segments,
    /// grant revoke/renew, server restarts behind the checkpoint, epoch changes,
    /// retention passing the cursor, corrupt checkpoints, crashes, handler, persist and
    /// rebootstrap failures, refused and lost acks and reconnects; with the checkpoint
    /// file or with a handler that owns its cursors. Checked at every step: events are
    /// applied in order, once per process (once ever when the handler owns its cursors),
    /// never past a gap and only of the server's history; the checkpoint is never ahead
    /// of what the handler persisted; every ack is the durable cursor and persisted;
    /// windows stay bounded. Checked once it all settles: every stream applied, durable
    /// and acked up to its head (acks re-sent after reconnects), at most
    /// `MAX_WANTED` windows open. Half the cases have `stream_view` rows that trail the
    /// publishes until a refresh, as the module's do.
    #[test]
    fn the_driver_keeps_its_invariants_under_any_interleaving(owns in any::<bool>(), lag_views in any::<bool>(), actions in proptest::collection::vec(action(), 0..120)) {
        let sim = run_case_with(owns, lag_views, &actions);
        let add = [1, actions.len() as u64, sim.applied, sim.reoffered, sim.rebootstraps, sim.acks_sent];
        let t: Vec<u64> = TOTALS.iter().zip(add).map(|(t, a)| t.fetch_add(a, std::sync::atomic::Ordering::Relaxed) + a).collect();
        if t[0].is_multiple_of(512) {
            eprintln!("driver proptest: {} cases, {} actions, {} events applied, {} offered again after a crash, {} rebootstraps, {} acks", t[0], t[1], t[2], t[3], t[4], t[5]);
        }
    }

    /// The windows of one stream, against a server that answers calls late (in order),
    /// refuses some and drops some unanswered (until they count as lost), while the
    /// cursor moves over many buckets and resets come: at most
    /// `MAX_WANTED` wanted at once, never more than the module's limit open, and once
    /// every call is confirmed exactly the wanted buckets are open (the one before the
    /// cursor's only when the next segment may straddle into it).
    #[test]
    fn windows_follow_the_cursor_and_stay_bounded(steps in proptest::collection::vec(((0u64..6, any::<bool>(), any::<bool>(), 0usize..4, any::<bool>(), 0u8..8, any::<bool>()), 0u8..12), 1..80), settle_straddle in any::<bool>()) {
        let base = Instant::now();
        let mut w = Windows::default();
        let mut server: BTreeSet<u64> = BTreeSet::new();
        let mut in_flight: VecDeque<WindowCall> = VecDeque::new();
        let mut cursor = 0u64;
        let mut refused_any = false;
        // The server answers a call as the module does: a row when it changes one, then
        // the call's result; or, out of churn tokens, refuses one that would change
        // something (`rate_limited`: only a change takes a token) and changes nothing.
        let answer = |w: &mut Windows, server: &mut BTreeSet<u64>, call: WindowCall, refuse: bool, now: Instant| {
            let changes = match call {
                WindowCall::Open(b) => !server.contains(&b),
                WindowCall::Close(b) => server.contains(&b),
            };
            // The module's cap: an open beyond MAX_WINDOWS_PER_STREAM is refused too.
            let over_cap = matches!(call, WindowCall::Open(_)) && changes && server.len() >= MAX_WINDOWS_PER_STREAM;
            if (refuse && changes) || over_cap {
                return w.refused(call, now, false);
            }
            match call {
                WindowCall::Open(b) if server.insert(b) => w.opened(b),
                WindowCall::Close(b) if server.remove(&b) => w.closed(b),
                _ => {}
            }
            w.answered(call);
        };
        for (i, ((advance, reset, late, confirm, straddle, refuse, live), drop)) in steps.into_iter().enumerate() {
            // Now and then the clock jumps past the answer limit.
            let now = base + Duration::from_millis(i as u64 * 10) + super::windows::ANSWER_WITHIN * (i as u32 / 20);
            cursor += advance * WINDOW_EVENTS / 2;
            if reset {
                w.reset();
            }
            // A call unanswered for too long is made again.
            in_flight.extend(w.expire(now));
            in_flight.extend(w.plan(cursor, straddle, live, now));
            refused_any |= refuse == 0;
            // The server drops a call unanswered (1 in 12 steps): it changes nothing.
            if drop == 0 && in_flight.pop_front().is_some() {
                refused_any = true;
            }
            // The server answers calls in order, some late, some refused (1 in 8 steps).
            for _ in 0..if late { 0 } else { confirm } {
                if let Some(call) = in_flight.pop_front() {
                    answer(&mut w, &mut server, call, refuse == 0, now);
                }
                prop_assert!(server.len() <= MAX_WINDOWS_PER_STREAM, "{server:?}");
            }
            prop_assert!(w.opening.len() <= MAX_WANTED, "opening {:?}", w.opening);
            // Without refusals the client holds at most twice what it wants; a window whose
            // close was refused stays held (the server's cap bounds those).
            let held = w.open.union(&w.opening).filter(|b| !w.closing.contains(b)).count();
            prop_assert!(held <= 2 * MAX_WANTED || refused_any, "{held} windows held: open {:?}, opening {:?}", w.open, w.opening);
            // Without refusals or drops the server holds at most what the client wants
            // and the bucket it has just left (waiting for its close delay), and what
            // the client has asked to close.
            let asked_closed = w.closing.len();
            prop_assert!(refused_any || server.len() <= MAX_WANTED + 1 + asked_closed, "server {server:?}, closing {:?}", w.closing);
            // What the client holds as open, the server holds (a refused close is kept).
            prop_assert!(w.open.iter().all(|b| server.contains(b) || in_flight.contains(&WindowCall::Close(*b))), "open {:?}, server {server:?}", w.open);
        }
        // Let every call land, and plan until nothing more is asked.
        for k in 0..10 {
            // Past the answer limit, and each time past a refusal's retry delay.
            let now = base + Duration::from_secs(600 + 2 * k);
            in_flight.extend(w.expire(now));
            in_flight.extend(w.plan(cursor, settle_straddle, true, now));
            while let Some(call) = in_flight.pop_front() {
                answer(&mut w, &mut server, call, false, now);
            }
        }
        let b0 = bucket(cursor + 1);
        let from = if settle_straddle { b0.saturating_sub(1) } else { b0 };
        let want: BTreeSet<u64> = (from..=b0 + super::windows::PREFETCH_BUCKETS).collect();
        prop_assert_eq!(&server, &want);
        prop_assert_eq!(&w.open, &want);
    }
}

// Single behaviours, deterministic.

/// `w` with buckets `from..=to` opened and confirmed, planned at `now` for a cursor at
/// the start of bucket `from`.
fn windows_open(seed: u64, from: u64, to: u64, now: Instant) -> Windows {
    let mut w = Windows::new(seed);
    let calls = w.plan(from * WINDOW_EVENTS, false, true, now);
    assert_eq!(calls, (from..=to).map(WindowCall::Open).collect::<Vec<_>>());
    for call in calls {
        w.answered(call);
    }
    w
}

/// Every subscriber of a stream leaves a bucket at about the same moment. Each closes
/// the bucket it has just left after a delay of its own, so that the server's deletes
/// come spread out; a bucket further behind (the cursor jumped), a reset, a stream that
/// is catching up, and one live for less than `CLOSE_SPREAD` close at once.
#[test]
fn the_bucket_just_left_closes_after_the_clients_own_delay() {
    let t0 = Instant::now();
    let t1 = t0 + CLOSE_SPREAD;
    let seed = (0..).find(|s| close_delay(*s, 0) > Duration::from_millis(100)).unwrap();
    let delay = close_delay(seed, 0);
    let mut w = windows_open(seed, 0, 2, t0);
    // Live since t0; at t1 the cursor enters bucket 1: bucket 3 opens, bucket 0 stays
    // open for its delay.
    assert_eq!(w.plan(WINDOW_EVENTS, false, true, t1), vec![WindowCall::Open(3)]);
    w.answered(WindowCall::Open(3));
    assert!(w.plan(WINDOW_EVENTS + 5, false, true, t1 + delay - Duration::from_millis(1)).is_empty());
    assert_eq!(w.open, BTreeSet::from([0, 1, 2, 3]));
    assert_eq!(w.plan(WINDOW_EVENTS + 9, false, true, t1 + delay), vec![WindowCall::Close(0)]);
    w.answered(WindowCall::Close(0));

    // A cursor that jumps two buckets closes the bucket it left two behind at once.
    let mut w = windows_open(seed, 0, 2, t0);
    let calls = w.plan(2 * WINDOW_EVENTS, false, true, t1);
    assert_eq!(calls, vec![WindowCall::Close(0), WindowCall::Open(3), WindowCall::Open(4)]);

    // A reset closes every window at once, the one waiting for its delay too.
    let mut w = windows_open(seed, 0, 2, t0);
    assert_eq!(w.plan(WINDOW_EVENTS, false, true, t1), vec![WindowCall::Open(3)]);
    w.answered(WindowCall::Open(3));
    w.reset();
    let calls = w.plan(WINDOW_EVENTS, false, true, t1);
    assert!(calls.contains(&WindowCall::Close(0)), "{calls:?}");

    // Catching up, the cursor leaves a bucket every few milliseconds: no delay; nor just
    // after it caught up (live since t1 only), in step with no other subscriber.
    let mut w = windows_open(seed, 0, 2, t0);
    assert_eq!(w.plan(WINDOW_EVENTS - 2, false, false, t1), vec![]);
    assert_eq!(w.plan(WINDOW_EVENTS, false, true, t1), vec![WindowCall::Close(0), WindowCall::Open(3)]);
    w.answered(WindowCall::Close(0));
    w.answered(WindowCall::Open(3));
    assert_eq!(w.plan(2 * WINDOW_EVENTS, false, true, t1 + CLOSE_SPREAD - Duration::from_millis(1)), vec![WindowCall::Close(1), WindowCall::Open(4)]);
    w.answered(WindowCall::Close(1));
    w.answered(WindowCall::Open(4));
    // Live for CLOSE_SPREAD now: the next bucket left waits for its delay.
    assert_eq!(w.plan(3 * WINDOW_EVENTS, false, true, t1 + CLOSE_SPREAD), vec![WindowCall::Open(5)]);
}

/// A bucket waiting for its delay closes at once when the cursor moves on again, when the
/// stream falls behind, and when its windows are released; a bucket the cursor comes back
/// to (a rebuilt history) waits its whole delay again when it is left again.
#[test]
fn a_bucket_waiting_to_close_closes_at_once_when_things_change() {
    let t0 = Instant::now();
    let t1 = t0 + CLOSE_SPREAD;
    let seed = (0..).find(|s| close_delay(*s, 0) > Duration::from_millis(100) && close_delay(*s, 1) > Duration::from_millis(100)).unwrap();
    let waiting = |live_plans: &[u64]| {
        let mut w = windows_open(seed, 0, 2, t0);
        for (i, fetch_after) in live_plans.iter().enumerate() {
            for call in w.plan(*fetch_after, false, true, t1 + Duration::from_millis(i as u64)) {
                w.answered(call);
            }
        }
        w
    };
    // The cursor leaves bucket 1 too: bucket 0 is two behind and closes; 1 waits.
    let mut w = waiting(&[WINDOW_EVENTS]);
    assert_eq!(w.plan(2 * WINDOW_EVENTS, false, true, t1), vec![WindowCall::Close(0), WindowCall::Open(4)]);
    // The stream falls behind (catching up): no more waiting.
    let mut w = waiting(&[WINDOW_EVENTS]);
    assert_eq!(w.plan(WINDOW_EVENTS + 1, false, false, t1), vec![WindowCall::Close(0)]);
    // Released for another stream's replay: every window closes.
    let mut w = waiting(&[WINDOW_EVENTS]);
    assert!(w.release(t1).contains(&WindowCall::Close(0)));

    // Bucket 0 closes after its delay; the history is rebuilt and the cursor comes back
    // into bucket 0, then leaves it again: it waits its delay again, from then.
    let mut w = waiting(&[WINDOW_EVENTS]);
    let delay = close_delay(seed, 0);
    assert_eq!(w.plan(WINDOW_EVENTS, false, true, t1 + delay), vec![WindowCall::Close(0)]);
    w.answered(WindowCall::Close(0));
    let t2 = t1 + delay + Duration::from_secs(1);
    for call in w.plan(0, false, true, t2) {
        w.answered(call);
    }
    assert!(w.open.contains(&0));
    assert!(!w.plan(WINDOW_EVENTS, false, true, t2).contains(&WindowCall::Close(0)));
    assert!(!w.plan(WINDOW_EVENTS, false, true, t2 + delay - Duration::from_millis(1)).contains(&WindowCall::Close(0)));
    assert!(w.plan(WINDOW_EVENTS, false, true, t2 + delay).contains(&WindowCall::Close(0)));
}

/// The driver passes whether a stream follows live: a live stream keeps the bucket it
/// has just left open for its delay, then closes it, with no event to move it.
#[test]
fn a_live_stream_closes_the_bucket_it_left_after_its_own_delay() {
    let mut sim = live_sim(10);
    sim.advance(CLOSE_SPREAD);
    let delay = close_delay(stream_seed(sim.seed, "s.a"), 0);
    // To the last event of bucket 0: the next one is in bucket 1.
    sim.publish(0, WINDOW_EVENTS - 11);
    sim.deliver(100);
    assert_eq!(sim.driver.applied()["s.a"], WINDOW_EVENTS - 1);
    let left_at = sim.elapsed;
    let mut closed_after = None;
    while closed_after.is_none() && sim.elapsed < left_at + CLOSE_SPREAD + Duration::from_secs(1) {
        if !sim.server["s.a"].windows.contains(&0) {
            closed_after = Some(sim.elapsed - left_at);
        }
        sim.advance(Duration::from_millis(50));
        sim.deliver(100);
    }
    let closed_after = closed_after.expect("bucket 0 was closed");
    assert!(closed_after >= delay && closed_after <= delay + Duration::from_millis(200), "closed {closed_after:?} after leaving, delay {delay:?}");
    assert!(sim.server["s.a"].windows.contains(&1));
}

/// The delays are the client's own: the same for one seed and bucket, in
/// `[0, CLOSE_SPREAD)`, and spread over that range across clients and buckets.
#[test]
fn close_delays_spread_over_clients_and_buckets() {
    assert_eq!(close_delay(42, 7), close_delay(42, 7));
    for draws in [(0..400u64).map(|seed| close_delay(seed, 3)).collect::<Vec<_>>(), (0..400u64).map(|b| close_delay(99, b)).collect()] {
        assert!(draws.iter().all(|d| *d < CLOSE_SPREAD));
        // Each tenth of the range holds some of the 400 draws (about 40 each).
        for tenth in 0..10u32 {
            let (lo, hi) = (CLOSE_SPREAD * tenth / 10, CLOSE_SPREAD * (tenth + 1) / 10);
            let n = draws.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!((15..=70).contains(&n), "{n} of 400 delays in [{lo:?}, {hi:?})");
        }
    }
}


/// Runs the sim for `d` in steps of 50 ms, delivering everything; returns whether `s.a`
/// was ever shown as held behind the server.
fn run_watching_behind(sim: &mut Sim, d: Duration) -> bool {
    let until = sim.elapsed + d;
    let mut behind = false;
    while sim.elapsed < until {
        sim.deliver(1_000);
        sim.advance(Duration::from_millis(50));
        let s = &sim.driver.streams["s.a"];
        let state = health::stream_state(s);
        behind |= state == ConnectionState::ServerBehind;
        // `khala tail --exit-when-live` would exit during a hold that read as live.
        assert!(!(matches!(s.engine.mode(), StreamMode::ServerBehind { .. }) && state == ConnectionState::Live), "a hold read as live");
    }
    behind
}

/// The module's `stream_view` trails the publishes. A live client is not held by it; one
/// that reconnects while its cursor is past the view's head holds until the segment
/// holding its cursor comes, and does not report the server behind; a server that did
/// lose commits is reported once the hold outlasts `BEHIND_GRACE`, and the stream goes
/// on once the history is published again.
#[test]
fn a_trailing_view_is_not_reported_as_a_server_behind_but_a_lost_history_is() {
    let mut sim = Sim::new(false);
    sim.lag_views = true;
    sim.tick();
    sim.deliver(100);
    sim.publish(0, 5);
    sim.refresh_view(0);
    for i in 0..10 {
        sim.publish(0, 3);
        if i % 3 == 2 {
            // A refresh lands between publishes: the client has applied past the last one.
            sim.refresh_view(0);
        }
        assert!(!run_watching_behind(&mut sim, Duration::from_millis(100)), "a live stream was held behind a trailing view");
    }
    assert_eq!(sim.driver.applied()["s.a"], 35);
    assert_eq!(sim.server["s.a"].view.as_ref().map(|v| v.head_seq), Some(32), "the view must trail for this test");

    sim.drop_connection("network");
    assert!(!run_watching_behind(&mut sim, Duration::from_secs(10)), "a reconnect past the view's head reported the server behind");
    assert!(matches!(sim.driver.streams["s.a"].engine.mode(), StreamMode::Normal));
    sim.publish(0, 2);
    run_watching_behind(&mut sim, Duration::from_millis(500));
    assert_eq!(sim.driver.applied()["s.a"], 37);

    // The server loses 33..=37 (two segments) in a crash; its view (written before) says 32.
    sim.server_restart(0, 2);
    assert_eq!(sim.server["s.a"].head, 32);
    assert!(run_watching_behind(&mut sim, hold::BEHIND_GRACE + Duration::from_secs(2)), "a server that lost commits was never reported behind");
    sim.republish(0, 5);
    sim.refresh_view(0);
    run_watching_behind(&mut sim, Duration::from_secs(2));
    assert_eq!(sim.driver.applied()["s.a"], 37);
    assert_eq!(health::stream_state(&sim.driver.streams["s.a"]), ConnectionState::Live);
}

/// A connected, subscribed client with `n` events applied and checkpointed on `s.a`.
fn live_sim(n: u64) -> Sim {
    let mut sim = Sim::new(false);
    sim.tick();
    sim.deliver(100);
    if n > 0 {
        sim.publish(0, n);
    }
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    sim
}

/// [`live_sim`] with 5 checkpointed, then 6..=8 applied and their checkpoint's file write
/// in flight (a slow one: see `Faults::slow_write`).
fn writing_8() -> Sim {
    let mut sim = live_sim(5);
    assert_eq!(sim.driver.durable("s.a").unwrap().seq, 5);
    sim.faults.slow_write = 1;
    sim.publish(0, 3);
    sim.deliver(100);
    sim.advance(Duration::from_millis(50));
    assert_eq!(sim.write_in_flight.as_ref().map(|(c, _)| c[0].seq), Some(8), "the write of 8 is in flight");
    sim
}

/// The seq the checkpoint file holds for `s.a`.
fn file_seq(sim: &Sim) -> Option<u64> {
    sim.file.as_ref().and_then(|f| f.as_ref().ok()).map(|c| c[0].seq)
}

/// The shell writes checkpoint files on a thread of its own. While a write is in flight
/// events keep being applied, no second checkpoint is asked for, and nothing is acked
/// past the last answered one; a stop waits for the write, then checkpoints what was
/// applied since, and only then stops.
#[test]
fn events_apply_while_a_checkpoint_is_written_and_a_stop_waits_for_it() {
    let mut sim = writing_8();
    sim.publish(0, 4);
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.driver.applied()["s.a"], 12, "events are applied while the write is in flight");
    assert_eq!(sim.driver.durable("s.a").unwrap().seq, 5, "durable only once the write is answered");
    assert_eq!(sim.server["s.a"].acked, 5, "no ack past the answered checkpoint");

    sim.feed(Input::Shutdown);
    assert!(!sim.stopped, "stopped with a write in flight");
    assert_eq!(sim.driver.wait(), TICK, "a stopping driver must not make the loop spin");
    sim.publish(0, 2);
    sim.deliver(100);
    assert!(!sim.stopped && sim.driver.applied()["s.a"] == 12, "a stopping driver went on applying");
    sim.finish_write();
    assert!(sim.stopped, "the stop did not follow the last checkpoint's answer");
    assert_eq!(file_seq(&sim), Some(12), "the stop checkpointed what followed the write");
}

/// A session that ends while a checkpoint is written checkpoints what was applied since
/// at that write's answer, not only once a new session is up.
#[test]
fn a_session_that_ends_during_a_write_checkpoints_at_its_answer() {
    let mut sim = writing_8();
    sim.publish(0, 2);
    sim.deliver(100);
    assert_eq!(sim.driver.applied()["s.a"], 10);
    sim.drop_connection("network");
    sim.deliver(100);
    // The server stays unreachable: the session does not come back.
    sim.alive = false;
    sim.finish_write();
    assert_eq!(file_seq(&sim), Some(10), "the end of the session was not checkpointed at the write's answer");
}

/// A rebootstrap taken while a checkpoint of the old history is written: its answer
/// makes that cursor durable (the file holds it) but does not make acks current again,
/// so nothing the handler dropped is acked.
#[test]
fn a_write_answered_after_a_rebootstrap_does_not_ack_the_old_history() {
    let mut sim = writing_8();
    // Retention passes the cursor before 9..=11 reach the client (their segment is
    // lost on the way): a rebootstrap from 11.
    sim.conn.as_mut().unwrap().clear();
    sim.publish(0, 3);
    sim.lose_segment();
    sim.retention(0, 3);
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.rebootstraps, 1, "the retention did not rebootstrap the stream");
    sim.finish_write();
    // Acks are checked against what the handler persisted (`Command::Ack` in the sim).
    sim.publish(0, 2);
    for _ in 0..10 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(600));
    }
    assert_eq!(sim.driver.applied()["s.a"], 13);
    assert_eq!(sim.server["s.a"].acked, 13);
}

/// A slow write that fails ends `run`; called again, the client writes it anew, and a
/// stop that waited for it stops after that.
#[test]
fn a_stop_whose_write_failed_stops_once_a_run_called_again_writes_it() {
    let mut sim = writing_8();
    sim.feed(Input::Shutdown);
    sim.faults.checkpoint_write = 1;
    // The write fails; the tick after it is the first of a `run` called again.
    sim.finish_write();
    assert!(sim.stopped, "a run called again after the failed write never stopped");
    assert_eq!(file_seq(&sim), Some(8), "stopped without the cursors written");
}

#[test]
fn a_quiet_stream_acks_its_durable_cursor_again_after_a_reconnect() {
    let mut sim = live_sim(5);
    assert_eq!(sim.server["s.a"].acked, 5);
    // The server crashes after the ack's commit and before its fsync: the ack is lost.
    // Nothing new is published, yet the next session acks 5 again.
    sim.server_restart(0, 0);
    let sent = sim.acks_sent;
    for _ in 0..10 {
        sim.deliver(100);
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.server["s.a"].acked, 5);
    assert!(sim.acks_sent > sent);
}

#[test]
fn under_steady_traffic_acks_go_once_per_ack_every_and_end_at_the_durable_cursor() {
    let mut sim = live_sim(0);
    let sent = sim.acks_sent;
    // Two seconds of events every 10 ms: about a hundred checkpoints.
    for _ in 0..200 {
        sim.publish(0, 1);
        sim.deliver(100);
        sim.advance(Duration::from_millis(10));
    }
    let spaced = (Duration::from_secs(2).as_millis() / super::acks::ACK_EVERY.as_millis()) as u64 + 1;
    assert!(sim.acks_sent - sent <= spaced, "{} acks in 2 s", sim.acks_sent - sent);
    sim.advance(super::acks::ACK_EVERY);
    sim.deliver(100);
    sim.advance(Duration::from_millis(50));
    assert_eq!(sim.server["s.a"].acked, 200);
}

#[test]
fn a_refused_ack_is_retried_after_a_pause_not_at_every_tick() {
    let mut sim = live_sim(0);
    sim.faults.ack = 1;
    sim.publish(0, 3);
    sim.deliver(100);
    sim.advance(Duration::from_millis(50));
    sim.deliver(100);
    let sent = sim.acks_sent;
    for _ in 0..5 {
        sim.advance(Duration::from_millis(100));
        sim.deliver(100);
    }
    assert!(sim.acks_sent <= sent + 1, "an ack was re-sent {} times in half a second", sim.acks_sent - sent);
    sim.advance(Duration::from_secs(2));
    sim.deliver(100);
    sim.advance(Duration::from_millis(50));
    sim.deliver(100);
    assert_eq!(sim.server["s.a"].acked, 3);
}

#[test]
fn an_ack_whose_answer_is_lost_is_sent_again() {
    let mut sim = live_sim(0);
    sim.faults.ack_answer = 1;
    sim.publish(0, 4);
    for _ in 0..3 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.acks_sent, 1);
    // The server has it, yet the client never heard; a later cursor waits for the answer
    // until it counts as lost.
    sim.publish(0, 2);
    for _ in 0..3 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!((sim.acks_sent, sim.server["s.a"].acked), (1, 4));
    sim.advance(super::acks::ANSWER_WITHIN + Duration::from_secs(1));
    sim.deliver(100);
    sim.advance(Duration::from_millis(50));
    assert_eq!(sim.server["s.a"].acked, 6);
}

/// Cases of the burst property test: each burst is 20,000 events through the
/// simulated server, so fewer cases than the main test.
const BURST_CASES: u32 = 16;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(BURST_CASES))]

    /// The main property test's interleavings with bursts of 20,000 events, so that
    /// streams fall far behind and wait for a replay slot (one, the default): besides
    /// every check of the main test, a stream catching up without a slot keeps no window
    /// of its own after any round, and every stream still reaches its head.
    #[test]
    fn streams_far_behind_take_the_replay_slot_in_turn(owns in any::<bool>(), actions in proptest::collection::vec(action_with_bursts(), 0..40)) {
        run_case(owns, &actions);
    }
}

/// Two streams far behind: the second opens no window until the first has caught up,
/// then catches up in its turn.
#[test]
fn two_streams_far_behind_catch_up_one_after_the_other() {
    let mut sim = Sim::new(false);
    sim.burst(0);
    sim.burst(1);
    let (a, b) = (STREAMS[0], STREAMS[1]);
    let mut first_done_at = None;
    for step in 0..400 {
        sim.deliver(20);
        sim.advance(Duration::from_millis(30));
        let a_behind = sim.driver.streams[a].catching_up() || sim.driver.streams[a].engine.info().is_none();
        if a_behind {
            assert!(sim.server[b].windows.is_empty(), "step {step}: {b} has windows {:?} while {a} catches up", sim.server[b].windows);
        } else if first_done_at.is_none() {
            first_done_at = Some(step);
        }
    }
    assert!(first_done_at.is_some(), "{a} never caught up");
    sim.heal();
    sim.check_settled();
    assert_eq!(sim.applied, 40_000);
}

#[test]
fn health_is_a_read_and_the_backoff_resets_only_when_live() {
    let mut driver = Driver::new(settings(false, 9), Stored::Cursors(Vec::new()));
    let base = Instant::now();
    let mut t = Duration::ZERO;
    let mut now = || {
        t += Duration::from_secs(10);
        Now { at: base + t, unix_micros: t.as_micros() as i64 }
    };
    // Three failed connects in a row: the attempt count grows...
    for attempt in 1..=3u32 {
        let cmds = driver.step(Input::Tick, now());
        assert!(cmds.iter().any(|c| matches!(c, Command::Connect)));
        let cmds = driver.step(Input::Failed(ClientError::Connect("refused".into())), now());
        assert!(cmds.iter().any(|c| matches!(c, Command::Reconnect { .. })));
        // ...and reading health, however often, changes nothing.
        for _ in 0..3 {
            let h = driver.health(now());
            assert_eq!((h.state, h.connect_attempts), (ConnectionState::Backoff as i32, attempt));
        }
    }
    // A session that reaches live resets it.
    driver.step(Input::Tick, now());
    driver.step(Input::Opened, now());
    driver.step(Input::Msg(Msg::Connected(me())), now());
    driver.step(Input::Msg(Msg::Hello(Ok(()))), now());
    driver.step(Input::Msg(Msg::Applied(META)), now());
    driver.step(Input::Tick, now());
    let h = driver.health(now());
    assert_eq!((h.state, h.connect_attempts), (ConnectionState::Live as i32, 0), "no stream has a grant: both are forbidden");
    driver.step(Input::Msg(Msg::Disconnected(None)), now());
    driver.step(Input::Tick, now());
    assert_eq!(driver.health(now()).connect_attempts, 2, "the first attempt since live failed, this is the second");
}

#[test]
fn a_revoked_stream_is_forbidden_and_opens_no_window() {
    let mut sim = live_sim(4);
    sim.revoke(0);
    sim.deliver(100);
    sim.publish(0, 3);
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_secs(1));
    }
    let h = sim.driver.health(sim.now());
    let a = h.streams.iter().find(|s| s.stream_id == "s.a").unwrap();
    assert_eq!((a.state, a.cursor), (ConnectionState::Forbidden as i32, 4));
    assert!(sim.server["s.a"].windows.is_empty());
    assert_eq!(sim.driver.windows_held("s.a"), 0);
    // Renewed: the rest arrives.
    sim.renew(0);
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.driver.applied()["s.a"], 7);
}

/// A segment whose events do not hash to its own chain hashes is refused: nothing of it
/// is applied, the stream reads as corrupt and names the seqs, and the metric's note is
/// out. A sound copy, fetched when the windows reopen, heals it.
#[test]
fn a_corrupt_segment_is_refused_and_named_until_a_sound_copy_arrives() {
    // The segment on its way is swapped for one whose last hash is wrong.
    fn corrupt_next_segment(sim: &mut Sim) {
        let q = sim.conn.as_mut().unwrap();
        let at = q.iter().rposition(|m| matches!(m, Msg::Segment(..))).expect("the new segment is on its way");
        let Some(Msg::Segment(id, Ok(sound), published)) = q.remove(at) else { unreachable!() };
        let corrupt = SegmentIn::new(&id, sound.epoch, sound.first_seq, sound.last_seq, sound.prev_hash, [7; 32], sound.events.clone());
        q.insert(at, Msg::Segment(id, Ok(corrupt), published));
    }
    let mut sim = live_sim(4);
    sim.publish(0, 3);
    corrupt_next_segment(&mut sim);
    sim.publish(0, 2);
    corrupt_next_segment(&mut sim);
    sim.deliver(100);
    let h = sim.driver.health(sim.now());
    let a = h.streams.iter().find(|s| s.stream_id == "s.a").unwrap();
    assert_eq!((a.state, a.cursor), (ConnectionState::Corrupt as i32, 4));
    assert!(h.last_error.contains("s.a: segment_corrupt: seqs 5..=7"), "{}", h.last_error);
    // Both were refused; the one at the cursor is named.
    assert_eq!(sim.corrupt_notes, 2);
    // The gap wait ends, the windows reopen, and the server sends its sound copy.
    for _ in 0..10 {
        sim.advance(Duration::from_secs(1));
        sim.deliver(100);
    }
    assert_eq!(sim.driver.applied()["s.a"], 9);
    let h = sim.driver.health(sim.now());
    assert_eq!(h.streams.iter().find(|s| s.stream_id == "s.a").unwrap().state, ConnectionState::Live as i32);
    assert!(!h.last_error.contains("segment_corrupt"));
}

#[test]
fn an_incompatible_server_stops_the_client_after_a_final_checkpoint() {
    let mut driver = Driver::new(settings(false, 3), Stored::Cursors(Vec::new()));
    let now = Now { at: Instant::now(), unix_micros: 0 };
    driver.step(Input::Tick, now);
    driver.step(Input::Opened, now);
    driver.step(Input::Msg(Msg::Connected(me())), now);
    let cmds = driver.step(Input::Msg(Msg::Hello(Err(coded(ErrorCode::UpgradeRequired, "9.0.0")))), now);
    assert!(matches!(cmds.last(), Some(Command::Stop(Err(ClientError::Incompatible(_))))), "{cmds:?}");
    assert_eq!(driver.health(now).state, ConnectionState::UpgradeRequired as i32);
    // A `run` called again stops at its first tick, with the same code, and connects to
    // nothing.
    let cmds = driver.step(Input::Tick, now);
    let [Command::Stop(Err(again))] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!(again.code(), "upgrade_required");
    assert!(!again.is_retryable());
}

#[test]
fn a_corrupt_checkpoint_stays_until_every_stream_was_dropped() {
    let mut sim = live_sim(3);
    sim.faults.rebootstrap = 1_000;
    sim.crash(true);
    for _ in 0..5 {
        sim.deliver(100);
        sim.advance(Duration::from_secs(1));
    }
    assert!(matches!(sim.file, Some(Err(_))), "set aside before the handler dropped the streams");
    sim.faults.rebootstrap = 0;
    for _ in 0..10 {
        sim.deliver(100);
        sim.advance(Duration::from_secs(1));
    }
    assert!(matches!(sim.file, Some(Ok(_))));
    assert!(sim.driver.health(sim.now()).last_error.contains("checkpoint_corrupt"));
    assert_eq!(sim.driver.applied()["s.a"], 3);
}

/// Found by the property test: the corrupt file was set aside before the handler's
/// persist, which then failed; a crash restarted from no file at all, over the handler's
/// old projection. Now the file goes only once the handler persisted.
#[test]
fn a_checkpoint_file_that_could_not_be_written_is_written_by_the_next_run() {
    let mut sim = live_sim(3);
    sim.faults.checkpoint_write = 1;
    sim.publish(0, 2);
    for _ in 0..20 {
        sim.deliver(100);
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.faults.checkpoint_write, 0, "the fault was never injected");
    assert_eq!(sim.driver.durable("s.a").map(|c| c.seq), Some(5));
    assert!(matches!(&sim.file, Some(Ok(c)) if c.iter().any(|c| c.stream_id == "s.a" && c.seq == 5)), "{:?}", sim.file);
}

#[test]
fn a_corrupt_checkpoint_goes_only_once_the_handler_persisted() {
    use Action::*;
    run_case(false, &[FailRebootstrap, Publish(0, 5), Deliver(7), Publish(0, 3), Deliver(2), Publish(0, 1), FailPersist, Publish(0, 1), CorruptCheckpoint, Deliver(7), Crash, EpochChange(0)]);
}

/// Found by the property test: a handler that owns its cursors rolled back the
/// rebootstrap it took (with a batch it could not commit); the floor then arrived and
/// the handler was handed seq 2 over its old state. Now a stream being rebuilt is
/// rebootstrapped again at every session start.
#[test]
fn a_rolled_back_rebootstrap_is_told_again() {
    use Action::*;
    run_case(true, &[Publish(0, 1), Publish(0, 1), Retention(0, 1), Deliver(3), Deliver(2), Publish(0, 1), Publish(0, 1), EpochChange(1), Deliver(5), Disconnect]);
}

/// Found by the property test: after a rebootstrap to an empty epoch nothing was applied,
/// so nothing was checkpointed, and the old epoch's cursor stayed durable (and unacked).
#[test]
fn a_rebootstrap_with_nothing_after_it_is_checkpointed() {
    use Action::*;
    run_case(true, &[Publish(0, 2), Deliver(7), Deliver(1), Publish(1, 1), Publish(0, 1), EpochChange(0), Deliver(6), Disconnect]);
}

/// Found by the property test: the floor segment of a rebootstrap was lost; later
/// segments are not kept while rebuilding, nothing counted as a gap, and the stream
/// waited for ever. Now waiting for the floor reopens the windows like any gap.
#[test]
fn a_lost_floor_segment_is_fetched_again() {
    use Action::*;
    run_case(false, &[Publish(0, 1), Publish(0, 1), Retention(0, 1), Publish(0, 1), Tick(0), Publish(0, 1), Deliver(7), Deliver(1), LoseSegment]);
}
/// Found by the property test: held behind a server that lost commits, the segment
/// holding the cursor (which decides whether to resume) was lost once the server had it
/// again, and the stream waited for ever. Now that wait reopens the windows too.
#[test]
fn a_lost_segment_at_the_held_cursor_is_fetched_again() {
    use Action::*;
    run_case(true, &[Publish(1, 5), Publish(1, 4), Deliver(7), Deliver(6), ServerRestart(1, 2), Publish(1, 1), Publish(1, 1), Publish(1, 3), Deliver(1), Deliver(5), Retention(1, 1), ServerRestart(0, 2), Deliver(1), Deliver(7), Deliver(8), LoseSegment]);
}


/// The server loses the last segments of a burst twice while a second stream bursts;
/// the mirror republishes what was lost (the proptest's case, kept by name: the sim
/// republished it as one segment longer than a window bucket, which no module makes).
#[test]
fn a_stream_catches_up_after_the_server_lost_segments_of_a_burst_twice() {
    use Action::*;
    run_case(false, &[Burst(0), Deliver(1), Deliver(6), Deliver(4), Tick(0), ServerRestart(0, 1), ServerRestart(0, 2), Burst(1)]);
}

/// The client applies a burst through 12,000, the end of a segment; the server loses
/// everything past 4,000, and by the time the client is back the authority's events were
/// published again in other batches (4,001..=4,004, then 4,005..=8,004, 8,005..=12,004,
/// ...). The segment holding 12,001 now begins in the bucket before the cursor's, which
/// the client did not open (its cursor ended a segment), so its gap never filled. The
/// proptest's case, kept by name.
#[test]
fn a_cursor_at_an_old_segment_end_finds_its_next_event_after_the_history_was_republished_in_other_batches() {
    use Action::*;
    run_case(false, &[Burst(0), Deliver(1), Deliver(6), Deliver(4), Revoke(0), ServerRestart(0, 2), ServerRestart(0, 2), Publish(0, 4)]);
}

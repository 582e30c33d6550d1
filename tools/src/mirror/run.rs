//! The mirror's loop: read the source in order, put each event in its stream's lane,
//! send batches, turn acknowledgements into a durable cursor, and after any failure or
//! loss rewind to that cursor and reconcile against the module's stream heads.
//!
//! Everything after the durable cursor is disposable state: a reconcile drops it, reads
//! every stream head again, and re-reads the source from the cursor, skipping what the
//! module already holds (`seq <= head`) and publishing the rest. Idempotency keys and
//! `authority_seq` make a republish harmless, so the only way to lose an event would be
//! to move the cursor past one that is not durable, which [`Durability`] prevents.

use khala_client::backoff::Backoff;
use super::batcher::Lanes;
use super::deadletter::DeadLetters;
use super::durability::{Durability, Need, Observation};
use super::error::{MirrorError, Result};
use super::event::{Bad, Event, GAP_KIND};
use super::metrics::Stats;
use super::verify::{self, Fingerprint, ModuleRange, Stop};
use super::publisher::{transient, Done, Job, Outcome, Publisher};
use super::source::{Origin, Read, Record, Source};
use super::{OnDivergence, OnGap};
use crate::api::Api;
use crate::ToolError;
use khala_proto::ErrorCode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Most records read but not yet durable before reading pauses (a held stream blocks the
/// cursor, and this bounds the memory that costs).
const MAX_PENDING: usize = 2_000_000;
/// The longest run of missing seqs `--on-gap skip` fills with markers; longer gaps hold.
const MAX_GAP_FILL: u64 = 10_000;
/// How often the durable cursor is written, at most.
const PERSIST_EVERY: Duration = Duration::from_millis(250);
/// How often stream heads are read to confirm durability, at most.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a stop (Ctrl-C) waits beyond `--durable-after-ms` for the cursor to catch up.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Consecutive head reads missing an acknowledged stream before giving up.
const HIDDEN_STRIKES: u32 = 3;
/// Divergence checks waiting on one lane that trigger a read of its segments at once.
const CHECK_BATCH: usize = 4096;
/// Longest a divergence check waits for more to batch with.
const CHECK_WAIT: Duration = Duration::from_millis(100);

/// Settings of the loop.
pub struct Settings {
    pub batch_events: usize,
    pub batch_wait: Duration,
    pub durable_after: Duration,
    pub on_gap: OnGap,
    pub on_divergence: OnDivergence,
    /// Run even with the database owner's token.
    pub allow_owner: bool,
    pub parallel: usize,
    pub transport: super::publisher::Transport,
    pub stop: &'static AtomicBool,
}

/// One mirror run.
pub struct Mirror {
    settings: Settings,
    api: Api,
    database: String,
    token: String,
    source: Box<dyn Source>,
    dead: DeadLetters,
    publisher: Publisher,
    lanes: Lanes,
    durability: Durability,
    checks: verify::Pending,
    checks_since: Option<Instant>,
    heads: HashMap<String, u64>,
    heads_at: Instant,
    pub stats: Stats,
    backoff: Backoff,
    first_reconcile: bool,
    need_reconcile: bool,
    pause_before_reconcile: bool,
    source_ended: bool,
    stopping_since: Option<Instant>,
    cursor_dirty: bool,
    last_persist: Instant,
    last_check: Instant,
    last_gauges: Instant,
    last_progress_log: Instant,
    hidden_strikes: u32,
    /// The streams this identity may publish to, read at every reconcile.
    reach: crate::inspect::PublishReach,
    /// A bar over the source's bytes (a file) or a spinner, drawn on a terminal only.
    progress: indicatif::ProgressBar,
}

fn origin_text(origin: Origin) -> String {
    match origin {
        Origin::Line(n) => format!("line {n}"),
        Origin::OutboxId(id) => format!("outbox id {id}"),
    }
}

impl Mirror {
    pub fn new(settings: Settings, api: Api, database: String, token: String, source: Box<dyn Source>, dead: DeadLetters) -> Mirror {
        let publisher = Publisher::start(settings.transport, api.clone(), &database, &token, settings.parallel);
        let durability = Durability::new(settings.durable_after, source.start());
        let now = Instant::now();
        let progress = match source.size() {
            Some(size) => crate::progress::bytes_bar(size, "mirrored (durable)"),
            None => crate::progress::spinner("mirroring"),
        };
        Mirror {
            settings,
            api,
            database,
            token,
            source,
            dead,
            publisher,
            lanes: Lanes::default(),
            durability,
            checks: verify::Pending::default(),
            checks_since: None,
            heads: HashMap::new(),
            heads_at: now,
            stats: Stats::default(),
            backoff: Backoff::default(),
            first_reconcile: true,
            need_reconcile: true,
            pause_before_reconcile: false,
            source_ended: false,
            stopping_since: None,
            cursor_dirty: false,
            last_persist: now,
            last_check: now,
            last_gauges: now,
            last_progress_log: now,
            hidden_strikes: 0,
            reach: crate::inspect::PublishReach::default(),
            progress,
        }
    }

    pub fn source_name(&self) -> String {
        self.source.describe()
    }

    pub fn dead_letter_path(&self) -> String {
        self.dead.path().display().to_string()
    }

    pub fn durable(&self) -> super::source::Mark {
        self.durability.cursor()
    }

    /// `(stream, reason)` of the held streams.
    pub fn held(&self) -> Vec<(String, String)> {
        self.lanes.held()
    }

    /// Runs until the input is drained and durable (or a stop), then saves the cursor.
    pub fn run(&mut self) -> Result<()> {
        let result = self.run_loop();
        self.progress.finish_and_clear();
        // Whatever happened, keep the durable progress made so far.
        let saved = self.persist(true);
        result.and(saved)
    }

    fn run_loop(&mut self) -> Result<()> {
        loop {
            if self.settings.stop.load(Ordering::Relaxed) && self.stopping_since.is_none() {
                log::info!("stopping: publishing what was read and waiting for it to be durable (Ctrl-C again to quit at once)");
                self.stopping_since = Some(Instant::now());
            }
            let mut progressed = false;
            while let Some(done) = self.publisher.recv(Duration::ZERO) {
                self.on_done(done)?;
                progressed = true;
            }
            if self.need_reconcile {
                if !self.reconcile()? {
                    return Ok(());
                }
                continue;
            }
            progressed |= self.read_some()?;
            self.check_duplicates()?;
            self.dispatch();
            self.check_heads()?;
            self.persist(false)?;
            self.report_progress();
            if self.finished() {
                return self.check_drained();
            }
            if !progressed {
                match self.publisher.recv(Duration::from_millis(5)) {
                    Some(done) => self.on_done(done)?,
                    None if self.publisher.in_flight() == 0 => std::thread::sleep(Duration::from_millis(5)),
                    None => {}
                }
            }
        }
    }

    fn finished(&self) -> bool {
        let drained = self.lanes.queued() == 0 && self.publisher.in_flight() == 0 && !self.durability.unconfirmed() && self.checks.is_empty();
        let stop_overdue = self.stopping_since.is_some_and(|t| t.elapsed() > self.settings.durable_after + STOP_GRACE);
        ((self.source_ended || self.stopping_since.is_some()) && drained) || stop_overdue
    }

    /// After the input ended: every record is behind the cursor, or held streams block it.
    fn check_drained(&mut self) -> Result<()> {
        self.persist(true)?;
        if self.durability.pending() > 0 && self.lanes.held().is_empty() && self.stopping_since.is_none() {
            let lane = self.durability.blocking_lane().map(|l| self.lanes.lane(l).stream_id.clone()).unwrap_or_default();
            return Err(MirrorError::Internal(format!("the input is drained but the cursor cannot pass stream {lane:?}")));
        }
        Ok(())
    }

    /// A failure worth retrying: count it, then back off and reconcile.
    fn transient(&mut self, class: &'static str, detail: &str) {
        self.stats.failure(class);
        log::warn!("{class}: {detail}; will reconcile and retry");
        self.need_reconcile = true;
        self.pause_before_reconcile = true;
    }

    fn read_heads(&self) -> Result<HashMap<String, u64>, ToolError> {
        Ok(crate::inspect::streams(&self.api, &self.database, &self.token)?.into_iter().map(|s| (s.stream_id, s.head_seq)).collect())
    }

    /// Drops everything after the durable cursor, reads the stream heads and rewinds the
    /// source. Returns `false` when a stop was requested while the server was away.
    fn reconcile(&mut self) -> Result<bool> {
        while self.publisher.in_flight() > 0 {
            self.publisher.recv(Duration::from_secs(1));
        }
        loop {
            if self.pause_before_reconcile {
                let delay = self.backoff.next_delay();
                log::info!("retrying in {} ms", delay.as_millis());
                let until = Instant::now() + delay;
                while Instant::now() < until && !self.settings.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
                }
                if self.settings.stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
            }
            self.pause_before_reconcile = true;
            match self.read_heads().and_then(|heads| Ok((heads, self.read_reach()?))) {
                Ok((heads, reach)) => {
                    if self.first_reconcile && !self.settings.allow_owner {
                        self.refuse_owner()?;
                    }
                    if reach.is_empty() {
                        let identity = crate::api::token_identity(&self.token).unwrap_or_default();
                        return Err(MirrorError::NoPublishGrant { identity, database: self.database.clone() });
                    }
                    self.reach = reach;
                    self.heads = heads;
                    self.heads_at = Instant::now();
                }
                // A database that is missing at start is a typo, not a restart.
                Err(e) if transient(&e) && !(self.first_reconcile && e.http_status() == Some(404)) => {
                    self.stats.failure("unavailable");
                    log::warn!("reading stream heads: {e}");
                    continue;
                }
                Err(e) => return Err(MirrorError::Server(e)),
            }
            match self.source.rewind(self.durability.cursor()) {
                Ok(()) => break,
                Err(e @ MirrorError::Postgres { .. }) => {
                    self.stats.failure("postgres");
                    log::warn!("{e}");
                }
                Err(e) => return Err(e),
            }
        }
        self.lanes.clear();
        self.durability.reset();
        self.checks.clear();
        self.checks_since = None;
        self.source_ended = false;
        self.need_reconcile = false;
        self.pause_before_reconcile = false;
        if !self.first_reconcile {
            self.stats.reconciled();
            log::info!("reconciled: {} stream heads read; replaying the source from {:?}", self.heads.len(), self.durability.cursor());
        }
        self.first_reconcile = false;
        Ok(true)
    }

    fn read_some(&mut self) -> Result<bool> {
        let max_queued = (self.settings.batch_events * (self.settings.parallel + 1) * 2).max(10_000);
        if self.source_ended || self.stopping_since.is_some() || self.lanes.queued() >= max_queued || self.durability.pending() >= MAX_PENDING {
            return Ok(false);
        }
        let busy = self.publisher.in_flight() > 0 || self.lanes.queued() > 0 || self.durability.unconfirmed();
        let wait = if busy { Duration::ZERO } else { Duration::from_millis(200) };
        match self.source.read(self.settings.batch_events.max(256), wait) {
            Ok(Read::Records(records)) => {
                self.stats.read(records.len() as u64);
                for record in records {
                    self.accept(record)?;
                }
                Ok(true)
            }
            Ok(Read::Idle) => Ok(false),
            Ok(Read::End) => {
                self.source_ended = true;
                Ok(true)
            }
            Err(e @ MirrorError::Postgres { .. }) => {
                self.transient("postgres", &e.to_string());
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn accept(&mut self, record: Record) -> Result<()> {
        let need = match record.parsed {
            Err((bad, raw)) => {
                if self.dead.write(record.origin, &bad, &raw)? {
                    self.stats.dead_lettered();
                    log::warn!("dead-lettered {}: {}: {}", origin_text(record.origin), bad.reason, bad.detail);
                }
                match (&bad.stream_id, &bad.topic, bad.seq) {
                    (Some(stream_id), Some(topic), Some(seq)) => self.refused(stream_id, topic, seq, bad.reason, record.origin),
                    _ => Need::Nothing,
                }
            }
            Ok(event) => self.admit(event),
        };
        self.durability.push(record.end, need);
        Ok(())
    }

    fn lane_for(&mut self, stream_id: &str, topic: &str) -> usize {
        if let Some(lane) = self.lanes.find(stream_id) {
            return lane;
        }
        let head = self.heads.get(stream_id).copied().unwrap_or(0);
        let lane = self.lanes.add(stream_id, topic, head + 1, usize::MAX);
        let same = self.durability.add_lane();
        debug_assert_eq!(lane, same);
        if !self.reach.covers(stream_id) {
            // Its head is invisible to this identity too: held, not mistaken for a gap.
            self.hold(lane, format!("forbidden_stream: no live publish grant of the mirror's identity covers {stream_id} (khala grant --scopes publish --stream {stream_id})"));
            return lane;
        }
        if head > 0 {
            // What the module holds counts as acknowledged when the heads were read.
            self.durability.ack(lane, head, self.heads_at);
            self.checks.module_holds(lane, head);
        }
        lane
    }

    fn admit(&mut self, event: Event) -> Need {
        let lane = self.lane_for(&event.stream_id, &event.topic);
        let need = Need::Durable { lane, seq: event.seq };
        let state = self.lanes.lane(lane);
        if event.seq < state.next {
            self.stats.duplicate();
            if state.held.is_some() {
                return need;
            }
            // Already in the module: it must be this very event (verify.rs).
            let ticket = self.checks.expect(lane, Fingerprint::of(event.seq, &event.kind, &event.payload));
            self.checks_since.get_or_insert_with(Instant::now);
            return Need::Verified { lane, ticket };
        }
        if state.held.is_some() || (event.seq > state.next && !self.fill_gap(lane, event.seq, event.origin)) {
            return need;
        }
        self.lanes.push(lane, event, Instant::now());
        need
    }

    /// An input event at `seq` of a known stream was dead-lettered: its seq is a hole.
    /// Held, the record keeps the cursor before it, so a later run (say with `--on-gap
    /// skip`) meets it again; skipped, a marker takes its seq.
    fn refused(&mut self, stream_id: &str, topic: &str, seq: u64, reason: &str, origin: Origin) -> Need {
        let lane = self.lane_for(stream_id, topic);
        let need = Need::Durable { lane, seq };
        let state = self.lanes.lane(lane);
        if seq < state.next || state.held.is_some() || (seq > state.next && !self.fill_gap(lane, seq, origin)) {
            return need;
        }
        match self.settings.on_gap {
            OnGap::Hold => self.hold(lane, format!("seq {seq} was dead-lettered ({reason}, {})", origin_text(origin))),
            OnGap::Skip => self.lanes.push(lane, Event::gap_marker(stream_id, topic, seq, reason, origin), Instant::now()),
        }
        need
    }

    /// The source skips from `next` to `seq` on `lane`. Hold: the lane stops. Skip: the
    /// missing seqs get marker events. Returns whether the lane goes on.
    fn fill_gap(&mut self, lane: usize, seq: u64, origin: Origin) -> bool {
        let state = self.lanes.lane(lane);
        let (next, stream_id, topic) = (state.next, state.stream_id.clone(), state.topic.clone());
        if self.settings.on_gap == OnGap::Hold || seq - next > MAX_GAP_FILL {
            self.hold(lane, format!("gap: the stream expects seq {next} but the source goes on with {seq} ({})", origin_text(origin)));
            return false;
        }
        log::warn!("{stream_id}: seqs {next}..={} are missing; publishing {GAP_KIND} markers in their place (--on-gap skip)", seq - 1);
        for missing in next..seq {
            self.lanes.push(lane, Event::gap_marker(&stream_id, &topic, missing, "missing", origin), Instant::now());
        }
        true
    }

    fn hold(&mut self, lane: usize, why: String) {
        let state = self.lanes.lane_mut(lane);
        log::error!("holding stream {}: {why}", state.stream_id);
        state.held = Some(why);
    }

    fn dispatch(&mut self) {
        let now = Instant::now();
        let flush = self.source_ended || self.stopping_since.is_some();
        for lane in self.lanes.ready(now, self.settings.batch_events, self.settings.batch_wait, flush) {
            if self.publisher.in_flight() >= self.settings.parallel {
                break;
            }
            if self.checks.blocks(lane) {
                continue;
            }
            let events = self.lanes.take_batch(lane, self.settings.batch_events, now);
            let state = self.lanes.lane_mut(lane);
            state.in_flight = true;
            self.publisher.send(Job { lane, stream_id: state.stream_id.clone(), events });
        }
    }

    fn on_done(&mut self, done: Done) -> Result<()> {
        let lane = done.lane;
        self.lanes.lane_mut(lane).in_flight = false;
        match done.outcome {
            Outcome::Committed => {
                let last = done.events.last().map_or(0, |e| e.seq);
                self.durability.ack(lane, last, done.at);
                self.checks.module_holds(lane, last);
                self.stats.published(done.events.len() as u64, done.at);
                self.backoff.reset();
            }
            Outcome::Transient(detail) => self.transient("unavailable", &detail),
            Outcome::SequenceConflict(detail) => {
                // The head moved under the mirror (a server crash it has not noticed yet,
                // or another publisher): the heads tell which.
                self.stats.failure("sequence_conflict");
                log::warn!("{}: sequence_conflict: {detail}; reconciling", self.lanes.lane(lane).stream_id);
                self.need_reconcile = true;
            }
            Outcome::TooLarge(detail) if done.events.len() == 1 => {
                // Alone and still too large: no smaller batch exists, so the event is
                // refused as one the module refused (dead-lettered; held, or a marker).
                self.refused_by_module(lane, done.events, 0, ErrorCode::BatchTooLarge, format!("alone in its batch: {detail}"))?
            }
            Outcome::TooLarge(detail) => {
                self.stats.failure("batch_too_large");
                let smaller = (done.events.len() / 2).max(1);
                log::warn!("batch_too_large: {detail}; sending at most {smaller} events per batch");
                self.lanes.lane_mut(lane).max_batch = smaller;
                self.lanes.requeue_front(lane, done.events, Instant::now());
            }
            Outcome::Refused { index, code, detail } => self.refused_by_module(lane, done.events, index, code, detail)?,
            // The reconcile reads the grants again and holds each stream they no longer
            // cover (`lane_for`); a mirror left with none stops (`no_publish_grant`).
            Outcome::Forbidden(detail) => self.transient("forbidden_stream", &format!("{}: {detail}", self.lanes.lane(lane).stream_id)),
            Outcome::Fatal(error) => return Err(MirrorError::Server(error)),
        }
        Ok(())
    }

    /// The module refused event `index` of a batch: publish the ones before it, dead-letter
    /// it, and hold the stream or put a marker in its place.
    fn refused_by_module(&mut self, lane: usize, mut events: Vec<Event>, index: usize, code: ErrorCode, detail: String) -> Result<()> {
        if index >= events.len() {
            return Err(MirrorError::Internal(format!("the module refused event {index} of a batch of {}: {detail}", events.len())));
        }
        self.stats.failure(code.name());
        let suffix = events.split_off(index + 1);
        let bad = events.pop().expect("index is in range");
        let record = Bad { reason: code.name(), detail: detail.clone(), topic: Some(bad.topic.to_string()), stream_id: Some(bad.stream_id.to_string()), seq: Some(bad.seq) };
        if self.dead.write(bad.origin, &record, &bad.to_json_line())? {
            self.stats.dead_lettered();
        }
        let now = Instant::now();
        // A marker refused in its turn would only be replaced by another: hold instead.
        let on_gap = if bad.kind == GAP_KIND { OnGap::Hold } else { self.settings.on_gap };
        match on_gap {
            OnGap::Hold => {
                self.lanes.drop_queue(lane);
                self.lanes.lane_mut(lane).next = bad.seq;
                self.lanes.requeue_front(lane, events, now);
                self.hold(lane, format!("the module refused seq {} ({}): {detail}", bad.seq, origin_text(bad.origin)));
            }
            OnGap::Skip => {
                events.push(Event::gap_marker(&bad.stream_id, &bad.topic, bad.seq, code.name(), bad.origin));
                events.extend(suffix);
                self.lanes.requeue_front(lane, events, now);
            }
        }
        Ok(())
    }

    /// The mirror holds the least power it needs: a publisher identity, never the owner
    /// (who could replace the module or read every row), unless `--allow-owner`.
    fn refuse_owner(&self) -> Result<()> {
        let Some(me) = crate::api::token_identity(&self.token) else {
            return Ok(());
        };
        let owner = self.api.database_owner(&self.database).map_err(MirrorError::Server)?;
        if owner == me {
            return Err(MirrorError::OwnerToken { identity: me });
        }
        Ok(())
    }

    /// The identity's live publish grants (none at all is a misconfigured mirror: a
    /// rotated-out or never-granted identity, which the reconcile stops on).
    fn read_reach(&self) -> Result<crate::inspect::PublishReach, ToolError> {
        let Some(me) = crate::api::token_identity(&self.token) else {
            return Ok(crate::inspect::PublishReach::default());
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        crate::inspect::publish_reach(&self.api, &self.database, &self.token, &me, now)
    }

    /// Checks the duplicates waiting on each lane against the module's segments, when a
    /// lane has [`CHECK_BATCH`] of them, when the oldest has waited [`CHECK_WAIT`], or when
    /// the input is drained.
    fn check_duplicates(&mut self) -> Result<()> {
        let Some(since) = self.checks_since else { return Ok(()) };
        let all_due = since.elapsed() >= CHECK_WAIT || self.source_ended || self.stopping_since.is_some();
        for (lane, waiting) in self.checks.waiting() {
            if all_due || waiting >= CHECK_BATCH {
                self.check_lane(lane)?;
                if self.need_reconcile {
                    return Ok(());
                }
            }
        }
        if self.checks.is_empty() {
            self.checks_since = None;
        } else if all_due {
            // What is left waits for its batch to commit; start a new wait for it.
            self.checks_since = Some(Instant::now());
        }
        Ok(())
    }

    fn check_lane(&mut self, lane: usize) -> Result<()> {
        let expected = self.checks.ready(lane);
        let (Some(from), Some(to)) = (expected.iter().map(|f| f.seq).min(), expected.iter().map(|f| f.seq).max()) else {
            return Ok(());
        };
        let stream_id = self.lanes.lane(lane).stream_id.clone();
        let module = match self.module_range(&stream_id, from, to) {
            Ok(module) => module,
            Err(MirrorError::Server(e)) if transient(&e) => {
                self.transient("unavailable", &e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let verdict = verify::compare(&expected, &module);
        self.stats.verified(verdict.agreed as u64, verdict.below_floor, verdict.behind_markers);
        if let Some(ticket) = self.checks.settle(lane, verdict.agreed) {
            self.durability.verified(lane, ticket);
        }
        match verdict.stop {
            None => {}
            Some(Stop::Missing { seq }) => {
                log::warn!("{stream_id}: the module no longer holds seq {seq}: a server crash lost commits; reconciling");
                self.need_reconcile = true;
            }
            Some(Stop::Diverged(d)) => {
                let what = format!("stream={stream_id} {}", d.fields());
                log::error!("authority_divergence: {what}");
                self.stats.diverged(what.clone());
                match self.settings.on_divergence {
                    OnDivergence::Fail => return Err(MirrorError::AuthorityDivergence { stream: stream_id, fields: d.fields() }),
                    OnDivergence::Hold => {
                        // Nothing more goes onto a log that is not the authority's.
                        self.checks.abandon(lane);
                        self.lanes.drop_queue(lane);
                        self.hold(lane, format!("authority_divergence: {what}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The module's events of `stream_id` in `from..=to`, with its floor and head.
    fn module_range(&self, stream_id: &str, from: u64, to: u64) -> Result<ModuleRange> {
        let Some(stream) = crate::inspect::stream(&self.api, &self.database, &self.token, stream_id).map_err(MirrorError::Server)? else {
            return Ok(ModuleRange::default());
        };
        let mut range = ModuleRange { events: Default::default(), own_markers: Default::default(), oldest_seq: stream.oldest_seq, head_seq: stream.head_seq };
        let me = crate::api::token_identity(&self.token);
        for seg in crate::inspect::segments(&self.api, &self.database, &self.token, stream_id, from, to).map_err(MirrorError::Server)? {
            let events = khala_proto::segment::decode(&seg.data)
                .map_err(|e| MirrorError::Internal(format!("a segment of {stream_id} at seq {} does not decode: {e}", seg.first_seq)))?;
            let mine = me.as_deref().is_some_and(|me| seg.publisher.eq_ignore_ascii_case(me));
            for event in events.iter().filter(|e| (from..=to).contains(&e.seq)) {
                if mine && event.kind == GAP_KIND {
                    range.own_markers.insert(event.seq);
                }
                range.events.insert(event.seq, Fingerprint::of_segment_event(event));
            }
        }
        Ok(range)
    }

    /// Reads the heads when an acknowledgement is old enough to be confirmed durable.
    fn check_heads(&mut self) -> Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_check) < CHECK_EVERY || !self.durability.check_due(now) {
            return Ok(());
        }
        self.last_check = now;
        let heads = match self.read_heads() {
            Ok(heads) => heads,
            Err(e) if transient(&e) => {
                self.transient("unavailable", &e.to_string());
                return Ok(());
            }
            Err(e) => return Err(MirrorError::Server(e)),
        };
        let mut hidden = None;
        for (lane, state) in self.lanes.iter() {
            let head = heads.get(&state.stream_id).copied();
            if let Observation::Lost { acked, head: now_at } = self.durability.observe(lane, head.unwrap_or(0), now) {
                if head.is_none() {
                    hidden = Some(state.stream_id.clone());
                }
                log::warn!("{}: the module's head is {now_at} but seq {acked} was acknowledged: a server crash lost commits; republishing", state.stream_id);
                self.stats.lost(acked - now_at);
                self.need_reconcile = true;
            }
        }
        match hidden {
            Some(stream) => {
                self.hidden_strikes += 1;
                if self.hidden_strikes >= HIDDEN_STRIKES {
                    return Err(MirrorError::HeadsHidden { stream });
                }
            }
            None => self.hidden_strikes = 0,
        }
        Ok(())
    }

    /// Moves the durable cursor and writes it (at most every [`PERSIST_EVERY`] unless
    /// `force`), after making the dead letters it passes durable. A Postgres failure is
    /// transient, except when forced (at the end, where it must not pass for success).
    fn persist(&mut self, force: bool) -> Result<()> {
        if self.durability.advance().is_some() {
            self.cursor_dirty = true;
        }
        if !self.cursor_dirty || (!force && self.last_persist.elapsed() < PERSIST_EVERY) {
            return Ok(());
        }
        self.dead.sync()?;
        match self.source.persist(self.durability.cursor()) {
            Ok(()) => {
                self.cursor_dirty = false;
                self.last_persist = Instant::now();
                Ok(())
            }
            Err(e @ MirrorError::Postgres { .. }) if !force => {
                self.transient("postgres", &e.to_string());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn report_progress(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_gauges) >= Duration::from_millis(250) {
            self.last_gauges = now;
            let durable = self.durability.cursor();
            let lag = self.source.head().saturating_sub(durable.line);
            self.stats.gauges(self.durability.pending(), lag, self.lanes.held().len(), durable);
            if let Some(size) = self.source.size() {
                self.progress.set_length(size);
                self.progress.set_position(durable.offset.min(size));
            }
            self.progress.set_message(format!("read {} · published {} · durable {}", self.stats.read, self.stats.published, durable.line));
        }
        if now.duration_since(self.last_progress_log) >= Duration::from_secs(10) {
            self.last_progress_log = now;
            log::info!("read {} · published {} · durable through line {}", self.stats.read, self.stats.published, self.durability.cursor().line);
        }
    }
}

//! What the scheduled sweeps (retention, compaction) share: a budget per run, a bounded
//! walk over one stream's segments, the order in which a run visits streams, and the
//! private tables that carry what a run learnt over to the next one.
//!
//! Why each piece exists (docs/SEGMENTS.md, "Sweeps"):
//! - [`Budget`]: a run stops loading segments once it has loaded a number of segments,
//!   events or bytes of `data`, so a stream of large events cannot make a run hold more
//!   than the budget plus one segment, and a run always makes progress (it loads at
//!   least one segment however large).
//! - [`walk`]: an index scan makes the engine serialise every row in its range before
//!   the module reads the first one, so `filter((stream, from..))` costs the whole rest
//!   of the stream however early the module stops. `walk` asks for `scan_window` seqs at
//!   a time instead, which bounds what the engine prepares per request.
//! - [`in_turn`], [`Turns`] and `sweep_state`: each run starts after the last stream
//!   the previous run finished with and wraps around, so every stream gets its turn, and
//!   a stream with a large backlog takes at most one budget before the others go.
//! - `stream_sweep`: per stream, what makes a visit free when there is nothing to do
//!   (the oldest segment is not expired yet; only an unchanged trailing run is left; the
//!   next segment is still too young to compact).
//! - `sweep_pending`, `retention_wake`, `compaction_wake`: which streams a run must look
//!   at, so that a run reads the streams that may have work instead of every stream. A
//!   change to a stream (a publish, a new policy) makes it pending ([`mark_changed`]); a
//!   visit clears it, and may leave a wake-up for when time alone brings work: its
//!   oldest segment expiring by age, its youngest segments becoming old enough to merge
//!   (`visited`).

use crate::config::config;
use crate::streams::{stream, stream_segment, Stream, StreamSegment};
use crate::{fail, ReducerResult};
use khala_proto::ErrorCode;
use spacetimedb::{reducer, table, ReducerContext, ScheduleAt, Table, Timestamp};
use std::time::Duration;

/// The furthest ahead a wake-up is scheduled: the engine refuses to schedule further than
/// about 795 days ahead, and a refused insert would fail every run. A visit at this
/// horizon looks again and sets the next one.
pub const MAX_WAKE_AHEAD: Duration = Duration::from_secs(30 * 24 * 3600);

/// Seqs per index request of [`walk`] come from this many bytes of payload at the
/// current `max_payload_bytes` (32 seqs at the default 256 KiB).
pub const SCAN_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Bounds on seqs per index request, whatever the payload limit.
pub const SCAN_WINDOW_MIN: u64 = 16;
pub const SCAN_WINDOW_MAX: u64 = 4_096;

/// One private row per sweep: where its next run starts, and what its runs have loaded
/// (for operators and the tests). Written only by a run that loaded something or moved
/// the cursor, so an idle sweep writes nothing.
#[table(name = sweep_state)]
#[derive(Clone, PartialEq)]
pub struct SweepState {
    /// `Sweep as u8`: 0 retention, 1 compaction.
    #[primary_key]
    pub sweep: u8,
    /// The next run starts after this stream id.
    pub resume_after: String,
    /// Runs that loaded at least one segment, and what they loaded in all.
    pub loading_runs: u64,
    pub segments_loaded: u64,
    pub bytes_loaded: u64,
    /// The most one run has loaded.
    pub max_run_segments: u64,
    pub max_run_bytes: u64,
}

impl SweepState {
    fn read(ctx: &ReducerContext, sweep: Sweep) -> Option<Self> {
        ctx.db.sweep_state().sweep().find(sweep as u8)
    }

    fn start(sweep: Sweep) -> Self {
        SweepState {
            sweep: sweep as u8,
            resume_after: String::new(),
            loading_runs: 0,
            segments_loaded: 0,
            bytes_loaded: 0,
            max_run_segments: 0,
            max_run_bytes: 0,
        }
    }
}

/// What the sweeps learnt about one stream when they last looked, for its `epoch` only.
/// Private. Every field is a hint that lets a visit skip reading segments; a stale hint
/// only makes a visit read what it would have read without it.
#[table(name = stream_sweep)]
#[derive(Clone, PartialEq)]
pub struct StreamSweep {
    #[primary_key]
    pub stream_id: String,
    pub epoch: u32,
    /// Retention: the oldest segment as last seen, when it was not expired yet. Valid
    /// while it is still the oldest (`oldest_first_seq == stream.oldest_seq`); a merge
    /// only makes the real segment end later and be published later, so the hint can
    /// only claim expiry too early, never too late. 0 = unknown.
    pub oldest_first_seq: u64,
    pub oldest_last_seq: u64,
    pub oldest_published_at: Timestamp,
    /// Compaction: `head_seq` when compaction had examined every segment up to it and
    /// left only a trailing small run that cannot change until the head moves. 0 = unknown.
    pub compact_seen_head: u64,
    /// Compaction: `published_at` of the first segment it found too young to merge;
    /// nothing after it is older. `UNIX_EPOCH` = none.
    pub compact_young_at: Timestamp,
}

impl StreamSweep {
    fn empty(stream: &Stream) -> Self {
        StreamSweep {
            stream_id: stream.stream_id.clone(),
            epoch: stream.epoch,
            oldest_first_seq: 0,
            oldest_last_seq: 0,
            oldest_published_at: Timestamp::UNIX_EPOCH,
            compact_seen_head: 0,
            compact_young_at: Timestamp::UNIX_EPOCH,
        }
    }
}

/// How many streams each sweep's runs have looked at, for operators and the tests: the
/// runs of an idle database look at none. Written only by a run that looked at a stream.
/// Private.
#[table(name = sweep_visits)]
pub struct SweepVisits {
    /// `Sweep as u8`.
    #[primary_key]
    pub sweep: u8,
    /// Runs that looked at at least one stream.
    pub visiting_runs: u64,
    /// Streams looked at, over all runs (a stream counts once per run).
    pub visits: u64,
}

/// Which sweep a `sweep_state`, `sweep_seeded` or `sweep_visits` row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    Retention = 0,
    Compaction = 1,
}

/// The streams that a sweep must look at on its next run. Private. A publish (or a new
/// policy) sets the flags of the sweeps that could now have work on the stream; a visit
/// clears its own flag unless the stream needs another visit soon; a row with neither
/// flag goes. Runs read this table, not every stream: reading every `stream` and
/// `stream_sweep` row each second cost 25-50 ms a run at 10,000 idle streams.
///
/// Keyed by stream id alone, on purpose: a non-unique index in SpacetimeDB 1.2 keeps
/// every key it has ever held (its multimap does not drop a key whose last row is
/// deleted), so an index on a time that moves would grow for ever and slow every scan.
#[table(name = sweep_pending)]
#[derive(Clone, PartialEq)]
pub struct SweepPending {
    #[primary_key]
    pub stream_id: String,
    pub retention: bool,
    pub compaction: bool,
}

impl SweepPending {
    fn flag(&self, sweep: Sweep) -> bool {
        match sweep {
            Sweep::Retention => self.retention,
            Sweep::Compaction => self.compaction,
        }
    }

    fn with(mut self, sweep: Sweep, on: bool) -> Self {
        match sweep {
            Sweep::Retention => self.retention = on,
            Sweep::Compaction => self.compaction = on,
        }
        self
    }
}

/// A one-shot wake-up for the retention sweep: when a stream's oldest segment expires by
/// age, with no publish to make the stream pending before then. The engine's scheduler
/// is the time index. At most one per stream (`stream_id` is unique). Private.
#[table(name = retention_wake, scheduled(wake_retention))]
pub struct RetentionWake {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
    #[unique]
    pub stream_id: String,
}

/// A one-shot wake-up for the compaction sweep: when a stream's youngest unmerged
/// segments become old enough to merge (`compact_min_age_secs`), with no publish to make
/// the stream pending before then. At most one per stream. Private.
#[table(name = compaction_wake, scheduled(wake_compaction))]
pub struct CompactionWake {
    #[primary_key]
    #[auto_inc]
    pub scheduled_id: u64,
    pub scheduled_at: ScheduleAt,
    #[unique]
    pub stream_id: String,
}

/// The sweeps that have made every stream pending once. A database made before
/// `sweep_pending` existed has no row here, so its first run of each sweep makes every
/// stream pending (what every run used to read). Key 2 records that every stream's
/// `stream_view` was written once (`stream_view::seed_once`). Private.
#[table(name = sweep_seeded)]
pub struct SweepSeeded {
    #[primary_key]
    pub sweep: u8,
    pub at: Timestamp,
}

/// A fresh database has no streams to seed: both sweeps start seeded.
pub fn init(ctx: &ReducerContext) {
    for sweep in [Sweep::Retention, Sweep::Compaction] {
        ctx.db.sweep_seeded().insert(SweepSeeded { sweep: sweep as u8, at: ctx.timestamp });
    }
}

/// `stream` has changed (new events, a new policy): each sweep that could now have work
/// on it looks at it on its next run: retention when the stream has a policy, compaction
/// when it has segments it has not examined. One lookup when either applies, and a write
/// only when a flag was not set already.
pub fn mark_changed(ctx: &ReducerContext, stream: &Stream) {
    let retention = crate::retention::has_policy(stream);
    let compaction = stream.compacted_through < stream.head_seq;
    mark(ctx, &stream.stream_id, retention, compaction);
}

/// Sets the flags asked for on `stream_id`'s pending row (never clears one).
fn mark(ctx: &ReducerContext, stream_id: &str, retention: bool, compaction: bool) {
    if !retention && !compaction {
        return;
    }
    let pending = ctx.db.sweep_pending();
    match pending.stream_id().find(stream_id.to_string()) {
        Some(row) if (row.retention || !retention) && (row.compaction || !compaction) => {}
        Some(row) => {
            let (retention, compaction) = (row.retention || retention, row.compaction || compaction);
            pending.stream_id().update(SweepPending { retention, compaction, ..row });
        }
        None => {
            pending.insert(SweepPending { stream_id: stream_id.to_string(), retention, compaction });
        }
    }
}

/// The streams pending for `sweep`. The first run on a database not yet seeded makes
/// every stream pending first.
fn pending(ctx: &ReducerContext, sweep: Sweep) -> Vec<SweepPending> {
    if ctx.db.sweep_seeded().sweep().find(sweep as u8).is_none() {
        for s in ctx.db.stream().iter() {
            mark(ctx, &s.stream_id, sweep == Sweep::Retention, sweep == Sweep::Compaction);
        }
        log::info!("sweep {sweep:?}: every stream made pending once");
        ctx.db.sweep_seeded().insert(SweepSeeded { sweep: sweep as u8, at: ctx.timestamp });
    }
    ctx.db.sweep_pending().iter().filter(|p| p.flag(sweep)).collect()
}

/// What a visit leaves for the stream's next visit by the same sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the stream changes.
    OnChange,
    /// Look again on the next run (compaction, while a stream still being published has
    /// segments too young to merge).
    NextRun,
    /// Look again when this time comes, or when the stream changes before (retention:
    /// when the oldest segment expires by age; compaction: when the segments too young
    /// to merge are old enough). See [`wake_time`].
    At(Timestamp),
}

/// When a sweep should look again at something that comes due `after` past `since`:
/// at most [`MAX_WAKE_AHEAD`] from `now`.
pub fn wake_time(since: Timestamp, after: Duration, now: Timestamp) -> Timestamp {
    let micros = |t: Timestamp| t.to_micros_since_unix_epoch();
    let after = i64::try_from(after.as_micros()).unwrap_or(i64::MAX);
    let horizon = micros(now).saturating_add(MAX_WAKE_AHEAD.as_micros() as i64);
    Timestamp::from_micros_since_unix_epoch(micros(since).saturating_add(after).min(horizon))
}

/// A visit of `sweep` to `row`'s stream is over.
fn visited(ctx: &ReducerContext, sweep: Sweep, row: &SweepPending, next: Next) {
    if next == Next::NextRun {
        return;
    }
    if let Next::At(at) = next {
        wake_at(ctx, sweep, &row.stream_id, at);
    }
    let cleared = row.clone().with(sweep, false);
    if !cleared.retention && !cleared.compaction {
        ctx.db.sweep_pending().stream_id().delete(&row.stream_id);
    } else {
        ctx.db.sweep_pending().stream_id().update(cleared);
    }
}

/// Makes sure `sweep` looks at `stream_id` by `at`: keeps a wake-up due no later, else
/// replaces it.
fn wake_at(ctx: &ReducerContext, sweep: Sweep, stream_id: &str, at: Timestamp) {
    let id = stream_id.to_string();
    let existing = match sweep {
        Sweep::Retention => ctx.db.retention_wake().stream_id().find(&id).map(|w| w.scheduled_at),
        Sweep::Compaction => ctx.db.compaction_wake().stream_id().find(&id).map(|w| w.scheduled_at),
    };
    if matches!(existing, Some(ScheduleAt::Time(t)) if t <= at) {
        return;
    }
    let scheduled_at = ScheduleAt::Time(at);
    match sweep {
        Sweep::Retention => {
            ctx.db.retention_wake().stream_id().delete(&id);
            ctx.db.retention_wake().insert(RetentionWake { scheduled_id: 0, scheduled_at, stream_id: id });
        }
        Sweep::Compaction => {
            ctx.db.compaction_wake().stream_id().delete(&id);
            ctx.db.compaction_wake().insert(CompactionWake { scheduled_id: 0, scheduled_at, stream_id: id });
        }
    }
}

/// A stream's oldest segment has expired by age: retention looks at it on its next run.
/// Only the scheduler may call it.
#[reducer]
pub fn wake_retention(ctx: &ReducerContext, wake: RetentionWake) -> ReducerResult {
    woken(ctx, Sweep::Retention, &wake.stream_id)
}

/// A stream's youngest unmerged segments are old enough to merge: compaction looks at it
/// on its next run. Only the scheduler may call it.
#[reducer]
pub fn wake_compaction(ctx: &ReducerContext, wake: CompactionWake) -> ReducerResult {
    woken(ctx, Sweep::Compaction, &wake.stream_id)
}

fn woken(ctx: &ReducerContext, sweep: Sweep, stream_id: &str) -> ReducerResult {
    if ctx.sender != ctx.identity() {
        let name = match sweep {
            Sweep::Retention => "wake_retention",
            Sweep::Compaction => "wake_compaction",
        };
        return Err(fail(ErrorCode::Unauthorized, format!("{name} is run by the scheduler only")));
    }
    if ctx.db.stream().stream_id().find(stream_id.to_string()).is_some() {
        mark(ctx, stream_id, sweep == Sweep::Retention, sweep == Sweep::Compaction);
    }
    Ok(())
}

/// A shorter `compact_min_age_secs` may bring wake-ups set under the old one forward:
/// compaction's next run looks at every stream once (as a database made before
/// `sweep_pending` does).
pub fn reseed_compaction(ctx: &ReducerContext) {
    ctx.db.sweep_seeded().sweep().delete(Sweep::Compaction as u8);
}

/// How much one run may load: segments, events and bytes of `data`. A run checks for
/// room before it loads a segment, so it holds at most the budget plus one segment, and
/// the first segment of a run always loads.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    segments: u64,
    events: u64,
    bytes: u64,
    used_segments: u64,
    used_events: u64,
    used_bytes: u64,
}

impl Budget {
    pub const fn new(segments: u64, events: u64, bytes: u64) -> Self {
        Budget { segments, events, bytes, used_segments: 0, used_events: 0, used_bytes: 0 }
    }

    pub fn has_room(&self) -> bool {
        self.used_segments < self.segments && self.used_events < self.events && self.used_bytes < self.bytes
    }

    fn charge(&mut self, seg: &StreamSegment) {
        self.used_segments += 1;
        self.used_events += seg.last_seq.saturating_sub(seg.first_seq) + 1;
        self.used_bytes += seg.data.len() as u64;
    }

    /// Segments, events and bytes loaded so far.
    pub fn used(&self) -> (u64, u64, u64) {
        (self.used_segments, self.used_events, self.used_bytes)
    }
}

/// How a [`walk`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Every segment up to `to_seq` was visited.
    End,
    /// The visitor asked to stop.
    Stopped,
    /// The budget ran out first; segments may remain.
    OutOfBudget,
}

/// Seqs per index request: enough for [`SCAN_WINDOW_BYTES`] of payload at the current
/// limit. The engine prepares at most the segments that end in one window: those that
/// lie wholly inside it (at most that many events of at most `max_payload_bytes` each)
/// and the one segment that began before it.
fn scan_window(ctx: &ReducerContext) -> u64 {
    let max_payload = u64::from(config(ctx).max_payload_bytes).max(1);
    (SCAN_WINDOW_BYTES / max_payload).clamp(SCAN_WINDOW_MIN, SCAN_WINDOW_MAX)
}

/// Visits `stream_id`'s segments in seq order, from the one that holds `from_seq` to the
/// one that ends at or before `to_seq`, loading each through `budget`; `visit` returns
/// whether to go on. Segments are contiguous, so the one that holds a seq is the first
/// that ends at or after it, and each segment ends in exactly one window.
pub fn walk(
    ctx: &ReducerContext,
    stream_id: &str,
    from_seq: u64,
    to_seq: u64,
    budget: &mut Budget,
    mut visit: impl FnMut(StreamSegment) -> bool,
) -> Walk {
    let window = scan_window(ctx);
    let mut lo = from_seq;
    while lo <= to_seq {
        let hi = lo.saturating_add(window - 1).min(to_seq);
        let mut rows = ctx.db.stream_segment().by_stream_last().filter((stream_id, lo..=hi));
        loop {
            if !budget.has_room() {
                return Walk::OutOfBudget;
            }
            let Some(seg) = rows.next() else { break };
            budget.charge(&seg);
            let last_seq = seg.last_seq;
            if !visit(seg) {
                return Walk::Stopped;
            }
            if last_seq >= to_seq {
                return Walk::End;
            }
        }
        if hi == to_seq {
            break;
        }
        lo = hi + 1;
    }
    Walk::End
}

/// One run of `sweep`: visits the pending streams in turn while `budget` lasts. `visit`
/// returns how its walk ended and what the stream's next visit waits for; a stream the
/// budget cut off stays pending, and the next run starts with it ([`Turns`]). Stores where
/// the next run starts and what this one loaded.
pub fn run(ctx: &ReducerContext, sweep: Sweep, budget: &mut Budget, mut visit: impl FnMut(&SweepPending, &mut Budget) -> (Walk, Next)) {
    let mut turns = Turns::default();
    for row in in_turn(ctx, sweep, pending(ctx, sweep)) {
        if !budget.has_room() {
            break;
        }
        let (walk, next) = visit(&row, budget);
        if walk == Walk::OutOfBudget {
            turns.cut_off(&row.stream_id);
            break;
        }
        visited(ctx, sweep, &row, next);
        turns.done(&row.stream_id);
    }
    turns.save(ctx, sweep, budget);
}

/// The streams pending, in the order this run of `sweep` visits them: by stream id,
/// starting after the stream the previous run recorded ([`Turns`]), wrapping around.
fn in_turn(ctx: &ReducerContext, sweep: Sweep, mut pending: Vec<SweepPending>) -> Vec<SweepPending> {
    let after = SweepState::read(ctx, sweep).map(|s| s.resume_after).unwrap_or_default();
    pending.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
    let start = pending.partition_point(|p| p.stream_id <= after);
    pending.rotate_left(start);
    pending
}

/// Which streams a run has visited, to choose where the next run starts.
///
/// The next run starts after the last stream this run finished with. A stream the budget
/// cut off after other streams had used part of it has not had a fair turn, so the next
/// run starts with it, and it gets a whole budget; a stream cut off while it had the
/// whole budget has had its turn, so a stream with a large backlog takes one budget and
/// then lets the others go first.
#[derive(Default)]
struct Turns {
    last_done: Option<String>,
    /// Streams this run looked at, whatever it found.
    visits: u64,
}

impl Turns {
    /// `stream_id` has had its turn.
    fn done(&mut self, stream_id: &str) {
        self.visits += 1;
        self.last_done = Some(stream_id.to_string());
    }

    /// The budget ran out during `stream_id`'s turn.
    fn cut_off(&mut self, stream_id: &str) {
        self.visits += 1;
        if self.last_done.is_none() {
            self.last_done = Some(stream_id.to_string());
        }
    }

    /// Stores where the next run of `sweep` starts, what this run loaded and how many
    /// streams it looked at.
    fn save(self, ctx: &ReducerContext, sweep: Sweep, budget: &Budget) {
        if self.visits > 0 {
            let visits = ctx.db.sweep_visits();
            match visits.sweep().find(sweep as u8) {
                Some(row) => {
                    visits.sweep().update(SweepVisits { visiting_runs: row.visiting_runs + 1, visits: row.visits + self.visits, ..row });
                }
                None => {
                    visits.insert(SweepVisits { sweep: sweep as u8, visiting_runs: 1, visits: self.visits });
                }
            }
        }
        let existing = SweepState::read(ctx, sweep);
        let mut row = existing.clone().unwrap_or_else(|| SweepState::start(sweep));
        if let Some(last) = self.last_done {
            row.resume_after = last;
        }
        let (segments, _, bytes) = budget.used();
        if segments > 0 {
            row.loading_runs += 1;
            row.segments_loaded += segments;
            row.bytes_loaded += bytes;
            row.max_run_segments = row.max_run_segments.max(segments);
            row.max_run_bytes = row.max_run_bytes.max(bytes);
        }
        match existing {
            Some(old) if old == row => {}
            Some(_) => {
                ctx.db.sweep_state().sweep().update(row);
            }
            None => {
                ctx.db.sweep_state().insert(row);
            }
        }
    }
}

/// `stream`'s hints as stored (if any), and as they stand for its epoch (empty ones if
/// none were stored for it).
pub fn hint_for(ctx: &ReducerContext, stream: &Stream) -> (Option<StreamSweep>, StreamSweep) {
    let stored = ctx.db.stream_sweep().stream_id().find(&stream.stream_id);
    let hint = match &stored {
        Some(h) if h.epoch == stream.epoch => h.clone(),
        _ => StreamSweep::empty(stream),
    };
    (stored, hint)
}

/// Stores `hint` if it differs from `stored` (no write when nothing changed).
pub fn save_hint(ctx: &ReducerContext, stored: Option<&StreamSweep>, hint: StreamSweep) {
    match stored {
        Some(old) if *old == hint => {}
        Some(_) => {
            ctx.db.stream_sweep().stream_id().update(hint);
        }
        None => {
            ctx.db.stream_sweep().insert(hint);
        }
    }
}

/// Drops what the sweeps know and have planned for a stream (its history is starting
/// over; its next publish makes it pending again).
pub fn forget(ctx: &ReducerContext, stream_id: &str) {
    ctx.db.stream_sweep().stream_id().delete(stream_id.to_string());
    ctx.db.sweep_pending().stream_id().delete(stream_id.to_string());
    ctx.db.retention_wake().stream_id().delete(stream_id.to_string());
    ctx.db.compaction_wake().stream_id().delete(stream_id.to_string());
}

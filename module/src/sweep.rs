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
//! - `sweep_due`: per stream and sweep, when the sweep must look at it next, so that a
//!   run reads the streams that may have work instead of every stream. A change to a
//!   stream (a publish, a new policy) makes it due now ([`mark_changed`]); a visit makes
//!   it due at the next time it knows of, or not at all when only a change can give it
//!   work ([`visited`]).

use crate::config::config;
use crate::streams::{stream, stream_segment, Stream, StreamSegment};
use spacetimedb::{table, ReducerContext, Table, Timestamp};
use std::collections::HashMap;
use std::time::Duration;

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

/// Which sweep a `sweep_state`, `sweep_due` or `sweep_seeded` row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    Retention = 0,
    Compaction = 1,
}

/// When one sweep must next look at one stream. Private. A stream with no row for a
/// sweep has nothing for it until something changes the stream, which makes it due now.
/// Runs read only the rows due (`by_sweep_due`), so an idle stream costs a run nothing:
/// reading every `stream` row each second cost 20-41 ms a run at 10,000 streams.
#[table(name = sweep_due, index(name = by_sweep_due, btree(columns = [sweep, due_at])))]
#[derive(Clone, PartialEq)]
pub struct SweepDue {
    #[primary_key]
    #[auto_inc]
    pub id: u64,
    #[index(btree)]
    pub stream_id: String,
    /// `Sweep as u8`.
    pub sweep: u8,
    /// Microseconds since the Unix epoch (1.2 cannot look a `Timestamp` up in an index).
    pub due_at: i64,
}

/// The sweeps that have made every stream due once. A database made before `sweep_due`
/// existed has no row here, so its first run of each sweep makes every stream due (what
/// every run used to read); `set_compaction` removes compaction's row, since a new
/// minimum age moves every due time compaction has set. Private.
#[table(name = sweep_seeded)]
pub struct SweepSeeded {
    #[primary_key]
    pub sweep: u8,
    pub at: Timestamp,
}

fn micros(at: Timestamp) -> i64 {
    at.to_micros_since_unix_epoch()
}

/// `at` plus `after`, as a due time (saturating: a policy of u64::MAX seconds is "never").
pub fn due_after(at: Timestamp, after: Duration) -> i64 {
    micros(at).saturating_add(i64::try_from(after.as_micros()).unwrap_or(i64::MAX))
}

/// A fresh database has no streams to seed: both sweeps start seeded.
pub fn init(ctx: &ReducerContext) {
    for sweep in [Sweep::Retention, Sweep::Compaction] {
        ctx.db.sweep_seeded().insert(SweepSeeded { sweep: sweep as u8, at: ctx.timestamp });
    }
}

/// Makes the next run of `sweep` look at every stream once.
pub fn reseed(ctx: &ReducerContext, sweep: Sweep) {
    ctx.db.sweep_seeded().sweep().delete(sweep as u8);
}

/// `stream` has changed (new events, a new policy): each sweep that could now have work
/// on it looks at it on its next run. Retention only when the stream has a policy. One
/// index lookup, and a write only when the stream was not due already.
pub fn mark_changed(ctx: &ReducerContext, stream: &Stream) {
    let now = micros(ctx.timestamp);
    let rows: Vec<SweepDue> = ctx.db.sweep_due().stream_id().filter(&stream.stream_id).collect();
    let has_policy = stream.retain_max_events > 0 || stream.retain_max_age_secs > 0;
    for sweep in [Sweep::Compaction, Sweep::Retention] {
        if sweep == Sweep::Retention && !has_policy {
            continue;
        }
        match rows.iter().find(|r| r.sweep == sweep as u8) {
            Some(r) if r.due_at <= now => {}
            Some(r) => {
                ctx.db.sweep_due().id().update(SweepDue { due_at: now, ..r.clone() });
            }
            None => {
                ctx.db.sweep_due().insert(SweepDue { id: 0, stream_id: stream.stream_id.clone(), sweep: sweep as u8, due_at: now });
            }
        }
    }
}

/// The rows of `sweep` due now. The first run on a database not yet seeded makes every
/// stream due first.
pub fn due_now(ctx: &ReducerContext, sweep: Sweep) -> Vec<SweepDue> {
    if ctx.db.sweep_seeded().sweep().find(sweep as u8).is_none() {
        seed(ctx, sweep);
    }
    ctx.db.sweep_due().by_sweep_due().filter((sweep as u8, ..=micros(ctx.timestamp))).collect()
}

/// Makes every stream due now for `sweep`.
fn seed(ctx: &ReducerContext, sweep: Sweep) {
    let now = micros(ctx.timestamp);
    let existing: HashMap<String, SweepDue> =
        ctx.db.sweep_due().by_sweep_due().filter(sweep as u8).map(|r| (r.stream_id.clone(), r)).collect();
    for s in ctx.db.stream().iter() {
        match existing.get(&s.stream_id) {
            Some(r) if r.due_at <= now => {}
            Some(r) => {
                ctx.db.sweep_due().id().update(SweepDue { due_at: now, ..r.clone() });
            }
            None => {
                ctx.db.sweep_due().insert(SweepDue { id: 0, stream_id: s.stream_id, sweep: sweep as u8, due_at: now });
            }
        }
    }
    log::info!("sweep {sweep:?}: every stream made due once");
    ctx.db.sweep_seeded().insert(SweepSeeded { sweep: sweep as u8, at: ctx.timestamp });
}

/// A visit to `due`'s stream is over: it is due again at `next` (microseconds since the
/// Unix epoch), or, with `None`, not until the stream changes.
pub fn visited(ctx: &ReducerContext, due: &SweepDue, next: Option<i64>) {
    match next {
        Some(at) if at == due.due_at => {}
        Some(at) => {
            ctx.db.sweep_due().id().update(SweepDue { due_at: at, ..due.clone() });
        }
        None => {
            ctx.db.sweep_due().id().delete(due.id);
        }
    }
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

/// The streams due, in the order this run of `sweep` visits them: by stream id, starting
/// after the stream the previous run recorded ([`Turns`]), wrapping around.
pub fn in_turn(ctx: &ReducerContext, sweep: Sweep, mut due: Vec<SweepDue>) -> Vec<SweepDue> {
    let after = SweepState::read(ctx, sweep).map(|s| s.resume_after).unwrap_or_default();
    due.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
    let start = due.partition_point(|d| d.stream_id <= after);
    due.rotate_left(start);
    due
}

/// Which streams a run has visited, to choose where the next run starts.
///
/// The next run starts after the last stream this run finished with. A stream the budget
/// cut off after other streams had used part of it has not had a fair turn, so the next
/// run starts with it, and it gets a whole budget; a stream cut off while it had the
/// whole budget has had its turn, so a stream with a large backlog takes one budget and
/// then lets the others go first.
#[derive(Default)]
pub struct Turns {
    last_done: Option<String>,
}

impl Turns {
    /// `stream_id` has had its turn.
    pub fn done(&mut self, stream_id: &str) {
        self.last_done = Some(stream_id.to_string());
    }

    /// The budget ran out during `stream_id`'s turn.
    pub fn cut_off(&mut self, stream_id: &str) {
        if self.last_done.is_none() {
            self.done(stream_id);
        }
    }

    /// Stores where the next run of `sweep` starts and what this run loaded.
    pub fn save(self, ctx: &ReducerContext, sweep: Sweep, budget: &Budget) {
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

/// Drops a stream's hints and due times (its history is starting over; its next publish
/// makes it due again).
pub fn forget(ctx: &ReducerContext, stream_id: &str) {
    ctx.db.stream_sweep().stream_id().delete(stream_id.to_string());
    ctx.db.sweep_due().stream_id().delete(stream_id);
}

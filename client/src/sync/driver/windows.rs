//! Replay windows: which buckets of a stream's segments this client keeps open on the
//! server (see `module/src/windows.rs` for why windows exist at all).

use khala_proto::hash::bucket;
use std::collections::{BTreeSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

/// Window buckets kept open ahead of the one holding the cursor.
pub const PREFETCH_BUCKETS: u64 = 2;
/// Most buckets [`Windows`] wants open at once: the one before the cursor's, the
/// cursor's, and [`PREFETCH_BUCKETS`] after it.
pub const MAX_WANTED: usize = PREFETCH_BUCKETS as usize + 2;
/// No `open_window` for this long after a refused window call.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A window call unanswered for this long is made again (a call the server dropped,
/// e.g. while the module was being republished): without a limit its bucket stayed
/// `opening` (or `closing`) until the connection ended or a gap's reset closed it.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The longest a client keeps the bucket its cursor has just left open before closing it.
///
/// Closing a window makes the server send the bucket's rows back as deletes, evaluated
/// on the database's one thread (about 15 ms for 8,192 one-event segments) and decoded
/// by the client. Every subscriber of a stream leaves a bucket at about the same moment:
/// closed at once, ten subscribers' closes queued one behind the other and held every
/// publish for 300–500 ms (docs/BENCHMARKS.md). Each client waits a delay of its own in
/// `[0, CLOSE_SPREAD)` per bucket ([`close_delay`]), holding at most one bucket more
/// than [`MAX_WANTED`] meanwhile. Only once a stream has followed live for
/// `CLOSE_SPREAD`: one catching up leaves a bucket every few milliseconds, one that has
/// just caught up is in step with no other subscriber, and delayed closes there raised a
/// cold replay's peak memory by about a quarter.
pub const CLOSE_SPREAD: Duration = Duration::from_secs(4);

/// A window call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WindowCall {
    Open(u64),
    Close(u64),
}

impl WindowCall {
    /// The call on `bucket` that opens it (`open`) or closes it.
    pub fn on(bucket: u64, open: bool) -> WindowCall {
        if open {
            WindowCall::Open(bucket)
        } else {
            WindowCall::Close(bucket)
        }
    }
}

/// The windows of one stream, as this client knows them.
#[derive(Debug)]
pub struct Windows {
    /// Buckets open on the server (from this identity's `client_window` rows).
    pub open: BTreeSet<u64>,
    /// Buckets asked for and not confirmed yet.
    pub opening: BTreeSet<u64>,
    /// Buckets asked to close and not confirmed yet.
    pub closing: BTreeSet<u64>,
    /// Buckets this process opened (another process of the same identity may hold
    /// others; it is not ours to close them).
    pub mine: BTreeSet<u64>,
    /// Close every window and reopen, so their rows are delivered again.
    reset: bool,
    /// No `open_window` before this (after a refused call).
    retry_at: Option<Instant>,
    /// The calls not answered yet, in the order sent (the server answers in order), with
    /// when each was sent.
    unanswered: VecDeque<(WindowCall, Instant)>,
    /// Whether windows can be opened at all (the owner sees every row without them).
    pub usable: bool,
    /// Draws this client's close delays ([`close_delay`]).
    seed: u64,
    /// The bucket just behind the wanted ones, and when it may be closed.
    leaving: Option<(u64, Instant)>,
    /// Since when the stream has followed live (plans with `live`), if it does.
    live_since: Option<Instant>,
}

impl Default for Windows {
    fn default() -> Self {
        Windows::new(0)
    }
}

/// How long after the cursor left `bucket` a client with `seed` closes it: a delay in
/// `[0, CLOSE_SPREAD)`, different per seed and per bucket, so that the subscribers of a
/// stream close their windows spread out instead of all at once.
pub fn close_delay(seed: u64, bucket: u64) -> Duration {
    let mut hasher = DefaultHasher::new();
    (seed, bucket).hash(&mut hasher);
    // The top 53 bits as a fraction in [0, 1).
    CLOSE_SPREAD.mul_f64((hasher.finish() >> 11) as f64 / (1u64 << 53) as f64)
}

impl Windows {
    /// The windows of one stream for a client that draws its close delays from `seed`.
    pub fn new(seed: u64) -> Self {
        Windows {
            open: BTreeSet::new(),
            opening: BTreeSet::new(),
            closing: BTreeSet::new(),
            mine: BTreeSet::new(),
            reset: false,
            retry_at: None,
            unanswered: VecDeque::new(),
            usable: true,
            seed,
            leaving: None,
            live_since: None,
        }
    }

    /// Asks for every window to be closed and reopened at the next [`Windows::plan`].
    pub fn reset(&mut self) {
        self.reset = true;
        self.leaving = None;
    }

    /// The connection is gone: its window rows come back with the next subscription,
    /// and calls in flight are lost.
    pub fn disconnected(&mut self) {
        self.open.clear();
        self.opening.clear();
        self.closing.clear();
        self.unanswered.clear();
        self.leaving = None;
        self.live_since = None;
    }

    /// The first unanswered `call` has its answer.
    fn landed(&mut self, call: WindowCall) {
        if let Some(at) = self.unanswered.iter().position(|(c, _)| *c == call) {
            self.unanswered.remove(at);
        }
    }

    fn sent(&mut self, calls: &[WindowCall], now: Instant) {
        self.unanswered.extend(calls.iter().map(|c| (*c, now)));
    }

    /// The calls unanswered for [`ANSWER_WITHIN`] and still waited for, to be made again
    /// (for the log and the connection); they count as sent now. Window calls are idempotent on the server (an
    /// open of a window it holds, or a close of one it does not, changes nothing), so
    /// whether the first one landed or not, the second leaves the window as asked, and
    /// the bucket stays `opening` (or `closing`) until an answer confirms it. Counted as
    /// refused instead, a lost open that landed later, after a reset, left a window open
    /// on the server that this client no longer knew was its own.
    pub fn expire(&mut self, now: Instant) -> Vec<WindowCall> {
        let mut again = Vec::new();
        while let Some(&(call, at)) = self.unanswered.front() {
            if now.saturating_duration_since(at) < ANSWER_WITHIN {
                break;
            }
            self.unanswered.pop_front();
            // Only a call still waited for: an open since overtaken by a close (a reset,
            // a release) made again would land after that close and reopen the window.
            let waited = match call {
                WindowCall::Open(b) => self.opening.contains(&b) && !self.closing.contains(&b),
                WindowCall::Close(b) => self.closing.contains(&b),
            };
            if waited && !again.contains(&call) {
                again.push(call);
            }
        }
        self.sent(&again, now);
        again
    }

    /// The server confirmed bucket `b` open.
    pub fn opened(&mut self, b: u64) {
        self.opening.remove(&b);
        self.open.insert(b);
    }

    /// The server confirmed bucket `b` closed.
    pub fn closed(&mut self, b: u64) {
        if self.closing.remove(&b) {
            self.mine.remove(&b);
        }
        self.open.remove(&b);
    }

    /// The server answered a window call with success. Its row, when the call changed
    /// one, confirms it too; but an open of a window the server already holds (one whose
    /// close was refused, or another process's) and a close of one it no longer holds
    /// (ended by a revoke) change no row, and were never confirmed: the bucket stayed
    /// `opening` or `closing` for the rest of the session.
    pub fn answered(&mut self, call: WindowCall) {
        self.landed(call);
        match call {
            WindowCall::Open(b) if self.opening.contains(&b) => self.opened(b),
            WindowCall::Open(_) => {}
            WindowCall::Close(b) => self.closed(b),
        }
    }

    /// A window call was refused; `owner_sees_all` when the refusal means windows are
    /// not for this client at all (the owner sees the stream without a grant).
    pub fn refused(&mut self, call: WindowCall, now: Instant, owner_sees_all: bool) {
        self.landed(call);
        match call {
            WindowCall::Open(b) => {
                self.opening.remove(&b);
            }
            WindowCall::Close(b) => {
                if self.closing.remove(&b) {
                    // The server still holds it (a close refused as `rate_limited`): it
                    // stays ours, to be closed again or used. Forgotten, it stayed open
                    // on the server and counted against the stream's windows.
                    self.open.insert(b);
                    self.mine.insert(b);
                }
            }
        }
        self.retry_at = Some(now + RETRY_AFTER);
        if owner_sees_all {
            self.usable = false;
        }
    }

    /// Whether the bucket holding `next_seq` and the one after are open (or windows are
    /// not used): then live events arrive without a window move.
    pub fn live(&self, next_seq: u64) -> bool {
        let b0 = bucket(next_seq);
        !self.usable || (self.open.contains(&b0) && self.open.contains(&(b0 + 1)))
    }

    /// The calls that close every window this process opened: the stream waits for a
    /// replay slot ([`super::slots`]). A window still opening is closed too: the server
    /// answers calls in order, so the close follows the open. Afterwards none is ours (one
    /// asked for before a reconnect and never opened is held by no one).
    pub fn release(&mut self, now: Instant) -> Vec<WindowCall> {
        self.live_since = None;
        self.leaving = None;
        let mut calls = Vec::new();
        for b in std::mem::take(&mut self.mine) {
            if (self.open.contains(&b) || self.opening.contains(&b)) && !self.closing.contains(&b) {
                calls.push(WindowCall::Close(b));
                self.closing.insert(b);
            }
        }
        self.sent(&calls, now);
        calls
    }

    /// The calls that keep the windows around `fetch_after`: the bucket holding the next
    /// seq, the one before when `straddle` (it may hold the segment that starts before
    /// it: `StreamEngine::may_straddle`) and
    /// [`PREFETCH_BUCKETS`] after, so replay rarely waits on a round trip and memory stays
    /// bounded by [`MAX_WANTED`] buckets of events. Old windows are closed before new
    /// ones are opened, and at most [`MAX_WANTED`] opens are in flight. Once the stream
    /// has been `live` (following its head, not catching up) for [`CLOSE_SPREAD`], the
    /// bucket just left waits for its [`close_delay`]. The caller checks `usable` and the
    /// grant first.
    pub fn plan(&mut self, fetch_after: u64, straddle: bool, live: bool, now: Instant) -> Vec<WindowCall> {
        self.live_since = if live { Some(self.live_since.unwrap_or(now)) } else { None };
        let mut calls = Vec::new();
        if self.reset {
            // Close, and reopen once closed, so that the rows of every bucket are
            // delivered again; another process's windows are closed and reopened as ours.
            for b in self.open.iter().chain(self.opening.iter()) {
                calls.push(WindowCall::Close(*b));
                self.closing.insert(*b);
            }
            self.open.clear();
            self.opening.clear();
            self.mine.clear();
            self.reset = false;
        }
        if self.retry_at.is_some_and(|t| t > now) {
            self.sent(&calls, now);
            return calls;
        }
        let spread = self.live_since.is_some_and(|t| now.saturating_duration_since(t) >= CLOSE_SPREAD);
        let b0 = bucket(fetch_after + 1);
        let from = if straddle { b0.saturating_sub(1) } else { b0 };
        let want: BTreeSet<u64> = (from..=b0 + PREFETCH_BUCKETS).collect();
        // Closes go first: the server holds at most `MAX_WINDOWS_PER_STREAM` (8) per
        // stream, and a cursor that jumped would otherwise have every old window and
        // every new one open at once. A stream long live enough has the bucket just behind
        // wait for its delay (`CLOSE_SPREAD`); any further behind closes now.
        let behind = from.checked_sub(1);
        for b in self.mine.clone() {
            if !want.contains(&b) && self.open.contains(&b) && !self.closing.contains(&b) {
                if spread && Some(b) == behind && !self.close_due(b, now) {
                    continue;
                }
                if self.leaving.is_some_and(|(leaving, _)| leaving == b) {
                    self.leaving = None;
                }
                calls.push(WindowCall::Close(b));
                self.closing.insert(b);
                self.mine.remove(&b);
            }
        }
        for b in &want {
            // At most MAX_WANTED opens in flight: a cursor that moves faster than the
            // server answers waits for it instead of piling up windows.
            if self.opening.len() >= MAX_WANTED {
                break;
            }
            // A bucket being closed is reopened once the close is confirmed: the server
            // answers calls in order, and a second open in flight would be confirmed
            // by the first one's row.
            if !self.open.contains(b) && !self.opening.contains(b) && !self.closing.contains(b) {
                calls.push(WindowCall::Open(*b));
                self.opening.insert(*b);
                self.mine.insert(*b);
            }
        }
        self.sent(&calls, now);
        calls
    }

    /// Whether bucket `b`, just behind the wanted ones, may be closed at `now`: once its
    /// [`close_delay`] has passed since the first plan that found it behind.
    fn close_due(&mut self, b: u64, now: Instant) -> bool {
        let due = match self.leaving {
            Some((leaving, due)) if leaving == b => due,
            _ => {
                let due = now + close_delay(self.seed, b);
                self.leaving = Some((b, due));
                due
            }
        };
        now >= due
    }
}

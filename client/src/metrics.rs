//! The client's metrics, recorded through the `metrics` facade. The library installs no
//! recorder: an embedding application installs whichever it likes (without one every
//! call here is a no-op), and `khala tail --metrics-addr` installs the Prometheus
//! exporter. Names, labels and meanings are listed in docs/METRICS.md.
//!
//! The sync loop calls these helpers where things happen; per-stream handles are
//! registered once, so applying an event costs a few atomic operations.

use crate::health::state_name;
use khala_proto::v1::{ConnectionState, RebootstrapReason};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use std::collections::BTreeMap;

pub const EVENTS_APPLIED: &str = "khala_client_events_applied_total";
pub const LAG_EVENTS: &str = "khala_client_lag_events";
pub const LAG_SECONDS: &str = "khala_client_lag_seconds";
pub const DELIVERY_LATENCY: &str = "khala_client_delivery_latency_seconds";
pub const REBOOTSTRAPS: &str = "khala_client_rebootstraps_total";
pub const CONNECT_ATTEMPTS: &str = "khala_client_connect_attempts_total";
pub const RECONNECTS: &str = "khala_client_reconnects_total";
pub const AUTH_FAILURES: &str = "khala_client_auth_failures_total";
pub const LEASE_EXPIRIES: &str = "khala_client_lease_expiries_total";
pub const CORRUPT_SEGMENTS: &str = "khala_client_corrupt_segments_total";
pub const STATE: &str = "khala_client_state";
pub const STREAMS: &str = "khala_client_streams";
pub const LEASE_SECONDS_LEFT: &str = "khala_client_lease_seconds_left";
pub const CHECKPOINT_WRITE: &str = "khala_client_checkpoint_write_seconds";

/// Buckets of [`DELIVERY_LATENCY`], in seconds (a recorder that wants buckets must be
/// told them; `khala tail` does).
pub const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets of [`CHECKPOINT_WRITE`], in seconds: a store is one `fdatasync` (well under a
/// millisecond on a quiet disk, tens of milliseconds on a busy one).
pub const CHECKPOINT_WRITE_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Times one checkpoint file write (on the writer thread).
pub fn checkpoint_written(seconds: f64) {
    histogram!(CHECKPOINT_WRITE).record(seconds);
}

/// Received segments remembered per stream for their `published_at`, at most (beyond it
/// the newest are dropped: latency and lag-seconds then miss them, nothing else does).
const MAX_SEGMENTS: usize = 65_536;

/// Every connection state, for gauges that show 0 for the states not taken.
const STATES: [ConnectionState; 11] = [
    ConnectionState::Unspecified,
    ConnectionState::Connecting,
    ConnectionState::Replaying,
    ConnectionState::Live,
    ConnectionState::Backoff,
    ConnectionState::Stale,
    ConnectionState::Unauthorized,
    ConnectionState::UpgradeRequired,
    ConnectionState::ServerBehind,
    ConnectionState::Forbidden,
    ConnectionState::Corrupt,
];

/// The snake_case label of a rebootstrap reason (`stale_cursor`, `chain_mismatch`,
/// `epoch_changed`, `corrupt_checkpoint`).
pub fn reason_name(reason: i32) -> &'static str {
    khala_proto::SnakeName::snake_name(RebootstrapReason::try_from(reason).unwrap_or_default())
}

/// Seconds from `from_micros` to `now_micros`; `None` when `from` is unknown (0) or in
/// the future (clocks of two machines disagree: a negative latency would be a lie).
pub fn seconds_since(from_micros: i64, now_micros: i64) -> Option<f64> {
    (from_micros > 0 && now_micros >= from_micros).then(|| (now_micros - from_micros) as f64 / 1e6)
}

/// The age of the oldest event known and not applied: 0 when caught up; otherwise from
/// the `published_at` of the segment holding the next seq when it has arrived, and at
/// least since the head was first seen past the cursor (`behind_since`).
pub fn lag_seconds(applied: u64, head: u64, oldest_published_micros: Option<i64>, behind_since_micros: i64, now_micros: i64) -> f64 {
    if head <= applied {
        return 0.0;
    }
    let since = oldest_published_micros.filter(|p| *p > 0).map_or(behind_since_micros, |p| p.min(behind_since_micros));
    seconds_since(since, now_micros).unwrap_or(0.0)
}

/// Every reason a rebootstrap is counted under.
const REASONS: [RebootstrapReason; 4] =
    [RebootstrapReason::StaleCursor, RebootstrapReason::ChainMismatch, RebootstrapReason::EpochChanged, RebootstrapReason::CorruptCheckpoint];

/// Registers `stream`'s event counters at 0. A series Prometheus first sees at 1 has no
/// `increase()` (it has nothing to rise from), so without this the first rebootstrap or
/// lease end of every (process, stream) would be invisible to the alert rules, and a
/// storm of clients that each rebuild once would not show at all.
fn register_stream_counters(stream: &str) {
    for reason in REASONS {
        counter!(REBOOTSTRAPS, "stream" => stream.to_string(), "reason" => reason_name(reason as i32)).increment(0);
    }
    counter!(LEASE_EXPIRIES, "stream" => stream.to_string()).increment(0);
    counter!(CORRUPT_SEGMENTS, "stream" => stream.to_string()).increment(0);
}

/// Counts a rebootstrap of `stream`.
fn rebootstrap(stream: &str, reason: i32) {
    counter!(REBOOTSTRAPS, "stream" => stream.to_string(), "reason" => reason_name(reason)).increment(1);
}

/// Counts a refused token (`unauthorized`) or a refused stream call (`forbidden`).
pub fn auth_failure(kind: &'static str) {
    counter!(AUTH_FAILURES, "kind" => kind).increment(1);
}

/// Counts the end of `stream`'s grant (expired or revoked).
pub fn lease_ended(stream: &str) {
    counter!(LEASE_EXPIRIES, "stream" => stream.to_string()).increment(1);
}

/// Counts a segment of `stream` refused because it failed its own chain hashes.
pub fn corrupt_segment(stream: &str) {
    counter!(CORRUPT_SEGMENTS, "stream" => stream.to_string()).increment(1);
}

/// One received segment: where it starts, and when it was published.
#[derive(Debug, Clone, Copy)]
struct SegmentSeen {
    first_seq: u64,
    published_micros: i64,
}

/// The handles and bookkeeping of one stream.
pub(crate) struct StreamMetrics {
    applied: Counter,
    lag_events: Gauge,
    lag_seconds: Gauge,
    lease_left: Gauge,
    /// Segments received and not yet applied past, by `last_seq`.
    segments: BTreeMap<u64, SegmentSeen>,
    /// Since when (micros) the head has been past the cursor.
    behind_since: Option<i64>,
    /// The stream has been live since this process started it or last rebuilt it. Until
    /// then it replays a backlog, which is lag, not delivery latency, and is left out of
    /// the histogram; after it, every event is timed (a catch-up after a disconnect
    /// included: a live client waited for those).
    live: bool,
}

impl StreamMetrics {
    pub fn new(stream: &str) -> Self {
        register_stream_counters(stream);
        let id = stream.to_string();
        StreamMetrics {
            applied: counter!(EVENTS_APPLIED, "stream" => id.clone()),
            lag_events: gauge!(LAG_EVENTS, "stream" => id.clone()),
            lag_seconds: gauge!(LAG_SECONDS, "stream" => id.clone()),
            lease_left: gauge!(LEASE_SECONDS_LEFT, "stream" => id),
            segments: BTreeMap::new(),
            behind_since: None,
            live: false,
        }
    }

    /// A segment arrived.
    pub fn segment(&mut self, first_seq: u64, last_seq: u64, published_micros: i64) {
        if self.segments.len() < MAX_SEGMENTS || self.segments.contains_key(&last_seq) {
            self.segments.insert(last_seq, SegmentSeen { first_seq, published_micros });
        }
    }

    fn holding(&self, seq: u64) -> Option<&SegmentSeen> {
        self.segments.range(seq..).next().map(|(_, s)| s).filter(|s| s.first_seq <= seq)
    }

    /// The handler applied `seq`.
    pub fn applied(&mut self, client: &ClientMetrics, seq: u64, occurred_micros: i64) {
        self.applied.increment(1);
        if self.live {
            let now = crate::sync::now_micros();
            if let Some(secs) = seconds_since(occurred_micros, now) {
                client.latency_occurred.record(secs);
            }
            if let Some(secs) = self.holding(seq).and_then(|s| seconds_since(s.published_micros, now)) {
                client.latency_published.record(secs);
            }
        }
        while self.segments.first_key_value().is_some_and(|(last, _)| *last <= seq) {
            self.segments.pop_first();
        }
    }

    /// The stream restarts from the floor (`reason`: a `RebootstrapReason`).
    pub fn rebootstrap(&mut self, stream: &str, reason: i32) {
        rebootstrap(stream, reason);
        self.live = false;
        // What was remembered belongs to the old history.
        self.segments.clear();
    }

    /// The health update: lag, lease, and whether the stream is live.
    pub fn health(&mut self, applied: u64, head: u64, lease_expires_micros: Option<i64>, state: ConnectionState, now_micros: i64) {
        self.live |= state == ConnectionState::Live;
        self.lag_events.set(head.saturating_sub(applied) as f64);
        let behind_since = if head > applied { *self.behind_since.get_or_insert(now_micros) } else { now_micros };
        if head <= applied {
            self.behind_since = None;
        }
        let oldest = self.holding(applied + 1).map(|s| s.published_micros);
        self.lag_seconds.set(lag_seconds(applied, head, oldest, behind_since, now_micros));
        // No grant held (or none seen yet): 0 seconds left.
        self.lease_left.set(lease_expires_micros.map_or(0.0, |t| ((t - now_micros) as f64 / 1e6).max(0.0)));
    }
}

/// The client-wide handles.
pub(crate) struct ClientMetrics {
    latency_occurred: Histogram,
    latency_published: Histogram,
    connect_attempts: Counter,
    reconnects: Counter,
    state: Vec<(i32, Gauge)>,
    streams: Vec<(i32, Gauge)>,
    /// A session got through its handshake since the last connect attempt.
    had_session: bool,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        let by_state = |name: &'static str| STATES.iter().map(|s| (*s as i32, gauge!(name, "state" => state_name(*s as i32)))).collect();
        // At 0 from the start, for the same reason as `register_stream_counters`.
        for kind in ["unauthorized", "forbidden"] {
            counter!(AUTH_FAILURES, "kind" => kind).increment(0);
        }
        ClientMetrics {
            latency_occurred: histogram!(DELIVERY_LATENCY, "source" => "occurred_at"),
            latency_published: histogram!(DELIVERY_LATENCY, "source" => "published_at"),
            connect_attempts: counter!(CONNECT_ATTEMPTS),
            reconnects: counter!(RECONNECTS),
            state: by_state(STATE),
            streams: by_state(STREAMS),
            had_session: false,
        }
    }
}

impl ClientMetrics {
    /// A connection attempt starts; it is a reconnect when a session was up before it.
    pub fn connect_attempt(&mut self) {
        self.connect_attempts.increment(1);
        if std::mem::take(&mut self.had_session) {
            self.reconnects.increment(1);
        }
    }

    /// The handshake of a session succeeded.
    pub fn session_up(&mut self) {
        self.had_session = true;
    }

    /// The client's overall state: 1 for it, 0 for the others.
    pub fn state(&self, state: i32) {
        for (s, gauge) in &self.state {
            gauge.set(if *s == state { 1.0 } else { 0.0 });
        }
    }

    /// How many streams are in each state.
    pub fn streams(&self, states: impl IntoIterator<Item = i32>) {
        let mut counts = BTreeMap::<i32, u64>::new();
        for s in states {
            *counts.entry(s).or_default() += 1;
        }
        for (s, gauge) in &self.streams {
            gauge.set(counts.get(s).copied().unwrap_or(0) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn lag_seconds_is_zero_when_caught_up_and_the_oldest_age_otherwise() {
        let now = 100_000_000;
        assert_eq!(lag_seconds(10, 10, Some(1), 1, now), 0.0);
        assert_eq!(lag_seconds(11, 10, Some(1), 1, now), 0.0);
        // The segment holding the next seq was published 30 s ago; behind for 2 s.
        assert_eq!(lag_seconds(10, 12, Some(now - 30_000_000), now - 2_000_000, now), 30.0);
        // Not arrived yet: at least since the head was seen past the cursor.
        assert_eq!(lag_seconds(10, 12, None, now - 2_500_000, now), 2.5);
        // A publish time ahead of this clock never makes the lag negative.
        assert_eq!(lag_seconds(10, 12, Some(now + 5_000_000), now, now), 0.0);
    }

    #[test]
    fn latency_needs_a_known_time_in_the_past() {
        assert_eq!(seconds_since(0, 5_000_000), None);
        assert_eq!(seconds_since(6_000_000, 5_000_000), None);
        assert_eq!(seconds_since(4_000_000, 5_500_000), Some(1.5));
    }

    #[test]
    fn reasons_are_snake_case() {
        assert_eq!(reason_name(RebootstrapReason::StaleCursor as i32), "stale_cursor");
        assert_eq!(reason_name(RebootstrapReason::CorruptCheckpoint as i32), "corrupt_checkpoint");
        assert_eq!(reason_name(99), "unspecified");
    }

    /// Values by (name, labels) from a debugging recorder's snapshot.
    fn values(recorder: &DebuggingRecorder) -> BTreeMap<String, DebugValue> {
        recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (_, key) = key.into_parts();
                let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
                (format!("{}{{{}}}", key.name(), labels.join(",")), value)
            })
            .collect()
    }

    #[test]
    fn only_events_applied_after_the_stream_went_live_are_timed() {
        let recorder = DebuggingRecorder::new();
        let snapshot = metrics::with_local_recorder(&recorder, || {
            let client = ClientMetrics::default();
            let mut s = StreamMetrics::new("a");
            let now = crate::sync::now_micros();
            // A replayed backlog: applied before the stream was ever live, not timed.
            s.segment(1, 2, now - 60_000_000);
            s.applied(&client, 1, now - 60_000_000);
            s.applied(&client, 2, now - 60_000_000);
            s.health(2, 3, Some(now + 90_000_000), ConnectionState::Live, now);
            // Live: timed from both clocks; a missing occurred_at (0) is skipped; a later
            // health update that says replaying (a burst) does not stop the timing.
            s.segment(3, 4, now - 1_000);
            s.health(2, 4, Some(now + 90_000_000), ConnectionState::Replaying, now);
            s.applied(&client, 3, now - 2_000);
            s.applied(&client, 4, 0);
            assert!(s.segments.is_empty());
            // A rebootstrap replays from the floor: not timed until live again.
            s.rebootstrap("a", RebootstrapReason::EpochChanged as i32);
            s.segment(1, 1, now - 1_000);
            s.applied(&client, 1, now - 1_000);
            s.health(1, 1, Some(now + 90_000_000), ConnectionState::Live, now);
            client.state(ConnectionState::Live as i32);
            client.streams([ConnectionState::Live as i32, ConnectionState::Live as i32, ConnectionState::Forbidden as i32]);
            values(&recorder)
        });
        assert_eq!(snapshot["khala_client_events_applied_total{stream=a}"], DebugValue::Counter(5));
        assert_eq!(snapshot["khala_client_rebootstraps_total{stream=a,reason=epoch_changed}"], DebugValue::Counter(1));
        // The counters alerts take increase() of exist at 0 before their first event.
        assert_eq!(snapshot["khala_client_rebootstraps_total{stream=a,reason=stale_cursor}"], DebugValue::Counter(0));
        assert_eq!(snapshot["khala_client_lease_expiries_total{stream=a}"], DebugValue::Counter(0));
        assert_eq!(snapshot["khala_client_corrupt_segments_total{stream=a}"], DebugValue::Counter(0));
        assert_eq!(snapshot["khala_client_auth_failures_total{kind=unauthorized}"], DebugValue::Counter(0));
        assert_eq!(snapshot["khala_client_auth_failures_total{kind=forbidden}"], DebugValue::Counter(0));
        let count = |source: &str| match &snapshot[&format!("khala_client_delivery_latency_seconds{{source={source}}}")] {
            DebugValue::Histogram(v) => v.len(),
            other => panic!("{other:?}"),
        };
        assert_eq!((count("occurred_at"), count("published_at")), (1, 2));
        assert_eq!(snapshot["khala_client_lag_events{stream=a}"], DebugValue::Gauge(0.0.into()));
        assert!(matches!(snapshot["khala_client_lease_seconds_left{stream=a}"], DebugValue::Gauge(v) if (89.0..=90.0).contains(&v.into_inner())));
        assert_eq!(snapshot["khala_client_state{state=live}"], DebugValue::Gauge(1.0.into()));
        assert_eq!(snapshot["khala_client_state{state=replaying}"], DebugValue::Gauge(0.0.into()));
        assert_eq!(snapshot["khala_client_streams{state=live}"], DebugValue::Gauge(2.0.into()));
        assert_eq!(snapshot["khala_client_streams{state=forbidden}"], DebugValue::Gauge(1.0.into()));
    }
}

//! What the mirror counts: kept in [`Stats`] for the summary printed on exit, and sent to
//! the `metrics` facade, which `--metrics-addr` exposes as Prometheus text.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `khala_mirror_events_read_total` | counter | records read from the source (re-reads after a rewind included) |
//! | `khala_mirror_published_total` | counter | events in batches the module committed |
//! | `khala_mirror_duplicates_total` | counter | events skipped because the module already held their seq |
//! | `khala_mirror_dead_lettered_total` | counter | records written to the dead-letter file |
//! | `khala_mirror_failures_total{class}` | counter | failed publishes and head reads, by class |
//! | `khala_mirror_reconciles_total` | counter | rewinds to the durable cursor after a failure or loss |
//! | `khala_mirror_lost_total` | counter | acknowledged events found missing after a server crash (then republished) |
//! | `khala_mirror_verified_total` | counter | events the module already held, checked equal to the authority's |
//! | `khala_mirror_divergences_total` | counter | `authority_divergence`: an event the module holds differs from the authority's |
//! | `khala_mirror_spool_depth` | gauge | records read but not yet behind the durable cursor (what a rewind replays) |
//! | `khala_mirror_lag_events` | gauge | source head minus the durable position, in events |
//! | `khala_mirror_held_streams` | gauge | streams held by `--on-gap hold` |
//! | `khala_mirror_durable_position` | gauge | the durable cursor (line or outbox id) |
//! | `khala_mirror_outbox_depth` | gauge | outbox rows past the mirror's cursor (Postgres source only) |
//! | `khala_mirror_outbox_oldest_age_seconds` | gauge | age of the oldest of them, by Postgres' clock (0 when none) |

use super::error::{MirrorError, Result};
use super::source::Mark;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Whether [`serve`] installed the exporter (the outbox watches its backlog only then).
static SERVING: AtomicBool = AtomicBool::new(false);

/// Serves `/metrics` (any path, in fact) as Prometheus text on `addr`.
pub fn serve(addr: SocketAddr) -> Result<()> {
    crate::prometheus::install(addr, None).map_err(MirrorError::Server)?;
    SERVING.store(true, Ordering::Relaxed);
    register_at_zero();
    Ok(())
}

/// Failure classes the alert rules watch, served from the start.
const WATCHED_FAILURE_CLASSES: &[&str] = &["unavailable", "postgres", "sequence_conflict", "batch_too_large", "unauthorized", "forbidden_stream"];

/// Serves every counter at 0 before its first event: Prometheus sees no increase in a
/// series it first scrapes at 1, so a mirror's first divergence or failure would not
/// fire its alert (ops/prometheus/khala.rules.yml).
fn register_at_zero() {
    for name in [
        "khala_mirror_events_read_total",
        "khala_mirror_published_total",
        "khala_mirror_duplicates_total",
        "khala_mirror_dead_lettered_total",
        "khala_mirror_reconciles_total",
        "khala_mirror_lost_total",
        "khala_mirror_verified_total",
        "khala_mirror_divergences_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for class in WATCHED_FAILURE_CLASSES {
        metrics::counter!("khala_mirror_failures_total", "class" => *class).absolute(0);
    }
}

pub fn serving() -> bool {
    SERVING.load(Ordering::Relaxed)
}

/// The Postgres outbox's backlog: rows past the mirror's cursor, and the age of the
/// oldest of them in seconds (0 when there are none).
pub fn outbox_backlog(depth: u64, oldest_age_secs: f64) {
    metrics::gauge!("khala_mirror_outbox_depth").set(depth as f64);
    metrics::gauge!("khala_mirror_outbox_oldest_age_seconds").set(oldest_age_secs);
}

/// The mirror's counters.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    pub read: u64,
    pub published: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub reconciles: u64,
    pub lost: u64,
    pub verified: u64,
    pub below_floor: u64,
    pub behind_markers: u64,
    pub divergences: Vec<String>,
    /// When the module committed the last batch.
    pub last_commit: Option<Instant>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            read: 0,
            published: 0,
            duplicates: 0,
            dead_lettered: 0,
            failures: BTreeMap::new(),
            reconciles: 0,
            lost: 0,
            verified: 0,
            below_floor: 0,
            behind_markers: 0,
            divergences: Vec::new(),
            last_commit: None,
        }
    }
}

impl Stats {
    pub fn read(&mut self, n: u64) {
        self.read += n;
        metrics::counter!("khala_mirror_events_read_total").increment(n);
    }

    pub fn published(&mut self, n: u64, at: Instant) {
        self.published += n;
        self.last_commit = Some(at);
        metrics::counter!("khala_mirror_published_total").increment(n);
    }

    pub fn duplicate(&mut self) {
        self.duplicates += 1;
        metrics::counter!("khala_mirror_duplicates_total").increment(1);
    }

    pub fn dead_lettered(&mut self) {
        self.dead_lettered += 1;
        metrics::counter!("khala_mirror_dead_lettered_total").increment(1);
    }

    pub fn failure(&mut self, class: &'static str) {
        *self.failures.entry(class).or_default() += 1;
        metrics::counter!("khala_mirror_failures_total", "class" => class).increment(1);
    }

    pub fn reconciled(&mut self) {
        self.reconciles += 1;
        metrics::counter!("khala_mirror_reconciles_total").increment(1);
    }

    pub fn lost(&mut self, n: u64) {
        self.lost += n;
        metrics::counter!("khala_mirror_lost_total").increment(n);
    }

    /// Events found equal to the module's (`agreed`), of which `below_floor` could not be
    /// compared because retention had removed them and `behind_markers` stand behind the
    /// mirror's own gap markers.
    pub fn verified(&mut self, agreed: u64, below_floor: u64, behind_markers: u64) {
        let equal = agreed - below_floor - behind_markers;
        self.verified += equal;
        self.below_floor += below_floor;
        self.behind_markers += behind_markers;
        metrics::counter!("khala_mirror_verified_total").increment(equal);
    }

    pub fn diverged(&mut self, what: String) {
        self.divergences.push(what);
        metrics::counter!("khala_mirror_divergences_total").increment(1);
    }

    /// Sets the gauges.
    pub fn gauges(&self, spool_depth: usize, lag: u64, held: usize, durable: Mark) {
        metrics::gauge!("khala_mirror_spool_depth").set(spool_depth as f64);
        metrics::gauge!("khala_mirror_lag_events").set(lag as f64);
        metrics::gauge!("khala_mirror_held_streams").set(held as f64);
        metrics::gauge!("khala_mirror_durable_position").set(durable.line as f64);
    }

    /// The summary at the end of a run.
    pub fn summary(&self, source: String, durable: Mark, held: Vec<(String, String)>, dead_letter_file: String) -> Summary {
        let elapsed = self.started.elapsed();
        let publishing = self.last_commit.map_or(Duration::ZERO, |t| t.duration_since(self.started));
        let rate = |secs: f64| if secs > 0.0 { (self.published as f64 / secs).round() } else { 0.0 };
        Summary {
            source,
            events_read: self.read,
            published: self.published,
            duplicates: self.duplicates,
            dead_lettered: self.dead_lettered,
            dead_letter_file,
            failures: self.failures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            reconciles: self.reconciles,
            lost_and_republished: self.lost,
            verified: self.verified,
            unverifiable_below_floor: self.below_floor,
            behind_gap_markers: self.behind_markers,
            divergences: self.divergences.clone(),
            durable_line: durable.line,
            durable_segment: durable.segment,
            durable_offset: durable.offset,
            held_streams: held.into_iter().map(|(stream, why)| format!("{stream}: {why}")).collect(),
            elapsed_secs: elapsed.as_secs_f64(),
            publish_secs: publishing.as_secs_f64(),
            events_per_sec: rate(publishing.as_secs_f64()),
        }
    }
}

/// Printed on exit: as text on stderr, and as one JSON line on stdout for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub source: String,
    pub events_read: u64,
    pub published: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub dead_letter_file: String,
    pub failures: BTreeMap<String, u64>,
    pub reconciles: u64,
    pub lost_and_republished: u64,
    /// Duplicates checked equal to the module's events; below the retention floor.
    pub verified: u64,
    pub unverifiable_below_floor: u64,
    /// Duplicates whose seq holds a gap marker this mirror published in their place
    /// (`--on-gap skip`): a permanent hole, the event stays dead-lettered.
    pub behind_gap_markers: u64,
    /// `authority_divergence` findings: `stream=.. seq=.. authority=.. module=..`.
    pub divergences: Vec<String>,
    /// The durable cursor: line (or outbox id), and for files the segment and byte offset.
    pub durable_line: u64,
    pub durable_segment: u64,
    pub durable_offset: u64,
    pub held_streams: Vec<String>,
    pub elapsed_secs: f64,
    /// From the start to the last committed batch.
    pub publish_secs: f64,
    /// `published / publish_secs`.
    pub events_per_sec: f64,
}

impl Summary {
    /// The human-readable form.
    pub fn text(&self) -> String {
        let failures = if self.failures.is_empty() { "none".to_string() } else { self.failures.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ") };
        let mut text = format!(
            "khala mirror: {}\n  read {} · published {} · duplicates {} · dead-lettered {} ({})\n  failures: {failures} · reconciles {} · lost and republished {}\n  durable position: line {} (segment {}, offset {})\n  elapsed {:.2} s · {:.0} events/s over {:.2} s of publishing",
            self.source,
            self.events_read,
            self.published,
            self.duplicates,
            self.dead_lettered,
            self.dead_letter_file,
            self.reconciles,
            self.lost_and_republished,
            self.durable_line,
            self.durable_segment,
            self.durable_offset,
            self.elapsed_secs,
            self.events_per_sec,
            self.publish_secs,
        );
        text.push_str(&format!(
            "\n  duplicates checked against the module: {} equal, {} below the retention floor, {} behind gap markers",
            self.verified, self.unverifiable_below_floor, self.behind_gap_markers
        ));
        for d in &self.divergences {
            text.push_str(&format!("\n  DIVERGED {d}"));
        }
        for held in &self.held_streams {
            text.push_str(&format!("\n  HELD {held}"));
        }
        text
    }
}

//! The database's own account of a timed bench run, read from the server's `/v1/metrics`
//! before and after it: what the database's one thread spent per reducer call, how long
//! calls waited for it, and how busy it was (docs/BENCHMARKS.md). `khala bench latency`
//! and `khala bench publish` print it with their figures.

use khala_tools::api::Api;
use khala_tools::metrics_text::Samples;
use serde_json::{json, Value};
use std::time::Instant;

/// The server's metrics at the start of a timed run, to read the database's own account of
/// it at the end ([`server_side`]).
pub struct ServerWatch {
    db_identity: String,
    before: Option<Samples>,
    started: Instant,
}

impl ServerWatch {
    pub fn start(api: &Api, db: &str) -> anyhow::Result<ServerWatch> {
        Ok(ServerWatch { db_identity: api.database_identity(db)?, before: api.server_metrics()?, started: Instant::now() })
    }

    /// Runs `work` on database `db` and returns its result with [`server_side`] for the
    /// calls of `reducer` it made.
    pub fn around<T>(api: &Api, db: &str, reducer: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Value)> {
        let watch = ServerWatch::start(api, db)?;
        let done = work()?;
        Ok((done, watch.finish(api, reducer)?))
    }

    /// [`server_side`] for calls of `reducer`; null when the server serves no metrics.
    pub fn finish(self, api: &Api, reducer: &str) -> anyhow::Result<Value> {
        let seconds = self.started.elapsed().as_secs_f64();
        Ok(match (self.before, api.server_metrics()?) {
            (Some(before), Some(after)) => server_side(&before, &after, &self.db_identity, reducer, seconds),
            _ => Value::Null,
        })
    }
}

/// The database's own account of a timed run, from the server's metrics before it and
/// after it (docs/BENCHMARKS.md): per call of `reducer`, the CPU the database's thread
/// spent in the reducer and in the subscription update after it, and how long the calls
/// waited for that thread (bounds: the histogram's bucket that holds the p99, the max);
/// the `close_window` calls (a close sends the bucket's rows back as deletes); and the
/// share of `seconds` the database's thread was busy with any transaction.
fn server_side(before: &Samples, after: &Samples, db: &str, reducer: &str, seconds: f64) -> Value {
    let delta = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels).unwrap_or(0.0) - before.sum(name, labels).unwrap_or(0.0);
    let cpu = |reducer: &str, txn_type: &str| {
        let labels = [("db", db), ("reducer", reducer), ("txn_type", txn_type)];
        (delta("spacetime_txn_cpu_time_sec_count", &labels), delta("spacetime_txn_cpu_time_sec_sum", &labels))
    };
    let per_call = |(calls, secs): (f64, f64), unit: f64| if calls > 0.0 { json!(((secs / calls * unit) * 10.0).round() / 10.0) } else { Value::Null };
    let reducer_cpu = cpu(reducer, "Reducer");
    let closes = cpu("close_window", "Update");
    // Cumulative bucket counts of the wait histogram over the run, by upper bound.
    let wait_labels = [("db", db), ("reducer", reducer)];
    let mut buckets: Vec<(f64, f64)> = after
        .matching("spacetime_reducer_wait_time_sec_bucket", &wait_labels)
        .filter_map(|b| {
            let le = b.label("le")?;
            let earlier = before.matching("spacetime_reducer_wait_time_sec_bucket", &wait_labels).find(|e| e.label("le") == Some(le)).map_or(0.0, |e| e.value);
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, b.value - earlier))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let waits = buckets.last().map_or(0.0, |b| b.1);
    let bound = |q: f64| buckets.iter().find(|(_, cumulative)| waits > 0.0 && *cumulative >= q * waits).map(|(le, _)| if le.is_finite() { json!(le * 1000.0) } else { json!("inf") });
    json!({
        "reducer": reducer,
        "calls": reducer_cpu.0,
        "reducer_cpu_us_per_call": per_call(reducer_cpu, 1e6),
        "update_cpu_us_per_call": per_call(cpu(reducer, "Update"), 1e6),
        "wait_p99_ms_at_most": bound(0.99),
        "wait_max_ms_at_most": bound(1.0),
        "close_window_calls": closes.0,
        "close_window_update_ms_per_call": per_call(closes, 1e3),
        "database_thread_busy": ((delta("spacetime_txn_cpu_time_sec_sum", &[("db", db)]) / seconds.max(1e-9)) * 1000.0).round() / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_account_is_the_difference_over_the_run_for_this_database_only() {
        let text = |calls: u32, reducer_s: f64, update_s: f64, waits: [u32; 3], closes: u32, close_s: f64| {
            let cpu = |r: &str, t: &str, n: u32, s: f64| {
                format!("spacetime_txn_cpu_time_sec_count{{db=\"d1\",reducer=\"{r}\",txn_type=\"{t}\"}} {n}\nspacetime_txn_cpu_time_sec_sum{{db=\"d1\",reducer=\"{r}\",txn_type=\"{t}\"}} {s}\n")
            };
            let bucket = |le: &str, n: u32| format!("spacetime_reducer_wait_time_sec_bucket{{db=\"d1\",reducer=\"publish\",le=\"{le}\"}} {n}\n");
            // Another database's samples must not count.
            let other = "spacetime_txn_cpu_time_sec_sum{db=\"d2\",reducer=\"publish\",txn_type=\"Update\"} 99\n";
            Samples::parse(&[
                cpu("publish", "Reducer", calls, reducer_s),
                cpu("publish", "Update", calls, update_s),
                cpu("close_window", "Update", closes, close_s),
                bucket("0.001", waits[0]),
                bucket("0.005", waits[1]),
                bucket("+Inf", waits[2]),
                other.to_string(),
            ]
            .concat())
        };
        let before = text(100, 1.0, 2.0, [90, 100, 100], 1, 0.010);
        // 1000 calls more: 80 µs and 200 µs each; 985 waits under 1 ms, 1000 under 5 ms.
        let after = text(1100, 1.08, 2.2, [1075, 1100, 1100], 3, 0.040);
        let got = server_side(&before, &after, "d1", "publish", 2.0);
        assert_eq!(got["calls"], json!(1000.0));
        assert_eq!(got["reducer_cpu_us_per_call"], json!(80.0));
        assert_eq!(got["update_cpu_us_per_call"], json!(200.0));
        assert_eq!(got["wait_p99_ms_at_most"], json!(5.0));
        assert_eq!(got["wait_max_ms_at_most"], json!(5.0));
        assert_eq!(got["close_window_calls"], json!(2.0));
        assert_eq!(got["close_window_update_ms_per_call"], json!(15.0));
        // (0.08 + 0.2 + 0.03) s of the database's thread over 2 s.
        assert_eq!(got["database_thread_busy"], json!(0.155));
        let idle = server_side(&before, &before, "d1", "publish", 2.0);
        assert_eq!((idle["reducer_cpu_us_per_call"].clone(), idle["wait_p99_ms_at_most"].clone()), (Value::Null, Value::Null));
    }
}

//! The one way every `khala` process serves Prometheus text: the `metrics` facade's
//! global recorder, with an HTTP listener that answers any path (`/metrics` included).
//! Metric names and meanings: docs/METRICS.md.

use crate::error::{Result, ToolError};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use metrics_util::MetricKindMask;
use std::net::SocketAddr;
use std::time::Duration;

/// Installs the Prometheus recorder and serves it on `addr`. The client's delivery
/// latency and checkpoint write histograms get their buckets (any other histogram would
/// be a summary).
/// `forget_gauges_after`: gauges not set for that long leave the output, so a series
/// whose subject is gone (a stream that no longer exists) disappears instead of
/// repeating its last value.
pub fn install(addr: SocketAddr, forget_gauges_after: Option<Duration>) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| ToolError::Http { what: format!("serving metrics on {addr}"), detail: e.to_string() };
    let mut builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(khala_client::metrics::DELIVERY_LATENCY.into()), &khala_client::metrics::LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(khala_client::metrics::CHECKPOINT_WRITE.into()), &khala_client::metrics::CHECKPOINT_WRITE_BUCKETS))
        .map_err(|e| failed(&e))?;
    if let Some(after) = forget_gauges_after {
        builder = builder.idle_timeout(MetricKindMask::GAUGE, Some(after));
    }
    builder.install().map_err(|e| failed(&e))
}

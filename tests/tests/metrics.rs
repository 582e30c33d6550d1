//! Metrics from every component, scraped over HTTP from the real `khala` binary against a
//! real server: the client (`khala tail --metrics-addr`), the module's state (`khala
//! exporter`), and the mirror's Postgres outbox backlog (`khala mirror --metrics-addr`).

use khala_tests::bin::isolated_khala;
use khala_tests::pg::Postgres;
use khala_tests::{publish_range, shared_server, wait_for, TestDb, TestServer};
use khala_tools::api::{publish_event_arg, Credentials};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// A `khala` child process, stopped with SIGTERM (then killed) when dropped.
struct Khala {
    child: Child,
    log: std::path::PathBuf,
}

impl Khala {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Khala {
        let log = dir.join(format!("{name}.log"));
        let child = isolated_khala(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("running khala {name}: {e}"));
        Khala { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Khala {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback address for a metrics endpoint.
fn metrics_addr() -> String {
    format!("127.0.0.1:{}", khala_tools::server::free_port().unwrap())
}

/// The endpoint's body, or `None` while it does not answer.
fn scrape(addr: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut stream, &mut body).ok()?;
    body.contains("\r\n\r\n").then_some(body)
}

/// Every sample of the body: `name{k="v",..}` with its labels sorted, to its value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("khala_")) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        out.insert(key, value);
    }
    out
}

/// A series key as [`samples`] writes it; `labels` already sorted by name.
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    format!("{name}{{{}}}", labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect::<Vec<_>>().join(","))
}

/// Scrapes until `ready` holds for the samples, then returns them.
fn wait_samples(what: &str, addr: &str, timeout: Duration, ready: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    wait_for(what, timeout, || scrape(addr).map(|b| samples(&b)).filter(|s| ready(s)))
}

fn token_file(dir: &Path, who: &Credentials) -> String {
    let path = dir.join(format!("{}.token", &who.identity[..16]));
    std::fs::write(&path, &who.token).unwrap();
    path.to_string_lossy().into_owned()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

#[test]
fn tail_serves_applied_counts_lag_latency_state_rebootstraps_and_lease_ends() {
    let db = shared_server().new_database("metrics-tail");
    let dir = tempfile::tempdir().unwrap();
    let publisher = db.publisher();
    let reader = db.new_identity();
    let stream = "m.tail";
    db.grant(&reader, stream, &["subscribe", "ack"], 3600);
    publish_range(&db, &publisher, stream, 1, 50, 10);

    let addr = metrics_addr();
    let checkpoint = dir.path().join("tail.checkpoint");
    let token = token_file(dir.path(), &reader);
    let args = ["tail", "--server", &db.url, "--database", &db.name, "--token-file", &token, "--stream", stream, "--quiet", "--checkpoint"];
    let mut args: Vec<&str> = args.to_vec();
    let checkpoint = checkpoint.to_string_lossy();
    args.extend([checkpoint.as_ref(), "--metrics-addr", &addr]);
    let tail = Khala::spawn(dir.path(), "tail", &args);

    let s_label = [("stream", stream)];
    let applied = key("khala_client_events_applied_total", &s_label);
    let live = key("khala_client_state", &[("state", "live")]);
    let s = wait_samples("the replay of 50 events, live", &addr, Duration::from_secs(30), |s| s.get(&applied) == Some(&50.0) && s.get(&live) == Some(&1.0));
    assert_eq!(s[&key("khala_client_lag_events", &s_label)], 0.0, "{}", tail.log());
    assert_eq!(s[&key("khala_client_lag_seconds", &s_label)], 0.0);
    assert_eq!(s[&key("khala_client_streams", &[("state", "live")])], 1.0);
    assert_eq!(s[&key("khala_client_streams", &[("state", "replaying")])], 0.0);
    assert_eq!(s[&key("khala_client_state", &[("state", "replaying")])], 0.0);
    assert_eq!((s["khala_client_connect_attempts_total"], s["khala_client_reconnects_total"]), (1.0, 0.0));
    // The counters the alert rules take increase() of are served at 0 before their first event.
    assert_eq!(s.get(&key("khala_client_rebootstraps_total", &[("reason", "stale_cursor"), ("stream", stream)])), Some(&0.0));
    assert_eq!(s.get(&key("khala_client_lease_expiries_total", &s_label)), Some(&0.0));
    assert_eq!(s.get(&key("khala_client_corrupt_segments_total", &s_label)), Some(&0.0));
    assert_eq!(s.get(&key("khala_client_auth_failures_total", &[("kind", "unauthorized")])), Some(&0.0));
    // The replay was checkpointed, each write timed on the writer thread.
    let writes = s.get("khala_client_checkpoint_write_seconds_count").copied().unwrap_or(0.0);
    assert!(writes >= 1.0, "checkpoint writes timed: {writes}");
    assert_eq!(s.get(&key("khala_client_checkpoint_write_seconds_bucket", &[("le", "+Inf")])), Some(&writes));
    let lease = s[&key("khala_client_lease_seconds_left", &s_label)];
    assert!((3500.0..=3600.0).contains(&lease), "lease seconds left {lease}");
    // A replayed backlog is lag, not delivery latency.
    let count = |s: &BTreeMap<String, f64>, source: &str| s.get(&key("khala_client_delivery_latency_seconds_count", &[("source", source)])).copied();
    assert_eq!((count(&s, "occurred_at"), count(&s, "published_at")), (Some(0.0), Some(0.0)));

    // Live events, one call each, stamped by the "authority" just before publishing.
    for seq in 51..=60 {
        let event = publish_event_arg(&format!("k{seq}"), "test.event", b"{}", Some(seq), now_micros());
        db.call_as(&publisher, "publish", json!([stream, [event]])).unwrap();
    }
    let s = wait_samples("10 live events applied and timed", &addr, Duration::from_secs(20), |s| s.get(&applied) == Some(&60.0) && count(s, "published_at") == Some(10.0));
    assert_eq!(count(&s, "occurred_at"), Some(10.0));
    for source in ["occurred_at", "published_at"] {
        // Every one within the 10 s bucket, and the sum is that of real (positive) delays.
        assert_eq!(s[&key("khala_client_delivery_latency_seconds_bucket", &[("le", "10"), ("source", source)])], 10.0, "{source}");
        let sum = s[&key("khala_client_delivery_latency_seconds_sum", &[("source", source)])];
        assert!(sum > 0.0 && sum < 100.0, "{source}: sum {sum}");
    }

    // An admin resets the stream: one rebootstrap, epoch_changed.
    db.call("reset_stream", json!([stream]));
    let reboot = key("khala_client_rebootstraps_total", &[("reason", "epoch_changed"), ("stream", stream)]);
    wait_samples("the rebootstrap counted", &addr, Duration::from_secs(20), |s| s.get(&reboot) == Some(&1.0));

    // The grant is revoked: a lease end, and the stream counted as forbidden.
    db.revoke(&reader, stream);
    let s = wait_samples("the revoke counted", &addr, Duration::from_secs(20), |s| {
        s.get(&key("khala_client_lease_expiries_total", &s_label)) == Some(&1.0) && s.get(&key("khala_client_streams", &[("state", "forbidden")])) == Some(&1.0)
    });
    assert_eq!(s[&key("khala_client_lease_seconds_left", &s_label)], 0.0);
    assert_eq!((s[&applied], s["khala_client_connect_attempts_total"], s["khala_client_reconnects_total"]), (60.0, 1.0, 0.0), "{}", tail.log());
}

/// The bytes of segment data `stream` holds now, and its segment count, as the owner reads them.
fn segment_truth(db: &TestDb, stream: &str) -> (f64, f64) {
    let rows = db.sql(&format!("SELECT data FROM stream_segment WHERE stream_id = '{stream}'"));
    let bytes: usize = rows.rows.iter().map(|r| r[0].as_str().unwrap().len() / 2).sum();
    let count = db.sql(&format!("SELECT segment_count FROM stream WHERE stream_id = '{stream}'"));
    (bytes as f64, count.rows[0][0].as_u64().unwrap() as f64)
}

#[test]
fn exporter_serves_heads_segments_bytes_grants_and_connected_clients() {
    let db = shared_server().new_database("metrics-exporter");
    let dir = tempfile::tempdir().unwrap();
    let publisher = db.publisher();
    publish_range(&db, &publisher, "m.x", 1, 30, 10);
    publish_range(&db, &publisher, "m.y", 1, 5, 5);
    let reader = db.new_identity();
    // A lease of 2 minutes: "expiring soon" (within 5).
    db.grant(&reader, "m.x", &["subscribe"], 120);
    let _conn = khala_tests::sdk::connect(&db, &reader);

    let addr = metrics_addr();
    let owner = token_file(dir.path(), &db.owner);
    let exporter = Khala::spawn(dir.path(), "exporter", &["exporter", "--server", &db.url, "--database", &db.name, "--token-file", &owner, "--metrics-addr", &addr, "--interval-secs", "1"]);

    let x = [("stream", "m.x")];
    let head_x = key("khala_module_stream_head", &x);
    // Compaction may merge the segments meanwhile: compare with what the module holds
    // right after each scrape until both agree.
    let s = wait_for("the exporter's view of m.x", Duration::from_secs(30), || {
        let s = samples(&scrape(&addr)?);
        let (bytes, segments) = segment_truth(&db, "m.x");
        let agree = s.get(&head_x) == Some(&30.0)
            && s.get(&key("khala_module_stream_bytes", &x)) == Some(&bytes)
            && s.get(&key("khala_module_stream_segments", &x)) == Some(&segments)
            && s.get("khala_module_connected_clients") == Some(&1.0);
        agree.then_some(s)
    });
    assert!(s[&key("khala_module_stream_bytes", &x)] > 0.0);
    assert_eq!(s["khala_module_up"], 1.0, "{}", exporter.log());
    assert_eq!(s["khala_module_scrape_errors_total"], 0.0);
    assert_eq!((s[&key("khala_module_stream_floor", &x)], s[&key("khala_module_stream_epoch", &x)]), (1.0, 1.0));
    assert_eq!(s[&key("khala_module_stream_head", &[("stream", "m.y")])], 5.0);
    assert_eq!(s[&key("khala_module_grants", &[("scope", "subscribe")])], 1.0);
    assert_eq!(s[&key("khala_module_grants", &[("scope", "ack")])], 0.0);
    assert_eq!(s[&key("khala_module_grants", &[("scope", "publish")])], 1.0);
    assert_eq!(s["khala_module_grants_expiring_soon"], 1.0);
    assert_eq!(s[&key("khala_module_config", &[("key", "max_payload_bytes")])], 262_144.0);

    // New events show at the next read.
    publish_range(&db, &publisher, "m.x", 31, 10, 10);
    wait_samples("the new head", &addr, Duration::from_secs(10), |s| s.get(&head_x) == Some(&40.0));
}

#[test]
fn exporter_reports_a_server_that_is_down_keeps_serving_and_drops_what_it_cannot_read() {
    // A server of its own: this test kills it.
    let server = TestServer::start();
    let db = server.new_database("metrics-down");
    let dir = tempfile::tempdir().unwrap();
    let publisher = db.publisher();
    publish_range(&db, &publisher, "m.z", 1, 3, 3);
    let addr = metrics_addr();
    let owner = token_file(dir.path(), &db.owner);
    let exporter = Khala::spawn(dir.path(), "exporter", &["exporter", "--server", &db.url, "--database", &db.name, "--token-file", &owner, "--metrics-addr", &addr, "--interval-secs", "1"]);
    let head = key("khala_module_stream_head", &[("stream", "m.z")]);
    wait_samples("the first read", &addr, Duration::from_secs(20), |s| s.get("khala_module_up") == Some(&1.0) && s.get(&head) == Some(&3.0));

    server.kill9();
    let s = wait_samples("up 0 and a scrape error", &addr, Duration::from_secs(10), |s| s.get("khala_module_up") == Some(&0.0) && s.get("khala_module_scrape_errors_total").is_some_and(|n| *n >= 1.0));
    assert!(s.contains_key(&head), "gauges stay for one missed read or two");
    // Gauges it cannot read leave the output (2 intervals + 5 s); the endpoint stays up.
    wait_samples("the stream gauges gone", &addr, Duration::from_secs(20), |s| !s.contains_key(&head) && s.get("khala_module_up") == Some(&0.0));

    server.restart();
    wait_samples("up again", &addr, Duration::from_secs(30), |s| s.get("khala_module_up") == Some(&1.0) && s.get(&head) == Some(&3.0));
    drop(exporter);
}

#[test]
fn mirror_serves_the_outbox_depth_and_oldest_age_before_and_after_mirroring() {
    let pg = Postgres::start();
    let db = shared_server().new_database("metrics-outbox");
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let mirror_id = db.publisher_for(&["runtime.*"]);
    let token = token_file(dir.path(), &mirror_id);
    let state = dir.path().join("state");
    let state = state.to_string_lossy();
    let mirror_args = |server: &str, addr: &str| -> Vec<String> {
        ["mirror", "--server", server, "--database", &db.name, "--token-file", &token, "--state-dir", &state, "--postgres", &url, "--durable-after-ms", "700", "--metrics-addr", addr]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let migrate = isolated_khala(dir.path()).args(["mirror", "--postgres", &url, "--migrate"]).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    pg.psql(
        "INSERT INTO khala_outbox (topic, seq, kind, payload, occurred_at) \
         SELECT 'run:' || t || ':events', s, 'pg.event', jsonb_build_object('t', t, 's', s), now() \
         FROM generate_series(1, 20) s, generate_series(0, 2) t ORDER BY s, t",
    );

    // Before: the module is out of reach (nothing listens there), so nothing is mirrored
    // while the backlog is watched.
    let dead = format!("http://127.0.0.1:{}", khala_tools::server::free_port().unwrap());
    let addr = metrics_addr();
    let args = mirror_args(&dead, &addr);
    let stuck = Khala::spawn(dir.path(), "mirror-stuck", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let s = wait_samples("the backlog of 60 rows", &addr, Duration::from_secs(20), |s| {
        s.get("khala_mirror_outbox_depth") == Some(&60.0) && s.get("khala_mirror_outbox_oldest_age_seconds").is_some_and(|a| *a > 0.0)
    });
    assert!(s["khala_mirror_outbox_oldest_age_seconds"] < 60.0, "{}", stuck.log());
    assert!(s.get("khala_mirror_failures_total{class=\"unavailable\"}").is_some_and(|n| *n >= 1.0), "{s:?}");
    drop(stuck);

    // After: the mirror reaches the module; the backlog drains to 0.
    let addr = metrics_addr();
    let args = mirror_args(&db.url, &addr);
    let mirror = Khala::spawn(dir.path(), "mirror", &args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_samples("the backlog drained", &addr, Duration::from_secs(30), |s| {
        s.get("khala_mirror_outbox_depth") == Some(&0.0) && s.get("khala_mirror_outbox_oldest_age_seconds") == Some(&0.0)
    });
    let max_id = pg.psql("SELECT max(id) FROM khala_outbox");
    assert_eq!(pg.psql(&format!("SELECT last_id FROM khala_mirror_cursor WHERE name = '{}'", db.name)), max_id, "{}", mirror.log());
    let heads = db.sql("SELECT head_seq FROM stream");
    assert_eq!(heads.rows.iter().filter_map(|r| r[0].as_u64()).sum::<u64>(), 60);
}

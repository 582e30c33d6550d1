//! `khala bench all`: every throughput scenario of issue 12 in one run on one private
//! server, with both baselines (the bare insert-only module and Redis Streams), written
//! as `bench.md` (table), `bench.json` (machine, commit, parameters, figures) and
//! `bench.svg` (the 0→N curve), so that every figure is read against a baseline from the
//! same run on the same loaded cores.

use super::chart::{self, Series};
use super::redis_base::{self, RedisServer};
use super::latency::{bare_fan_out, khala_latency, BareTable, Load};
use super::mirror::{mirror_file, mirror_outbox, MirrorBenchArgs, MirrorRun};
use super::{private_server, publish_bare, publish_http, publish_sdk, replay_client, PublishArgs};
use khala_tools::mirror::publisher::Transport;
use clap::Args;
use khala_tools::api::Api;
use khala_tools::grants;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AllArgs {
    /// Events in the batched publish runs (the replay reads back what the SDK run wrote).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per call (per XADD pipeline for Redis).
    #[arg(long, default_value_t = 1_000)]
    pub batch: u64,
    /// Streams in the batched runs, each with one call in flight.
    #[arg(long, default_value_t = 4)]
    pub streams: u64,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Events per slice of the flatness curve; 0 for a tenth of `--events`.
    #[arg(long, default_value_t = 0)]
    pub curve_every: u64,
    /// Events in the unbatched runs (one event per call or XADD).
    #[arg(long, default_value_t = 16_000)]
    pub unbatched_events: u64,
    /// Calls in flight in the unbatched runs, one stream each.
    #[arg(long, default_value_t = 64)]
    pub unbatched_streams: u64,
    /// Leave out Khala's HTTP JSON run.
    #[arg(long)]
    pub skip_http: bool,
    /// Latency: events per second, one per call, to `--latency-subscribers` and then to
    /// `--fan-out-subscribers` clients of one stream (Khala, then the bare module without
    /// and with a row-level-security rule).
    #[arg(long, default_value_t = 1_000)]
    pub latency_rate: u64,
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    #[arg(long, default_value_t = 10)]
    pub latency_subscribers: usize,
    #[arg(long, default_value_t = 100)]
    pub fan_out_subscribers: usize,
    /// Also mirror the same events from the outbox of this PostgreSQL database (its
    /// `khala_outbox` table is created if missing and must be empty).
    #[arg(long)]
    pub postgres: Option<String>,
    /// Where `bench.md`, `bench.json` and `bench.svg` go (created if missing).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

/// One row of the table: a scenario, a path, events/s, and whether it is the scenario's baseline.
struct Row {
    scenario: &'static str,
    path: String,
    events_per_sec: Option<f64>,
    baseline: Option<f64>,
    note: String,
}

fn command(a: &AllArgs) -> String {
    format!(
        "khala bench all --events {} --batch {} --streams {} --payload-bytes {} --curve-every {} --unbatched-events {} --unbatched-streams {}{} --latency-rate {} --latency-seconds {} --latency-subscribers {} --fan-out-subscribers {}{} --out {}",
        a.events,
        a.batch,
        a.streams,
        a.payload_bytes,
        a.curve_every,
        a.unbatched_events,
        a.unbatched_streams,
        if a.skip_http { " --skip-http" } else { "" },
        a.latency_rate,
        a.latency_seconds,
        a.latency_subscribers,
        a.fan_out_subscribers,
        if a.postgres.is_some() { " --postgres URL" } else { "" },
        a.out.display()
    )
}

fn first_line(path: &str, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| l.strip_prefix(prefix).map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string()))
}

/// The machine and the code the figures came from.
fn machine() -> Value {
    // The tree the bench's modules are built from, wherever the bench is run from.
    let git = |args: &[&str]| std::process::Command::new("git").args(args).current_dir(khala_tools::paths::workspace_root()).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": first_line("/proc/cpuinfo", "model name"),
        "mem_total": first_line("/proc/meminfo", "MemTotal"),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        "commit": git(&["rev-parse", "HEAD"]),
        "worktree_dirty": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        "engine": "SpacetimeDB 1.2.0 standalone",
    })
}

/// Mean, and the lowest and highest slice relative to it (the ±% of "flat").
fn flatness(curve: &[(u64, f64)]) -> Value {
    if curve.is_empty() {
        return Value::Null;
    }
    let mean = curve.iter().map(|p| p.1).sum::<f64>() / curve.len() as f64;
    let min = curve.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let max = curve.iter().map(|p| p.1).fold(0.0, f64::max);
    let pct = |v: f64| ((v / mean - 1.0) * 1000.0).round() / 10.0;
    json!({ "mean_events_per_sec": mean.round(), "min_pct": pct(min), "max_pct": pct(max) })
}

/// `1234567.0` as `1 234 567`.
fn grouped(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn step(n: usize, of: usize, what: &str) {
    eprintln!("[{n}/{of}] {what}");
}

pub fn all(args: AllArgs) -> anyhow::Result<()> {
    let every = if args.curve_every > 0 { args.curve_every } else { (args.events / 10).max(args.batch) };
    let args = AllArgs { curve_every: every, ..args };
    let command = command(&args);
    std::fs::create_dir_all(&args.out)?;
    let machine = machine();
    let batched = PublishArgs { events: args.events, batch: args.batch, streams: args.streams, payload_bytes: args.payload_bytes, curve_every: every, skip_http: args.skip_http, connections: 1 };
    let unbatched = PublishArgs { events: args.unbatched_events, batch: 1, streams: args.unbatched_streams, payload_bytes: args.payload_bytes, curve_every: 0, skip_http: true, connections: 1 };
    let redis_binary = redis_base::find_binary();
    if redis_binary.is_none() {
        eprintln!("redis_server_missing: the Redis Streams baseline needs `redis-server` (Debian package `{}`: apt-get install {}); running the rest without it", redis_base::PACKAGE, redis_base::PACKAGE);
    }
    let steps = 9 + usize::from(!args.skip_http) + if redis_binary.is_some() { 3 } else { 0 };
    let mut n = 0;
    let mut next = |what: &str| {
        n += 1;
        step(n, steps, what)
    };

    next("starting a private server and publishing the modules");
    let (server, dir) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let bare_wasm = std::fs::read(khala_tools::module_wasm::build_bare_module()?)?;
    for db in ["bare", "unbatched-bare"] {
        api.publish_module(db, &bare_wasm, &owner.token, false)?;
    }
    for db in ["sdk", "http", "unbatched-sdk"] {
        api.publish_module(db, &wasm, &owner.token, false)?;
        grants::make_publisher(&api, db, &owner.token, &owner.identity, &["bench.*"], 24 * 3600)?;
    }

    // Baseline first, then Khala, then Redis, each path on a database of its own.
    next("batched publish: bare insert-only module (SDK)");
    let bare = publish_bare(&server.url(), "bare", &owner.token, &batched)?;
    next("batched publish: Khala `publish_segment` (SDK)");
    let sdk = publish_sdk(&server.url(), "sdk", &owner.token, &batched)?;
    let http = if args.skip_http {
        None
    } else {
        next("batched publish: Khala `publish` (HTTP JSON)");
        Some(publish_http(&api, "http", &owner.token, &batched)?)
    };
    next("unbatched publish: bare module, then Khala (SDK)");
    let unbatched_bare = publish_bare(&server.url(), "unbatched-bare", &owner.token, &unbatched)?;
    let unbatched_sdk = publish_sdk(&server.url(), "unbatched-sdk", &owner.token, &unbatched)?;

    next("replay: a fresh client reads back what the SDK run wrote");
    let per_stream = args.events / args.streams;
    let reader = api.new_identity()?;
    let streams: Vec<String> = (0..args.streams).map(|s| format!("bench.pub.{s}")).collect();
    for stream in &streams {
        api.call("sdk", "grant", json!([reader.identity_arg(), stream, ["subscribe"], 3600]), &owner.token)?;
    }
    let token = dir.path().join("reader.token");
    std::fs::write(&token, &reader.token)?;
    let checkpoint = dir.path().join("all.checkpoint");
    let replay = replay_client(&server.url(), "sdk", &token, &streams, per_stream * args.streams, "a client", &["--checkpoint", &checkpoint.to_string_lossy()])?;

    next("mirror: an authority log (JSONL) into Khala over the SDK, durable cursor on");
    let mirror_args = MirrorBenchArgs { events: per_stream * args.streams, topics: args.streams as u32, payload_bytes: args.payload_bytes, batch: args.batch, durable_after_ms: 2_000, postgres: None, skip_http: true };
    let mirror = mirror_file(&api, &owner.token, "mirror", dir.path(), &mirror_args, Transport::Sdk)?;
    let outbox = match &args.postgres {
        Some(pg) => {
            next("mirror: the same events from a Postgres outbox into Khala over the SDK, durable cursor on");
            Some(mirror_outbox(&api, &owner.token, "mirror-pg", dir.path(), &mirror_args, pg)?)
        }
        None => None,
    };

    let mut latency = Vec::new();
    for (subscribers, db) in [(args.latency_subscribers, "latency"), (args.fan_out_subscribers, "fan-out")] {
        next(&format!("latency: {} events/s, one per call, to {subscribers} subscribers (Khala, then the bare module without and with an RLS rule)", args.latency_rate));
        let load = Load { subscribers, rate: args.latency_rate, seconds: args.latency_seconds, payload_bytes: args.payload_bytes, ack: true, sqlite: false, warm: false };
        let khala = khala_latency(&api, &owner.token, db, dir.path(), load)?;
        let bare = bare_fan_out(&api, &owner.token, &format!("{db}-bare"), load, BareTable::Public)?;
        let bare_rls = bare_fan_out(&api, &owner.token, &format!("{db}-bare-rls"), load, BareTable::Guarded)?;
        latency.push(json!({ "subscribers": subscribers, "rate": args.latency_rate, "seconds": args.latency_seconds, "khala": khala, "bare": bare, "bare_rls": bare_rls }));
    }
    drop(server);

    let mut redis = json!({ "skipped": "redis_server_missing", "install": format!("apt-get install {}", redis_base::PACKAGE) });
    let (mut redis_pipelined, mut redis_unpipelined, mut redis_xrange) = (None::<redis_base::RedisRate>, None::<f64>, None::<f64>);
    if let Some(binary) = &redis_binary {
        next("Redis Streams: XADD pipelined");
        let server = RedisServer::start(binary)?;
        let client = server.client()?;
        let pipelined = redis_base::xadd(&client, "Redis XADD pipelined", args.events, args.streams, args.batch, args.payload_bytes, every)?;
        next("Redis Streams: XRANGE replay");
        redis_xrange = Some(redis_base::xrange(&client, args.streams, args.batch, args.payload_bytes, per_stream * args.streams)?);
        drop(server);
        next("Redis Streams: XADD unpipelined");
        // A fresh server, so that the unpipelined run starts empty like the bare module's.
        let server = RedisServer::start(binary)?;
        redis_unpipelined = Some(redis_base::xadd(&server.client()?, "Redis XADD unpipelined", args.unbatched_events, args.unbatched_streams, 1, args.payload_bytes, 0)?.events_per_sec);
        redis = json!({
            "version": RedisServer::version(binary),
            "persistence": "appendonly yes, appendfsync everysec, no RDB snapshots",
            "xadd_pipelined_events_per_sec": pipelined.events_per_sec.round(),
            "xadd_unpipelined_events_per_sec": redis_unpipelined.map(f64::round),
            "xrange_replay_events_per_sec": redis_xrange.map(f64::round),
            "xadd_pipelined_curve_events_per_sec": pipelined.curve,
            "xadd_pipelined_flatness": flatness(&pipelined.curve),
        });
        redis_pipelined = Some(pipelined);
    }

    let ratio = |x: f64, base: f64| (x / base * 1000.0).round() / 1000.0;
    let mut figures = json!({
        "bare_sdk_events_per_sec": bare.events_per_sec.round(),
        "sdk_segment_events_per_sec": sdk.events_per_sec.round(),
        "sdk_segment_to_bare": ratio(sdk.events_per_sec, bare.events_per_sec),
        "unbatched_bare_events_per_sec": unbatched_bare.events_per_sec.round(),
        "unbatched_sdk_events_per_sec": unbatched_sdk.events_per_sec.round(),
        "unbatched_sdk_to_bare": ratio(unbatched_sdk.events_per_sec, unbatched_bare.events_per_sec),
        "replay_events_per_sec": replay["events_per_sec"],
        "replay_client_peak_rss_mib": replay["peak_rss_mib"],
        "bare_curve_events_per_sec": bare.curve,
        "sdk_curve_events_per_sec": sdk.curve,
        "bare_flatness": flatness(&bare.curve),
        "sdk_flatness": flatness(&sdk.curve),
        "redis": redis,
        "mirror_file_sdk_publishing_events_per_sec": mirror.publishing_per_sec.round(),
        "mirror_file_sdk_durable_events_per_sec": mirror.durable_per_sec.round(),
        "mirror_file_sdk_final_wait_secs": (mirror.final_wait_secs * 100.0).round() / 100.0,
        "mirror_to_bare": ratio(mirror.durable_per_sec, bare.events_per_sec),
        "latency": latency,
    });
    if let Some(outbox) = &outbox {
        figures["mirror_outbox_sdk_publishing_events_per_sec"] = json!(outbox.publishing_per_sec.round());
        figures["mirror_outbox_sdk_durable_events_per_sec"] = json!(outbox.durable_per_sec.round());
        figures["mirror_outbox_sdk_final_wait_secs"] = json!((outbox.final_wait_secs * 100.0).round() / 100.0);
        figures["mirror_outbox_to_bare"] = json!(ratio(outbox.durable_per_sec, bare.events_per_sec));
    }
    if let Some(http) = http {
        figures["http_json_events_per_sec"] = json!(http.round());
        figures["http_to_bare"] = json!(ratio(http, bare.events_per_sec));
    }
    let parameters = json!({
        "events": args.events, "batch": args.batch, "streams": args.streams, "payload_bytes": args.payload_bytes,
        "curve_every": every, "unbatched_events": args.unbatched_events, "unbatched_streams": args.unbatched_streams, "skip_http": args.skip_http, "postgres_outbox": args.postgres.is_some(),
        "latency_rate": args.latency_rate, "latency_seconds": args.latency_seconds, "latency_subscribers": args.latency_subscribers, "fan_out_subscribers": args.fan_out_subscribers,
    });
    let report = json!({ "command": command, "machine": machine, "parameters": parameters, "figures": figures });
    std::fs::write(args.out.join("bench.json"), serde_json::to_string_pretty(&report)? + "\n")?;

    // The table: every figure against the bare module's figure of the same scenario.
    let batched_name = "publish, batched";
    let mut rows = vec![
        Row { scenario: batched_name, path: "bare insert-only module (SDK)".into(), events_per_sec: Some(bare.events_per_sec), baseline: Some(bare.events_per_sec), note: format!("{} per call, {} streams", args.batch, args.streams) },
        Row { scenario: batched_name, path: "Khala `publish_segment` (SDK, one encoded segment per call)".into(), events_per_sec: Some(sdk.events_per_sec), baseline: Some(bare.events_per_sec), note: String::new() },
    ];
    if let Some(http) = http {
        rows.push(Row { scenario: batched_name, path: "Khala `publish` (HTTP JSON)".into(), events_per_sec: Some(http), baseline: Some(bare.events_per_sec), note: String::new() });
    }
    let missing = || format!("not run: install `{}`", redis_base::PACKAGE);
    rows.push(Row { scenario: batched_name, path: "Redis XADD, pipelined".into(), events_per_sec: redis_pipelined.as_ref().map(|r| r.events_per_sec), baseline: Some(bare.events_per_sec), note: if redis_binary.is_some() { format!("{} per pipeline", args.batch) } else { missing() } });
    let mirror_row = |path: &str, run: &MirrorRun| Row {
        scenario: batched_name,
        path: path.into(),
        events_per_sec: Some(run.durable_per_sec),
        baseline: Some(bare.events_per_sec),
        note: format!(
            "to a durable cursor ({:.1} s of the {:.1} s run wait for the last commits to be durable); {} events/s while publishing",
            run.final_wait_secs,
            run.elapsed_secs,
            grouped(run.publishing_per_sec)
        ),
    };
    rows.push(mirror_row("`khala mirror`, JSONL file → module (SDK)", &mirror));
    if let Some(outbox) = &outbox {
        rows.push(mirror_row("`khala mirror`, Postgres outbox → module (SDK)", outbox));
    }
    let unbatched_name = "publish, unbatched";
    rows.push(Row { scenario: unbatched_name, path: "bare insert-only module (SDK)".into(), events_per_sec: Some(unbatched_bare.events_per_sec), baseline: Some(unbatched_bare.events_per_sec), note: format!("1 per call, {} in flight", args.unbatched_streams) });
    rows.push(Row { scenario: unbatched_name, path: "Khala `publish_segment` (SDK)".into(), events_per_sec: Some(unbatched_sdk.events_per_sec), baseline: Some(unbatched_bare.events_per_sec), note: String::new() });
    rows.push(Row { scenario: unbatched_name, path: "Redis XADD, unpipelined".into(), events_per_sec: redis_unpipelined, baseline: Some(unbatched_bare.events_per_sec), note: if redis_binary.is_some() { format!("{} connections, 1 in flight each", args.unbatched_streams) } else { missing() } });
    rows.push(Row { scenario: "replay", path: "Khala client (`khala tail`, fresh)".into(), events_per_sec: replay["events_per_sec"].as_f64(), baseline: None, note: format!("{} MiB peak RSS", replay["peak_rss_mib"]) });
    rows.push(Row { scenario: "replay", path: "Redis XRANGE".into(), events_per_sec: redis_xrange, baseline: None, note: if redis_binary.is_some() { format!("COUNT {}", args.batch) } else { missing() } });

    let mut md = String::new();
    md.push_str("| scenario | path | events/s | × bare | |\n|---|---|---|---|---|\n");
    for r in &rows {
        let rate = r.events_per_sec.map(grouped).unwrap_or_else(|| "—".into());
        let x = match (r.events_per_sec, r.baseline) {
            (Some(v), Some(b)) => format!("{:.2}", v / b),
            _ => "—".into(),
        };
        md.push_str(&format!("| {} | {} | {} | {} | {} |\n", r.scenario, r.path, rate, x, r.note));
    }
    md.push_str(&format!("\nThe 0→{} curve, events/s per slice of {} events (mean; lowest and highest slice against it):\n\n", chart::si(args.events as f64), chart::si(every as f64)));
    md.push_str("| path | mean | lowest | highest |\n|---|---|---|---|\n");
    let mut curves: Vec<(&str, &[(u64, f64)])> = vec![("bare insert-only module (SDK)", &bare.curve), ("Khala `publish_segment` (SDK)", &sdk.curve)];
    if let Some(r) = &redis_pipelined {
        curves.push(("Redis XADD, pipelined", &r.curve));
    }
    for (name, curve) in &curves {
        let f = flatness(curve);
        if !f.is_null() {
            let pct = |k: &str| f[k].as_f64().unwrap_or(0.0);
            md.push_str(&format!("| {name} | {} | {:+}% | {:+}% |\n", grouped(pct("mean_events_per_sec")), pct("min_pct"), pct("max_pct")));
        }
    }
    md.push_str(&format!(
        "\n`{command}`; {} cores ({}), kernel {}, commit {}{}; load average at start {}.\n",
        report["machine"]["nproc"],
        report["machine"]["cpu"].as_str().unwrap_or("?"),
        report["machine"]["kernel"].as_str().unwrap_or("?"),
        report["machine"]["commit"].as_str().map(|c| &c[..c.len().min(10)]).unwrap_or("?"),
        if report["machine"]["worktree_dirty"] == json!(true) { " (with uncommitted changes)" } else { "" },
        report["machine"]["loadavg_at_start"].as_str().unwrap_or("?"),
    ));
    md.push_str("\nLatency, one event per `publish` call at a steady rate, timed from the send to the subscriber's handler (Khala: a real client per granted identity) or insert callback (bare module; with one RLS rule, each subscriber has its own query plan as with Khala), and for Khala to the `persist` before its checkpoint write:\n\n");
    md.push_str("| subscribers | events/s | path | sent | delivered | missing | p50 | p99 | max | to checkpoint p99 | database thread: busy; per call, reducer + update |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for l in &latency {
        for (path, r, hop) in [
            ("Khala", &l["khala"], "publish_to_handler"),
            ("bare module", &l["bare"], "publish_to_callback"),
            ("bare module, one RLS rule", &l["bare_rls"], "publish_to_callback"),
        ] {
            let ms = |k: &str| r[hop][k].as_f64().map_or("—".to_string(), |v| format!("{v} ms"));
            let durable = r["publish_to_durable_checkpoint"]["p99_ms"].as_f64().map_or("—".to_string(), |v| format!("{v} ms"));
            let server = &r["server"];
            let thread = match (server["database_thread_busy"].as_f64(), server["reducer_cpu_us_per_call"].as_f64(), server["update_cpu_us_per_call"].as_f64()) {
                (Some(busy), Some(reducer), Some(update)) => format!("{:.0}%; {reducer} + {update} µs", busy * 100.0),
                _ => "—".to_string(),
            };
            md.push_str(&format!(
                "| {} | {} | {path} | {} | {} | {} | {} | {} | {} | {durable} | {thread} |\n",
                l["subscribers"], l["rate"], r["sent"], r["delivered"], r["missing"], ms("p50_ms"), ms("p99_ms"), ms("max_ms")
            ));
        }
    }
    std::fs::write(args.out.join("bench.md"), &md)?;

    let mut series = vec![
        Series { name: "bare insert-only module", colour: "#555555", points: &bare.curve },
        Series { name: "Khala publish (SDK)", colour: "#d62728", points: &sdk.curve },
    ];
    if let Some(r) = &redis_pipelined {
        series.push(Series { name: "Redis XADD (pipelined)", colour: "#1f77b4", points: &r.curve });
    }
    let title = format!("Publish rate against events held: {} × {} B, {} per call, {} streams", chart::si(args.events as f64), args.payload_bytes, args.batch, args.streams);
    let note = format!(
        "{} cores, one machine for server and load; commit {}; khala bench all",
        report["machine"]["nproc"],
        report["machine"]["commit"].as_str().map(|c| &c[..c.len().min(10)]).unwrap_or("?")
    );
    std::fs::write(args.out.join("bench.svg"), chart::svg(&title, &note, &series))?;

    print!("{md}");
    eprintln!("wrote {0}/bench.md, {0}/bench.json, {0}/bench.svg", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_and_flatness() {
        assert_eq!(grouped(1_234_567.4), "1 234 567");
        assert_eq!(grouped(999.0), "999");
        let f = flatness(&[(1, 90.0), (2, 100.0), (3, 110.0)]);
        assert_eq!(f["mean_events_per_sec"], json!(100.0));
        assert_eq!((f["min_pct"].as_f64(), f["max_pct"].as_f64()), (Some(-10.0), Some(10.0)));
        assert!(flatness(&[]).is_null());
    }
}

//! `khala bench mirror`: the mirror end to end (an authority log → the module, durable
//! cursor on), over each transport, against the bare insert-only module fed the same
//! number of events in the same run.
//!
//! The mirror runs as users run it: the `khala mirror` binary, as a publisher identity
//! (not the owner), reading a JSONL file (and, with `--postgres`, the outbox table). Two
//! figures per run, both from the mirror's own summary:
//! - publishing: events / the time from start to the last commit;
//! - durable: events / the whole run, until the cursor is durable (the server flushes its
//!   commit log about every 500 ms, and the mirror confirms durability by reading the
//!   stream heads `--durable-after-ms` after each commit).

use super::{private_server, publish_bare, PublishArgs};
use anyhow::Context;
use clap::Args;
use khala_tools::api::Api;
use khala_tools::grants;
use khala_tools::mirror::publisher::Transport;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Debug)]
pub struct MirrorBenchArgs {
    /// Authority events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Topics (one stream each) the events are spread over.
    #[arg(long, default_value_t = 4)]
    pub topics: u32,
    /// Canonical JSON bytes per payload.
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// The mirror's `--batch-events` (and the bare module's events per call).
    #[arg(long, default_value_t = 1_000)]
    pub batch: u64,
    /// The mirror's `--durable-after-ms`.
    #[arg(long, default_value_t = 2_000)]
    pub durable_after_ms: u64,
    /// Also mirror the same number of events from the outbox of this PostgreSQL database
    /// (its `khala_outbox` table is created if missing and must be empty).
    #[arg(long)]
    pub postgres: Option<String>,
    /// Leave out the HTTP JSON transport.
    #[arg(long)]
    pub skip_http: bool,
}

/// One mirror run's figures.
pub struct MirrorRun {
    pub label: String,
    pub published: u64,
    pub publishing_per_sec: f64,
    pub durable_per_sec: f64,
    pub elapsed_secs: f64,
    /// From the last commit to the mirror's exit: mostly the wait for the durable cursor
    /// (`--durable-after-ms`, then a head read), a latency every run pays once at its end
    /// (the cursor keeps the publishing pace, that far behind), and the shutdown.
    pub final_wait_secs: f64,
}

/// A mirror run of `args.events` synthetic events over `args.topics` topics from a JSONL
/// file (written under `dir`, removed after), into a fresh database `db`.
pub fn mirror_file(api: &Api, owner_token: &str, db: &str, dir: &Path, args: &MirrorBenchArgs, transport: Transport) -> anyhow::Result<MirrorRun> {
    let log = dir.join(format!("{db}.jsonl"));
    write_log(&log, args)?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let run = run_file(api, &wasm, owner_token, db, dir, args, transport, &log);
    let _ = std::fs::remove_file(&log);
    run
}

/// A mirror run of `args.events` synthetic events from the outbox of the PostgreSQL
/// database at `pg` (its `khala_outbox` must be empty; the schema is applied if missing),
/// into a fresh database `db`.
pub fn mirror_outbox(api: &Api, owner_token: &str, db: &str, dir: &Path, args: &MirrorBenchArgs, pg: &str) -> anyhow::Result<MirrorRun> {
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    run_outbox(api, &wasm, owner_token, db, dir, args, pg)
}

/// Mirrors a freshly filled outbox at `pg` into a fresh database `db` over the SDK.
fn run_outbox(api: &Api, wasm: &[u8], owner_token: &str, db: &str, dir: &Path, args: &MirrorBenchArgs, pg: &str) -> anyhow::Result<MirrorRun> {
    let rows = fill_outbox(pg, args.events, args.topics, args.payload_bytes)?;
    let token_file = prepare(api, db, wasm, owner_token, dir)?;
    let input = ["--postgres".to_string(), pg.to_string(), "--once".to_string(), "--cursor-name".to_string(), "khala-bench".to_string()];
    run_mirror("Postgres outbox, sdk", api.base_url(), db, &token_file, &dir.join(db), Transport::Sdk, args, &input, rows)
}

/// The synthetic authority log the mirror reads.
fn write_log(path: &Path, args: &MirrorBenchArgs) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    khala_tools::mirror::gen::write_events(&mut out, args.events, args.payload_bytes, args.topics, 42)?;
    Ok(std::io::Write::flush(&mut out)?)
}

/// Mirrors the JSONL file `log` into a fresh database `db` over `transport`.
#[allow(clippy::too_many_arguments)]
fn run_file(api: &Api, wasm: &[u8], owner_token: &str, db: &str, dir: &Path, args: &MirrorBenchArgs, transport: Transport, log: &Path) -> anyhow::Result<MirrorRun> {
    let token_file = prepare(api, db, wasm, owner_token, dir)?;
    let input = ["--input".to_string(), log.display().to_string()];
    run_mirror(&format!("JSONL file, {}", transport.name()), api.base_url(), db, &token_file, &dir.join(db), transport, args, &input, args.events)
}

pub fn mirror(args: MirrorBenchArgs) -> anyhow::Result<()> {
    let command = format!(
        "khala bench mirror --events {} --topics {} --payload-bytes {} --batch {} --durable-after-ms {}{}{}",
        args.events,
        args.topics,
        args.payload_bytes,
        args.batch,
        args.durable_after_ms,
        if args.postgres.is_some() { " --postgres URL" } else { "" },
        if args.skip_http { " --skip-http" } else { "" }
    );
    let (server, dir) = private_server()?;
    let url = server.url();
    let api = Api::new(&url);
    let owner = api.new_identity()?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let bare_wasm = std::fs::read(khala_tools::module_wasm::build_bare_module()?)?;
    let log = dir.path().join("authority.jsonl");
    write_log(&log, &args)?;

    api.publish_module("mir-bare", &bare_wasm, &owner.token, false)?;
    let bare_args = PublishArgs { events: args.events, batch: args.batch, streams: u64::from(args.topics), payload_bytes: args.payload_bytes, curve_every: 0, skip_http: true, connections: 1 };
    let bare = publish_bare(&url, "mir-bare", &owner.token, &bare_args)?.events_per_sec;

    let mut transports = vec![Transport::Sdk];
    if !args.skip_http {
        transports.push(Transport::Http);
    }
    let mut runs = Vec::new();
    for transport in transports {
        runs.push(run_file(&api, &wasm, &owner.token, &format!("mir-{}", transport.name()), dir.path(), &args, transport, &log)?);
    }
    if let Some(pg) = &args.postgres {
        runs.push(run_outbox(&api, &wasm, &owner.token, "mir-pg", dir.path(), &args, pg)?);
    }

    let ratio = |x: f64| (x / bare * 1000.0).round() / 1000.0;
    println!("| path | events/s publishing | × bare | events/s to durable | × bare | of which the final wait |");
    println!("|---|---|---|---|---|---|");
    println!("| bare insert-only module (SDK, {} per call, {} streams) | {:.0} | 1.00 | | | |", args.batch, args.topics, bare);
    for r in &runs {
        println!(
            "| `khala mirror`, {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1} s of {:.1} s |",
            r.label,
            r.publishing_per_sec,
            ratio(r.publishing_per_sec),
            r.durable_per_sec,
            ratio(r.durable_per_sec),
            r.final_wait_secs,
            r.elapsed_secs
        );
    }
    let figures: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "path": r.label,
                "published": r.published,
                "publishing_events_per_sec": r.publishing_per_sec.round(),
                "publishing_to_bare": ratio(r.publishing_per_sec),
                "durable_events_per_sec": r.durable_per_sec.round(),
                "durable_to_bare": ratio(r.durable_per_sec),
                "elapsed_secs": (r.elapsed_secs * 100.0).round() / 100.0,
                "final_wait_secs": (r.final_wait_secs * 100.0).round() / 100.0,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&json!({ "command": command, "bare_sdk_events_per_sec": bare.round(), "mirror": figures }))?);
    Ok(())
}

/// A database for one run and a new publisher identity granted `runtime.*` on it, as
/// the mirror runs (not the owner); returns the file under `dir` holding its token.
fn prepare(api: &Api, db: &str, wasm: &[u8], owner_token: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    api.publish_module(db, wasm, owner_token, false)?;
    let publisher = api.new_identity()?;
    grants::make_publisher(api, db, owner_token, &publisher.identity, &[grants::MIRROR_PATTERN], grants::STANDING_TTL_SECS)?;
    let token_file = dir.join(format!("{db}.token"));
    std::fs::write(&token_file, &publisher.token)?;
    Ok(token_file)
}

#[allow(clippy::too_many_arguments)]
fn run_mirror(label: &str, url: &str, db: &str, token_file: &Path, state_dir: &Path, transport: Transport, args: &MirrorBenchArgs, input: &[String], expected: u64) -> anyhow::Result<MirrorRun> {
    let progress = khala_tools::progress::spinner(format!("khala mirror ({label})"));
    let output = Command::new(std::env::current_exe()?)
        .arg("mirror")
        .args(input)
        .args(["--server", url, "--database", db])
        .arg("--token-file")
        .arg(token_file)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--batch-events", &args.batch.to_string(), "--durable-after-ms", &args.durable_after_ms.to_string()])
        .args(["--transport", transport.name()])
        .env("RUST_LOG", khala_tools::CHILD_LOG_FILTER)
        .output()?;
    progress.finish_and_clear();
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "the mirror ({label}) failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let summary: Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).with_context(|| format!("the mirror ({label}) printed no summary"))?;
    let number = |key: &str| summary[key].as_f64().with_context(|| format!("the mirror's summary has no {key}"));
    let published = number("published")? as u64;
    anyhow::ensure!(published == expected, "the mirror ({label}) published {published} of {expected} events");
    let elapsed_secs = number("elapsed_secs")?;
    let final_wait_secs = (elapsed_secs - number("publish_secs")?).max(0.0);
    Ok(MirrorRun { label: label.into(), published, publishing_per_sec: number("events_per_sec")?, durable_per_sec: published as f64 / elapsed_secs, elapsed_secs, final_wait_secs })
}

/// `events` outbox rows over `topics` topics, each payload padded to about
/// `payload_bytes` of canonical JSON, written by PostgreSQL itself; returns the rows
/// written (`events` rounded down to a multiple of `topics`).
fn fill_outbox(url: &str, events: u64, topics: u32, payload_bytes: usize) -> anyhow::Result<u64> {
    let applied = khala_tools::mirror::outbox::migrate(url)?;
    log::info!("outbox migrations applied: {applied:?}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let held: i64 = client.query_one("SELECT count(*) FROM khala_outbox", &[]).await?.get(0);
        anyhow::ensure!(held == 0, "khala_outbox already holds {held} rows; the bench needs an empty one");
        // A cursor left by an earlier run would skip these rows (ids restart after
        // `TRUNCATE … RESTART IDENTITY`).
        client.execute("DELETE FROM khala_mirror_cursor WHERE name = $1", &[&"khala-bench"]).await?;
        let per_topic = events / u64::from(topics);
        let pad = payload_bytes.saturating_sub(r#"{"s":,"t":,"pad":""}"#.len() + 8);
        client
            .batch_execute(&format!(
                "INSERT INTO khala_outbox (topic, seq, kind, payload, occurred_at) \
                 SELECT 'run:' || t || ':events', s, 'bench.event', jsonb_build_object('t', t, 's', s, 'pad', repeat('x', {pad})), now() \
                 FROM generate_series(1, {per_topic}) s, generate_series(0, {}) t ORDER BY s, t",
                topics - 1
            ))
            .await?;
        Ok(per_topic * u64::from(topics))
    })
}

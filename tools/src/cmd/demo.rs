//! `khala demo`: Khala's main job on the local default, end to end, with a short summary:
//! start the server and publish the module (`khala up`), write an authority log, mirror
//! it into the module, replay it with a fresh client as a granted non-owner identity, and
//! check that the authority, the module and the client hold the same events.

use super::up::{self, UpArgs};
use anyhow::Context;
use clap::Args;
use khala_tools::api::Api;
use khala_tools::mirror::mapping::topic_to_stream;
use khala_tools::parity;
use khala_tools::server::ServerDir;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub up: UpArgs,
    /// Authority events to mirror.
    #[arg(long, default_value_t = 30_000)]
    pub events: u64,
    /// Topics (`run:<n>:events`) they are spread over.
    #[arg(long, default_value_t = 3)]
    pub topics: u32,
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
}

fn khala() -> anyhow::Result<Command> {
    Ok(Command::new(std::env::current_exe()?))
}

/// The reader identity of the demo, kept across runs.
fn reader(api: &Api, dir: &Path) -> anyhow::Result<(String, std::path::PathBuf)> {
    let token = dir.join("reader.token");
    let identity = dir.join("reader.identity");
    if let (Ok(id), true) = (std::fs::read_to_string(&identity), token.exists()) {
        return Ok((id.trim().to_string(), token));
    }
    let creds = api.new_identity()?;
    std::fs::write(&token, &creds.token)?;
    std::fs::write(&identity, &creds.identity)?;
    Ok((creds.identity, token))
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let database = args.up.database.clone();
    let data_dir = args.up.data_dir.clone();
    if args.up.clear {
        // A wiped database holds nothing the mirror's cursor says it has: start it over too.
        let _ = std::fs::remove_dir_all(data_dir.join("demo").join("mirror"));
    }
    up::run(args.up)?;
    let server_dir = ServerDir { root: data_dir };
    let env: std::collections::BTreeMap<String, String> =
        khala_tools::envfile::parse(&std::fs::read_to_string(server_dir.env_file())?).into_iter().collect();
    let url = env.get(khala_tools::envfile::SERVER_URL).context("the env file names no server")?.clone();
    let owner_token_file = server_dir.token_file();
    let owner_token = std::fs::read_to_string(&owner_token_file)?.trim().to_string();
    let api = Api::new(&url);
    let demo = server_dir.root.join("demo");
    std::fs::create_dir_all(&demo)?;

    // 1. The authority's log (the same events on every run, so a rerun is all duplicates).
    let authority = demo.join(format!("authority-{}x{}.jsonl", args.events, args.payload_bytes));
    if !authority.exists() {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&authority)?);
        khala_tools::mirror::gen::write_events(&mut out, args.events, args.payload_bytes, args.topics, 42)?;
    }
    println!("\n== authority log: {} events over {} topics in {}", args.events, args.topics, authority.display());

    // 2. The mirror publishes it through the `publish` reducer, as the publisher identity
    //    `khala up` made (granted `runtime.*`), not the owner.
    println!("== mirror");
    let status = khala()?
        .arg("mirror")
        .arg("--input")
        .arg(&authority)
        .args(["--server", &url, "--database", &database])
        .arg("--token-file")
        .arg(server_dir.mirror_token_file())
        .arg("--state-dir")
        .arg(demo.join("mirror"))
        .env("RUST_LOG", khala_tools::CHILD_LOG_FILTER)
        .status()?;
    anyhow::ensure!(status.success(), "the mirror failed ({status})");

    // 3. A granted, non-owner client replays the streams from scratch to live.
    let streams: Vec<String> = (0..args.topics).map(|i| topic_to_stream(&format!("run:{i}:events"))).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (reader_id, reader_token) = reader(&api, &demo)?;
    for s in &streams {
        api.call(&database, "grant", json!([khala_tools::api::identity_arg(&reader_id), s, ["subscribe", "ack"], 3600]), &owner_token)?;
    }
    let client_log = demo.join("client.jsonl");
    let checkpoint = demo.join(format!("client-{}.checkpoint", std::process::id()));
    let mut tail = khala()?;
    tail.args(["tail", "--json", "--exit-when-live", "--report", "--server", &url, "--database", &database]).arg("--token-file").arg(&reader_token).arg("--checkpoint").arg(&checkpoint);
    for s in &streams {
        tail.args(["--stream", s]);
    }
    let out = tail.env("RUST_LOG", khala_tools::CHILD_LOG_FILTER).stdout(Stdio::from(std::fs::File::create(&client_log)?)).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = stderr.lines().rev().find_map(|l| serde_json::from_str(l).ok()).with_context(|| format!("the client printed no report:\n{stderr}"))?;
    anyhow::ensure!(out.status.success(), "the client failed:\n{stderr}");
    let _ = std::fs::remove_file(&checkpoint);
    let _ = std::fs::remove_file(checkpoint.with_extension("checkpoint.health.json"));
    println!(
        "== client: {} events applied in {} s ({} events/s, peak RSS {} MiB), log in {}",
        report["applied"],
        report["secs"],
        report["events_per_sec"],
        report["peak_rss_mib"],
        client_log.display()
    );

    // 4. Parity: authority = module = client, by seq and hash.
    let authority_log = parity::authority_log(&authority)?;
    let module_log = parity::module_log(&api, &database, &owner_token, &streams)?;
    let client = parity::client_log(&client_log)?;
    let mut diffs = parity::compare("authority", &authority_log, "module", &module_log);
    diffs.extend(parity::compare("module", &module_log, "client", &client));
    println!(
        "== parity: authority {} / module {} / client {} events over {} streams: {}",
        parity::total(&authority_log),
        parity::total(&module_log),
        parity::total(&client),
        streams.len(),
        if diffs.is_empty() { "identical (seqs, payload hashes, chain hashes)".to_string() } else { format!("{} differences", diffs.len()) }
    );
    for d in diffs.iter().take(10) {
        println!("   {d}");
    }
    anyhow::ensure!(diffs.is_empty(), "parity failed");
    println!("== done; `khala status` shows the streams, `khala down` stops the server");
    Ok(())
}

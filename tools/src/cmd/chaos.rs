//! `khala chaos`: failure drills against a private server, each checked end to end by
//! parity (authority = module = client, by seq and hash). Results go to
//! `<out>/results.jsonl` and `<out>/SUMMARY.md`; the command fails if any drill fails.
//! Long-running by design, so not part of the test suite.

use super::bench::private_server;
use anyhow::Context;
use clap::Args;
use khala_tools::api::{identity_arg, Api, Credentials};
use khala_tools::engine::Engine;
use khala_tools::grants;
use khala_tools::mirror::mapping::topic_to_stream;
use khala_tools::parity;
use khala_tools::server::{Lifetime, ServerProcess};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Where results.jsonl and SUMMARY.md go.
    #[arg(long, default_value = "chaos-results")]
    pub out: PathBuf,
    /// Authority events per drill.
    #[arg(long, default_value_t = 60_000)]
    pub events: u64,
}

/// What every drill works with.
struct Rig {
    server: ServerProcess,
    engine: Engine,
    api: Api,
    owner: Credentials,
    /// The mirror's publisher identity (granted `runtime.*` on every drill database).
    mirror: Credentials,
    mirror_token_file: PathBuf,
    dir: PathBuf,
    wasm: Vec<u8>,
}

const TOPICS: u32 = 3;

impl Rig {
    fn database(&self, name: &str) -> anyhow::Result<()> {
        self.api.publish_module(name, &self.wasm, &self.owner.token, false)?;
        grants::make_publisher(&self.api, name, &self.owner.token, &self.mirror.identity, &[grants::MIRROR_PATTERN], 24 * 3600)?;
        Ok(())
    }

    fn authority(&self, name: &str, events: u64) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{name}.jsonl"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        khala_tools::mirror::gen::write_events(&mut out, events, 256, TOPICS, 7)?;
        Ok(path)
    }

    fn mirror(&self, database: &str, input: &Path, state: &str) -> anyhow::Result<Child> {
        let mut c = self.base(database)?;
        c.arg("mirror").arg("--input").arg(input).arg("--state-dir").arg(self.dir.join(state));
        c.arg("--token-file").arg(&self.mirror_token_file).stdout(Stdio::null()).stderr(Stdio::null());
        Ok(c.spawn()?)
    }

    fn base(&self, database: &str) -> anyhow::Result<Command> {
        let mut c = Command::new(std::env::current_exe()?);
        c.env("RUST_LOG", "warn").env("KHALA_ENV_FILE", self.dir.join("none.env"));
        c.env("KHALA_SERVER_URL", self.server.url()).env("KHALA_DATABASE", database);
        Ok(c)
    }

    fn streams() -> Vec<String> {
        (0..TOPICS).filter_map(|i| topic_to_stream(&format!("run:{i}:events")).ok()).collect()
    }

    /// A granted non-owner reader's token file.
    fn reader(&self, database: &str) -> anyhow::Result<PathBuf> {
        let reader = self.api.new_identity()?;
        for s in Self::streams() {
            self.api.call(database, "grant", json!([identity_arg(&reader.identity), s, ["subscribe", "ack"], 3600]), &self.owner.token)?;
        }
        let path = self.dir.join(format!("{database}-{}.token", &reader.identity[..8]));
        std::fs::write(&path, &reader.token)?;
        Ok(path)
    }

    fn tail(&self, database: &str, token: &Path, checkpoint: &Path, log: &Path) -> anyhow::Result<Child> {
        let mut c = self.base(database)?;
        c.args(["tail", "--json", "--exit-when-live"]).arg("--token-file").arg(token).arg("--checkpoint").arg(checkpoint);
        for s in Self::streams() {
            c.args(["--stream", &s]);
        }
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        Ok(c.stdout(Stdio::from(out)).stderr(Stdio::null()).spawn()?)
    }

    fn wait(&self, mut child: Child, what: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(status.success(), "{what} exited with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!("{what} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Parity of authority, module and (deduplicated by seq) client logs.
    fn parity(&self, database: &str, input: &Path, client_log: &Path) -> anyhow::Result<(Vec<String>, usize)> {
        let authority = parity::authority_log(input)?;
        let module = parity::module_log(&self.api, database, &self.owner.token, &Self::streams())?;
        let mut client = parity::client_log(client_log)?;
        let mut redelivered = 0;
        for entries in client.values_mut() {
            let before = entries.len();
            let mut last = 0;
            entries.retain(|e| {
                let keep = e.seq > last;
                last = last.max(e.seq);
                keep
            });
            redelivered += before - entries.len();
        }
        let mut diffs = parity::compare("authority", &authority, "module", &module);
        diffs.extend(parity::compare("module", &module, "client", &client));
        Ok((diffs, redelivered))
    }
}

/// The server dies (kill -9) while the mirror publishes, and again right after.
fn server_kill_mid_mirror(rig: &mut Rig, events: u64) -> anyhow::Result<Value> {
    let db = "chaos-server-kill";
    rig.database(db)?;
    let input = rig.authority(db, events)?;
    let mirror = rig.mirror(db, &input, "server-kill-mirror")?;
    let mut kills = 0;
    for delay in [800u64, 1500] {
        std::thread::sleep(Duration::from_millis(delay));
        rig.server.kill9();
        rig.server.restart(&rig.engine, Lifetime::TiedToThisProcess, Duration::from_secs(60))?;
        kills += 1;
    }
    rig.wait(mirror, "the mirror", Duration::from_secs(300))?;
    let token = rig.reader(db)?;
    let log = rig.dir.join(format!("{db}-client.jsonl"));
    rig.wait(rig.tail(db, &token, &rig.dir.join(format!("{db}.checkpoint")), &log)?, "the client", Duration::from_secs(120))?;
    let (diffs, redelivered) = rig.parity(db, &input, &log)?;
    Ok(json!({ "server_kills": kills, "differences": diffs, "client_redelivered": redelivered }))
}

/// The client is killed (SIGKILL) mid-replay and restarted from its checkpoint.
fn client_kill_mid_apply(rig: &mut Rig, events: u64) -> anyhow::Result<Value> {
    let db = "chaos-client-kill";
    rig.database(db)?;
    let input = rig.authority(db, events)?;
    rig.wait(rig.mirror(db, &input, "client-kill-mirror")?, "the mirror", Duration::from_secs(300))?;
    let token = rig.reader(db)?;
    let checkpoint = rig.dir.join(format!("{db}.checkpoint"));
    let log = rig.dir.join(format!("{db}-client.jsonl"));
    let mut kills = 0;
    for after in [150u64, 300] {
        let mut tail = rig.tail(db, &token, &checkpoint, &log)?;
        std::thread::sleep(Duration::from_millis(after));
        if tail.try_wait()?.is_none() {
            tail.kill()?;
            kills += 1;
        }
        let _ = tail.wait();
    }
    rig.wait(rig.tail(db, &token, &checkpoint, &log)?, "the client", Duration::from_secs(120))?;
    let (diffs, redelivered) = rig.parity(db, &input, &log)?;
    Ok(json!({ "client_kills": kills, "differences": diffs, "client_redelivered_after_kill": redelivered }))
}

/// The same authority log goes through the mirror twice (a fresh state dir the second
/// time, as after losing the mirror's disk): nothing is published twice.
fn duplicated_mirror_input(rig: &mut Rig, events: u64) -> anyhow::Result<Value> {
    let db = "chaos-duplicate";
    rig.database(db)?;
    let input = rig.authority(db, events)?;
    rig.wait(rig.mirror(db, &input, "dup-mirror-1")?, "the first mirror", Duration::from_secs(300))?;
    rig.wait(rig.mirror(db, &input, "dup-mirror-2")?, "the second mirror", Duration::from_secs(300))?;
    let token = rig.reader(db)?;
    let log = rig.dir.join(format!("{db}-client.jsonl"));
    rig.wait(rig.tail(db, &token, &rig.dir.join(format!("{db}.checkpoint")), &log)?, "the client", Duration::from_secs(120))?;
    let (diffs, redelivered) = rig.parity(db, &input, &log)?;
    let duplicates: u64 = rig.api.sql(db, "SELECT duplicates FROM stream", &rig.owner.token)?.rows.iter().filter_map(|r| r.first().and_then(Value::as_u64)).sum();
    Ok(json!({ "differences": diffs, "module_duplicates_skipped": duplicates, "client_redelivered": redelivered }))
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let (server, tmp) = private_server()?;
    let api = Api::new(&server.url());
    let owner = api.new_identity()?;
    let mirror = api.new_identity()?;
    let mirror_token_file = tmp.path().join("mirror.token");
    std::fs::write(&mirror_token_file, &mirror.token)?;
    let wasm = std::fs::read(khala_tools::module_wasm::build_module()?)?;
    let mut rig = Rig { server, engine: Engine::locate()?, api, owner, mirror, mirror_token_file, dir: tmp.path().to_path_buf(), wasm };
    type Drill = fn(&mut Rig, u64) -> anyhow::Result<Value>;
    let drills: [(&str, Drill); 3] =
        [("server_kill_mid_mirror", server_kill_mid_mirror), ("client_kill_mid_apply", client_kill_mid_apply), ("duplicated_mirror_input", duplicated_mirror_input)];
    let mut results = std::fs::File::create(args.out.join("results.jsonl"))?;
    let mut summary = format!("# Chaos drills\n\n`khala chaos --events {}` ({} events over {TOPICS} streams per drill)\n\n| drill | result | secs | details |\n|---|---|---|---|\n", args.events, args.events);
    let mut failed = 0;
    for (name, drill) in drills {
        let started = Instant::now();
        let outcome = drill(&mut rig, args.events);
        let secs = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let (pass, details) = match outcome {
            Ok(d) => (d["differences"].as_array().is_some_and(|a| a.is_empty()), d),
            Err(e) => (false, json!({ "error": format!("{e:#}") })),
        };
        failed += usize::from(!pass);
        let line = json!({ "drill": name, "pass": pass, "secs": secs, "details": details });
        writeln!(results, "{line}")?;
        summary.push_str(&format!("| {name} | {} | {secs} | `{details}` |\n", if pass { "pass" } else { "FAIL" }));
        println!("{name}: {} ({secs} s) {details}", if pass { "pass" } else { "FAIL" });
    }
    std::fs::write(args.out.join("SUMMARY.md"), &summary).context("writing SUMMARY.md")?;
    println!("results in {}", args.out.display());
    anyhow::ensure!(failed == 0, "{failed} drill(s) failed");
    Ok(())
}

//! The subcommands: one file each, dispatched by one `match`.

mod admin;
mod bench;
mod chaos;
mod demo;
mod deploy;
mod down;
mod exporter;
mod mirror;
mod parity;
mod setup;
mod smoke;
mod status;
mod tail;
mod up;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "khala", version, about = "Khala: a sync lane on SpacetimeDB")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install what Khala needs: the wasm32 target and SpacetimeDB 1.2.0 (skipped when present).
    Setup,
    /// Start the local server (or reuse it), build the module and publish it.
    Up(up::UpArgs),
    /// Stop the local server that `khala up` started.
    Down(down::DownArgs),
    /// Show the server, the database and its streams.
    Status(status::StatusArgs),
    /// Mint a new identity and print it with its token (JSON).
    NewIdentity(admin::NewIdentityArgs),
    /// Grant an identity scopes on a stream, with a lease.
    Grant(admin::GrantArgs),
    /// Take an identity's grant on a stream back.
    Revoke(admin::RevokeArgs),
    /// Give or take a role (admin, publisher).
    Role(admin::RoleArgs),
    /// Set a stream's retention policy (how many events, how old).
    Retention(admin::RetentionArgs),
    /// Start a stream over in a new epoch (clients rebuild it; the mirror republishes it).
    ResetStream(admin::ResetStreamArgs),
    /// Follow streams as a Khala client: print applied events, checkpoint, ack, resume.
    Tail(tail::TailArgs),
    /// Serve the module's state (heads, floors, segments, grants, connected clients) as Prometheus gauges.
    Exporter(exporter::ExporterArgs),
    /// Mirror authority events (JSONL file, stdin or Postgres outbox) into the module.
    Mirror(mirror::MirrorArgs),
    /// Write synthetic authority events as JSONL to stdout (for measuring the mirror).
    GenEvents(mirror::GenEventsArgs),
    /// Measurements (against a private server): replay throughput and client memory.
    Bench(bench::BenchArgs),
    /// The main job end to end: up, mirror an authority log, replay it as a client, check parity.
    Demo(demo::DemoArgs),
    /// Publish the module to a server after checking its engine version and the schema change.
    Deploy(deploy::DeployArgs),
    /// Compare the authority's log, the module's log and a client's applied log.
    Parity(parity::ParityArgs),
    /// Failure drills against a private server, checked by parity (SUMMARY.md, results.jsonl).
    Chaos(chaos::ChaosArgs),
    /// The two-client handshake against a server, as an admin: grant, publish, deliver, revoke, clean up.
    Smoke(smoke::SmokeArgs),
}

/// Which server and database a command talks to, and as whom.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Server URL.
    #[arg(long, env = "KHALA_SERVER_URL", default_value = "http://127.0.0.1:3000")]
    pub server: String,
    /// Database name.
    #[arg(long, env = "KHALA_DATABASE", default_value = "khala-dev")]
    pub database: String,
    /// File holding the token to act with (the owner's, after `khala up`).
    #[arg(long, env = "KHALA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl Target {
    pub fn api(&self) -> khala_tools::api::Api {
        khala_tools::api::Api::new(&self.server)
    }

    pub fn token(&self) -> anyhow::Result<String> {
        let path = self.token_file.clone().ok_or_else(|| anyhow::anyhow!("no token: pass --token-file or set KHALA_TOKEN_FILE (run `khala up` first)"))?;
        let token = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?;
        Ok(token.trim().to_string())
    }
}

/// Prints a table without the padding comfy-table leaves at the end of each line.
pub(crate) fn print_table(table: &comfy_table::Table) {
    for line in table.to_string().lines() {
        println!("{}", line.trim_end());
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::Up(args) => up::run(args),
        Command::Down(args) => down::run(args),
        Command::Status(args) => status::run(args),
        Command::NewIdentity(args) => admin::new_identity(args),
        Command::Grant(args) => admin::grant(args),
        Command::Revoke(args) => admin::revoke(args),
        Command::Role(args) => admin::role(args),
        Command::Retention(args) => admin::retention(args),
        Command::ResetStream(args) => admin::reset_stream(args),
        Command::Tail(args) => tail::run(args),
        Command::Exporter(args) => exporter::run(args),
        Command::Mirror(args) => mirror::run(args),
        Command::GenEvents(args) => mirror::gen_events(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Deploy(args) => deploy::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Chaos(args) => chaos::run(args),
        Command::Smoke(args) => smoke::run(args),
    }
}

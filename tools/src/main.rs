//! `khala`: run a local Khala server, publish the module, manage grants, and inspect it.
//!
//! Exit codes: 0 success, 1 the command failed (the message starts with a stable error
//! code), 2 bad command-line usage (clap).

mod cmd;

use clap::Parser;

fn main() {
    // Settings written by `khala up` are defaults; flags and the environment win.
    let env_file = std::env::var_os("KHALA_ENV_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| khala_tools::paths::default_server_dir().join("khala.env"));
    khala_tools::envfile::load_defaults(&env_file);
    let cli = cmd::Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_log_filter(&cli.command))).format_timestamp_millis().init();

    if let Err(err) = cmd::run(cli) {
        eprintln!("khala: {}: {err:#}", code_of(&err));
        std::process::exit(1);
    }
}

/// `info`, except that the SDK's notes on closed sockets are quiet everywhere, and the
/// smoke's own clients (which are revoked on purpose) are quiet in smoke and deploy:
/// their table is the output. `RUST_LOG` overrides all of it.
fn default_log_filter(command: &cmd::Command) -> &'static str {
    match command {
        cmd::Command::Smoke(_) | cmd::Command::Deploy(_) => "info,khala_client=error,spacetimedb_sdk=error",
        _ => "info,spacetimedb_sdk=error",
    }
}

/// The stable code of a failure, from whichever library raised it.
fn code_of(err: &anyhow::Error) -> &'static str {
    if let Some(e) = err.downcast_ref::<khala_tools::ToolError>() {
        return e.code();
    }
    if let Some(e) = err.downcast_ref::<khala_tools::deploy::DeployError>() {
        return e.code();
    }
    if let Some(e) = err.downcast_ref::<khala_tools::smoke::SmokeFailed>() {
        return e.code();
    }
    if let Some(e) = err.downcast_ref::<khala_tools::mirror::MirrorError>() {
        return e.code();
    }
    if let Some(e) = err.downcast_ref::<khala_client::ClientError>() {
        return e.code();
    }
    "error"
}

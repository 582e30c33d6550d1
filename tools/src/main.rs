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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp_millis().init();

    let cli = cmd::Cli::parse();
    if let Err(err) = cmd::run(cli) {
        let code = err.downcast_ref::<khala_tools::ToolError>().map_or("error", |e| e.code());
        eprintln!("khala: {code}: {err:#}");
        std::process::exit(1);
    }
}

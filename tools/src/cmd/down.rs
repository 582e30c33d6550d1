//! `khala down`: stop the server `khala up` started, and only that one.

use clap::Args;
use khala_tools::server::{ServerDir, ServerProcess, MARKER};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DownArgs {
    #[arg(long, env = "KHALA_DATA_DIR", default_value_os_t = khala_tools::paths::default_server_dir())]
    pub data_dir: PathBuf,
}

pub fn run(args: DownArgs) -> anyhow::Result<()> {
    if !args.data_dir.join(MARKER).exists() {
        println!("no Khala server data in {}", args.data_dir.display());
        return Ok(());
    }
    let dir = ServerDir { root: args.data_dir.clone() };
    match ServerProcess::find(&dir) {
        Some(mut server) => {
            server.stop(Duration::from_secs(10));
            println!("stopped the server at {} (pid {})", server.url(), server.pid);
        }
        None => {
            // A stale pid file (the process is gone or is someone else's) is removed, the
            // process it names is left alone.
            let _ = std::fs::remove_file(dir.pid_file());
            println!("no Khala server is running for {}", dir.root.display());
        }
    }
    Ok(())
}

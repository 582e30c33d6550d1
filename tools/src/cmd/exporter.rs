//! `khala exporter`: serves the module's state (heads, floors, segments, bytes, grants,
//! connected clients, config) as Prometheus gauges; the work is in
//! `khala_tools::exporter`.

use super::Target;
use clap::Args;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ExporterArgs {
    /// The server, database and a token that sees every row (the owner's after `khala up`).
    #[command(flatten)]
    pub target: Target,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9465.
    #[arg(long)]
    pub metrics_addr: SocketAddr,
    /// Seconds between two reads of the module.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval_secs: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: ExporterArgs) -> anyhow::Result<()> {
    let config = khala_tools::exporter::Config {
        server: args.target.server.clone(),
        database: args.target.database.clone(),
        token: args.target.token()?,
        metrics_addr: args.metrics_addr,
        interval: Duration::from_secs(args.interval_secs),
    };
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
    }
    log::info!("serving the state of {} on {} as Prometheus text, read every {} s", config.database, config.metrics_addr, args.interval_secs);
    khala_tools::exporter::run(&config, &STOP)?;
    Ok(())
}

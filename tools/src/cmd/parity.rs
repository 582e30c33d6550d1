//! `khala parity`: compare the authority's JSONL log, the module's log and (optionally) a
//! client's applied log (`khala tail --json` output) by seq and hash.

use super::Target;
use clap::Args;
use khala_tools::parity;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ParityArgs {
    #[command(flatten)]
    pub target: Target,
    /// The authority's events (JSONL, the mirror's input format).
    #[arg(long)]
    pub input: PathBuf,
    /// A client's applied log, as `khala tail --json` printed it.
    #[arg(long)]
    pub client_log: Option<PathBuf>,
}

pub fn run(args: ParityArgs) -> anyhow::Result<()> {
    let mut authority = parity::authority_log(&args.input)?;
    let streams: Vec<String> = authority.keys().cloned().collect();
    let module = parity::module_log(&args.target.api(), &args.target.database, &args.target.token()?, &streams)?;
    let total = parity::total(&authority);
    let below_floor = parity::trim_below_floor(&mut authority, &module);
    let mut diffs = parity::compare("authority", &authority, "module", &module);
    if let Some(path) = &args.client_log {
        let (mut client, rebuilt_from) = parity::client_state(path)?;
        parity::trim_below_floor(&mut client, &module);
        // A stream the client rebuilt from a later floor holds nothing below it.
        let mut module = module.clone();
        parity::trim_below(&mut module, &rebuilt_from);
        diffs.extend(parity::compare("module", &module, "client", &client));
    }
    for d in &diffs {
        println!("{d}");
    }
    let floor_note = if below_floor > 0 { format!(" ({below_floor} below the retention floor, not compared)") } else { String::new() };
    println!("{} streams, {total} authority events{floor_note}: {}", streams.len(), if diffs.is_empty() { "parity ok" } else { "parity FAILED" });
    anyhow::ensure!(diffs.is_empty(), "{} differences", diffs.len());
    Ok(())
}

//! `khala smoke`: the two-client handshake against a server (`khala_tools::smoke`), as a
//! pass/fail table or one JSON object.

use super::Target;
use clap::Args;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use khala_tools::smoke::{run_smoke, Outcome, SmokeOptions};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct SmokeArgs {
    /// The token file must hold an admin identity's token (the owner's after `khala up`).
    #[command(flatten)]
    pub target: Target,
    /// The bound on every wait and every HTTP request, in seconds.
    #[arg(long, default_value_t = 20)]
    pub timeout_secs: u64,
    /// Events published before the revoke (one more follows it).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub events: u64,
    /// The lease of the grants the smoke gives, so they end by themselves if it is killed.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SmokeArgs) -> anyhow::Result<()> {
    let mut opts = SmokeOptions::new(args.target.server.as_str(), args.target.database.as_str(), args.target.token()?);
    opts.timeout = Duration::from_secs(args.timeout_secs.max(1));
    opts.events = args.events;
    opts.lease_secs = args.lease_secs;
    let report = run_smoke(&opts);
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("smoke  {} / {}  stream {}", report.server, report.database, report.stream_id);
        let mut table = Table::new();
        table.load_preset(comfy_table::presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(vec![
            Cell::new("check"),
            Cell::new("result"),
            Cell::new("ms").set_alignment(CellAlignment::Right),
            Cell::new("detail"),
        ]);
        for c in &report.checks {
            let detail = match &c.code {
                Some(code) => format!("{code}: {}", c.detail),
                None => c.detail.clone(),
            };
            let result = if c.outcome == Outcome::Fail { "FAIL" } else { c.outcome.name() };
            table.add_row(vec![Cell::new(c.check.name()), Cell::new(result), Cell::new(c.ms).set_alignment(CellAlignment::Right), Cell::new(detail)]);
        }
        super::print_table(&table);
        println!("{} in {} ms", if report.passed() { "passed" } else { "FAILED" }, report.ms);
    }
    if !report.passed() {
        return Err(khala_tools::smoke::SmokeFailed { checks: report.failures().map(|c| c.check.name()).collect() }.into());
    }
    Ok(())
}

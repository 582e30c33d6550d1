//! `khala chaos`: the fault drills (docs/RELIABILITY.md) against a private server, each
//! run `--runs` times from `--seed`. Writes `<out>/results.jsonl` (one line per run) and
//! `<out>/SUMMARY.md` (drill, runs, passes, events, faults injected, re-offers, worst
//! recovery), and fails if any run failed. `--short` is the CI version.

use anyhow::Context;
use clap::Args;
use khala_tools::faults::drills::{self, DrillRun, Settings};
use khala_tools::faults::rig::Rig;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Where results.jsonl and SUMMARY.md go.
    #[arg(long, default_value = "chaos-results")]
    pub out: PathBuf,
    /// Runs of each drill (run i uses seed S + i).
    #[arg(long, default_value_t = 1)]
    pub runs: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only this drill (repeat for more); default: every drill.
    #[arg(long = "drill")]
    pub drills: Vec<String>,
    /// The short version (CI): fewer events, kills, clients and shorter pauses.
    #[arg(long)]
    pub short: bool,
}

/// Runs the drills and writes the summary; `khala` here is the binary the mirror and
/// client processes run.
pub fn run_drills(args: &ChaosArgs, khala: PathBuf) -> anyhow::Result<Vec<DrillRun>> {
    let names: Vec<String> = if args.drills.is_empty() { drills::names().into_iter().map(String::from).collect() } else { args.drills.clone() };
    for name in &names {
        anyhow::ensure!(drills::names().contains(&name.as_str()), "unknown drill {name}; drills: {}", drills::names().join(", "));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut rig = Rig::start(khala)?;
    let mut results = std::fs::File::create(args.out.join("results.jsonl"))?;
    let mut all = Vec::new();
    let started = Instant::now();
    for name in &names {
        for i in 0..args.runs {
            let settings = Settings { seed: args.seed.wrapping_add(i), short: args.short };
            let run = drills::run(&mut rig, name, &settings);
            writeln!(results, "{}", serde_json::to_string(&run)?)?;
            results.flush()?;
            eprintln!(
                "{name} run {}/{} (seed {}): {} in {} s, {} events, {} faults {:?}, {} re-offers, worst recovery {} ms{}",
                i + 1,
                args.runs,
                settings.seed,
                if run.pass { "pass" } else { "FAIL" },
                run.secs,
                run.events,
                run.faults,
                run.faults_by_kind,
                run.reoffers,
                run.worst_recovery_ms,
                if run.problems.is_empty() { String::new() } else { format!("\n  {}", run.problems.join("\n  ")) }
            );
            all.push(run);
        }
    }
    let summary = summary(args, &all, started.elapsed().as_secs_f64());
    std::fs::write(args.out.join("SUMMARY.md"), &summary).context("writing SUMMARY.md")?;
    print!("{summary}");
    Ok(all)
}

/// The SUMMARY.md table: one row per drill.
pub fn summary(args: &ChaosArgs, runs: &[DrillRun], secs: f64) -> String {
    let mut by: BTreeMap<&str, Vec<&DrillRun>> = BTreeMap::new();
    for r in runs {
        by.entry(r.drill.as_str()).or_default().push(r);
    }
    let mut out = format!(
        "# Chaos drills\n\n`khala chaos --runs {} --seed {}{}` ({:.0} s in all)\n\n| drill | runs | passes | events | faults injected | re-offers | worst recovery |\n|---|---|---|---|---|---|---|\n",
        args.runs,
        args.seed,
        if args.short { " --short" } else { "" },
        secs
    );
    for name in drills::names() {
        let Some(rs) = by.get(name) else { continue };
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for r in rs {
            for (k, n) in &r.faults_by_kind {
                *kinds.entry(k).or_default() += n;
            }
        }
        let faults: u64 = rs.iter().map(|r| r.faults).sum();
        let detail = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {faults} ({detail}) | {} | {:.1} s |\n",
            rs.len(),
            rs.iter().filter(|r| r.pass).count(),
            rs.iter().map(|r| r.events).sum::<u64>(),
            rs.iter().map(|r| r.reoffers).sum::<u64>(),
            rs.iter().map(|r| r.worst_recovery_ms).max().unwrap_or(0) as f64 / 1000.0
        ));
    }
    let failed: Vec<String> = runs.iter().filter(|r| !r.pass).map(|r| format!("- {} (seed {}): {}", r.drill, r.seed, r.problems.join("; "))).collect();
    if !failed.is_empty() {
        out.push_str(&format!("\n## Failures\n\n{}\n", failed.join("\n")));
    }
    out
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let runs = run_drills(&args, std::env::current_exe()?)?;
    let failed = runs.iter().filter(|r| !r.pass).count();
    println!("results in {}", args.out.display());
    anyhow::ensure!(failed == 0, "drill_failed: {failed} of {} drill run(s) failed (see {})", runs.len(), args.out.join("SUMMARY.md").display());
    Ok(())
}

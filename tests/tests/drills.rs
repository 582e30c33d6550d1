//! The short version of every fault drill (`khala chaos --short`, docs/RELIABILITY.md),
//! so that a regression in crash, network or storm handling cannot land. Each test runs
//! its own private server, mirror and client processes (the drills kill and pause them),
//! and fails with the drill's findings. A drill also fails when its fault did not
//! happen, so none of these can pass by testing nothing.

use khala_tools::faults::drills::{self, DrillRun, Settings};
use khala_tools::faults::rig::Rig;

/// The seed CI uses; `KHALA_DRILL_SEED` replays another.
fn seed() -> u64 {
    std::env::var("KHALA_DRILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn drill(name: &str) -> DrillRun {
    let mut rig = Rig::start(khala_tests::bin::khala_bin()).unwrap_or_else(|e| panic!("{}: {e}", e.code()));
    let run = drills::run(&mut rig, name, &Settings { seed: seed(), short: true });
    eprintln!("{}", serde_json::to_string(&run).unwrap());
    assert!(run.pass, "{name} failed (seed {}):\n  {}", run.seed, run.problems.join("\n  "));
    assert!(run.faults >= 1, "{name}: no fault injected");
    run
}

#[test]
fn server_kill() {
    let run = drill("server_kill");
    assert!(run.faults_by_kind["server_kill_mid_publish"] >= 1);
}

#[test]
fn client_kill() {
    let run = drill("client_kill");
    assert!(run.faults_by_kind["client_kill_mid_apply"] >= 2);
}

#[test]
fn mirror_kill() {
    drill("mirror_kill");
}

#[test]
fn network_client() {
    drill("network_client");
}

#[test]
fn network_mirror() {
    drill("network_mirror");
}

#[test]
fn server_pause() {
    drill("server_pause");
}

#[test]
fn retention_overtakes() {
    drill("retention_overtakes");
}

#[test]
fn authority_divergence() {
    drill("authority_divergence");
}

#[test]
fn reconnect_storm() {
    drill("reconnect_storm");
}

#[test]
fn grant_expiry_storm() {
    drill("grant_expiry_storm");
}

#[test]
fn module_republish() {
    drill("module_republish");
}

#[test]
fn every_drill_has_a_test() {
    let source = include_str!("drills.rs");
    for name in drills::names() {
        assert!(source.contains(&format!("fn {name}()")), "no test for the drill {name}");
    }
}

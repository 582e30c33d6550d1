//! `khala smoke` against a real server: it passes on a fresh database and leaves nothing
//! granted behind, and it fails, naming the right check, when it should.

use khala_tests::bin::khala_bin;
use khala_tests::{shared_server, wait_for, TestDb};
use khala_tools::smoke::{run_smoke, Check, Outcome, SmokeOptions, SmokeReport};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn options(db: &TestDb, token: &str) -> SmokeOptions {
    let mut opts = SmokeOptions::new(db.url.as_str(), db.name.as_str(), token);
    opts.timeout = Duration::from_secs(20);
    opts
}

fn outcome(report: &SmokeReport, check: Check) -> Outcome {
    report.get(check).unwrap_or_else(|| panic!("no {} row in {:#}", check.name(), report.to_json())).outcome
}

/// The only failed check, by name.
fn failed(report: &SmokeReport) -> Vec<&'static str> {
    report.failures().map(|c| c.check.name()).collect()
}

#[test]
fn passes_against_a_fresh_database_and_cleans_up() {
    let db = shared_server().new_database("smoke-pass");
    let report = run_smoke(&options(&db, &db.owner.token));
    assert!(report.passed(), "the smoke failed: {:#}", report.to_json());
    for c in &report.checks {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {:?} {}", c.check.name(), c.outcome, c.detail);
    }
    assert!(report.stream_id.starts_with("smoke."), "{}", report.stream_id);
    assert!(report.get(Check::ConnectedCount).unwrap().detail.contains("presence shows 2 connected (was 0: exactly the smoke's two more)"), "{:#}", report.to_json());

    // As the owner (who sees every row): nothing the smoke gave is left.
    let quoted = format!("'{}'", report.stream_id);
    assert_eq!(db.sql(&format!("SELECT * FROM stream_grant WHERE stream_id = {quoted}")).rows.len(), 0, "stream grants left");
    assert_eq!(db.sql("SELECT * FROM publish_grant").rows.len(), 0, "publish grants left");
    let roles = db.sql("SELECT * FROM identity_role");
    assert_eq!(roles.rows.len(), 2, "only the owner's admin and publisher roles stay: {:?}", roles.rows);
    // The stream was published to, then reset: empty, in a new epoch.
    let stream = db.sql(&format!("SELECT * FROM stream WHERE stream_id = {quoted}"));
    assert_eq!(stream.rows.len(), 1);
    let row = &stream.rows[0];
    assert_eq!(stream.get(row, "head_seq"), Some(&json!(0)));
    assert_eq!(stream.get(row, "segment_count"), Some(&json!(0)));
    assert_eq!(stream.get(row, "epoch"), Some(&json!(2)), "published in epoch 1, reset to 2");
    wait_for("the smoke's clients to disconnect", Duration::from_secs(10), || {
        let presence = db.sql("SELECT * FROM presence");
        let connected = presence.rows.first().and_then(|r| presence.get(r, "connected")).and_then(Value::as_u64);
        (connected == Some(0)).then_some(())
    });
}

/// A deploy may run it as an admin that is not the owner (who bypasses row-level
/// security): the admin reads the connected count, and the publisher the stream.
#[test]
fn passes_as_an_admin_that_is_not_the_owner() {
    let db = shared_server().new_database("smoke-admin");
    let admin = db.new_identity();
    db.call("set_role", json!([admin.identity_arg(), "admin", true]));
    let report = run_smoke(&options(&db, &admin.token));
    assert!(report.passed(), "the smoke failed: {:#}", report.to_json());
    assert_eq!(outcome(&report, Check::CleanupStream), Outcome::Pass);
}

#[test]
fn fails_at_admin_with_a_token_that_is_not_an_admin() {
    let db = shared_server().new_database("smoke-noadmin");
    let stranger = db.new_identity();
    let report = run_smoke(&options(&db, &stranger.token));
    assert!(!report.passed());
    assert_eq!(failed(&report), ["admin"], "{:#}", report.to_json());
    assert_eq!(report.get(Check::Admin).unwrap().code.as_deref(), Some("unauthorized"));
    assert_eq!(outcome(&report, Check::Database), Outcome::Pass);
    for check in [Check::Identities, Check::Grants, Check::Delivery, Check::Revoke, Check::CleanupGrants, Check::CleanupPublisher] {
        assert_eq!(outcome(&report, check), Outcome::Skip, "{}", check.name());
    }
    assert_eq!(db.sql("SELECT * FROM stream").rows.len(), 0, "no stream was created");
}

#[test]
fn fails_at_database_when_the_database_is_missing() {
    let db = shared_server().new_database("smoke-missing");
    let mut opts = options(&db, &db.owner.token);
    opts.database = format!("{}-not-there", db.name);
    let report = run_smoke(&opts);
    assert_eq!(failed(&report), ["database"], "{:#}", report.to_json());
    assert_eq!(report.get(Check::Database).unwrap().code.as_deref(), Some("unknown_database"));
}

/// A check that fails midway (clients refused by the module) still cleans up everything.
#[test]
fn a_failed_check_still_cleans_up() {
    let db = shared_server().new_database("smoke-refused");
    db.call("set_protocol_window", json!([1, 1, "999.0.0"]));
    let mut opts = options(&db, &db.owner.token);
    opts.timeout = Duration::from_secs(5);
    let report = run_smoke(&opts);
    assert_eq!(failed(&report), ["connect"], "{:#}", report.to_json());
    assert_eq!(report.get(Check::Connect).unwrap().code.as_deref(), Some("upgrade_required"), "{:#}", report.to_json());
    for check in [Check::ConnectedCount, Check::Delivery, Check::Revoke] {
        assert_eq!(outcome(&report, check), Outcome::Skip, "{}", check.name());
    }
    for check in [Check::CleanupClients, Check::CleanupGrants, Check::CleanupStream, Check::CleanupPublisher] {
        assert_eq!(outcome(&report, check), Outcome::Pass, "{}: {:#}", check.name(), report.to_json());
    }
    assert_eq!(db.sql("SELECT * FROM stream_grant").rows.len(), 0, "stream grants left");
    assert_eq!(db.sql("SELECT * FROM publish_grant").rows.len(), 0, "publish grants left");
    assert_eq!(db.sql("SELECT * FROM identity_role").rows.len(), 2, "only the owner's roles stay");
}

/// The command: a failure exits 1 with the failed check named, in JSON on stdout and in
/// the usual `khala: <code>:` line on stderr.
#[test]
fn the_command_exits_non_zero_and_names_the_failed_check() {
    let db = shared_server().new_database("smoke-cli");
    let dir = tempfile::tempdir().unwrap();
    let stranger = db.new_identity();
    let token = khala_tests::client::token_file(dir.path(), &stranger);
    let output = Command::new(khala_bin())
        .args(["smoke", "--json", "--timeout-secs", "10", "--server", &db.url, "--database", &db.name, "--token-file"])
        .arg(&token)
        .env("KHALA_ENV_FILE", dir.path().join("no.env"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(report["passed"], json!(false));
    let failed: Vec<&str> = report["checks"].as_array().unwrap().iter().filter(|c| c["result"] == "fail").map(|c| c["check"].as_str().unwrap()).collect();
    assert_eq!(failed, ["admin"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("khala: smoke_failed: failed check(s): admin"));
}

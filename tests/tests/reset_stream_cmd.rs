//! `khala reset-stream` against a real server: the owner resets a stream step by step
//! until its epoch goes up; an admin that is not the owner, from whom row-level security
//! hides the stream, is refused and the stream is left as it was.

use khala_tests::bin::isolated_khala;
use khala_tests::{publish_range, shared_server, TestDb};
use khala_tools::api::Credentials;
use serde_json::{json, Value};
use std::process::Output;

fn reset_stream(db: &TestDb, who: &Credentials, stream: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let token = khala_tests::client::token_file(dir.path(), who);
    isolated_khala(dir.path())
        .args(["reset-stream", "--server", &db.url, "--database", &db.name, "--stream", stream, "--token-file"])
        .arg(&token)
        .output()
        .expect("running khala reset-stream")
}

/// `(epoch, head_seq)` of `stream`, as the owner sees it.
fn epoch_and_head(db: &TestDb, stream: &str) -> (u64, u64) {
    let rows = db.sql(&format!("SELECT * FROM stream WHERE stream_id = '{stream}'"));
    let row = rows.rows.first().unwrap_or_else(|| panic!("no stream {stream}"));
    let get = |c| rows.get(row, c).and_then(Value::as_u64).unwrap();
    (get("epoch"), get("head_seq"))
}

#[test]
fn an_admin_the_stream_is_hidden_from_resets_nothing_and_the_owner_resets_it() {
    let db = shared_server().new_database("reset-cmd");
    let publisher = db.publisher();
    publish_range(&db, &publisher, "r.s", 1, 20, 10);
    let admin = db.new_identity();
    db.call("set_role", json!([admin.identity_arg(), "admin", true]));

    let out = reset_stream(&db, &admin, "r.s");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not visible to this identity") && stderr.contains("Nothing was reset"), "{stderr}");
    assert_eq!(epoch_and_head(&db, "r.s"), (1, 20), "the hidden stream was left as it was");

    let out = reset_stream(&db, &db.owner, "r.s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("epoch 1 -> 2, head 20 -> 0"), "{stdout}");
    assert_eq!(epoch_and_head(&db, "r.s"), (2, 0));
}

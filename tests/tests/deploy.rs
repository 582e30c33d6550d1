//! `khala deploy` against a real server, run as users run it (the `khala` binary):
//! a first deploy to a new database, the same wasm again (a no-op), an additive change
//! (Khala's module plus one public table and reducer: `bench/module-next`), and a
//! breaking one (the bench's bare module over a Khala database removes every table),
//! refused without the flags (and nothing published) and accepted with them.
//!
//! Each test checks the server afterwards, not only what the command says: the live
//! schema (`/schema?version=9`), the live program hash, and rows that must survive.

use khala_tests::bin::isolated_khala;
use khala_tests::{publish_range, shared_server, TestDb};
use khala_tools::api::Credentials;
use khala_tools::deploy::schema::Schema;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// The three wasm files, built once per run.
struct Wasms {
    khala: PathBuf,
    next: PathBuf,
    bare: PathBuf,
}

fn wasms() -> &'static Wasms {
    static WASMS: OnceLock<Wasms> = OnceLock::new();
    WASMS.get_or_init(|| {
        let build = |r: khala_tools::error::Result<PathBuf>| r.unwrap_or_else(|e| panic!("{e}"));
        Wasms {
            khala: build(khala_tools::module_wasm::build_module()),
            next: build(khala_tools::module_wasm::build_module_next()),
            bare: build(khala_tools::module_wasm::build_bare_module()),
        }
    })
}

struct Run {
    output: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.output.status.success()
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// Runs `khala deploy` against `database` as the identity whose token is in `token`.
fn deploy(database: &str, token: &Path, wasm: &Path, flags: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let output = isolated_khala(dir.path())
        .arg("deploy")
        .args(["--server", shared_server().url(), "--database", database, "--token-file"])
        .arg(token)
        .arg("--wasm")
        .arg(wasm)
        .args(flags)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running khala deploy");
    let run = Run { stdout: String::from_utf8_lossy(&output.stdout).into_owned(), stderr: String::from_utf8_lossy(&output.stderr).into_owned(), output };
    println!("$ khala deploy --database {database} --wasm {} {}\n{}{}", wasm.file_name().unwrap().to_string_lossy(), flags.join(" "), run.stdout, run.stderr);
    run
}

fn token_file(dir: &Path, who: &Credentials) -> PathBuf {
    let path = dir.join("owner.token");
    std::fs::write(&path, &who.token).unwrap();
    path
}

fn live_schema(database: &str) -> Schema {
    let json = shared_server().api().database_schema(database, None).unwrap().unwrap_or_else(|| panic!("database {database} has no schema"));
    Schema::from_json(&json).unwrap()
}

fn live_hash(db: &TestDb) -> String {
    khala_tools::deploy::live_program_hash(&db.api, &db.name, &db.owner.token).unwrap().expect("the owner reads st_module")
}

fn wasm_hash(path: &Path) -> String {
    khala_tools::deploy::program_hash(&std::fs::read(path).unwrap())
}

/// A Khala database holding a stream with three events, and the owner's token file.
fn database_with_data(label: &str, dir: &Path) -> (TestDb, PathBuf) {
    let db = shared_server().new_database(label);
    let publisher = db.publisher();
    publish_range(&db, &publisher, "deploy.s", 1, 3, 3);
    let token = token_file(dir, &db.owner);
    (db, token)
}

fn stream_head(db: &TestDb) -> Option<u64> {
    let rows = db.sql("SELECT * FROM stream WHERE stream_id = 'deploy.s'");
    rows.rows.first().and_then(|r| rows.get(r, "head_seq")).and_then(Value::as_u64)
}

#[test]
fn first_deploy_creates_the_database_and_passes_the_smoke_test() {
    let dir = tempfile::tempdir().unwrap();
    let owner = shared_server().new_identity();
    let token = token_file(dir.path(), &owner);
    let database = format!("t-deploy-first-{}", std::process::id());
    assert!(shared_server().api().database_schema(&database, None).unwrap().is_none(), "the database must not exist yet");

    let run = deploy(&database, &token, &wasms().khala, &["--json"]);
    assert!(run.ok(), "deploy failed:\n{}", run.stderr);
    let report = run.json();
    assert_eq!(report["action"], "created");
    assert_eq!(report["first_deploy"], true);
    assert_eq!(report["engine"]["version"], "1.2.0");
    assert_eq!(report["engine"]["tested"], true);
    assert_eq!(report["smoke"]["status"], "passed", "{}", report["smoke"]);
    assert_eq!(report["program_hash"]["live"], Value::Null);

    // The server holds the module now, owned by the token's identity.
    assert_eq!(shared_server().api().database_owner(&database).unwrap(), owner.identity);
    let live = khala_tools::deploy::live_program_hash(&shared_server().api(), &database, &owner.token).unwrap();
    assert_eq!(live.as_deref(), Some(wasm_hash(&wasms().khala).as_str()));
    assert_eq!(report["program_hash"]["new"].as_str(), live.as_deref());
    let schema = live_schema(&database);
    assert!(schema.tables.contains_key("stream") && schema.reducers.contains_key("publish"));
    assert_eq!(schema, khala_tools::deploy::extract_schema(&khala_tests::engine(), &wasms().khala).unwrap());
}

#[test]
fn the_same_wasm_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (db, token) = database_with_data("deploy-same", dir.path());
    let before = live_hash(&db);
    assert_eq!(before, wasm_hash(&wasms().khala), "the harness publishes the same build");

    let run = deploy(&db.name, &token, &wasms().khala, &["--json"]);
    assert!(run.ok(), "deploy failed:\n{}", run.stderr);
    let report = run.json();
    assert_eq!(report["action"], "unchanged");
    assert_eq!(report["changes"], json!([]));
    assert_eq!(report["program_hash"]["live"], report["program_hash"]["new"]);
    assert_eq!(report["smoke"], Value::Null, "nothing published, nothing to smoke");
    assert_eq!(live_hash(&db), before);
    assert_eq!(stream_head(&db), Some(3));
}

#[test]
fn an_additive_change_is_accepted_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (db, token) = database_with_data("deploy-add", dir.path());
    assert!(!live_schema(&db.name).tables.contains_key("deploy_probe"));

    let run = deploy(&db.name, &token, &wasms().next, &["--no-smoke"]);
    assert!(run.ok(), "deploy failed:\n{}", run.stderr);
    assert!(run.stdout.contains("result    published: updated in place, data kept"), "{}", run.stdout);
    assert!(run.stdout.contains("additive                     table       deploy_probe: added (public, 3 columns)"), "{}", run.stdout);
    assert!(run.stdout.contains("additive                     reducer     deploy_probe_note: added (note: String)"), "{}", run.stdout);

    // Live: the new table and reducer, the new program, and the old rows.
    let schema = live_schema(&db.name);
    assert!(schema.tables["deploy_probe"].is_public());
    assert_eq!(live_hash(&db), wasm_hash(&wasms().next));
    assert_eq!(stream_head(&db), Some(3), "the stream's events survive an update in place");
    db.call("deploy_probe_note", json!(["after deploy"]));
    assert_eq!(db.sql("SELECT * FROM deploy_probe").rows.len(), 1);

    // Deploying it again is a no-op; the JSON names every change's class.
    let report = deploy(&db.name, &token, &wasms().next, &["--json", "--no-smoke"]).json();
    assert_eq!(report["action"], "unchanged");
    let back = deploy(&db.name, &token, &wasms().khala, &["--json", "--no-smoke"]);
    assert!(!back.ok(), "going back removes the probe table, which loses data");
    assert_eq!(back.json()["error"]["code"], "data_loss_refused");
}

#[test]
fn a_breaking_change_is_refused_and_nothing_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let (db, token) = database_with_data("deploy-break", dir.path());
    let schema_before = live_schema(&db.name);
    let hash_before = live_hash(&db);

    let run = deploy(&db.name, &token, &wasms().bare, &[]);
    assert!(!run.ok());
    assert!(run.stderr.contains("khala: data_loss_refused: refusing 29 change(s) SpacetimeDB cannot migrate in place"), "{}", run.stderr);
    assert!(run.stderr.contains("--clear-database publishes with the database cleared"), "{}", run.stderr);
    assert!(run.stderr.contains("add --allow-breaking too"), "{}", run.stderr);
    assert!(run.stdout.contains("data_losing+client_breaking  table       stream: removed (public table"), "{}", run.stdout);
    assert!(run.stdout.contains("client_breaking              reducer     publish: removed"), "{}", run.stdout);
    assert!(run.stdout.contains("result    refused: nothing published"), "{}", run.stdout);

    // One flag is not enough: each refusal names the other.
    let report = deploy(&db.name, &token, &wasms().bare, &["--json", "--allow-breaking"]).json();
    assert_eq!((report["action"].as_str(), report["error"]["code"].as_str()), (Some("refused"), Some("data_loss_refused")));
    assert_eq!(report["classes"]["data_losing"], 29);
    assert!(report["classes"]["client_breaking"].as_u64().unwrap() > 0);
    assert!(report["changes"].as_array().unwrap().iter().any(|c| c["class"] == "data_losing" && c["name"] == "stream_segment" && c["breaks_clients"] == true));
    let report = deploy(&db.name, &token, &wasms().bare, &["--json", "--clear-database"]).json();
    assert_eq!((report["action"].as_str(), report["error"]["code"].as_str()), (Some("refused"), Some("breaking_change")));

    // Nothing was published: the same schema, program and rows.
    assert_eq!(live_schema(&db.name), schema_before);
    assert_eq!(live_hash(&db), hash_before);
    assert_eq!(stream_head(&db), Some(3));
}

#[test]
fn with_both_flags_the_breaking_change_is_accepted_and_the_data_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (db, token) = database_with_data("deploy-clear", dir.path());

    let run = deploy(&db.name, &token, &wasms().bare, &["--json", "--allow-breaking", "--clear-database", "--no-smoke"]);
    assert!(run.ok(), "deploy failed:\n{}", run.stderr);
    let report = run.json();
    assert_eq!(report["action"], "updated_cleared");
    assert_eq!(report["cleared"], true);
    assert_eq!(report["classes"]["worst"], "data_losing");

    let schema = live_schema(&db.name);
    assert_eq!(schema.tables.keys().collect::<Vec<_>>(), vec!["bare_guarded_segment", "bare_reader", "bare_segment"]);
    assert_eq!(live_hash(&db), wasm_hash(&wasms().bare));
    assert!(db.api.sql(&db.name, "SELECT * FROM stream", &db.owner.token).is_err(), "the stream table is gone");
}

#[test]
fn only_the_owner_may_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = database_with_data("deploy-owner", dir.path());
    let stranger = token_file(dir.path(), &db.new_identity());
    let report = deploy(&db.name, &stranger, &wasms().next, &["--json"]).json();
    assert_eq!(report["error"]["code"], "not_owner");
    assert!(!live_schema(&db.name).tables.contains_key("deploy_probe"));
}

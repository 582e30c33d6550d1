//! The `khala` command against a real server: `up`, reuse, `spacetimedb-cli sql`,
//! `status`, `down`, and the clear errors for bad set-ups.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

fn khala(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_khala"))
        .args(args)
        .env("KHALA_DATA_DIR", data_dir)
        // Keep the user's own `khala up` settings out of the test.
        .env("KHALA_ENV_FILE", data_dir.join("none.env"))
        .env_remove("KHALA_SERVER_URL")
        .env_remove("KHALA_DATABASE")
        .env_remove("KHALA_TOKEN_FILE")
        .output()
        .expect("running khala")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn free_port() -> u16 {
    khala_tools::server::free_port().unwrap()
}

#[test]
fn up_publishes_reuses_and_down_stops_only_our_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let port = free_port().to_string();
    let up = khala(&data, &["up", "--no-install", "--port", &port, "--database", "cli-test"]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("module published"), "{}", text(&up));

    // The env file points the other commands at the server.
    let env = std::fs::read_to_string(data.join("khala.env")).unwrap();
    assert!(env.contains(&format!("KHALA_SERVER_URL=http://127.0.0.1:{port}")), "{env}");
    let token_mode = std::fs::metadata(data.join("owner.token")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&token_mode.permissions()) & 0o777, 0o600);

    // A second `up` reuses the server and does not republish an unchanged module.
    let again = khala(&data, &["up", "--no-install", "--port", &port, "--database", "cli-test"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("reusing the server") && text(&again).contains("module unchanged"), "{}", text(&again));

    // The engine's own CLI can query the database Khala published.
    let engine = khala_tools::engine::Engine::locate().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let sql = Command::new(&engine.cli)
        .args(["sql", "--anonymous", "--server", &url, "cli-test", "SELECT * FROM stream"])
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    assert!(sql.status.success(), "{}", text(&sql));
    assert!(text(&sql).contains("stream_id"), "{}", text(&sql));

    // status reads the env file written by up.
    let status = Command::new(env!("CARGO_BIN_EXE_khala"))
        .args(["status", "--json"])
        .env("KHALA_ENV_FILE", data.join("khala.env"))
        .env_remove("KHALA_SERVER_URL")
        .env_remove("KHALA_DATABASE")
        .env_remove("KHALA_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["server_up"], true);
    assert_eq!(report["database"], "cli-test");
    let heap = report["server_heap_bytes"].as_u64().unwrap_or_else(|| panic!("the local server reports its heap: {report}"));
    assert!(heap > 1_000_000, "a running server's heap is more than 1 MB: {heap}");

    let pid: u32 = std::fs::read_to_string(data.join("server.pid")).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let down = khala(&data, &["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(!khala_tools::server::answers(&url), "server still answers after down");
    assert!(!Path::new(&format!("/proc/{pid}/cmdline")).exists() || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty());
    // A second down is harmless.
    assert!(khala(&data, &["down"]).status.success());
}

#[test]
fn down_never_signals_a_process_it_did_not_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    khala_tools::server::ServerDir::open_or_create(&data).unwrap();
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(data.join("server.pid"), format!("{} 1\n", bystander.id())).unwrap();
    let down = khala(&data, &["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(bystander.try_wait().unwrap().is_none(), "down killed a process Khala did not start");
    bystander.kill().unwrap();
}

#[test]
fn a_port_in_use_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let up = khala(&tmp.path().join("server"), &["up", "--no-install", "--port", &port]);
    assert_eq!(up.status.code(), Some(1));
    assert!(text(&up).contains("port_in_use") && text(&up).contains(&port), "{}", text(&up));
}

#[test]
fn a_foreign_data_dir_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("someone-elses");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("precious.txt"), "keep me").unwrap();
    let up = khala(&data, &["up", "--no-install", "--port", &free_port().to_string()]);
    assert_eq!(up.status.code(), Some(1));
    assert!(text(&up).contains("foreign_data_dir") && text(&up).contains("precious.txt"), "{}", text(&up));
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1, "khala wrote into a foreign dir");
}

#[test]
fn missing_binaries_say_how_to_install() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Command::new(env!("CARGO_BIN_EXE_khala"))
        .args(["up", "--no-install", "--port", &free_port().to_string()])
        .env("KHALA_DATA_DIR", tmp.path().join("server"))
        .env("KHALA_ENV_FILE", tmp.path().join("none.env"))
        .env("KHALA_ENGINE_DIR", tmp.path().join("no-engine"))
        .output()
        .unwrap();
    assert_eq!(up.status.code(), Some(1));
    assert!(text(&up).contains("engine_missing") && text(&up).contains("khala setup"), "{}", text(&up));
}

#[test]
fn a_server_that_never_answers_is_reported_with_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    // No server answers within zero seconds, so the start-up wait gives up at once.
    let up = khala(&data, &["up", "--no-install", "--port", &free_port().to_string(), "--timeout-secs", "0"]);
    assert_eq!(up.status.code(), Some(1));
    assert!(text(&up).contains("server_unresponsive") && text(&up).contains("server.log"), "{}", text(&up));
    // The half-started server was killed, not left behind.
    assert!(!data.join("server.pid").exists());
}

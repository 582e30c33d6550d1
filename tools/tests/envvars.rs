//! `envvars/local.env` and `envvars/maincloud.env` carry every variable the khala
//! commands read, and nothing else: the variables are found in the sources (clap's
//! `env = "…"` and `std::env::var*("…")`), so a new setting fails this test until both
//! files say what it is for each target.

use khala_tools::envfile;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// Variables that are not a target's settings: `KHALA_ENV_FILE` picks the settings file
/// itself (naming it inside is circular); `KHALA_CHAOS_KEEP` is a debugging switch of
/// `khala chaos`, which runs its own private server (set at all means on, so naming it in
/// a file would turn it on for every command run with that file); `KHALA_SIM_TRACE`
/// prints the client driver's property-test simulation, read only by that unit test.
const NOT_IN_FILES: &[&str] = &["KHALA_ENV_FILE", "KHALA_CHAOS_KEEP", "KHALA_SIM_TRACE"];

/// Variables that only make sense next to the local server `khala up` runs.
const LOCAL_ONLY: &[&str] = &["KHALA_DATA_DIR"];

/// Every `"KHALA_…"` string literal the commands' sources read as a setting.
fn variables_read() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for dir in ["tools/src", "client/src"] {
        scan(&root().join(dir), &mut found);
    }
    found
}

fn scan(dir: &Path, found: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("a dir entry").path();
        if path.is_dir() {
            scan(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("a source file");
            for line in text.lines().filter(|l| l.contains("env = \"KHALA_") || l.contains("var_os(\"KHALA_") || l.contains("var(\"KHALA_")) {
                for piece in line.split('"').skip(1).step_by(2).filter(|p| p.starts_with("KHALA_")) {
                    found.insert(piece.to_string());
                }
            }
        }
    }
}

fn load(name: &str) -> Vec<(String, String)> {
    let path = root().join("envvars").join(name);
    envfile::parse(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

fn keys(pairs: &[(String, String)]) -> BTreeSet<String> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

fn expected(local: bool) -> BTreeSet<String> {
    variables_read()
        .into_iter()
        .filter(|v| !NOT_IN_FILES.contains(&v.as_str()))
        .filter(|v| local || !LOCAL_ONLY.contains(&v.as_str()))
        .collect()
}

#[test]
fn the_scan_finds_the_settings_it_must() {
    let read = variables_read();
    for known in ["KHALA_SERVER_URL", "KHALA_DATABASE", "KHALA_TOKEN_FILE", "KHALA_MIRROR_TOKEN_FILE", "KHALA_DATA_DIR", "KHALA_ENGINE_DIR", "KHALA_ENV_FILE", "KHALA_CHAOS_KEEP"] {
        assert!(read.contains(known), "{known} is read by the commands but the scan missed it: {read:?}");
    }
}

#[test]
fn local_env_carries_every_setting_and_nothing_else() {
    let pairs = load("local.env");
    assert_eq!(keys(&pairs), expected(true), "envvars/local.env");
    assert_eq!(pairs.len(), keys(&pairs).len(), "a variable is set twice in envvars/local.env");
}

#[test]
fn maincloud_env_carries_every_remote_setting_and_nothing_else() {
    let pairs = load("maincloud.env");
    assert_eq!(keys(&pairs), expected(false), "envvars/maincloud.env");
    assert_eq!(pairs.len(), keys(&pairs).len(), "a variable is set twice in envvars/maincloud.env");
}

#[test]
fn every_value_is_usable_once_loaded() {
    for name in ["local.env", "maincloud.env"] {
        for (key, value) in load(name) {
            assert!(!value.is_empty(), "{name}: {key} is empty once loaded");
            assert!(!value.contains("${"), "{name}: {key} keeps an unexpanded variable: {value}");
            if key == "KHALA_SERVER_URL" {
                assert!(value.starts_with("http://") || value.starts_with("https://"), "{name}: {key} is not an http(s) URL: {value}");
            }
            if key.ends_with("_FILE") || key.ends_with("_DIR") {
                assert!(Path::new(&value).is_absolute(), "{name}: {key} is not an absolute path: {value}");
            }
        }
    }
    let local = load("local.env");
    let url = &local.iter().find(|(k, _)| k == "KHALA_SERVER_URL").expect("a server URL").1;
    assert!(url.starts_with("http://127.0.0.1:"), "local.env points at the local server, not {url}");
}

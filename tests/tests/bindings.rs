//! The committed bindings match their modules (the client's, and the bench's bare
//! baseline): regenerate them from the wasm into a temp dir and compare file by file.

use std::collections::BTreeMap;
use std::path::Path;

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
        .collect()
}

/// Regenerates bindings from `wasm` and compares them with the committed `dir`.
fn assert_bindings_match(wasm: &Path, dir: &str) {
    let engine = khala_tests::engine();
    let out = tempfile::tempdir().unwrap();
    // The CLI writes its config under $HOME; keep that out of the output dir.
    let home = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(&engine.cli)
        .args(["generate", "--lang", "rust", "--out-dir"])
        .arg(out.path())
        .arg("--bin-path")
        .arg(wasm)
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let committed = read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir));
    let fresh = read_dir(out.path());
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        fresh.keys().collect::<Vec<_>>(),
        "{dir} drifted: run scripts/generate-bindings"
    );
    for (name, text) in &fresh {
        assert_eq!(&committed[name], text, "{dir}/{name} drifted: run scripts/generate-bindings");
    }
}

#[test]
fn committed_bindings_match_the_module() {
    assert_bindings_match(&khala_tools::module_wasm::build_module().unwrap(), "client/src/module_bindings");
}

#[test]
fn committed_bench_bindings_match_the_bare_module() {
    assert_bindings_match(&khala_tools::module_wasm::build_bare_module().unwrap(), "tools/src/bare_bindings");
}

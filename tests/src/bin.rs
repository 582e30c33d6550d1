//! The `khala` binary for tests that run it as users do (and kill it): built once per
//! test run from this workspace, the way `khala_tools::module_wasm` builds the module.

use khala_tools::paths::workspace_root;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// `target/debug/khala`, built (or found up to date) on first use.
pub fn khala_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "khala-tools", "--bin", "khala", "--target-dir"])
            .arg(&target_dir)
            .output()
            .unwrap_or_else(|e| panic!("running cargo build for the khala binary: {e}"));
        assert!(output.status.success(), "building the khala binary failed:\n{}", String::from_utf8_lossy(&output.stderr));
        target_dir.join("debug").join("khala")
    })
    .clone()
}

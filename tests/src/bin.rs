//! The `khala` binary for tests that run it as users do (and kill it): built once per
//! test run from this workspace, the way `khala_tools::module_wasm` builds the module.

use khala_tools::paths::workspace_root;
use std::path::{Path, PathBuf};
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

/// `khala` as a test runs it: the user's own settings kept out (no `khala.env`, no
/// server, database or token from the environment), so that only the flags count.
/// `dir` is a scratch dir; the settings file named there never exists.
pub fn isolated_khala(dir: &Path) -> Command {
    let mut command = Command::new(khala_bin());
    command.env("KHALA_ENV_FILE", dir.join("none.env"));
    for setting in ["KHALA_SERVER_URL", "KHALA_DATABASE", "KHALA_TOKEN_FILE", "KHALA_MIRROR_TOKEN_FILE"] {
        command.env_remove(setting);
    }
    command
}

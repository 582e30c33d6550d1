//! Building the module to wasm, the way `khala up` and the test harness both need it.

use crate::error::{Result, ToolError};
use crate::paths::workspace_root;
use std::path::PathBuf;
use std::process::Command;

/// Builds `khala-module` for wasm32 in release mode and returns the `.wasm` path.
/// Cargo skips the work when nothing changed.
pub fn build_module() -> Result<PathBuf> {
    build_wasm("khala-module", "khala_module")
}

/// Builds the bench's insert-only baseline module (`bench/bare-module`).
pub fn build_bare_module() -> Result<PathBuf> {
    build_wasm("khala-bench-bare", "khala_bench_bare")
}

/// Builds `khala-module-next` (`bench/module-next`): Khala's module source plus one
/// public table and reducer (feature `deploy-probe`), for `khala deploy`'s tests of an
/// additive change. It shares the module's dependencies, so this build is short.
pub fn build_module_next() -> Result<PathBuf> {
    build_wasm("khala-module-next", "khala_module_next")
}

fn build_wasm(package: &str, file_stem: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "-p", package, "--target", crate::engine::WASM_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .map_err(|e| ToolError::ModuleBuild(format!("running cargo: {e}")))?;
    if !output.status.success() {
        return Err(ToolError::ModuleBuild(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    Ok(target_dir.join(crate::engine::WASM_TARGET).join("release").join(format!("{file_stem}.wasm")))
}

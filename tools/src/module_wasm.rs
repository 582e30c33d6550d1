//! Building the module to wasm, the way `khala up` and the test harness both need it.

use crate::error::{Result, ToolError};
use crate::paths::workspace_root;
use std::path::PathBuf;
use std::process::Command;

/// Builds `khala-module` for wasm32 in release mode and returns the `.wasm` path.
/// Cargo skips the work when nothing changed.
pub fn build_module() -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "-p", "khala-module", "--target", crate::engine::WASM_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .map_err(|e| ToolError::ModuleBuild(format!("running cargo: {e}")))?;
    if !output.status.success() {
        return Err(ToolError::ModuleBuild(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    Ok(target_dir.join(crate::engine::WASM_TARGET).join("release").join("khala_module.wasm"))
}

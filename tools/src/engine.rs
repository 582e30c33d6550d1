//! Finding and installing the pinned engine: `spacetimedb-standalone` and
//! `spacetimedb-cli` 1.2.0 in one directory (the CLI runs the server binary beside it
//! for `generate`), and the `wasm32-unknown-unknown` target.

use crate::error::{Result, ToolError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The one SpacetimeDB version Khala runs.
pub const ENGINE_VERSION: &str = "1.2.0";
pub const STANDALONE: &str = "spacetimedb-standalone";
pub const CLI: &str = "spacetimedb-cli";
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Paths of the two engine binaries.
#[derive(Debug, Clone)]
pub struct Engine {
    pub standalone: PathBuf,
    pub cli: PathBuf,
}

/// Where `khala setup` installs the engine: `$KHALA_ENGINE_DIR`, else
/// `<user data dir>/khala/engine/1.2.0`. Binaries go to `<root>/bin`.
pub fn install_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("KHALA_ENGINE_DIR") {
        return PathBuf::from(dir);
    }
    crate::paths::data_home().join("khala").join("engine").join(ENGINE_VERSION)
}

/// The version a binary reports, if it runs.
fn reported_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("--version").stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(text)
}

/// Whether `binary` runs and says it is version 1.2.0.
fn is_pinned(binary: &Path) -> bool {
    reported_version(binary).is_some_and(|text| text.split_whitespace().any(|w| w.trim_start_matches('v').trim_end_matches([';', ',']) == ENGINE_VERSION))
}

impl Engine {
    /// Finds both binaries at the pinned version in the install root.
    pub fn locate() -> Result<Engine> {
        let bin = install_root().join("bin");
        let engine = Engine { standalone: bin.join(STANDALONE), cli: bin.join(CLI) };
        for (name, path) in [(STANDALONE, &engine.standalone), (CLI, &engine.cli)] {
            if !is_pinned(path) {
                return Err(ToolError::EngineMissing { binary: name, version: ENGINE_VERSION, looked_in: bin.display().to_string() });
            }
        }
        Ok(engine)
    }
}

/// Runs one install step with its output shown as it happens.
fn run_step(step: &str, command: &mut Command) -> Result<()> {
    eprintln!("khala setup: {step}");
    let status = command.status().map_err(|e| ToolError::InstallFailed { step: step.into(), detail: e.to_string() })?;
    if !status.success() {
        return Err(ToolError::InstallFailed { step: step.into(), detail: format!("exited with {status}") });
    }
    Ok(())
}

fn has_wasm_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == WASM_TARGET))
}

/// Installs whatever is missing; each step is skipped when already done.
/// The first engine install compiles two large crates (13–18 minutes on 2 cores);
/// cargo's own progress lines are shown throughout.
pub fn install() -> Result<Engine> {
    if has_wasm_target() {
        eprintln!("khala setup: rust target {WASM_TARGET} is installed");
    } else {
        run_step(&format!("rustup target add {WASM_TARGET}"), Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    if let Ok(engine) = Engine::locate() {
        eprintln!("khala setup: SpacetimeDB {ENGINE_VERSION} is installed in {}", install_root().join("bin").display());
        return Ok(engine);
    }
    let root = install_root();
    std::fs::create_dir_all(&root).map_err(|e| ToolError::io(format!("creating {}", root.display()), e))?;
    eprintln!("khala setup: installing SpacetimeDB {ENGINE_VERSION} into {} (13–18 minutes on 2 cores, once)", root.display());
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_step(
        &format!("cargo install --locked {STANDALONE}@{ENGINE_VERSION} {CLI}@{ENGINE_VERSION}"),
        Command::new("cargo")
            .args(["install", "--locked", "--root"])
            .arg(&root)
            .args(["-j", &jobs.to_string()])
            .arg(format!("{STANDALONE}@{ENGINE_VERSION}"))
            .arg(format!("{CLI}@{ENGINE_VERSION}")),
    )?;
    Engine::locate()
}

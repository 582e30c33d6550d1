//! `khala setup`: install the wasm target and the pinned engine, each only if missing.

pub fn run() -> anyhow::Result<()> {
    let engine = khala_tools::engine::install()?;
    println!("engine ready: {} and {}", engine.standalone.display(), engine.cli.display());
    Ok(())
}

//! `khala deploy`: publish the module to any server (Maincloud, or the local stand-in)
//! after checking the server's engine version and the schema change against the live
//! database; then run the smoke test. docs/DEPLOY.md.

use super::Target;
use clap::Args;
use khala_tools::api::Api;
use khala_tools::deploy::diff::{self, Change, Class};
use khala_tools::deploy::{self as dep, Allow, DeployError, Support};
use khala_tools::engine::Engine;
use khala_tools::progress;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The server, the database, and the owner's token file (without one, the token
    /// `spacetimedb-cli login` keeps in ~/.config/spacetime/cli.toml).
    #[command(flatten)]
    pub target: Target,
    /// Deploy this prebuilt wasm instead of building `module/` from this workspace.
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// Publish changes that break connected clients (removed or changed reducers, tables
    /// leaving the public surface, visibility changes); the server keeps the data.
    #[arg(long)]
    pub allow_breaking: bool,
    /// Publish a change the server cannot migrate in place by clearing the database:
    /// EVERY ROW OF EVERY TABLE IS DELETED. Used only when a change needs it.
    #[arg(long)]
    pub clear_database: bool,
    /// Deploy even if the server's engine version cannot be read (check it by hand first).
    #[arg(long)]
    pub skip_engine_check: bool,
    /// Do not run `khala smoke` after publishing.
    #[arg(long)]
    pub no_smoke: bool,
    /// Print one JSON object (changes, classes, action) and nothing else on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Everything a deploy found and did, printed for people or as one JSON object.
#[derive(Serialize, Default)]
struct Report {
    server: String,
    database: String,
    /// `{package, version, tested, supported}`; null when `--skip-engine-check`.
    engine: Option<Value>,
    wasm: Option<String>,
    /// Whether the database did not exist before this deploy.
    first_deploy: Option<bool>,
    program_hash: ProgramHashes,
    changes: Vec<Change>,
    classes: Value,
    /// `created`, `updated`, `updated_cleared`, `unchanged`, `refused`, `failed`.
    action: &'static str,
    /// Whether the publish cleared the database's data.
    cleared: bool,
    smoke: Value,
    error: Option<Value>,
    ms: u64,
}

#[derive(Serialize, Default)]
struct ProgramHashes {
    /// The live module's before this deploy (null on a first deploy, or if unreadable).
    live: Option<String>,
    new: Option<String>,
}

/// Runs `work` under a spinner named `what` (on a terminal; otherwise one line on stderr
/// unless the output is JSON).
fn step<T>(json: bool, what: &str, work: impl FnOnce() -> Result<T, DeployError>) -> Result<T, DeployError> {
    if !progress::enabled() && !json {
        eprintln!("khala deploy: {what}");
    }
    let spinner = progress::spinner(what.to_string());
    let result = work();
    spinner.finish_and_clear();
    result
}

fn token(args: &DeployArgs) -> Result<String, DeployError> {
    match &args.target.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| khala_tools::ToolError::io(format!("reading the token file {}", path.display()), e))?;
            Ok(text.trim().to_string())
        }
        None => dep::cli_login_token(&dep::cli_config_path()),
    }
}

fn classes(changes: &[Change]) -> Value {
    let count = |class| changes.iter().filter(|c| c.class == class).count();
    json!({
        "additive": count(Class::Additive),
        "client_breaking": count(Class::ClientBreaking),
        "data_losing": count(Class::DataLosing),
        "breaks_clients": changes.iter().filter(|c| c.breaks_clients).count(),
        "worst": diff::worst(changes).map(Class::name),
    })
}

fn deploy(args: &DeployArgs, report: &mut Report) -> Result<(), DeployError> {
    let json = args.json;
    let database = args.target.database.as_str();
    let token = token(args)?;
    let api = Api::new(&args.target.server);

    if args.skip_engine_check {
        eprintln!("khala deploy: not checking the server's engine version (--skip-engine-check); the module needs SpacetimeDB {}", dep::SUPPORTED);
    } else {
        let (package, version) = step(json, "checking the server's engine version", || dep::server_engine(&api))?;
        let support = dep::check_engine(api.base_url(), &version);
        report.engine = Some(json!({ "package": package, "version": version, "supported": dep::SUPPORTED, "tested": matches!(support, Ok(Support::Tested)) }));
        if support? == Support::Untested {
            eprintln!("khala deploy: warning: SpacetimeDB {version} is in the supported range ({}) but Khala is tested on {} only", dep::SUPPORTED, khala_tools::engine::ENGINE_VERSION);
        }
    }

    let wasm = match &args.wasm {
        Some(path) => path.clone(),
        None => step(json, "building the module (wasm32, release)", || Ok(khala_tools::module_wasm::build_module()?))?,
    };
    report.wasm = Some(wasm.display().to_string());
    let bytes = std::fs::read(&wasm).map_err(|e| khala_tools::ToolError::io(format!("reading {}", wasm.display()), e))?;
    let new_hash = dep::program_hash(&bytes);
    report.program_hash.new = Some(new_hash.clone());

    let live = step(json, "reading the live schema", || dep::live_schema(&api, database, &token))?;
    report.first_deploy = Some(live.is_none());
    if live.is_some() {
        dep::check_owner(&api, database, &token)?;
    }
    let engine = Engine::locate()?;
    let new = step(json, "reading the new module's schema", || dep::extract_schema(&engine, &wasm))?;

    let Some(live) = live else {
        report.classes = classes(&[]);
        step(json, "publishing (first deploy)", || Ok(api.publish_module(database, &bytes, &token, false)?))?;
        report.action = "created";
        return verify_and_smoke(args, &api, &token, &new, report);
    };

    report.changes = diff::diff(&live, &new);
    report.classes = classes(&report.changes);
    report.program_hash.live = dep::live_program_hash(&api, database, &token).unwrap_or(None);
    if report.changes.is_empty() && report.program_hash.live.as_deref() == Some(new_hash.as_str()) {
        report.action = "unchanged";
        return Ok(());
    }
    let clear = dep::gate(database, &report.changes, Allow { breaking: args.allow_breaking, clear_database: args.clear_database })?;
    let what = if clear { "publishing with the database CLEARED" } else { "publishing (update in place)" };
    step(json, what, || Ok(api.publish_module(database, &bytes, &token, clear)?))?;
    report.action = if clear { "updated_cleared" } else { "updated" };
    report.cleared = clear;
    verify_and_smoke(args, &api, &token, &new, report)
}

/// After a publish: the live schema must now be the new one, then the smoke test.
fn verify_and_smoke(args: &DeployArgs, api: &Api, token: &str, new: &dep::schema::Schema, report: &mut Report) -> Result<(), DeployError> {
    let database = args.target.database.as_str();
    let live = step(args.json, "checking the live schema", || dep::live_schema(api, database, token))?;
    let program = dep::live_program_hash(api, database, token).unwrap_or(None);
    if live.as_ref() != Some(new) || program.is_some_and(|h| Some(h) != report.program_hash.new) {
        return Err(DeployError::NotApplied { database: database.into() });
    }
    if args.no_smoke {
        report.smoke = json!({ "status": "skipped" });
        return Ok(());
    }
    let opts = khala_tools::smoke::SmokeOptions::new(args.target.server.as_str(), database, token);
    let smoke = step(args.json, "running the smoke test", || Ok(khala_tools::smoke::run_smoke(&opts)))?;
    report.smoke = json!({ "status": if smoke.passed() { "passed" } else { "failed" }, "report": smoke.to_json() });
    if !smoke.passed() {
        let failed: Vec<&str> = smoke.failures().map(|c| c.check.name()).collect();
        return Err(DeployError::SmokeFailed { detail: format!("failed check(s): {}", failed.join(", ")) });
    }
    Ok(())
}

fn print_human(report: &Report) {
    println!("deploy    {} / {}", report.server, report.database);
    match &report.engine {
        Some(e) => println!("engine    {} {} ({}; supported {})", e["package"].as_str().unwrap_or(""), e["version"].as_str().unwrap_or(""), if e["tested"] == true { "tested" } else { "untested" }, dep::SUPPORTED),
        None => println!("engine    not checked"),
    }
    if let Some(wasm) = &report.wasm {
        println!("module    {wasm} (program {})", report.program_hash.new.as_deref().unwrap_or("?"));
    }
    match report.first_deploy {
        Some(true) => println!("live      none: first deploy"),
        Some(false) => println!("live      program {}", report.program_hash.live.as_deref().unwrap_or("not readable")),
        None => {}
    }
    if report.first_deploy == Some(false) {
        let c = &report.classes;
        println!("changes   {} (additive {}, client_breaking {}, data_losing {})", report.changes.len(), c["additive"], c["client_breaking"], c["data_losing"]);
        for change in &report.changes {
            println!("  {change}");
        }
    }
    let result = match report.action {
        "created" => "published: database created",
        "updated" => "published: updated in place, data kept",
        "updated_cleared" => "published: database CLEARED, its data is gone",
        "unchanged" => "unchanged: the live module is this wasm; nothing published",
        "refused" => "refused: nothing published",
        _ => "failed",
    };
    println!("result    {result}");
    match report.smoke["status"].as_str() {
        Some("passed") | Some("failed") => {
            let checks = report.smoke["report"]["checks"].as_array().map(Vec::len).unwrap_or(0);
            println!("smoke     {} ({checks} checks, {} ms)", report.smoke["status"].as_str().unwrap_or(""), report.smoke["report"]["ms"]);
        }
        Some("skipped") => println!("smoke     skipped (--no-smoke); run `khala smoke --server {} --database {}`", report.server, report.database),
        _ => {}
    }
}

pub fn run(args: DeployArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut report = Report { server: args.target.server.clone(), database: args.target.database.clone(), action: "failed", smoke: Value::Null, classes: Value::Null, ..Report::default() };
    let result = deploy(&args, &mut report);
    report.ms = started.elapsed().as_millis() as u64;
    if let Err(e) = &result {
        let refused = matches!(e, DeployError::BreakingChange { .. } | DeployError::DataLossRefused { .. } | DeployError::EngineUnsupported { .. } | DeployError::EngineVersionUnknown { .. } | DeployError::NotOwner { .. });
        if refused {
            report.action = "refused";
        }
        report.error = Some(json!({ "code": e.code(), "message": e.to_string() }));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("the report serialises"));
    } else {
        print_human(&report);
    }
    result.map_err(anyhow::Error::from)
}

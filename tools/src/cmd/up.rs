//! `khala up`: start (or reuse) the local server, publish the module if it changed, and
//! write the envvars file the other commands read.

use anyhow::Context;
use clap::Args;
use khala_tools::api::{Api, Credentials};
use khala_tools::engine::{self, Engine};
use khala_tools::{envfile, grants};
use khala_tools::server::{Lifetime, ServerDir, ServerProcess};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The server's data dir (created if missing; must be empty or Khala's own).
    #[arg(long, env = "KHALA_DATA_DIR", default_value_os_t = khala_tools::paths::default_server_dir())]
    pub data_dir: PathBuf,
    /// Loopback port to listen on.
    #[arg(long, default_value_t = 3000)]
    pub port: u16,
    /// Database to publish the module to.
    #[arg(long, env = "KHALA_DATABASE", default_value = "khala-dev")]
    pub database: String,
    /// A prebuilt module wasm (default: build `module/` from this workspace).
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// How long to wait for the server to answer.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Fail instead of installing a missing engine.
    #[arg(long)]
    pub no_install: bool,
    /// Start the database over: publish the module with its data wiped (for a local
    /// database whose schema the new module cannot migrate).
    #[arg(long)]
    pub clear: bool,
}

/// The owner's credentials, minted once and kept in the data dir (token mode 0600).
fn owner_credentials(api: &Api, dir: &ServerDir) -> anyhow::Result<Credentials> {
    stored_credentials(api, &dir.token_file(), &dir.root.join("owner.identity"))
}

/// The runtime mirror's credentials, kept beside the owner's.
pub fn mirror_credentials(api: &Api, dir: &ServerDir) -> anyhow::Result<Credentials> {
    stored_credentials(api, &dir.mirror_token_file(), &dir.root.join("mirror.identity"))
}

/// Credentials kept in `token_file` (mode 0600) and `identity_file`, minted on first use.
fn stored_credentials(api: &Api, token_file: &Path, identity_file: &Path) -> anyhow::Result<Credentials> {
    if let (Ok(token), Ok(identity)) = (std::fs::read_to_string(token_file), std::fs::read_to_string(identity_file)) {
        return Ok(Credentials { identity: identity.trim().into(), token: token.trim().into() });
    }
    let creds = api.new_identity()?;
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(token_file)?;
    file.write_all(creds.token.as_bytes())?;
    std::fs::write(identity_file, &creds.identity)?;
    Ok(creds)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn wasm_path(args: &UpArgs) -> anyhow::Result<PathBuf> {
    match &args.wasm {
        Some(path) => Ok(path.clone()),
        None => {
            eprintln!("khala up: building the module (wasm32, release)");
            Ok(khala_tools::module_wasm::build_module()?)
        }
    }
}

/// Publishes when the wasm differs from the last one published to this database here.
/// With `clear`, publishes anyway and wipes the database's data.
fn publish_if_changed(api: &Api, dir: &ServerDir, database: &str, wasm: &Path, owner: &Credentials, clear: bool) -> anyhow::Result<bool> {
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let digest = sha256_hex(&bytes);
    let stamp = dir.root.join(format!("published-{database}.sha256"));
    if !clear && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest) && api.sql(database, "SELECT * FROM stream", &owner.token).is_ok() {
        return Ok(false);
    }
    api.publish_module(database, &bytes, &owner.token, clear)?;
    std::fs::write(&stamp, &digest)?;
    Ok(true)
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let engine = if args.no_install { Engine::locate()? } else { engine::install()? };
    let dir = ServerDir::open_or_create(&args.data_dir)?;
    let server = match ServerProcess::find(&dir) {
        Some(running) if khala_tools::server::answers(&running.url()) => {
            if running.port != args.port {
                anyhow::bail!("the server for {} already runs on port {}; run `khala down` first to move it to {}", dir.root.display(), running.port, args.port);
            }
            eprintln!("khala up: reusing the server at {} (pid {})", running.url(), running.pid);
            running
        }
        _ => {
            eprintln!("khala up: starting spacetimedb-standalone on 127.0.0.1:{}", args.port);
            ServerProcess::start(&engine, &dir, args.port, Lifetime::Detached, Duration::from_secs(args.timeout_secs))?
        }
    };
    let api = Api::new(&server.url());
    let owner = owner_credentials(&api, &dir)?;
    let wasm = wasm_path(&args)?;
    let published = publish_if_changed(&api, &dir, &args.database, &wasm, &owner, args.clear)?;
    // The runtime mirror runs as its own publisher identity, granted the runtime streams
    // only; each `up` renews its lease.
    let mirror = mirror_credentials(&api, &dir)?;
    grants::make_publisher(&api, &args.database, &owner.token, &mirror.identity, &[grants::MIRROR_PATTERN], grants::STANDING_TTL_SECS)?;
    envfile::write(
        &dir.env_file(),
        &[
            (envfile::SERVER_URL, server.url()),
            (envfile::DATABASE, args.database.clone()),
            (envfile::TOKEN_FILE, dir.token_file().display().to_string()),
            (envfile::MIRROR_TOKEN_FILE, dir.mirror_token_file().display().to_string()),
            (envfile::DATA_DIR, dir.root.display().to_string()),
        ],
    )?;
    println!("server    {} (pid {}, data {})", server.url(), server.pid, dir.root.display());
    let what = match (published, args.clear) {
        (true, true) => "module published, data wiped",
        (true, false) => "module published",
        _ => "module unchanged",
    };
    println!("database  {} ({what})", args.database);
    println!("owner     {} (token in {})", owner.identity, dir.token_file().display());
    println!("mirror    {} (token in {}, may publish {})", mirror.identity, dir.mirror_token_file().display(), grants::MIRROR_PATTERN);
    println!("env file  {}", dir.env_file().display());
    println!("try       {} sql --server {} {} \"SELECT * FROM stream\"", engine.cli.display(), server.url(), args.database);
    Ok(())
}

//! `khala deploy`'s library: what a deploy checks before it publishes the module to a
//! server (any URL; Maincloud or the local stand-in), and the answers it gives.
//!
//! - [`check_engine`]: the server's engine version (`GET /v1/health`) must be one the
//!   module runs on ([`SUPPORTED`], docs/DEPLOY.md).
//! - [`extract_schema`]: the new module's schema, read from the wasm offline by the
//!   pinned `spacetimedb-standalone extract-schema` (what `spacetimedb-cli generate`
//!   runs), so nothing is published to learn it and it works for a remote target.
//! - [`schema`], [`diff`]: the live schema against the new one, every change classified.
//! - [`gate`]: refuses client-breaking changes without `--allow-breaking` and changes the
//!   server cannot migrate without `--clear-database`.
//! - [`program_hash`], [`live_program_hash`]: the same wasm as live is a no-op.
//! - [`cli_login_token`]: the engine CLI's login token, when no token file is given.

pub mod diff;
pub mod schema;

use crate::api::Api;
use crate::engine::Engine;
use crate::error::ToolError;
use diff::{Change, Class};
use schema::Schema;
use sha3::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Engine versions the module runs on: from 1.2.0 (what it is built and tested
/// against; older servers lack host calls the 1.2 bindings import) up to, not including,
/// 3.0.0 (2.x still loads `RawModuleDef::V9` modules with the `spacetime_10` ABI and
/// still speaks the v1 WebSocket protocol the 1.2 SDK uses; a new major may not).
/// Only 1.2.0 is tested here; the rest of the range comes from reading the engine's
/// source (docs/DEPLOY.md).
pub const SUPPORTED: &str = ">=1.2.0, <3.0.0";
const MIN_VERSION: (u64, u64, u64) = (1, 2, 0);
const MAX_MAJOR_EXCLUSIVE: u64 = 3;
const TESTED_VERSION: &str = crate::engine::ENGINE_VERSION;

/// A deploy that stopped, each with a stable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    #[error("no token: pass --token-file (or set KHALA_TOKEN_FILE), or log in with the engine CLI (`spacetimedb-cli login`), whose token is read from {looked_in}")]
    NoToken { looked_in: String },
    #[error("reading the engine CLI's config {}: {detail}", path.display())]
    CliConfig { path: PathBuf, detail: String },
    #[error("the server at {server} runs SpacetimeDB {version}; Khala's module is built against {TESTED_VERSION} and runs on {SUPPORTED}. Nothing was published")]
    EngineUnsupported { server: String, version: String },
    #[error("could not read the engine version of the server at {server} ({detail}); Khala's module runs on SpacetimeDB {SUPPORTED}. Check the version by hand (docs/DEPLOY.md) and pass --skip-engine-check to deploy anyway. Nothing was published")]
    EngineVersionUnknown { server: String, detail: String },
    #[error("database {database} is owned by {owner}, not by the token's identity {caller}; only its owner can publish to it. Nothing was published")]
    NotOwner { database: String, owner: String, caller: String },
    #[error("reading the live schema of {database}: {detail}")]
    SchemaUnreadable { database: String, detail: String },
    #[error("extracting the new module's schema from {}: {detail}", wasm.display())]
    SchemaExtract { wasm: PathBuf, detail: String },
    #[error("refusing {count} client-breaking change(s) to {database}: {list}. Connected clients' generated bindings or subscriptions would break, or they would see other rows. --allow-breaking publishes anyway (ship clients built for the new schema with it). Nothing was published")]
    BreakingChange { database: String, count: usize, list: String },
    #[error("refusing {count} change(s) SpacetimeDB cannot migrate in place on {database}: {list}. --clear-database publishes with the database cleared: every row of every table (streams, segments, grants, roles, acks) is deleted and the module starts again from `init`; the authority's events must be mirrored again, grants and roles made again.{also} Nothing was published")]
    DataLossRefused { database: String, count: usize, list: String, also: String },
    #[error("published to {database}, but its live schema is not the new module's; check the server's log")]
    NotApplied { database: String },
    #[error("the smoke test after the deploy failed ({detail}); the new module is live")]
    SmokeFailed { detail: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl DeployError {
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::NoToken { .. } => "no_token",
            DeployError::CliConfig { .. } => "cli_config_unreadable",
            DeployError::EngineUnsupported { .. } => "engine_unsupported",
            DeployError::EngineVersionUnknown { .. } => "engine_version_unknown",
            DeployError::NotOwner { .. } => "not_owner",
            DeployError::SchemaUnreadable { .. } => "schema_unreadable",
            DeployError::SchemaExtract { .. } => "schema_extract_failed",
            DeployError::BreakingChange { .. } => "breaking_change",
            DeployError::DataLossRefused { .. } => "data_loss_refused",
            DeployError::NotApplied { .. } => "publish_not_applied",
            DeployError::SmokeFailed { .. } => "smoke_failed",
            DeployError::Tool(e) => e.code(),
        }
    }
}

pub type Result<T, E = DeployError> = std::result::Result<T, E>;

/// Whether a server's engine is the tested one or only inside the supported range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Tested,
    Untested,
}

/// `major.minor.patch` of a version string (`1.2.0`, `v2.0.0-rc1`, `2.7.0+build`).
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let core = text.trim().trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// Checks a server's reported engine version against [`SUPPORTED`].
pub fn check_engine(server: &str, version: &str) -> Result<Support> {
    let unsupported = || DeployError::EngineUnsupported { server: server.into(), version: version.into() };
    let parsed = parse_version(version).ok_or_else(|| DeployError::EngineVersionUnknown { server: server.into(), detail: format!("unparsable version {version:?}") })?;
    if parsed < MIN_VERSION || parsed.0 >= MAX_MAJOR_EXCLUSIVE {
        return Err(unsupported());
    }
    Ok(if parse_version(TESTED_VERSION) == Some(parsed) { Support::Tested } else { Support::Untested })
}

/// The engine a server reports on `GET /v1/health`: `(package_name, version)`.
pub fn server_engine(api: &Api) -> Result<(String, String)> {
    let unknown = |detail: String| DeployError::EngineVersionUnknown { server: api.base_url().into(), detail };
    let health = api.server_health().map_err(|e| unknown(e.to_string()))?.ok_or_else(|| unknown("GET /v1/health answered 404".into()))?;
    let version = health["version"].as_str().ok_or_else(|| unknown(format!("no version in {health}")))?;
    Ok((health["package_name"].as_str().unwrap_or("unknown").to_string(), version.to_string()))
}

/// Where `spacetimedb-cli` 1.2.0 keeps its config, login token included:
/// `$XDG_CONFIG_HOME/spacetime/cli.toml`, else `~/.config/spacetime/cli.toml`
/// (`spacetimedb-paths` 1.2.0; a CLI run with `--root-dir R` uses `R/config/cli.toml`).
pub fn cli_config_path() -> PathBuf {
    let config_home = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).filter(|p| p.is_absolute()).unwrap_or_else(|| dirs::home_dir().unwrap_or_default().join(".config"));
    config_home.join("spacetime").join("cli.toml")
}

/// The token `spacetimedb-cli login` stored (`spacetimedb_token` in `cli.toml`).
pub fn cli_login_token(path: &Path) -> Result<String> {
    let no_token = || DeployError::NoToken { looked_in: path.display().to_string() };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_token()),
        Err(e) => return Err(DeployError::CliConfig { path: path.into(), detail: e.to_string() }),
    };
    let config: toml::Table = text.parse().map_err(|e: toml::de::Error| DeployError::CliConfig { path: path.into(), detail: e.message().to_string() })?;
    match config.get("spacetimedb_token").and_then(|t| t.as_str()) {
        Some(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        _ => Err(no_token()),
    }
}

/// The new module's schema, read from the wasm offline (the module's `describe` export
/// run by the pinned engine, the way `spacetimedb-cli generate` does it).
pub fn extract_schema(engine: &Engine, wasm: &Path) -> Result<Schema> {
    let fail = |detail: String| DeployError::SchemaExtract { wasm: wasm.into(), detail };
    let output = Command::new(&engine.standalone).arg("extract-schema").arg(wasm).output().map_err(|e| fail(format!("running {}: {e}", engine.standalone.display())))?;
    if !output.status.success() {
        return Err(fail(format!("{} exited with {}: {}", engine.standalone.display(), output.status, String::from_utf8_lossy(&output.stderr).trim())));
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| fail(e.to_string()))?;
    Schema::from_json(&json).map_err(|e| fail(e.to_string()))
}

/// The live database's schema; `None` when the database does not exist (first deploy).
pub fn live_schema(api: &Api, database: &str, token: &str) -> Result<Option<Schema>> {
    let Some(json) = api.database_schema(database, Some(token))? else { return Ok(None) };
    Schema::from_json(&json).map(Some).map_err(|e| DeployError::SchemaUnreadable { database: database.into(), detail: e.to_string() })
}

/// The program hash SpacetimeDB gives a wasm: Keccak-256 of its bytes, as the 64 hex
/// digits the server's SQL shows for `st_module.program_hash` (a little-endian U256,
/// so the digest's bytes reversed).
pub fn program_hash(wasm: &[u8]) -> String {
    let mut digest: Vec<u8> = sha3::Keccak256::digest(wasm).to_vec();
    digest.reverse();
    hex::encode(digest)
}

/// The live module's program hash (`st_module`, which only the owner reads), if the
/// server shows it.
pub fn live_program_hash(api: &Api, database: &str, token: &str) -> Result<Option<String>> {
    let rows = api.sql(database, "SELECT program_hash FROM st_module", token)?;
    Ok(rows
        .rows
        .first()
        .and_then(|row| rows.get(row, "program_hash"))
        .and_then(|v| v.as_str())
        .map(|h| format!("{:0>64}", h.trim_start_matches("0x").to_ascii_lowercase())))
}

/// Refuses the database unless the token's identity owns it (publishing as anyone else
/// fails on the server anyway, with a less useful message).
pub fn check_owner(api: &Api, database: &str, token: &str) -> Result<()> {
    let Some(caller) = crate::api::token_identity(token) else { return Ok(()) };
    let owner = api.database_owner(database)?;
    if owner != caller {
        return Err(DeployError::NotOwner { database: database.into(), owner, caller });
    }
    Ok(())
}

/// What the person deploying allowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allow {
    pub breaking: bool,
    pub clear_database: bool,
}

/// The first few changes by name, for a one-line refusal (the full list is printed).
fn listing(changes: &[&Change]) -> String {
    const SHOWN: usize = 6;
    let mut text = changes.iter().take(SHOWN).map(|c| format!("{} {}", c.subject_name(), c.name)).collect::<Vec<_>>().join(", ");
    if changes.len() > SHOWN {
        text.push_str(&format!(" and {} more (see the change list)", changes.len() - SHOWN));
    }
    text
}

/// Whether `changes` may be published with `allow`. Returns whether the publish must
/// clear the database (only when a change needs it and `--clear-database` allowed it).
pub fn gate(database: &str, changes: &[Change], allow: Allow) -> Result<bool> {
    let losing: Vec<&Change> = changes.iter().filter(|c| c.class == Class::DataLosing).collect();
    let breaking: Vec<&Change> = changes.iter().filter(|c| c.breaks_clients).collect();
    if !losing.is_empty() && !allow.clear_database {
        let also = if !breaking.is_empty() && !allow.breaking { format!(" {} of the changes also break clients: add --allow-breaking too.", breaking.len()) } else { String::new() };
        return Err(DeployError::DataLossRefused { database: database.into(), count: losing.len(), list: listing(&losing), also });
    }
    if !breaking.is_empty() && !allow.breaking {
        return Err(DeployError::BreakingChange { database: database.into(), count: breaking.len(), list: listing(&breaking) });
    }
    Ok(!losing.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diff::Subject;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("1.2.0"), Some((1, 2, 0)));
        assert_eq!(parse_version("v2.0.0-rc1"), Some((2, 0, 0)));
        assert_eq!(parse_version("2.7.0+hotfix1"), Some((2, 7, 0)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.0.1"), None);
        assert_eq!(parse_version("latest"), None);
    }

    #[test]
    fn supports_1_2_up_to_3() {
        assert_eq!(check_engine("s", "1.2.0").unwrap(), Support::Tested);
        assert_eq!(check_engine("s", "1.12.0").unwrap(), Support::Untested);
        assert_eq!(check_engine("s", "2.8.3").unwrap(), Support::Untested);
        assert_eq!(check_engine("s", "1.1.2").unwrap_err().code(), "engine_unsupported");
        assert_eq!(check_engine("s", "0.12.0").unwrap_err().code(), "engine_unsupported");
        assert_eq!(check_engine("s", "3.0.0").unwrap_err().code(), "engine_unsupported");
        assert_eq!(check_engine("s", "nightly").unwrap_err().code(), "engine_version_unknown");
    }

    #[test]
    fn reads_the_cli_login_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cli.toml");
        assert_eq!(cli_login_token(&path).unwrap_err().code(), "no_token");
        std::fs::write(&path, "default_server = \"local\"\n\n[[server_configs]]\nnickname = \"local\"\nhost = \"127.0.0.1:3000\"\nprotocol = \"http\"\n").unwrap();
        assert_eq!(cli_login_token(&path).unwrap_err().code(), "no_token");
        std::fs::write(&path, "default_server = \"maincloud\"\nspacetimedb_token = \"eyJ.abc.def\"\n\n[[server_configs]]\nnickname = \"maincloud\"\nhost = \"maincloud.spacetimedb.com\"\nprotocol = \"https\"\n").unwrap();
        assert_eq!(cli_login_token(&path).unwrap(), "eyJ.abc.def");
        std::fs::write(&path, "spacetimedb_token = ").unwrap();
        assert_eq!(cli_login_token(&path).unwrap_err().code(), "cli_config_unreadable");
    }

    #[test]
    fn program_hash_is_keccak_in_the_servers_order() {
        // Keccak-256 of the empty string is c5d246...a470; the server shows it reversed.
        assert_eq!(program_hash(b""), "70a4855d04d8fa7b3b2782ca53b600e5c003c7dcb27d7e923c23f7860146d2c5");
    }

    fn c(class: Class, breaks_clients: bool) -> Change {
        Change { class, breaks_clients, subject: Subject::Table, name: "t".into(), detail: "d".into() }
    }

    #[test]
    fn gates_by_class() {
        let none = Allow::default();
        assert!(!gate("db", &[], none).unwrap());
        assert!(!gate("db", &[c(Class::Additive, false)], none).unwrap());

        let breaking = [c(Class::Additive, false), c(Class::ClientBreaking, true)];
        let err = gate("db", &breaking, none).unwrap_err();
        assert_eq!(err.code(), "breaking_change");
        assert!(err.to_string().contains("--allow-breaking publishes anyway"), "{err}");
        assert!(!gate("db", &breaking, Allow { breaking: true, ..none }).unwrap());

        let losing = [c(Class::DataLosing, true), c(Class::ClientBreaking, true)];
        let err = gate("db", &losing, Allow { breaking: true, ..none }).unwrap_err();
        assert_eq!(err.code(), "data_loss_refused");
        assert!(err.to_string().contains("--clear-database publishes with the database cleared"), "{err}");
        let err = gate("db", &losing, none).unwrap_err();
        assert!(err.to_string().contains("add --allow-breaking too"), "{err}");
        // Clearing does not excuse breaking clients: both flags are needed.
        assert_eq!(gate("db", &losing, Allow { clear_database: true, ..none }).unwrap_err().code(), "breaking_change");
        assert!(gate("db", &losing, Allow { breaking: true, clear_database: true }).unwrap());
        // A private table's data-losing change needs only --clear-database.
        assert!(gate("db", &[c(Class::DataLosing, false)], Allow { clear_database: true, ..none }).unwrap());
    }
}

//! Admin commands: identities, grants, revocation, roles, retention and stream resets
//! (reducer calls as an admin, normally the owner).

use super::Target;
use clap::Args;
use khala_tools::api::identity_arg;
use khala_tools::{inspect, ToolError};
use serde_json::json;

#[derive(Args, Debug)]
pub struct NewIdentityArgs {
    #[command(flatten)]
    pub target: Target,
    /// Write the new token to this file (owner-only permissions, never overwriting one)
    /// and print only the identity, instead of printing both as JSON.
    #[arg(long)]
    pub save_token: Option<std::path::PathBuf>,
}

pub fn new_identity(args: NewIdentityArgs) -> anyhow::Result<()> {
    let creds = args.target.api().new_identity()?;
    let Some(path) = args.save_token else {
        println!("{}", json!({ "identity": creds.identity, "token": creds.token }));
        return Ok(());
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| khala_tools::ToolError::io(format!("creating the token file {} (it must not exist yet)", path.display()), e))?;
    file.write_all(creds.token.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| khala_tools::ToolError::io(format!("writing {}", path.display()), e))?;
    println!("{}", creds.identity);
    Ok(())
}

#[derive(Args, Debug)]
pub struct GrantArgs {
    #[command(flatten)]
    pub target: Target,
    /// The grantee's identity (hex).
    #[arg(long)]
    pub identity: String,
    /// A stream id, or a prefix ending in `*` (`runtime.run.*`; publish scope only).
    #[arg(long)]
    pub stream: String,
    /// Comma-separated scopes: subscribe, ack, publish (publish needs the publisher role).
    #[arg(long, default_value = "subscribe,ack", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Lease length in seconds; grant again before it ends to renew it.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
}

pub fn grant(args: GrantArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    let call = json!([identity_arg(&args.identity), args.stream, args.scopes, args.ttl_secs]);
    args.target.api().call(&args.target.database, "grant", call, &token)?;
    println!("granted {} on {} to {} for {} s", args.scopes.join(","), args.stream, args.identity, args.ttl_secs);
    Ok(())
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub identity: String,
    #[arg(long)]
    pub stream: String,
}

pub fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    args.target.api().call(&args.target.database, "revoke", json!([identity_arg(&args.identity), args.stream]), &token)?;
    println!("revoked {} on {}", args.identity, args.stream);
    Ok(())
}

#[derive(Args, Debug)]
pub struct RoleArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub identity: String,
    /// admin or publisher.
    #[arg(long)]
    pub role: String,
    /// Take the role away instead of giving it.
    #[arg(long)]
    pub remove: bool,
}

pub fn role(args: RoleArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    let call = json!([identity_arg(&args.identity), args.role, !args.remove]);
    args.target.api().call(&args.target.database, "set_role", call, &token)?;
    println!("{} role {} for {}", if args.remove { "removed" } else { "gave" }, args.role, args.identity);
    Ok(())
}

#[derive(Args, Debug)]
pub struct ResetStreamArgs {
    #[command(flatten)]
    pub target: Target,
    /// The stream to start over: its events are deleted and its epoch goes up by one,
    /// so every client rebuilds it. Stop the stream's publisher (the mirror) first.
    #[arg(long)]
    pub stream: String,
    /// Most `reset_stream` steps to take before giving up (each deletes one retention budget).
    #[arg(long, default_value_t = 10_000)]
    pub max_steps: u32,
}

/// Calls `reset_stream` step by step until the epoch goes up (docs/OPERATIONS.md).
pub fn reset_stream(args: ResetStreamArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    let (api, db) = (args.target.api(), &args.target.database);
    // Not called when the row is hidden: an admin that is not the owner may reach a stream
    // row-level security hides from it, and one call could reset it with nothing to show it.
    let Some(before) = inspect::stream(&api, db, &token, &args.stream)? else {
        return Err(ToolError::Command {
            code: "stream_not_visible",
            detail: format!(
                "the stream {:?} is not visible to this identity: it does not exist, or row-level security hides it (an admin that is not the owner sees only the streams it holds a grant on; use the owner's token). Nothing was reset",
                args.stream
            ),
        }
        .into());
    };
    for step in 1..=args.max_steps {
        api.call(db, "reset_stream", json!([args.stream]), &token)?;
        let now = inspect::stream(&api, db, &token, &args.stream)?
            .ok_or_else(|| ToolError::Command { code: "stream_not_visible", detail: format!("the stream {:?} disappeared from view during the reset", args.stream) })?;
        if now.epoch > before.epoch {
            println!(
                "reset {} in {step} step(s): epoch {} -> {}, head {} -> {} (clients rebuild it; the mirror republishes it from the authority)",
                args.stream, before.epoch, now.epoch, before.head_seq, now.head_seq
            );
            return Ok(());
        }
    }
    Err(ToolError::Command {
        code: "reset_incomplete",
        detail: format!("{} is not reset after {} steps (is a publisher still writing to it?)", args.stream, args.max_steps),
    }
    .into())
}

#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub stream: String,
    /// Keep at most this many events (0: no limit by count).
    #[arg(long)]
    pub max_events: u64,
    /// Keep events at most this old, in seconds (0: no limit by age).
    #[arg(long)]
    pub max_age_secs: u64,
}

/// Sets a stream's retention policy (`set_retention`).
pub fn retention(args: RetentionArgs) -> anyhow::Result<()> {
    let token = args.target.token()?;
    args.target.api().call(&args.target.database, "set_retention", json!([args.stream, args.max_events, args.max_age_secs]), &token)?;
    println!("retention of {}: at most {} events, at most {} s old (0 = no limit)", args.stream, args.max_events, args.max_age_secs);
    Ok(())
}

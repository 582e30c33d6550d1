//! Admin commands: identities, grants, revocation and roles (reducer calls as the owner).

use super::Target;
use clap::Args;
use khala_tools::api::identity_arg;
use serde_json::json;

pub fn new_identity(target: Target) -> anyhow::Result<()> {
    let creds = target.api().new_identity()?;
    println!("{}", json!({ "identity": creds.identity, "token": creds.token }));
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

//! `khala status`: is the server up, is the module there, and where each stream stands.

use super::Target;
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show a client's health instead: the checkpoint file of a `khala tail` (or any
    /// Khala client), whose health snapshot is written beside it.
    #[arg(long)]
    pub client: Option<std::path::PathBuf>,
}

fn as_u64(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(checkpoint) = &args.client {
        let mut path = checkpoint.clone().into_os_string();
        path.push(".health.json");
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", std::path::Path::new(&path).display()))?;
        let health: Value = serde_json::from_str(&text)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&health)?);
        } else {
            println!("client     {} (attempts {}, last error {})", health["state"].as_str().unwrap_or("?"), health["connect_attempts"], health["last_error"]);
            for s in health["streams"].as_array().into_iter().flatten() {
                println!(
                    "{:<48} {:<16} cursor {} / {} ({}%), lag {}, lease {} s",
                    s["stream_id"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    s["cursor"],
                    s["target"],
                    s["progress_pct"],
                    s["lag"],
                    s["lease_secs_left"]
                );
            }
        }
        return Ok(());
    }
    let server_up = khala_tools::server::answers(&args.target.server);
    let mut report = json!({ "server": args.target.server, "server_up": server_up, "database": args.target.database });
    if server_up {
        let token = args.target.token()?;
        let api = args.target.api();
        let rows = api.sql(&args.target.database, "SELECT * FROM stream", &token)?;
        let streams: Vec<Value> = rows
            .rows
            .iter()
            .map(|r| {
                json!({
                    "stream_id": rows.get(r, "stream_id").cloned().unwrap_or(Value::Null),
                    "epoch": as_u64(rows.get(r, "epoch")),
                    "head_seq": as_u64(rows.get(r, "head_seq")),
                    "oldest_seq": as_u64(rows.get(r, "oldest_seq")),
                    "segments": as_u64(rows.get(r, "segment_count")),
                    "duplicates": as_u64(rows.get(r, "duplicates")),
                })
            })
            .collect();
        let presence = api.sql(&args.target.database, "SELECT * FROM presence", &token)?;
        let connected = presence.rows.first().map_or(0, |r| as_u64(presence.get(r, "connected")));
        report["streams"] = Value::Array(streams);
        report["connected_clients"] = json!(connected);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("server     {} ({})", args.target.server, if server_up { "up" } else { "not answering" });
    if !server_up {
        return Ok(());
    }
    println!("database   {}", args.target.database);
    println!("connected  {}", report["connected_clients"]);
    println!("{:<48} {:>6} {:>12} {:>12} {:>9}", "stream", "epoch", "head_seq", "oldest_seq", "segments");
    for s in report["streams"].as_array().into_iter().flatten() {
        println!(
            "{:<48} {:>6} {:>12} {:>12} {:>9}",
            s["stream_id"].as_str().unwrap_or("?"),
            s["epoch"],
            s["head_seq"],
            s["oldest_seq"],
            s["segments"]
        );
    }
    Ok(())
}

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
}

fn as_u64(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
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

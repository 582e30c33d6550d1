//! `khala status`: is the server up, is the module there, and where each stream stands.

use super::Target;
use clap::Args;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use khala_tools::inspect;
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
    /// Also list the roles and the grants with their leases (needs an admin's token).
    #[arg(long)]
    pub grants: bool,
}

fn as_u64(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(checkpoint) = &args.client {
        let mut path = checkpoint.clone().into_os_string();
        path.push(".health.json");
        let shown = std::path::Path::new(&path).display();
        let health = khala_client::health::read_json(std::path::Path::new(&path)).map_err(|e| khala_tools::ToolError::io(format!("reading the client's health file {shown}"), e))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&health)?);
        } else {
            println!("client     {} (attempts {}, last error {:?})", health.state, health.connect_attempts, health.last_error);
            let mut table = new_table(&["stream", "state", "cursor", "target", "progress", "lag", "lease left"], 2);
            for s in &health.streams {
                table.add_row(vec![
                    Cell::new(&s.stream_id),
                    Cell::new(&s.state),
                    number(&json!(s.cursor)),
                    number(&json!(s.target)),
                    Cell::new(format!("{}%", s.progress_pct)).set_alignment(CellAlignment::Right),
                    number(&json!(s.lag)),
                    Cell::new(s.lease_secs_left.map_or("none".to_string(), |secs| format!("{secs} s"))).set_alignment(CellAlignment::Right),
                ]);
            }
            super::print_table(&table);
        }
        return Ok(());
    }
    let server_up = khala_tools::server::answers(&args.target.server);
    let mut report = json!({ "server": args.target.server, "server_up": server_up, "database": args.target.database });
    if server_up {
        let token = args.target.token()?;
        let api = args.target.api();
        let rows = api.sql(&args.target.database, "SELECT * FROM stream", &token)?;
        let mut streams: Vec<Value> = rows
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
        streams.sort_by(|a, b| a["stream_id"].as_str().cmp(&b["stream_id"].as_str()));
        let presence = api.sql(&args.target.database, "SELECT * FROM presence", &token)?;
        let connected = presence.rows.first().map_or(0, |r| as_u64(presence.get(r, "connected")));
        report["streams"] = Value::Array(streams);
        report["connected_clients"] = json!(connected);
        // A server that will not tell is not an error: a hosted one may keep its metrics.
        report["server_heap_bytes"] = json!(api.server_heap_bytes().unwrap_or_else(|e| {
            log::debug!("no server heap figure: {e}");
            None
        }));
        if args.grants {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
            let roles = inspect::roles(&api, &args.target.database, &token)?;
            report["roles"] = roles.iter().map(|r| json!({ "identity": r.identity, "role": r.role })).collect();
            let grants = inspect::grants(&api, &args.target.database, &token)?;
            report["grants"] = grants
                .iter()
                .map(|g| json!({ "grantee": g.grantee, "stream": g.stream, "scopes": g.scopes, "expires_in_secs": (g.expires_at_micros - now) / 1_000_000 }))
                .collect();
        }
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
    if let Some(bytes) = report["server_heap_bytes"].as_u64() {
        // It grows with every segment ever written until the server restarts.
        println!("heap       {:.1} MB (the server's jemalloc_allocated_bytes; docs/OPERATIONS.md#server-memory-grows)", bytes as f64 / 1e6);
    }
    let mut table = new_table(&["stream", "epoch", "head_seq", "oldest_seq", "segments", "duplicates"], 1);
    for s in report["streams"].as_array().into_iter().flatten() {
        table.add_row(vec![
            Cell::new(s["stream_id"].as_str().unwrap_or("?")),
            number(&s["epoch"]),
            number(&s["head_seq"]),
            number(&s["oldest_seq"]),
            number(&s["segments"]),
            number(&s["duplicates"]),
        ]);
    }
    super::print_table(&table);
    if args.grants {
        let mut roles = new_table(&["identity", "role"], 2);
        for r in report["roles"].as_array().into_iter().flatten() {
            roles.add_row(vec![Cell::new(r["identity"].as_str().unwrap_or("?")), Cell::new(r["role"].as_str().unwrap_or("?"))]);
        }
        println!("\nroles");
        super::print_table(&roles);
        let mut grants = new_table(&["stream", "grantee", "scopes", "expires in"], 3);
        for g in report["grants"].as_array().into_iter().flatten() {
            let scopes: Vec<&str> = g["scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            grants.add_row(vec![
                Cell::new(g["stream"].as_str().unwrap_or("?")),
                Cell::new(g["grantee"].as_str().unwrap_or("?")),
                Cell::new(scopes.join(",")),
                Cell::new(format!("{} s", g["expires_in_secs"])).set_alignment(CellAlignment::Right),
            ]);
        }
        println!("\ngrants");
        super::print_table(&grants);
    }
    Ok(())
}

/// A borderless table whose columns line up whatever the widths. The first `text_columns`
/// columns hold text (left-aligned); the rest hold numbers (right-aligned, header too).
fn new_table(header: &[&str], text_columns: usize) -> Table {
    let mut table = Table::new();
    let header = header.iter().enumerate().map(|(i, name)| {
        let cell = Cell::new(name);
        if i < text_columns { cell } else { cell.set_alignment(CellAlignment::Right) }
    });
    table.load_preset(comfy_table::presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header);
    table
}

/// A right-aligned number cell (`-` when the field is absent).
fn number(value: &Value) -> Cell {
    let text = if value.is_null() { "-".to_string() } else { value.to_string() };
    Cell::new(text).set_alignment(CellAlignment::Right)
}

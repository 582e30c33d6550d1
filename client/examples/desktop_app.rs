//! A desktop application's sync, in one file: its local SQLite database is the
//! [`Handler`](khala_client::Handler), so every event and the stream's cursor are committed
//! together (exactly-once effects). Stop it any way you like, Ctrl-C or `kill -9` included:
//! the next start resumes from the cursors in the database, and no event is stored twice
//! or skipped.
//!
//! ```sh
//! cargo run -p khala-client --features sqlite --example desktop_app -- \
//!     http://127.0.0.1:3000 khala-dev reader.token app.db runtime.run.1.events
//! ```
//!
//! Once a second it prints what a UI would show: the connection state and, per stream,
//! what the database holds against the server's head.

use khala_client::health::state_name;
use khala_client::store::sqlite::{Commit, SqliteStore};
use khala_client::{ClientConfig, SyncClient};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, database, token, db, streams @ ..] = args.as_slice() else {
        return Err("usage: desktop_app SERVER_URL DATABASE TOKEN_FILE DB_FILE STREAM...".into());
    };
    if streams.is_empty() {
        return Err("name at least one stream".into());
    }
    let store = SqliteStore::open(db, Commit::Batch)?;
    // The health file goes beside the database; there is no checkpoint file.
    let mut config = ClientConfig::new(server.as_str(), database.as_str(), token.as_str(), db.as_str());
    config.streams = streams.to_vec();
    config.ack = false;
    let mut client = SyncClient::new(config, store)?;

    // The "UI": reads the database on its own connection while the client writes it.
    let health = client.health();
    let (db, streams) = (db.clone(), streams.to_vec());
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let h = health.get();
        let Ok(reader) = SqliteStore::open_read_only(&db) else { continue };
        let shown: Vec<String> = streams
            .iter()
            .map(|id| {
                let (stored, _) = reader.extent(id).unwrap_or_default();
                let head = h.streams.iter().find(|s| &s.stream_id == id).map_or(0, |s| s.target);
                format!("{id}: {stored} stored of {head}")
            })
            .collect();
        println!("{} | {}", state_name(h.state), shown.join(" | "));
    });

    // Runs until a failure retrying cannot fix; a real application sets the flag on exit.
    let shutdown = AtomicBool::new(false);
    client.run(&shutdown)?;
    Ok(())
}

//! SDK clients for tests: connect as a (non-owner) identity, subscribe, and wait.

use crate::TestDb;
use khala_client::module_bindings::DbConnection;
use khala_tools::api::Credentials;
use spacetimedb_sdk::DbContext;
use std::sync::mpsc;
use std::time::Duration;

/// Connects to `db` as `who` and runs the connection on its own thread.
pub fn connect(db: &TestDb, who: &Credentials) -> DbConnection {
    let (tx, rx) = mpsc::channel();
    let conn = DbConnection::builder()
        .with_uri(db.url.as_str())
        .with_module_name(db.name.as_str())
        .with_token(Some(who.token.clone()))
        .on_connect(move |_, _, _| {
            let _ = tx.send(());
        })
        .build()
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.name));
    conn.run_threaded();
    rx.recv_timeout(Duration::from_secs(20)).expect("the SDK connection came up");
    conn
}

/// Subscribes to `queries` and waits until the initial rows are in the cache.
pub fn subscribe(conn: &DbConnection, queries: &[&str]) {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let err_tx = tx.clone();
    let queries: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
    conn.subscription_builder()
        .on_applied(move |_| {
            let _ = tx.send(Ok(()));
        })
        .on_error(move |_, e| {
            let _ = err_tx.send(Err(e.to_string()));
        })
        .subscribe(queries);
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("subscription failed: {e}"),
        Err(_) => panic!("subscription was not applied within 20 s"),
    }
}

//! The foundation end to end: a real server, the module published to a fresh database,
//! a reducer called as one identity, and the resulting row seen by another identity
//! through an SDK subscription.

use khala_client::module_bindings::*;
use khala_tests::{event_json, sdk, shared_server, wait_for};
use serde_json::json;
use spacetimedb_sdk::{DbContext, Table};
use std::time::Duration;

#[test]
fn a_publish_by_one_identity_reaches_another_through_a_subscription() {
    let db = shared_server().new_database("foundation");
    let publisher = db.publisher();
    let reader = db.new_identity();
    db.grant(&reader, "demo.stream", &["subscribe"], 600);

    let conn = sdk::connect(&db, &reader);
    sdk::subscribe(&conn, &["SELECT * FROM stream_segment", "SELECT * FROM stream"]);
    db.open_window(&reader, "demo.stream", 0);
    assert_eq!(conn.db.stream_segment().count(), 0);

    db.call_as(&publisher, "publish", json!(["demo.stream", [event_json("k1", "demo.hello", br#"{"hi":1}"#, Some(1))]]))
        .expect("publish as a publisher");

    let segment = wait_for("the segment to arrive", Duration::from_secs(10), || conn.db.stream_segment().iter().next());
    assert_eq!((segment.stream_id.as_str(), segment.first_seq, segment.last_seq), ("demo.stream", 1, 1));
    let events = khala_proto::segment::decode(&segment.data).unwrap();
    assert_eq!(events[0].payload, br#"{"hi":1}"#);
    let stream = wait_for("the stream row", Duration::from_secs(10), || conn.db.stream().stream_id().find(&"demo.stream".to_string()));
    assert_eq!(stream.head_seq, 1);
    let _ = conn.disconnect();
}

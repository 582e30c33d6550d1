//! `khala mirror` as users run it (the real binary, a real server, a real PostgreSQL):
//! SIGKILL of the mirror at random points, kill -9 of the server mid-run and right after
//! a burst, bad input lines, and the Postgres outbox with LISTEN/NOTIFY and its cursor.
//! Every scenario ends by checking the module holds exactly the input, per stream, in
//! order, with no duplicates: seqs, chain, kinds, keys and payload bytes.

use khala_proto::json::canonical_json;
use khala_tests::bin::isolated_khala;
use khala_tools::mirror::outbox;
use khala_tests::pg::Postgres;
use khala_tests::verify::{segments, verify_stream};
use khala_tests::{shared_server, wait_for, TestDb, TestServer};
use rand::Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One event the module must end up holding.
#[derive(Debug, Clone)]
struct Expected {
    seq: u64,
    kind: String,
    key: String,
    payload: Vec<u8>,
}

/// What the module must hold, by stream id.
type Streams = BTreeMap<String, Vec<Expected>>;

fn expect(streams: &mut Streams, stream: &str, topic: &str, seq: u64, kind: &str, payload: &Value) {
    let key = format!("topic:{topic}:seq:{seq}:kind:{kind}");
    streams.entry(stream.into()).or_default().push(Expected { seq, kind: kind.into(), key, payload: canonical_json(payload) });
}

/// `count` events over `topics` topics `run:<t>:events`, round-robin, as JSONL lines
/// (keys in a non-canonical order, seq as a string every other line).
fn generate(count: u64, topics: u64, pad: usize) -> (Vec<String>, Streams) {
    let mut lines = Vec::new();
    let mut streams = Streams::new();
    for i in 0..count {
        let (t, seq) = (i % topics, i / topics + 1);
        let topic = format!("run:{t}:events");
        let payload = json!({ "n": i, "pad": "p".repeat(pad), "at": { "z": seq, "a": t } });
        let seq_json = if i % 2 == 0 { json!(seq.to_string()) } else { json!(seq) };
        lines.push(json!({ "payload": payload, "seq": seq_json, "kind": "run.step", "topic": topic }).to_string());
        expect(&mut streams, &format!("runtime.run.{t}.events"), &topic, seq, "run.step", &payload);
    }
    (lines, streams)
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The module holds exactly `expected`: every stream verifies, seqs are 1..=n, and each
/// stored event has the input's kind, key and payload bytes.
fn assert_module_holds(db: &TestDb, expected: &Streams) {
    for (stream, events) in expected {
        let seqs = verify_stream(db, stream).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "{stream}: stored seqs");
        let stored: Vec<_> = segments(db, stream).into_iter().flat_map(|s| s.events).collect();
        for (want, got) in events.iter().zip(&stored) {
            assert_eq!((got.seq, got.kind.as_str(), got.idempotency_key.as_str()), (want.seq, want.kind.as_str(), want.key.as_str()), "{stream}");
            assert_eq!(got.payload, want.payload, "{stream} seq {}: payload bytes", want.seq);
        }
    }
    let mut stored: Vec<String> = khala_tests::verify::streams(db).into_iter().map(|s| s.stream_id).collect();
    stored.sort();
    assert_eq!(stored, expected.keys().cloned().collect::<Vec<_>>(), "streams in the module");
}

/// The token file of `db`'s mirror identity in `dir`: a publisher granted `runtime.*`
/// (what `khala up` makes), minted on first use. The mirror refuses the owner's token.
fn token_file(db: &TestDb, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("mirror.token");
    if !path.exists() {
        let mirror = db.publisher_for(&["runtime.*"]);
        std::fs::write(dir.join("mirror.identity"), &mirror.identity).unwrap();
        std::fs::write(&path, &mirror.token).unwrap();
    }
    path
}

/// `khala mirror` against `db`, with the user's own settings kept out.
fn mirror<S: AsRef<std::ffi::OsStr>>(db: &TestDb, dir: &Path, args: impl IntoIterator<Item = S>) -> Command {
    mirror_as(db, dir, &token_file(db, dir), args)
}

/// `khala mirror` against `db` with the token in `token`.
fn mirror_as<S: AsRef<std::ffi::OsStr>>(db: &TestDb, dir: &Path, token: &Path, args: impl IntoIterator<Item = S>) -> Command {
    let mut command = isolated_khala(dir);
    command
        .arg("mirror")
        .args(["--server", &db.url, "--database", &db.name, "--token-file"])
        .arg(token)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The JSON summary the mirror prints as its last stdout line.
fn summary(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no summary:\n{}", text(output)));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary {last:?}: {e}"))
}

fn run_ok(mut command: Command) -> Value {
    let output = command.output().expect("running khala mirror");
    assert!(output.status.success(), "khala mirror failed:\n{}", text(&output));
    summary(&output)
}

/// The sum of the stream heads, or `None` while the server does not answer.
fn heads_total(db: &TestDb) -> Option<u64> {
    let rows = db.api.sql(&db.name, "SELECT head_seq FROM stream", &db.owner.token).ok()?;
    Some(rows.rows.iter().filter_map(|r| r.first().and_then(Value::as_u64)).sum())
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the mirror did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    Output { status: child.wait().unwrap(), stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
}

/// Kills the mirror with SIGKILL `kills` times at random points, then lets a last run
/// finish; the module must hold exactly the input. Each run is killed once the module's
/// heads pass a random share of the input, or after a random time in `life_ms`,
/// whichever comes first: a time alone lands after the end on a fast machine.
fn sigkill_drill(label: &str, events: u64, kills: usize, batch: &str, life_ms: std::ops::Range<u64>) {
    let db = shared_server().new_database(label);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (lines, expected) = generate(events, 3, 100);
    write_lines(&input, &lines);
    let input = input.to_string_lossy();
    let args = ["--input", &input, "--batch-events", batch, "--batch-ms", "5", "--durable-after-ms", "700", "--parallel", "1"];
    let mut rng = rand::thread_rng();
    let mut mid_run = 0;
    for round in 1..=kills {
        let mut child = mirror(&db, dir.path(), args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_millis(rng.gen_range(life_ms.clone()));
        let target = rng.gen_range(events / 10..events * 9 / 10);
        while Instant::now() < deadline && heads_total(&db).is_none_or(|n| n < target) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = heads_total(&db);
        child.kill().unwrap();
        child.wait().unwrap();
        mid_run += usize::from(before.is_some_and(|n| n < events));
        let cursor: Value = std::fs::read_to_string(dir.path().join("state").join("cursor.json")).map_or(Value::Null, |t| serde_json::from_str(&t).unwrap());
        eprintln!("kill {round}: module heads total {before:?}; durable cursor at line {}", cursor["line"]);
    }
    assert!(mid_run >= 1, "no kill landed while the mirror was publishing");
    let done = run_ok(mirror(&db, dir.path(), args));
    eprintln!("{mid_run} of {kills} kills landed mid-publish; final run: {done}");
    assert_eq!(done["durable_line"], json!(events));
    assert_module_holds(&db, &expected);
}

#[test]
fn sigkill_of_the_mirror_at_random_points_loses_and_doubles_nothing() {
    // Small batches, one call in flight, so that a run lasts long enough to be killed
    // in its middle (under a second on a fast machine).
    sigkill_drill("mirror-kill", 10_000, 5, "4", 200..900);
}

/// The larger drill for the record (not in the default run):
/// `KHALA_DRILL_EVENTS=50000 KHALA_DRILL_KILLS=20 KHALA_DRILL_BATCH=5 cargo test -p khala-tests --test mirror -- --ignored`.
#[test]
#[ignore]
fn sigkill_drill_large() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let batch = env("KHALA_DRILL_BATCH", 5).to_string();
    sigkill_drill("mirror-kill-large", env("KHALA_DRILL_EVENTS", 50_000), env("KHALA_DRILL_KILLS", 20) as usize, &batch, 200..1500);
}

#[test]
fn kill_9_of_the_server_mid_run_and_after_a_burst_loses_and_doubles_nothing() {
    let server = TestServer::start();
    let db = server.new_database("mirror-crash");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let total = 30_000;
    let (lines, expected) = generate(total, 3, 200);
    write_lines(&input, &lines);
    let mut child = mirror(&db, dir.path(), ["--input", &input.to_string_lossy(), "--batch-events", "50", "--durable-after-ms", "3000", "--parallel", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Mid-run.
    wait_for("a third of the input in the module", Duration::from_secs(60), || heads_total(&db).filter(|n| *n >= total / 3));
    server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    server.restart();
    eprintln!("after the mid-run kill -9: heads total {:?}", heads_total(&db));

    // Right after the burst: everything acknowledged, nothing yet confirmed durable.
    wait_for("the whole input acknowledged", Duration::from_secs(120), || heads_total(&db).filter(|n| *n == total));
    server.kill9();
    server.restart();
    eprintln!("after the kill -9 right after the burst: heads total {:?} of {total}", heads_total(&db));

    let output = wait_exit(&mut child, Duration::from_secs(120));
    assert!(output.status.success(), "{}", text(&output));
    let done = summary(&output);
    eprintln!("mirror: {done}");
    assert!(done["reconciles"].as_u64().unwrap() >= 1, "the mirror noticed neither crash: {done}");
    assert_eq!(done["durable_line"], json!(total));
    assert_module_holds(&db, &expected);
}

#[test]
fn acknowledged_events_the_server_loses_are_found_and_republished() {
    // Every event is acknowledged, then the database is wiped before any of them can count
    // as durable: what a crash does to unsynced commits, made certain. The mirror must see
    // the heads fall below its acknowledgements, rewind and publish everything again.
    let db = shared_server().new_database("mirror-loss");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (lines, expected) = generate(3000, 3, 50);
    write_lines(&input, &lines);
    let mut child = mirror(&db, dir.path(), ["--input", &input.to_string_lossy(), "--batch-events", "100", "--durable-after-ms", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("every event acknowledged", Duration::from_secs(30), || heads_total(&db).filter(|n| *n == 3000));
    db.api.publish_module(&db.name, khala_tests::module_wasm(), &db.owner.token, true).unwrap();
    // The wipe took the mirror's grants too; an operator restoring a database grants again.
    let mirror_identity = std::fs::read_to_string(dir.path().join("mirror.identity")).unwrap();
    khala_tools::grants::make_publisher(&db.api, &db.name, &db.owner.token, &mirror_identity, &["runtime.*"], 3600).unwrap();
    assert_eq!(heads_total(&db), Some(0));
    let output = wait_exit(&mut child, Duration::from_secs(60));
    assert!(output.status.success(), "{}", text(&output));
    let done = summary(&output);
    assert_eq!((done["lost_and_republished"].as_u64(), done["published"].as_u64()), (Some(3000), Some(6000)), "{done}");
    assert!(done["reconciles"].as_u64().unwrap() >= 1, "{done}");
    assert_module_holds(&db, &expected);
}

#[test]
fn stdin_is_spooled_and_the_next_run_goes_on_from_the_spool() {
    let db = shared_server().new_database("mirror-stdin");
    let dir = tempfile::tempdir().unwrap();
    let (lines, expected) = generate(600, 3, 20);
    for part in lines.chunks(300) {
        let mut child = mirror(&db, dir.path(), ["--durable-after-ms", "700"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, part.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes()).unwrap();
        drop(stdin);
        let output = wait_exit(&mut child, Duration::from_secs(60));
        assert!(output.status.success(), "{}", text(&output));
        assert_eq!(summary(&output)["events_read"], json!(300));
    }
    assert_module_holds(&db, &expected);
    // Segments the durable cursor has passed are gone; at most the last one and the
    // (empty) one a run starts with stay.
    let spool: Vec<_> = std::fs::read_dir(dir.path().join("state").join("spool")).unwrap().collect();
    assert!(spool.len() <= 2, "{spool:?}");
}

#[test]
fn bad_lines_are_dead_lettered_with_line_and_reason_and_the_rest_goes_on() {
    let db = shared_server().new_database("mirror-bad");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let event = |topic: &str, seq: u64, payload: Value| json!({ "topic": topic, "seq": seq, "kind": "k", "payload": payload }).to_string();
    let big = json!({ "blob": "x".repeat(2000) });
    let lines = vec![
        event("run:a:events", 1, json!(1)),
        "this is not json".to_string(),
        event("run:a:events", 2, json!(2)),
        json!({ "topic": "run:b:events", "kind": "k", "payload": {} }).to_string(),
        event("run:b:events", 1, json!("b1")),
        event("run:b:events", 2, big),
        event("run:b:events", 3, json!("b3")),
        event("run:a:events", 3, json!(3)),
        event("worker:c:lifecycle", 1, json!({ "up": true })),
    ];
    write_lines(&input, &lines);
    let dead_letter = dir.path().join("dead.jsonl");
    let args = |extra: &[&str]| {
        let mut args = vec!["--input".to_string(), input.to_string_lossy().into(), "--max-payload-bytes".into(), "1024".into(), "--durable-after-ms".into(), "700".into()];
        args.extend(["--dead-letter".to_string(), dead_letter.to_string_lossy().into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // Hold (the default): stream b stops before its refused event; a and c go on.
    let output = mirror(&db, dir.path(), args(&[])).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("khala: streams_held:") && text(&output).contains("runtime.run.b.events"), "{}", text(&output));
    let records: Vec<Value> = std::fs::read_to_string(&dead_letter).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(u64, &str)> = records.iter().map(|r| (r["line"].as_u64().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert_eq!(seen, vec![(2, "not_json"), (4, "invalid_seq"), (6, "payload_too_large")]);
    assert_eq!(records[0]["raw"], json!("this is not json"));
    assert_eq!(records[2]["raw"].as_str(), Some(lines[5].as_str()));
    let mut expected = Streams::new();
    for seq in 1..=3 {
        expect(&mut expected, "runtime.run.a.events", "run:a:events", seq, "k", &json!(seq));
    }
    expect(&mut expected, "runtime.run.b.events", "run:b:events", 1, "k", &json!("b1"));
    expect(&mut expected, "runtime.worker.c.lifecycle", "worker:c:lifecycle", 1, "k", &json!({ "up": true }));
    assert_module_holds(&db, &expected);

    // Skip: a marker takes the refused event's seq and b goes on; no dead letter twice.
    // This run publishes over HTTP JSON, the other transport (the SDK is the default).
    let done = run_ok(mirror(&db, dir.path(), args(&["--on-gap", "skip", "--transport", "http"])));
    assert_eq!(done["durable_line"], json!(9), "{done}");
    assert_eq!(std::fs::read_to_string(&dead_letter).unwrap().lines().count(), 3);
    let marker = json!({ "reason": "payload_too_large", "seq": 2, "topic": "run:b:events" });
    expect(&mut expected, "runtime.run.b.events", "run:b:events", 2, "khala.gap", &marker);
    expect(&mut expected, "runtime.run.b.events", "run:b:events", 3, "k", &json!("b3"));
    let b = expected.get_mut("runtime.run.b.events").unwrap();
    b.sort_by_key(|e| e.seq);
    assert_module_holds(&db, &expected);
}

/// `count` outbox rows per topic `run:<t>:events` (t < topics) with seqs `from..from+count`.
fn insert_rows(pg: &Postgres, topics: u64, from: u64, count: u64) {
    pg.psql(&format!(
        "INSERT INTO khala_outbox (topic, seq, kind, payload, occurred_at) \
         SELECT 'run:' || t || ':events', s, 'pg.event', jsonb_build_object('t', t, 's', s, 'pad', repeat('x', 50)), now() \
         FROM generate_series({from}, {}) s, generate_series(0, {}) t ORDER BY s, t",
        from + count - 1,
        topics - 1
    ));
}

fn outbox_expected(topics: u64, through: u64) -> Streams {
    let mut streams = Streams::new();
    for t in 0..topics {
        for s in 1..=through {
            let payload = json!({ "t": t, "s": s, "pad": "x".repeat(50) });
            expect(&mut streams, &format!("runtime.run.{t}.events"), &format!("run:{t}:events"), s, "pg.event", &payload);
        }
    }
    streams
}

#[test]
fn the_postgres_outbox_is_mirrored_resumed_and_followed() {
    let pg = Postgres::start();
    let db = shared_server().new_database("mirror-pg");
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let pg_args = |extra: &[&str]| -> Vec<String> { ["--postgres", url.as_str(), "--durable-after-ms", "700"].iter().chain(extra).map(|s| s.to_string()).collect() };

    // Before the schema is applied the mirror says so by name, and exits.
    let output = mirror(&db, dir.path(), pg_args(&["--once"])).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("khala: outbox_not_migrated:") && text(&output).contains("--migrate"), "{}", text(&output));

    // Outboxes made by hand. Narrower integers (`serial` ids, `integer` seqs) and a `json`
    // payload are read as the migration's types are; a column the mirror cannot read, or
    // one missing, is refused by name and the mirror exits, not retried for ever (a
    // `serial` id used to fail every read as a transient error).
    let handmade_db = shared_server().new_database("mirror-pg-handmade");
    let cursor_table = "CREATE TABLE khala_mirror_cursor (name text PRIMARY KEY, last_id bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())";
    // Makes database `name` with an outbox of `columns` (and `cursor` for the cursor
    // table), fills it with `insert` and `setup`, applies the migration on top (its
    // id-ordering trigger) unless the setup says `-- not migrated`, and runs the mirror on
    // it once as `role`.
    let handmade = |name: &str, columns: &str, cursor: &str, insert: &str, setup: &str, role: &str| {
        pg.psql(&format!("CREATE DATABASE {name}"));
        pg.psql_in(name, &format!("CREATE TABLE khala_outbox ({columns}); {cursor}; INSERT INTO khala_outbox {insert}; {setup}"));
        if !setup.contains("-- not migrated") {
            let output = mirror(&handmade_db, &dir.path().join(name), ["--postgres", &pg.url_of(name), "--migrate"]).output().unwrap();
            assert!(output.status.success(), "{name}: {}", text(&output));
        }
        let url = pg.url_of(name).replacen("khala@", &format!("{role}@"), 1);
        let output = mirror(&handmade_db, &dir.path().join(name), ["--postgres", &url, "--once", "--durable-after-ms", "700"]).output().unwrap();
        (output.status.code(), text(&output))
    };
    let narrow_rows = "(topic, seq, kind, payload, occurred_at) SELECT 'run:0:events', s, 'k', json_build_object('n', s), now() FROM generate_series(1, 300) s";
    let (status, output) = handmade(
        "narrow",
        "id serial PRIMARY KEY, topic text NOT NULL, seq integer NOT NULL, kind text NOT NULL, payload json NOT NULL, occurred_at timestamp",
        cursor_table,
        narrow_rows,
        "",
        "khala",
    );
    assert_eq!(status, Some(0), "{output}");
    let mut narrow = Streams::new();
    for s in 1..=300 {
        expect(&mut narrow, "runtime.run.0.events", "run:0:events", s, "k", &json!({ "n": s }));
    }
    assert_module_holds(&handmade_db, &narrow);
    let columns = |seq: &str| format!("id bigserial PRIMARY KEY, topic text NOT NULL, seq {seq} NOT NULL, kind text NOT NULL, payload jsonb NOT NULL, occurred_at timestamptz");
    let one_row = "(topic, seq, kind, payload) VALUES ('run:1:events', 1, 'k', '{}')";
    // The last two read and publish the narrow outbox's events again (duplicates, checked
    // against the module) and fail at the cursor's upsert.
    for (name, columns, cursor, insert, setup, role, code) in [
        ("seq_as_text", columns("text"), cursor_table.to_string(), one_row, "", "khala", "outbox_schema_mismatch"),
        ("no_occurred_at", "id bigserial PRIMARY KEY, topic text NOT NULL, seq bigint NOT NULL, kind text NOT NULL, payload jsonb NOT NULL".into(), cursor_table.into(), one_row, "", "khala", "outbox_schema_mismatch"),
        ("cursor_without_key", columns("bigint"), cursor_table.replace(" PRIMARY KEY", ""), narrow_rows, "", "khala", "outbox_schema_mismatch"),
        ("no_ordering_trigger", columns("bigint"), cursor_table.into(), one_row, "-- not migrated", "khala", "outbox_not_migrated"),
        // A NULL where the migration has NOT NULL dead-letters its row (the stream is held
        // at it), not the whole outbox as a mismatch.
        (
            "nullable",
            "id bigserial PRIMARY KEY, topic text, seq bigint, kind text, payload jsonb, occurred_at timestamptz".into(),
            cursor_table.into(),
            "(topic, seq, kind, payload) VALUES ('run:n:events', 1, 'k', '{}'), ('run:n:events', 2, NULL, '{}')",
            "",
            "khala",
            "streams_held",
        ),
        (
            "read_only_role",
            columns("bigint"),
            cursor_table.into(),
            narrow_rows,
            "CREATE ROLE reader LOGIN; GRANT SELECT ON khala_outbox, khala_mirror_cursor TO reader",
            "reader",
            "outbox_permission_denied",
        ),
    ] {
        let (status, output) = handmade(name, &columns, &cursor, insert, setup, role);
        assert_eq!(status, Some(1), "{name}: {output}");
        assert!(output.contains(&format!("khala: {code}:")), "{name}: {output}");
    }
    expect(&mut narrow, "runtime.run.n.events", "run:n:events", 1, "k", &json!({}));
    assert_module_holds(&handmade_db, &narrow);

    // The migration applies once, then is a no-op.
    for expected in ["applied 0001_outbox", "the outbox schema is up to date"] {
        let output = mirror(&db, dir.path(), ["--postgres", &url, "--migrate"]).output().unwrap();
        assert!(output.status.success() && text(&output).contains(expected), "{}", text(&output));
    }

    insert_rows(&pg, 3, 1, 200);
    pg.psql("INSERT INTO khala_outbox (topic, seq, kind, payload) VALUES ('run:9:events', 0, 'pg.event', '{}')");
    // Pages of 256 rows (the least): the first read asks for one, then the reader task
    // reads on ahead until a page comes back short.
    let once = pg_args(&["--once", "--batch-events", "100"]);
    let first = run_ok(mirror(&db, dir.path(), &once));
    assert_eq!((first["events_read"].as_u64(), first["published"].as_u64(), first["dead_lettered"].as_u64()), (Some(601), Some(600), Some(1)), "{first}");
    assert_module_holds(&db, &outbox_expected(3, 200));
    let max_id = pg.psql("SELECT max(id) FROM khala_outbox");
    assert_eq!(pg.psql(&format!("SELECT last_id FROM khala_mirror_cursor WHERE name = '{}'", db.name)), max_id);

    // A restart resumes at the cursor: only the new rows are read.
    insert_rows(&pg, 3, 201, 20);
    let second = run_ok(mirror(&db, dir.path(), &once));
    assert_eq!((second["events_read"].as_u64(), second["duplicates"].as_u64()), (Some(60), Some(0)), "{second}");
    assert_module_holds(&db, &outbox_expected(3, 220));

    // Following: a NOTIFY wakes the mirror long before its (60 s) poll; Ctrl-C stops it
    // cleanly with the cursor saved; the metrics endpoint answers meanwhile.
    let port = khala_tools::server::free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{port}");
    let follow = pg_args(&["--poll-ms", "60000", "--metrics-addr", &metrics_addr]);
    let mut child = mirror(&db, dir.path(), &follow).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = || {
        let mut stream = std::net::TcpStream::connect(&metrics_addr).ok()?;
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut stream, &mut body).ok()?;
        Some(body)
    };
    wait_for("the metrics endpoint", Duration::from_secs(10), metrics);
    std::thread::sleep(Duration::from_millis(500));
    insert_rows(&pg, 3, 221, 10);
    wait_for("the notified rows in the module", Duration::from_secs(15), || heads_total(&db).filter(|n| *n == 3 * 230));
    let published = |body: &str| body.lines().find_map(|l| l.strip_prefix("khala_mirror_published_total ")).and_then(|n| n.trim().parse::<f64>().ok());
    let body = wait_for("published events in the metrics", Duration::from_secs(5), || metrics().filter(|b| published(b).is_some_and(|n| n >= 30.0)));
    assert!(body.contains("khala_mirror_lag_events") && body.contains("khala_mirror_spool_depth"), "{body}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let output = wait_exit(&mut child, Duration::from_secs(30));
    assert!(output.status.success(), "{}", text(&output));
    assert_module_holds(&db, &outbox_expected(3, 230));
    let max_id = pg.psql("SELECT max(id) FROM khala_outbox");
    assert_eq!(pg.psql(&format!("SELECT last_id FROM khala_mirror_cursor WHERE name = '{}'", db.name)), max_id);

    // The runtime prunes what the mirror holds, and VACUUM then leaves the planner sure the
    // table is empty: a plain session would read each page past the cursor by scanning and
    // sorting every row there. The mirror's reading connection walks the index.
    pg.psql(&format!("DELETE FROM khala_outbox WHERE id <= {max_id}"));
    pg.psql("VACUUM khala_outbox");
    insert_rows(&pg, 3, 231, 10);
    let explain = |settings: &str| pg.psql(&format!("{settings}; PREPARE page(bigint, bigint) AS {}; EXPLAIN EXECUTE page({max_id}, 1000)", outbox::READ_ROWS));
    let plain = explain("SELECT 1");
    assert!(plain.contains("Sort"), "the planner no longer mis-plans a pruned outbox, so this check proves nothing:\n{plain}");
    let reader = explain(outbox::READER_SETTINGS);
    assert!(reader.contains("Index Scan using khala_outbox_pkey") && !reader.contains("Sort"), "{reader}");
    // A row's timestamp comes over the wire as it is stored; an infinite one is no time an
    // event happened at, so its row is dead-lettered (it used to fail every read) and, with
    // `--on-gap skip`, a marker takes its seq.
    pg.psql("INSERT INTO khala_outbox (topic, seq, kind, payload, occurred_at) VALUES ('run:7:events', 1, 'pg.event', '{\"b\": 1, \"a\": [1, 2]}', '2024-05-01T10:00:00.5Z')");
    pg.psql("INSERT INTO khala_outbox (topic, seq, kind, payload, occurred_at) VALUES ('run:8:events', 1, 'pg.event', '{}', 'infinity')");
    let last = run_ok(mirror(&db, dir.path(), pg_args(&["--once", "--on-gap", "skip"])));
    assert_eq!((last["published"].as_u64(), last["dead_lettered"].as_u64()), (Some(32), Some(1)), "{last}");
    let mut expected = outbox_expected(3, 240);
    expect(&mut expected, "runtime.run.7.events", "run:7:events", 1, "pg.event", &json!({ "a": [1, 2], "b": 1 }));
    let marker = json!({ "reason": "invalid_occurred_at", "seq": 1, "topic": "run:8:events" });
    expect(&mut expected, "runtime.run.8.events", "run:8:events", 1, "khala.gap", &marker);
    assert_module_holds(&db, &expected);
    let timed = &segments(&db, "runtime.run.7.events")[0].events[0];
    assert_eq!(timed.occurred_at_micros, 1_714_557_600_500_000);
}

#[test]
fn the_mirror_refuses_the_owner_token_unless_allowed() {
    let db = shared_server().new_database("mirror-owner");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (lines, expected) = generate(30, 3, 10);
    write_lines(&input, &lines);
    let owner_token = dir.path().join("owner.token");
    std::fs::write(&owner_token, &db.owner.token).unwrap();
    let with_owner = |extra: &[&str]| {
        let mut command = mirror_as(&db, dir.path(), &owner_token, ["--input", &input.to_string_lossy()]);
        command.args(extra).output().unwrap()
    };
    let refused = with_owner(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("khala: owner_token: "), "{}", text(&refused));
    assert_eq!(heads_total(&db), Some(0), "nothing was published with the owner's token");
    // The owner needs a publish grant like anyone else; then --allow-owner runs.
    khala_tools::grants::make_publisher(&db.api, &db.name, &db.owner.token, &db.owner.identity, &["runtime.*"], 3600).unwrap();
    let allowed = with_owner(&["--allow-owner"]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert_module_holds(&db, &expected);
}

/// A rotated-out mirror identity (no publish grant left) stops at once, by name, instead
/// of reading invisible heads as 0; a stream outside a narrower grant is held as
/// `forbidden_stream`, not as a gap, while the streams it may publish go on.
#[test]
fn a_mirror_without_publish_grants_stops_and_an_ungranted_stream_is_held_by_name() {
    let db = shared_server().new_database("mirror-reach");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (lines, expected) = generate(30, 3, 10);
    write_lines(&input, &lines);
    let token_for = |name: &str, patterns: &[&str]| {
        let who = db.publisher_for(patterns);
        let path = dir.path().join(name);
        std::fs::write(&path, &who.token).unwrap();
        (who, path)
    };

    let (old, old_token) = token_for("old.token", &["runtime.*"]);
    db.call("set_role", json!([khala_tools::api::identity_arg(&old.identity), "publisher", false]));
    let refused = mirror_as(&db, dir.path(), &old_token, ["--input", &input.to_string_lossy()]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("khala: no_publish_grant: "), "{}", text(&refused));
    assert_eq!(heads_total(&db), Some(0), "nothing was published by a rotated-out identity");

    let (_, narrow_token) = token_for("narrow.token", &["runtime.run.0.*", "runtime.run.1.events"]);
    let output = mirror_as(&db, dir.path(), &narrow_token, ["--input", &input.to_string_lossy()]).output().unwrap();
    assert!(!output.status.success(), "a held stream ends the run with streams_held:\n{}", text(&output));
    let held: Vec<String> = summary(&output)["held_streams"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].starts_with("runtime.run.2.events: forbidden_stream: "), "{held:?}");
    let granted: Streams = expected.into_iter().filter(|(stream, _)| stream != "runtime.run.2.events").collect();
    assert_module_holds(&db, &granted);
}

/// A rogue publisher wrote seqs 1..=3 of a stream before the mirror got there. The mirror
/// must not take them for the authority's events: it compares, names the divergence,
/// holds that stream (its cursor stays before it), and publishes the other streams.
#[test]
fn a_rogue_write_under_the_mirror_is_found_named_and_held() {
    let db = shared_server().new_database("mirror-rogue");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (lines, expected) = generate(300, 3, 10);
    write_lines(&input, &lines);
    let rogue = db.publisher_for(&["runtime.run.0.*"]);
    let forged: Vec<Value> = (1..=3).map(|s| khala_tests::event_json(&format!("forged{s}"), "run.step", format!("{{\"forged\":{s}}}").as_bytes(), Some(s))).collect();
    db.call_as(&rogue, "publish", json!(["runtime.run.0.events", forged])).unwrap();

    let output = mirror(&db, dir.path(), ["--input", &input.to_string_lossy()]).output().unwrap();
    assert!(!output.status.success(), "a divergence must not pass for success:\n{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("khala: streams_held: ") && stderr.contains("authority_divergence"), "{stderr}");
    let done = summary(&output);
    let divergences: Vec<&str> = done["divergences"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(divergences.len(), 1, "{done}");
    assert!(divergences[0].starts_with("stream=runtime.run.0.events seq=1 authority=run.step/blake3:"), "{done}");
    assert!(divergences[0].contains(" module=run.step/blake3:"), "{done}");
    // The forged events stay (the mirror never writes over the log) and nothing follows them.
    assert_eq!(khala_tests::verify::stream(&db, "runtime.run.0.events").unwrap().head_seq, 3, "{}", text(&output));
    // The other streams are mirrored in full.
    for (stream, events) in expected.iter().filter(|(s, _)| *s != "runtime.run.0.events") {
        assert_eq!(khala_tests::verify::stream(&db, stream).unwrap().head_seq, events.len() as u64, "{stream}");
    }
    // A rerun finds it again: the cursor never passed the unchecked event.
    let again = mirror(&db, dir.path(), ["--input", &input.to_string_lossy(), "--on-divergence", "fail"]).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("khala: authority_divergence: stream=runtime.run.0.events seq=1 "), "{}", text(&again));
}

/// The authority changed an event after it was mirrored (drill 10's fault): a fresh
/// pass over the changed log finds it; an unchanged log checks clean.
#[test]
fn an_authority_event_changed_after_publishing_is_found() {
    let db = shared_server().new_database("mirror-changed");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let (mut lines, _) = generate(90, 3, 10);
    write_lines(&input, &lines);
    run_ok(mirror(&db, dir.path(), ["--input", &input.to_string_lossy()]));
    // The same log from the start (new state dir): every event is a checked duplicate.
    let clean = run_ok(mirror(&db, &dir.path().join("second"), ["--input", &input.to_string_lossy()]));
    assert_eq!((clean["duplicates"].as_u64(), clean["verified"].as_u64(), clean["published"].as_u64()), (Some(90), Some(90), Some(0)), "{clean}");
    // Line 40 is seq 14 of run:1:events; the authority rewrites its payload.
    let mut changed: Value = serde_json::from_str(&lines[40]).unwrap();
    changed["payload"] = json!({ "rewritten": true });
    lines[40] = changed.to_string();
    let edited = dir.path().join("edited.jsonl");
    write_lines(&edited, &lines);
    let output = mirror(&db, &dir.path().join("third"), ["--input", &edited.to_string_lossy()]).output().unwrap();
    assert!(!output.status.success());
    let done = summary(&output);
    assert_eq!(done["divergences"].as_array().unwrap().len(), 1, "{done}");
    assert!(done["divergences"][0].as_str().unwrap().starts_with("stream=runtime.run.1.events seq=14 "), "{done}");
}

#[test]
fn an_event_repeated_in_the_input_while_still_queued_is_checked_not_waited_on_for_ever() {
    let db = shared_server().new_database("mirror-repeat");
    let dir = tempfile::tempdir().unwrap();
    let line = |topic: &str, seq: u64, payload: Value| json!({ "topic": topic, "seq": seq, "kind": "k", "payload": payload }).to_string();
    // An at-least-once producer wrote seq 5 twice: both copies are read before the first
    // is sent, so the second duplicates an event still queued. It used to wait for a check
    // that could only come after the queued event was sent, which the check kept from
    // being sent: the mirror hung.
    let mut lines: Vec<String> = (1..=20).map(|s| line("run:r:events", s, json!({ "s": s }))).collect();
    lines.insert(5, line("run:r:events", 5, json!({ "s": 5 })));
    let input = dir.path().join("repeat.jsonl");
    write_lines(&input, &lines);
    let mut child = mirror(&db, &dir.path().join("a"), ["--input", &input.to_string_lossy(), "--durable-after-ms", "700"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let output = wait_exit(&mut child, Duration::from_secs(60));
    assert!(output.status.success(), "{}", text(&output));
    let done = summary(&output);
    assert_eq!((done["published"].as_u64(), done["duplicates"].as_u64(), done["verified"].as_u64()), (Some(20), Some(1), Some(1)), "{done}");

    // A repeat that is another event is the input contradicting itself: named as a
    // divergence at its seq once the first copy is in the module, not waited on.
    let mut lines: Vec<String> = (1..=20).map(|s| line("run:c:events", s, json!({ "s": s }))).collect();
    lines.insert(10, line("run:c:events", 10, json!({ "s": "other" })));
    let input = dir.path().join("conflict.jsonl");
    write_lines(&input, &lines);
    let mut child = mirror(&db, &dir.path().join("b"), ["--input", &input.to_string_lossy(), "--durable-after-ms", "700"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let output = wait_exit(&mut child, Duration::from_secs(60));
    assert!(!output.status.success(), "{}", text(&output));
    let done = summary(&output);
    assert!(done["divergences"][0].as_str().is_some_and(|d| d.starts_with("stream=runtime.run.c.events seq=10 ")), "{done}");
}

#[test]
fn an_event_too_large_for_any_batch_is_dead_lettered_not_retried_for_ever() {
    let db = shared_server().new_database("mirror-too-large");
    // A batch may carry 100 payload bytes; one event carries 300 of them.
    db.call("set_limits", json!([0, 0, 100]));
    let dir = tempfile::tempdir().unwrap();
    let line = |seq: u64, payload: Value| json!({ "topic": "run:t:events", "seq": seq, "kind": "k", "payload": payload }).to_string();
    let input = dir.path().join("events.jsonl");
    write_lines(&input, &[line(1, json!("one")), line(2, json!({ "blob": "x".repeat(300) })), line(3, json!("three"))]);
    let dead_letter = dir.path().join("dead.jsonl");
    let args = ["--input", &input.to_string_lossy(), "--dead-letter", &dead_letter.to_string_lossy(), "--on-gap", "skip", "--durable-after-ms", "700"].map(String::from);
    // The batch is halved down to the event alone, which is then refused as the module
    // refuses an event: dead-lettered, a marker in its place. It used to be halved to one
    // and sent again at once, for ever.
    let mut child = mirror(&db, dir.path(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let output = wait_exit(&mut child, Duration::from_secs(60));
    assert!(output.status.success(), "{}", text(&output));
    let records: Vec<Value> = std::fs::read_to_string(&dead_letter).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.iter().map(|r| (r["line"].as_u64(), r["reason"].as_str())).collect::<Vec<_>>(), vec![(Some(2), Some("batch_too_large"))]);
    let mut expected = Streams::new();
    expect(&mut expected, "runtime.run.t.events", "run:t:events", 1, "k", &json!("one"));
    expect(&mut expected, "runtime.run.t.events", "run:t:events", 2, "khala.gap", &json!({ "reason": "batch_too_large", "seq": 2, "topic": "run:t:events" }));
    expect(&mut expected, "runtime.run.t.events", "run:t:events", 3, "k", &json!("three"));
    assert_module_holds(&db, &expected);
}

#[test]
fn an_event_read_again_behind_the_mirrors_own_gap_marker_is_not_a_divergence() {
    let db = shared_server().new_database("mirror-behind-marker");
    // The module takes payloads of at most 64 bytes; the mirror's own limit is higher, so
    // it is the module that refuses seq 2.
    db.call("set_limits", json!([64, 0, 0]));
    let dir = tempfile::tempdir().unwrap();
    let line = |seq: u64, payload: Value| json!({ "topic": "run:m:events", "seq": seq, "kind": "k", "payload": payload }).to_string();
    let input = dir.path().join("events.jsonl");
    write_lines(&input, &[line(1, json!("one")), line(2, json!({ "blob": "x".repeat(100) })), line(3, json!("three"))]);
    let args = ["--input", &input.to_string_lossy(), "--on-gap", "skip", "--durable-after-ms", "700"].map(String::from);
    let token = token_file(&db, dir.path());
    let first = run_ok(mirror_as(&db, &dir.path().join("first"), &token, &args));
    assert_eq!((first["published"].as_u64(), first["dead_lettered"].as_u64()), (Some(3), Some(1)), "{first}");
    // Read again from the start (a fresh state dir, as after a reconcile or a lost cursor):
    // seq 2 meets the marker the mirror put in its place. It was named a divergence, and
    // the stream held for good.
    let again = run_ok(mirror_as(&db, &dir.path().join("again"), &token, &args));
    assert_eq!((again["duplicates"].as_u64(), again["verified"].as_u64(), again["behind_gap_markers"].as_u64()), (Some(3), Some(2), Some(1)), "{again}");
    assert_eq!(again["divergences"], json!([]), "{again}");
    // To another identity (a second mirror, or this one after its token was rotated) the
    // marker stands for nothing the authority said: still a divergence.
    let output = mirror(&db, &dir.path().join("other"), &args).output().unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert!(summary(&output)["divergences"][0].as_str().is_some_and(|d| d.starts_with("stream=runtime.run.m.events seq=2 ")), "{}", text(&output));
}

#[test]
fn a_publish_grant_revoked_mid_run_holds_its_stream_and_the_others_go_on() {
    let db = shared_server().new_database("mirror-revoked");
    let dir = tempfile::tempdir().unwrap();
    let who = db.publisher_for(&["runtime.run.a.events", "runtime.run.b.events"]);
    let token = dir.path().join("mirror.token");
    std::fs::write(&token, &who.token).unwrap();
    let input = dir.path().join("events.jsonl");
    let line = |t: &str, seq: u64| json!({ "topic": format!("run:{t}:events"), "seq": seq, "kind": "k", "payload": seq }).to_string();
    write_lines(&input, &[line("a", 1), line("b", 1)]);
    let metrics_addr = format!("127.0.0.1:{}", khala_tools::server::free_port().unwrap());
    let held = || {
        let mut stream = std::net::TcpStream::connect(&metrics_addr).ok()?;
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut stream, &mut body).ok()?;
        body.lines().find_map(|l| l.strip_prefix("khala_mirror_held_streams ")).and_then(|n| n.trim().parse::<f64>().ok())
    };
    let mut child = mirror_as(&db, dir.path(), &token, ["--input", &input.to_string_lossy(), "--follow", "--durable-after-ms", "700", "--metrics-addr", &metrics_addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("both streams published", Duration::from_secs(15), || heads_total(&db).filter(|n| *n == 2));
    db.revoke(&who, "runtime.run.b.events");
    let mut file = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    std::io::Write::write_all(&mut file, [line("b", 2), line("a", 2), line("a", 3)].map(|l| l + "\n").concat().as_bytes()).unwrap();
    // The module refuses b's next batch (forbidden_stream). That ended the whole run; now
    // the mirror reads its grants again, holds b and publishes a on.
    wait_for("b held", Duration::from_secs(20), || held().filter(|n| *n == 1.0));
    wait_for("a published on", Duration::from_secs(15), || heads_total(&db).filter(|n| *n == 4));
    assert!(child.try_wait().unwrap().is_none(), "the mirror stopped");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let output = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("khala: streams_held:") && text(&output).contains("runtime.run.b.events"), "{}", text(&output));
    assert_eq!(summary(&output)["failures"]["forbidden_stream"].as_u64(), Some(1), "{}", text(&output));
}

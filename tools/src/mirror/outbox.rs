//! The Postgres outbox source: the runtime inserts its events into `khala_outbox` in the
//! same transaction as the state change they describe; the mirror reads them by keyset
//! (`id > cursor ORDER BY id`), wakes on `NOTIFY khala_outbox` and polls as a fallback,
//! and stores its durable position in `khala_mirror_cursor`, so a restart resumes exactly
//! there. The schema and its triggers are `tools/migrations/*.sql` ([`migrate`]).
//!
//! `tokio-postgres` is async; the source owns a Tokio runtime with one worker thread and
//! blocks on it, so the rest of the mirror stays synchronous. After a full page a reader
//! task on the worker reads on ahead, a page at a time, so Postgres reads the next pages
//! while the mirror works through this one (the two took turns before). A Postgres error
//! drops the connection and is reported as [`MirrorError::Postgres`], which the mirror
//! treats as transient: it backs off, rewinds to the durable cursor and reconnects. A
//! missing table is [`MirrorError::OutboxNotMigrated`] instead, which retrying cannot mend.
//!
//! While metrics are served, a watcher thread with its own connection counts the rows past
//! the stored cursor (and the age of the oldest) once per poll interval (1 to 5 s), apart
//! from the mirror's loop, so the backlog gauges keep moving while the mirror is stuck.

use super::error::{MirrorError, Result};
use super::event::{Bad, Limits, Parser};
use super::source::{Mark, Origin, Read, Record, Source};
use khala_proto::json::canonicalize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;
use tokio_postgres::types::{accepts, FromSql, Type, WrongType};
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

/// The migrations, in order: `(version, name, sql)`.
pub const MIGRATIONS: [(i32, &str, &str); 2] = [
    (1, "0001_outbox", include_str!("../../migrations/0001_outbox.sql")),
    (2, "0002_outbox_created_at", include_str!("../../migrations/0002_outbox_created_at.sql")),
];

/// The advisory lock that keeps two `--migrate` runs apart.
const MIGRATE_LOCK: i64 = 7_104_202_500;

/// One page of rows past `$1`, at most `$2`: a range of the primary key's index. `$1` is
/// a `bigint` whatever `id` is, so an outbox made by hand with an `integer` id (`serial`)
/// is read too: the comparison across the two is in the index's operator family.
pub const READ_ROWS: &str = "SELECT id, topic, seq, kind, payload::text, occurred_at \
                         FROM khala_outbox WHERE id > $1::bigint ORDER BY id LIMIT $2";

/// The reading connection's planner settings. The keyset read must walk the primary key's
/// index, and the planner's estimate of what lies past the cursor is always stale: rows
/// beyond the last `ANALYZE` count as about one, and once the runtime has pruned the rows
/// below the cursor and `VACUUM` has run, the whole table counts as empty. On such an
/// estimate Postgres planned a sequential or bitmap scan and a sort of every row past the
/// cursor, for every page: 1.3 s a page with 600k rows waiting, a backlog read in
/// quadratic time. With those two scans off, the index scan is the only plan left for
/// [`READ_ROWS`]; the mirror's other queries are on primary keys too.
pub const READER_SETTINGS: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off";

/// The migration's id-ordering trigger on `khala_outbox`. Without it, two writers'
/// transactions can commit ids out of order: a reader past id 11 never sees an id 10
/// committed later. An outbox made by hand gets it from `--migrate` like any other.
const ORDERING_TRIGGER: &str = "SELECT 1 FROM pg_trigger WHERE tgrelid = 'khala_outbox'::regclass AND tgname = 'khala_outbox_assign_id' AND tgenabled <> 'D'";

/// Rows not yet mirrored (past the stored cursor) and the age of the oldest, by Postgres'
/// clock so that the two hosts' clocks need not agree. An index range on the primary key.
const BACKLOG: &str = "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM khala_outbox \
                       WHERE id > coalesce((SELECT last_id FROM khala_mirror_cursor WHERE name = $1), 0)";

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| MirrorError::io("starting a Tokio runtime", e))
}

/// The outbox reader's runtime: its worker runs the connection and the page read ahead
/// while the mirror's thread is busy elsewhere.
fn reader_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("outbox-reader")
        .enable_all()
        .build()
        .map_err(|e| MirrorError::io("starting a Tokio runtime", e))
}

/// The reading connection: its client (shared with the page read ahead), its
/// notifications, and the page read, prepared once (not parsed and planned per page).
struct Connection {
    client: Arc<Client>,
    notes: UnboundedReceiver<()>,
    read_rows: Statement,
}

/// Full pages read ahead and not yet taken, at most.
const READ_AHEAD_PAGES: usize = 2;

/// One page of rows, or why it could not be read.
type Page = std::result::Result<Vec<Row>, tokio_postgres::Error>;

/// The reader task, reading pages one after another while the mirror works through the
/// ones before (see [`read_pages`]).
struct ReadAhead {
    /// The next page it hands over starts after this id ...
    after: i64,
    /// ... and holds at most this many rows.
    limit: i64,
    pages: tokio::sync::mpsc::Receiver<Page>,
    task: JoinHandle<()>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the pages past `after` in order into `pages`, asking for each as soon as the one
/// before has come and there is room for it (so Postgres is never idle waiting for the
/// mirror, and reads at most [`READ_AHEAD_PAGES`] ahead); stops after a page that is not
/// full (the reader has caught up) or an error, which it hands over like a page.
async fn read_pages(client: Arc<Client>, read_rows: Statement, mut after: i64, limit: i64, pages: tokio::sync::mpsc::Sender<Page>) {
    loop {
        let Ok(room) = pages.reserve().await else { return };
        let page = client.query(&read_rows, &[&after, &limit]).await;
        let next = match &page {
            // An id of another type ends the read ahead; `Outbox::read` reports it.
            Ok(rows) if rows.len() as i64 == limit => rows.last().and_then(|row| row.try_get::<_, Integer>(0).ok()).map(|id| id.0),
            _ => None,
        };
        room.send(page);
        match next {
            Some(id) => after = id,
            None => return,
        }
    }
}

async fn connect(url: &str) -> Result<(Client, UnboundedReceiver<()>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.map_err(|e| MirrorError::postgres("connecting", e))?;
    let (tx, rx) = unbounded_channel();
    // The connection task delivers query results and forwards notifications.
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("postgres connection closed: {e}");
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Applies the migrations not yet applied, in one transaction; returns their names.
pub fn migrate(url: &str) -> Result<Vec<String>> {
    runtime()?.block_on(async {
        let pg = |what: &'static str| move |e: tokio_postgres::Error| MirrorError::postgres(what, e);
        let (mut client, _notes) = connect(url).await?;
        let tx = client.transaction().await.map_err(pg("starting the migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK]).await.map_err(pg("locking"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS khala_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            .await
            .map_err(pg("creating khala_migrations"))?;
        let mut applied = Vec::new();
        for (version, name, sql) in MIGRATIONS {
            let done = tx.query_opt("SELECT 1 FROM khala_migrations WHERE version = $1", &[&version]).await.map_err(pg("reading khala_migrations"))?;
            if done.is_some() {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| MirrorError::postgres(format!("applying {name}"), e))?;
            tx.execute("INSERT INTO khala_migrations (version, name) VALUES ($1, $2)", &[&version, &name]).await.map_err(pg("recording the migration"))?;
            applied.push(name.to_string());
        }
        tx.commit().await.map_err(pg("committing the migration"))?;
        Ok(applied)
    })
}

/// The outbox as a [`Source`].
pub struct Outbox {
    rt: tokio::runtime::Runtime,
    url: String,
    conn: Option<Connection>,
    read_ahead: Option<ReadAhead>,
    name: String,
    start: Mark,
    /// The last id read.
    read_id: i64,
    /// The highest id known to exist (for the lag gauge).
    head_id: i64,
    follow: bool,
    poll: Duration,
    last_empty_poll: Option<Instant>,
    parser: Parser,
    _backlog: Option<BacklogWatch>,
}

/// Stops the backlog watcher when the outbox is dropped.
struct BacklogWatch(Arc<AtomicBool>);

impl Drop for BacklogWatch {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn read_backlog(conn: &mut Option<(Client, UnboundedReceiver<()>)>, url: &str, name: &str) -> Result<(u64, f64)> {
    if conn.is_none() {
        *conn = Some(connect(url).await?);
    }
    let client = &conn.as_ref().expect("connected").0;
    let row = client.query_one(BACKLOG, &[&name]).await.map_err(|e| MirrorError::postgres("reading the outbox backlog", e))?;
    Ok((row.get::<_, i64>(0).max(0) as u64, row.get::<_, f64>(1).max(0.0)))
}

/// Sets the backlog gauges every `every` on a thread of its own, until dropped.
fn watch_backlog(url: String, name: String, every: Duration) -> Result<BacklogWatch> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rt = runtime()?;
    let spawned = std::thread::Builder::new().name("outbox-backlog".into()).spawn(move || {
        let mut conn = None;
        // The first failure after a success is a warning (the gauges stop moving), the
        // repeats of it are not.
        let mut failing = false;
        while !flag.load(Ordering::Relaxed) {
            match rt.block_on(read_backlog(&mut conn, &url, &name)) {
                Ok((depth, age)) => {
                    super::metrics::outbox_backlog(depth, age);
                    failing = false;
                }
                Err(e) => {
                    match failing {
                        false => log::warn!("the outbox backlog gauges are not updated: {e}"),
                        true => log::debug!("{e}"),
                    }
                    failing = true;
                    conn = None;
                }
            }
            let next = Instant::now() + every;
            while Instant::now() < next && !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    spawned.map_err(|e| MirrorError::io("starting the outbox backlog watcher", e))?;
    Ok(BacklogWatch(stop))
}

fn mark(id: i64) -> Mark {
    Mark { segment: 0, offset: id as u64, line: id as u64 }
}

/// Microseconds from 1970-01-01 to 2000-01-01, the epoch of Postgres' timestamps.
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A `timestamptz` (or a `timestamp`, read as UTC: the same wire form) as it comes over
/// the wire, microseconds since 2000-01-01, so that Postgres does no arithmetic per row;
/// `infinity` and `-infinity` are the extreme values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timestamp(i64);

impl<'a> FromSql<'a> for Timestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Timestamp(i64::from_be_bytes(raw.try_into()?)))
    }

    accepts!(TIMESTAMPTZ, TIMESTAMP);
}

impl Timestamp {
    /// As the dead-letter file keeps it: microseconds since the Unix epoch, or which infinity.
    fn to_json(self) -> Value {
        match self.unix_micros() {
            Some(micros) => json!(micros),
            None if self.0 > 0 => json!("infinity"),
            None => json!("-infinity"),
        }
    }

    /// Microseconds since the Unix epoch; `None` for ±infinity, which no event happened at.
    fn unix_micros(self) -> Option<i64> {
        if self.0 == i64::MAX || self.0 == i64::MIN {
            return None;
        }
        self.0.checked_add(POSTGRES_EPOCH_UNIX_MICROS)
    }
}

/// An `id` or a `seq`: a `bigint` as the migration makes them, or a narrower integer
/// (an outbox made by hand with `serial` ids). Anything else is refused by type.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Integer(i64);

impl<'a> FromSql<'a> for Integer {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Integer(match *ty {
            Type::INT2 => i16::from_sql(ty, raw)?.into(),
            Type::INT4 => i32::from_sql(ty, raw)?.into(),
            _ => i64::from_sql(ty, raw)?,
        }))
    }

    accepts!(INT2, INT4, INT8);
}

/// One outbox row as a record. The migration's columns are `NOT NULL`; a table made by
/// hand may hold a NULL, which dead-letters its row like any other bad value.
fn record(id: i64, topic: Option<&str>, seq: Option<i64>, kind: Option<&str>, payload: Option<&str>, occurred: Option<Timestamp>, parser: &mut Parser) -> Record {
    let origin = Origin::OutboxId(id);
    let checked_kind = match kind {
        None => Err(Bad::new("missing_kind", "kind is NULL")),
        Some("") => Err(Bad::new("missing_kind", "kind is empty")),
        Some(kind) => Ok(kind.to_string()),
    };
    // jsonb can hold numbers serde_json cannot read (beyond f64, in builds without
    // arbitrary_precision): refuse them rather than change them.
    let payload_bytes = match payload {
        None => Err(Bad::new("invalid_payload", "payload is NULL")),
        Some(text) => serde_json::from_str::<&RawValue>(text)
            .and_then(canonicalize)
            .map_err(|e| Bad::new("invalid_payload", format!("the payload does not fit Khala's JSON numbers: {e}"))),
    };
    let parsed = match (topic, seq) {
        (None, _) => Err(Bad::new("missing_topic", "topic is NULL")),
        (Some(topic), Some(seq)) if seq > 0 => {
            let occurred_at = match occurred {
                None => Ok(0),
                Some(at) => at.unix_micros().ok_or(Bad::new("invalid_occurred_at", "occurred_at is infinite")),
            };
            parser.build(topic, seq as u64, checked_kind, payload_bytes, occurred_at, origin)
        }
        (Some(topic), seq) => {
            let detail = seq.map_or("seq is NULL".to_string(), |seq| format!("seq {seq}: seqs start at 1"));
            Err(Bad { topic: Some(topic.into()), ..Bad::new("invalid_seq", detail) })
        }
    };
    // The row as the dead-letter file keeps it, written only for a row refused.
    let dead_letter = |bad: Bad| {
        let payload = payload.map(|text| serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.into())));
        (bad, json!({ "id": id, "topic": topic, "seq": seq, "kind": kind, "payload": payload, "occurred_at_micros": occurred.map(Timestamp::to_json) }).to_string())
    };
    Record { end: mark(id), origin, parsed: parsed.map_err(dead_letter) }
}

impl Outbox {
    /// Connects and loads the cursor named `name` (0 when there is none).
    pub fn open(url: &str, name: &str, follow: bool, poll: Duration, limits: Limits) -> Result<Outbox> {
        let mut outbox = Outbox {
            rt: reader_runtime()?,
            url: url.into(),
            conn: None,
            read_ahead: None,
            name: name.into(),
            start: Mark::default(),
            read_id: 0,
            head_id: 0,
            follow,
            poll,
            last_empty_poll: None,
            parser: Parser::new(limits),
            _backlog: None,
        };
        outbox.connect()?;
        let client = &outbox.conn.as_ref().expect("connected").client;
        let ordered = outbox.rt.block_on(client.query_opt(ORDERING_TRIGGER, &[])).map_err(|e| pg_error("looking for the id-ordering trigger", e))?;
        if ordered.is_none() {
            return Err(MirrorError::OutboxNotMigrated {
                detail: "khala_outbox has no khala_outbox_assign_id trigger, so ids can become visible out of order and a keyset reader would pass rows for good".into(),
            });
        }
        let cursor = outbox.rt.block_on(client.query_opt("SELECT last_id FROM khala_mirror_cursor WHERE name = $1", &[&name]));
        let cursor = match cursor.map_err(|e| pg_error("reading the cursor", e))? {
            Some(row) => row.try_get::<_, i64>(0).map_err(|e| pg_error("reading the cursor", e))?,
            None => 0,
        };
        outbox.start = mark(cursor);
        outbox.read_id = cursor;
        outbox.refresh_head()?;
        if super::metrics::serving() {
            outbox._backlog = Some(watch_backlog(url.into(), name.into(), poll.clamp(Duration::from_secs(1), Duration::from_secs(5)))?);
        }
        Ok(outbox)
    }

    fn connect(&mut self) -> Result<()> {
        if self.conn.is_none() {
            let (client, notes) = self.rt.block_on(connect(&self.url))?;
            self.rt.block_on(client.batch_execute(READER_SETTINGS)).map_err(|e| pg_error("setting up the reading connection", e))?;
            self.rt.block_on(client.batch_execute("LISTEN khala_outbox")).map_err(|e| pg_error("listening", e))?;
            let read_rows = self.rt.block_on(client.prepare(READ_ROWS)).map_err(|e| pg_error("preparing the outbox read", e))?;
            self.conn = Some(Connection { client: Arc::new(client), notes, read_rows });
        }
        Ok(())
    }

    /// Drops the connection after an error, so the next call reconnects.
    fn failed(&mut self, what: &str, e: tokio_postgres::Error) -> MirrorError {
        self.conn = None;
        self.read_ahead = None;
        pg_error(what, e)
    }

    fn refresh_head(&mut self) -> Result<()> {
        self.connect()?;
        let client = &self.conn.as_ref().expect("connected").client;
        match self.rt.block_on(client.query_one("SELECT coalesce(max(id), 0)::bigint FROM khala_outbox", &[])) {
            Ok(row) => {
                self.head_id = self.head_id.max(row.get::<_, i64>(0));
                Ok(())
            }
            Err(e) => Err(self.failed("reading the outbox head", e)),
        }
    }

    /// Waits up to `wait` for a notification; returns whether one came.
    fn wait_for_notification(&mut self, wait: Duration) -> bool {
        let Some(Connection { notes, .. }) = self.conn.as_mut() else { return false };
        let mut notified = false;
        while notes.try_recv().is_ok() {
            notified = true;
        }
        if notified || wait.is_zero() {
            return notified;
        }
        matches!(self.rt.block_on(async { tokio::time::timeout(wait, notes.recv()).await }), Ok(Some(())))
    }
}

impl Source for Outbox {
    fn describe(&self) -> String {
        format!("postgres outbox (cursor {:?})", self.name)
    }

    fn start(&self) -> Mark {
        self.start
    }

    fn read(&mut self, max: usize, wait: Duration) -> Result<Read> {
        self.connect()?;
        // Between polls, only a notification makes it worth asking again.
        if let Some(last) = self.last_empty_poll {
            let until_poll = self.poll.saturating_sub(last.elapsed());
            if !until_poll.is_zero() && !self.wait_for_notification(wait.min(until_poll)) {
                return Ok(Read::Idle);
            }
        }
        let Connection { client, read_rows, .. } = self.conn.as_ref().expect("connected");
        let (client, read_rows) = (client.clone(), read_rows.clone());
        let limit = max as i64;
        let ahead = self.read_ahead.as_mut().filter(|ahead| ahead.after == self.read_id && ahead.limit == limit);
        let rows = match ahead.and_then(|ahead| self.rt.block_on(ahead.pages.recv())) {
            Some(page) => page,
            None => {
                // No reader task, or it stopped after a short page: ask directly.
                self.read_ahead = None;
                self.rt.block_on(client.query(&read_rows, &[&self.read_id, &limit]))
            }
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return Err(self.failed("reading the outbox", e)),
        };
        if rows.is_empty() {
            if !self.follow {
                return Ok(Read::End);
            }
            self.last_empty_poll = Some(Instant::now());
            return Ok(Read::Idle);
        }
        self.last_empty_poll = None;
        // Columns of other types than the migration makes (a table made by hand) are
        // refused by name, not read as something else.
        let columns = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?, row.try_get(5)?)))
            .collect::<std::result::Result<Vec<(Integer, Option<&str>, Option<Integer>, Option<&str>, Option<&str>, Option<Timestamp>)>, tokio_postgres::Error>>()
            .map_err(|e| MirrorError::OutboxSchemaMismatch { detail: e.to_string() })?;
        self.read_id = columns.last().map_or(self.read_id, |c| c.0 .0);
        self.head_id = self.head_id.max(self.read_id);
        match self.read_ahead.as_mut() {
            Some(ahead) => ahead.after = self.read_id,
            None if rows.len() as i64 == limit => {
                // A backlog: read on ahead while the mirror works through this page.
                let (tx, pages) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES);
                let task = self.rt.spawn(read_pages(client, read_rows, self.read_id, limit, tx));
                self.read_ahead = Some(ReadAhead { after: self.read_id, limit, pages, task });
            }
            None => {}
        }
        let records = columns.into_iter().map(|(id, topic, seq, kind, payload, occurred)| record(id.0, topic, seq.map(|s| s.0), kind, payload, occurred, &mut self.parser)).collect();
        Ok(Read::Records(records))
    }

    fn rewind(&mut self, to: Mark) -> Result<()> {
        self.read_id = to.offset as i64;
        self.read_ahead = None;
        self.last_empty_poll = None;
        self.connect()
    }

    fn persist(&mut self, durable: Mark) -> Result<()> {
        self.connect()?;
        let client = &self.conn.as_ref().expect("connected").client;
        let last_id = durable.offset as i64;
        let upsert = "INSERT INTO khala_mirror_cursor (name, last_id) VALUES ($1, $2) \
                      ON CONFLICT (name) DO UPDATE SET last_id = EXCLUDED.last_id, updated_at = now()";
        if let Err(e) = self.rt.block_on(client.execute(upsert, &[&self.name, &last_id])) {
            return Err(self.failed("saving the cursor", e));
        }
        self.refresh_head()
    }

    fn head(&self) -> u64 {
        self.head_id.max(0) as u64
    }
}

/// A Postgres error as the mirror's. Retrying mends none of these: a missing table (the
/// schema was never applied: [`MirrorError::OutboxNotMigrated`]); tables made by hand
/// whose columns are missing or of types the mirror cannot read, or a cursor table with
/// no unique key on `name` for its upsert, whether Postgres says so (an unknown column,
/// no operator for the types, no constraint for `ON CONFLICT`) or the driver does (a value
/// of another type: [`MirrorError::OutboxSchemaMismatch`]); a role without the privileges
/// the mirror needs ([`MirrorError::OutboxPermissionDenied`]). Anything else is
/// [`MirrorError::Postgres`], which the mirror rides out. Before this split a hand-made
/// `integer` id failed every read as a transient error and the mirror retried it for
/// ever; a cursor it may not write was retried at every persist, so it never moved.
fn pg_error(what: &str, e: tokio_postgres::Error) -> MirrorError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(code) if *code == SqlState::UNDEFINED_TABLE => return MirrorError::OutboxNotMigrated { detail: e.to_string() },
        Some(code) if [SqlState::UNDEFINED_COLUMN, SqlState::UNDEFINED_FUNCTION, SqlState::DATATYPE_MISMATCH, SqlState::INVALID_COLUMN_REFERENCE].contains(code) => {
            return MirrorError::OutboxSchemaMismatch { detail: format!("{what}: {e}") }
        }
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => return MirrorError::OutboxPermissionDenied { detail: format!("{what}: {e}") },
        _ => {}
    }
    if std::error::Error::source(&e).is_some_and(|source| source.is::<WrongType>()) {
        return MirrorError::OutboxSchemaMismatch { detail: format!("{what}: {e}") };
    }
    MirrorError::postgres(what, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 32, mapping: &crate::mirror::mapping::DEFAULT_MAPPING };

    #[test]
    fn rows_become_records_or_dead_letters() {
        let good = record(5, Some("run:1:events"), Some(2), Some("run.step"), Some(r#"{"b": 1, "a": 2}"#), Some(Timestamp(7 - POSTGRES_EPOCH_UNIX_MICROS)), &mut Parser::new(LIMITS));
        let event = good.parsed.unwrap();
        assert_eq!((&*event.stream_id, event.seq, event.payload.as_slice(), event.occurred_at_micros), ("runtime.run.1.events", 2, br#"{"a":2,"b":1}"#.as_slice(), 7));
        assert_eq!((good.end.offset, good.origin), (5, Origin::OutboxId(5)));
        let (bad, raw) = record(6, Some("t"), Some(0), Some("k"), Some("{}"), None, &mut Parser::new(LIMITS)).parsed.unwrap_err();
        assert_eq!(bad.reason, "invalid_seq");
        assert!(raw.contains("\"id\":6"));
        let (bad, _) = record(7, Some("t"), Some(1), Some("k"), Some(&format!("\"{}\"", "x".repeat(40))), None, &mut Parser::new(LIMITS)).parsed.unwrap_err();
        assert_eq!((bad.reason, bad.seq), ("payload_too_large", Some(1)));
        // A payload serde_json cannot read is refused, never turned into null.
        let (bad, raw) = record(8, Some("t"), Some(1), Some("k"), Some(r#"{"n": tru"#), None, &mut Parser::new(LIMITS)).parsed.unwrap_err();
        assert_eq!((bad.reason, bad.stream_id.as_deref()), ("invalid_payload", Some("runtime.topic.t")));
        assert!(raw.contains("tru"), "{raw}");
        let (bad, raw) = record(9, Some("t"), Some(1), Some("k"), Some("{}"), Some(Timestamp(i64::MAX)), &mut Parser::new(LIMITS)).parsed.unwrap_err();
        assert_eq!((bad.reason, bad.seq), ("invalid_occurred_at", Some(1)));
        assert!(raw.contains(r#""occurred_at_micros":"infinity""#), "{raw}");
        // NULLs (a hand-made table's nullable columns) dead-letter their row by name.
        let reason = |topic, seq, kind, payload| record(10, topic, seq, kind, payload, None, &mut Parser::new(LIMITS)).parsed.unwrap_err().0.reason;
        assert_eq!(reason(None, Some(1), Some("k"), Some("{}")), "missing_topic");
        assert_eq!(reason(Some("t"), None, Some("k"), Some("{}")), "invalid_seq");
        assert_eq!(reason(Some("t"), Some(1), None, Some("{}")), "missing_kind");
        assert_eq!(reason(Some("t"), Some(1), Some("k"), None), "invalid_payload");
        let (_, raw) = record(11, Some("t"), Some(1), Some("k"), None, None, &mut Parser::new(LIMITS)).parsed.unwrap_err();
        assert!(raw.contains(r#""payload":null"#), "{raw}");
    }

    #[test]
    fn timestamps_are_read_from_their_wire_form() {
        // 2024-05-01T10:00:00.5Z, as Postgres sends it: microseconds since 2000-01-01.
        let wire = 767_872_800_500_000i64.to_be_bytes();
        let at = Timestamp::from_sql(&Type::TIMESTAMPTZ, &wire).unwrap();
        assert_eq!(at.unix_micros(), Some(1_714_557_600_500_000));
        assert_eq!(Timestamp(i64::MIN).unix_micros(), None);
        assert!(Timestamp::from_sql(&Type::TIMESTAMPTZ, &[0; 4]).is_err());
        // A `timestamp without time zone` column (an outbox made before the migration) reads
        // the same way; anything else is refused (`outbox_schema_mismatch`), not mistaken.
        assert!(<Timestamp as FromSql>::accepts(&Type::TIMESTAMP) && !<Timestamp as FromSql>::accepts(&Type::INT8));
    }

    #[test]
    fn ids_and_seqs_are_read_from_any_integer_column() {
        assert_eq!(Integer::from_sql(&Type::INT2, &(-2i16).to_be_bytes()).unwrap(), Integer(-2));
        assert_eq!(Integer::from_sql(&Type::INT4, &7i32.to_be_bytes()).unwrap(), Integer(7));
        assert_eq!(Integer::from_sql(&Type::INT8, &(1i64 << 40).to_be_bytes()).unwrap(), Integer(1 << 40));
        assert!(Integer::from_sql(&Type::INT4, &[0; 8]).is_err());
        assert!(!<Integer as FromSql>::accepts(&Type::TEXT) && !<Integer as FromSql>::accepts(&Type::NUMERIC));
    }
}

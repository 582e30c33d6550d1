//! [`SqliteStore`]: a desktop application's local database as a [`Handler`] that owns its
//! cursors. Every event goes into `events`; each stream's cursor (epoch, seq, chain hash
//! at seq) into `cursors`, in the same transaction. A crash (even SIGKILL mid-batch)
//! rolls the open transaction back, events and cursor together, and the client resumes
//! from the stored cursor: every event ends up in the table exactly once.
//!
//! Schema:
//! ```sql
//! events  (stream_id TEXT, seq INTEGER, epoch INTEGER, kind TEXT, payload BLOB,
//!          chain_hash BLOB, PRIMARY KEY (stream_id, seq))
//! cursors (stream_id TEXT PRIMARY KEY, epoch INTEGER, seq INTEGER, chain_hash BLOB,
//!          updated_at_micros INTEGER)
//! ```
//!
//! Commits: [`Commit::Batch`] (the default) opens a transaction at the first event and
//! commits it at the client's checkpoint cadence ([`Handler::persist`]: every 20 ms, or
//! 2,048 events per stream, while events flow); [`Commit::Event`] commits every event on
//! its own (docs/CLIENT.md has both measured). The database is in WAL mode with
//! `synchronous = FULL`, so a commit survives a power loss too; until a client takes its
//! [`Handler::syncer`]. Then it commits with `synchronous = NORMAL`, which writes the
//! commit to the log without waiting for the disk (it survives the process's crash, not
//! yet a power loss), and the client's checkpoint thread makes it durable with an
//! `fdatasync` of the log ([`SqliteStore::wal_syncer`]) while the sync loop goes on applying.

use crate::apply::Event;
use crate::handler::{Handler, HandlerError, Syncer};
use crate::sync::now_micros;
use khala_proto::{StaleCursor, StreamCursor};
use rusqlite::{params, Connection, OpenFlags};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    chain_hash BLOB NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    stream_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    chain_hash BLOB NOT NULL,
    updated_at_micros INTEGER NOT NULL
) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite store {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("sqlite store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The store holds this event already: it and the client disagree on the cursor.
    #[error("sqlite store {path}: event {stream_id}/{seq} is stored already")]
    Duplicate { path: PathBuf, stream_id: String, seq: u64 },
    /// An event that does not follow the stream's last stored one.
    #[error("sqlite store {path}: {stream_id}: seq {seq} does not follow {last}")]
    OutOfOrder { path: PathBuf, stream_id: String, seq: u64, last: u64 },
    /// SQLite rolled the open batch back by itself after an error (it may, on a full disk,
    /// an I/O error or no memory): nothing more is taken until the client reads the
    /// cursors again ([`Handler::cursors`]) and offers the batch's events again.
    #[error("sqlite store {path}: the open batch was rolled back by SQLite after an error; the cursors must be read again")]
    BatchLost { path: PathBuf },
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Sqlite { .. } => "store_sqlite",
            StoreError::Io { .. } => "store_io",
            StoreError::Duplicate { .. } => "store_duplicate",
            StoreError::OutOfOrder { .. } => "store_out_of_order",
            StoreError::BatchLost { .. } => "store_batch_lost",
        }
    }
}

/// When the store commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Commit {
    /// One transaction per batch, committed at [`Handler::persist`].
    #[default]
    Batch,
    /// One transaction per event.
    Event,
}

/// One row of `events`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub stream_id: String,
    pub seq: u64,
    pub epoch: u32,
    pub kind: String,
    pub payload: Vec<u8>,
    pub chain_hash: Vec<u8>,
}

/// Counts since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Events taken by [`Handler::apply`].
    pub applied: u64,
    /// Events in committed transactions.
    pub committed: u64,
    pub commits: u64,
    /// Open batches dropped because the client asked for the cursors again.
    pub rolled_back: u64,
}

/// The SQLite store; see the module docs.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    commit: Commit,
    in_tx: bool,
    /// The database is in WAL mode (SQLite may refuse it, on some file systems): only
    /// then can a syncer take the fsync over.
    wal: bool,
    /// The cursor after the open batch's last event, per stream.
    batch: BTreeMap<String, StreamCursor>,
    batch_events: u64,
    /// The last seq stored (or in the open batch) per stream.
    last: HashMap<String, u64>,
    /// SQLite dropped the open batch by itself ([`StoreError::BatchLost`]).
    lost: bool,
    stats: StoreStats,
}

fn as_i64(v: u64) -> i64 {
    v as i64
}

impl SqliteStore {
    /// Opens (or creates) the database file, in WAL mode with `synchronous = FULL`.
    pub fn open(path: impl AsRef<Path>, commit: Commit) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        }
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite { path: path.clone(), source })?;
        let mut store = SqliteStore { conn, path, commit, wal: false, in_tx: false, batch: BTreeMap::new(), batch_events: 0, last: HashMap::new(), lost: false, stats: StoreStats::default() };
        store.conn.busy_timeout(Duration::from_secs(10)).map_err(|e| store.err(e))?;
        let mode: String = store.conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(|e| store.err(e))?;
        store.wal = mode.eq_ignore_ascii_case("wal");
        store.conn.pragma_update(None, "synchronous", "FULL").map_err(|e| store.err(e))?;
        store.conn.execute_batch(SCHEMA).map_err(|e| store.err(e))?;
        store.reload_last()?;
        Ok(store)
    }

    /// Opens an existing database for reading only (another process may be writing it).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|source| StoreError::Sqlite { path: path.clone(), source })?;
        let store = SqliteStore { conn, path, commit: Commit::Batch, wal: false, in_tx: false, batch: BTreeMap::new(), batch_events: 0, last: HashMap::new(), lost: false, stats: StoreStats::default() };
        store.conn.busy_timeout(Duration::from_secs(10)).map_err(|e| store.err(e))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Switches commits to `synchronous = NORMAL` and returns what makes them durable: an
    /// `fdatasync` of the write-ahead log, where a commit lies until SQLite checkpoints the
    /// log into the database file (a checkpoint syncs both itself). Whoever takes it must
    /// call it before counting a commit as durable: [`SyncClient`](crate::SyncClient) does
    /// so on its checkpoint thread, before it acks ([`Handler::syncer`]). The store stays
    /// on `NORMAL` for good: one taken back from a client (`into_handler`) and committed
    /// to directly is durable only once that syncer (or a checkpoint of SQLite's) has run.
    pub fn wal_syncer(&mut self) -> Result<Syncer, StoreError> {
        if !self.wal {
            let source = std::io::Error::other("the database is not in WAL mode, so its commits keep their own fsync");
            return Err(StoreError::Io { path: self.path.clone(), source });
        }
        // The log is the database's file name as SQLite resolved it (a symlink or a `file:`
        // URI names it elsewhere) plus `-wal`. SQLite never replaces it while this
        // connection is open, so one descriptor serves every sync, and it sees every
        // write-back error from now on (a descriptor opened after one would not).
        let db_file = self.conn.path().filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or_else(|| self.path.clone());
        let mut wal = db_file.clone().into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let log = std::fs::File::open(&wal).map_err(|source| StoreError::Io { path: wal.clone(), source })?;
        let dir = db_file.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        self.conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| self.err(e))?;
        let mut dir_synced = false;
        Ok(Box::new(move || {
            log.sync_data().map_err(|source| HandlerError::from(StoreError::Io { path: wal.clone(), source }))?;
            if !dir_synced {
                // The log's directory entry, once: SQLite created the file.
                std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|source| HandlerError::from(StoreError::Io { path: dir.clone(), source }))?;
                dir_synced = true;
            }
            Ok(())
        }))
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite { path: self.path.clone(), source }
    }

    fn reload_last(&mut self) -> Result<(), StoreError> {
        self.last = self.stored_cursors()?.into_iter().map(|c| (c.stream_id, c.seq)).collect();
        Ok(())
    }

    /// The committed cursors, by stream id.
    pub fn stored_cursors(&self) -> Result<Vec<StreamCursor>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT stream_id, epoch, seq, chain_hash, updated_at_micros FROM cursors ORDER BY stream_id").map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StreamCursor {
                    stream_id: r.get(0)?,
                    epoch: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    chain_hash: r.get(3)?,
                    updated_at_micros: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// A stream's stored events, in seq order.
    pub fn events(&self, stream_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT seq, epoch, kind, payload, chain_hash FROM events WHERE stream_id = ?1 ORDER BY seq").map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([stream_id], |r| {
                Ok(StoredEvent {
                    stream_id: stream_id.to_string(),
                    seq: r.get::<_, i64>(0)? as u64,
                    epoch: r.get(1)?,
                    kind: r.get(2)?,
                    payload: r.get(3)?,
                    chain_hash: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// How many events a stream has stored, and its highest seq.
    pub fn extent(&self, stream_id: &str) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM events WHERE stream_id = ?1", [stream_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
            .map_err(|e| self.err(e))
    }

    /// A statement failed. If SQLite rolled the open transaction back by itself, the batch
    /// is gone: it is forgotten, and nothing more is taken until the cursors are read
    /// again. Without this the store, still believing in its transaction, let the next
    /// events and the cursors commit one statement at a time, past the lost batch: a hole
    /// that no restart could see.
    fn failed(&mut self, source: rusqlite::Error) -> StoreError {
        self.notice_lost_transaction();
        self.err(source)
    }

    /// The store believes in an open transaction that SQLite has ended: its batch is gone.
    fn notice_lost_transaction(&mut self) {
        if self.in_tx && self.conn.is_autocommit() {
            self.drop_batch();
            self.lost = true;
        }
    }

    fn drop_batch(&mut self) {
        self.in_tx = false;
        self.batch.clear();
        self.batch_events = 0;
        self.stats.rolled_back += 1;
    }

    fn refuse_if_lost(&self) -> Result<(), StoreError> {
        match self.lost {
            true => Err(StoreError::BatchLost { path: self.path.clone() }),
            false => Ok(()),
        }
    }

    fn begin(&mut self) -> Result<(), StoreError> {
        // Never go on outside a transaction that ended under the store (see `failed`).
        self.notice_lost_transaction();
        self.refuse_if_lost()?;
        if !self.in_tx {
            self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.err(e))?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Adds one event to the open batch (and commits it with [`Commit::Event`]).
    pub fn insert(&mut self, e: &Event) -> Result<(), StoreError> {
        self.refuse_if_lost()?;
        if let Some(&last) = self.last.get(&e.stream_id) {
            if e.seq != last + 1 {
                return Err(if e.seq <= last {
                    StoreError::Duplicate { path: self.path.clone(), stream_id: e.stream_id.clone(), seq: e.seq }
                } else {
                    StoreError::OutOfOrder { path: self.path.clone(), stream_id: e.stream_id.clone(), seq: e.seq, last }
                });
            }
        }
        self.begin()?;
        let inserted = {
            let stmt = self.conn.prepare_cached("INSERT INTO events (stream_id, seq, epoch, kind, payload, chain_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
            stmt.and_then(|mut stmt| stmt.execute(params![e.stream_id, as_i64(e.seq), e.epoch, e.kind, &e.payload[..], &e.chain_hash[..]]))
        };
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                return Err(StoreError::Duplicate { path: self.path.clone(), stream_id: e.stream_id.clone(), seq: e.seq });
            }
            Err(source) => return Err(self.failed(source)),
        }
        match self.batch.get_mut(&e.stream_id) {
            Some(c) => {
                c.epoch = e.epoch;
                c.seq = e.seq;
                c.chain_hash.clear();
                c.chain_hash.extend_from_slice(&e.chain_hash);
            }
            None => {
                self.batch.insert(e.stream_id.clone(), e.cursor(0));
            }
        }
        match self.last.get_mut(&e.stream_id) {
            Some(last) => *last = e.seq,
            None => {
                self.last.insert(e.stream_id.clone(), e.seq);
            }
        }
        self.batch_events += 1;
        self.stats.applied += 1;
        if self.commit == Commit::Event {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits the open batch: its events and each touched stream's cursor, together.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.notice_lost_transaction();
        self.refuse_if_lost()?;
        if !self.in_tx {
            return Ok(());
        }
        let now = now_micros();
        let upserted = self
            .conn
            .prepare_cached(
                "INSERT INTO cursors (stream_id, epoch, seq, chain_hash, updated_at_micros) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (stream_id) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
                 chain_hash = excluded.chain_hash, updated_at_micros = excluded.updated_at_micros",
            )
            .and_then(|mut stmt| self.batch.values().try_for_each(|c| stmt.execute(params![c.stream_id, c.epoch, as_i64(c.seq), c.chain_hash, now]).map(drop)));
        if let Err(e) = upserted {
            return Err(self.failed(e));
        }
        // A failed COMMIT (e.g. busy) leaves the transaction open: the next one retries it.
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            return Err(self.failed(e));
        }
        self.in_tx = false;
        self.batch.clear();
        self.stats.committed += self.batch_events;
        self.stats.commits += 1;
        self.batch_events = 0;
        Ok(())
    }

    /// Drops the open batch: the store is back at its committed cursors.
    pub fn rollback(&mut self) -> Result<(), StoreError> {
        if self.in_tx {
            // SQLite may have rolled it back already; then there is nothing to end.
            if !self.conn.is_autocommit() {
                self.conn.execute_batch("ROLLBACK").map_err(|e| self.err(e))?;
            }
            self.drop_batch();
        }
        self.lost = false;
        self.reload_last()
    }

    /// Starts a stream over: commits the open batch, then deletes the stream's events and
    /// its cursor in one transaction.
    pub fn reset_stream(&mut self, stream_id: &str) -> Result<(), StoreError> {
        self.refuse_if_lost()?;
        self.commit()?;
        self.begin()?;
        let deleted = self
            .conn
            .execute("DELETE FROM events WHERE stream_id = ?1", [stream_id])
            .and_then(|_| self.conn.execute("DELETE FROM cursors WHERE stream_id = ?1", [stream_id]))
            .and_then(|_| self.conn.execute_batch("COMMIT"));
        if let Err(e) = deleted {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.in_tx = false;
            return Err(self.err(e));
        }
        self.in_tx = false;
        self.last.remove(stream_id);
        Ok(())
    }
}

impl Handler for SqliteStore {
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError> {
        Ok(self.insert(event)?)
    }

    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError> {
        Ok(self.reset_stream(&stale.stream_id)?)
    }

    fn persist(&mut self) -> Result<(), HandlerError> {
        Ok(self.commit()?)
    }

    /// The store's fsync leaves the sync loop: see [`SqliteStore::wal_syncer`]. A store whose
    /// syncer cannot be made keeps committing with `synchronous = FULL`.
    fn syncer(&mut self) -> Option<Syncer> {
        match self.wal_syncer() {
            Ok(syncer) => Some(syncer),
            Err(e) => {
                log::warn!("{e}; commits keep waiting for the disk");
                None
            }
        }
    }

    /// What is committed; an open batch (one whose commit failed) is dropped first, and
    /// the client offers its events again.
    fn cursors(&mut self) -> Result<Option<Vec<StreamCursor>>, HandlerError> {
        self.rollback()?;
        Ok(Some(self.stored_cursors()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use khala_proto::hash::{chain_hash, payload_hash, Hash32, GENESIS};

    fn events(stream: &str, from: u64, n: u64, mut prev: Hash32) -> Vec<Event> {
        (from..from + n)
            .map(|seq| {
                let payload = format!("p{seq}").into_bytes();
                let chain = chain_hash(&prev, stream, seq, "k", &payload_hash(&payload));
                let e = Event { stream_id: stream.into(), epoch: 1, seq, kind: "k".into(), payload: payload.into(), chain_hash: chain, prev_chain: prev, occurred_at_micros: 0 };
                prev = chain;
                e
            })
            .collect()
    }

    fn synchronous(store: &SqliteStore) -> i64 {
        store.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
    }

    /// Commits wait for the disk until a syncer is taken; then the syncer syncs the log.
    #[test]
    fn taking_the_syncer_moves_the_fsync_from_the_commit_to_the_syncer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let mut store = SqliteStore::open(&path, Commit::Batch).unwrap();
        assert_eq!(synchronous(&store), 2, "FULL until a syncer is taken");
        let mut sync = Handler::syncer(&mut store).expect("a store in WAL mode has a syncer");
        assert_eq!(synchronous(&store), 1, "NORMAL once the syncer has the fsync");
        for e in events("a", 1, 5, GENESIS) {
            store.apply(&e).unwrap();
        }
        store.persist().unwrap();
        assert!(dir.path().join("app.db-wal").exists(), "the commit lies in the log");
        sync().unwrap();
        drop(store);
        assert!(!dir.path().join("app.db-wal").exists(), "closing folds the log into the database");
        assert_eq!(SqliteStore::open_read_only(&path).unwrap().extent("a").unwrap(), (5, 5));
    }

    #[test]
    fn a_database_without_a_log_keeps_its_own_fsync() {
        let mut store = SqliteStore::open(":memory:", Commit::Batch).unwrap();
        assert!(Handler::syncer(&mut store).is_none(), "an in-memory database has no write-ahead log");
        assert!(store.wal_syncer().is_err());
        assert_eq!(synchronous(&store), 2);
    }

    #[test]
    fn a_batch_commits_events_and_cursor_together_and_an_uncommitted_one_is_lost_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let first = events("a", 1, 10, GENESIS);
        {
            let mut store = SqliteStore::open(&path, Commit::Batch).unwrap();
            assert_eq!(store.cursors().unwrap(), Some(vec![]));
            for e in &first {
                store.apply(e).unwrap();
            }
            store.persist().unwrap();
            let more = events("a", 11, 5, first[9].chain_hash);
            for e in &more {
                store.apply(e).unwrap();
            }
            // Dropped without a commit: what a crash does.
        }
        let mut store = SqliteStore::open(&path, Commit::Batch).unwrap();
        let cursors = store.cursors().unwrap().unwrap();
        assert_eq!(cursors.len(), 1);
        assert_eq!((cursors[0].seq, cursors[0].epoch, cursors[0].chain_hash.clone()), (10, 1, first[9].chain_hash.to_vec()));
        assert_eq!(store.extent("a").unwrap(), (10, 10));
        // Offered again from the cursor: taken once.
        for e in events("a", 11, 5, first[9].chain_hash) {
            store.apply(&e).unwrap();
        }
        store.persist().unwrap();
        assert_eq!(store.events("a").unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=15).collect::<Vec<_>>());
    }

    /// SQLite may roll a whole transaction back by itself when a statement fails on a full
    /// disk. Here the file is capped (`max_page_count`) so that an insert fails with
    /// SQLITE_FULL mid-batch; the store must then take nothing more, commit no cursor past
    /// the lost batch, and after the cursors are read again (the client's reconnect) take
    /// the events from there, with no hole and no duplicate.
    #[test]
    fn a_batch_lost_on_a_full_disk_is_never_built_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path().join("app.db"), Commit::Batch).unwrap();
        let all = events("a", 1, 5000, GENESIS);
        for e in &all[..10] {
            store.insert(e).unwrap();
        }
        store.commit().unwrap();
        let pages: i64 = store.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        store.conn.query_row(&format!("PRAGMA max_page_count = {}", pages + 3), [], |_| Ok(())).unwrap();
        let full_at = all[10..].iter().position(|e| store.insert(e).is_err()).expect("the capped file fills up") + 10;
        // The fault really happened as in production: SQLite ended the whole transaction.
        assert!(store.conn.is_autocommit(), "SQLite kept the transaction: this test no longer exercises a lost batch");
        for e in [&all[full_at], &all[full_at + 1]] {
            assert!(matches!(store.insert(e), Err(StoreError::BatchLost { .. })));
        }
        assert!(matches!(store.commit(), Err(StoreError::BatchLost { .. })));
        assert_eq!(store.extent("a").unwrap(), (10, 10), "nothing committed past the lost batch");

        store.conn.query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(())).unwrap();
        let cursors = Handler::cursors(&mut store).unwrap().unwrap();
        assert_eq!((cursors.len(), cursors[0].seq), (1, 10));
        for e in &all[10..] {
            store.insert(e).unwrap();
        }
        store.commit().unwrap();
        assert_eq!(store.extent("a").unwrap(), (5000, 5000));
        assert_eq!(store.events("a").unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=5000).collect::<Vec<_>>());
    }

    #[test]
    fn duplicates_and_gaps_are_refused_with_their_codes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path().join("db"), Commit::Event).unwrap();
        let all = events("a", 1, 4, GENESIS);
        store.apply(&all[0]).unwrap();
        store.apply(&all[1]).unwrap();
        assert_eq!(store.insert(&all[1]).unwrap_err().code(), "store_duplicate");
        assert_eq!(store.insert(&all[3]).unwrap_err().code(), "store_out_of_order");
        assert_eq!(store.stats().commits, 2);
        assert_eq!(SqliteStore::open_read_only(store.path()).unwrap().extent("a").unwrap(), (2, 2));
    }

    #[test]
    fn a_rebootstrap_resets_the_stream_rows_and_cursor_and_leaves_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path().join("db"), Commit::Batch).unwrap();
        for e in events("a", 1, 3, GENESIS).iter().chain(events("b", 1, 2, GENESIS).iter()) {
            store.apply(e).unwrap();
        }
        store.persist().unwrap();
        // An open batch on `b` is committed, then `a` is dropped in its own transaction.
        let b3 = events("b", 1, 3, GENESIS).pop().unwrap();
        store.apply(&b3).unwrap();
        store.rebootstrap(&StaleCursor { stream_id: "a".into(), oldest_available: 100, ..Default::default() }).unwrap();
        assert_eq!(store.extent("a").unwrap(), (0, 0));
        assert_eq!(store.extent("b").unwrap(), (3, 3));
        let cursors = store.cursors().unwrap().unwrap();
        assert_eq!(cursors.iter().map(|c| (c.stream_id.as_str(), c.seq)).collect::<Vec<_>>(), vec![("b", 3)]);
        // The rebuilt stream starts at the floor.
        let floor = events("a", 101, 2, [7; 32]);
        store.apply(&floor[0]).unwrap();
        store.apply(&floor[1]).unwrap();
        store.persist().unwrap();
        assert_eq!(store.extent("a").unwrap(), (2, 102));
    }
}

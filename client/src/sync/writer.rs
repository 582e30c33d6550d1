//! The checkpoint writer: stores checkpoint files on a thread of its own.
//!
//! A store ends in one or two fsyncs, and on a busy disk an fsync takes tens of
//! milliseconds. Done on the sync loop's thread, each one held up every event that arrived
//! meanwhile, which was most of the tail of publish → handler latency. Here the loop only
//! hands the cursors over and goes on applying; the answer comes back as
//! [`Input::Checkpointed`](super::driver::Input::Checkpointed), exactly as before. The
//! order that makes a checkpoint safe is kept: the handler has persisted before the
//! cursors are handed over, and acks wait for the answer. The driver offers one
//! checkpoint at a time, so at most one write is ever in flight.
//!
//! A handler with a [`Syncer`] (one whose `persist` commits without waiting for the disk)
//! has its fsync done here too, first: then the file, if the client keeps one, records
//! only what is on disk.

use crate::checkpoint::{CheckpointError, CheckpointFile};
use crate::handler::{HandlerError, Syncer};
use crate::transport::Msg;
use khala_proto::StreamCursor;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

/// What a write did: where the corrupt file went (when it was asked to set it aside).
pub type Written = Result<Option<PathBuf>, WriteFailed>;

/// A write that failed.
#[derive(Debug)]
pub enum WriteFailed {
    /// The handler's syncer failed (now, or at an earlier write: it is not run again);
    /// nothing else was done. Ends `run`
    /// ([`ClientError::HandlerSync`](crate::ClientError::HandlerSync)).
    Sync(HandlerError),
    /// The file could not be stored, after the corrupt one was set aside (`Some`) or not.
    File { error: CheckpointError, set_aside_to: Option<PathBuf> },
}

impl WriteFailed {
    /// Where the corrupt file went before the write failed, if it was set aside.
    pub fn set_aside_to(&self) -> Option<PathBuf> {
        match self {
            WriteFailed::File { set_aside_to, .. } => set_aside_to.clone(),
            WriteFailed::Sync(_) => None,
        }
    }
}

/// The error a failed write ends the run with.
impl From<WriteFailed> for crate::ClientError {
    fn from(failed: WriteFailed) -> crate::ClientError {
        match failed {
            WriteFailed::Sync(e) => crate::ClientError::HandlerSync(e.to_string()),
            WriteFailed::File { error, .. } => error.into(),
        }
    }
}

/// One checkpoint to write.
struct Job {
    cursors: Option<Vec<StreamCursor>>,
    set_aside: bool,
    /// Where to ring when done: the channel the sync loop is waiting on.
    wake: Option<Sender<Msg>>,
}

/// The writer thread and the one write it may have in flight.
pub struct CheckpointWriter {
    /// The file's path, to name it in the error of a writer that is gone.
    path: PathBuf,
    /// Whether each write starts with the handler's syncer.
    syncs: bool,
    jobs: Option<Sender<Job>>,
    done: Receiver<Written>,
    in_flight: bool,
    /// The answer of the write in flight, taken early by [`CheckpointWriter::sync_now`].
    answered: Option<Written>,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWriter {
    /// Starts the thread that owns `file` (and the handler's `syncer`, if any) from now on.
    pub fn spawn(mut file: CheckpointFile, mut syncer: Option<Syncer>) -> std::io::Result<CheckpointWriter> {
        let path = file.path().to_path_buf();
        let syncs = syncer.is_some();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new().name("khala-checkpoint".into()).spawn(move || {
            // A sync that failed is never tried again: after a failed fsync the kernel may
            // have dropped the pages it could not write, and a second fsync can succeed
            // without them. Every later write answers with that failure.
            let mut sync_failed: Option<String> = None;
            for job in job_rx {
                let written = match &sync_failed {
                    Some(failure) => Err(WriteFailed::Sync(failure.clone().into())),
                    None => {
                        let started = std::time::Instant::now();
                        let written = write(&mut file, syncer.as_mut(), job.cursors, job.set_aside);
                        crate::metrics::checkpoint_written(started.elapsed().as_secs_f64());
                        if let Err(WriteFailed::Sync(e)) = &written {
                            sync_failed = Some(e.to_string());
                        }
                        written
                    }
                };
                if done_tx.send(written).is_err() {
                    return;
                }
                if let Some(wake) = job.wake {
                    let _ = wake.send(Msg::CheckpointWritten);
                }
            }
        })?;
        Ok(CheckpointWriter { path, syncs, jobs: Some(jobs), done, in_flight: false, answered: None, thread: Some(thread) })
    }

    /// Whether each write runs the handler's syncer: then a checkpoint of a handler that
    /// owns its cursors goes through here too, though no file is written.
    pub fn syncs(&self) -> bool {
        self.syncs
    }

    /// Hands one write over; `wake` (the connection's channel, if any) hears
    /// [`Msg::CheckpointWritten`] when it is done. A writer thread that is gone answers
    /// with a failed write.
    pub fn submit(&mut self, cursors: Option<Vec<StreamCursor>>, set_aside: bool, wake: Option<Sender<Msg>>) {
        debug_assert!(!self.in_flight, "a second checkpoint write while one is in flight (the driver offers one at a time)");
        if let Some(jobs) = &self.jobs {
            // When the thread is gone its answer channel is closed too: `try_take` and
            // `wait` see that.
            let _ = jobs.send(Job { cursors, set_aside, wake });
        }
        self.in_flight = true;
    }

    /// Makes everything the handler has committed durable now, before its cursors are
    /// read again (a reconnect): they must not count as durable while a sync is still
    /// owed. Waits for the write in flight (its answer is kept for `try_take`), then runs
    /// the syncer once more; the loop waits meanwhile, as it did for every commit before
    /// syncers. Nothing to do for a handler without a syncer.
    pub fn sync_now(&mut self) -> Result<(), WriteFailed> {
        if !self.syncs {
            return Ok(());
        }
        if self.in_flight && self.answered.is_none() {
            self.answered = Some(self.recv());
        }
        if let Some(Err(_)) = &self.answered {
            // That write failed: no sync after it may vouch for its commits.
            self.in_flight = false;
            return self.answered.take().expect("an answer").map(drop);
        }
        let Some(jobs) = &self.jobs else { return Err(self.gone()) };
        if jobs.send(Job { cursors: None, set_aside: false, wake: None }).is_err() {
            return Err(self.gone());
        }
        self.recv().map(drop)
    }

    /// The answer of the write in flight, if it is done.
    pub fn try_take(&mut self) -> Option<Written> {
        if !self.in_flight {
            return None;
        }
        if let Some(written) = self.answered.take() {
            self.in_flight = false;
            return Some(written);
        }
        let written = match self.done.try_recv() {
            Ok(written) => written,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Err(self.gone()),
        };
        self.in_flight = false;
        Some(written)
    }

    /// The answer of the write in flight, waiting for it; `None` when none is.
    pub fn wait(&mut self) -> Option<Written> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        Some(self.answered.take().unwrap_or_else(|| self.recv()))
    }

    /// The next answer, waiting for it (a thread that is gone answers with a failure).
    fn recv(&self) -> Written {
        self.done.recv().unwrap_or_else(|_| Err(self.gone()))
    }

    /// The failure of a write whose thread ended without answering (it panicked).
    fn gone(&self) -> WriteFailed {
        let source = std::io::Error::other("the checkpoint writer thread ended");
        WriteFailed::File { error: CheckpointError::Io { path: self.path.clone(), source }, set_aside_to: None }
    }
}

impl Drop for CheckpointWriter {
    /// Lets the write in flight finish, then ends the thread.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the handler's syncer (if it has one), then sets the corrupt file aside when asked,
/// then stores `cursors` (if the handler does not own them).
fn write(file: &mut CheckpointFile, syncer: Option<&mut Syncer>, cursors: Option<Vec<StreamCursor>>, set_aside: bool) -> Written {
    if let Some(sync) = syncer {
        sync().map_err(WriteFailed::Sync)?;
    }
    let set_aside_to = if set_aside { Some(file.set_aside().map_err(|error| WriteFailed::File { error, set_aside_to: None })?) } else { None };
    if let Some(cursors) = cursors {
        file.store(cursors).map_err(|error| WriteFailed::File { error, set_aside_to: set_aside_to.clone() })?;
    }
    Ok(set_aside_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(stream_id: &str, seq: u64) -> StreamCursor {
        StreamCursor { stream_id: stream_id.into(), seq, ..Default::default() }
    }

    #[test]
    fn a_write_is_answered_and_rings_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(&path), None).unwrap();
        let (wake, rang) = mpsc::channel();
        writer.submit(Some(vec![cursor("s", 7)]), false, Some(wake));
        assert!(writer.in_flight);
        assert!(matches!(rang.recv_timeout(std::time::Duration::from_secs(10)), Ok(Msg::CheckpointWritten)));
        assert!(matches!(writer.try_take(), Some(Ok(None))));
        assert!(!writer.in_flight);
        assert_eq!(CheckpointFile::new(&path).load().unwrap().unwrap()[0].seq, 7);
        // The next write goes in place over the open file.
        writer.submit(Some(vec![cursor("s", 9)]), false, None);
        assert!(matches!(writer.wait(), Some(Ok(None))));
        assert_eq!(CheckpointFile::new(&path).load().unwrap().unwrap()[0].seq, 9);
        assert!(writer.wait().is_none(), "nothing in flight");
    }

    #[test]
    fn a_writer_thread_that_is_gone_answers_with_a_failed_write() {
        let (jobs, _job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<Written>();
        drop(done_tx);
        let mut writer = CheckpointWriter { path: PathBuf::from("cp"), syncs: false, jobs: Some(jobs), done, in_flight: false, answered: None, thread: None };
        writer.submit(Some(vec![cursor("s", 1)]), false, None);
        let Err(WriteFailed::File { error, .. }) = writer.try_take().expect("an answer") else { panic!("not a failed file write") };
        assert_eq!(error.code(), "checkpoint_io");
        assert!(writer.try_take().is_none(), "nothing in flight after the answer");
        writer.submit(None, true, None);
        assert!(writer.wait().expect("an answer").is_err());
    }

    #[test]
    fn setting_aside_says_where_the_corrupt_file_went_and_a_failed_store_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(&path), None).unwrap();
        writer.submit(None, true, None);
        let aside = writer.wait().unwrap().unwrap().expect("set aside");
        assert!(aside.exists() && !path.exists());
        // A file where the checkpoint's directory should be: the store fails.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(blocked.join("cp")), None).unwrap();
        writer.submit(Some(vec![cursor("s", 1)]), false, None);
        let Err(WriteFailed::File { error, set_aside_to }) = writer.wait().unwrap() else { panic!("not a failed file write") };
        assert!(set_aside_to.is_none());
        assert_eq!(error.code(), "checkpoint_io");
    }

    /// The syncer runs before the file is stored, on every write, and a syncer that fails
    /// fails the write without touching the file.
    #[test]
    fn the_handlers_syncer_runs_first_and_its_failure_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let file_at_sync = path.clone();
        let syncer: Syncer = Box::new(move || {
            let stored = CheckpointFile::new(&file_at_sync).load().unwrap().map(|c| c[0].seq);
            let mut calls = seen.lock().unwrap();
            calls.push(stored);
            if calls.len() == 3 {
                return Err("injected sync failure".into());
            }
            Ok(())
        });
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(&path), Some(syncer)).unwrap();
        assert!(writer.syncs());
        writer.submit(Some(vec![cursor("s", 7)]), false, None);
        assert!(matches!(writer.wait(), Some(Ok(None))));
        // A handler that owns its cursors: the syncer alone.
        writer.submit(None, false, None);
        assert!(matches!(writer.wait(), Some(Ok(None))));
        writer.submit(Some(vec![cursor("s", 9)]), false, None);
        let Some(Err(WriteFailed::Sync(e))) = writer.wait() else { panic!("not a failed sync") };
        assert_eq!(e.to_string(), "injected sync failure");
        assert_eq!(CheckpointFile::new(&path).load().unwrap().unwrap()[0].seq, 7, "a failed sync stores nothing");
        // Each sync ran before the store of its own write.
        assert_eq!(*calls.lock().unwrap(), vec![None, Some(7), Some(7)]);
    }

    /// Before a reconnect reads the handler's cursors: the answer of the write in flight is
    /// kept for the loop and one more sync runs, unless that write failed.
    #[test]
    fn sync_now_keeps_the_answer_in_flight_and_syncs_once_more_unless_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = calls.clone();
        let syncer: Syncer = Box::new(move || match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            2 => Err("injected sync failure".into()),
            _ => Ok(()),
        });
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(dir.path().join("cp")), Some(syncer)).unwrap();
        writer.submit(None, false, None);
        writer.sync_now().unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2, "the write's sync and one more");
        assert!(matches!(writer.try_take(), Some(Ok(None))), "the write's answer is kept for the loop");
        assert!(writer.try_take().is_none());
        // The write in flight fails: no sync runs after it, and its failure is the answer.
        writer.submit(None, false, None);
        assert!(matches!(writer.sync_now(), Err(WriteFailed::Sync(_))));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert!(writer.try_take().is_none(), "the failure was handed over once");
        // A failed sync is never tried again: every later write answers with it.
        writer.submit(None, false, None);
        assert!(matches!(writer.wait(), Some(Err(WriteFailed::Sync(_)))));
        assert!(matches!(writer.sync_now(), Err(WriteFailed::Sync(_))));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3, "the syncer ran again after it failed");
        // A writer without a syncer has nothing to sync.
        let mut plain = CheckpointWriter::spawn(CheckpointFile::new(dir.path().join("cp2")), None).unwrap();
        plain.sync_now().unwrap();
    }
}

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

use crate::checkpoint::{CheckpointError, CheckpointFile};
use crate::transport::Msg;
use khala_proto::StreamCursor;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

/// What a write did: where the corrupt file went (when it was asked to set it aside).
pub type Written = Result<Option<PathBuf>, WriteFailed>;

/// A write that failed, after the corrupt file was set aside (`Some`) or not.
#[derive(Debug)]
pub struct WriteFailed {
    pub error: CheckpointError,
    pub set_aside_to: Option<PathBuf>,
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
    jobs: Option<Sender<Job>>,
    done: Receiver<Written>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWriter {
    /// Starts the thread that owns `file` from now on.
    pub fn spawn(mut file: CheckpointFile) -> std::io::Result<CheckpointWriter> {
        let path = file.path().to_path_buf();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new().name("khala-checkpoint".into()).spawn(move || {
            for job in job_rx {
                let started = std::time::Instant::now();
                let written = write(&mut file, job.cursors, job.set_aside);
                crate::metrics::checkpoint_written(started.elapsed().as_secs_f64());
                if done_tx.send(written).is_err() {
                    return;
                }
                if let Some(wake) = job.wake {
                    let _ = wake.send(Msg::CheckpointWritten);
                }
            }
        })?;
        Ok(CheckpointWriter { path, jobs: Some(jobs), done, in_flight: false, thread: Some(thread) })
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

    /// The answer of the write in flight, if it is done.
    pub fn try_take(&mut self) -> Option<Written> {
        if !self.in_flight {
            return None;
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
        Some(self.done.recv().unwrap_or_else(|_| Err(self.gone())))
    }

    /// The failure of a write whose thread ended without answering (it panicked).
    fn gone(&self) -> WriteFailed {
        let source = std::io::Error::other("the checkpoint writer thread ended");
        WriteFailed { error: CheckpointError::Io { path: self.path.clone(), source }, set_aside_to: None }
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

/// Sets the corrupt file aside when asked, then stores `cursors` (if the handler does not
/// own them).
fn write(file: &mut CheckpointFile, cursors: Option<Vec<StreamCursor>>, set_aside: bool) -> Written {
    let set_aside_to = if set_aside { Some(file.set_aside().map_err(|error| WriteFailed { error, set_aside_to: None })?) } else { None };
    if let Some(cursors) = cursors {
        file.store(cursors).map_err(|error| WriteFailed { error, set_aside_to: set_aside_to.clone() })?;
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
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(&path)).unwrap();
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
        let mut writer = CheckpointWriter { path: PathBuf::from("cp"), jobs: Some(jobs), done, in_flight: false, thread: None };
        writer.submit(Some(vec![cursor("s", 1)]), false, None);
        let failed = writer.try_take().expect("an answer").unwrap_err();
        assert_eq!(failed.error.code(), "checkpoint_io");
        assert!(writer.try_take().is_none(), "nothing in flight after the answer");
        writer.submit(None, true, None);
        assert!(writer.wait().expect("an answer").is_err());
    }

    #[test]
    fn setting_aside_says_where_the_corrupt_file_went_and_a_failed_store_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(&path)).unwrap();
        writer.submit(None, true, None);
        let aside = writer.wait().unwrap().unwrap().expect("set aside");
        assert!(aside.exists() && !path.exists());
        // A file where the checkpoint's directory should be: the store fails.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let mut writer = CheckpointWriter::spawn(CheckpointFile::new(blocked.join("cp"))).unwrap();
        writer.submit(Some(vec![cursor("s", 1)]), false, None);
        let failed = writer.wait().unwrap().unwrap_err();
        assert!(failed.set_aside_to.is_none());
        assert_eq!(failed.error.code(), "checkpoint_io");
    }
}

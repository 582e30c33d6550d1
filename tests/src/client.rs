//! Running a real `SyncClient` in a test: a recording handler, a thread, and waits.

use crate::TestDb;
use khala_client::health::HealthHandle;
use khala_client::{ClientConfig, ClientError, Event, Handler, HandlerError, SyncClient};
use khala_proto::v1::ConnectionState;
use khala_proto::StaleCursor;
use khala_tools::api::Credentials;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the handler saw, shared with the test.
#[derive(Default, Debug)]
pub struct Seen {
    /// `(stream_id, seq)` in the order applied.
    pub applied: Vec<(String, u64)>,
    pub rebootstraps: Vec<StaleCursor>,
    /// Failures the handler injected.
    pub failures: u64,
    /// How many events had been applied at each `caught_up` call.
    pub caught_up_at: Vec<usize>,
}

/// Records everything; optionally fails the first `fail_times` attempts at `fail_at`,
/// and every rebootstrap while `fail_rebootstraps` is set.
pub struct Recorder {
    pub seen: Arc<Mutex<Seen>>,
    pub fail_at: Option<u64>,
    pub fail_times: u64,
    pub fail_rebootstraps: bool,
}

impl Handler for Recorder {
    fn apply(&mut self, event: &Event) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().unwrap();
        if self.fail_at == Some(event.seq) && seen.failures < self.fail_times {
            seen.failures += 1;
            return Err("injected handler failure".into());
        }
        seen.applied.push((event.stream_id.clone(), event.seq));
        Ok(())
    }

    fn rebootstrap(&mut self, stale: &StaleCursor) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().unwrap();
        if self.fail_rebootstraps {
            seen.failures += 1;
            return Err("injected rebootstrap failure".into());
        }
        seen.rebootstraps.push(stale.clone());
        Ok(())
    }

    fn caught_up(&mut self) {
        let mut seen = self.seen.lock().unwrap();
        let applied = seen.applied.len();
        seen.caught_up_at.push(applied);
    }
}

/// A client running on its own thread.
pub struct RunningClient {
    pub seen: Arc<Mutex<Seen>>,
    pub health: HealthHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ClientError>>>,
}

/// Writes `who`'s token to a file in `dir` and returns its path.
pub fn token_file(dir: &Path, who: &Credentials) -> PathBuf {
    let path = dir.join(format!("{}.token", &who.identity[..16]));
    std::fs::write(&path, &who.token).unwrap();
    path
}

/// The client config for `db`, `streams`, a checkpoint and a token file.
pub fn config(db: &TestDb, token: &Path, checkpoint: &Path, streams: &[&str]) -> ClientConfig {
    let mut config = ClientConfig::new(db.url.as_str(), db.name.as_str(), token, checkpoint);
    config.streams = streams.iter().map(|s| s.to_string()).collect();
    config
}

impl RunningClient {
    pub fn start(config: ClientConfig, fail_at: Option<u64>, fail_times: u64) -> RunningClient {
        Self::start_with(config, Recorder { seen: Arc::default(), fail_at, fail_times, fail_rebootstraps: false })
    }

    pub fn start_with(config: ClientConfig, recorder: Recorder) -> RunningClient {
        let seen = recorder.seen.clone();
        let mut client = SyncClient::new(config, recorder).expect("a client");
        let health = client.health();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || client.run(&flag));
        RunningClient { seen, health, stop, thread: Some(thread) }
    }

    /// Seqs applied on `stream_id`, in order.
    pub fn applied(&self, stream_id: &str) -> Vec<u64> {
        self.seen.lock().unwrap().applied.iter().filter(|(s, _)| s == stream_id).map(|(_, q)| *q).collect()
    }

    /// Waits until `stream_id` has applied up to `seq`.
    pub fn wait_applied(&self, stream_id: &str, seq: u64, timeout: Duration) {
        crate::wait_for(&format!("{stream_id} applied up to {seq}"), timeout, || self.applied(stream_id).last().is_some_and(|s| *s >= seq).then_some(()));
    }

    /// Waits until the stream's health state is `state`.
    pub fn wait_state(&self, stream_id: &str, state: ConnectionState, timeout: Duration) {
        crate::wait_for(&format!("{stream_id} to be {state:?}"), timeout, || {
            self.health.get().streams.iter().find(|s| s.stream_id == stream_id && s.state == state as i32).map(|_| ())
        });
    }

    /// Stops the client and returns how its run ended.
    pub fn stop(mut self) -> Result<(), ClientError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the client thread")
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Publish calls: batches sent to the module, and what the module said, sorted into what
//! the mirror does next ([`Outcome`]). Two transports:
//! - [`Transport::Sdk`] (the default): one SDK WebSocket connection, every call pipelined
//!   on it; each batch goes as one segment, encoded here as the module stores it, to the
//!   `publish_segment` reducer; results come back by callback, named by stream id.
//! - [`Transport::Http`]: worker threads, one `POST …/call/publish` of JSON each.
//!
//! The main loop hands out at most one batch per stream at a time, so calls in flight
//! only add parallelism across streams, never reorder a stream, and a stream id names
//! the one call of that stream in flight.

use super::event::Event;
use crate::api::{publish_event_arg, Api};
use crate::sdk_publish::{self, SdkPublisher};
use crate::ToolError;
use khala_proto::segment::EventRef;
use khala_proto::ErrorCode;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How publish calls reach the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The SDK's WebSocket (BSATN), calls pipelined on one connection.
    Sdk,
    /// HTTP JSON, one request per call from a pool of worker threads.
    Http,
}

impl Transport {
    /// The name `--transport` takes.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sdk => "sdk",
            Transport::Http => "http",
        }
    }
}

/// Longest wait for a call's result on the SDK connection before it counts as lost. A
/// call sent as the module is republished can get no answer at all (the
/// `module_republish` drill, under load): at the HTTP transport's 30 s the mirror then
/// stalled for 27 s after the update, against the drill's 15 s bound. A 1000-event call
/// takes milliseconds in the reducer; a call that outlasts 10 s has been dropped, and a
/// late one counted lost only costs a reconcile (the module skips what it holds).
const SDK_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One batch for one stream.
#[derive(Debug)]
pub struct Job {
    pub lane: usize,
    pub stream_id: String,
    pub events: Vec<Event>,
}

/// What the module (or the network) made of a batch.
#[derive(Debug)]
pub enum Outcome {
    /// Committed (events it already held were skipped as duplicates).
    Committed,
    /// Could not reach the server, or it failed outside the reducer: reconcile, retry.
    Transient(String),
    /// The stream's head is not where the mirror thought: reconcile.
    SequenceConflict(String),
    /// Event `index` of the batch can never be published as it is.
    Refused { index: usize, code: ErrorCode, detail: String },
    /// The batch is over the module's limits: send smaller ones.
    TooLarge(String),
    /// No live publish grant covers the stream any more (one expired or was revoked
    /// during the run): re-read the grants; the stream is held, the others go on.
    Forbidden(String),
    /// Retrying cannot help (bad token, no publisher role, no such database).
    Fatal(ToolError),
}

/// A finished job.
#[derive(Debug)]
pub struct Done {
    pub lane: usize,
    pub events: Vec<Event>,
    pub outcome: Outcome,
    /// When the reply arrived.
    pub at: Instant,
}

/// The `publish(stream_id, events)` arguments in the server's JSON encoding.
pub fn publish_args(stream_id: &str, events: &[Event]) -> Value {
    let events: Vec<Value> = events
        .iter()
        .map(|e| publish_event_arg(&e.idempotency_key(), &e.kind, &e.payload, Some(e.seq), e.occurred_at_micros))
        .collect();
    json!([stream_id, events])
}

/// Whether an HTTP-level failure (no reducer verdict) is worth retrying: network errors,
/// timeouts, 5xx, 404 (a restarting server may not have loaded the database yet), 408
/// and 429 are; other 4xx (bad token, bad request) are not.
pub fn transient(error: &ToolError) -> bool {
    match error {
        ToolError::HttpStatus { status, .. } => *status >= 500 || matches!(status, 404 | 408 | 429),
        ToolError::Http { .. } => true,
        _ => false,
    }
}

/// A batch as the segment `publish_segment` stores (the SDK transport): the module checks
/// its events and keeps these bytes. A batch's seqs are contiguous (a lane holds a stream
/// in seq order and stops at a gap).
pub fn segment_data(events: &[Event]) -> Vec<u8> {
    // Borrowed, not cloned into `SegmentEvent`s: copying each payload and kind was about
    // a tenth of the mirror's CPU.
    let keys: Vec<String> = events.iter().map(Event::idempotency_key).collect();
    let refs: Vec<EventRef> = events
        .iter()
        .zip(&keys)
        .map(|(e, key)| EventRef { seq: e.seq, kind: &e.kind, payload: &e.payload, idempotency_key: key, occurred_at_micros: e.occurred_at_micros })
        .collect();
    khala_proto::segment::encode_refs(&refs)
}

/// Sorts a publish result into an [`Outcome`].
pub fn classify(result: Result<(), ToolError>) -> Outcome {
    let error = match result {
        Ok(()) => return Outcome::Committed,
        Err(error) => error,
    };
    let ToolError::Reducer { error: coded, .. } = &error else {
        return match error.http_status() {
            Some(413) => Outcome::TooLarge(error.to_string()),
            _ if transient(&error) => Outcome::Transient(error.to_string()),
            _ => Outcome::Fatal(error),
        };
    };
    match coded.code {
        ErrorCode::SequenceConflict => Outcome::SequenceConflict(coded.message.clone()),
        ErrorCode::BatchTooLarge => Outcome::TooLarge(coded.message.clone()),
        ErrorCode::ForbiddenStream => Outcome::Forbidden(coded.message.clone()),
        ErrorCode::PayloadTooLarge | ErrorCode::IdempotencyConflict | ErrorCode::InvalidArgument => match coded.event_index() {
            Some(index) => Outcome::Refused { index, code: coded.code, detail: coded.message.clone() },
            None => Outcome::Fatal(error),
        },
        _ => Outcome::Fatal(error),
    }
}

/// Sends batches and hands back what became of each, whatever the transport.
pub struct Publisher {
    backend: Backend,
    in_flight: usize,
}

enum Backend {
    Http(HttpWorkers),
    Sdk(SdkCalls),
}

impl Publisher {
    /// Publishes to `database` as the holder of `token`; over HTTP with `workers` threads.
    pub fn start(transport: Transport, api: Api, database: &str, token: &str, workers: usize) -> Publisher {
        let backend = match transport {
            Transport::Http => Backend::Http(HttpWorkers::start(api, database, token, workers)),
            Transport::Sdk => Backend::Sdk(SdkCalls {
                url: api.base_url().to_string(),
                database: database.to_string(),
                token: token.to_string(),
                link: None,
                pending: HashMap::new(),
                ready: VecDeque::new(),
            }),
        };
        Publisher { backend, in_flight: 0 }
    }

    pub fn send(&mut self, job: Job) {
        let sent = match &mut self.backend {
            Backend::Http(workers) => workers.send(job),
            Backend::Sdk(calls) => {
                calls.send(job);
                true
            }
        };
        if sent {
            self.in_flight += 1;
        }
    }

    /// Batches sent and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next finished job, waiting at most `wait`.
    pub fn recv(&mut self, wait: Duration) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let done = match &mut self.backend {
            Backend::Http(workers) => workers.recv(wait),
            Backend::Sdk(calls) => calls.recv(wait),
        };
        if done.is_some() {
            self.in_flight -= 1;
        }
        done
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Backend::Http(workers) = &mut self.backend {
            workers.jobs = None;
            while self.in_flight > 0 && workers.recv(Duration::from_secs(1)).is_some() {
                self.in_flight -= 1;
            }
            for worker in workers.threads.drain(..) {
                let _ = worker.join();
            }
        }
    }
}

/// The HTTP transport: worker threads taking jobs from one queue.
struct HttpWorkers {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpWorkers {
    fn start(api: Api, database: &str, token: &str, workers: usize) -> HttpWorkers {
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let threads = (0..workers.max(1))
            .map(|n| {
                let (api, database, token) = (api.clone(), database.to_string(), token.to_string());
                let (jobs, done) = (job_rx.clone(), done_tx.clone());
                std::thread::Builder::new()
                    .name(format!("khala-mirror-publish-{n}"))
                    .spawn(move || loop {
                        let job = match jobs.lock().map(|rx| rx.recv()) {
                            Ok(Ok(job)) => job,
                            _ => return,
                        };
                        let result = api.call(&database, "publish", publish_args(&job.stream_id, &job.events), &token);
                        let outcome = classify(result);
                        if done.send(Done { lane: job.lane, events: job.events, outcome, at: Instant::now() }).is_err() {
                            return;
                        }
                    })
                    .expect("spawning a publish thread")
            })
            .collect();
        HttpWorkers { jobs: Some(job_tx), done: done_rx, threads }
    }

    fn send(&mut self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok())
    }

    fn recv(&mut self, wait: Duration) -> Option<Done> {
        if wait.is_zero() {
            self.done.try_recv().ok()
        } else {
            self.done.recv_timeout(wait).ok()
        }
    }
}

/// A call on the SDK connection waiting for its result.
struct PendingCall {
    lane: usize,
    events: Vec<Event>,
    sent_at: Instant,
}

/// The SDK transport: one connection, opened when first needed and again after it is
/// lost; every call in flight on a lost connection is reported as transient (the mirror
/// reconciles and sends again, and the module skips what it already holds).
struct SdkCalls {
    url: String,
    database: String,
    token: String,
    link: Option<SdkPublisher>,
    /// By stream id: at most one call per stream is in flight.
    pending: HashMap<String, PendingCall>,
    /// Results known without asking the connection (a failed connect or send).
    ready: VecDeque<Done>,
}

impl SdkCalls {
    fn send(&mut self, job: Job) {
        if self.link.is_none() {
            match SdkPublisher::connect(&self.url, &self.database, &self.token) {
                Ok(link) => self.link = Some(link),
                Err(e) => return self.ready.push_back(transient_done(job.lane, job.events, e.to_string())),
            }
        }
        let link = self.link.as_ref().expect("connected above");
        match link.send_segment(&job.stream_id, segment_data(&job.events)) {
            Ok(()) => {
                let call = PendingCall { lane: job.lane, events: job.events, sent_at: Instant::now() };
                if let Some(old) = self.pending.insert(job.stream_id, call) {
                    // The main loop never sends a stream twice at once; if it did, the
                    // older call's result could not be told apart: report it lost.
                    self.ready.push_back(transient_done(old.lane, old.events, "a second call for the same stream".into()));
                }
            }
            Err(e) => self.ready.push_back(transient_done(job.lane, job.events, e.to_string())),
        }
    }

    fn recv(&mut self, wait: Duration) -> Option<Done> {
        if let Some(done) = self.ready.pop_front() {
            return Some(done);
        }
        let link = self.link.as_ref()?;
        match link.next(wait) {
            Some(sdk_publish::Outcome::Committed { stream_id }) => self.finish(&stream_id, Ok(())),
            Some(sdk_publish::Outcome::Failed { stream_id, error }) => self.finish(&stream_id, Err(ToolError::Reducer { reducer: "publish".into(), error })),
            Some(sdk_publish::Outcome::Disconnected(why)) => {
                self.drop_link(&format!("the SDK connection closed: {why}"));
                self.ready.pop_front()
            }
            None => {
                if self.pending.values().any(|c| c.sent_at.elapsed() > SDK_CALL_TIMEOUT) {
                    self.drop_link(&format!("no publish result within {} s", SDK_CALL_TIMEOUT.as_secs()));
                }
                self.ready.pop_front()
            }
        }
    }

    /// The result of the call in flight on `stream_id`.
    fn finish(&mut self, stream_id: &str, result: Result<(), ToolError>) -> Option<Done> {
        let call = self.pending.remove(stream_id)?;
        Some(Done { lane: call.lane, events: call.events, outcome: classify(result), at: Instant::now() })
    }

    /// Closes the connection and reports every call in flight on it as transient.
    fn drop_link(&mut self, why: &str) {
        self.link = None;
        for (_, call) in self.pending.drain() {
            self.ready.push_back(transient_done(call.lane, call.events, why.to_string()));
        }
    }
}

fn transient_done(lane: usize, events: Vec<Event>, why: String) -> Done {
    Done { lane, events, outcome: Outcome::Transient(why), at: Instant::now() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use khala_proto::CodedError;

    fn reducer(text: &str) -> Result<(), ToolError> {
        Err(ToolError::Reducer { reducer: "publish".into(), error: CodedError::parse(text) })
    }

    fn http(detail: &str) -> Result<(), ToolError> {
        Err(ToolError::Http { what: "calling publish".into(), detail: detail.into() })
    }

    fn status(status: u16) -> Result<(), ToolError> {
        Err(ToolError::HttpStatus { what: "calling publish".into(), status, body: "no".into() })
    }

    #[test]
    fn sorts_replies_into_what_to_do() {
        assert!(matches!(classify(Ok(())), Outcome::Committed));
        assert!(matches!(classify(http("error sending request: connection refused")), Outcome::Transient(_)));
        assert!(matches!(classify(status(503)), Outcome::Transient(_)));
        assert!(matches!(classify(status(404)), Outcome::Transient(_)));
        assert!(matches!(classify(status(401)), Outcome::Fatal(_)));
        assert!(matches!(classify(status(400)), Outcome::Fatal(_)));
        assert!(matches!(classify(status(413)), Outcome::TooLarge(_)));
        // Prose that merely reads like a status is not one.
        assert!(matches!(classify(http("HTTP 413 Payload Too Large: length limit exceeded")), Outcome::Transient(_)));
        assert!(matches!(classify(reducer("sequence_conflict: stream s event=0: expected=3 actual=5")), Outcome::SequenceConflict(_)));
        assert!(matches!(classify(reducer("batch_too_large: 20000 events in one batch")), Outcome::TooLarge(_)));
        assert!(matches!(
            classify(reducer("payload_too_large: event=12 (key k) has 9 bytes; the limit is 8")),
            Outcome::Refused { index: 12, code: ErrorCode::PayloadTooLarge, .. }
        ));
        assert!(matches!(classify(reducer("idempotency_conflict: event=3: key k was published")), Outcome::Refused { index: 3, .. }));
        // An index only in prose is not one: the mirror stops rather than guess.
        assert!(matches!(classify(reducer("invalid_argument: event 3: kind must be 1..=128 bytes")), Outcome::Fatal(_)));
        assert!(matches!(classify(reducer("unauthorized: publish needs the publisher role")), Outcome::Fatal(_)));
        assert!(matches!(classify(reducer("forbidden_stream: no live publish grant covers s")), Outcome::Forbidden(_)));
    }

    #[test]
    fn encodes_events_as_the_reducer_expects() {
        let event = Event {
            stream_id: "runtime.run.1.events".into(),
            topic: "run:1:events".into(),
            seq: 7,
            kind: "run.step".into(),
            payload: b"{}".to_vec(),
            occurred_at_micros: 5,
            origin: super::super::source::Origin::Line(1),
        };
        let data = segment_data(std::slice::from_ref(&event));
        let decoded = khala_proto::segment::decode(&data).unwrap();
        assert_eq!(
            decoded,
            vec![khala_proto::SegmentEvent {
                seq: 7,
                kind: "run.step".into(),
                payload: b"{}".to_vec(),
                idempotency_key: "topic:run:1:events:seq:7:kind:run.step".into(),
                occurred_at_micros: 5
            }]
        );
        let args = publish_args("runtime.run.1.events", &[event]);
        assert_eq!(
            args,
            json!(["runtime.run.1.events", [{
                "idempotency_key": "topic:run:1:events:seq:7:kind:run.step",
                "kind": "run.step",
                "payload": "7b7d",
                "authority_seq": { "some": 7 },
                "occurred_at_micros": 5,
            }]])
        );
    }
}

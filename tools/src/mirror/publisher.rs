//! Publish calls: a few worker threads that send batches to the module's `publish`
//! reducer over HTTP ([`crate::api::Api::call`]) and report what the module said, sorted
//! into what the mirror does next ([`Outcome`]).
//!
//! The main loop hands out at most one batch per stream at a time, so the workers only
//! add parallelism across streams, never reorder a stream.

use super::event::Event;
use crate::api::{publish_event_arg, Api};
use crate::ToolError;
use khala_proto::ErrorCode;
use serde_json::{json, Value};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        ErrorCode::PayloadTooLarge | ErrorCode::IdempotencyConflict | ErrorCode::InvalidArgument => match coded.event_index() {
            Some(index) => Outcome::Refused { index, code: coded.code, detail: coded.message.clone() },
            None => Outcome::Fatal(error),
        },
        _ => Outcome::Fatal(error),
    }
}

/// The worker pool.
pub struct Publisher {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    in_flight: usize,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Starts `workers` threads publishing to `database` as the holder of `token`.
    pub fn start(api: Api, database: &str, token: &str, workers: usize) -> Publisher {
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..workers.max(1))
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
        Publisher { jobs: Some(job_tx), done: done_rx, in_flight: 0, workers }
    }

    pub fn send(&mut self, job: Job) {
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_ok() {
                self.in_flight += 1;
            }
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
        let done = if wait.is_zero() { self.done.try_recv().ok() } else { self.done.recv_timeout(wait).ok() };
        if done.is_some() {
            self.in_flight -= 1;
        }
        done
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.jobs = None;
        while self.in_flight > 0 && self.recv(Duration::from_secs(1)).is_some() {}
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
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

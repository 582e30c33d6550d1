//! Authority events as the mirror reads them: parsed, checked and mapped, or refused
//! with a reason code for the dead-letter file.
//!
//! The input is the proto `AuthorityEvent` in its proto3 JSON mapping (`seq` may be a
//! number or a decimal string, `occurred_at` an RFC 3339 timestamp). The payload is
//! stored as its canonical JSON ([`khala_proto::json::canonical_json`]), so equal JSON
//! values always hash the same.

use super::mapping::{Mapping, Unmappable};
use super::source::Origin;
use khala_proto::json::{canonical_json, canonicalize};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Longest idempotency key and kind the module accepts.
pub use khala_proto::limits::{MAX_KEY_LEN, MAX_KIND_LEN};

/// The kind of the marker events `--on-gap skip` publishes in place of missing ones.
pub const GAP_KIND: &str = "khala.gap";

/// One event ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub stream_id: Arc<str>,
    pub topic: Arc<str>,
    pub seq: u64,
    pub kind: String,
    /// Canonical JSON bytes.
    pub payload: Vec<u8>,
    pub occurred_at_micros: i64,
    /// Where it was read (a marker: where the record that caused it was read).
    pub origin: Origin,
}

impl Event {
    /// `topic:<topic>:seq:<n>:kind:<kind>`: the same authority event always gets the same key.
    pub fn idempotency_key(&self) -> String {
        format!("topic:{}:seq:{}:kind:{}", self.topic, self.seq, self.kind)
    }

    /// The length of [`Event::idempotency_key`], without building it.
    pub fn idempotency_key_len(&self) -> usize {
        "topic::seq::kind:".len() + self.topic.len() + self.seq.checked_ilog10().map_or(1, |d| d as usize + 1) + self.kind.len()
    }

    /// About how many bytes this event adds to a publish request (JSON, payload in hex).
    pub fn request_bytes(&self) -> usize {
        2 * self.payload.len() + 2 * self.kind.len() + self.topic.len() + 160
    }

    /// The marker published in place of a missing or refused event (`--on-gap skip`).
    pub fn gap_marker(stream_id: &str, topic: &str, seq: u64, reason: &str, origin: Origin) -> Event {
        let payload = serde_json::json!({ "reason": reason, "seq": seq, "topic": topic });
        Event {
            stream_id: stream_id.into(),
            topic: topic.into(),
            seq,
            kind: GAP_KIND.to_string(),
            payload: canonical_json(&payload),
            occurred_at_micros: 0,
            origin,
        }
    }

    /// The event as an `AuthorityEvent` JSON line (for dead letters of events that were
    /// read fine but refused by the module).
    pub fn to_json_line(&self) -> String {
        let payload: Value = serde_json::from_slice(&self.payload).unwrap_or(Value::Null);
        serde_json::json!({ "topic": &*self.topic, "seq": self.seq.to_string(), "kind": self.kind, "payload": payload }).to_string()
    }
}

/// Why an input event was refused. `stream_id` and `seq` are set when they were
/// readable, so the stream's hole can be handled (`--on-gap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    pub reason: &'static str,
    pub detail: String,
    pub topic: Option<String>,
    pub stream_id: Option<String>,
    pub seq: Option<u64>,
}

impl Bad {
    pub(super) fn new(reason: &'static str, detail: impl Into<String>) -> Bad {
        Bad { reason, detail: detail.into(), topic: None, stream_id: None, seq: None }
    }
}

/// Checks that depend on settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload_bytes: usize,
    /// How topics name streams.
    pub mapping: &'static Mapping,
}

/// A line's fields as written: parsed only as far as needed. A field's own JSON is
/// read in [`field`], borrowed where it can be, so the common line costs no allocation
/// beyond the event's own fields.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    occurred_at: Option<&'a RawValue>,
}

/// A field as the checks below read it: a string without escapes is borrowed as it is
/// written; anything else becomes a `Value`. A field written `null` is `Missing` (serde
/// reads it into `Option<&RawValue>` as `None`).
enum Field<'a> {
    Missing,
    Text(&'a str),
    Other(Value),
}

fn field(raw: Option<&RawValue>) -> Result<Field<'_>, Bad> {
    let Some(raw) = raw else { return Ok(Field::Missing) };
    let text = raw.get();
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).filter(|inner| !inner.contains('\\')) {
        return Ok(Field::Text(inner));
    }
    serde_json::from_str(text).map(Field::Other).map_err(|e| Bad::new("not_json", e.to_string()))
}

impl Field<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Text(s) => Some(s),
            Field::Other(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Field::Missing => String::new(),
            Field::Text(s) => Value::String((*s).into()).to_string(),
            Field::Other(value) => value.to_string(),
        }
    }
}

fn seq_of(field: &Field) -> Result<u64, Bad> {
    let seq = match field {
        Field::Missing => return Err(Bad::new("invalid_seq", "seq is missing")),
        Field::Other(Value::Number(n)) => n.as_u64(),
        _ => field.as_str().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse().ok()),
    };
    match seq {
        Some(0) => Err(Bad::new("invalid_seq", "seq starts at 1")),
        Some(seq) => Ok(seq),
        None => Err(Bad::new("invalid_seq", format!("seq must be a positive integer or a decimal string, not {}", field.describe()))),
    }
}

fn text_of<'f>(field: &'f Field, name: &str, reason: &'static str) -> Result<&'f str, Bad> {
    match field.as_str() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Bad::new(reason, format!("{name} is missing or not a non-empty string"))),
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 timestamp.
pub fn rfc3339_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

/// Turns input into checked events: the settings, and the names of the topics met so far.
pub struct Parser {
    limits: Limits,
    /// Each topic's name and stream id, shared by all of its events: the mirror meets the
    /// same few topics on every line, and mapping each one again, with its two names
    /// allocated per event, was about a tenth of its CPU.
    topics: HashMap<Box<str>, Names>,
}

/// A topic's name and stream id, or why it has no stream.
type Names = Result<(Arc<str>, Arc<str>), Unmappable>;

/// Topics remembered at most; past it the memory starts again (an authority with many
/// topics costs a mapping per topic now and then, not unbounded memory).
const MAX_TOPICS: usize = 4096;

impl Parser {
    pub fn new(limits: Limits) -> Parser {
        Parser { limits, topics: HashMap::new() }
    }

    /// Parses one JSONL line.
    pub fn parse_line(&mut self, line: &[u8], origin: Origin) -> Result<Event, Bad> {
        // One pass over the line for the lines that are events; a line that is not is
        // parsed again, as any JSON, only to say what it is instead.
        let parsed: Line = match serde_json::from_slice::<Line>(line) {
            Ok(parsed) => parsed,
            Err(not_line) => match serde_json::from_slice::<Value>(line) {
                Ok(Value::Object(_)) => return Err(Bad::new("not_an_event", not_line.to_string())),
                Ok(other) => return Err(Bad::new("not_an_event", format!("a line must be a JSON object, not {}", kind_name(&other)))),
                Err(e) => return Err(Bad::new("not_json", e.to_string())),
            },
        };
        let topic_field = field(parsed.topic)?;
        let topic = text_of(&topic_field, "topic", "missing_topic")?;
        let seq = field(parsed.seq).and_then(|seq| seq_of(&seq)).map_err(|mut bad| {
            bad.topic = Some(topic.into());
            bad
        })?;
        let kind = field(parsed.kind).and_then(|kind| text_of(&kind, "kind", "missing_kind").map(str::to_string));
        let occurred = field(parsed.occurred_at).and_then(|occurred| match occurred {
            Field::Missing => Ok(0),
            Field::Text(_) | Field::Other(Value::String(_)) => {
                let s = occurred.as_str().unwrap_or_default();
                rfc3339_micros(s).ok_or_else(|| Bad::new("invalid_occurred_at", format!("occurred_at {s:?} is not an RFC 3339 timestamp")))
            }
            Field::Other(other) => Err(Bad::new("invalid_occurred_at", format!("occurred_at must be an RFC 3339 string, not {other}"))),
        });
        // A payload that is missing or `null` is stored as `null`.
        let payload = match parsed.payload {
            None => Ok(b"null".to_vec()),
            Some(raw) => canonicalize(raw).map_err(|e| Bad::new("invalid_payload", e.to_string())),
        };
        self.build(topic, seq, kind, payload, occurred, origin)
    }

    /// Builds a checked event from fields read elsewhere (the Postgres outbox), or from a
    /// line ([`Parser::parse_line`]).
    pub fn build(&mut self, topic: &str, seq: u64, kind: Result<String, Bad>, payload: Result<Vec<u8>, Bad>, occurred_at: Result<i64, Bad>, origin: Origin) -> Result<Event, Bad> {
        let (topic, stream_id) = self.names(topic).map_err(|e| Bad { topic: Some(topic.into()), seq: Some(seq), ..Bad::new("unmappable_topic", e.0) })?;
        let known = |mut bad: Bad| {
            bad.topic = Some(topic.to_string());
            bad.stream_id = Some(stream_id.to_string());
            bad.seq = Some(seq);
            bad
        };
        let kind = kind.map_err(known)?;
        if kind.len() > MAX_KIND_LEN {
            return Err(known(Bad::new("invalid_kind", format!("kind is {} bytes; the limit is {MAX_KIND_LEN}", kind.len()))));
        }
        let occurred_at_micros = occurred_at.map_err(known)?;
        let payload = payload.map_err(known)?;
        if payload.len() > self.limits.max_payload_bytes {
            return Err(known(Bad::new(
                "payload_too_large",
                format!("the canonical payload has {} bytes; the limit (--max-payload-bytes) is {}", payload.len(), self.limits.max_payload_bytes),
            )));
        }
        let event = Event { stream_id: stream_id.clone(), topic: topic.clone(), seq, kind, payload, occurred_at_micros, origin };
        let key_len = event.idempotency_key_len();
        if key_len > MAX_KEY_LEN {
            return Err(known(Bad::new("key_too_long", format!("the idempotency key is {key_len} bytes; the limit is {MAX_KEY_LEN}"))));
        }
        Ok(event)
    }

    /// `topic` and its stream id, mapped once.
    fn names(&mut self, topic: &str) -> Names {
        if let Some(known) = self.topics.get(topic) {
            return known.clone();
        }
        if self.topics.len() >= MAX_TOPICS {
            self.topics.clear();
        }
        let names = self.limits.mapping.topic_to_stream(topic).map(|stream| (Arc::from(topic), Arc::from(stream)));
        self.topics.insert(topic.into(), names.clone());
        names
    }
}

fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 64, mapping: &crate::mirror::mapping::DEFAULT_MAPPING };

    #[test]
    fn the_key_length_is_the_keys() {
        for seq in [1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let event = Event { stream_id: "s".into(), topic: "run:7:events".into(), seq, kind: "k.x".into(), payload: vec![], occurred_at_micros: 0, origin: Origin::Line(1) };
            assert_eq!(event.idempotency_key_len(), event.idempotency_key().len(), "seq {seq}");
        }
    }

    fn parse(line: &[u8]) -> Result<Event, Bad> {
        Parser::new(LIMITS).parse_line(line, Origin::Line(1))
    }

    fn reason(line: &str) -> &'static str {
        parse(line.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn parses_the_proto3_json_mapping() {
        let e = parse(br#"{"topic":"run:7:events","seq":"3","kind":"run.step","payload":{"b":1,"a":[true]},"occurred_at":"2024-05-01T10:00:00.5Z"}"#).unwrap();
        assert_eq!(&*e.stream_id, "runtime.run.7.events");
        assert_eq!(e.seq, 3);
        assert_eq!(e.payload, br#"{"a":[true],"b":1}"#);
        assert_eq!(e.occurred_at_micros, 1_714_557_600_500_000);
        assert_eq!(e.idempotency_key(), "topic:run:7:events:seq:3:kind:run.step");
        let n = parse(br#"{"topic":"t","seq":9,"kind":"k"}"#).unwrap();
        assert_eq!((n.seq, n.payload.as_slice(), n.occurred_at_micros), (9, b"null".as_slice(), 0));
        let escaped = parse(br#"{"topic":"r\u0075n:1:events","seq":"\u0032","kind":"k\"q","payload":null,"occurred_at":null}"#).unwrap();
        assert_eq!((&*escaped.stream_id, escaped.seq, escaped.kind.as_str(), escaped.payload.as_slice()), ("runtime.run.1.events", 2, "k\"q", b"null".as_slice()));
        let spaced = parse(br#"{ "payload" : { "b" : 1 , "a" : "x" } , "kind" : "k" , "seq" : 1 , "topic" : "t" }"#).unwrap();
        assert_eq!(spaced.payload, br#"{"a":"x","b":1}"#);
    }

    #[test]
    fn a_topic_is_mapped_once_and_its_names_shared() {
        let mut parser = Parser::new(LIMITS);
        let a = parser.parse_line(br#"{"topic":"run:1:events","seq":1,"kind":"k"}"#, Origin::Line(1)).unwrap();
        let b = parser.parse_line(br#"{"topic":"run:1:events","seq":2,"kind":"k"}"#, Origin::Line(2)).unwrap();
        assert!(Arc::ptr_eq(&a.stream_id, &b.stream_id) && Arc::ptr_eq(&a.topic, &b.topic));
        for _ in 0..2 {
            let bad = parser.parse_line(br#"{"topic":"a b","seq":3,"kind":"k"}"#, Origin::Line(3)).unwrap_err();
            assert_eq!((bad.reason, bad.topic.as_deref(), bad.seq), ("unmappable_topic", Some("a b"), Some(3)));
        }
        for i in 0..MAX_TOPICS + 10 {
            let line = format!(r#"{{"topic":"t{i}","seq":1,"kind":"k"}}"#);
            assert_eq!(&*parser.parse_line(line.as_bytes(), Origin::Line(4)).unwrap().stream_id, format!("runtime.topic.t{i}"));
        }
        assert!(parser.topics.len() <= MAX_TOPICS, "the memory of topics is bounded");
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(reason("not json"), "not_json");
        assert_eq!(reason("[1]"), "not_an_event");
        assert_eq!(reason(r#"{"seq":1,"kind":"k"}"#), "missing_topic");
        assert_eq!(reason(r#"{"topic":"t","kind":"k"}"#), "invalid_seq");
        let null_seq = parse(br#"{"topic":"t","seq":null,"kind":"k"}"#).unwrap_err();
        assert_eq!((null_seq.reason, null_seq.detail.as_str()), ("invalid_seq", "seq is missing"));
        assert_eq!(reason(r#"{"topic":null,"seq":1,"kind":"k"}"#), "missing_topic");
        assert_eq!(reason(r#"{"topic":"t","seq":0,"kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":-1,"kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":"1e3","kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":1}"#), "missing_kind");
        assert_eq!(reason(r#"{"topic":"a b","seq":1,"kind":"k"}"#), "unmappable_topic");
        assert_eq!(reason(r#"{"topic":"t","seq":1,"kind":"k","occurred_at":"yesterday"}"#), "invalid_occurred_at");
        assert_eq!(reason(r#"{"topic":"t","seq":1,"kind":"k","occurred_at":7}"#), "invalid_occurred_at");
        assert_eq!(reason(r#"{"topic":7,"seq":1,"kind":"k"}"#), "missing_topic");
        assert_eq!(reason(r#"{"topic":"t","seq":"1","kind":""}"#), "missing_kind");
        assert_eq!(reason(r#"{"topic":"t","topic":"u","seq":1,"kind":"k"}"#), "not_an_event");
        let deep = format!(r#"{{"topic":"t","seq":5,"kind":"k","payload":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        let bad = parse(deep.as_bytes()).unwrap_err();
        assert_eq!((bad.reason, bad.stream_id.as_deref(), bad.seq), ("invalid_payload", Some("runtime.topic.t"), Some(5)), "{}", bad.detail);
        let big = format!(r#"{{"topic":"t","seq":4,"kind":"k","payload":"{}"}}"#, "x".repeat(80));
        let bad = parse(big.as_bytes()).unwrap_err();
        assert_eq!((bad.reason, bad.stream_id.as_deref(), bad.seq), ("payload_too_large", Some("runtime.topic.t"), Some(4)));
    }

    #[test]
    fn a_refused_event_round_trips_through_its_json_line() {
        let e = parse(br#"{"topic":"t","seq":2,"kind":"k","payload":{"x":[1,2]}}"#).unwrap();
        let again = parse(e.to_json_line().as_bytes()).unwrap();
        assert_eq!(again, e);
    }
}

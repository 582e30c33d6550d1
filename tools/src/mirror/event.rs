//! Authority events as the mirror reads them: parsed, checked and mapped, or refused
//! with a reason code for the dead-letter file.
//!
//! The input is the proto `AuthorityEvent` in its proto3 JSON mapping (`seq` may be a
//! number or a decimal string, `occurred_at` an RFC 3339 timestamp). The payload is
//! stored as its canonical JSON ([`khala_proto::json::canonical_json`]), so equal JSON
//! values always hash the same.

use super::mapping::Mapping;
use super::source::Origin;
use khala_proto::json::canonical_json;
use serde::Deserialize;
use serde_json::Value;

/// Longest idempotency key and kind the module accepts.
pub use khala_proto::limits::{MAX_KEY_LEN, MAX_KIND_LEN};

/// The kind of the marker events `--on-gap skip` publishes in place of missing ones.
pub const GAP_KIND: &str = "khala.gap";

/// One event ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub stream_id: String,
    pub topic: String,
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
            stream_id: stream_id.to_string(),
            topic: topic.to_string(),
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
        serde_json::json!({ "topic": self.topic, "seq": self.seq.to_string(), "kind": self.kind, "payload": payload }).to_string()
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
    fn new(reason: &'static str, detail: impl Into<String>) -> Bad {
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

#[derive(Deserialize)]
struct Line {
    topic: Option<Value>,
    seq: Option<Value>,
    kind: Option<Value>,
    #[serde(default)]
    payload: Value,
    occurred_at: Option<Value>,
}

fn seq_of(value: Option<&Value>) -> Result<u64, Bad> {
    let seq = match value {
        None | Some(Value::Null) => return Err(Bad::new("invalid_seq", "seq is missing")),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        Some(_) => None,
    };
    match seq {
        Some(0) => Err(Bad::new("invalid_seq", "seq starts at 1")),
        Some(seq) => Ok(seq),
        None => Err(Bad::new("invalid_seq", format!("seq must be a positive integer or a decimal string, not {}", value.map(Value::to_string).unwrap_or_default()))),
    }
}

fn text_of(value: Option<&Value>, field: &str, reason: &'static str) -> Result<String, Bad> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(Bad::new(reason, format!("{field} is missing or not a non-empty string"))),
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 timestamp.
pub fn rfc3339_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_micros())
}

/// Parses one JSONL line.
pub fn parse_line(line: &[u8], origin: Origin, limits: Limits) -> Result<Event, Bad> {
    // One pass straight into `Line` for the lines that are events; a line that is not
    // is parsed again, as any JSON, only to say what it is instead.
    let parsed: Line = match serde_json::from_slice::<Line>(line) {
        Ok(parsed) => parsed,
        Err(not_line) => match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(_)) => return Err(Bad::new("not_an_event", not_line.to_string())),
            Ok(other) => return Err(Bad::new("not_an_event", format!("a line must be a JSON object, not {}", kind_name(&other)))),
            Err(e) => return Err(Bad::new("not_json", e.to_string())),
        },
    };
    let topic = text_of(parsed.topic.as_ref(), "topic", "missing_topic")?;
    let seq = seq_of(parsed.seq.as_ref()).map_err(|mut bad| {
        bad.topic = Some(topic.clone());
        bad
    })?;
    let kind = text_of(parsed.kind.as_ref(), "kind", "missing_kind");
    let occurred = match &parsed.occurred_at {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => rfc3339_micros(s).ok_or_else(|| Bad::new("invalid_occurred_at", format!("occurred_at {s:?} is not an RFC 3339 timestamp"))),
        Some(other) => Err(Bad::new("invalid_occurred_at", format!("occurred_at must be an RFC 3339 string, not {other}"))),
    };
    build(topic, seq, kind, canonical_json(&parsed.payload), occurred, origin, limits)
}

/// Builds a checked event from fields read elsewhere (the Postgres outbox).
pub fn build(topic: String, seq: u64, kind: Result<String, Bad>, payload: Vec<u8>, occurred_at: Result<i64, Bad>, origin: Origin, limits: Limits) -> Result<Event, Bad> {
    let stream_id = limits.mapping.topic_to_stream(&topic).map_err(|e| Bad { topic: Some(topic.clone()), seq: Some(seq), ..Bad::new("unmappable_topic", e.0) })?;
    let known = |mut bad: Bad| {
        bad.topic = Some(topic.clone());
        bad.stream_id = Some(stream_id.clone());
        bad.seq = Some(seq);
        bad
    };
    let kind = kind.map_err(known)?;
    if kind.len() > MAX_KIND_LEN {
        return Err(known(Bad::new("invalid_kind", format!("kind is {} bytes; the limit is {MAX_KIND_LEN}", kind.len()))));
    }
    let occurred_at_micros = occurred_at.map_err(known)?;
    if payload.len() > limits.max_payload_bytes {
        return Err(known(Bad::new(
            "payload_too_large",
            format!("the canonical payload has {} bytes; the limit (--max-payload-bytes) is {}", payload.len(), limits.max_payload_bytes),
        )));
    }
    let event = Event { stream_id: stream_id.clone(), topic: topic.clone(), seq, kind, payload, occurred_at_micros, origin };
    let key_len = event.idempotency_key_len();
    if key_len > MAX_KEY_LEN {
        return Err(known(Bad::new("key_too_long", format!("the idempotency key is {key_len} bytes; the limit is {MAX_KEY_LEN}"))));
    }
    Ok(event)
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

    fn reason(line: &str) -> &'static str {
        parse_line(line.as_bytes(), Origin::Line(1), LIMITS).unwrap_err().reason
    }

    #[test]
    fn parses_the_proto3_json_mapping() {
        let e = parse_line(br#"{"topic":"run:7:events","seq":"3","kind":"run.step","payload":{"b":1,"a":[true]},"occurred_at":"2024-05-01T10:00:00.5Z"}"#, Origin::Line(1), LIMITS).unwrap();
        assert_eq!(e.stream_id, "runtime.run.7.events");
        assert_eq!(e.seq, 3);
        assert_eq!(e.payload, br#"{"a":[true],"b":1}"#);
        assert_eq!(e.occurred_at_micros, 1_714_557_600_500_000);
        assert_eq!(e.idempotency_key(), "topic:run:7:events:seq:3:kind:run.step");
        let n = parse_line(br#"{"topic":"t","seq":9,"kind":"k"}"#, Origin::Line(1), LIMITS).unwrap();
        assert_eq!((n.seq, n.payload.as_slice(), n.occurred_at_micros), (9, b"null".as_slice(), 0));
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(reason("not json"), "not_json");
        assert_eq!(reason("[1]"), "not_an_event");
        assert_eq!(reason(r#"{"seq":1,"kind":"k"}"#), "missing_topic");
        assert_eq!(reason(r#"{"topic":"t","kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":0,"kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":-1,"kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":"1e3","kind":"k"}"#), "invalid_seq");
        assert_eq!(reason(r#"{"topic":"t","seq":1}"#), "missing_kind");
        assert_eq!(reason(r#"{"topic":"a b","seq":1,"kind":"k"}"#), "unmappable_topic");
        assert_eq!(reason(r#"{"topic":"t","seq":1,"kind":"k","occurred_at":"yesterday"}"#), "invalid_occurred_at");
        let big = format!(r#"{{"topic":"t","seq":4,"kind":"k","payload":"{}"}}"#, "x".repeat(80));
        let bad = parse_line(big.as_bytes(), Origin::Line(1), LIMITS).unwrap_err();
        assert_eq!((bad.reason, bad.stream_id.as_deref(), bad.seq), ("payload_too_large", Some("runtime.topic.t"), Some(4)));
    }

    #[test]
    fn a_refused_event_round_trips_through_its_json_line() {
        let e = parse_line(br#"{"topic":"t","seq":2,"kind":"k","payload":{"x":[1,2]}}"#, Origin::Line(1), LIMITS).unwrap();
        let again = parse_line(e.to_json_line().as_bytes(), Origin::Line(1), LIMITS).unwrap();
        assert_eq!(again, e);
    }
}

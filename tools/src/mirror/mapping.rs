//! Topic → stream id mapping: how an authority topic names a Khala stream.
//!
//! The mapping must be a function the mirror can invert (reconciliation, tooling and
//! people reading a stream id all need the topic back), and every stream id it makes
//! must pass the module's rules: 1..=128 bytes of `[A-Za-z0-9._:-]`, first byte a
//! letter or digit.
//!
//! # Rules (tried in order)
//!
//! | topic | stream |
//! |---|---|
//! | `run:<id>:events` | `runtime.run.<id>.events` |
//! | `worker:<id>:lifecycle` | `runtime.worker.<id>.lifecycle` |
//! | `fleet:user:<id>:workers` | `runtime.fleet.user.<id>.workers` |
//! | anything else | `runtime.topic.<topic with ':' and '.' swapped>` |
//!
//! `<id>` is non-empty and kept verbatim (it may hold `.` or `:`). Why this is
//! reversible: the four stream prefixes (`runtime.run.`, `runtime.worker.`,
//! `runtime.fleet.user.`, `runtime.topic.`) are not prefixes of one another, so a stream
//! id names its rule; inside a named rule the prefix and suffix are fixed, so stripping
//! them gives the id back; and swapping `:` with `.` is its own inverse, so the general
//! rule never merges two topics (`a.b:c` and `a:b.c` stay apart). A topic is refused
//! (dead-lettered as `unmappable_topic`) when it is empty, holds a byte outside
//! `[A-Za-z0-9._:-]`, or would make a stream id longer than 128 bytes.

/// Longest stream id the module accepts, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 128;

/// One named rule: `topic_prefix <id> topic_suffix` ↔ `stream_prefix <id> stream_suffix`.
struct Rule {
    topic_prefix: &'static str,
    topic_suffix: &'static str,
    stream_prefix: &'static str,
    stream_suffix: &'static str,
}

const RULES: [Rule; 3] = [
    Rule { topic_prefix: "run:", topic_suffix: ":events", stream_prefix: "runtime.run.", stream_suffix: ".events" },
    Rule { topic_prefix: "worker:", topic_suffix: ":lifecycle", stream_prefix: "runtime.worker.", stream_suffix: ".lifecycle" },
    Rule { topic_prefix: "fleet:user:", topic_suffix: ":workers", stream_prefix: "runtime.fleet.user.", stream_suffix: ".workers" },
];

/// The prefix of streams made by the general rule.
const GENERAL_PREFIX: &str = "runtime.topic.";

/// Why a topic has no stream id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmappable(pub String);

impl std::fmt::Display for Unmappable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._:-".contains(&b)
}

/// The module's stream id rule (kept in step with `module/src/streams.rs`).
pub fn valid_stream_id(stream_id: &str) -> bool {
    let bytes = stream_id.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_STREAM_ID_LEN && bytes[0].is_ascii_alphanumeric() && bytes.iter().all(|b| allowed(*b))
}

/// Swaps `:` and `.`; every other byte stays.
fn swap_separators(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            ':' => '.',
            '.' => ':',
            other => other,
        })
        .collect()
}

/// The id inside `text` when it is `prefix <non-empty id> suffix`.
fn strip<'a>(text: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    let id = text.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!id.is_empty()).then_some(id)
}

/// The stream id of `topic`, or why it has none.
pub fn topic_to_stream(topic: &str) -> Result<String, Unmappable> {
    if topic.is_empty() {
        return Err(Unmappable("the topic is empty".into()));
    }
    if let Some(bad) = topic.bytes().find(|b| !allowed(*b)) {
        return Err(Unmappable(format!("topic {topic:?} holds byte 0x{bad:02x}; topics use only A-Z a-z 0-9 . _ : -")));
    }
    let stream = RULES
        .iter()
        .find_map(|rule| strip(topic, rule.topic_prefix, rule.topic_suffix).map(|id| format!("{}{id}{}", rule.stream_prefix, rule.stream_suffix)))
        .unwrap_or_else(|| format!("{GENERAL_PREFIX}{}", swap_separators(topic)));
    if stream.len() > MAX_STREAM_ID_LEN {
        return Err(Unmappable(format!("topic {topic:?} maps to a stream id of {} bytes; the limit is {MAX_STREAM_ID_LEN}", stream.len())));
    }
    debug_assert!(valid_stream_id(&stream));
    Ok(stream)
}

/// The topic whose stream id is `stream_id`, or `None` when no topic maps to it.
pub fn stream_to_topic(stream_id: &str) -> Option<String> {
    let candidate = RULES
        .iter()
        .find_map(|rule| strip(stream_id, rule.stream_prefix, rule.stream_suffix).map(|id| format!("{}{id}{}", rule.topic_prefix, rule.topic_suffix)))
        .or_else(|| stream_id.strip_prefix(GENERAL_PREFIX).filter(|rest| !rest.is_empty()).map(swap_separators))?;
    // Only ids the forward mapping makes have a topic: e.g. `runtime.topic.run.1.events`
    // is not one, since `run:1:events` takes the named rule.
    (topic_to_stream(&candidate).ok()? == stream_id).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_documented_table() {
        let cases = [
            ("run:42:events", "runtime.run.42.events"),
            ("worker:w-7:lifecycle", "runtime.worker.w-7.lifecycle"),
            ("fleet:user:u_1:workers", "runtime.fleet.user.u_1.workers"),
            ("billing:invoice:9", "runtime.topic.billing.invoice.9"),
            ("billing.invoice:9", "runtime.topic.billing:invoice.9"),
            ("run:a.b:events", "runtime.run.a.b.events"),
            ("run:a:b:events", "runtime.run.a:b.events"),
            ("run::events", "runtime.topic.run..events"),
            ("run:events", "runtime.topic.run.events"),
            ("plain", "runtime.topic.plain"),
        ];
        for (topic, stream) in cases {
            assert_eq!(topic_to_stream(topic).as_deref(), Ok(stream), "{topic}");
            assert_eq!(stream_to_topic(stream).as_deref(), Some(topic), "{stream}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_a_stream() {
        assert!(topic_to_stream("").is_err());
        assert!(topic_to_stream("run:4 2:events").is_err());
        assert!(topic_to_stream("tenant/7").is_err());
        assert!(topic_to_stream("é").is_err());
        assert!(topic_to_stream(&"x".repeat(MAX_STREAM_ID_LEN - GENERAL_PREFIX.len())).is_ok());
        assert!(topic_to_stream(&"x".repeat(MAX_STREAM_ID_LEN - GENERAL_PREFIX.len() + 1)).is_err());
    }

    #[test]
    fn streams_no_topic_makes_have_no_topic() {
        for stream in ["runtime.topic.run.1.events", "runtime.run..events", "other.stream", "runtime.topic.", "runtime.run.x"] {
            assert_eq!(stream_to_topic(stream), None, "{stream}");
        }
    }

    /// Topics from the whole valid domain, with the named shapes made likely.
    fn topic() -> impl Strategy<Value = String> {
        let id = "[A-Za-z0-9._:-]{0,40}";
        prop_oneof![
            id.prop_map(|s| format!("run:{s}:events")),
            id.prop_map(|s| format!("worker:{s}:lifecycle")),
            id.prop_map(|s| format!("fleet:user:{s}:workers")),
            "[A-Za-z0-9._:-]{1,120}",
        ]
    }

    proptest! {
        #[test]
        fn every_mapped_topic_round_trips(topic in topic()) {
            if let Ok(stream) = topic_to_stream(&topic) {
                prop_assert!(valid_stream_id(&stream), "{stream}");
                prop_assert_eq!(stream_to_topic(&stream), Some(topic.clone()));
            } else {
                prop_assert!(topic.len() + GENERAL_PREFIX.len() > MAX_STREAM_ID_LEN);
            }
        }

        #[test]
        fn distinct_topics_get_distinct_streams(a in topic(), b in topic()) {
            if a != b {
                if let (Ok(x), Ok(y)) = (topic_to_stream(&a), topic_to_stream(&b)) {
                    prop_assert_ne!(x, y);
                }
            }
        }

        #[test]
        fn every_reversed_stream_maps_back(stream in "[A-Za-z0-9][A-Za-z0-9._:-]{0,60}|runtime\\.(run|worker|fleet\\.user|topic)\\.[A-Za-z0-9._:-]{0,40}") {
            if let Some(topic) = stream_to_topic(&stream) {
                prop_assert_eq!(topic_to_stream(&topic), Ok(stream.clone()));
            }
        }
    }
}

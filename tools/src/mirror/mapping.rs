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

/// The module's stream id rule and its longest stream id.
pub use khala_proto::limits::{valid_stream_id, MAX_STREAM_ID_LEN};
use khala_proto::limits::stream_id_byte;

use std::borrow::Cow;

/// One named rule: `topic_prefix <id> topic_suffix` ↔ `stream_prefix <id> stream_suffix`,
/// written `topic_prefix*topic_suffix=stream_prefix*stream_suffix` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    topic_prefix: Cow<'static, str>,
    topic_suffix: Cow<'static, str>,
    stream_prefix: Cow<'static, str>,
    stream_suffix: Cow<'static, str>,
}

const fn rule(topic_prefix: &'static str, topic_suffix: &'static str, stream_prefix: &'static str, stream_suffix: &'static str) -> Rule {
    Rule {
        topic_prefix: Cow::Borrowed(topic_prefix),
        topic_suffix: Cow::Borrowed(topic_suffix),
        stream_prefix: Cow::Borrowed(stream_prefix),
        stream_suffix: Cow::Borrowed(stream_suffix),
    }
}

impl Rule {
    /// Parses `topic_prefix*topic_suffix=stream_prefix*stream_suffix`, e.g.
    /// `run:*:events=runtime.run.*.events`.
    pub fn parse(spec: &str) -> Result<Rule, String> {
        let bad = || format!("mapping rule {spec:?} is not of the form TOPIC_PREFIX*TOPIC_SUFFIX=STREAM_PREFIX*STREAM_SUFFIX");
        let (topic, stream) = spec.split_once('=').ok_or_else(bad)?;
        let (tp, ts) = topic.split_once('*').ok_or_else(bad)?;
        let (sp, ss) = stream.split_once('*').ok_or_else(bad)?;
        if [tp, ts, sp, ss].iter().any(|part| part.contains('*') || !part.bytes().all(stream_id_byte)) {
            return Err(format!("mapping rule {spec:?}: one `*` per side, and only A-Z a-z 0-9 . _ : -"));
        }
        if sp.is_empty() || !sp.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(format!("mapping rule {spec:?}: a stream prefix must start with a letter or digit"));
        }
        Ok(Rule {
            topic_prefix: Cow::Owned(tp.into()),
            topic_suffix: Cow::Owned(ts.into()),
            stream_prefix: Cow::Owned(sp.into()),
            stream_suffix: Cow::Owned(ss.into()),
        })
    }
}

/// A set of named rules tried in order, then the general rule under `general_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    rules: Cow<'static, [Rule]>,
    general_prefix: Cow<'static, str>,
}

/// The documented default mapping (the table above).
pub static DEFAULT_MAPPING: Mapping = Mapping {
    rules: Cow::Borrowed(&[
        rule("run:", ":events", "runtime.run.", ".events"),
        rule("worker:", ":lifecycle", "runtime.worker.", ".lifecycle"),
        rule("fleet:user:", ":workers", "runtime.fleet.user.", ".workers"),
    ]),
    general_prefix: Cow::Borrowed("runtime.topic."),
};

impl Mapping {
    /// A mapping with its own rules. It stays reversible because no stream prefix (the
    /// general one included) may be a prefix of another: a stream id then names its rule.
    pub fn new(rules: Vec<Rule>, general_prefix: &str) -> Result<Mapping, String> {
        if general_prefix.is_empty() || !general_prefix.as_bytes()[0].is_ascii_alphanumeric() || !general_prefix.bytes().all(stream_id_byte) {
            return Err(format!("general prefix {general_prefix:?} must start with a letter or digit and use only A-Z a-z 0-9 . _ : -"));
        }
        let prefixes: Vec<&str> = rules.iter().map(|r| r.stream_prefix.as_ref()).chain([general_prefix]).collect();
        for (i, a) in prefixes.iter().enumerate() {
            for b in prefixes.iter().skip(i + 1) {
                if a.starts_with(b) || b.starts_with(a) {
                    return Err(format!("stream prefixes {a:?} and {b:?} overlap, so stream ids would not name their rule"));
                }
            }
        }
        Ok(Mapping { rules: Cow::Owned(rules), general_prefix: Cow::Owned(general_prefix.into()) })
    }

    /// The named rules, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The stream id of `topic`, or why it has none.
    pub fn topic_to_stream(&self, topic: &str) -> Result<String, Unmappable> {
        if topic.is_empty() {
            return Err(Unmappable("the topic is empty".into()));
        }
        if let Some(bad) = topic.bytes().find(|b| !stream_id_byte(*b)) {
            return Err(Unmappable(format!("topic {topic:?} holds byte 0x{bad:02x}; topics use only A-Z a-z 0-9 . _ : -")));
        }
        // Built by concatenation: `format!` was most of this function's time, which the
        // mirror spends once per event.
        let stream = self
            .rules
            .iter()
            .find_map(|rule| strip(topic, &rule.topic_prefix, &rule.topic_suffix).map(|id| [rule.stream_prefix.as_ref(), id, rule.stream_suffix.as_ref()].concat()))
            .unwrap_or_else(|| [self.general_prefix.as_ref(), swap_separators(topic).as_str()].concat());
        if stream.len() > MAX_STREAM_ID_LEN {
            return Err(Unmappable(format!("topic {topic:?} maps to a stream id of {} bytes; the limit is {MAX_STREAM_ID_LEN}", stream.len())));
        }
        if !valid_stream_id(&stream) {
            return Err(Unmappable(format!("topic {topic:?} maps to {stream:?}, which is not a valid stream id")));
        }
        Ok(stream)
    }

    /// The topic whose stream id is `stream_id`, or `None` when no topic maps to it.
    pub fn stream_to_topic(&self, stream_id: &str) -> Option<String> {
        let candidate = self
            .rules
            .iter()
            .find_map(|rule| strip(stream_id, &rule.stream_prefix, &rule.stream_suffix).map(|id| format!("{}{id}{}", rule.topic_prefix, rule.topic_suffix)))
            .or_else(|| stream_id.strip_prefix(self.general_prefix.as_ref()).filter(|rest| !rest.is_empty()).map(swap_separators))?;
        // Only ids the forward mapping makes have a topic: e.g. `runtime.topic.run.1.events`
        // is not one, since `run:1:events` takes the named rule.
        (self.topic_to_stream(&candidate).ok()? == stream_id).then_some(candidate)
    }
}

/// Why a topic has no stream id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmappable(pub String);

impl std::fmt::Display for Unmappable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
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

/// The stream id of `topic` under the default mapping.
pub fn topic_to_stream(topic: &str) -> Result<String, Unmappable> {
    DEFAULT_MAPPING.topic_to_stream(topic)
}

/// The topic of `stream_id` under the default mapping.
pub fn stream_to_topic(stream_id: &str) -> Option<String> {
    DEFAULT_MAPPING.stream_to_topic(stream_id)
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
    fn configured_rules_parse_validate_and_round_trip() {
        let rules = vec![Rule::parse("job:*:log=jobs.*.log").unwrap(), Rule::parse("*:audit=audit.*").unwrap()];
        let m = Mapping::new(rules, "other.").unwrap();
        assert_eq!(m.topic_to_stream("job:7:log").as_deref(), Ok("jobs.7.log"));
        assert_eq!(m.topic_to_stream("x:audit").as_deref(), Ok("audit.x"));
        assert_eq!(m.topic_to_stream("run:1:events").as_deref(), Ok("other.run.1.events"));
        for stream in ["jobs.7.log", "audit.x", "other.run.1.events"] {
            let topic = m.stream_to_topic(stream).unwrap();
            assert_eq!(m.topic_to_stream(&topic).as_deref(), Ok(stream));
        }
        assert!(Rule::parse("no-star=x.*").is_err());
        assert!(Rule::parse("a*b=*x").is_err(), "a stream prefix must start with a letter or digit");
        assert!(Mapping::new(vec![Rule::parse("a:*=runtime.*").unwrap()], "runtime.topic.").is_err(), "overlapping prefixes");
        assert_eq!(Mapping::new(DEFAULT_MAPPING.rules.to_vec(), "runtime.topic.").unwrap(), DEFAULT_MAPPING);
    }

    #[test]
    fn refuses_what_cannot_be_a_stream() {
        assert!(topic_to_stream("").is_err());
        assert!(topic_to_stream("run:4 2:events").is_err());
        assert!(topic_to_stream("tenant/7").is_err());
        assert!(topic_to_stream("é").is_err());
        assert!(topic_to_stream(&"x".repeat(MAX_STREAM_ID_LEN - DEFAULT_MAPPING.general_prefix.len())).is_ok());
        assert!(topic_to_stream(&"x".repeat(MAX_STREAM_ID_LEN - DEFAULT_MAPPING.general_prefix.len() + 1)).is_err());
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
                prop_assert!(topic.len() + DEFAULT_MAPPING.general_prefix.len() > MAX_STREAM_ID_LEN);
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

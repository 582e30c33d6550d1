//! Synthetic authority events for measurements and tests (`khala gen-events`): JSONL in
//! the mirror's input format, spread round-robin over `run:<n>:events` topics, with
//! payloads of an exact canonical size filled with pseudo-random text, so that nothing
//! downstream is flattered by compressible data.

use std::io::{self, Write};

/// The canonical JSON of `{"i":<i>,"pad":"<pad>"}` without the pad: its fixed bytes.
fn overhead(i: u64) -> usize {
    r#"{"i":,"pad":""}"#.len() + i.to_string().len()
}

/// xorshift64*: fast, deterministic and good enough to defeat compression.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";

/// Writes `count` events over `topics` topics; event `i` (from 0) is seq `i / topics + 1`
/// of topic `run:<i % topics>:events`, and its payload's canonical JSON is
/// `payload_bytes` long (or as short as it can be).
pub fn write_events(out: &mut impl Write, count: u64, payload_bytes: usize, topics: u32, seed: u64) -> io::Result<()> {
    let topics = u64::from(topics.max(1));
    let mut noise = Noise(seed | 1);
    let mut line = Vec::with_capacity(payload_bytes + 200);
    for i in 0..count {
        let pad_len = payload_bytes.saturating_sub(overhead(i));
        let mut pad = Vec::with_capacity(pad_len);
        while pad.len() < pad_len {
            let mut bits = noise.next();
            for _ in 0..10 {
                if pad.len() == pad_len {
                    break;
                }
                pad.push(ALPHABET[(bits & 63) as usize]);
                bits >>= 6;
            }
        }
        let micros = 1_700_000_000_000_000i64 + i as i64 * 1000;
        let occurred = chrono::DateTime::from_timestamp_micros(micros).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)).unwrap_or_default();
        line.clear();
        write!(
            line,
            r#"{{"topic":"run:{}:events","seq":"{}","kind":"bench.event","payload":{{"i":{i},"pad":"{}"}},"occurred_at":"{occurred}"}}"#,
            i % topics,
            i / topics + 1,
            std::str::from_utf8(&pad).expect("ascii"),
        )?;
        line.push(b'\n');
        out.write_all(&line)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::event::{Limits, Parser};
    use crate::mirror::source::Origin;

    #[test]
    fn events_parse_with_the_asked_payload_size() {
        let mut out = Vec::new();
        write_events(&mut out, 7, 256, 3, 1).unwrap();
        let mut parser = Parser::new(Limits { max_payload_bytes: 1024, mapping: &crate::mirror::mapping::DEFAULT_MAPPING });
        let events: Vec<_> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| parser.parse_line(l, Origin::Line(1)).unwrap()).collect();
        assert_eq!(events.len(), 7);
        assert!(events.iter().all(|e| e.payload.len() == 256));
        assert_eq!((&*events[4].topic, events[4].seq), ("run:1:events", 2));
        assert_ne!(events[0].payload, events[3].payload);
    }
}

//! Parity: the authority's log, the module's log and a client's applied log, compared by
//! `(stream_id, seq)` and hash. After reconciliation all three must agree exactly.

use crate::api::Api;
use crate::error::{Result, ToolError};
use crate::mirror::mapping::topic_to_stream;
use khala_proto::hash::{display, payload_hash, GENESIS};
use khala_proto::json::canonical_json;
use khala_proto::segment;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

/// One event as a log holds it: seq, `blake3:<hex>` payload hash, and chain hash where
/// the log has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub payload_hash: String,
    pub chain_hash: Option<String>,
}

/// Per stream, its entries in the order the log holds them.
pub type Log = BTreeMap<String, Vec<Entry>>;

fn io(what: &str, e: std::io::Error) -> ToolError {
    ToolError::io(what, e)
}

/// The authority's log from a JSONL input (lines that do not parse are skipped: the
/// mirror dead-letters them).
pub fn authority_log(path: &Path) -> Result<Log> {
    let file = std::fs::File::open(path).map_err(|e| io(&format!("opening {}", path.display()), e))?;
    let mut log = Log::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| io("reading the authority log", e))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        let seq = v["seq"].as_u64().or_else(|| v["seq"].as_str().and_then(|s| s.parse().ok()));
        let (Some(topic), Some(seq)) = (v["topic"].as_str(), seq) else { continue };
        let Ok(stream) = topic_to_stream(topic) else { continue };
        let hash = display(&payload_hash(&canonical_json(&v["payload"])));
        log.entry(stream).or_default().push(Entry { seq, payload_hash: hash, chain_hash: None });
    }
    Ok(log)
}

/// The module's log of `streams`, read with SQL as `token` (the owner sees every row),
/// with the chain recomputed from the stored segments.
pub fn module_log(api: &Api, database: &str, token: &str, streams: &[String]) -> Result<Log> {
    let mut log = Log::new();
    for stream in streams {
        let segments = crate::inspect::all_segments(api, database, token, stream)?;
        let entries = log.entry(stream.clone()).or_default();
        for seg in segments {
            let events = segment::decode(&seg.data).map_err(|e| ToolError::Http { what: format!("segment of {stream}"), detail: e.to_string() })?;
            let mut chain = khala_proto::hash::from_slice(&seg.prev_hash).unwrap_or(GENESIS);
            for e in events {
                chain = segment::event_chain(&chain, stream, &e);
                entries.push(Entry { seq: e.seq, payload_hash: display(&payload_hash(&e.payload)), chain_hash: Some(display(&chain)) });
            }
        }
    }
    Ok(log)
}

/// Drops the entries of `log` below each stream's retention floor in `module` (its first
/// stored seq): retention deleted them from the module, and a client that was behind the
/// floor rebuilt from it, so only what is still retained can be compared. Returns how
/// many entries were dropped. A stream the module holds nothing of keeps every entry (an
/// empty module stream is a difference, not a floor).
pub fn trim_below_floor(log: &mut Log, module: &Log) -> u64 {
    let floors = module.iter().filter_map(|(stream, entries)| Some((stream.clone(), entries.first()?.seq))).collect();
    trim_below(log, &floors)
}

/// A client's applied log: the JSON lines `khala tail --json` prints. A `rebootstrap`
/// line means the client threw the stream's state away and rebuilds it from the stream's
/// new start, so the stream's history starts over there: what is compared is the state
/// the client holds now.
pub fn client_log(path: &Path) -> Result<Log> {
    Ok(client_state(path)?.0)
}

/// [`client_log`], with the seq each rebuilt stream was rebuilt from (its first event
/// after the last `rebootstrap` line). A stale cursor rebuilds from the retention floor
/// of that moment, so the client rightly holds nothing below it, even once the module
/// retains more again.
pub fn client_state(path: &Path) -> Result<(Log, BTreeMap<String, u64>)> {
    let file = std::fs::File::open(path).map_err(|e| io(&format!("opening {}", path.display()), e))?;
    let mut log = Log::new();
    let mut rebuilt = std::collections::BTreeSet::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| io("reading the client log", e))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if let Some(stream) = v["rebootstrap"]["stream_id"].as_str() {
            log.insert(stream.to_string(), Vec::new());
            rebuilt.insert(stream.to_string());
            continue;
        }
        let (Some(stream), Some(seq), Some(hash)) = (v["stream_id"].as_str(), v["seq"].as_u64(), v["payload_hash"].as_str()) else { continue };
        log.entry(stream.to_string()).or_default().push(Entry {
            seq,
            payload_hash: hash.to_string(),
            chain_hash: v["chain_hash"].as_str().map(String::from),
        });
    }
    let floors = rebuilt.into_iter().filter_map(|stream| Some((stream.clone(), log.get(&stream)?.first()?.seq))).collect();
    Ok((log, floors))
}

/// Drops the entries of `log` below `floors` (per stream); returns how many.
pub fn trim_below(log: &mut Log, floors: &BTreeMap<String, u64>) -> u64 {
    let mut dropped = 0;
    for (stream, entries) in log.iter_mut() {
        let Some(&floor) = floors.get(stream) else { continue };
        let before = entries.len();
        entries.retain(|e| e.seq >= floor);
        dropped += (before - entries.len()) as u64;
    }
    dropped
}

/// The differences between two logs, as readable lines (empty when they agree):
/// missing or extra streams, seqs out of order or repeated, different hashes.
pub fn compare(left_name: &str, left: &Log, right_name: &str, right: &Log) -> Vec<String> {
    let mut diffs = Vec::new();
    for stream in left.keys().chain(right.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (a, b) = (left.get(stream), right.get(stream));
        let (Some(a), Some(b)) = (a, b) else {
            diffs.push(format!("{stream}: only in {}", if a.is_some() { left_name } else { right_name }));
            continue;
        };
        if a.len() != b.len() {
            diffs.push(format!("{stream}: {left_name} has {} events, {right_name} has {}", a.len(), b.len()));
        }
        for (x, y) in a.iter().zip(b) {
            let chains_differ = matches!((&x.chain_hash, &y.chain_hash), (Some(p), Some(q)) if p != q);
            if x.seq != y.seq || x.payload_hash != y.payload_hash || chains_differ {
                diffs.push(format!("{stream}: {left_name} has seq {} ({}), {right_name} has seq {} ({})", x.seq, x.payload_hash, y.seq, y.payload_hash));
                break;
            }
        }
    }
    diffs
}

/// Events across all streams.
pub fn total(log: &Log) -> usize {
    log.values().map(Vec::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, h: &str) -> Entry {
        Entry { seq, payload_hash: h.into(), chain_hash: None }
    }

    #[test]
    fn finds_every_kind_of_difference() {
        let a: Log = [("s".to_string(), vec![entry(1, "a"), entry(2, "b")])].into();
        assert!(compare("x", &a, "y", &a).is_empty());
        let shorter: Log = [("s".to_string(), vec![entry(1, "a")])].into();
        assert_eq!(compare("x", &a, "y", &shorter), vec!["s: x has 2 events, y has 1"]);
        let other: Log = [("s".to_string(), vec![entry(1, "a"), entry(2, "c")])].into();
        assert_eq!(compare("x", &a, "y", &other).len(), 1);
        let doubled: Log = [("s".to_string(), vec![entry(1, "a"), entry(1, "a")])].into();
        assert!(!compare("x", &a, "y", &doubled).is_empty());
        let elsewhere: Log = [("t".to_string(), vec![entry(1, "a")])].into();
        assert_eq!(compare("x", &a, "y", &elsewhere).len(), 2);
    }

    #[test]
    fn entries_below_the_module_floor_are_not_compared() {
        let module: Log = [("s".to_string(), vec![entry(3, "c"), entry(4, "d")]), ("empty".to_string(), vec![])].into();
        let mut authority: Log = [
            ("s".to_string(), vec![entry(1, "a"), entry(2, "b"), entry(3, "c"), entry(4, "d")]),
            ("empty".to_string(), vec![entry(1, "a")]),
        ]
        .into();
        assert_eq!(trim_below_floor(&mut authority, &module), 2);
        assert_eq!(authority["s"], module["s"]);
        assert_eq!(authority["empty"].len(), 1, "an empty module stream is no floor");
        assert!(!compare("authority", &authority, "module", &module).is_empty());
    }

    #[test]
    fn a_rebootstrap_line_starts_the_streams_client_history_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.jsonl");
        let line = |stream: &str, seq: u64, h: &str| format!("{{\"stream_id\":\"{stream}\",\"seq\":{seq},\"payload_hash\":\"{h}\"}}\n");
        let text = [
            line("s", 1, "old1"),
            line("s", 2, "old2"),
            line("t", 1, "t1"),
            "{\"rebootstrap\":{\"stream_id\":\"s\",\"reason\":\"epoch_changed\"}}\n".to_string(),
            line("s", 1, "new1"),
        ]
        .concat();
        std::fs::write(&path, text).unwrap();
        let (log, floors) = client_state(&path).unwrap();
        assert_eq!(log["s"], vec![entry(1, "new1")]);
        assert_eq!(floors, [("s".to_string(), 1)].into(), "rebuilt from 1; t never rebuilt");
        assert_eq!(log["t"], vec![entry(1, "t1")]);
        // Without the rebootstrap line the same seqs twice are a difference, as before.
        std::fs::write(&path, [line("s", 1, "a"), line("s", 1, "a")].concat()).unwrap();
        let doubled = client_log(&path).unwrap();
        assert!(!compare("x", &[("s".to_string(), vec![entry(1, "a")])].into(), "y", &doubled).is_empty());
    }

    #[test]
    fn reads_the_authority_log_as_the_mirror_maps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"topic\":\"run:7:events\",\"seq\":\"1\",\"kind\":\"k\",\"payload\":{\"b\":1, \"a\":2}}\nnot json\n").unwrap();
        let log = authority_log(&path).unwrap();
        let e = &log["runtime.run.7.events"][0];
        assert_eq!(e.seq, 1);
        assert_eq!(e.payload_hash, display(&payload_hash(br#"{"a":2,"b":1}"#)));
    }
}

//! The check every drill ends with: the full applied history of every client process,
//! one log per process incarnation (never merged, never deduplicated), against the
//! authority's log, by `(stream_id, seq, kind, payload hash, chain hash)`.
//!
//! The expected chain is computed from the authority's events alone (docs/HASHING.md),
//! so a module that stored a different history cannot make the check agree with it.

use crate::error::{Result, ToolError};
use crate::mirror::mapping::topic_to_stream;
use khala_proto::hash::{chain_hash, display, payload_hash, GENESIS};
use khala_proto::json::canonical_json;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One event as the authority defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub kind: String,
    pub payload_hash: String,
    pub chain_hash: String,
}

/// Per stream, its events by seq (index `seq - 1`).
#[derive(Debug, Clone, Default)]
pub struct Authority {
    pub streams: BTreeMap<String, Vec<Expected>>,
}

impl Authority {
    /// Reads a mirror input (JSONL of authority events) the way the mirror maps it.
    /// Each stream's seqs must run 1, 2, 3, … in the file.
    pub fn from_jsonl(path: &Path) -> Result<Authority> {
        let file = std::fs::File::open(path).map_err(|e| ToolError::io(format!("opening {}", path.display()), e))?;
        let mut raw: BTreeMap<String, Vec<(u64, String, Vec<u8>)>> = BTreeMap::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| ToolError::io("reading the authority log", e))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            let seq = v["seq"].as_u64().or_else(|| v["seq"].as_str().and_then(|s| s.parse().ok()));
            let (Some(topic), Some(seq), Some(kind)) = (v["topic"].as_str(), seq, v["kind"].as_str()) else { continue };
            let Ok(stream) = topic_to_stream(topic) else { continue };
            raw.entry(stream).or_default().push((seq, kind.to_string(), canonical_json(&v["payload"])));
        }
        let mut streams = BTreeMap::new();
        for (stream, mut events) in raw {
            events.sort_by_key(|e| e.0);
            let mut chain = GENESIS;
            let mut out = Vec::with_capacity(events.len());
            for (i, (seq, kind, payload)) in events.into_iter().enumerate() {
                if seq != i as u64 + 1 {
                    return Err(ToolError::Http { what: format!("the authority log of {stream}"), detail: format!("seq {seq} where {} was due", i + 1) });
                }
                let ph = payload_hash(&payload);
                chain = chain_hash(&chain, &stream, seq, &kind, &ph);
                out.push(Expected { kind, payload_hash: display(&ph), chain_hash: display(&chain) });
            }
            streams.insert(stream, out);
        }
        Ok(Authority { streams })
    }

    pub fn head(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |v| v.len() as u64)
    }

    pub fn total(&self) -> u64 {
        self.streams.values().map(|v| v.len() as u64).sum()
    }
}

/// What one client's history showed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HistoryReport {
    /// Events applied, counting re-offers.
    pub applied: u64,
    /// Events applied again by a later incarnation (after a crash, from the checkpoint).
    pub reoffered: u64,
    /// The most re-offered at any one restart of one stream.
    pub worst_reoffer: u64,
    pub rebootstraps: Vec<Value>,
    pub incarnations: usize,
    /// Last applied seq per stream.
    pub heads: BTreeMap<String, u64>,
    /// Every violation found (empty when the history is right).
    pub problems: Vec<String>,
}

/// One applied line of a `khala tail --json` log.
#[derive(Debug)]
enum Line {
    Event { stream: String, seq: u64, kind: String, payload_hash: String, chain_hash: String },
    Rebootstrap(Value),
}

fn read_lines(path: &Path) -> Result<Vec<Line>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(ToolError::io(format!("reading {}", path.display()), e)),
    };
    let mut out = Vec::new();
    for line in text.lines() {
        // A process killed mid-write leaves a torn last line: it was never whole on disk.
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if let Some(r) = v.get("rebootstrap") {
            out.push(Line::Rebootstrap(r.clone()));
            continue;
        }
        let s = |k: &str| v[k].as_str().map(String::from);
        if let (Some(stream), Some(seq), Some(kind), Some(ph), Some(ch)) = (s("stream_id"), v["seq"].as_u64(), s("kind"), s("payload_hash"), s("chain_hash")) {
            out.push(Line::Event { stream, seq, kind, payload_hash: ph, chain_hash: ch });
        }
    }
    Ok(out)
}

/// Checks the incarnation logs of one client (in start order) against `authority`.
/// `converge`: every stream must end at the authority's head. `reoffer_bound`: the most
/// events one restart may apply again.
pub fn check(authority: &Authority, incarnations: &[PathBuf], streams: &[String], converge: bool, reoffer_bound: u64) -> Result<HistoryReport> {
    let mut report = HistoryReport { incarnations: incarnations.len(), ..HistoryReport::default() };
    // Per stream: last applied seq over all incarnations so far.
    let mut last: BTreeMap<String, u64> = streams.iter().map(|s| (s.clone(), 0)).collect();
    for (n, path) in incarnations.iter().enumerate() {
        // Per stream, the previous seq within this incarnation (None before its first).
        let mut previous: BTreeMap<String, Option<u64>> = BTreeMap::new();
        for line in read_lines(path)? {
            let (stream, seq, kind, payload_hash, chain_hash) = match line {
                Line::Rebootstrap(r) => {
                    if let Some(s) = r["stream_id"].as_str() {
                        // The handler was told to start over from `oldest_available` (the
                        // cursor below the server's floor): the next seq must follow it.
                        let from = r["oldest_available"].as_u64().unwrap_or(0);
                        previous.insert(s.to_string(), Some(from));
                        last.insert(s.to_string(), from);
                    }
                    report.rebootstraps.push(r);
                    continue;
                }
                Line::Event { stream, seq, kind, payload_hash, chain_hash } => (stream, seq, kind, payload_hash, chain_hash),
            };
            report.applied += 1;
            let Some(prior) = last.get(&stream).copied() else {
                report.problems.push(format!("{}: applied {stream} seq {seq}, a stream it does not follow", path.display()));
                continue;
            };
            match previous.get(&stream).copied().flatten() {
                Some(prev) if seq == prev + 1 => {}
                Some(prev) if seq <= prev => report.problems.push(format!("incarnation {n}: {stream} seq {seq} applied again after {prev} within one process")),
                Some(prev) => report.problems.push(format!("incarnation {n}: {stream} jumped from {prev} to {seq}: a gap")),
                None if seq > prior + 1 => report.problems.push(format!("incarnation {n}: {stream} started at {seq} after {prior}: a gap")),
                None if seq <= prior => {
                    let again = prior - seq + 1;
                    report.reoffered += again;
                    report.worst_reoffer = report.worst_reoffer.max(again);
                    if n == 0 {
                        report.problems.push(format!("{stream} seq {seq} applied again in the first incarnation"));
                    }
                    if again > reoffer_bound {
                        report.problems.push(format!("incarnation {n}: {stream} re-offered {again} events (bound {reoffer_bound})"));
                    }
                }
                None => {}
            }
            previous.insert(stream.clone(), Some(seq));
            last.insert(stream.clone(), prior.max(seq));
            match authority.streams.get(&stream).and_then(|v| v.get(seq.wrapping_sub(1) as usize)) {
                None => report.problems.push(format!("incarnation {n}: {stream} seq {seq} is not in the authority's log")),
                Some(e) if e.kind != kind || e.payload_hash != payload_hash => {
                    report.problems.push(format!("incarnation {n}: {stream} seq {seq} is {kind} {payload_hash}, the authority's is {} {}", e.kind, e.payload_hash));
                }
                Some(e) if e.chain_hash != chain_hash => {
                    report.problems.push(format!("incarnation {n}: {stream} seq {seq} has chain {chain_hash}, the authority's is {}", e.chain_hash));
                }
                Some(_) => {}
            }
        }
    }
    if converge {
        for (stream, seq) in &last {
            let head = authority.head(stream);
            if *seq != head {
                report.problems.push(format!("{stream} ended at seq {seq}, the authority's head is {head}"));
            }
        }
    }
    report.problems.truncate(20);
    report.heads = last;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn authority(dir: &Path, n: u64) -> (Authority, PathBuf) {
        let path = dir.join("authority.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        for seq in 1..=n {
            writeln!(f, r#"{{"topic":"run:1:events","seq":"{seq}","kind":"k","payload":{{"n":{seq}}}}}"#).unwrap();
        }
        (Authority::from_jsonl(&path).unwrap(), path)
    }

    /// A tail log of `seqs`, as the client would print them for this authority.
    fn log(dir: &Path, name: &str, a: &Authority, seqs: &[u64]) -> PathBuf {
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        for &seq in seqs {
            let e = &a.streams[STREAM][seq as usize - 1];
            writeln!(f, "{}", serde_json::json!({"stream_id": STREAM, "seq": seq, "kind": e.kind, "payload_hash": e.payload_hash, "chain_hash": e.chain_hash})).unwrap();
        }
        path
    }

    const STREAM: &str = "runtime.run.1.events";

    fn streams() -> Vec<String> {
        vec![STREAM.to_string()]
    }

    #[test]
    fn the_chain_follows_the_hashing_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = authority(dir.path(), 2);
        let p1 = payload_hash(br#"{"n":1}"#);
        let c1 = chain_hash(&GENESIS, STREAM, 1, "k", &p1);
        assert_eq!(a.streams[STREAM][0].chain_hash, display(&c1));
        let c2 = chain_hash(&c1, STREAM, 2, "k", &payload_hash(br#"{"n":2}"#));
        assert_eq!(a.streams[STREAM][1].chain_hash, display(&c2));
    }

    #[test]
    fn a_whole_history_passes_and_a_crash_re_offer_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = authority(dir.path(), 10);
        let one = log(dir.path(), "0.jsonl", &a, &[1, 2, 3, 4, 5, 6]);
        let two = log(dir.path(), "1.jsonl", &a, &[5, 6, 7, 8, 9, 10]);
        let r = check(&a, &[one, two], &streams(), true, 100).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((r.applied, r.reoffered, r.worst_reoffer), (12, 2, 2));
    }

    #[test]
    fn a_repeat_within_one_process_fails_even_when_the_set_of_seqs_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = authority(dir.path(), 4);
        let one = log(dir.path(), "0.jsonl", &a, &[1, 2, 3, 3, 4]);
        let r = check(&a, &[one], &streams(), true, 100).unwrap();
        assert!(r.problems.iter().any(|p| p.contains("applied again after 3 within one process")), "{:?}", r.problems);
    }

    #[test]
    fn gaps_wrong_hashes_excess_re_offers_and_no_convergence_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = authority(dir.path(), 10);
        let gap = log(dir.path(), "g.jsonl", &a, &[1, 2, 4]);
        assert!(!check(&a, &[gap], &streams(), false, 100).unwrap().problems.is_empty());
        let first = log(dir.path(), "a.jsonl", &a, &[1, 2, 3]);
        let restart_gap = log(dir.path(), "b.jsonl", &a, &[5, 6]);
        assert!(!check(&a, &[first.clone(), restart_gap], &streams(), false, 100).unwrap().problems.is_empty());
        let again = log(dir.path(), "c.jsonl", &a, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let r = check(&a, &[first.clone(), again], &streams(), true, 2).unwrap();
        assert!(r.problems.iter().any(|p| p.contains("bound 2")), "{:?}", r.problems);
        let short = check(&a, std::slice::from_ref(&first), &streams(), true, 100).unwrap();
        assert!(short.problems.iter().any(|p| p.contains("head is 10")));
        // A payload the authority never had at that seq.
        let wrong = dir.path().join("w.jsonl");
        let e = &a.streams[STREAM][1];
        std::fs::write(&wrong, format!("{}\n", serde_json::json!({"stream_id": STREAM, "seq": 1, "kind": "k", "payload_hash": e.payload_hash, "chain_hash": e.chain_hash}))).unwrap();
        assert!(!check(&a, &[wrong], &streams(), false, 100).unwrap().problems.is_empty());
        // The right payload under a different chain.
        let chain = dir.path().join("c2.jsonl");
        let e0 = &a.streams[STREAM][0];
        std::fs::write(&chain, format!("{}\n", serde_json::json!({"stream_id": STREAM, "seq": 1, "kind": "k", "payload_hash": e0.payload_hash, "chain_hash": e.chain_hash}))).unwrap();
        assert!(check(&a, &[chain], &streams(), false, 100).unwrap().problems.iter().any(|p| p.contains("chain")));
    }

    #[test]
    fn a_torn_last_line_is_not_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = authority(dir.path(), 3);
        let p = log(dir.path(), "0.jsonl", &a, &[1, 2]);
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"stream_id\":\"runtime.ru").unwrap();
        let r = check(&a, &[p], &streams(), false, 100).unwrap();
        assert_eq!((r.applied, r.problems.len()), (2, 0));
    }
}

//! The dead-letter file: one JSON line per refused event, with where it came from (line
//! number or outbox id), a reason code and the raw input, so an operator can see what
//! was left out and replay it after fixing it.
//!
//! The file is append-only and fsynced before the durable cursor moves past a refused
//! event, so a refusal is never lost. The mirror may read the same input again after a
//! restart; a record already in the file for the same input position is not written
//! twice.

use super::error::{MirrorError, Result};
use super::event::Bad;
use super::source::Origin;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The dead-letter file of one source.
pub struct DeadLetters {
    path: PathBuf,
    source: String,
    file: File,
    seen: HashSet<String>,
    dirty: bool,
    written: u64,
}

fn origin_key(origin: Origin) -> String {
    match origin {
        Origin::Line(n) => format!("line:{n}"),
        Origin::OutboxId(id) => format!("outbox_id:{id}"),
    }
}

impl DeadLetters {
    /// Opens (or creates) `path` for `source`, remembering which positions of this
    /// source it already holds.
    pub fn open(path: &Path, source: &str) -> Result<DeadLetters> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| MirrorError::io(format!("creating {}", dir.display()), e))?;
        }
        let file = OpenOptions::new().create(true).append(true).read(true).open(path).map_err(|e| MirrorError::io(format!("opening the dead-letter file {}", path.display()), e))?;
        let mut seen = HashSet::new();
        for line in BufReader::new(&file).lines() {
            let line = line.map_err(|e| MirrorError::io(format!("reading {}", path.display()), e))?;
            let Ok(record) = serde_json::from_str::<Value>(&line) else { continue };
            if record["source"].as_str() != Some(source) {
                continue;
            }
            if let Some(n) = record["line"].as_u64() {
                seen.insert(origin_key(Origin::Line(n)));
            } else if let Some(id) = record["outbox_id"].as_i64() {
                seen.insert(origin_key(Origin::OutboxId(id)));
            }
        }
        Ok(DeadLetters { path: path.into(), source: source.into(), file, seen, dirty: false, written: 0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records written by this run.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a record for the event at `origin`, unless the file already has one.
    /// Returns whether it wrote one.
    pub fn write(&mut self, origin: Origin, bad: &Bad, raw: &str) -> Result<bool> {
        if !self.seen.insert(origin_key(origin)) {
            return Ok(false);
        }
        let mut record = json!({
            "at": chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "source": self.source,
            "reason": bad.reason,
            "detail": bad.detail,
            "topic": bad.topic,
            "stream_id": bad.stream_id,
            "seq": bad.seq,
            "raw": raw,
        });
        match origin {
            Origin::Line(n) => record["line"] = json!(n),
            Origin::OutboxId(id) => record["outbox_id"] = json!(id),
        }
        self.file.write_all(format!("{record}\n").as_bytes()).map_err(|e| MirrorError::io(format!("writing {}", self.path.display()), e))?;
        self.dirty = true;
        self.written += 1;
        Ok(true)
    }

    /// Fsyncs what was written since the last call.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.file.sync_data().map_err(|e| MirrorError::io(format!("syncing {}", self.path.display()), e))?;
            self.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(reason: &'static str) -> Bad {
        Bad { reason, detail: "d".into(), topic: None, stream_id: None, seq: None }
    }

    #[test]
    fn writes_once_per_position_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl").join("dead.jsonl");
        let mut dl = DeadLetters::open(&path, "file:/in").unwrap();
        assert!(dl.write(Origin::Line(3), &bad("not_json"), "nope").unwrap());
        assert!(!dl.write(Origin::Line(3), &bad("not_json"), "nope").unwrap());
        dl.sync().unwrap();
        let mut again = DeadLetters::open(&path, "file:/in").unwrap();
        assert!(!again.write(Origin::Line(3), &bad("not_json"), "nope").unwrap());
        assert!(again.write(Origin::Line(4), &bad("invalid_seq"), "{}").unwrap());
        let mut other = DeadLetters::open(&path, "file:/other").unwrap();
        assert!(other.write(Origin::Line(3), &bad("not_json"), "x").unwrap());
        other.sync().unwrap();
        let records: Vec<Value> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(records.len(), 3);
        assert_eq!((records[0]["line"].as_u64(), records[0]["reason"].as_str(), records[0]["raw"].as_str()), (Some(3), Some("not_json"), Some("nope")));
    }
}

//! The durable cursor of a file or stdin source: a small JSON file in the state dir,
//! replaced atomically (temp file, fsync, rename, fsync of the directory) so that a crash
//! leaves either the old cursor or the new one, never a torn one.
//!
//! Besides the position it stores which input it belongs to and a hash of the bytes just
//! before the position, so that resuming checks it is still reading the same data; and a
//! checksum of its own, so that a damaged cursor is reported instead of being read as
//! "start over".

use super::error::{MirrorError, Result};
use super::source::Mark;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How many bytes before the cursor the check hash covers.
pub const CHECK_BYTES: u64 = 256;

/// A saved cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Which input this is the cursor of, e.g. `file:/abs/path` or `stdin-spool`.
    pub source: String,
    pub mark: Mark,
    /// [`tail_check`] of the input at `mark`.
    pub check: String,
}

/// `cursor.json` in a state dir.
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn body(saved: &Saved) -> Value {
    json!({
        "version": 1,
        "source": saved.source,
        "segment": saved.mark.segment,
        "offset": saved.mark.offset,
        "line": saved.mark.line,
        "check": saved.check,
    })
}

/// Fsyncs a directory, so that a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| MirrorError::io(format!("syncing the directory {}", dir.display()), e))
}

/// The hash of the (up to) 256 bytes of `file` that end at `offset`.
pub fn tail_check(file: &File, offset: u64) -> std::io::Result<String> {
    Ok(check_of(&tail_bytes(file, offset)?))
}

/// The (up to) 256 bytes of `file` that end at `offset`.
pub fn tail_bytes(file: &File, offset: u64) -> std::io::Result<Vec<u8>> {
    let len = offset.min(CHECK_BYTES);
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset - len)?;
    Ok(buf)
}

/// The check of `tail`, the (up to) 256 bytes before a position: what [`tail_check`]
/// gives for the file they were read from.
pub fn check_of(tail: &[u8]) -> String {
    format!("{}:{}", tail.len(), sha256_hex(tail))
}

impl CursorFile {
    pub fn new(state_dir: &Path) -> CursorFile {
        CursorFile { path: state_dir.join("cursor.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved cursor, `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Saved>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MirrorError::io(format!("reading {}", self.path.display()), e)),
        };
        let corrupt = |detail: &str| MirrorError::CursorCorrupt { path: self.path.clone(), detail: detail.into() };
        let value: Value = serde_json::from_str(&text).map_err(|e| corrupt(&e.to_string()))?;
        let num = |key: &str| value[key].as_u64().ok_or_else(|| corrupt(&format!("{key} is missing")));
        let text_field = |key: &str| value[key].as_str().map(String::from).ok_or_else(|| corrupt(&format!("{key} is missing")));
        if value["version"].as_u64() != Some(1) {
            return Err(corrupt("unknown version"));
        }
        let saved = Saved {
            source: text_field("source")?,
            mark: Mark { segment: num("segment")?, offset: num("offset")?, line: num("line")? },
            check: text_field("check")?,
        };
        if text_field("sum")? != sha256_hex(body(&saved).to_string().as_bytes()) {
            return Err(corrupt("its checksum does not match"));
        }
        Ok(Some(saved))
    }

    /// Replaces the cursor atomically and durably.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let mut value = body(saved);
        value["sum"] = json!(sha256_hex(value.to_string().as_bytes()));
        let tmp = self.path.with_extension("json.tmp");
        let io = |what: &str, e| MirrorError::io(format!("{what} {}", tmp.display()), e);
        let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
        file.write_all(format!("{value}\n").as_bytes()).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("renaming", e))?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = CursorFile::new(dir.path());
        assert_eq!(cursor.load().unwrap(), None);
        let saved = Saved { source: "file:/x".into(), mark: Mark { segment: 0, offset: 120, line: 3 }, check: "3:ab".into() };
        cursor.save(&saved).unwrap();
        assert_eq!(cursor.load().unwrap(), Some(saved));
        let text = std::fs::read_to_string(cursor.path()).unwrap().replace("120", "121");
        std::fs::write(cursor.path(), text).unwrap();
        assert!(matches!(cursor.load(), Err(MirrorError::CursorCorrupt { .. })));
        std::fs::write(cursor.path(), "{").unwrap();
        assert!(matches!(cursor.load(), Err(MirrorError::CursorCorrupt { .. })));
    }

    #[test]
    fn the_tail_check_covers_the_bytes_before_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, b"line one\nline two\n").unwrap();
        let file = File::open(&path).unwrap();
        let at_nine = tail_check(&file, 9).unwrap();
        std::fs::write(&path, b"line One\nline two\n").unwrap();
        assert_ne!(tail_check(&File::open(&path).unwrap(), 9).unwrap(), at_nine);
        assert_eq!(tail_check(&file, 0).unwrap(), tail_check(&File::open(&path).unwrap(), 0).unwrap());
    }
}

//! Durable client checkpoints: versioned, checksummed, written atomically.
//!
//! File layout (big-endian): `b"KHCP"` ‖ `u16 version` (1) ‖ `u32 body length` ‖
//! `SHA-256(body)` ‖ `body`, where `body` is the protobuf `khala.sync.v1.Checkpoint`.
//! A write goes to a temp file in the same directory, is fsynced, renamed over the old
//! file, and the directory is fsynced, so a crash leaves either the old or the new
//! checkpoint, never a torn one. A file that fails any check is *corrupt*: it is never
//! read as empty (fault 9 of the system Khala replaces).

use khala_proto::v1::Checkpoint;
use khala_proto::StreamCursor;
use prost::Message;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"KHCP";
const VERSION: u16 = 1;
const HEADER: usize = 4 + 2 + 4 + 32;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl CheckpointError {
    pub fn code(&self) -> &'static str {
        match self {
            CheckpointError::Corrupt { .. } => "checkpoint_corrupt",
            CheckpointError::Io { .. } => "checkpoint_io",
        }
    }
}

/// Encodes cursors into the file format.
pub fn encode(cursors: Vec<StreamCursor>) -> Vec<u8> {
    let body = Checkpoint { version: VERSION as u32, cursors }.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

/// Decodes the file format; `Err(reason)` when any check fails.
pub fn decode(bytes: &[u8]) -> Result<Vec<StreamCursor>, String> {
    if bytes.len() < HEADER {
        return Err(format!("{} bytes is shorter than the {HEADER}-byte header", bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let len = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(format!("body is {} bytes, header says {len}", body.len()));
    }
    if Sha256::digest(body).as_slice() != &bytes[10..42] {
        return Err("checksum mismatch".into());
    }
    let checkpoint = Checkpoint::decode(body).map_err(|e| format!("body does not decode: {e}"))?;
    Ok(checkpoint.cursors)
}

/// A checkpoint file.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl CheckpointFile {
    pub fn new(path: impl Into<PathBuf>) -> CheckpointFile {
        CheckpointFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: self.path.clone(), source }
    }

    /// The stored cursors; `Ok(None)` when there is no file yet.
    pub fn load(&self) -> Result<Option<Vec<StreamCursor>>, CheckpointError> {
        match fs::read(&self.path) {
            Ok(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|reason| CheckpointError::Corrupt { path: self.path.clone(), reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Moves a corrupt file aside (`<file>.corrupt-<unix ms>`) and returns where it went.
    pub fn set_aside(&self) -> Result<PathBuf, CheckpointError> {
        let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".corrupt-{millis}"));
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).map_err(|e| self.io(e))?;
        Ok(aside)
    }

    /// Writes atomically: temp file, fsync, rename, fsync the directory.
    pub fn store(&self, cursors: Vec<StreamCursor>) -> Result<(), CheckpointError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| self.io(e))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp).map_err(|e| self.io(e))?;
        file.write_all(&encode(cursors)).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| self.io(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cursor(stream: &str, seq: u64) -> StreamCursor {
        StreamCursor { stream_id: stream.into(), epoch: 1, seq, chain_hash: vec![seq as u8; 32], updated_at_micros: 5 }
    }

    #[test]
    fn stores_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = CheckpointFile::new(dir.path().join("sub/cp"));
        assert!(file.load().unwrap().is_none());
        file.store(vec![cursor("a", 3), cursor("b", 9)]).unwrap();
        assert_eq!(file.load().unwrap().unwrap(), vec![cursor("a", 3), cursor("b", 9)]);
        file.store(vec![cursor("a", 4)]).unwrap();
        assert_eq!(file.load().unwrap().unwrap(), vec![cursor("a", 4)]);
    }

    #[test]
    fn corrupt_files_are_reported_and_set_aside_never_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = CheckpointFile::new(dir.path().join("cp"));
        for garbage in [&b""[..], b"KHCP", b"not a checkpoint at all, really not", &[0u8; 64]] {
            fs::write(file.path(), garbage).unwrap();
            assert!(matches!(file.load(), Err(CheckpointError::Corrupt { .. })), "{garbage:?}");
        }
        let mut good = encode(vec![cursor("a", 1)]);
        let last = good.len() - 1;
        good[last] ^= 1;
        fs::write(file.path(), &good).unwrap();
        let err = file.load().unwrap_err();
        assert_eq!(err.code(), "checkpoint_corrupt");
        let aside = file.set_aside().unwrap();
        assert!(aside.exists() && !file.path().exists());
        assert!(file.load().unwrap().is_none());
    }

    proptest! {
        #[test]
        fn any_single_byte_flip_is_detected(seq in 0u64..1000, at in 0usize..200, bit in 0u8..8) {
            let mut bytes = encode(vec![cursor("runtime.run.1.events", seq)]);
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(decode(&bytes).is_err());
        }
    }
}

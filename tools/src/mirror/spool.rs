//! Stdin made replayable: a thread copies what arrives on stdin into append-only JSONL
//! segment files under `<state dir>/spool/`, and the mirror reads those files, never the
//! pipe. Lines become visible to the mirror only once fsynced, so anything the mirror
//! publishes can be read again after a crash; whole segments are deleted once the durable
//! cursor has passed them. A file is never rewritten: each run appends to a new segment.
//!
//! Stdin itself cannot be replayed, so what was read from the pipe but not yet fsynced
//! when the mirror dies is lost; a writer that must not lose anything writes a file (or
//! the outbox) and lets the mirror read that.

use super::cursor::{sync_dir, tail_check, CursorFile, Saved};
use super::error::{MirrorError, Result};
use super::event::{Limits, Parser};
use super::source::{LineReader, Mark, Read, Record, Source, Step};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The cursor's `source` for the spool.
const SPOOL_ID: &str = "stdin-spool";
/// Fsync at least this often while stdin keeps delivering.
const SYNC_BYTES: u64 = 8 << 20;

/// What the writer has made durable so far.
#[derive(Debug, Default)]
struct Tail {
    segment: u64,
    /// Fsynced length of `segment`.
    len: u64,
    /// Lines fsynced by this run.
    lines: u64,
    eof: bool,
    error: Option<String>,
}

type Shared = Arc<(Mutex<Tail>, Condvar)>;

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.jsonl"))
}

/// The segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>> {
    let entries = std::fs::read_dir(dir).map_err(|e| MirrorError::io(format!("listing {}", dir.display()), e))?;
    let mut found: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".jsonl")).and_then(|n| n.parse().ok()))
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Whether `fd` has data (or EOF) to read right now.
fn ready(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout.
    unsafe { libc::poll(&mut poll, 1, 0) > 0 }
}

/// The stdin source: the spool segments, fed by a writer thread.
pub struct SpoolSource {
    dir: PathBuf,
    shared: Shared,
    reader: LineReader,
    cursor: CursorFile,
    start: Mark,
    /// Lines in old segments after the cursor, counted at open (for the lag gauge).
    old_lines: u64,
    parser: Parser,
}

impl SpoolSource {
    /// Opens the spool in `state_dir` and starts copying `input` into a new segment,
    /// rotating to a new one every `rotate_bytes`.
    pub fn open<R: std::io::Read + AsRawFd + Send + 'static>(state_dir: &Path, input: R, rotate_bytes: u64, limits: Limits) -> Result<SpoolSource> {
        let dir = state_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(|e| MirrorError::io(format!("creating {}", dir.display()), e))?;
        let cursor = CursorFile::new(state_dir);
        let saved = cursor.load()?;
        if let Some(saved) = saved.as_ref().filter(|s| s.source != SPOOL_ID) {
            return Err(MirrorError::CursorMismatch { path: cursor.path().into(), expected: SPOOL_ID.into(), found: saved.source.clone() });
        }
        // Segments of earlier runs that got no input are dropped.
        for segment in segments(&dir)? {
            let path = segment_path(&dir, segment);
            if saved.as_ref().is_none_or(|c| c.mark.segment != segment) && std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                std::fs::remove_file(&path).map_err(|e| MirrorError::io(format!("deleting {}", path.display()), e))?;
            }
        }
        let existing = segments(&dir)?;
        let next_segment = existing.last().map_or(1, |last| last + 1).max(saved.as_ref().map_or(0, |s| s.mark.segment + 1));
        let start = match &saved {
            Some(saved) => saved.mark,
            None => Mark { segment: existing.first().copied().unwrap_or(next_segment), offset: 0, line: 0 },
        };
        let mut old_lines = 0;
        for &segment in existing.iter().filter(|s| **s >= start.segment) {
            let bytes = std::fs::read(segment_path(&dir, segment)).map_err(|e| MirrorError::io("reading the spool", e))?;
            let from = if segment == start.segment { start.offset as usize } else { 0 };
            old_lines += bytes.get(from..).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count() as u64);
        }
        // The writer's first segment exists before the reader may need it.
        let first = File::create(segment_path(&dir, next_segment)).map_err(|e| MirrorError::io("creating a spool segment", e))?;
        sync_dir(&dir)?;
        let reader = LineReader::open(&segment_path(&dir, start.segment), start)?;
        if let Some(saved) = &saved {
            let check = tail_check(reader.file(), start.offset).map_err(|e| MirrorError::io("reading the spool", e))?;
            if check != saved.check {
                return Err(MirrorError::InputChanged { path: segment_path(&dir, start.segment), offset: start.offset, detail: "the spooled bytes before it differ".into() });
            }
        }
        let shared: Shared = Arc::new((Mutex::new(Tail { segment: next_segment, ..Tail::default() }), Condvar::new()));
        let writer = Writer { dir: dir.clone(), shared: shared.clone(), segment: next_segment, file: first, len: 0, rotate_bytes, unsynced: 0, lines: 0 };
        std::thread::Builder::new()
            .name("khala-mirror-spool".into())
            .spawn(move || writer.run(input))
            .map_err(|e| MirrorError::io("starting the spool thread", e))?;
        Ok(SpoolSource { dir, shared, reader, cursor, start, old_lines, parser: Parser::new(limits) })
    }

    /// The first segment after `segment` that exists (the live one always does).
    fn next_segment(&self, segment: u64) -> u64 {
        let live = self.shared.0.lock().map(|t| t.segment).unwrap_or(segment + 1);
        (segment + 1..live).find(|s| segment_path(&self.dir, *s).exists()).unwrap_or(live.max(segment + 1))
    }

    fn move_to(&mut self, segment: u64) -> Result<()> {
        let pos = Mark { segment, offset: 0, line: self.reader.pos.line };
        self.reader = LineReader::open(&segment_path(&self.dir, segment), pos)?;
        Ok(())
    }
}

impl Source for SpoolSource {
    fn describe(&self) -> String {
        format!("stdin (spooled in {})", self.dir.display())
    }

    fn start(&self) -> Mark {
        self.start
    }

    fn read(&mut self, max: usize, wait: Duration) -> Result<Read> {
        let mut records: Vec<Record> = Vec::new();
        while records.len() < max {
            let (tail_segment, tail_len, eof) = {
                let tail = self.shared.0.lock().map_err(|_| MirrorError::Internal("spool lock poisoned".into()))?;
                if let Some(error) = &tail.error {
                    return Err(MirrorError::io("spooling stdin", std::io::Error::other(error.clone())));
                }
                (tail.segment, tail.len, tail.eof)
            };
            let segment = self.reader.pos.segment;
            // A sealed segment is read to its end, a torn last line included (it then
            // fails to parse and is dead-lettered); the live one up to what is fsynced.
            let step = if segment < tail_segment { self.reader.next(None, true, &mut self.parser)? } else { self.reader.next(Some(tail_len), false, &mut self.parser)? };
            match step {
                Step::Line(record) => records.push(record),
                Step::AtEnd | Step::Partial if segment < tail_segment => self.move_to(self.next_segment(segment))?,
                Step::AtEnd | Step::Partial => {
                    if !records.is_empty() {
                        break;
                    }
                    if eof {
                        return Ok(Read::End);
                    }
                    let (lock, signal) = &*self.shared;
                    let tail = lock.lock().map_err(|_| MirrorError::Internal("spool lock poisoned".into()))?;
                    if tail.segment == tail_segment && tail.len == tail_len && !tail.eof {
                        let _ = signal.wait_timeout(tail, wait);
                    }
                    return Ok(Read::Idle);
                }
            }
        }
        Ok(Read::Records(records))
    }

    fn rewind(&mut self, to: Mark) -> Result<()> {
        // `persist` deletes a segment once the cursor is at its very end; then the
        // position is the start of the next one.
        let to = match segment_path(&self.dir, to.segment).exists() {
            true => to,
            false => Mark { segment: self.next_segment(to.segment), offset: 0, line: to.line },
        };
        self.reader = LineReader::open(&segment_path(&self.dir, to.segment), to)?;
        Ok(())
    }

    fn persist(&mut self, durable: Mark) -> Result<()> {
        let live = self.shared.0.lock().map(|t| t.segment).unwrap_or(0);
        let len = std::fs::metadata(segment_path(&self.dir, durable.segment)).map(|m| m.len()).unwrap_or(0);
        // At the very end of a sealed segment, the cursor moves to the next one, so that
        // the finished segment can go.
        let durable = if durable.segment < live && durable.offset >= len { Mark { segment: self.next_segment(durable.segment), offset: 0, line: durable.line } } else { durable };
        let file = File::open(segment_path(&self.dir, durable.segment)).map_err(|e| MirrorError::io("opening the spool", e))?;
        let check = tail_check(&file, durable.offset).map_err(|e| MirrorError::io("reading the spool", e))?;
        self.cursor.save(&Saved { source: SPOOL_ID.into(), mark: durable, check })?;
        let done: Vec<u64> = segments(&self.dir)?.into_iter().filter(|s| *s < durable.segment).collect();
        for segment in &done {
            let path = segment_path(&self.dir, *segment);
            std::fs::remove_file(&path).map_err(|e| MirrorError::io(format!("deleting {}", path.display()), e))?;
        }
        if !done.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn head(&self) -> u64 {
        let written = self.shared.0.lock().map(|t| t.lines).unwrap_or(0);
        self.start.line + self.old_lines + written
    }
}

/// The thread that copies stdin into the spool.
struct Writer {
    dir: PathBuf,
    shared: Shared,
    segment: u64,
    file: File,
    len: u64,
    rotate_bytes: u64,
    unsynced: u64,
    lines: u64,
}

impl Writer {
    fn run<R: std::io::Read + AsRawFd>(mut self, mut input: R) {
        if let Err(e) = self.copy(&mut input) {
            let (lock, signal) = &*self.shared;
            if let Ok(mut tail) = lock.lock() {
                tail.error = Some(e.to_string());
            }
            signal.notify_all();
        }
    }

    fn copy<R: std::io::Read + AsRawFd>(&mut self, input: &mut R) -> std::io::Result<()> {
        let fd = input.as_raw_fd();
        let mut buf = vec![0u8; 1 << 20];
        // Bytes read but not yet written: only whole lines go to disk.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let eof = n == 0;
            pending.extend_from_slice(&buf[..n]);
            if eof && pending.last().is_some_and(|b| *b != b'\n') {
                pending.push(b'\n');
            }
            if let Some(cut) = pending.iter().rposition(|b| *b == b'\n') {
                self.write_lines(&pending[..=cut])?;
                pending.drain(..=cut);
            }
            // Fsync when about to wait for stdin, at the end, or every SYNC_BYTES.
            if self.unsynced > 0 && (eof || self.unsynced >= SYNC_BYTES || !ready(fd)) {
                self.sync()?;
            }
            if eof {
                self.publish(true);
                return Ok(());
            }
        }
    }

    /// Appends whole lines, moving to a new segment whenever one reaches `rotate_bytes`.
    fn write_lines(&mut self, mut rest: &[u8]) -> std::io::Result<()> {
        while !rest.is_empty() {
            let room = self.rotate_bytes.saturating_sub(self.len).max(1) as usize;
            let window = &rest[..room.min(rest.len())];
            let cut = window.iter().rposition(|b| *b == b'\n').or_else(|| rest.iter().position(|b| *b == b'\n')).unwrap_or(rest.len() - 1);
            self.file.write_all(&rest[..=cut])?;
            self.len += cut as u64 + 1;
            self.unsynced += cut as u64 + 1;
            self.lines += rest[..=cut].iter().filter(|b| **b == b'\n').count() as u64;
            rest = &rest[cut + 1..];
            if self.len >= self.rotate_bytes {
                self.sync()?;
                self.rotate()?;
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.unsynced = 0;
        self.publish(false);
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.segment += 1;
        self.file = OpenOptions::new().create_new(true).append(true).open(segment_path(&self.dir, self.segment))?;
        File::open(&self.dir)?.sync_all()?;
        self.len = 0;
        self.publish(false);
        Ok(())
    }

    fn publish(&self, eof: bool) {
        let (lock, signal) = &*self.shared;
        if let Ok(mut tail) = lock.lock() {
            tail.segment = self.segment;
            tail.len = self.len;
            tail.lines = self.lines;
            tail.eof = eof;
        }
        signal.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 1024, mapping: &crate::mirror::mapping::DEFAULT_MAPPING };

    fn read_all(source: &mut SpoolSource) -> Vec<u64> {
        let mut seqs = Vec::new();
        loop {
            match source.read(7, Duration::from_millis(50)).unwrap() {
                Read::Records(records) => seqs.extend(records.iter().map(|r| r.parsed.as_ref().map(|e| e.seq).unwrap_or(0))),
                Read::Idle => continue,
                Read::End => return seqs,
            }
        }
    }

    fn input(dir: &Path, from: u64, to: u64, tail: &str) -> File {
        let path = dir.join(format!("stdin-{from}"));
        let text: String = (from..=to).map(|s| format!("{{\"topic\":\"t\",\"seq\":{s},\"kind\":\"k\"}}\n")).collect::<String>() + tail;
        std::fs::write(&path, text).unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn spools_rotates_resumes_and_deletes_passed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        // A last line without a newline is taken whole.
        let mut source = SpoolSource::open(&state, input(dir.path(), 1, 40, "{\"topic\":\"t\",\"seq\":41,\"kind\":\"k\"}"), 300, LIMITS).unwrap();
        assert_eq!(read_all(&mut source), (1..=41).collect::<Vec<_>>());
        let segments_before = segments(&state.join("spool")).unwrap();
        assert!(segments_before.len() > 3, "{segments_before:?}");

        // Durable through seq 20: a new run replays from there, then reads its own stdin.
        source.rewind(source.start()).unwrap();
        let mut through_20 = Mark::default();
        while through_20.line < 20 {
            if let Read::Records(r) = source.read(1, Duration::ZERO).unwrap() {
                through_20 = r[0].end;
            }
        }
        source.persist(through_20).unwrap();
        let left = segments(&state.join("spool")).unwrap();
        assert!(left.iter().all(|s| *s >= through_20.segment) && left.len() < segments_before.len());
        drop(source);
        let mut again = SpoolSource::open(&state, input(dir.path(), 42, 45, ""), 300, LIMITS).unwrap();
        assert_eq!(again.start().line, 20);
        assert_eq!(read_all(&mut again), (21..=45).collect::<Vec<_>>());
        assert_eq!(again.head(), 45);
    }
}

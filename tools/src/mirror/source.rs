//! Where authority events come from, behind one interface: read in order, rewind to the
//! durable cursor, persist the durable cursor. Rewinding is what makes the mirror
//! lossless: after any failure it reads again from the last position known durable in
//! the module, so every source must be replayable from there (a file is; stdin is made
//! so by the spool in [`super::spool`]; the outbox keeps its rows).
//!
//! This file holds the interface and the JSONL file source.

use super::cursor::{check_of, tail_bytes, tail_check, CursorFile, Saved, CHECK_BYTES};
use super::error::{MirrorError, Result};
use super::event::{Bad, Event, Limits, Parser};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A position in a source: everything before it has been read. Ordered.
///
/// Files: `segment` 0, `offset` the byte offset, `line` the lines read. The stdin spool:
/// the segment file number, the byte offset in it, and the lines read over all
/// segments. The outbox: `offset` and `line` are both the last outbox id read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark {
    pub segment: u64,
    pub offset: u64,
    pub line: u64,
}

/// Where a record came from, as the dead-letter file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// 1-based line number (of the file, or of the stdin spool).
    Line(u64),
    OutboxId(i64),
}

/// One input event, checked, or refused with the raw text it came from.
#[derive(Debug, Clone)]
pub struct Record {
    /// The position right after this record.
    pub end: Mark,
    pub origin: Origin,
    pub parsed: Result<Event, (Bad, String)>,
}

/// What a read gave.
#[derive(Debug)]
pub enum Read {
    Records(Vec<Record>),
    /// Nothing new yet (a followed source).
    Idle,
    /// The input has ended and everything was read.
    End,
}

/// A replayable, ordered source of authority events.
pub trait Source {
    /// A name for logs and the summary.
    fn describe(&self) -> String;
    /// The durable cursor found when the source was opened.
    fn start(&self) -> Mark;
    /// Up to `max` records after the read position; waits at most `wait` for new ones.
    fn read(&mut self, max: usize, wait: Duration) -> Result<Read>;
    /// Moves the read position back to `to` (a durable cursor).
    fn rewind(&mut self, to: Mark) -> Result<()>;
    /// Records `durable` as the durable cursor; everything before it may be dropped. A
    /// source may record an earlier position instead (the file source records the last
    /// one it can check, see [`FileSource`]): resuming there reads again what the module
    /// already holds, which it skips.
    fn persist(&mut self, durable: Mark) -> Result<()>;
    /// The source's head in the unit of `Mark::line`, for the lag gauge.
    fn head(&self) -> u64;
    /// The source's current size in the unit of `Mark::offset`, when it has one (a file's
    /// length), so that progress can show how much of a backlog is mirrored.
    fn size(&self) -> Option<u64> {
        None
    }
}

/// Reads whole lines of one file from a byte offset, counting them.
pub struct LineReader {
    path: PathBuf,
    reader: BufReader<File>,
    pub pos: Mark,
    buf: Vec<u8>,
    /// The (up to) [`CHECK_BYTES`] bytes before `pos`, as they were read: a cursor's check
    /// is made of these, so that a file rewritten under the reader cannot lend it the
    /// new bytes.
    tail: Vec<u8>,
}

/// One step of a [`LineReader`].
pub enum Step {
    Line(Record),
    /// A fragment without its newline at `limit` (or at the end of the file).
    Partial,
    AtEnd,
}

impl LineReader {
    pub fn open(path: &Path, pos: Mark) -> Result<LineReader> {
        let file = File::open(path).map_err(|e| MirrorError::io(format!("opening {}", path.display()), e))?;
        let mut reader = LineReader { path: path.into(), reader: BufReader::with_capacity(1 << 20, file), pos, buf: Vec::new(), tail: Vec::new() };
        reader.seek(pos)?;
        Ok(reader)
    }

    /// Moves to `pos`, taking the bytes before it from the file as it is now.
    pub fn seek(&mut self, pos: Mark) -> Result<()> {
        self.reposition(pos)?;
        self.tail = tail_bytes(self.file(), pos.offset).map_err(|e| MirrorError::io(format!("reading {}", self.path.display()), e))?;
        Ok(())
    }

    /// Moves back to `pos`, the position whose bytes before it are in `tail` already.
    fn reposition(&mut self, pos: Mark) -> Result<()> {
        self.reader.seek(SeekFrom::Start(pos.offset)).map_err(|e| MirrorError::io(format!("seeking in {}", self.path.display()), e))?;
        self.pos = pos;
        Ok(())
    }

    pub fn file(&self) -> &File {
        self.reader.get_ref()
    }

    /// The (up to) [`CHECK_BYTES`] bytes before the read position, as they were read.
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    fn remember(tail: &mut Vec<u8>, read: &[u8]) {
        let keep = CHECK_BYTES as usize;
        if read.len() >= keep {
            tail.clear();
            tail.extend_from_slice(&read[read.len() - keep..]);
        } else {
            tail.drain(..(tail.len() + read.len()).saturating_sub(keep));
            tail.extend_from_slice(read);
        }
    }

    /// The next line ending before `limit` bytes (`None`: the end of the file).
    /// `accept_partial` takes a last line without a newline as a line.
    pub fn next(&mut self, limit: Option<u64>, accept_partial: bool, parser: &mut Parser) -> Result<Step> {
        loop {
            if limit.is_some_and(|l| self.pos.offset >= l) {
                return Ok(Step::AtEnd);
            }
            self.buf.clear();
            let n = self.reader.read_until(b'\n', &mut self.buf).map_err(|e| MirrorError::io(format!("reading {}", self.path.display()), e))?;
            if n == 0 {
                return Ok(Step::AtEnd);
            }
            let complete = self.buf.last() == Some(&b'\n');
            let past_limit = limit.is_some_and(|l| self.pos.offset + n as u64 > l);
            if (!complete && !accept_partial) || past_limit {
                self.reposition(self.pos)?;
                return Ok(Step::Partial);
            }
            self.pos.offset += n as u64;
            self.pos.line += 1;
            Self::remember(&mut self.tail, &self.buf);
            let text = trim_line(&self.buf);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let origin = Origin::Line(self.pos.line);
            let parsed = parser.parse_line(text, origin).map_err(|bad| (bad, String::from_utf8_lossy(text).into_owned()));
            return Ok(Step::Line(Record { end: self.pos, origin, parsed }));
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A JSONL file, read in place; with `follow`, lines appended later are read too.
///
/// Its cursor carries a check of the bytes before it, so that resuming on a file that
/// changed below the cursor is refused. That check is taken from the bytes as they were
/// read, at the end of each read (`read_checks`), never from the file at persist time: a
/// file rewritten in place below the cursor would have lent the cursor its new bytes and
/// hidden the change from the next start. So the cursor written is the last such
/// position at or before the durable one, and persisting compares the file with it: a
/// rewrite found there stops the mirror as `input_changed`.
pub struct FileSource {
    id: String,
    reader: LineReader,
    cursor: CursorFile,
    start: Mark,
    follow: bool,
    parser: Parser,
    /// Positions reached at the end of a read, oldest first, with the check of the bytes
    /// before each as read; the first is at or before the durable cursor.
    read_checks: VecDeque<(Mark, String)>,
    /// The position in the cursor file.
    persisted: Option<Mark>,
}

impl FileSource {
    /// Opens `path`, resuming at the cursor in `state_dir` after checking that it belongs
    /// to this file and that the bytes before it are unchanged.
    pub fn open(path: &Path, state_dir: &Path, follow: bool, limits: Limits) -> Result<FileSource> {
        let abs = std::fs::canonicalize(path).map_err(|e| MirrorError::io(format!("opening the input {}", path.display()), e))?;
        let id = format!("file:{}", abs.display());
        let cursor = CursorFile::new(state_dir);
        let saved = cursor.load()?;
        if let Some(saved) = saved.as_ref().filter(|s| s.source != id) {
            return Err(MirrorError::CursorMismatch { path: cursor.path().into(), expected: id, found: saved.source.clone() });
        }
        let start = saved.as_ref().map(|s| s.mark).unwrap_or_default();
        let reader = LineReader::open(&abs, start)?;
        let len = reader.file().metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(saved) = &saved {
            let changed = |detail: String| MirrorError::InputChanged { path: abs.clone(), offset: start.offset, detail };
            if len < start.offset {
                return Err(changed(format!("the file now has {len} bytes")));
            }
            if check_of(reader.tail()) != saved.check {
                return Err(changed("the bytes before it differ".into()));
            }
        }
        let read_checks = VecDeque::from([(start, check_of(reader.tail()))]);
        Ok(FileSource { id, reader, cursor, start, follow, parser: Parser::new(limits), read_checks, persisted: saved.map(|s| s.mark) })
    }

    /// Notes the read position with the check of the bytes before it, as read.
    fn note_read_position(&mut self) {
        if self.read_checks.back().is_none_or(|(mark, _)| *mark != self.reader.pos) {
            self.read_checks.push_back((self.reader.pos, check_of(self.reader.tail())));
        }
    }

    /// Following, at the end of what was written: the file must still be the one read.
    /// Truncated (`copytruncate`), the reader waited at its old offset and took up the
    /// new content half way, dead-lettering a fragment and skipping the rest; replaced
    /// under its name (rotated), the reader followed the old file for ever. Either stops
    /// the mirror as `input_changed`; a rotating log belongs on stdin, which is spooled.
    fn check_followed(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = &self.reader.path;
        let io = |e| MirrorError::io(format!("checking the input {}", path.display()), e);
        let changed = |detail: String| MirrorError::InputChanged { path: path.clone(), offset: self.reader.pos.offset, detail };
        let read = self.reader.file().metadata().map_err(io)?;
        if read.len() < self.reader.pos.offset {
            return Err(changed(format!("it was truncated to {} bytes while followed", read.len())));
        }
        match std::fs::metadata(path) {
            Ok(named) if (named.dev(), named.ino()) != (read.dev(), read.ino()) => Err(changed("another file took its name while followed (rotated)".into())),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(changed("it was removed while followed".into())),
            Err(e) => Err(io(e)),
        }
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.id.clone()
    }

    fn start(&self) -> Mark {
        self.start
    }

    fn read(&mut self, max: usize, wait: Duration) -> Result<Read> {
        let mut records = Vec::new();
        while records.len() < max {
            match self.reader.next(None, !self.follow, &mut self.parser)? {
                Step::Line(record) => records.push(record),
                Step::Partial | Step::AtEnd => break,
            }
        }
        self.note_read_position();
        if !records.is_empty() {
            return Ok(Read::Records(records));
        }
        if !self.follow {
            return Ok(Read::End);
        }
        self.check_followed()?;
        std::thread::sleep(wait.min(Duration::from_millis(100)));
        Ok(Read::Idle)
    }

    fn rewind(&mut self, to: Mark) -> Result<()> {
        self.read_checks.retain(|(mark, _)| *mark <= to);
        self.reader.seek(to)
    }

    fn persist(&mut self, durable: Mark) -> Result<()> {
        while self.read_checks.get(1).is_some_and(|(mark, _)| *mark <= durable) {
            self.read_checks.pop_front();
        }
        let Some((mark, check)) = self.read_checks.front().filter(|(mark, _)| *mark <= durable).cloned() else {
            return Ok(());
        };
        if self.persisted == Some(mark) {
            return Ok(());
        }
        let path = &self.reader.path;
        let changed = |detail: String| MirrorError::InputChanged { path: path.clone(), offset: mark.offset, detail };
        let len = self.reader.file().metadata().map_err(|e| MirrorError::io("reading the input", e))?.len();
        if len < mark.offset {
            return Err(changed(format!("it was truncated to {len} bytes while read")));
        }
        if tail_check(self.reader.file(), mark.offset).map_err(|e| MirrorError::io("reading the input", e))? != check {
            return Err(changed("the bytes before it were rewritten in place while read".into()));
        }
        self.cursor.save(&Saved { source: self.id.clone(), mark, check })?;
        self.persisted = Some(mark);
        Ok(())
    }

    fn head(&self) -> u64 {
        self.reader.pos.line
    }

    fn size(&self) -> Option<u64> {
        self.reader.file().metadata().ok().map(|m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 1024, mapping: &crate::mirror::mapping::DEFAULT_MAPPING };

    fn lines(source: &mut dyn Source) -> Vec<(u64, bool)> {
        lines_up_to(source, 100)
    }

    fn lines_up_to(source: &mut dyn Source, max: usize) -> Vec<(u64, bool)> {
        match source.read(max, Duration::ZERO).unwrap() {
            Read::Records(r) => r.iter().map(|r| (r.end.line, r.parsed.is_ok())).collect(),
            _ => vec![],
        }
    }

    /// A temp dir holding the input file's path (not created) and a state directory.
    fn input_and_state_dir() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        (dir, input, state)
    }

    #[test]
    fn a_followed_file_truncated_or_rotated_stops_the_mirror() {
        let (dir, input, state) = input_and_state_dir();
        let line = |seq: u64| format!("{{\"topic\":\"t\",\"seq\":{seq},\"kind\":\"k\"}}\n");
        std::fs::write(&input, line(1) + &line(2)).unwrap();
        let mut source = FileSource::open(&input, &state, true, LIMITS).unwrap();
        assert_eq!(lines(&mut source), vec![(1, true), (2, true)]);
        assert!(matches!(source.read(10, Duration::ZERO).unwrap(), Read::Idle));
        // Appended to: read on.
        std::fs::OpenOptions::new().append(true).open(&input).and_then(|mut f| std::io::Write::write_all(&mut f, line(3).as_bytes())).unwrap();
        assert_eq!(lines(&mut source), vec![(3, true)]);
        // copytruncate: the file starts over under the reader.
        std::fs::write(&input, line(4)).unwrap();
        let Err(MirrorError::InputChanged { detail, .. }) = source.read(10, Duration::ZERO) else { panic!("a truncated file was followed on") };
        assert!(detail.contains("truncated"), "{detail}");
        // Rotated: renamed away, and a new file takes the name.
        std::fs::write(&input, line(1) + &line(2)).unwrap();
        let state2 = dir.path().join("state2");
        std::fs::create_dir(&state2).unwrap();
        let mut source = FileSource::open(&input, &state2, true, LIMITS).unwrap();
        assert_eq!(lines(&mut source), vec![(1, true), (2, true)]);
        std::fs::rename(&input, dir.path().join("in.jsonl.1")).unwrap();
        std::fs::write(&input, line(3)).unwrap();
        let Err(MirrorError::InputChanged { detail, .. }) = source.read(10, Duration::ZERO) else { panic!("a rotated file was followed on") };
        assert!(detail.contains("rotated"), "{detail}");
    }

    #[test]
    fn reads_resumes_and_refuses_another_file() {
        let (dir, input, state) = input_and_state_dir();
        std::fs::write(&input, "{\"topic\":\"t\",\"seq\":1,\"kind\":\"k\"}\n\nnope\n{\"topic\":\"t\",\"seq\":2,\"kind\":\"k\"}").unwrap();
        let mut source = FileSource::open(&input, &state, false, LIMITS).unwrap();
        assert_eq!(lines_up_to(&mut source, 1), vec![(1, true)]);
        assert_eq!(lines(&mut source), vec![(3, false), (4, true)]);
        assert!(matches!(source.read(10, Duration::ZERO).unwrap(), Read::End));
        source.persist(Mark { segment: 0, offset: 33, line: 1 }).unwrap();
        source.rewind(Mark { segment: 0, offset: 33, line: 1 }).unwrap();
        assert_eq!(lines(&mut source), vec![(3, false), (4, true)]);

        let mut again = FileSource::open(&input, &state, false, LIMITS).unwrap();
        assert_eq!(again.start().line, 1);
        assert_eq!(lines(&mut again), vec![(3, false), (4, true)]);

        let other = dir.path().join("other.jsonl");
        std::fs::write(&other, "").unwrap();
        assert!(matches!(FileSource::open(&other, &state, false, LIMITS), Err(MirrorError::CursorMismatch { .. })));
        std::fs::write(&input, "{\"topic\":\"X\",\"seq\":1,\"kind\":\"k\"}\n").unwrap();
        assert!(matches!(FileSource::open(&input, &state, false, LIMITS), Err(MirrorError::InputChanged { .. })));
    }

    #[test]
    fn a_file_rewritten_in_place_below_the_cursor_is_caught_not_lent_to_the_cursor() {
        let (_dir, input, state) = input_and_state_dir();
        let line = |topic: &str, seq: u64| format!("{{\"topic\":\"{topic}\",\"seq\":{seq},\"kind\":\"k\"}}\n");
        std::fs::write(&input, line("a", 1) + &line("a", 2) + &line("a", 3)).unwrap();
        let mut source = FileSource::open(&input, &state, true, LIMITS).unwrap();
        assert_eq!(lines_up_to(&mut source, 2), vec![(1, true), (2, true)]);
        let after_two = Mark { segment: 0, offset: 66, line: 2 };
        // A durable position between two reads: the cursor written is the last position
        // a read ended at (its check is of the bytes as read), here the file's start.
        assert_eq!(lines_up_to(&mut source, 1), vec![(3, true)]);
        source.persist(Mark { segment: 0, offset: 33, line: 1 }).unwrap();
        assert_eq!(CursorFile::new(&state).load().unwrap().map(|s| s.mark), Some(Mark::default()));
        source.persist(after_two).unwrap();
        assert_eq!(CursorFile::new(&state).load().unwrap().map(|s| s.mark), Some(after_two));
        // Rewritten in place, the same length, below the next durable position: the
        // file's bytes would have made a cursor that a restart accepts.
        std::fs::write(&input, line("b", 1) + &line("b", 2) + &line("b", 3)).unwrap();
        let end = Mark { segment: 0, offset: 99, line: 3 };
        let Err(MirrorError::InputChanged { detail, offset, .. }) = source.persist(end) else { panic!("a file rewritten below the cursor was persisted") };
        assert_eq!((offset, detail.contains("rewritten")), (99, true), "{detail}");
        assert_eq!(CursorFile::new(&state).load().unwrap().map(|s| s.mark), Some(after_two));
        // And a restart on it is refused too: the saved check is of the bytes read.
        assert!(matches!(FileSource::open(&input, &state, true, LIMITS), Err(MirrorError::InputChanged { .. })));
    }

    #[test]
    fn a_followed_file_waits_for_the_end_of_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, "{\"topic\":\"t\",\"seq\":1,\"kind\":\"k\"}\n{\"topic\":\"t\",").unwrap();
        let mut source = FileSource::open(&input, dir.path(), true, LIMITS).unwrap();
        assert_eq!(lines(&mut source), vec![(1, true)]);
        assert!(matches!(source.read(10, Duration::ZERO).unwrap(), Read::Idle));
        let mut file = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
        std::io::Write::write_all(&mut file, b"\"seq\":2,\"kind\":\"k\"}\n").unwrap();
        assert_eq!(lines(&mut source), vec![(2, true)]);
    }
}

//! A sandbox's console log on the host: kept bounded, read by position across rotations, and
//! cut into the lines of [`hangar_proto::console`].
//!
//! The runtime (crun, runsc, QEMU) holds `console.log` open with `O_APPEND` for as long as the
//! sandbox runs, across restarts of `hangar serve` (which adopts running sandboxes), so the file
//! cannot be renamed away from under it and reopened. Rotation is copy-truncate instead: the
//! content is copied to `console.log.1` (replacing the previous one) and the file is truncated in
//! place; the runtime's next append lands at the new end. What is appended between the end of
//! the copy and the truncation (one system call's time) is lost; nothing is ever duplicated.
//! `console.log.offset` says how many bytes came before the first byte of `console.log`, so
//! that every byte keeps one position for ever (its "offset"), which is what a reader resumes
//! from.
//!
//! Rotations and reads take one lock, so a reader never sees a log half rotated. Nothing here
//! reads a log whole or holds more than one line of it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hangar_proto::console::{LogLine, LogStream, INIT_TAG};

/// A console's default bound: past it, it is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// The smallest bound taken: a line of the agent's must fit several times.
pub const MIN_MAX_BYTES: u64 = 16 * 1024;
/// How often consoles are checked against their bound. A console may exceed it by what the
/// sandbox writes in this time.
pub const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// The longest line a reader hands out; a longer one (not from `hangar-init`, whose lines are
/// shorter) is cut.
pub const MAX_READ_LINE: usize = 64 * 1024;

/// The consoles of one sandbox service: their bound and the lock rotations and reads share.
#[derive(Clone)]
pub struct Consoles {
    shared: Arc<Shared>,
}

struct Shared {
    max_bytes: u64,
    lock: Mutex<()>,
    /// Counts rotations, so that a reader knows when to open the files again.
    generation: AtomicU64,
}

fn rotated_path(log: &Path) -> PathBuf {
    suffixed(log, ".1")
}

fn offset_path(log: &Path) -> PathBuf {
    suffixed(log, ".offset")
}

fn suffixed(log: &Path, suffix: &str) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn open_existing(path: &Path) -> std::io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// How many bytes came before the first byte of `log` (0 when it was never rotated).
fn read_base(log: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(offset_path(log)) {
        Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

impl Consoles {
    /// Consoles bounded to `max_bytes` each (at least [`MIN_MAX_BYTES`]).
    pub fn new(max_bytes: u64) -> Consoles {
        Consoles {
            shared: Arc::new(Shared {
                max_bytes: max_bytes.max(MIN_MAX_BYTES),
                lock: Mutex::new(()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.shared.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rotates `log` if it is over the bound; returns how many bytes moved to `log.1`.
    pub fn rotate(&self, log: &Path) -> std::io::Result<Option<u64>> {
        match std::fs::metadata(log) {
            Ok(m) if m.len() > self.shared.max_bytes => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        let _guard = self.lock();
        let mut src = match OpenOptions::new().read(true).write(true).open(log) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let base = read_base(log)?;
        let tmp = suffixed(log, ".1.tmp");
        let mut dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        // Reads until the end, including what the runtime appends meanwhile.
        let mut moved = std::io::copy(&mut src, &mut dst)?;
        // A write caught half-copied loses its rest to the truncation: end the rotated file
        // there, so that the next line does not continue it.
        let mut last = [0u8; 1];
        if moved > 0 && dst.read_at(&mut last, moved - 1).is_ok() && last[0] != b'\n' {
            dst.write_all(b"\n")?;
            moved += 1;
        }
        src.set_len(0)?;
        std::fs::rename(&tmp, rotated_path(log))?;
        let tmp = suffixed(log, ".offset.tmp");
        std::fs::write(&tmp, format!("{}\n", base + moved))?;
        std::fs::rename(&tmp, offset_path(log))?;
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(Some(moved))
    }

    /// A reader of `log`, at its start.
    pub fn reader(&self, log: &Path) -> ConsoleReader {
        ConsoleReader {
            consoles: self.clone(),
            path: log.to_path_buf(),
            pos: 0,
            snap: None,
        }
    }
}

/// The files of a console as they were at one generation.
struct Snapshot {
    generation: u64,
    /// The offset of the first byte of `current`.
    base: u64,
    current: Option<File>,
    /// `console.log.1` and the offset of its first byte.
    rotated: Option<(File, u64)>,
}

/// Reads a console by offset, across rotations. Blocking: use it on a blocking thread.
pub struct ConsoleReader {
    consoles: Consoles,
    path: PathBuf,
    pos: u64,
    snap: Option<Snapshot>,
}

impl ConsoleReader {
    /// Opens the files again if a rotation happened since (or the log did not exist yet).
    /// The caller holds the lock.
    fn refresh(&mut self) -> std::io::Result<&Snapshot> {
        let generation = self.consoles.shared.generation.load(Ordering::Acquire);
        let stale = match &self.snap {
            None => true,
            Some(s) => s.generation != generation || s.current.is_none(),
        };
        if stale {
            let base = read_base(&self.path)?;
            let current = open_existing(&self.path)?;
            let rotated = match open_existing(&rotated_path(&self.path))? {
                // Longer than what came before `current`: left by a rotation that a crash cut
                // short, so its offsets are unknown.
                Some(f) => {
                    let len = f.metadata()?.len();
                    (len <= base).then(|| (f, base - len))
                }
                None => None,
            };
            self.snap = Some(Snapshot {
                generation,
                base,
                current,
                rotated,
            });
        }
        Ok(self.snap.as_ref().expect("just set"))
    }

    /// The offsets of the first byte still kept and of the end.
    pub fn span(&mut self) -> std::io::Result<(u64, u64)> {
        let consoles = self.consoles.clone();
        let _guard = consoles.lock();
        let snap = self.refresh()?;
        let len = match &snap.current {
            Some(f) => f.metadata()?.len(),
            None => 0,
        };
        let first = snap.rotated.as_ref().map_or(snap.base, |(_, start)| *start);
        Ok((first, snap.base + len))
    }

    /// The offset of the next byte [`ConsoleReader::read`] returns (unless it is gone by then).
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Reads from the position on; returns the offset of the first byte read (later than the
    /// position when the bytes there were rotated away) and how many were read (0 at the end).
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<(u64, usize)> {
        let consoles = self.consoles.clone();
        let _guard = consoles.lock();
        let pos = self.pos;
        let snap = self.refresh()?;
        let base = snap.base;
        let first = snap.rotated.as_ref().map_or(base, |(_, start)| *start);
        let mut at = pos.max(first);
        if at < base {
            let (f, start) = snap
                .rotated
                .as_ref()
                .expect("first < base means a rotated file");
            let n = f.read_at(buf, at - start)?;
            if n > 0 {
                self.pos = at + n as u64;
                return Ok((at, n));
            }
            at = base;
        }
        let Some(f) = &snap.current else {
            return Ok((at, 0));
        };
        let len = f.metadata()?.len();
        // A position past the end (a client's stale offset) waits at the end.
        at = at.min(base + len);
        let n = f.read_at(buf, at - base)?;
        self.pos = at + n as u64;
        Ok((at, n))
    }

    /// Whether the log is gone with its sandbox's directory.
    pub fn gone(&self) -> bool {
        self.path.parent().is_some_and(|d| !d.exists())
    }
}

/// One line of a console and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    /// The offset of its first byte.
    pub start: u64,
    /// The offset just after its line break (where the next line starts).
    pub end: u64,
    /// Without the line break (or a final `\r`).
    pub bytes: Vec<u8>,
}

/// Cuts what a [`ConsoleReader`] reads into lines, holding at most [`MAX_READ_LINE`] bytes.
pub struct LineSplitter {
    pending: Vec<u8>,
    /// The offset of the first pending byte.
    start: u64,
    /// The offset the next chunk should start at.
    next: u64,
    max: usize,
}

impl LineSplitter {
    /// A splitter whose first chunk starts at `at`.
    pub fn new(at: u64) -> LineSplitter {
        LineSplitter::with_max(at, MAX_READ_LINE)
    }

    fn with_max(at: u64, max: usize) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            start: at,
            next: at,
            max,
        }
    }

    /// Whether a line has started and not ended.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes `data`, read at offset `at`, and appends the lines it completes to `out`. A chunk
    /// that does not follow the last one (bytes were rotated away in between) ends the line
    /// that was pending.
    pub fn push(&mut self, at: u64, data: &[u8], out: &mut Vec<RawLine>) {
        if at != self.next {
            self.flush(out);
            self.start = at;
        }
        self.next = at + data.len() as u64;
        let mut pos = at;
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let complete = piece.ends_with(b"\n");
            let body = if complete {
                &piece[..piece.len() - 1]
            } else {
                piece
            };
            let mut body = body;
            while self.pending.len() + body.len() > self.max {
                let take = self.max - self.pending.len();
                self.pending.extend_from_slice(&body[..take]);
                body = &body[take..];
                let end = pos + take as u64;
                self.emit(end, out);
                pos = end;
            }
            self.pending.extend_from_slice(body);
            pos += body.len() as u64;
            if complete {
                pos += 1;
                self.emit(pos, out);
            }
        }
    }

    /// Ends the pending line, if any, as it is.
    pub fn flush(&mut self, out: &mut Vec<RawLine>) {
        if !self.pending.is_empty() {
            let end = self.start + self.pending.len() as u64;
            self.emit(end, out);
        }
    }

    fn emit(&mut self, end: u64, out: &mut Vec<RawLine>) {
        let mut bytes = std::mem::take(&mut self.pending);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        out.push(RawLine {
            start: self.start,
            end,
            bytes,
        });
        self.start = end;
    }
}

/// What a console line says: `hangar-init`'s stamp and tag, or nothing (a runtime's line).
pub fn parse_line(bytes: &[u8]) -> LogLine {
    let text = String::from_utf8_lossy(bytes);
    if let Some((ts, rest)) = text.split_once(' ') {
        if looks_like_timestamp(ts) {
            let tagged = [
                ("stdout", LogStream::Stdout),
                ("stderr", LogStream::Stderr),
                (INIT_TAG, LogStream::Init),
            ];
            for (tag, stream) in tagged {
                if let Some(after) = rest.strip_prefix(tag) {
                    if after.is_empty() || after.starts_with(' ') {
                        return LogLine {
                            ts: Some(ts.to_owned()),
                            stream,
                            line: after.strip_prefix(' ').unwrap_or(after).to_owned(),
                        };
                    }
                }
            }
        }
    }
    LogLine {
        ts: None,
        stream: LogStream::Console,
        line: text.into_owned(),
    }
}

/// `2026-11-27T10:00:00.123Z`, as `hangar-init` writes it; a cheap check before the parse.
fn looks_like_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[10] == b'T'
        && b[b.len() - 1] == b'Z'
        && humantime::parse_rfc3339(s).is_ok()
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Lines stamped at or after this time; an unstamped line goes with the stamped one
    /// before it.
    pub since: Option<SystemTime>,
    /// Only these streams (all when empty).
    pub streams: Vec<LogStream>,
}

/// A [`Filter`] applied along a log, remembering the last stamp seen.
#[derive(Debug, Clone)]
pub struct Filtering {
    filter: Filter,
    recent: bool,
}

impl Filtering {
    pub fn new(filter: Filter) -> Filtering {
        Filtering {
            filter,
            recent: false,
        }
    }

    pub fn accepts(&mut self, line: &LogLine) -> bool {
        if let Some(since) = self.filter.since {
            if let Some(t) = line
                .ts
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
            {
                self.recent = t >= since;
            }
            if !self.recent {
                return false;
            }
        }
        self.filter.streams.is_empty() || self.filter.streams.contains(&line.stream)
    }
}

/// How far back [`tail_lines`] looks, at most.
const TAIL_SCAN: u64 = 64 * 1024 * 1024;

/// The offset of the first line at or after `pos` (a line that starts before `pos` is
/// skipped whole).
pub fn line_start(reader: &mut ConsoleReader, pos: u64) -> std::io::Result<u64> {
    let (first, end) = reader.span()?;
    if pos <= first {
        return Ok(first);
    }
    if pos >= end {
        return Ok(end);
    }
    reader.seek(pos - 1);
    let mut buf = vec![0u8; 16 * 1024];
    let mut expect = pos - 1;
    loop {
        let (at, n) = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(reader.position());
        }
        if at != expect {
            // Rotated away meanwhile: take what is kept as it comes.
            return Ok(at);
        }
        expect = at + n as u64;
        // The byte before `pos` being a line break means `pos` starts a line.
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
    }
}

/// The offset where the last `n` lines that `filter` accepts begin (the end when there are
/// none), looking at most 64 MiB back.
pub fn tail_lines(reader: &mut ConsoleReader, n: usize, filter: &Filter) -> std::io::Result<u64> {
    let (first, end) = reader.span()?;
    if n == 0 {
        return Ok(end);
    }
    let from = line_start(reader, end.saturating_sub(TAIL_SCAN).max(first))?;
    reader.seek(from);
    let mut splitter = LineSplitter::new(from);
    let mut filtering = Filtering::new(filter.clone());
    let mut starts: VecDeque<u64> = VecDeque::with_capacity(n.min(4096));
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    let mut keep = |lines: &mut Vec<RawLine>, starts: &mut VecDeque<u64>| {
        for l in lines.drain(..) {
            if filtering.accepts(&parse_line(&l.bytes)) {
                if starts.len() == n {
                    starts.pop_front();
                }
                starts.push_back(l.start);
            }
        }
    };
    loop {
        let (at, got) = reader.read(&mut buf)?;
        if got == 0 || at >= end {
            break;
        }
        splitter.push(at, &buf[..got], &mut lines);
        keep(&mut lines, &mut starts);
        if reader.position() >= end {
            break;
        }
    }
    splitter.flush(&mut lines);
    keep(&mut lines, &mut starts);
    Ok(starts.front().copied().unwrap_or(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(max: usize, chunks: &[(u64, &[u8])]) -> Vec<(u64, u64, String)> {
        let mut s = LineSplitter::with_max(chunks.first().map_or(0, |c| c.0), max);
        let mut out = Vec::new();
        for (at, data) in chunks {
            s.push(*at, data, &mut out);
        }
        s.flush(&mut out);
        out.into_iter()
            .map(|l| {
                (
                    l.start,
                    l.end,
                    String::from_utf8_lossy(&l.bytes).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn splitter_keeps_offsets() {
        assert_eq!(
            lines_of(100, &[(10, b"ab\ncd"), (15, b"e\r\n"), (18, b"\nf")]),
            [
                (10, 13, "ab".into()),
                (13, 18, "cde".into()),
                (18, 19, "".into()),
                (19, 20, "f".into()),
            ]
        );
        // A gap ends the pending line; the next chunk starts a new one.
        assert_eq!(
            lines_of(100, &[(0, b"abc"), (50, b"de\n")]),
            [(0, 3, "abc".into()), (50, 53, "de".into())]
        );
        // Long lines are cut; the cut keeps exact offsets.
        assert_eq!(
            lines_of(3, &[(0, b"abcdefg\nh")]),
            [
                (0, 3, "abc".into()),
                (3, 6, "def".into()),
                (6, 8, "g".into()),
                (8, 9, "h".into()),
            ]
        );
        assert_eq!(lines_of(3, &[(0, b"abc\n")]), [(0, 4, "abc".into())]);
    }

    #[test]
    fn parses_what_init_writes() {
        let check = |raw: &str, ts: Option<&str>, stream: LogStream, line: &str| {
            assert_eq!(
                parse_line(raw.as_bytes()),
                LogLine {
                    ts: ts.map(str::to_owned),
                    stream,
                    line: line.to_owned()
                },
                "{raw}"
            );
        };
        let ts = "2026-11-27T10:00:00.123Z";
        check(
            &format!("{ts} stdout hello world"),
            Some(ts),
            LogStream::Stdout,
            "hello world",
        );
        check(
            &format!("{ts} stderr  indented"),
            Some(ts),
            LogStream::Stderr,
            " indented",
        );
        check(&format!("{ts} stdout "), Some(ts), LogStream::Stdout, "");
        check(&format!("{ts} stdout"), Some(ts), LogStream::Stdout, "");
        check(
            &format!("{ts} hangar-init: ready (pid 1)"),
            Some(ts),
            LogStream::Init,
            "ready (pid 1)",
        );
        check(
            &format!("{ts} stdoutx"),
            None,
            LogStream::Console,
            &format!("{ts} stdoutx"),
        );
        check(
            "W1127 10:00:00 runsc warning",
            None,
            LogStream::Console,
            "W1127 10:00:00 runsc warning",
        );
        check(
            "2026-13-99T10:00:00.123Z stdout x",
            None,
            LogStream::Console,
            "2026-13-99T10:00:00.123Z stdout x",
        );
        check("", None, LogStream::Console, "");
        assert_eq!(parse_line(b"bad \xff").line, "bad \u{fffd}");
    }

    #[test]
    fn filters_by_time_and_stream() {
        let at = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let lines = [
            "runsc: starting",
            "2026-11-27T10:00:00.000Z hangar-init: ready",
            "2026-11-27T10:00:01.500Z stdout one",
            "continued by the kernel",
            "2026-11-27T10:00:02.000Z stderr two",
        ];
        let pass = |f: Filter| {
            let mut f = Filtering::new(f);
            lines
                .iter()
                .filter(|l| f.accepts(&parse_line(l.as_bytes())))
                .count()
        };
        assert_eq!(pass(Filter::default()), 5);
        let since = Some(at("2026-11-27T10:00:01Z"));
        assert_eq!(
            pass(Filter {
                since,
                streams: vec![]
            }),
            3
        );
        assert_eq!(
            pass(Filter {
                since,
                streams: vec![LogStream::Stderr]
            }),
            1
        );
        assert_eq!(
            pass(Filter {
                since: None,
                streams: vec![LogStream::Stdout, LogStream::Init]
            }),
            2
        );
    }

    fn append(path: &Path, data: &[u8]) {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(data)
            .unwrap();
    }

    fn read_all(r: &mut ConsoleReader) -> (u64, Vec<u8>) {
        let mut buf = [0u8; 7];
        let mut out = Vec::new();
        let start = r.position();
        let mut first = None;
        loop {
            let (at, n) = r.read(&mut buf).unwrap();
            if n == 0 {
                return (first.unwrap_or(start), out);
            }
            first.get_or_insert(at);
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn rotation_bounds_the_log_and_keeps_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let consoles = Consoles::new(0);
        assert_eq!(consoles.max_bytes(), MIN_MAX_BYTES);
        assert_eq!(consoles.rotate(&log).unwrap(), None, "no log yet");

        // The runtime's descriptor, held open across rotations as crun, runsc and QEMU do.
        let mut runtime = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let line = |i: usize| {
            format!(
                "2026-11-27T10:00:00.000Z stdout line {i:05} {}\n",
                "x".repeat(60)
            )
        };
        let mut reader = consoles.reader(&log);
        let mut follower = consoles.reader(&log);
        let mut followed = Vec::new();
        let mut expected = Vec::new();
        let mut rotations = 0;
        for i in 0..1000 {
            runtime.write_all(line(i).as_bytes()).unwrap();
            expected.extend_from_slice(line(i).as_bytes());
            if i % 50 == 0 {
                followed.extend(read_all(&mut follower).1);
            }
            if consoles.rotate(&log).unwrap().is_some() {
                rotations += 1;
                assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
                assert!(std::fs::metadata(rotated_path(&log)).unwrap().len() > MIN_MAX_BYTES);
            }
            assert!(std::fs::metadata(&log).unwrap().len() <= MIN_MAX_BYTES + 100);
        }
        assert!(rotations >= 5, "{rotations}");
        followed.extend(read_all(&mut follower).1);
        assert_eq!(
            followed, expected,
            "a follower misses nothing across rotations"
        );
        // Appends after a truncation land at the new end, with no hole before them.
        let current = std::fs::read(&log).unwrap();
        assert!(!current.contains(&0u8));

        // A reader that starts now sees what is kept: console.log.1 and console.log.
        let (first, end) = reader.span().unwrap();
        assert_eq!(end, expected.len() as u64);
        let kept = std::fs::metadata(rotated_path(&log)).unwrap().len() + current.len() as u64;
        assert_eq!(end - first, kept);
        reader.seek(0);
        let (at, bytes) = read_all(&mut reader);
        assert_eq!(
            at, first,
            "an offset that was rotated away reads from the first kept"
        );
        assert_eq!(bytes, expected[first as usize..]);

        // Every line of the log can be found by its offset.
        let mut lines = Vec::new();
        let mut s = LineSplitter::new(first);
        s.push(first, &bytes, &mut lines);
        let l = &lines[lines.len() / 2];
        assert_eq!(l.start % line(0).len() as u64, 0);
        reader.seek(l.start);
        let (at, rest) = read_all(&mut reader);
        assert_eq!(at, l.start);
        assert_eq!(rest, expected[l.start as usize..]);
        // Mid-line offsets start at the next line; offsets past the end wait at the end.
        assert_eq!(line_start(&mut reader, l.start + 3).unwrap(), l.end);
        assert_eq!(line_start(&mut reader, l.start).unwrap(), l.start);
        assert_eq!(line_start(&mut reader, 0).unwrap(), first);
        reader.seek(end + 1000);
        assert_eq!(reader.read(&mut [0u8; 4]).unwrap(), (end, 0));
        runtime.write_all(b"next\n").unwrap();
        assert_eq!(read_all(&mut reader), (end, b"next\n".to_vec()));
    }

    #[test]
    fn a_half_copied_write_ends_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let consoles = Consoles::new(MIN_MAX_BYTES);
        let mut body = "a".repeat(MIN_MAX_BYTES as usize + 10).into_bytes();
        body.extend_from_slice(b"\nhalf a li");
        append(&log, &body);
        assert_eq!(consoles.rotate(&log).unwrap(), Some(body.len() as u64 + 1));
        let rotated = std::fs::read(rotated_path(&log)).unwrap();
        assert!(rotated.ends_with(b"half a li\n"));
        append(&log, b"next\n");
        let mut r = consoles.reader(&log);
        let (first, end) = r.span().unwrap();
        assert_eq!((first, end), (0, body.len() as u64 + 1 + 5));
        r.seek(first);
        let mut lines = Vec::new();
        let mut s = LineSplitter::new(first);
        let (at, bytes) = read_all(&mut r);
        s.push(at, &bytes, &mut lines);
        let texts: Vec<_> = lines.iter().map(|l| l.bytes.clone()).collect();
        assert_eq!(texts[1..], [b"half a li".to_vec(), b"next".to_vec()]);
    }

    #[test]
    fn tails_lines_of_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut text = String::new();
        for i in 0..10 {
            let stream = if i % 2 == 0 { "stdout" } else { "stderr" };
            text.push_str(&format!("2026-11-27T10:00:0{i}.000Z {stream} {i}\n"));
        }
        append(&log, text.as_bytes());
        let consoles = Consoles::new(DEFAULT_MAX_BYTES);
        let mut r = consoles.reader(&log);
        let all = Filter::default();
        let stderr = Filter {
            since: None,
            streams: vec![LogStream::Stderr],
        };
        let line_len = text.lines().next().unwrap().len() as u64 + 1;
        assert_eq!(tail_lines(&mut r, 3, &all).unwrap(), 7 * line_len);
        assert_eq!(tail_lines(&mut r, 2, &stderr).unwrap(), 7 * line_len);
        assert_eq!(tail_lines(&mut r, 4, &stderr).unwrap(), 3 * line_len);
        assert_eq!(tail_lines(&mut r, 100, &all).unwrap(), 0);
        assert_eq!(tail_lines(&mut r, 0, &all).unwrap(), 10 * line_len);
    }
}

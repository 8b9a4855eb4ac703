//! The agent's stdout and stderr, as timestamped lines on the console.
//!
//! The agent writes into two pipes that `hangar-init` makes once and keeps for its whole life,
//! so that a restarted agent, and whatever it left running in the background, write to the same
//! place. One thread per pipe cuts what arrives into lines ([`Framer`]) and writes each as
//! `2026-11-27T10:00:00.123Z stdout text` (the format of [`hangar_proto::console`]) to init's
//! own stdout, which the driver made the sandbox's console log. Nothing on the host sits
//! between the agent and that file, so the output outlives a restart of `hangar serve`, and a
//! checkpoint saves the pipes and their threads with the rest of the sandbox.
//!
//! Blocking threads, not async tasks: under gVisor an edge-triggered readiness event is
//! sometimes never delivered (see `links.rs`), and a thread that blocks writing to a slow
//! console holds back only the agent, whose pipe fills as it would on a slow terminal, never
//! init's control API. Init holds the read ends as long as it lives, so the agent never gets
//! `EPIPE` or `SIGPIPE` from its own output. This module must never buffer without bound (a
//! line is cut at [`MAX_LINE`] bytes and a partial line leaves after [`FLUSH_AFTER`]) and
//! never stop reading while the agent may write.

use std::io::{PipeReader, PipeWriter, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hangar_proto::console::MAX_LINE;

use crate::log::{self, Console};

/// How long the start of a line waits for its end before it is written as a line of its own
/// (a prompt, a progress bar).
pub const FLUSH_AFTER: Duration = Duration::from_millis(250);

/// The write ends of the agent's stdout and stderr pipes.
pub struct Output {
    stdout: PipeWriter,
    stderr: PipeWriter,
}

impl Output {
    /// Makes the pipes and starts the threads that copy them to the console.
    pub fn start() -> std::io::Result<Output> {
        let (out_r, stdout) = std::io::pipe()?;
        let (err_r, stderr) = std::io::pipe()?;
        for (reader, to, tag) in [
            (out_r, Console::Stdout, "stdout"),
            (err_r, Console::Stderr, "stderr"),
        ] {
            std::thread::Builder::new()
                .name(format!("agent-{tag}"))
                .spawn(move || pump(reader, to, tag))?;
        }
        Ok(Output { stdout, stderr })
    }

    /// Standard output and error for one start of the agent.
    pub fn stdio(&self) -> std::io::Result<(Stdio, Stdio)> {
        Ok((
            Stdio::from(self.stdout.try_clone()?),
            Stdio::from(self.stderr.try_clone()?),
        ))
    }
}

/// Copies one pipe to the console, a line at a time, until every writer is gone.
fn pump(mut reader: PipeReader, to: Console, tag: &'static str) {
    let mut framer = Framer::new(MAX_LINE);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(buf.len() + 256);
    let mut partial_since: Option<Instant> = None;
    loop {
        if let Some(since) = partial_since {
            let wait = FLUSH_AFTER.saturating_sub(since.elapsed());
            match readable(&reader, wait) {
                Ok(true) => {}
                Ok(false) => {
                    let ts = log::timestamp();
                    framer.flush(&mut |line| frame(&mut out, &ts, tag, line));
                    log::write(to, &out);
                    out.clear();
                    partial_since = None;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log!("cannot wait for the agent's {tag}: {e}");
                    return;
                }
            }
        }
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log!("cannot read the agent's {tag}: {e}");
                return;
            }
        };
        let ts = log::timestamp();
        let mut emitted = false;
        let mut emit = |line: &[u8]| {
            frame(&mut out, &ts, tag, line);
            emitted = true;
        };
        if n == 0 {
            framer.flush(&mut emit);
            log::write(to, &out);
            return;
        }
        framer.feed(&buf[..n], &mut emit);
        log::write(to, &out);
        out.clear();
        partial_since = match (framer.has_pending(), partial_since) {
            (false, _) => None,
            (true, Some(since)) if !emitted => Some(since),
            (true, _) => Some(Instant::now()),
        };
    }
}

/// Appends one console line: `TIMESTAMP TAG TEXT\n`, with invalid UTF-8 replaced.
fn frame(out: &mut Vec<u8>, ts: &str, tag: &str, line: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(String::from_utf8_lossy(line).as_bytes());
    out.push(b'\n');
}

/// Whether `fd` has something to read (or its end) within `wait`.
fn readable(fd: &impl AsFd, wait: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd that outlives the call, and the descriptor stays open.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r > 0)
}

/// Cuts a byte stream into lines of at most `max` bytes. A longer line is cut (at a UTF-8
/// character boundary where there is one nearby) into pieces; a final `\r` is dropped with
/// its `\n`. Holds at most `max` bytes.
pub struct Framer {
    pending: Vec<u8>,
    max: usize,
}

impl Framer {
    pub fn new(max: usize) -> Framer {
        assert!(max > 0);
        Framer {
            pending: Vec::new(),
            max,
        }
    }

    /// Whether the start of a line waits for its end.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Calls `emit` with each line `data` completes, without its line break.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !data.is_empty() {
            let room = self.max - self.pending.len();
            // A line break right after `room` bytes still ends a line that fits.
            let window = &data[..data.len().min(room + 1)];
            if let Some(i) = window.iter().position(|&b| b == b'\n') {
                if self.pending.is_empty() {
                    emit(trim_cr(&data[..i]));
                } else {
                    self.pending.extend_from_slice(&data[..i]);
                    emit(trim_cr(&self.pending));
                    self.pending.clear();
                }
                data = &data[i + 1..];
            } else if data.len() <= room {
                self.pending.extend_from_slice(data);
                return;
            } else {
                self.pending.extend_from_slice(&data[..room]);
                data = &data[room..];
                let cut = char_boundary(&self.pending);
                emit(&self.pending[..cut]);
                self.pending.drain(..cut);
            }
        }
    }

    /// Calls `emit` with the start of a line still waiting for its end, if any.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(trim_cr(&self.pending));
            self.pending.clear();
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Where to cut a full buffer so that a UTF-8 character at its end is not split: before that
/// character when it is incomplete, else at the end. Invalid UTF-8 is cut anywhere.
fn char_boundary(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=4.min(len) {
        let b = buf[len - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return len,
        };
        return if need > back && len - back > 0 {
            len - back
        } else {
            len
        };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a framer of `max` bytes and returns the lines, with `|` marking a flush
    /// at the end.
    fn check(max: usize, chunks: &[&[u8]], expect: &[&[u8]]) {
        let mut f = Framer::new(max);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for c in chunks {
            f.feed(c, &mut |l| lines.push(l.to_vec()));
            assert!(f.pending.len() <= max, "holds at most max bytes");
        }
        f.flush(&mut |l| {
            let mut v = b"|".to_vec();
            v.extend_from_slice(l);
            lines.push(v)
        });
        let expect: Vec<Vec<u8>> = expect.iter().map(|l| l.to_vec()).collect();
        assert_eq!(
            lines,
            expect,
            "{:?}",
            lines
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn splits_lines() {
        check(16, &[b"a\nb\n"], &[b"a", b"b"]);
        check(16, &[b"a\r\n\n"], &[b"a", b""]);
        check(16, &[b"he", b"llo\nwor", b"ld\n"], &[b"hello", b"world"]);
        check(16, &[b"no end"], &[b"|no end"]);
        check(16, &[b"x\npart", b"ial"], &[b"x", b"|partial"]);
        check(16, &[], &[]);
    }

    #[test]
    fn cuts_long_lines_at_the_bound() {
        // Exactly the bound fits, even when its line break comes in the next chunk.
        check(4, &[b"abcd\n"], &[b"abcd"]);
        check(4, &[b"abcd", b"\n"], &[b"abcd"]);
        check(4, &[b"abcdefghij\n"], &[b"abcd", b"efgh", b"ij"]);
        check(
            4,
            &[b"ab", b"cdefg", b"h", b"i\n"],
            &[b"abcd", b"efgh", b"i"],
        );
        check(4, &[b"abcde"], &[b"abcd", b"|e"]);
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut f = Framer::new(MAX_LINE);
        let mut sizes = vec![];
        f.feed(&long, &mut |l| sizes.push(l.len()));
        f.flush(&mut |l| sizes.push(l.len()));
        assert_eq!(sizes, [MAX_LINE, MAX_LINE, 10]);
    }

    #[test]
    fn never_splits_a_character_it_can_keep_whole() {
        // "é" is two bytes: a cut after "abc" would split it.
        check(4, &["abcé\n".as_bytes()], &[b"abc", "é".as_bytes()]);
        check(4, &["a€bc\n".as_bytes()], &["a€".as_bytes(), b"bc"]);
        check(4, &["€€".as_bytes()], &[b"\xe2\x82\xac", b"|\xe2\x82\xac"]);
        // Invalid UTF-8 is cut at the bound as it is.
        check(
            4,
            &[b"\x80\x80\x80\x80\x80\n"],
            &[b"\x80\x80\x80\x80", b"\x80"],
        );
        check(2, &["é".as_bytes(), b"\n"], &["é".as_bytes()]);
        check(1, &["é".as_bytes(), b"\n"], &[b"\xc3", b"\xa9"]);
    }

    #[test]
    fn frames_invalid_utf8_lossily() {
        let mut out = Vec::new();
        frame(
            &mut out,
            "2026-11-27T10:00:00.123Z",
            "stderr",
            b"bad \xff byte",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-27T10:00:00.123Z stderr bad \u{fffd} byte\n"
        );
    }
}

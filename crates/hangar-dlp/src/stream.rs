//! Redaction of text that arrives in pieces, such as the deltas of a streamed LLM answer. It
//! must never release a byte it may later need to redact, nor hold an unbounded amount of text.

use crate::{redacted, Hit, Scanner};

/// How many bytes at the end of what has arrived are held back, so that a secret split across
/// pieces is seen whole before any of it is released.
pub const HOLD_BACK: usize = 256;

/// How many bytes a match still open at the end of what has arrived may hold back.
pub const MAX_HELD: usize = 64 * 1024;

/// Redacts a text that arrives in pieces: [`push`](Self::push) each piece and send on what it
/// returns, then send on what [`finish`](Self::finish) returns.
///
/// The redactor holds back the last [`HOLD_BACK`] bytes, and more while a match reaches the end
/// of what has arrived: everything from the start of that match, up to [`MAX_HELD`] bytes (it
/// then waits for [`HOLD_BACK`] more bytes before looking again). Text is released only at
/// character boundaries and never revised, and each hit is reported once, when its text is
/// released. Hit offsets index the concatenation of all pieces, as in [`Scanner::redact`] of
/// the whole.
///
/// What is guaranteed: if every match a detector makes in the whole text is at most
/// [`HOLD_BACK`] bytes long (for a labelled key, label included), the outputs concatenated are
/// exactly `scanner.redact(whole)`, with the same hits, however the text was split. Private key
/// blocks are exempt from that length up to [`crate::PRIVATE_KEY_MAX_LEN`]: an unterminated
/// block matches through the end of what has arrived, so it is held until its END line or its
/// limit arrives.
///
/// What is not: a longer match is held and redacted whole only if, while it arrives, it always
/// matches through the end of what has arrived, as open-ended patterns such as `sk-…` do. A
/// pattern that matches only once complete, such as `x[a-z]{500}`, can see its first bytes
/// released in clear before it completes; the rest is redacted only if it matches on its own. A
/// match still open after [`MAX_HELD`] bytes is released, redacted, up to the last
/// [`HOLD_BACK`] bytes, and what follows is scanned afresh, so the rest of it may be reported as
/// a second hit, or escape.
#[derive(Debug, Clone)]
pub struct StreamRedactor {
    scanner: Scanner,
    /// Already released text kept as context for boundary checks (the first `released` bytes),
    /// then the text not yet released.
    buf: String,
    released: usize,
    /// Where `buf` starts in the whole stream.
    offset: usize,
    /// While a match is held open, the stream position at which to scan again: scanning on every
    /// small piece would rescan the whole held match each time.
    rescan_at: usize,
}

impl StreamRedactor {
    pub(crate) fn new(scanner: Scanner) -> Self {
        StreamRedactor {
            scanner,
            buf: String::new(),
            released: 0,
            offset: 0,
            rescan_at: 0,
        }
    }

    /// Adds `piece` and returns the text that is now safe to release, redacted, with the hits
    /// in it.
    pub fn push(&mut self, piece: &str) -> (String, Vec<Hit>) {
        self.buf.push_str(piece);
        let pending = self.buf.len() - self.released;
        if pending <= HOLD_BACK || self.offset + self.buf.len() < self.rescan_at {
            return (String::new(), Vec::new());
        }
        self.release(false)
    }

    /// Releases the rest, redacted, with the hits in it.
    pub fn finish(mut self) -> (String, Vec<Hit>) {
        self.release(true)
    }

    fn release(&mut self, finish: bool) -> (String, Vec<Hit>) {
        let len = self.buf.len();
        let mut hits = self.scanner.hits(self.buf.as_bytes(), self.released, true);
        self.rescan_at = 0;
        let mut cut = len;
        if !finish {
            cut = floor_char_boundary(&self.buf, len - HOLD_BACK);
            if let Some(open) = hits.iter().find(|h| h.start < cut && cut < h.end) {
                if len - open.start <= MAX_HELD {
                    cut = open.start;
                    self.rescan_at = self.offset + len + HOLD_BACK;
                }
            }
        }
        hits.retain(|h| h.start < cut);
        // A match too long to hold any longer is released redacted up to the cut.
        if let Some(last) = hits.last_mut() {
            last.end = last.end.min(cut);
        }

        let text = redacted(&self.buf, self.released..cut, &hits);
        for hit in &mut hits {
            hit.start += self.offset;
            hit.end += self.offset;
        }
        // Keep some released text before the cut: `\b`, `^` and the card number's edges look at
        // the character before a match.
        let forget = floor_char_boundary(&self.buf, cut.saturating_sub(HOLD_BACK));
        self.buf.drain(..forget);
        self.offset += forget;
        self.released = cut - forget;
        (text, hits)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

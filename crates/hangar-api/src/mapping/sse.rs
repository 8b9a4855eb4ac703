//! An incremental Server-Sent Events parser (the WHATWG event-stream grammar): bytes in as
//! they arrive, whole events out. Bounded: an event larger than [`MAX_EVENT`] is an error
//! rather than a growing buffer.

/// The largest event accepted (a `response.completed` carries the whole response).
pub const MAX_EVENT: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// The last byte was a CR: a following LF belongs to the same line end.
    after_cr: bool,
    size: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("an event of the agent's stream exceeds {MAX_EVENT} bytes")]
pub struct TooLarge;

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line(out);
                }
                _ => {
                    self.size += 1;
                    if self.size > MAX_EVENT {
                        return Err(TooLarge);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            // A blank line dispatches the event (one without data is dropped).
            self.size = 0;
            let event = self.event.take();
            if let Some(data) = self.data.take() {
                out.push(SseEvent { event, data });
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &[][..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = Some(value.into_owned()),
            b"data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            },
            _ => {} // id, retry and unknown fields mean nothing here
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = vec![];
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn events_split_anywhere_join_whole() {
        let text = b"event: a\ndata: {\"x\":1}\n\n: comment\r\ndata:two\r\ndata: lines\r\n\r\nevent: no-data\n\ndata: [DONE]\n\n";
        let whole = parse(&[text]);
        assert_eq!(
            whole,
            [
                SseEvent {
                    event: Some("a".into()),
                    data: "{\"x\":1}".into()
                },
                SseEvent {
                    event: None,
                    data: "two\nlines".into()
                },
                SseEvent {
                    event: None,
                    data: "[DONE]".into()
                },
            ]
        );
        for cut in 1..text.len() {
            assert_eq!(parse(&[&text[..cut], &text[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse(&bytes), whole);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut p = SseParser::default();
        let mut out = vec![];
        let chunk = vec![b'x'; 1 << 20];
        p.feed(b"data: ", &mut out).unwrap();
        let mut failed = false;
        for _ in 0..17 {
            if p.feed(&chunk, &mut out).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}

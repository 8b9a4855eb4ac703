//! The wire format: a 12-byte header `[kind u8][0u8; 3][stream u32 BE][len u32 BE]` and a
//! payload. Pure code over bytes, no I/O, so that it can be tested (and fuzzed) in isolation.
//!
//! The decoder checks a header before it waits for the payload, so a hostile length is refused
//! at once instead of being buffered, and it never holds more than one frame and a read.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const HEADER_LEN: usize = 12;
/// The largest payload of any frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest payload of a DATA frame.
pub const MAX_DATA: usize = 32 * 1024;
/// The longest OPEN target, in bytes.
pub const MAX_TARGET: usize = 64;
/// The first 8 bytes of a HELLO or HELLO_ACK payload; the epoch follows.
pub const MAGIC: [u8; 8] = *b"HANGARMX";
/// A whole HELLO or HELLO_ACK frame.
pub const HELLO_LEN: usize = HEADER_LEN + 16;
/// What every HELLO starts with: its header and the magic. The guest scans for it.
pub const HELLO_PREFIX: [u8; 20] = hello_prefix(Kind::Hello);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Open = 3,
    Data = 4,
    Eof = 5,
    Reset = 6,
    Credit = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Open,
            4 => Kind::Data,
            5 => Kind::Eof,
            6 => Kind::Reset,
            7 => Kind::Credit,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello { epoch: u64 },
    HelloAck { epoch: u64 },
    Open { stream: u32, target: String },
    Data { stream: u32, payload: Bytes },
    Eof { stream: u32 },
    Reset { stream: u32 },
    Credit { stream: u32, bytes: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("a payload of {0} bytes is over the limit")]
    TooLong(u32),
    #[error("a {kind:?} frame cannot have a payload of {len} bytes")]
    BadLength { kind: Kind, len: u32 },
    #[error("a {kind:?} frame cannot be on stream {stream}")]
    BadStream { kind: Kind, stream: u32 },
    #[error("a HELLO without the magic")]
    BadMagic,
    #[error("an OPEN target that is not printable UTF-8")]
    BadTarget,
    #[error("stream {0} is not a new stream id of the peer")]
    StreamId(u32),
    #[error("a {0:?} frame is not expected from this peer")]
    Unexpected(Kind),
    #[error("too many frames wait to be written; the peer does not read")]
    Backlog,
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        match self {
            Frame::Hello { epoch } => encode(Kind::Hello, 0, &hello_payload(*epoch)),
            Frame::HelloAck { epoch } => encode(Kind::HelloAck, 0, &hello_payload(*epoch)),
            Frame::Open { stream, target } => encode(Kind::Open, *stream, target.as_bytes()),
            Frame::Data { stream, payload } => encode(Kind::Data, *stream, payload),
            Frame::Eof { stream } => encode(Kind::Eof, *stream, &[]),
            Frame::Reset { stream } => encode(Kind::Reset, *stream, &[]),
            Frame::Credit { stream, bytes } => encode(Kind::Credit, *stream, &bytes.to_be_bytes()),
        }
    }
}

/// One frame on the wire. The caller keeps `payload` within the limits of `kind`.
pub fn encode(kind: Kind, stream: u32, payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_slice(&header(kind, stream, payload.len() as u32));
    out.put_slice(payload);
    out.freeze()
}

const fn header(kind: Kind, stream: u32, len: u32) -> [u8; HEADER_LEN] {
    let s = stream.to_be_bytes();
    let l = len.to_be_bytes();
    [
        kind as u8, 0, 0, 0, s[0], s[1], s[2], s[3], l[0], l[1], l[2], l[3],
    ]
}

const fn hello_prefix(kind: Kind) -> [u8; 20] {
    let h = header(kind, 0, 16);
    let mut out = [0u8; 20];
    let mut i = 0;
    while i < 20 {
        out[i] = if i < HEADER_LEN {
            h[i]
        } else {
            MAGIC[i - HEADER_LEN]
        };
        i += 1;
    }
    out
}

fn hello_payload(epoch: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&epoch.to_be_bytes());
    p
}

/// Checks a header on its own: the kind, the reserved bytes, the length the kind allows, and
/// the stream ids that kind may use. Returns the kind, the stream and the payload length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, u32, usize), ProtocolError> {
    let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
    if h[1..4] != [0, 0, 0] {
        return Err(ProtocolError::Reserved);
    }
    let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(len));
    }
    let len_ok = match kind {
        Kind::Hello | Kind::HelloAck => len == 16,
        Kind::Open => (1..=MAX_TARGET as u32).contains(&len),
        Kind::Data => len as usize <= MAX_DATA,
        Kind::Eof | Kind::Reset => len == 0,
        Kind::Credit => len == 4,
    };
    if !len_ok {
        return Err(ProtocolError::BadLength { kind, len });
    }
    let is_link = matches!(kind, Kind::Hello | Kind::HelloAck);
    if is_link != (stream == 0) {
        return Err(ProtocolError::BadStream { kind, stream });
    }
    Ok((kind, stream, len as usize))
}

/// Turns a checked header and its payload into a frame.
fn parse_payload(kind: Kind, stream: u32, payload: Bytes) -> Result<Frame, ProtocolError> {
    let epoch = |p: &[u8]| -> Result<u64, ProtocolError> {
        if p[..8] != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        Ok(u64::from_be_bytes(p[8..16].try_into().unwrap_or_default()))
    };
    Ok(match kind {
        Kind::Hello => Frame::Hello {
            epoch: epoch(&payload)?,
        },
        Kind::HelloAck => Frame::HelloAck {
            epoch: epoch(&payload)?,
        },
        Kind::Open => {
            let target = std::str::from_utf8(&payload).map_err(|_| ProtocolError::BadTarget)?;
            if target.chars().any(char::is_control) {
                return Err(ProtocolError::BadTarget);
            }
            Frame::Open {
                stream,
                target: target.to_owned(),
            }
        }
        Kind::Data => Frame::Data { stream, payload },
        Kind::Eof => Frame::Eof { stream },
        Kind::Reset => Frame::Reset { stream },
        Kind::Credit => Frame::Credit {
            stream,
            bytes: u32::from_be_bytes(payload[..4].try_into().unwrap_or_default()),
        },
    })
}

/// Splits a byte stream into frames, and finds the start of the stream after a resync.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to read into (with `read_buf`); bytes appended here are decoded next.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The next complete frame, `None` if more bytes are needed. After an error the decoder
    /// is out of step with the stream; only [`Decoder::skip_to`] may follow.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let Some(h) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (kind, stream, len) = parse_header(h)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        parse_payload(kind, stream, payload).map(Some)
    }

    /// Discards the bytes before the first occurrence of `pattern`. Returns whether the buffer
    /// now starts with it; if not, keeps only a tail that may be the pattern's beginning.
    pub fn skip_to(&mut self, pattern: &[u8]) -> bool {
        if let Some(at) = find(&self.buf, pattern) {
            self.buf.advance(at);
            return true;
        }
        let keep = pattern.len().saturating_sub(1).min(self.buf.len());
        self.buf.advance(self.buf.len() - keep);
        false
    }

    /// Drops `n` bytes (at most what is buffered).
    pub fn discard(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::Hello { epoch: 7 },
            Frame::HelloAck {
                epoch: u64::MAX - 1,
            },
            Frame::Open {
                stream: 1,
                target: "control".into(),
            },
            Frame::Data {
                stream: 1,
                payload: Bytes::from(vec![0xAB; MAX_DATA]),
            },
            Frame::Data {
                stream: 2,
                payload: Bytes::new(),
            },
            Frame::Eof { stream: 3 },
            Frame::Reset { stream: 4 },
            Frame::Credit {
                stream: 5,
                bytes: 65536,
            },
        ]
    }

    #[test]
    fn round_trips_in_one_piece() {
        let mut dec = Decoder::default();
        for f in sample() {
            dec.push(&f.encode());
        }
        for f in sample() {
            assert_eq!(dec.next_frame(), Ok(Some(f)));
        }
        assert_eq!(dec.next_frame(), Ok(None));
    }

    #[test]
    fn round_trips_one_byte_at_a_time() {
        let wire: Vec<u8> = sample().iter().flat_map(|f| f.encode().to_vec()).collect();
        let mut dec = Decoder::default();
        let mut got = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, sample());
    }

    #[test]
    fn round_trips_at_every_split_point() {
        let wire: Vec<u8> = sample().iter().flat_map(|f| f.encode().to_vec()).collect();
        for cut in [1, 5, 11, 12, 13, 27, 28, 29, 100, 32_000, wire.len() - 1] {
            let mut dec = Decoder::default();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                dec.push(part);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, sample(), "cut at {cut}");
        }
    }

    fn check(header: [u8; HEADER_LEN], expect: ProtocolError) {
        let mut dec = Decoder::default();
        dec.push(&header);
        assert_eq!(dec.next_frame(), Err(expect), "{header:?}");
    }

    #[test]
    fn refuses_bad_headers_before_their_payload() {
        check(
            header(Kind::Data, 1, 64 * 1024 + 1),
            ProtocolError::TooLong(65537),
        );
        check(
            header(Kind::Data, 1, u32::MAX),
            ProtocolError::TooLong(u32::MAX),
        );
        check([0; HEADER_LEN], ProtocolError::UnknownKind(0));
        check(
            [8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
            ProtocolError::UnknownKind(8),
        );
        check(
            [4, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0],
            ProtocolError::Reserved,
        );
        let bad_len = |kind, stream, len| {
            check(
                header(kind, stream, len),
                ProtocolError::BadLength { kind, len },
            )
        };
        bad_len(Kind::Data, 1, MAX_DATA as u32 + 1);
        bad_len(Kind::Hello, 0, 15);
        bad_len(Kind::Open, 1, 0);
        bad_len(Kind::Open, 1, 65);
        bad_len(Kind::Eof, 1, 1);
        bad_len(Kind::Reset, 1, 4);
        bad_len(Kind::Credit, 1, 8);
        check(
            header(Kind::Data, 0, 1),
            ProtocolError::BadStream {
                kind: Kind::Data,
                stream: 0,
            },
        );
        check(
            header(Kind::Hello, 3, 16),
            ProtocolError::BadStream {
                kind: Kind::Hello,
                stream: 3,
            },
        );
    }

    #[test]
    fn refuses_bad_payloads() {
        let mut dec = Decoder::default();
        dec.push(&encode(Kind::Hello, 0, &[0; 16]));
        assert_eq!(dec.next_frame(), Err(ProtocolError::BadMagic));
        for target in [&b"\xff\xfe"[..], b"con\ntrol"] {
            let mut dec = Decoder::default();
            dec.push(&encode(Kind::Open, 1, target));
            assert_eq!(dec.next_frame(), Err(ProtocolError::BadTarget));
        }
    }

    #[test]
    fn skips_garbage_and_cut_frames_to_a_hello() {
        let hello = Frame::Hello { epoch: 42 }.encode();
        let mut wire = b"garbage".to_vec();
        wire.extend_from_slice(&Frame::Hello { epoch: 1 }.encode()[..19]);
        wire.extend_from_slice(&encode(Kind::Data, 1, &[1; 100])[..50]);
        wire.extend_from_slice(&hello);
        wire.extend_from_slice(&Frame::Eof { stream: 1 }.encode());
        let mut dec = Decoder::default();
        let mut found = None;
        for b in &wire {
            dec.push(&[*b]);
            if found.is_none() && dec.skip_to(&HELLO_PREFIX) {
                if let Some(f) = dec.next_frame().unwrap() {
                    found = Some(f);
                }
            } else if found.is_some() {
                if let Some(f) = dec.next_frame().unwrap() {
                    assert_eq!(f, Frame::Eof { stream: 1 });
                    assert_eq!(found, Some(Frame::Hello { epoch: 42 }));
                    return;
                }
            }
        }
        panic!("no HELLO found");
    }

    #[test]
    fn skip_keeps_only_a_possible_prefix() {
        let mut dec = Decoder::default();
        dec.push(&[0xEE; 10_000]);
        assert!(!dec.skip_to(&HELLO_PREFIX));
        assert_eq!(dec.buffer().len(), HELLO_PREFIX.len() - 1);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut dec = Decoder::default();
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    // Mostly small values, so that kinds and lengths are often plausible.
                    let r = next();
                    if r % 3 == 0 {
                        (r >> 8) as u8 % 8
                    } else {
                        (r >> 8) as u8
                    }
                })
                .collect();
            dec.push(&bytes);
            while let Ok(Some(_)) = dec.next_frame() {}
            dec.skip_to(&HELLO_PREFIX);
        }
    }
}

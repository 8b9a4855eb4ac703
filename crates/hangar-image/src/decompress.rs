//! Layer decompression chosen by the bytes, not the label: gzip, zstd (any number of frames) or plain tar.
//!
//! It must never trust a layer's media type to pick the codec, because tools label compressed layers as
//! plain tar and the reverse; and it must never buffer a whole layer in memory.

use std::io::{self, BufRead, Read};

use flate2::read::MultiGzDecoder;
use ruzstd::frame::ReadFrameHeaderError;
use ruzstd::frame_decoder::FrameDecoderError;
use ruzstd::{BlockDecodingStrategy, FrameDecoder};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Skippable zstd frames have magic numbers 0x184D2A50..=0x184D2A5F (little endian): the low nibble
/// of the first byte varies.
const ZSTD_SKIPPABLE_MAGIC_TAIL: [u8; 3] = [0x2a, 0x4d, 0x18];

/// Wraps `source` in the decoder its first bytes call for.
pub(crate) fn decompressed<'a, R: BufRead + 'a>(mut source: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = source.fill_buf()?;
    if head.starts_with(&GZIP_MAGIC) {
        // Multi-member, because parallel compressors (pigz) write one gzip member per chunk.
        Ok(Box::new(MultiGzDecoder::new(source)))
    } else if head.starts_with(&ZSTD_MAGIC) || is_skippable_zstd(head) {
        Ok(Box::new(ZstdFrames::new(source)))
    } else {
        Ok(Box::new(source))
    }
}

fn is_skippable_zstd(head: &[u8]) -> bool {
    head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == ZSTD_SKIPPABLE_MAGIC_TAIL
}

/// Decodes a stream of zstd frames back to back. `ruzstd::StreamingDecoder` stops after one frame,
/// but `zstd:chunked` layers (podman, buildah) are many frames plus skippable metadata frames.
struct ZstdFrames<R> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> ZstdFrames<R> {
        ZstdFrames {
            source,
            decoder: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Starts the next data frame; `false` at a clean end of input.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            // decode_blocks may stop short of the request, so keep going until enough is collectable.
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let wanted = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // Nothing collectable and the frame is finished: move on to the next frame.
            self.in_frame = false;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// ruzstd 0.7 has no encoder, so tests write zstd frames of raw (stored) blocks by hand.
    pub(crate) fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
        const MAX_BLOCK: usize = 128 * 1024;
        let mut out = ZSTD_MAGIC.to_vec();
        // Frame header descriptor: single segment, 8-byte content size, no checksum, no dictionary.
        out.push(0b1110_0000);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        let mut chunks: Vec<&[u8]> = data.chunks(MAX_BLOCK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            // Block header: bit 0 last-block, bits 1-2 type (0 = raw), bits 3.. size.
            let header = ((chunk.len() as u32) << 3) | u32::from(i == last);
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.extend_from_slice(chunk);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decompressed(bytes).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn plain_bytes_pass_through() {
        assert_eq!(decode(b"ustar and more"), b"ustar and more");
    }

    #[test]
    fn gzip_with_several_members() {
        let mut bytes = Vec::new();
        for part in [&b"first "[..], b"second"] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).unwrap();
            bytes.extend(gz.finish().unwrap());
        }
        assert_eq!(decode(&bytes), b"first second");
    }

    #[test]
    fn zstd_with_several_frames_and_skippable_frames() {
        let big = vec![7u8; 300 * 1024];
        let mut bytes = zstd_raw_frame(b"one ");
        bytes.extend([0x5a, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        bytes.extend(zstd_raw_frame(&big));
        bytes.extend(zstd_raw_frame(b""));
        let mut expected = b"one ".to_vec();
        expected.extend(&big);
        assert_eq!(decode(&bytes), expected);
    }

    #[test]
    fn truncated_zstd_is_an_error() {
        let bytes = zstd_raw_frame(&[1u8; 1000]);
        let mut out = Vec::new();
        let result = decompressed(&bytes[..500]).unwrap().read_to_end(&mut out);
        assert!(result.is_err());
    }
}

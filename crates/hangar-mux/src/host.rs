//! The host side: one connection to QEMU's socket for a link port, which is one epoch.
//!
//! Everything the guest sends is hostile input. The reader never panics or waits on it, and
//! everything it stores is bounded: one frame in the decoder, one window per stream, at most
//! `max_streams` streams, and a bounded queue of answers (a guest that makes the host answer
//! faster than it reads loses its link). A misbehaving guest can only break its own link.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::frame::{Decoder, Frame, ProtocolError, HEADER_LEN, MAX_PAYLOAD};
use crate::link::{Core, Incoming, Outbox, Side};
use crate::MuxStream;

/// How often the host re-sends HELLO until the guest answers.
const HELLO_INTERVAL: Duration = Duration::from_millis(20);
/// How often `connect` retries while QEMU's socket is missing or refuses.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// Zero bytes sent before the first HELLO. A guest still in step with an old connection may
/// be inside a frame that was cut off; these complete any such frame (at most a header and
/// the largest payload) and then form an invalid header, which makes the guest scan for HELLO.
const RESYNC_PAD: usize = HEADER_LEN + MAX_PAYLOAD + HEADER_LEN;
/// How much the reader asks for at once.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct HostOptions {
    /// How long [`HostLink::connect`] retries while the socket is missing or refuses.
    pub connect_timeout: Duration,
    /// How long the guest may take to answer HELLO.
    pub hello_timeout: Duration,
    /// The targets the guest may open streams to; it gets a RESET for any other.
    pub accept: Vec<String>,
    /// The most streams the link carries at once, opened by either side.
    pub max_streams: usize,
}

impl Default for HostOptions {
    fn default() -> HostOptions {
        HostOptions {
            connect_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            accept: Vec::new(),
            max_streams: 256,
        }
    }
}

/// Why a [`HostLink`] ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link was closed on this side")]
    Closed,
    #[error("the socket was closed by QEMU")]
    Eof,
    #[error("reading the socket failed: {0}")]
    Read(io::ErrorKind),
    #[error("writing the socket failed: {0}")]
    Write(io::ErrorKind),
    #[error("the guest broke the protocol")]
    Protocol(#[from] ProtocolError),
}

/// One connection to a guest's link port. Dropping it (or [`HostLink::close`]) closes the
/// connection and resets every stream; to reconnect, make a new one.
pub struct HostLink {
    core: Arc<Core>,
    epoch: u64,
    dead: CancellationToken,
    reason: Arc<Mutex<Option<LinkError>>>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<(String, MuxStream)>>,
}

impl HostLink {
    /// Connects to QEMU's socket at `path`, retrying while it is missing or refuses (QEMU may
    /// not have created it yet) for up to `opts.connect_timeout`, then starts an epoch.
    pub async fn connect(path: &Path, opts: HostOptions) -> io::Result<HostLink> {
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connecting to {}: {e}", path.display()),
                    ))
                }
            }
        };
        HostLink::handshake(stream, opts).await
    }

    /// Starts an epoch on a connected socket: sends HELLO until the guest answers (for up to
    /// `opts.hello_timeout`), discarding whatever else it reads meanwhile.
    pub async fn handshake(stream: UnixStream, opts: HostOptions) -> io::Result<HostLink> {
        let mut epoch = [0u8; 8];
        getrandom::getrandom(&mut epoch).map_err(|e| io::Error::other(e.to_string()))?;
        let epoch = u64::from_be_bytes(epoch);
        let (mut rd, mut wr) = stream.into_split();
        let dec = tokio::time::timeout(opts.hello_timeout, hello(&mut rd, &mut wr, epoch))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the guest did not answer HELLO within {:?}",
                        opts.hello_timeout
                    ),
                )
            })??;
        let (accepted_tx, accepted_rx) = mpsc::channel(crate::link::ACCEPT_QUEUE);
        let (core, outbox) = Core::new(
            Side::Host,
            true,
            opts.max_streams,
            Incoming::Accept(opts.accept),
            Some(accepted_tx),
            tokio::runtime::Handle::current(),
        );
        let link = HostLink {
            core: core.clone(),
            epoch,
            dead: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
            accepted: tokio::sync::Mutex::new(accepted_rx),
        };
        let (dead, reason) = (link.dead.clone(), link.reason.clone());
        tokio::spawn(async move {
            let why = tokio::select! {
                why = read_loop(&core, rd, dec) => why,
                why = write_loop(&core, outbox, wr) => why,
                _ = dead.cancelled() => LinkError::Closed,
            };
            end(&core, &dead, &reason, why);
        });
        Ok(link)
    }

    /// This connection's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Opens a stream to `target` in the guest. Fails at once if the link is closed or full;
    /// a target the guest does not serve shows as a stream that ends (or is reset) at once.
    pub async fn open(&self, target: &str) -> io::Result<MuxStream> {
        self.core.open(target).await
    }

    /// The next stream the guest opened to one of `HostOptions::accept`; `None` once the link
    /// is closed and every such stream was taken.
    pub async fn accept(&self) -> Option<(String, MuxStream)> {
        self.accepted.lock().await.recv().await
    }

    /// Resolves when the link has ended, with the reason.
    pub async fn closed(&self) -> LinkError {
        self.dead.cancelled().await;
        let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        reason.clone().unwrap_or(LinkError::Closed)
    }

    /// Closes the connection and resets every stream.
    pub fn close(&self) {
        end(&self.core, &self.dead, &self.reason, LinkError::Closed);
    }

    #[cfg(test)]
    pub(crate) fn stream_count(&self) -> usize {
        self.core.stream_count()
    }
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLink")
            .field("epoch", &format_args!("{:016x}", self.epoch))
            .field("closed", &self.dead.is_cancelled())
            .finish()
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// Ends the link once; the first reason sticks.
fn end(core: &Core, dead: &CancellationToken, reason: &Mutex<Option<LinkError>>, why: LinkError) {
    reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(why);
    core.restart(false);
    dead.cancel();
}

/// Sends HELLO every [`HELLO_INTERVAL`] until the matching HELLO_ACK arrives. Returns the
/// decoder holding whatever followed the ACK.
async fn hello(rd: &mut OwnedReadHalf, wr: &mut OwnedWriteHalf, epoch: u64) -> io::Result<Decoder> {
    let hello = Frame::Hello { epoch }.encode();
    let ack = Frame::HelloAck { epoch }.encode();
    wr.write_all(&vec![0u8; RESYNC_PAD]).await?;
    let mut dec = Decoder::default();
    loop {
        // Never cancelled half-way, so the next frame starts on a frame boundary.
        wr.write_all(&hello).await?;
        let found = tokio::select! {
            r = read_until(rd, &mut dec, &ack) => r?,
            _ = tokio::time::sleep(HELLO_INTERVAL) => false,
        };
        if found {
            dec.discard(ack.len());
            return Ok(dec);
        }
    }
}

/// Reads until the buffer starts with `pattern`, discarding everything before it.
async fn read_until(rd: &mut OwnedReadHalf, dec: &mut Decoder, pattern: &[u8]) -> io::Result<bool> {
    loop {
        if dec.skip_to(pattern) {
            return Ok(true);
        }
        dec.buffer().reserve(READ_CHUNK);
        if rd.read_buf(dec.buffer()).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the socket closed before the guest answered HELLO",
            ));
        }
    }
}

async fn read_loop(core: &Arc<Core>, mut rd: OwnedReadHalf, mut dec: Decoder) -> LinkError {
    loop {
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = core.handle(frame) {
                        return e.into();
                    }
                }
                Ok(None) => break,
                Err(e) => return e.into(),
            }
        }
        dec.buffer().reserve(READ_CHUNK);
        match rd.read_buf(dec.buffer()).await {
            Ok(0) => return LinkError::Eof,
            Ok(_) => {}
            Err(e) => return LinkError::Read(e.kind()),
        }
    }
}

async fn write_loop(core: &Core, mut outbox: Outbox, mut wr: OwnedWriteHalf) -> LinkError {
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if !outbox.next_batch(core, &mut batch).await {
            return LinkError::Closed;
        }
        if let Err(e) = wr.write_all(&batch).await {
            return LinkError::Write(e.kind());
        }
    }
}

//! One stream: the [`MuxStream`] a caller holds, the state the link's reader shares with it,
//! and the pump task that carries bytes between the two.
//!
//! The caller's end is one half of a `tokio::io::duplex`; the pump owns the other half. The
//! link's reader never waits for a pump: it appends DATA to the stream's inbound buffer (at most
//! one window, which the peer may not exceed) and wakes the pump, which delivers it at the
//! caller's pace and only then grants the peer more credit.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::frame::{Kind, MAX_DATA};
use crate::link::{Core, LinkGone};
use crate::WINDOW;

/// The buffer of the duplex pipe between a caller and its stream's pump.
const PIPE_SIZE: usize = 64 * 1024;

/// A multiplexed stream. Reading returns 0 after the peer's EOF, `shutdown` sends EOF (the
/// peer can still answer), and both reading and writing fail with
/// [`io::ErrorKind::ConnectionReset`] once the stream was reset (by the peer, a protocol
/// violation, or the end of its link or epoch). Bytes that arrived before a reset can still be
/// read; the error comes where EOF would have.
///
/// Dropping it closes it as dropping a socket does: what was written is still sent, then EOF;
/// the stream then lives on until the peer's EOF, and is reset if the peer sends more (or had
/// sent data that was never read).
#[derive(Debug)]
pub struct MuxStream {
    id: u32,
    io: DuplexStream,
    flags: Arc<Flags>,
}

/// What the pump tells the caller's end beyond the bytes themselves.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    /// The stream was reset; set before the pump lets go of its end of the pipe.
    reset: AtomicBool,
    /// The peer's EOF was delivered; a later reset no longer turns EOF into an error.
    read_eof: AtomicBool,
    /// The caller dropped its end.
    dropped: CancellationToken,
}

impl Flags {
    fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the stream was reset")
}

impl MuxStream {
    /// The stream's id on its link (odd: opened by the host; even: by the guest).
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        self.flags.dropped.cancel();
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let at_end = buf.filled().len() == before && buf.remaining() > 0;
        if at_end && this.flags.is_reset() && !this.flags.read_eof.load(Ordering::Acquire) {
            return Poll::Ready(Err(reset_error()));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.flags.is_reset() {
            return Poll::Ready(Err(reset_error()));
        }
        match ready!(Pin::new(&mut this.io).poll_write(cx, buf)) {
            Err(_) if this.flags.is_reset() => Poll::Ready(Err(reset_error())),
            other => Poll::Ready(other),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The state of one stream that its pump and the link's reader share.
#[derive(Debug)]
pub(crate) struct StreamCtl {
    pub id: u32,
    /// The link generation the stream belongs to; its frames are dropped after another began.
    pub gen: u64,
    /// Fired when the stream is reset from outside the pump (peer, violation, link end).
    pub cancel: CancellationToken,
    inbound: Mutex<Inbound>,
    inbound_ready: Notify,
    /// DATA bytes the peer still accepts.
    send_window: AtomicU32,
    window_ready: Notify,
    flags: Arc<Flags>,
}

#[derive(Debug)]
struct Inbound {
    data: BytesMut,
    eof: bool,
    /// DATA bytes the peer may still send.
    window: u32,
}

/// A violation of flow control by the peer; the stream must be reset.
#[derive(Debug)]
pub(crate) struct Violation;

impl StreamCtl {
    /// A new stream: its shared state, the caller's end, and the pump's end.
    pub fn new(id: u32, gen: u64) -> (Arc<StreamCtl>, MuxStream, DuplexStream) {
        let (user, inner) = tokio::io::duplex(PIPE_SIZE);
        let flags = Arc::new(Flags::default());
        let ctl = Arc::new(StreamCtl {
            id,
            gen,
            cancel: CancellationToken::new(),
            inbound: Mutex::new(Inbound {
                data: BytesMut::new(),
                eof: false,
                window: WINDOW,
            }),
            inbound_ready: Notify::new(),
            send_window: AtomicU32::new(WINDOW),
            window_ready: Notify::new(),
            flags: flags.clone(),
        });
        let stream = MuxStream {
            id,
            io: user,
            flags,
        };
        (ctl, stream, inner)
    }

    fn inbound(&self) -> MutexGuard<'_, Inbound> {
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes DATA from the peer (called by the link's reader; never waits).
    pub fn on_data(&self, payload: &[u8]) -> Result<(), Violation> {
        let mut inbound = self.inbound();
        let len = u32::try_from(payload.len()).map_err(|_| Violation)?;
        if inbound.eof || len > inbound.window {
            return Err(Violation);
        }
        inbound.window -= len;
        inbound.data.extend_from_slice(payload);
        drop(inbound);
        self.inbound_ready.notify_one();
        Ok(())
    }

    /// Takes the peer's EOF; a second one changes nothing.
    pub fn on_eof(&self) {
        self.inbound().eof = true;
        self.inbound_ready.notify_one();
    }

    /// Takes the peer's CREDIT, which may not grant more than one window in all.
    pub fn on_credit(&self, bytes: u32) -> Result<(), Violation> {
        self.send_window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                w.checked_add(bytes).filter(|&sum| sum <= WINDOW)
            })
            .map_err(|_| Violation)?;
        self.window_ready.notify_one();
        Ok(())
    }

    /// Waits until the peer accepts at least one byte; returns how many.
    async fn send_window(&self) -> usize {
        loop {
            let w = self.send_window.load(Ordering::Acquire);
            if w > 0 {
                return w as usize;
            }
            self.window_ready.notified().await;
        }
    }
}

/// How the inbound half of a stream ended.
enum InboundEnd {
    /// The peer's EOF was delivered.
    Eof,
    /// The caller dropped its end before the peer's EOF.
    Abandoned,
}

/// Carries one stream until both directions have ended or it is reset.
pub(crate) async fn pump(core: Arc<Core>, ctl: Arc<StreamCtl>, inner: DuplexStream) {
    let (mut rd, mut wr) = tokio::io::split(inner);
    let run = async {
        tokio::try_join!(
            outbound(&core, &ctl, &mut rd),
            inbound(&core, &ctl, &mut wr)
        )
    };
    let reset = tokio::select! {
        _ = ctl.cancel.cancelled() => true,
        r = run => match r {
            Ok((_, InboundEnd::Eof)) => false,
            Ok((_, InboundEnd::Abandoned)) => {
                // Nobody reads this stream any more: tell the peer to stop sending.
                tokio::select! {
                    _ = ctl.cancel.cancelled() => {}
                    _ = core.send(&ctl, Kind::Reset, &[]) => {}
                }
                true
            }
            Err(LinkGone) => true,
        },
    };
    if reset {
        ctl.flags.reset.store(true, Ordering::Release);
    }
    core.forget(&ctl);
    // Only now may the caller's end see the pipe close.
    drop((rd, wr));
}

/// Caller → peer: DATA within the peer's window, then EOF when the caller shuts down.
async fn outbound(
    core: &Core,
    ctl: &StreamCtl,
    rd: &mut ReadHalf<DuplexStream>,
) -> Result<(), LinkGone> {
    let mut chunk = vec![0u8; MAX_DATA];
    loop {
        let window = ctl.send_window().await;
        let n = rd
            .read(&mut chunk[..window.min(MAX_DATA)])
            .await
            .unwrap_or(0);
        if n == 0 {
            return core.send(ctl, Kind::Eof, &[]).await;
        }
        ctl.send_window.fetch_sub(n as u32, Ordering::AcqRel);
        core.send(ctl, Kind::Data, &chunk[..n]).await?;
    }
}

/// Peer → caller: delivers buffered DATA, then grants that much credit again.
async fn inbound(
    core: &Core,
    ctl: &StreamCtl,
    wr: &mut WriteHalf<DuplexStream>,
) -> Result<InboundEnd, LinkGone> {
    loop {
        let (chunk, eof) = {
            let mut inbound = ctl.inbound();
            (inbound.data.split().freeze(), inbound.eof)
        };
        if !chunk.is_empty() {
            if wr.write_all(&chunk).await.is_err() {
                return Ok(if eof {
                    InboundEnd::Eof
                } else {
                    InboundEnd::Abandoned
                });
            }
            if !eof {
                // `chunk` is at most one window, so this cannot overflow.
                ctl.inbound().window += chunk.len() as u32;
                let credit = (chunk.len() as u32).to_be_bytes();
                core.send(ctl, Kind::Credit, &credit).await?;
            }
        }
        if eof {
            ctl.flags.read_eof.store(true, Ordering::Release);
            let _ = wr.shutdown().await;
            return Ok(InboundEnd::Eof);
        }
        if chunk.is_empty() {
            tokio::select! {
                _ = ctl.inbound_ready.notified() => {}
                _ = ctl.flags.dropped.cancelled() => return Ok(drained(ctl).await),
            }
        }
    }
}

/// After the caller dropped its end with nothing left to read: waits for the peer's EOF, as
/// a closed socket does, unless the peer sends more, which nobody will read.
async fn drained(ctl: &StreamCtl) -> InboundEnd {
    loop {
        {
            let inbound = ctl.inbound();
            if !inbound.data.is_empty() {
                return InboundEnd::Abandoned;
            }
            if inbound.eof {
                return InboundEnd::Eof;
            }
        }
        ctl.inbound_ready.notified().await;
    }
}

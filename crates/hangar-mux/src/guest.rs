//! The guest side: the link port, read and written by two threads of their own for as long as
//! the guest runs, whichever host connects to it and however often.
//!
//! The port is a virtio-serial character device, opened once. A read returns 0 whenever no
//! host is connected, a write blocks meanwhile, and a disconnect may cut a frame anywhere. So
//! the guest only trusts the byte stream after a HELLO: until then (at start, after a read of
//! 0, after a protocol error) it discards bytes up to the next HELLO, and at a HELLO of a new
//! epoch it resets every stream and starts a new generation, whose frames alone get written.
//! It never waits on the port with epoll: while no host is connected the device reports a
//! hang-up all the time, so blocking calls on threads of their own, with a pause after each
//! empty read, are what keeps it from spinning.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::frame::{Decoder, Frame, ProtocolError, HEADER_LEN, HELLO_PREFIX};
use crate::link::{Core, Incoming, Outbox, Side};
use crate::MuxStream;

/// How long to wait before reading again while no host is connected.
const RETRY: Duration = Duration::from_millis(5);
const READ_CHUNK: usize = 64 * 1024;

/// The guest's end of the link port. Both methods block; they are called from two threads
/// at once.
pub trait Port: Send + Sync + 'static {
    /// Reads some bytes. `Ok(0)` means that no host is connected right now: the caller waits
    /// a little and reads again.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf`, blocking while no host is connected.
    fn write_all(&self, buf: &[u8]) -> io::Result<()>;
}

impl Port for File {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut &*self).read(buf)
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(&mut &*self, buf)
    }
}

/// Something worth a log line in the guest.
#[derive(Debug)]
pub enum GuestEvent {
    /// A host connected and the link is in step with its epoch.
    Synchronised {
        epoch: u64,
    },
    /// The host went away; every stream was reset.
    Disconnected,
    /// The host's bytes made no sense; every stream was reset, and the host is made to
    /// reconnect.
    Protocol(ProtocolError),
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    /// A thread could not be started; the link will never connect.
    NoThread(io::Error),
}

impl fmt::Display for GuestEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestEvent::Synchronised { epoch } => {
                write!(f, "link synchronised (epoch {epoch:016x})")
            }
            GuestEvent::Disconnected => write!(f, "the host disconnected; streams reset"),
            GuestEvent::Protocol(e) => write!(f, "protocol error, resynchronising: {e}"),
            GuestEvent::ReadFailed(e) => write!(f, "reading the link port: {e}"),
            GuestEvent::WriteFailed(e) => write!(f, "writing the link port: {e}"),
            GuestEvent::NoThread(e) => write!(f, "cannot start a link thread: {e}"),
        }
    }
}

type OnEvent = Arc<dyn Fn(GuestEvent) + Send + Sync>;

#[derive(Clone)]
pub struct GuestOptions {
    /// The most streams the link carries at once; the host's OPENs beyond get a RESET.
    pub max_streams: usize,
    /// Called (from the link's threads) for each [`GuestEvent`].
    pub on_event: Option<OnEvent>,
}

impl fmt::Debug for GuestOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestOptions")
            .field("max_streams", &self.max_streams)
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

impl Default for GuestOptions {
    fn default() -> GuestOptions {
        GuestOptions {
            max_streams: 1024,
            on_event: None,
        }
    }
}

/// The guest's link. Clones share it; it runs until the process ends.
#[derive(Clone)]
pub struct GuestLink {
    core: Arc<Core>,
}

impl fmt::Debug for GuestLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestLink")
            .field("synchronised", &self.is_synchronised())
            .finish()
    }
}

impl GuestLink {
    /// Starts serving `port` on two threads. `on_open` gets each stream the host opens, with
    /// its target; it is called on the reader thread (inside the runtime, so it may
    /// `tokio::spawn`) and must not block.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start<P: Port>(
        port: P,
        opts: GuestOptions,
        on_open: impl Fn(String, MuxStream) + Send + Sync + 'static,
    ) -> GuestLink {
        let (core, outbox) = Core::new(
            Side::Guest,
            false,
            opts.max_streams,
            Incoming::Callback(Box::new(on_open)),
            None,
            tokio::runtime::Handle::current(),
        );
        let port = Arc::new(port);
        let events = opts.on_event;
        let spawned = {
            let (core, port, events) = (core.clone(), port.clone(), events.clone());
            std::thread::Builder::new()
                .name("mux-read".into())
                .spawn(move || read_port(&core, &*port, events.as_ref()))
        }
        .and_then(|_| {
            let (core, events) = (core.clone(), events.clone());
            std::thread::Builder::new()
                .name("mux-write".into())
                .spawn(move || write_port(&core, outbox, &*port, events.as_ref()))
        });
        if let Err(e) = spawned {
            emit(events.as_ref(), GuestEvent::NoThread(e));
        }
        GuestLink { core }
    }

    /// Opens a stream to `target` on the host. Fails at once while no host is synchronised.
    pub async fn open(&self, target: &str) -> io::Result<MuxStream> {
        self.core.open(target).await
    }

    /// Whether a host is connected and in step.
    pub fn is_synchronised(&self) -> bool {
        self.core.is_live()
    }
}

fn emit(on_event: Option<&OnEvent>, event: GuestEvent) {
    if let Some(f) = on_event {
        f(event);
    }
}

/// The reader thread: scans for HELLO, then hands frames to the link until the host goes.
fn read_port(core: &Arc<Core>, port: &dyn Port, on_event: Option<&OnEvent>) {
    let runtime = core.runtime().clone();
    let _in_runtime = runtime.enter();
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; READ_CHUNK];
    // The host's epoch and this side's generation, while synchronised.
    let mut synced: Option<(u64, u64)> = None;
    // Reported once per run of failures, not every retry.
    let mut failing = false;
    loop {
        let n = match port.read(&mut buf) {
            Ok(n) => {
                failing = false;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    emit(on_event, GuestEvent::ReadFailed(e));
                }
                0
            }
        };
        if n == 0 {
            if synced.take().is_some() {
                core.restart(false);
                emit(on_event, GuestEvent::Disconnected);
            }
            dec.clear();
            std::thread::sleep(RETRY);
            continue;
        }
        dec.push(&buf[..n]);
        loop {
            // The writer thread may have given up on this generation.
            if synced.is_some_and(|(_, gen)| gen != core.gen()) {
                synced = None;
            }
            let Some((epoch, gen)) = synced else {
                if !dec.skip_to(&HELLO_PREFIX) {
                    break;
                }
                match dec.next_frame() {
                    Ok(Some(Frame::Hello { epoch })) => synced = synchronise(core, epoch, on_event),
                    Ok(None) => break,
                    // The prefix is a valid header and magic, so this cannot fail; but
                    // never loop on the same bytes.
                    _ => dec.discard(1),
                }
                continue;
            };
            let error = match dec.next_frame() {
                Ok(None) => break,
                // The host re-sends HELLO until it reads the answer: answer again.
                Ok(Some(Frame::Hello { epoch: e })) if e == epoch => {
                    let _ = core.send_control(gen, Frame::HelloAck { epoch }.encode());
                    continue;
                }
                Ok(Some(Frame::Hello { epoch })) => {
                    synced = synchronise(core, epoch, on_event);
                    continue;
                }
                Ok(Some(frame)) => match core.handle(frame) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            synced = None;
            let gen = core.restart(false);
            // A host that is still connected believes the link is fine and would never send
            // HELLO again: an invalid header makes it drop the connection and reconnect. (A
            // host that is only connecting discards it.)
            let _ = core.send_control(gen, Bytes::from_static(&[0; HEADER_LEN]));
            // Zero bytes are the padding a reconnecting host sends to get here.
            if error != ProtocolError::UnknownKind(0) {
                emit(on_event, GuestEvent::Protocol(error));
            }
        }
    }
}

/// Starts a new generation for the host's `epoch` and answers its HELLO.
fn synchronise(core: &Core, epoch: u64, on_event: Option<&OnEvent>) -> Option<(u64, u64)> {
    let gen = core.restart(true);
    if let Err(e) = core.send_control(gen, Frame::HelloAck { epoch }.encode()) {
        // The host will send HELLO again.
        core.restart(false);
        emit(on_event, GuestEvent::Protocol(e));
        return None;
    }
    emit(on_event, GuestEvent::Synchronised { epoch });
    Some((epoch, gen))
}

/// The writer thread: writes the current generation's frames, blocking while no host is
/// connected.
fn write_port(core: &Core, mut outbox: Outbox, port: &dyn Port, on_event: Option<&OnEvent>) {
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if !core.runtime().block_on(outbox.next_batch(core, &mut batch)) {
            return;
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = port.write_all(&batch) {
            emit(on_event, GuestEvent::WriteFailed(e));
            // Part of a frame may be gone: nothing of this generation can follow it.
            core.restart(false);
            std::thread::sleep(RETRY);
        }
    }
}

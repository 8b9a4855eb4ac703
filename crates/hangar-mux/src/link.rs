//! What both sides of a link share: the stream table, the handling of stream frames, and the
//! queues the writer drains. It knows nothing of sockets, ports or threads, and it never
//! waits in the reader's path: whatever the peer sends is either stored within a bound or
//! refused.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use crate::frame::{self, Frame, Kind, ProtocolError, MAX_TARGET};
use crate::stream::{self, StreamCtl};
use crate::MuxStream;

/// Frames the writer may batch into one write.
const BATCH_BYTES: usize = 64 * 1024;
/// Stream frames waiting for the writer; pumps wait when it is full.
const DATA_QUEUE: usize = 64;
/// Frames the reader queued (RESET, HELLO_ACK) waiting for the writer. The reader never waits,
/// so a peer that makes it answer faster than it reads breaks the link instead.
const CONTROL_QUEUE: usize = 4096;

/// Which side of the link this is: it decides the parity of the stream ids each side opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Host,
    Guest,
}

impl Side {
    fn first_local_id(self) -> u32 {
        match self {
            Side::Host => 1,
            Side::Guest => 2,
        }
    }

    /// Whether the peer may open a stream with this id: the host's ids are odd, the guest's
    /// even.
    fn is_peers(self, id: u32) -> bool {
        id % 2 != self.first_local_id() % 2
    }
}

/// An encoded frame on its way to the writer, tagged with the generation it belongs to.
#[derive(Debug)]
pub(crate) struct Out {
    pub gen: u64,
    pub bytes: Bytes,
}

/// Streams the peer opened that may wait for `HostLink::accept` at once.
pub(crate) const ACCEPT_QUEUE: usize = 64;

/// The stream's link (or its epoch) has ended.
#[derive(Debug)]
pub(crate) struct LinkGone;

/// What the link does with a stream the peer opened.
pub(crate) enum Incoming {
    /// Host: only these targets, handed to [`crate::HostLink::accept`].
    Accept(Vec<String>),
    /// Guest: every target, handed to this callback.
    Callback(Box<dyn Fn(String, MuxStream) + Send + Sync>),
}

pub(crate) struct Core {
    side: Side,
    max_streams: usize,
    incoming: Incoming,
    state: Mutex<State>,
    /// `State::gen`, readable by the writer without the lock.
    gen: AtomicU64,
    control_tx: mpsc::Sender<Out>,
    data_tx: mpsc::Sender<Out>,
    open_order: tokio::sync::Mutex<()>,
    runtime: tokio::runtime::Handle,
}

struct State {
    /// Host: connected. Guest: synchronised with a host.
    live: bool,
    /// Bumped whenever every stream is reset: on the guest, at each new epoch and desync.
    gen: u64,
    streams: HashMap<u32, Arc<StreamCtl>>,
    next_local: u32,
    /// The highest id the peer opened in this generation; its ids only grow.
    last_remote: u32,
    /// Host: where accepted streams go; taken when the link dies so `accept` ends.
    accepted: Option<mpsc::Sender<(String, MuxStream)>>,
}

/// The receiving ends of the writer's queues.
pub(crate) struct Outbox {
    control: mpsc::Receiver<Out>,
    data: mpsc::Receiver<Out>,
}

impl Core {
    pub fn new(
        side: Side,
        live: bool,
        max_streams: usize,
        incoming: Incoming,
        accepted: Option<mpsc::Sender<(String, MuxStream)>>,
        runtime: tokio::runtime::Handle,
    ) -> (Arc<Core>, Outbox) {
        let (control_tx, control) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data) = mpsc::channel(DATA_QUEUE);
        let core = Core {
            side,
            max_streams,
            incoming,
            state: Mutex::new(State {
                live,
                gen: 0,
                streams: HashMap::new(),
                next_local: side.first_local_id(),
                last_remote: 0,
                accepted,
            }),
            gen: AtomicU64::new(0),
            control_tx,
            data_tx,
            open_order: tokio::sync::Mutex::new(()),
            runtime,
        };
        (Arc::new(core), Outbox { control, data })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    pub fn is_live(&self) -> bool {
        self.state().live
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    #[cfg(test)]
    pub fn stream_count(&self) -> usize {
        self.state().streams.len()
    }

    /// Opens a stream to `target` on the peer's side.
    pub async fn open(self: &Arc<Self>, target: &str) -> io::Result<MuxStream> {
        if target.is_empty() || target.len() > MAX_TARGET || target.chars().any(char::is_control) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{target:?} is not a valid target (1 to {MAX_TARGET} printable bytes)"),
            ));
        }
        // OPENs must reach the peer in the order of their ids, which only grow.
        let _in_order = self.open_order.lock().await;
        let (ctl, stream, inner) = self.new_local_stream()?;
        let mut unsent = Unsent(self, Some(ctl.clone()));
        let queued = tokio::select! {
            // The guest's writer blocks while no host is connected; a desync must not leave
            // this waiting for it.
            _ = ctl.cancel.cancelled() => false,
            sent = self.send(&ctl, Kind::Open, target.as_bytes()) => sent.is_ok(),
        };
        if !queued {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the link was disconnected",
            ));
        }
        unsent.1 = None;
        self.runtime.spawn(stream::pump(self.clone(), ctl, inner));
        Ok(stream)
    }

    fn new_local_stream(&self) -> io::Result<(Arc<StreamCtl>, MuxStream, DuplexStream)> {
        let mut state = self.state();
        if !state.live {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the link is not connected",
            ));
        }
        if state.streams.len() >= self.max_streams {
            return Err(io::Error::other(format!(
                "the link already carries {} streams",
                self.max_streams
            )));
        }
        let id = state.next_local;
        state.next_local = id
            .checked_add(2)
            .ok_or_else(|| io::Error::other("the link has used up its stream ids; reconnect it"))?;
        let (ctl, stream, inner) = StreamCtl::new(id, state.gen);
        state.streams.insert(id, ctl.clone());
        Ok((ctl, stream, inner))
    }

    /// Handles a stream frame from the peer (HELLO is the caller's business). An error breaks
    /// the link; misbehaviour confined to one stream only resets that stream.
    pub fn handle(self: &Arc<Self>, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Hello { .. } => Err(ProtocolError::Unexpected(Kind::Hello)),
            // The guest answers every HELLO the host re-sent; the extra answers mean nothing.
            Frame::HelloAck { .. } if self.side == Side::Host => Ok(()),
            Frame::HelloAck { .. } => Err(ProtocolError::Unexpected(Kind::HelloAck)),
            Frame::Open { stream, target } => self.on_open(stream, target),
            Frame::Data { stream, payload } => match self.get(stream) {
                Some(ctl) => match ctl.on_data(&payload) {
                    Ok(()) => Ok(()),
                    Err(_) => self.reset(&ctl),
                },
                // A stream that ended here while the peer was still sending.
                None => Ok(()),
            },
            Frame::Eof { stream } => {
                if let Some(ctl) = self.get(stream) {
                    ctl.on_eof();
                }
                Ok(())
            }
            Frame::Reset { stream } => {
                let ctl = self.state().streams.remove(&stream);
                if let Some(ctl) = ctl {
                    ctl.cancel.cancel();
                }
                Ok(())
            }
            Frame::Credit { stream, bytes } => match self.get(stream) {
                Some(ctl) => match ctl.on_credit(bytes) {
                    Ok(()) => Ok(()),
                    Err(_) => self.reset(&ctl),
                },
                None => Ok(()),
            },
        }
    }

    fn get(&self, id: u32) -> Option<Arc<StreamCtl>> {
        self.state().streams.get(&id).cloned()
    }

    fn on_open(self: &Arc<Self>, id: u32, target: String) -> Result<(), ProtocolError> {
        let mut state = self.state();
        if !self.side.is_peers(id) || id <= state.last_remote {
            return Err(ProtocolError::StreamId(id));
        }
        state.last_remote = id;
        let allowed = match &self.incoming {
            Incoming::Accept(targets) => targets.contains(&target),
            Incoming::Callback(_) => true,
        };
        if !allowed || state.streams.len() >= self.max_streams {
            let gen = state.gen;
            drop(state);
            return self.send_control(gen, Frame::Reset { stream: id }.encode());
        }
        let (ctl, stream, inner) = StreamCtl::new(id, state.gen);
        state.streams.insert(id, ctl.clone());
        let accepted = state.accepted.clone();
        drop(state);
        self.runtime
            .spawn(stream::pump(self.clone(), ctl.clone(), inner));
        match &self.incoming {
            Incoming::Accept(_) => {
                // Bounded: a peer that opens streams faster than they are accepted (and resets
                // them, so that they leave the table) gets RESETs instead of growing a queue.
                let queued = accepted.is_some_and(|tx| tx.try_send((target, stream)).is_ok());
                if !queued {
                    return self.reset(&ctl);
                }
            }
            Incoming::Callback(on_open) => on_open(target, stream),
        }
        Ok(())
    }

    /// Resets a stream the peer misused, and tells the peer.
    fn reset(&self, ctl: &Arc<StreamCtl>) -> Result<(), ProtocolError> {
        self.forget(ctl);
        ctl.cancel.cancel();
        self.send_control(ctl.gen, Frame::Reset { stream: ctl.id }.encode())
    }

    /// Removes a stream from the table (if it is still this very stream).
    pub fn forget(&self, ctl: &Arc<StreamCtl>) {
        let mut state = self.state();
        if state
            .streams
            .get(&ctl.id)
            .is_some_and(|c| Arc::ptr_eq(c, ctl))
        {
            state.streams.remove(&ctl.id);
        }
    }

    /// Queues a frame from the reader, without waiting.
    pub fn send_control(&self, gen: u64, bytes: Bytes) -> Result<(), ProtocolError> {
        self.control_tx
            .try_send(Out { gen, bytes })
            .map_err(|_| ProtocolError::Backlog)
    }

    /// Queues a frame of a stream, waiting while the writer is behind.
    pub async fn send(&self, ctl: &StreamCtl, kind: Kind, payload: &[u8]) -> Result<(), LinkGone> {
        let bytes = frame::encode(kind, ctl.id, payload);
        self.data_tx
            .send(Out {
                gen: ctl.gen,
                bytes,
            })
            .await
            .map_err(|_| LinkGone)
    }

    /// Resets every stream and starts a new generation, `live` or not. Frames queued for the
    /// old generation will not be written. Returns the new generation.
    pub fn restart(&self, live: bool) -> u64 {
        let mut state = self.state();
        state.gen += 1;
        self.gen.store(state.gen, Ordering::Release);
        state.live = live;
        state.next_local = self.side.first_local_id();
        state.last_remote = 0;
        if !live {
            state.accepted = None;
        }
        let streams: Vec<_> = state.streams.drain().map(|(_, ctl)| ctl).collect();
        drop(state);
        for ctl in streams {
            ctl.cancel.cancel();
        }
        self.gen()
    }
}

/// A stream whose OPEN was not queued (its `open` failed or was dropped): forgotten again.
struct Unsent<'a>(&'a Core, Option<Arc<StreamCtl>>);

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(ctl) = self.1.take() {
            self.0.forget(&ctl);
            ctl.cancel.cancel();
        }
    }
}

impl Outbox {
    /// Waits for at least one frame, then appends to `batch` whatever else is queued (up to a
    /// bound), leaving out frames of a generation other than the current one. Control frames
    /// go first. Returns `false` once the queues are closed.
    pub async fn next_batch(&mut self, core: &Core, batch: &mut Vec<u8>) -> bool {
        let first = tokio::select! {
            biased;
            Some(out) = self.control.recv() => out,
            Some(out) = self.data.recv() => out,
            else => return false,
        };
        keep(core, first, batch);
        while batch.len() < BATCH_BYTES {
            match self.control.try_recv().or_else(|_| self.data.try_recv()) {
                Ok(out) => keep(core, out, batch),
                Err(_) => break,
            }
        }
        true
    }
}

fn keep(core: &Core, out: Out, batch: &mut Vec<u8>) {
    // Loaded afresh for each frame: a HELLO_ACK of a new generation can be in this very
    // batch, and nothing of the old one may follow it.
    if out.gen == core.gen() {
        batch.extend_from_slice(&out.bytes);
    }
}

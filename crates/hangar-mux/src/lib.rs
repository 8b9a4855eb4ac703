//! `hangar-mux`: many byte streams over the one virtio-serial port that links a microVM to
//! its host. The host side ([`HostLink`]) runs in `hangar serve` and connects to the unix
//! socket QEMU serves for the port; the guest side ([`GuestLink`]) runs in `hangar-init`, PID 1
//! of the VM, on the port's character device.
//!
//! The guest is untrusted: the host side must never panic on its bytes, never let it grow
//! memory without bound, and never let it open a stream to a target the host did not allow.
//! This crate does no logging (the guest side reports [`GuestEvent`]s to a callback), since
//! `hangar-init` has no `tracing`.
//!
//! # API
//!
//! - [`MuxStream`]: `AsyncRead + AsyncWrite + Unpin + Send`. `shutdown` sends EOF; reading
//!   returns 0 after the peer's EOF; reads and writes fail with `ConnectionReset` after a RESET,
//!   the end of the link, or a new epoch. Dropping it closes it like a socket: EOF, then a
//!   RESET only if the peer sends more.
//! - Host: [`HostLink::connect`]`(path, HostOptions) -> io::Result<HostLink>` (retries while
//!   the socket is missing, then the HELLO handshake), [`HostLink::handshake`] on a socket
//!   already connected, `open(target).await`, `accept().await` (the guest's streams to the
//!   targets in [`HostOptions::accept`]), `closed().await` (why the connection ended),
//!   `close()`. One `HostLink` is one connection and one epoch; reconnecting makes a new one.
//! - Guest: [`GuestLink::start`]`(port, GuestOptions, on_open)` inside a tokio runtime: two
//!   threads read and write the [`Port`] (a `std::fs::File`) with blocking calls for ever,
//!   following every host that connects; `on_open(target, stream)` gets the host's streams;
//!   `open(target).await` fails at once while no host is in step.
//!
//! # Protocol
//!
//! Frames are a 12-byte header `[kind u8][0u8; 3][stream u32 BE][len u32 BE]` and at most
//! 64 KiB of payload (see [`frame`]): HELLO (host → guest, `b"HANGARMX"` + epoch u64), HELLO_ACK (the
//! guest's answer, same payload), OPEN (a target name of 1 to 64 bytes), DATA (≤ 32 KiB),
//! EOF (the sender's half-close), RESET (abort), CREDIT (u32 bytes consumed). A bigger payload,
//! an unknown kind, or a length the kind does not allow breaks the link. The host opens odd
//! stream ids, the guest even ones, each side's in increasing order, never reused in an epoch.
//!
//! Epochs: on each connection the host picks a random epoch and sends a little over 64 KiB of
//! zeros (they complete any frame the previous connection cut off, then read as an invalid
//! header, which puts a guest still in step with the old epoch out of step), then
//! HELLO(epoch) every 100 ms, discarding what it reads until HELLO_ACK(epoch). The guest,
//! when not in step (at start, after a read of 0 — no host — or a protocol error), discards
//! bytes up to the next HELLO. A HELLO with a new epoch resets every stream and starts a new
//! generation on the guest; frames queued in an older one are dropped by the writer instead
//! of written. A HELLO with the current epoch is only answered again. After a protocol error
//! the guest sends an invalid header, so that a host still connected drops the connection
//! and reconnects. No stream outlives its epoch on either side.
//!
//! Flow control: each direction of each stream has a window of [`WINDOW`] bytes of DATA; the
//! receiver returns CREDIT once it has delivered bytes to the stream's reader. More DATA than
//! the window, DATA after EOF, or CREDIT beyond the window resets that stream. The link's
//! reader never waits for a stream's reader, so a slow one only stalls its own stream.
//!
//! Memory on the host side is bounded by `max_streams` (256 by default) × (one window + the
//! 64 KiB pipe to the caller + a 32 KiB send buffer), plus one frame in the decoder, bounded
//! write queues, and at most 64 opened streams waiting for `accept` (more are RESET).

pub mod frame;
mod guest;
mod host;
mod link;
mod stream;
#[cfg(test)]
mod tests;

pub use frame::ProtocolError;
pub use guest::{GuestEvent, GuestLink, GuestOptions, Port};
pub use host::{HostLink, HostOptions, LinkError};
pub use stream::MuxStream;

/// DATA bytes a sender may have in flight on one stream and direction.
pub const WINDOW: u32 = 256 * 1024;

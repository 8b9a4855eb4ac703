//! Both sides together over a fake link port, and the host side against a hand-written
//! hostile guest.
//!
//! The fake port behaves as the guest's virtio-serial device does: a read returns 0 while no
//! host is connected, a write blocks meanwhile, and a host that reconnects before the guest
//! noticed leaves whatever bytes it wants queued (a cut frame, garbage) ahead of the new ones.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::frame::{self, Decoder, Frame, Kind, HELLO_PREFIX, MAX_DATA};
use crate::link::{Core, Incoming, Side};
use crate::{
    GuestEvent, GuestLink, GuestOptions, HostLink, HostOptions, LinkError, MuxStream, Port,
    ProtocolError, WINDOW,
};

const LIMIT: Duration = Duration::from_secs(60);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

#[derive(Clone, Default)]
struct FakePort {
    shared: Arc<(Mutex<FakeState>, Condvar)>,
}

#[derive(Default)]
struct FakeState {
    conn: Option<(u64, Arc<StdUnixStream>)>,
    /// Bytes the guest reads before the current connection's.
    stale: VecDeque<u8>,
    serial: u64,
}

impl FakePort {
    /// A host connects; returns its end. A previous connection ends without the guest reading
    /// 0 in between. The guest reads `to_guest` first, the host `to_host`.
    fn connect(&self, to_guest: &[u8], to_host: &[u8]) -> UnixStream {
        let (guest, host) = StdUnixStream::pair().unwrap();
        (&guest).write_all(to_host).unwrap();
        let (lock, cond) = &*self.shared;
        let mut state = lock.lock().unwrap();
        if let Some((_, old)) = state.conn.take() {
            let _ = old.shutdown(Shutdown::Both);
        }
        state.stale.extend(to_guest);
        state.serial += 1;
        state.conn = Some((state.serial, Arc::new(guest)));
        cond.notify_all();
        host.set_nonblocking(true).unwrap();
        UnixStream::from_std(host).unwrap()
    }
}

impl Port for FakePort {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let (serial, sock) = {
                let mut state = self.shared.0.lock().unwrap();
                if !state.stale.is_empty() {
                    let n = buf.len().min(state.stale.len());
                    for (b, s) in buf.iter_mut().zip(state.stale.drain(..n)) {
                        *b = s;
                    }
                    return Ok(n);
                }
                match &state.conn {
                    None => return Ok(0),
                    Some((serial, sock)) => (*serial, sock.clone()),
                }
            };
            if let Ok(n @ 1..) = (&*sock).read(buf) {
                return Ok(n);
            }
            let mut state = self.shared.0.lock().unwrap();
            if state.conn.as_ref().is_some_and(|(s, _)| *s == serial) {
                state.conn = None;
                return Ok(0);
            }
            // Replaced by a newer connection: carry on with it.
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let sock = {
            let (lock, cond) = &*self.shared;
            let mut state = lock.lock().unwrap();
            loop {
                if let Some((_, sock)) = &state.conn {
                    break sock.clone();
                }
                state = cond.wait(state).unwrap();
            }
        };
        // A disconnect cuts the write short; the rest is lost, as on the device.
        let _ = (&*sock).write_all(buf);
        Ok(())
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h = (*h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The services both sides offer in these tests.
async fn serve(target: String, mut stream: MuxStream) {
    match target.as_str() {
        "echo" => {
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
        // Reads to EOF, then answers in upper case.
        "upper" => {
            let mut all = Vec::new();
            if stream.read_to_end(&mut all).await.is_ok() {
                let _ = stream.write_all(&all.to_ascii_uppercase()).await;
                let _ = stream.shutdown().await;
            }
        }
        // Reads to EOF, then answers with the length and checksum.
        "sink" => {
            let (mut len, mut sum) = (0usize, FNV_START);
            let mut buf = vec![0; 50_000];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        len += n;
                        fnv(&mut sum, &buf[..n]);
                    }
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(format!("{len} {sum}").as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        // Writes 5 MiB of `pattern(_, 7)`, then EOF.
        "source" => {
            let _ = stream.write_all(&pattern(5 << 20, 7)).await;
            let _ = stream.shutdown().await;
        }
        _ => {}
    }
}

fn host_opts() -> HostOptions {
    HostOptions {
        hello_timeout: Duration::from_secs(10),
        accept: vec!["echo".into(), "upper".into()],
        ..HostOptions::default()
    }
}

fn start_guest(port: &FakePort) -> GuestLink {
    GuestLink::start(port.clone(), GuestOptions::default(), |target, stream| {
        tokio::spawn(serve(target, stream));
    })
}

/// Serves the guest's streams on the host until the link closes.
fn serve_accepted(link: &Arc<HostLink>) {
    let link = link.clone();
    tokio::spawn(async move {
        while let Some((target, stream)) = link.accept().await {
            tokio::spawn(serve(target, stream));
        }
    });
}

async fn echo(stream: &mut MuxStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_streams_both_ways() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    let host = Arc::new(
        within(HostLink::handshake(port.connect(b"", b""), host_opts()))
            .await
            .unwrap(),
    );
    serve_accepted(&host);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40u8 {
        let host = host.clone();
        tasks.spawn(async move {
            let data = pattern(100_000 + usize::from(i) * 1000, i);
            let mut s = host.open("echo").await.unwrap();
            assert_eq!(s.id() % 2, 1);
            assert!(echo(&mut s, &data).await == data, "host stream {i}");
        });
        let guest = guest.clone();
        tasks.spawn(async move {
            let data = pattern(50_000 + usize::from(i) * 777, i ^ 0x55);
            let mut s = guest.open("echo").await.unwrap();
            assert_eq!(s.id() % 2, 0);
            assert!(echo(&mut s, &data).await == data, "guest stream {i}");
        });
    }
    within(async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await;
    within(async {
        while host.stream_count() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_reply() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    let host = Arc::new(
        within(HostLink::handshake(port.connect(b"", b""), host_opts()))
            .await
            .unwrap(),
    );
    serve_accepted(&host);
    for mut s in [
        host.open("upper").await.unwrap(),
        guest.open("upper").await.unwrap(),
    ] {
        s.write_all(b"hello, ").await.unwrap();
        s.write_all(b"world").await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = String::new();
        within(s.read_to_string(&mut reply)).await.unwrap();
        assert_eq!(reply, "HELLO, WORLD");
        // After EOF, reads keep returning 0.
        assert_eq!(s.read(&mut [0; 8]).await.unwrap(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_transfer_flows_past_a_stalled_stream() {
    let port = FakePort::default();
    let _guest = start_guest(&port);
    let host = within(HostLink::handshake(port.connect(b"", b""), host_opts()))
        .await
        .unwrap();
    // The guest writes 5 MiB into this stream, which nobody reads for now.
    let mut stalled = host.open("source").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut big = host.open("sink").await.unwrap();
    let (mut len, mut sum) = (0usize, FNV_START);
    for i in 0..20u8 {
        let chunk = pattern(1 << 20, i);
        fnv(&mut sum, &chunk);
        len += chunk.len();
        within(big.write_all(&chunk)).await.unwrap();
    }
    big.shutdown().await.unwrap();
    let mut reply = String::new();
    within(big.read_to_string(&mut reply)).await.unwrap();
    assert_eq!(reply, format!("{len} {sum}"));

    // The stalled stream lost nothing meanwhile, and the guest never had more in flight
    // than the window allows.
    let mut got = Vec::new();
    within(async {
        let mut buf = vec![0; 10_000];
        loop {
            let n = stalled.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            // A slow reader.
            if got.len() < 200_000 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .await;
    assert!(got == pattern(5 << 20, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resets_the_old_streams_and_new_ones_work() {
    let port = FakePort::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let events = seen.clone();
    let guest = GuestLink::start(
        port.clone(),
        GuestOptions {
            on_event: Some(Arc::new(move |e: GuestEvent| {
                events.lock().unwrap().push(e.to_string())
            })),
            ..GuestOptions::default()
        },
        |target, stream| {
            tokio::spawn(serve(target, stream));
        },
    );
    let old = Arc::new(
        within(HostLink::handshake(port.connect(b"", b""), host_opts()))
            .await
            .unwrap(),
    );
    serve_accepted(&old);
    let mut from_host = old.open("echo").await.unwrap();
    from_host.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    within(from_host.read_exact(&mut buf)).await.unwrap();
    let mut from_guest = guest.open("echo").await.unwrap();
    from_guest.write_all(b"pong").await.unwrap();
    within(from_guest.read_exact(&mut buf)).await.unwrap();

    // A new connection, as after a restore; the guest never read 0 in between.
    let new = Arc::new(
        within(HostLink::handshake(port.connect(b"", b""), host_opts()))
            .await
            .unwrap(),
    );
    assert_ne!(new.epoch(), old.epoch());
    let why = within(old.closed()).await;
    assert!(matches!(why, LinkError::Eof | LinkError::Write(_)), "{why}");
    assert_eq!(old.stream_count(), 0);
    for s in [&mut from_host, &mut from_guest] {
        let e = within(s.read(&mut buf)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e = s.write_all(b"more").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    serve_accepted(&new);
    let mut s = new.open("echo").await.unwrap();
    assert_eq!(within(echo(&mut s, b"again")).await, b"again");
    let mut s = guest.open("upper").await.unwrap();
    assert_eq!(within(echo(&mut s, b"again")).await, b"AGAIN");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter()
            .filter(|e| e.starts_with("link synchronised"))
            .count(),
        2,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_recovers_from_a_cut_frame_and_stale_bytes() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    let old = within(HostLink::handshake(port.connect(b"", b""), host_opts()))
        .await
        .unwrap();
    let mut s = old.open("echo").await.unwrap();
    assert_eq!(within(echo(&mut s, b"x")).await, b"x");
    // The old host was cut off inside a large DATA frame; the guest, still in step with the
    // old epoch, reads its first half before the new host's bytes. The guest's last frame
    // to the old host was cut too, and some garbage waits for the new host.
    let cut_to_guest = frame::encode(Kind::Data, 1, &[b'd'; MAX_DATA]).slice(..1000);
    let mut to_host = frame::encode(Kind::Data, 2, &[b'e'; MAX_DATA])
        .slice(..777)
        .to_vec();
    to_host.extend_from_slice(&Frame::HelloAck { epoch: 1 }.encode());
    to_host.extend_from_slice(b"garbage");
    let started = Instant::now();
    let new = within(HostLink::handshake(
        port.connect(&cut_to_guest, &to_host),
        host_opts(),
    ))
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut s = new.open("echo").await.unwrap();
    assert_eq!(within(echo(&mut s, b"after")).await, b"after");
    let mut s = guest.open("echo").await.unwrap();
    let new = Arc::new(new);
    serve_accepted(&new);
    assert_eq!(within(echo(&mut s, b"back")).await, b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_the_first_hello_is_skipped() {
    let port = FakePort::default();
    let _guest = start_guest(&port);
    let mut to_guest = b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10HANGAR".to_vec();
    to_guest.extend_from_slice(&[0xff; 5000]);
    to_guest.extend_from_slice(&frame::encode(Kind::Open, 1, b"echo")[..10]);
    let to_host = frame::encode(Kind::HelloAck, 0, b"HANGARMX\0\0\0\0\0\0\0\x07")[..20].to_vec();
    let host = within(HostLink::handshake(
        port.connect(&to_guest, &to_host),
        host_opts(),
    ))
    .await
    .unwrap();
    let mut s = host.open("echo").await.unwrap();
    assert_eq!(within(echo(&mut s, b"clean")).await, b"clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_open_fails_while_no_host_is_connected() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!guest.is_synchronised());
    let e = guest.open("echo").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    // Connected, then gone: refused again.
    let host = within(HostLink::handshake(port.connect(b"", b""), host_opts()))
        .await
        .unwrap();
    assert!(guest.is_synchronised());
    guest.open("echo").await.unwrap();
    drop(host);
    within(async {
        while guest.is_synchronised() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(guest.open("echo").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_cannot_open_targets_the_host_does_not_allow() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    let host = Arc::new(
        within(HostLink::handshake(port.connect(b"", b""), host_opts()))
            .await
            .unwrap(),
    );
    serve_accepted(&host);
    let mut refused = guest.open("control").await.unwrap();
    let e = within(refused.read(&mut [0; 8])).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    let mut allowed = guest.open("echo").await.unwrap();
    assert_eq!(within(echo(&mut allowed, b"ok")).await, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_to_a_stream_the_peer_dropped_is_reset() {
    let port = FakePort::default();
    let _guest = start_guest(&port);
    let host = within(HostLink::handshake(port.connect(b"", b""), host_opts()))
        .await
        .unwrap();
    // The guest serves no such target and drops the stream at once: a closed socket.
    let mut s = host.open("nothing").await.unwrap();
    assert_eq!(within(s.read(&mut [0; 8])).await.unwrap(), 0);
    let e = within(async {
        loop {
            if let Err(e) = s.write_all(&[0; 1000]).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(host.stream_count(), 0);
}

/// A guest written by hand: answers the HELLO, then sends whatever a test wants.
struct RawGuest {
    sock: UnixStream,
    dec: Decoder,
}

impl RawGuest {
    async fn connect(opts: HostOptions) -> (HostLink, RawGuest) {
        let (host, sock) = UnixStream::pair().unwrap();
        let mut guest = RawGuest {
            sock,
            dec: Decoder::default(),
        };
        let answer = async {
            loop {
                if guest.dec.skip_to(&HELLO_PREFIX) {
                    if let Some(Frame::Hello { epoch }) = guest.dec.next_frame().unwrap() {
                        guest.send(&Frame::HelloAck { epoch }.encode()).await;
                        return;
                    }
                }
                guest.fill().await;
            }
        };
        let (link, ()) =
            within(async { tokio::join!(HostLink::handshake(host, opts), answer) }).await;
        (link.unwrap(), guest)
    }

    async fn fill(&mut self) {
        let n = self.sock.read_buf(self.dec.buffer()).await.unwrap();
        assert!(n > 0, "the host closed the socket");
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    /// The next frame from the host that is not a CREDIT or a repeated HELLO.
    async fn next(&mut self) -> Frame {
        within(async {
            loop {
                match self.dec.next_frame().unwrap() {
                    Some(Frame::Credit { .. } | Frame::Hello { .. }) => {}
                    Some(f) => return f,
                    None => self.fill().await,
                }
            }
        })
        .await
    }
}

fn open(stream: u32, target: &str) -> Vec<u8> {
    Frame::Open {
        stream,
        target: target.into(),
    }
    .encode()
    .to_vec()
}

fn egress_only() -> HostOptions {
    HostOptions {
        accept: vec!["egress".into()],
        max_streams: 4,
        ..HostOptions::default()
    }
}

#[tokio::test]
async fn a_hostile_guest_breaks_only_its_link() {
    let header = |kind: u8, stream: u32, len: u32| {
        let mut h = vec![kind, 0, 0, 0];
        h.extend_from_slice(&stream.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    };
    let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
        (header(4, 2, 1 << 30), ProtocolError::TooLong(1 << 30)),
        (header(9, 2, 0), ProtocolError::UnknownKind(9)),
        (
            header(4, 2, 40_000),
            ProtocolError::BadLength {
                kind: Kind::Data,
                len: 40_000,
            },
        ),
        (open(3, "egress"), ProtocolError::StreamId(3)),
        (
            [open(2, "egress"), open(2, "egress")].concat(),
            ProtocolError::StreamId(2),
        ),
        (
            Frame::Hello { epoch: 1 }.encode().to_vec(),
            ProtocolError::Unexpected(Kind::Hello),
        ),
    ];
    for (bytes, expect) in cases {
        let (link, mut guest) = RawGuest::connect(egress_only()).await;
        let mut victim = link.open("control").await.unwrap();
        guest.send(&bytes).await;
        assert_eq!(within(link.closed()).await, LinkError::Protocol(expect));
        assert_eq!(link.stream_count(), 0);
        let e = within(victim.read(&mut [0; 8])).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(link.open("control").await.is_err());
    }
}

#[tokio::test]
async fn the_host_refuses_targets_and_streams_beyond_the_cap() {
    let (link, mut guest) = RawGuest::connect(egress_only()).await;
    guest.send(&open(2, "control")).await;
    assert_eq!(guest.next().await, Frame::Reset { stream: 2 });
    let mut accepted = Vec::new();
    for id in [4, 6, 8, 10, 12] {
        guest.send(&open(id, "egress")).await;
    }
    assert_eq!(guest.next().await, Frame::Reset { stream: 12 });
    for _ in 0..4 {
        accepted.push(within(link.accept()).await.unwrap());
    }
    assert!(accepted.iter().all(|(t, _)| t == "egress"));
    assert_eq!(link.stream_count(), 4);
    // Refusing is no error: the link carries on.
    guest.send(&Frame::Reset { stream: 4 }.encode()).await;
    guest.send(&open(14, "egress")).await;
    let (_, mut s) = within(link.accept()).await.unwrap();
    assert_eq!(s.id(), 14);
    guest
        .send(
            &Frame::Data {
                stream: 14,
                payload: "hi".into(),
            }
            .encode(),
        )
        .await;
    let mut buf = [0; 2];
    within(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hi");
}

#[tokio::test]
async fn window_violations_reset_only_their_stream() {
    let (link, mut guest) = RawGuest::connect(egress_only()).await;
    // DATA beyond the window on a stream nobody reads.
    guest.send(&open(2, "egress")).await;
    let (_, mut unread) = within(link.accept()).await.unwrap();
    let chunk = Frame::Data {
        stream: 2,
        payload: vec![1; MAX_DATA].into(),
    }
    .encode();
    // The host credits at most what fits the pipe to its reader: this is more than that.
    for _ in 0..(WINDOW as usize + 128 * 1024) / MAX_DATA {
        guest.send(&chunk).await;
    }
    assert_eq!(guest.next().await, Frame::Reset { stream: 2 });
    let mut sink = Vec::new();
    let e = within(unread.read_to_end(&mut sink)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert!(sink.len() <= WINDOW as usize + 128 * 1024);

    // CREDIT the host never needed.
    let mut mine = link.open("agent").await.unwrap();
    assert_eq!(
        guest.next().await,
        Frame::Open {
            stream: 1,
            target: "agent".into()
        }
    );
    guest
        .send(
            &Frame::Credit {
                stream: 1,
                bytes: 1,
            }
            .encode(),
        )
        .await;
    assert_eq!(guest.next().await, Frame::Reset { stream: 1 });
    let e = within(mine.read(&mut [0; 8])).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);

    // DATA after EOF.
    guest.send(&open(4, "egress")).await;
    let (_, _s) = within(link.accept()).await.unwrap();
    guest.send(&Frame::Eof { stream: 4 }.encode()).await;
    guest
        .send(
            &Frame::Data {
                stream: 4,
                payload: "late".into(),
            }
            .encode(),
        )
        .await;
    assert_eq!(guest.next().await, Frame::Reset { stream: 4 });

    // The link itself is fine.
    assert_eq!(link.stream_count(), 0);
    let mut s = link.open("agent").await.unwrap();
    assert_eq!(
        guest.next().await,
        Frame::Open {
            stream: 3,
            target: "agent".into()
        }
    );
    s.write_all(b"still").await.unwrap();
    assert_eq!(
        guest.next().await,
        Frame::Data {
            stream: 3,
            payload: "still".into()
        }
    );
}

#[tokio::test]
async fn random_bytes_from_the_guest_do_not_panic_or_leak() {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50 {
        let (link, mut guest) = RawGuest::connect(egress_only()).await;
        let _mine = link.open("agent").await.unwrap();
        // Valid frames with hostile fields, then random bytes.
        let mut bytes = Vec::new();
        for _ in 0..20 {
            let stream = (next() % 8) as u32;
            let f = match next() % 6 {
                0 => open(stream.max(1), "egress"),
                1 => frame::encode(
                    Kind::Data,
                    stream.max(1),
                    &vec![0; (next() % 5000) as usize],
                )
                .to_vec(),
                2 => Frame::Credit {
                    stream: stream.max(1),
                    bytes: next() as u32,
                }
                .encode()
                .to_vec(),
                3 => Frame::Eof {
                    stream: stream.max(1),
                }
                .encode()
                .to_vec(),
                4 => Frame::Reset {
                    stream: stream.max(1),
                }
                .encode()
                .to_vec(),
                _ => (0..next() % 40).map(|_| next() as u8 % 9).collect(),
            };
            bytes.extend_from_slice(&f);
        }
        guest.send(&bytes).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        link.close();
        let _ = within(link.closed()).await;
        assert_eq!(link.stream_count(), 0);
        assert!(within(link.accept())
            .await
            .is_none_or(|(t, _)| t == "egress"));
    }
}

#[tokio::test]
async fn hello_times_out_when_nobody_answers() {
    let (host, _silent) = UnixStream::pair().unwrap();
    let opts = HostOptions {
        hello_timeout: Duration::from_millis(300),
        ..HostOptions::default()
    };
    let e = within(HostLink::handshake(host, opts)).await.err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn connect_waits_for_the_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("link.sock");
    let bind_at = path.clone();
    let qemu = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = tokio::net::UnixListener::bind(&bind_at).unwrap();
        let (sock, _) = listener.accept().await.unwrap();
        // Answer like a guest.
        let mut guest = RawGuest {
            sock,
            dec: Decoder::default(),
        };
        loop {
            if guest.dec.skip_to(&HELLO_PREFIX) {
                if let Some(Frame::Hello { epoch }) = guest.dec.next_frame().unwrap() {
                    guest.send(&Frame::HelloAck { epoch }.encode()).await;
                    return guest;
                }
            }
            guest.fill().await;
        }
    });
    let link = within(HostLink::connect(&path, HostOptions::default()))
        .await
        .unwrap();
    let _guest = qemu.await.unwrap();
    assert!(link.open("control").await.is_ok());

    let missing = dir.path().join("missing.sock");
    let opts = HostOptions {
        connect_timeout: Duration::from_millis(200),
        ..HostOptions::default()
    };
    let e = within(HostLink::connect(&missing, opts))
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
}

/// A host written by hand against the real guest, over the fake port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_answers_repeated_hellos_and_resyncs_after_errors() {
    let port = FakePort::default();
    let guest = start_guest(&port);
    let mut host = RawGuest {
        sock: port.connect(b"", b""),
        dec: Decoder::default(),
    };
    host.send(&Frame::Hello { epoch: 5 }.encode()).await;
    assert_eq!(host.next().await, Frame::HelloAck { epoch: 5 });
    host.send(&open(1, "echo")).await;
    // A re-sent HELLO changes nothing: stream 1 still echoes.
    host.send(&Frame::Hello { epoch: 5 }.encode()).await;
    assert_eq!(host.next().await, Frame::HelloAck { epoch: 5 });
    host.send(
        &Frame::Data {
            stream: 1,
            payload: "abc".into(),
        }
        .encode(),
    )
    .await;
    assert_eq!(
        host.next().await,
        Frame::Data {
            stream: 1,
            payload: "abc".into()
        }
    );

    // Nonsense: the guest drops out of step, ignores frames until the next HELLO, and sends
    // an invalid header so that a real host would reconnect.
    host.send(&[9, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).await;
    host.send(
        &Frame::Data {
            stream: 1,
            payload: "lost".into(),
        }
        .encode(),
    )
    .await;
    within(async {
        loop {
            match host.dec.next_frame() {
                Err(e) => return assert_eq!(e, ProtocolError::UnknownKind(0)),
                Ok(None) => host.fill().await,
                Ok(Some(_)) => {}
            }
        }
    })
    .await;
    host.dec.discard(frame::HEADER_LEN);
    assert!(!guest.is_synchronised());
    host.send(&Frame::Hello { epoch: 6 }.encode()).await;
    assert_eq!(host.next().await, Frame::HelloAck { epoch: 6 });
    // Stream ids start over in the new epoch.
    host.send(&open(1, "echo")).await;
    host.send(
        &Frame::Data {
            stream: 1,
            payload: "new".into(),
        }
        .encode(),
    )
    .await;
    assert_eq!(
        host.next().await,
        Frame::Data {
            stream: 1,
            payload: "new".into()
        }
    );
}

#[tokio::test]
async fn the_writer_drops_frames_of_an_old_generation() {
    let (core, mut outbox) = Core::new(
        Side::Guest,
        false,
        8,
        Incoming::Callback(Box::new(|_, _| {})),
        None,
        tokio::runtime::Handle::current(),
    );
    let old = core.restart(true);
    core.send_control(old, Frame::Reset { stream: 1 }.encode())
        .unwrap();
    let new = core.restart(true);
    let ack = Frame::HelloAck { epoch: 9 }.encode();
    core.send_control(new, ack.clone()).unwrap();
    core.send_control(old, Frame::Reset { stream: 3 }.encode())
        .unwrap();
    let mut batch = Vec::new();
    assert!(outbox.next_batch(&core, &mut batch).await);
    assert_eq!(batch, ack);
}

/// A guest that opens and at once resets streams nobody accepts cannot grow the host's
/// queue of opened streams: past `ACCEPT_QUEUE` it gets RESETs.
#[tokio::test]
async fn opened_streams_waiting_for_accept_are_bounded() {
    let (link, mut guest) = RawGuest::connect(egress_only()).await;
    let total = crate::link::ACCEPT_QUEUE as u32 + 20;
    for i in 1..=total {
        guest.send(&open(2 * i, "egress")).await;
        guest.send(&Frame::Reset { stream: 2 * i }.encode()).await;
    }
    // The first ACCEPT_QUEUE wait for accept; every one past them is refused.
    let mut refused = Vec::new();
    while refused.len() < 20 {
        match guest.next().await {
            Frame::Reset { stream } => refused.push(stream),
            other => panic!("unexpected {other:?}"),
        }
    }
    let first_refused = 2 * (crate::link::ACCEPT_QUEUE as u32 + 1);
    assert_eq!(
        refused,
        (0..20).map(|i| first_refused + 2 * i).collect::<Vec<_>>()
    );
    assert_eq!(link.stream_count(), 0, "reset streams left the table");
}

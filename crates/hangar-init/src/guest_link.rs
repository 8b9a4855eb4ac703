//! The guest side of a microVM's links: the host's streams on the link port reach the control
//! socket or the agent's port, and every connection to `egress.sock` (the proxy's way out)
//! becomes a stream to the host. See `hangar-mux` for how one port carries them all and
//! survives the host reconnecting (a restore, or a restart of Hangar).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hangar_mux::{GuestLink, GuestOptions, MuxStream};
use hangar_proto::init::vm::{TARGET_AGENT, TARGET_CONTROL, TARGET_EGRESS};
use hangar_proto::init::{CONTROL_SOCKET, EGRESS_SOCKET};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Serves the link port; the returned link lives as long as the guest.
pub fn start(port: File, run_dir: PathBuf, agent_port: u16) -> std::io::Result<GuestLink> {
    let control = run_dir.join(CONTROL_SOCKET);
    let link = GuestLink::start(
        port,
        GuestOptions::default(),
        move |target: String, stream: MuxStream| {
            let control = control.clone();
            tokio::spawn(async move {
                match target.as_str() {
                    TARGET_CONTROL => match UnixStream::connect(&control).await {
                        Ok(local) => carry(local, stream).await,
                        Err(e) => log!("link: cannot reach {}: {e}", control.display()),
                    },
                    TARGET_AGENT => {
                        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port));
                        // Refused while the agent starts: the caller sees the stream close.
                        if let Ok(local) = TcpStream::connect(addr).await {
                            carry(local, stream).await;
                        }
                    }
                    other => log!("link: the host asked for an unknown target {other:?}"),
                }
            });
        },
    );
    let egress_path = run_dir.join(EGRESS_SOCKET);
    let _ = std::fs::remove_file(&egress_path);
    let listener = UnixListener::bind(&egress_path)?;
    let opener = link.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((local, _)) => {
                    let link = opener.clone();
                    tokio::spawn(async move {
                        match link.open(TARGET_EGRESS).await {
                            Ok(stream) => carry(local, stream).await,
                            Err(e) => log!("link: cannot open an egress stream: {e}"),
                        }
                    });
                }
                Err(e) => {
                    log!("egress.sock accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(link)
}

async fn carry<S>(mut local: S, mut stream: MuxStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut local, &mut stream).await;
}

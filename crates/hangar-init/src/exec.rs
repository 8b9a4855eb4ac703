//! `POST /exec`: runs one command and streams its output as NDJSON [`InitExecEvent`] lines.
//!
//! Output is relayed chunk by chunk as it is read, never collected. The stream ends with one
//! `exit` line once the process has exited and its pipes are at EOF, or [`DRAIN_AFTER_EXIT`]
//! after the exit, whichever comes first: a background job (`nohup server &`) may keep the pipes
//! open forever, and it must keep running, so this module must never wait for it or kill it
//! (except on timeout, when the whole process group is killed).

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use hangar_proto::init::InitExecEvent;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::reaper::{ExitCode, Reaper};
use crate::spawn::{self, Plan, SpawnError};

/// How long output is still relayed after the process exited while something holds its pipes.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
const CHUNK: usize = 64 * 1024;

/// A started exec: its NDJSON lines arrive on `lines`.
pub struct Running {
    pub pid: u32,
    pub lines: mpsc::Receiver<Bytes>,
}

/// Encodes one event as an NDJSON line.
pub fn encode(event: &InitExecEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).expect("exec events always serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Starts `plan` and a task relaying its output. Errors are the ones a caller can fix
/// (missing executable, bad working directory).
pub fn start(
    reaper: &Reaper,
    plan: &Plan,
    stdin: Option<String>,
    timeout: Option<Duration>,
) -> Result<Running, SpawnError> {
    let stdin_cfg = match stdin {
        Some(_) => Stdio::piped(),
        None => spawn::empty_stdin().map_err(SpawnError::Io)?,
    };
    let (mut child, exited) =
        spawn::spawn(reaper, plan, stdin_cfg, Stdio::piped(), Stdio::piped())?;
    let pid = child.id();
    let pipe_rx = |fd: Option<OwnedFd>| fd.map(pipe::Receiver::from_owned_fd).transpose();
    let stdout = pipe_rx(child.stdout.take().map(OwnedFd::from)).map_err(SpawnError::Io)?;
    let stderr = pipe_rx(child.stderr.take().map(OwnedFd::from)).map_err(SpawnError::Io)?;
    if let (Some(text), Some(fd)) = (stdin, child.stdin.take()) {
        let mut tx = pipe::Sender::from_owned_fd(OwnedFd::from(fd)).map_err(SpawnError::Io)?;
        tokio::spawn(async move {
            // A process that exits without reading its input makes this fail; that is normal.
            let _ = tx.write_all(text.as_bytes()).await;
        });
    }
    // Dropping the std `Child` neither waits for nor kills the process.
    drop(child);
    let (tx, lines) = mpsc::channel(16);
    tokio::spawn(relay(pid, stdout, stderr, exited, timeout, tx));
    Ok(Running { pid, lines })
}

async fn relay(
    pid: u32,
    mut stdout: Option<pipe::Receiver>,
    mut stderr: Option<pipe::Receiver>,
    mut exited: oneshot::Receiver<ExitCode>,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Bytes>,
) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut out_buf, mut err_buf) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let kill_at = tokio::time::sleep_until(timeout.map_or(far, |t| Instant::now() + t));
    let drain_until = tokio::time::sleep_until(far);
    tokio::pin!(kill_at, drain_until);
    let mut code: Option<ExitCode> = None;
    let mut timed_out = false;
    let mut client_gone = false;

    while code.is_none() || stdout.is_some() || stderr.is_some() {
        let event = tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => match r {
                Some(n) => InitExecEvent::Stdout(b64.encode(&out_buf[..n])),
                None => { stdout = None; continue; }
            },
            r = read_some(&mut stderr, &mut err_buf) => match r {
                Some(n) => InitExecEvent::Stderr(b64.encode(&err_buf[..n])),
                None => { stderr = None; continue; }
            },
            c = &mut exited, if code.is_none() => {
                // The sender is dropped only if the reaper lost track of the child (it cannot).
                code = Some(c.unwrap_or(-1));
                drain_until.as_mut().reset(Instant::now() + DRAIN_AFTER_EXIT);
                continue;
            }
            _ = &mut kill_at, if code.is_none() && !timed_out => {
                timed_out = true;
                // setsid made the process the leader of its own group. Members forked while
                // the signal is delivered escape one killpg (a fork bomb does this), so keep
                // killing until the group is gone.
                tokio::spawn(kill_group(pid as i32));
                continue;
            }
            _ = &mut drain_until, if code.is_some() => break,
        };
        if !client_gone && tx.send(encode(&event)).await.is_err() {
            // Nobody listens any more; keep reaping the process but stop reading its pipes so
            // it sees EPIPE instead of blocking.
            client_gone = true;
            stdout = None;
            stderr = None;
        }
    }
    let exit_code = if timed_out { 137 } else { code.unwrap_or(-1) };
    let _ = tx
        .send(encode(&InitExecEvent::Exit {
            exit_code,
            timed_out,
        }))
        .await;
}

/// Kills process group `pgid` until no member is left (or a second has passed).
async fn kill_group(pgid: i32) {
    for _ in 0..100 {
        if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_err() {
            return; // ESRCH: nothing left
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one chunk; `None` at EOF or error. Pends forever on a closed pipe so that `select!`
/// simply stops polling it.
async fn read_some(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(p) => match p.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

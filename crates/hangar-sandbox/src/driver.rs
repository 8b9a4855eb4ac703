//! The `Driver` trait: the one boundary behind which isolation technologies live.
//!
//! A driver turns a prepared sandbox (its [`Layout`] on disk, its image layers, its limits)
//! into something running `hangar-init` as PID 1 with the run directory at `/run/hangar`,
//! and back. Everything a driver does is blocking (it runs external programs and mounts);
//! callers run it on a blocking thread. Drivers never talk to `hangar-init` except through
//! the [`InitLink`] they are handed, and never decide policy (which driver, when to suspend).

use std::path::{Path, PathBuf};

use hangar_image::Image;
use hangar_proto::init::InitConfig;
use hangar_proto::sandbox::{CheckpointMode, DriverKind, Resources};

use crate::cmd::CmdError;
use crate::link::InitLink;

/// Where one sandbox lives on the host. Every path is under `dir`, so deleting `dir`
/// (after the driver has let go of its mounts) removes every trace.
#[derive(Debug, Clone)]
pub struct Layout {
    pub id: String,
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(sandboxes_root: &Path, id: &str) -> Layout {
        Layout {
            id: id.to_owned(),
            dir: sandboxes_root.join(id),
        }
    }
    /// The persisted sandbox record.
    pub fn record(&self) -> PathBuf {
        self.dir.join("sandbox.json")
    }
    /// The session volume: a sparse ext4 image whose size is the disk limit.
    pub fn volume_image(&self) -> PathBuf {
        self.dir.join("volume.ext4")
    }
    /// Where drivers that mount the volume on the host mount it.
    pub fn volume_mount(&self) -> PathBuf {
        self.dir.join("volume")
    }
    /// The root filesystem as the sandbox sees it (an overlay for host-mounting drivers).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// Host side of `/run/hangar`: `init.json`, `control.sock`, `agent.sock`, `egress.sock`.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    /// Memory checkpoint, for drivers that keep processes across suspend.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    /// `hangar-init`'s and the agent's stdout and stderr, stamped line by line by
    /// `hangar-init`; the runtime appends to it. `console.log.1` and `console.log.offset`
    /// beside it are its rotation's (see [`crate::console`]).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join(hangar_proto::init::CONTROL_SOCKET)
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir().join(hangar_proto::init::AGENT_SOCKET)
    }
    pub fn egress_socket(&self) -> PathBuf {
        self.run_dir().join(hangar_proto::init::EGRESS_SOCKET)
    }
}

/// The last `lines` lines of a log, reading at most its last 64 KiB: a sandbox can make its
/// console as large as it likes, and whoever shows its tail must not read it all.
pub fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a driver needs to know about a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec<'a> {
    pub layout: &'a Layout,
    pub image: &'a Image,
    pub resources: &'a Resources,
    /// Host directory holding the `hangar-init` binary, mounted read-only at `/.hangar`.
    pub init_dir: &'a Path,
    /// What `hangar-init` is told on a cold start (written to `init.json` by the driver).
    pub init: &'a InitConfig,
}

impl SandboxSpec<'_> {
    /// Writes `init.json` for a cold start of `hangar-init`, which reads and removes it.
    /// Only the owner can read it: it holds the control secret.
    pub fn write_init_config(&self) -> Result<(), DriverError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let run = self.layout.run_dir();
        std::fs::create_dir_all(&run).map_err(DriverError::Rootfs)?;
        let path = run.join(hangar_proto::init::INIT_CONFIG_FILE);
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(DriverError::Rootfs)?;
        f.write_all(&serde_json::to_vec(self.init).expect("init config serialises"))
            .map_err(DriverError::Rootfs)?;
        Ok(())
    }
}

/// What [`Driver::suspend`] kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    pub mode: CheckpointMode,
    /// Why the driver kept less than it can (a memory checkpoint that failed), if it did.
    pub note: Option<String>,
}

/// How [`Driver::resume`] brought a sandbox back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// From the memory checkpoint: every process continues where it was.
    Memory,
    /// Started afresh on its intact files; `note` says why when a memory checkpoint existed
    /// but could not be used.
    Filesystem { note: Option<String> },
}

/// What [`Driver::recover`] found after `hangar serve` restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// The sandbox is still running and was adopted as it is.
    Adopted,
    /// Nothing of it runs any more; it must be started again (its files are intact).
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("preparing the root filesystem")]
    Rootfs(#[source] std::io::Error),
    #[error("mounting {what}")]
    Mount {
        what: &'static str,
        #[source]
        source: CmdError,
    },
    #[error("writing the OCI bundle")]
    Bundle(#[source] std::io::Error),
    #[error("starting the sandbox")]
    Start(#[source] CmdError),
    #[error("checkpointing the sandbox")]
    Checkpoint(#[source] CmdError),
    #[error("restoring the sandbox")]
    Restore(#[source] CmdError),
    #[error("stopping the sandbox")]
    Stop(#[source] CmdError),
    #[error("preparing hangar-init for suspend: {0}")]
    Link(String),
    #[error("{0}")]
    Other(String),
}

/// An isolation technology. Implementations: `container` (crun), `gvisor` (runsc), later `vm`.
pub trait Driver: Send + Sync {
    fn kind(&self) -> DriverKind;

    /// Mounts what the sandbox needs and starts it with `hangar-init` as PID 1. The volume
    /// image exists and `init.json` is in the run directory. Returns once the runtime has
    /// started; the caller waits for `control.sock` to answer.
    fn start(&self, sb: &SandboxSpec) -> Result<(), DriverError>;

    /// Suspends a running sandbox so that it holds no CPU and as little memory as the driver
    /// can manage, with every file the agent wrote on disk. `link` reaches `hangar-init`.
    fn suspend(&self, sb: &SandboxSpec, link: &InitLink) -> Result<Suspended, DriverError>;

    /// Continues a suspended sandbox: processes intact for memory checkpoints, else the
    /// agent starts again on its intact files. Returns once the runtime has started, saying
    /// which of the two happened.
    fn resume(&self, sb: &SandboxSpec) -> Result<Resumed, DriverError>;

    /// Stops whatever runs, releases every mount, cgroup and runtime record. Idempotent.
    /// Files under the layout are left for the caller to remove.
    fn destroy(&self, sb: &SandboxSpec) -> Result<(), DriverError>;

    /// Refuses resources this driver cannot give a sandbox (beyond the checks every driver
    /// shares), with a message saying what would work.
    fn check_resources(&self, _resources: &Resources) -> Result<(), String> {
        Ok(())
    }

    /// Files besides the volume and the checkpoint directory that a suspended sandbox keeps
    /// (a VM's RAM file), so that the checkpoint's size and hash cover them.
    fn kept_files(&self, _sb: &SandboxSpec) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Whether the sandbox's runtime still runs (used to fail fast when it dies while starting).
    fn alive(&self, sb: &SandboxSpec) -> bool;

    /// After a restart of `hangar serve`: adopts a sandbox that still runs (and whose
    /// hangar-init still serves), or cleans up what is left of one that does not so that it
    /// can be started again.
    fn recover(&self, sb: &SandboxSpec) -> Result<Recovered, DriverError> {
        if self.alive(sb) && sb.layout.control_socket().exists() {
            return Ok(Recovered::Adopted);
        }
        self.destroy(sb)?;
        Ok(Recovered::Stopped)
    }
}

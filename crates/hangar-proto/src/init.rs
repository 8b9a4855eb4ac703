//! The link between Hangar and `hangar-init`, PID 1 in every sandbox.
//!
//! Hangar writes an [`InitConfig`] to `/run/hangar/init.json` before the sandbox starts;
//! `hangar-init` reads it and removes it (it holds the control secret). `hangar-init` then
//! serves HTTP/1.1 on `/run/hangar/control.sock`; every request carries
//! `Authorization: Bearer <secret>`. Endpoints:
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /health` | | 200 [`InitHealth`] |
//! | `POST /exec` | [`crate::sandbox::ExecRequest`] | 200 NDJSON stream of [`InitExecEvent`]; 4xx if the process cannot start |
//! | `GET /files/content?path=` | | 200 raw bytes |
//! | `PUT /files/content?path=` | raw bytes | 200 [`crate::sandbox::FileEntry`] |
//! | `DELETE /files/content?path=[&recursive=true]` | | 204 |
//! | `GET /files?path=` | | 200 [`crate::sandbox::FileStat`] |
//! | `POST /files/mkdir?path=` | | 200 [`crate::sandbox::FileEntry`] |
//! | `POST /suspend` | | 200; then `hangar-init` closes every host socket (see below) |
//! | `PUT /token` | the session token (a JWT) | 204, once it is in [`TOKEN_FILE`] |
//!
//! Errors are [`crate::ErrorBody`] with 400 (bad path or request), 401 (no or wrong secret),
//! 404 (no such file or executable), 409 (wrong file type), 413 (too large), 500.
//!
//! gVisor cannot checkpoint a sandbox that holds host sockets, so `POST /suspend` syncs the
//! filesystems, closes `control.sock`, `agent.sock` and every connection through them or
//! through `egress.sock`, and removes the socket files. On `SIGUSR2` (sent after a restore)
//! `hangar-init` binds its sockets again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// File name of the init configuration inside the run directory.
pub const INIT_CONFIG_FILE: &str = "init.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const AGENT_SOCKET: &str = "agent.sock";
pub const EGRESS_SOCKET: &str = "egress.sock";
/// Where the run directory appears inside the sandbox.
pub const RUN_DIR_IN_SANDBOX: &str = "/run/hangar";
/// Where the read-only directory holding the `hangar-init` binary appears inside the sandbox.
pub const INIT_DIR_IN_SANDBOX: &str = "/.hangar";
pub const DEFAULT_AGENT_PORT: u16 = 8088;
pub const PROXY_PORT: u16 = 3128;
/// The file in the run directory holding the session's current identity token (a JWT): the
/// agent reads it when it needs it (its path is `HANGAR_TOKEN_FILE` in the agent's
/// environment, never the token itself). `hangar-init` writes it before starting the agent and
/// replaces it atomically each time Hangar sends a fresh one.
pub const TOKEN_FILE: &str = "token";
/// The largest token `hangar-init` accepts.
pub const MAX_TOKEN: usize = 16 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The bearer secret every control request must carry.
    pub secret: String,
    /// The agent process, restarted with backoff when it exits. `None`: no agent process.
    pub agent: Option<ProcessSpec>,
    /// The port the agent listens on inside the sandbox; `agent.sock` forwards to it.
    pub agent_port: u16,
    /// The defaults for exec: the image's environment, user and working directory.
    pub defaults: ProcessDefaults,
    /// Limits `hangar-init` enforces itself, for sandbox kernels that do not (gVisor has no
    /// OOM killer of its own: without this, one greedy process takes the whole sandbox down
    /// with it). `None` where the host kernel enforces them (crun's cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardLimits>,
    /// Set when `hangar-init` is PID 1 of a microVM (the `vm` driver): what it enforces with
    /// the guest kernel's own cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmGuest>,
    /// The session token to put in [`TOKEN_FILE`] before the agent starts (sessions of an
    /// agent have one; bare sandboxes do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `POST /clock`: the wall-clock time to set (a microVM's clock stands still while suspended).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetClock {
    /// Nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
}

/// What the `vm` driver's guest enforces itself (memory and vCPUs are the VM's own).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmGuest {
    /// `pids.max` of the guest cgroup every process in the VM runs in.
    pub pids_max: u64,
}

/// The contract between the `vm` driver and `hangar-init` as PID 1 of a microVM.
pub mod vm {
    /// Set on the kernel command line (the kernel hands `NAME=value` words it does not know to
    /// init's environment): `vm` boots a sandbox, `probe` only proves the guest boots.
    pub const GUEST_ENV: &str = "HANGAR_GUEST";
    /// Printed on the serial console by a `probe` boot just before it powers off.
    pub const PROBE_OK: &str = "hangar-guest: probe ok";
    /// The virtio-serial port that carries every link (multiplexed, see `hangar-mux`).
    pub const LINK_PORT: &str = "hangar.link";
    /// `serial=` of the session volume's virtio-blk device.
    pub const VOLUME_SERIAL: &str = "hangar-volume";
    /// `serial=` of the image's read-only virtio-blk device.
    pub const IMAGE_SERIAL: &str = "hangar-image";
    /// Where the per-start initramfs archive puts `init.json`.
    pub const CONFIG_IN_INITRD: &str = "hangar/init.json";
    /// Where the initramfs keeps the modules to load, and the file naming their order.
    pub const MODULES_DIR: &str = "lib/modules/hangar";
    pub const MODULES_ORDER: &str = "lib/modules/hangar/order";
    /// Mux targets.
    pub const TARGET_CONTROL: &str = "control";
    pub const TARGET_AGENT: &str = "agent";
    pub const TARGET_EGRESS: &str = "egress";
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuardLimits {
    /// Memory the sandbox's processes may use together; past it the largest one is killed.
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ProcessDefaults {
    pub env: BTreeMap<String, String>,
    /// `name`, `uid`, `uid:gid` or `name:group`; empty means root.
    pub user: String,
    /// Empty means `/`.
    pub cwd: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// No agent process is configured.
    None,
    Running,
    /// Exited and waiting for its backoff before the next start.
    Restarting,
    /// The agent cannot be started at all (e.g. its executable is missing).
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub state: AgentState,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Exit code (or 128 + signal) of the last exit, if any.
    pub last_exit: Option<i32>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitHealth {
    pub ok: bool,
    pub agent: AgentStatus,
}

/// One NDJSON line of `POST /exec`. Output chunks are base64 because they are bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitExecEvent {
    Stdout(String),
    Stderr(String),
    Exit { exit_code: i32, timed_out: bool },
}

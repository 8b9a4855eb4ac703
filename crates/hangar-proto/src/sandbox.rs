//! The sandbox API of `/v1/sandboxes`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which isolation technology runs a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// The best driver this host supports, resolved when the sandbox is created.
    #[default]
    Auto,
    Vm,
    Gvisor,
    Container,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Auto => "auto",
            DriverKind::Vm => "vm",
            DriverKind::Gvisor => "gvisor",
            DriverKind::Container => "container",
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DriverKind::Auto),
            "vm" => Ok(DriverKind::Vm),
            "gvisor" => Ok(DriverKind::Gvisor),
            "container" => Ok(DriverKind::Container),
            other => Err(format!(
                "unknown driver {other:?}; expected one of auto, vm, gvisor, container"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub pids: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1.0,
            memory_mib: 512,
            disk_mib: 1024,
            pids: 512,
        }
    }
}

// `cpus` is a float; equality on it is only used by tests comparing what they sent.
impl Eq for Resources {}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EgressPolicyKind {
    /// Every request through the proxy is refused (the default).
    #[default]
    None,
    /// Only the hosts in `allow` are reachable.
    Allowlist,
    /// Everything is reachable.
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Egress {
    pub policy: EgressPolicyKind,
    /// Host patterns: `example.org`, `*.example.com`, optionally with `:port`.
    pub allow: Vec<String>,
    /// A host network namespace (`/run/netns/NAME`) that allowed connections are made from,
    /// instead of the host's own network: the operator's route out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
}

/// Data-loss detectors the egress proxy runs on plain-HTTP request bodies; a hit refuses the
/// request. Set by Hangar's agents layer from `agent.yaml`'s `guardrails`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct EgressDlp {
    pub detectors: Vec<String>,
    pub patterns: BTreeMap<String, String>,
}

/// A secret the egress proxy adds to plain-HTTP requests to some hosts, so that the sandbox
/// never holds it. Set by Hangar's agents layer from `agent.yaml`, never through the sandbox
/// API (whose callers may not read agents' secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretInjection {
    /// Host patterns, as in [`Egress::allow`].
    pub hosts: Vec<String>,
    /// The header to set (any value the sandbox sent for it is dropped).
    pub header: String,
    /// The header's value, with `{value}` where the secret goes.
    pub format: String,
    /// Where the proxy's secret source finds the value (opaque here).
    pub secret: String,
    /// The host is reached over TLS, which the proxy originates: the sandbox sends
    /// `http://host/…` and the request leaves as `https://host/…`.
    pub tls: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    #[serde(default)]
    pub driver: DriverKind,
    /// Absolute path of an OCI image layout directory or a plain root filesystem directory.
    pub image: String,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub egress: Egress,
    /// Overrides the image's entrypoint and command for the agent process. Empty: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Secrets the egress proxy adds to requests (in-process callers only).
    #[serde(skip)]
    pub inject: Vec<SecretInjection>,
    /// The first session token (in-process callers only; see `init::TOKEN_FILE`).
    #[serde(skip)]
    pub token: Option<String>,
    /// Detectors for egress request bodies (in-process callers only).
    #[serde(skip)]
    pub dlp: Option<EgressDlp>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Suspending,
    Suspended,
    Resuming,
    Failed,
    Deleted,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// Memory and files: processes continue where they were.
    Memory,
    /// Files only: the agent's command starts again on resume.
    Filesystem,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub mode: CheckpointMode,
    /// Bytes the suspended sandbox occupies on disk (volume plus memory image).
    pub bytes: u64,
    /// `sha256:<hex>` over the checkpoint's content.
    pub hash: String,
    /// How long the suspend took, in milliseconds.
    pub took_ms: u64,
    pub created_at: String,
    /// Why less was kept than the driver can keep (a memory checkpoint that failed), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub driver: DriverKind,
    pub state: SandboxState,
    pub image: String,
    pub resources: Resources,
    pub egress: Egress,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// How the last resume went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resume: Option<ResumeInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumeInfo {
    /// `memory`: processes continued; `filesystem`: the agent started again on its files.
    pub mode: CheckpointMode,
    pub took_ms: u64,
    /// Why a memory checkpoint was not used, when one existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// A user name or numeric `uid[:gid]` inside the sandbox. Default: the image's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code, or `128 + signal` when the process was killed by a signal.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Output beyond the collected limit was dropped (ask for the streamed form to get all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One line of a streamed exec (`Accept: application/x-ndjson`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout(String),
    Stderr(String),
    Exit { exit_code: i32, timed_out: bool },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub size: u64,
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
}

/// `GET /files?path=`: the entry itself and, for a directory, its entries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileStat {
    pub path: String,
    #[serde(flatten)]
    pub entry: FileEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<FileEntry>>,
}

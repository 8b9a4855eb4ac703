//! Turns "run this argv as this user in this directory" into a started child process.
//!
//! Shared by the agent supervisor and `POST /exec`. Every child gets its own session (so its
//! process group can be signalled as a whole and background jobs outlive the exec), the
//! sandbox's proxy environment, and the requested identity. Children are spawned only through
//! [`crate::reaper::Reaper`]; this module must never wait for one.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use hangar_proto::init::{ProcessDefaults, PROXY_PORT};
use tokio::sync::oneshot;

use crate::reaper::{ExitCode, Reaper};
use crate::users::{self, UserError};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct Plan {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
}

#[derive(Debug)]
pub enum SpawnError {
    /// The executable does not exist (404).
    NotFound(String),
    /// The executable exists but the kernel reported ENOENT: its `#!` interpreter or ELF loader
    /// is missing (404).
    MissingInterpreter(String),
    /// The executable exists but cannot be executed (400).
    NotExecutable(String, std::io::Error),
    /// Switching to the requested user was refused (no CAP_SETUID/CAP_SETGID) (400).
    IdentityDenied(String, std::io::Error),
    /// The working directory does not exist or is not a directory (400).
    BadCwd(String),
    /// The sandbox is at its process limit (503).
    ProcessLimit,
    Io(std::io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::NotFound(p) => write!(f, "executable not found: {p:?}"),
            SpawnError::MissingInterpreter(p) => {
                write!(
                    f,
                    "cannot execute {p:?}: its interpreter (#! line or ELF loader) was not found"
                )
            }
            SpawnError::IdentityDenied(p, e) => {
                write!(f, "cannot switch to the requested user to start {p:?}: {e}")
            }
            SpawnError::NotExecutable(p, e) => write!(f, "cannot execute {p:?}: {e}"),
            SpawnError::BadCwd(d) => write!(
                f,
                "working directory {d:?} does not exist or is not a directory"
            ),
            SpawnError::ProcessLimit => write!(
                f,
                "the sandbox has reached its process limit (resources.pids); end some processes first"
            ),
            SpawnError::Io(e) => write!(f, "cannot start process: {e}"),
        }
    }
}

/// The environment of a child: the image's, then the proxy settings (which always win over the
/// image's, since the image's cannot work in the sandbox), then the request's; `PATH` and `HOME`
/// are filled in when nothing set them.
pub fn build_env(
    image: &BTreeMap<String, String>,
    request: &BTreeMap<String, String>,
    home: Option<&str>,
) -> BTreeMap<String, String> {
    let mut env = image.clone();
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.insert(key.to_string(), proxy.clone());
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.insert(key.to_string(), NO_PROXY.to_string());
    }
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.entry("PATH".to_string())
        .or_insert_with(|| DEFAULT_PATH.to_string());
    env.entry("HOME".to_string())
        .or_insert_with(|| home.filter(|h| !h.is_empty()).unwrap_or("/").to_string());
    env
}

/// Builds a [`Plan`]: `user` and `cwd` default to the image's; users are looked up under
/// `users_root` (always `/` in a sandbox).
pub fn plan(
    argv: Vec<String>,
    defaults: &ProcessDefaults,
    user: Option<&str>,
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
    users_root: &Path,
) -> Result<Plan, UserError> {
    let id = users::resolve_in(users_root, user.unwrap_or(&defaults.user))?;
    let cwd = cwd.filter(|c| !c.is_empty()).unwrap_or(&defaults.cwd);
    let cwd = if cwd.is_empty() {
        "/".to_string()
    } else {
        cwd.to_string()
    };
    Ok(Plan {
        argv,
        env: build_env(&defaults.env, env, id.home.as_deref()),
        uid: id.uid,
        gid: id.gid,
        cwd,
    })
}

/// Finds the executable as `execvp` would, so that a missing one is reported precisely (404)
/// instead of being confused with a missing working directory.
pub fn find_executable(argv0: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, SpawnError> {
    let not_found = || SpawnError::NotFound(argv0.to_string());
    if argv0.is_empty() {
        return Err(not_found());
    }
    if argv0.contains('/') {
        let p = cwd.join(argv0);
        return if p.exists() {
            Ok(PathBuf::from(argv0))
        } else {
            Err(not_found())
        };
    }
    let mut not_executable = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(dir)
        };
        let candidate = dir.join(argv0);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => not_executable = Some(candidate),
            _ => {}
        }
    }
    match not_executable {
        Some(p) => Err(SpawnError::NotExecutable(
            p.display().to_string(),
            std::io::Error::from_raw_os_error(libc::EACCES),
        )),
        None => Err(not_found()),
    }
}

/// Standard input that is at end of file at once. Used instead of `/dev/null`, which a
/// sandbox (or a bare chroot) need not have.
pub fn empty_stdin() -> std::io::Result<Stdio> {
    let (reader, _writer) = std::io::pipe()?;
    Ok(Stdio::from(reader))
}

/// Starts `plan` in a new session with the given stdio. Returns the child (for its pipes) and a
/// receiver of its exit code.
pub fn spawn(
    reaper: &Reaper,
    plan: &Plan,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<(Child, oneshot::Receiver<ExitCode>), SpawnError> {
    let cwd_path = Path::new(&plan.cwd);
    if !cwd_path.is_absolute()
        || !std::fs::metadata(cwd_path)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        return Err(SpawnError::BadCwd(plan.cwd.clone()));
    }
    let argv0 = plan.argv.first().map(String::as_str).unwrap_or("");
    let path_var = plan
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let program = find_executable(argv0, path_var, cwd_path)?;
    let cwd_c =
        CString::new(plan.cwd.as_bytes()).map_err(|_| SpawnError::BadCwd(plan.cwd.clone()))?;

    let (uid, gid) = (plan.uid, plan.gid);
    // Changing identity needs root; when hangar-init runs unprivileged (tests only) children
    // simply keep its identity.
    // Root staying root skips the calls, so init also works without CAP_SETUID/CAP_SETGID
    // (e.g. under crun's default capability set) as long as no other user is requested.
    let change_identity = nix::unistd::getuid().is_root()
        && (uid != nix::unistd::getuid().as_raw() || gid != nix::unistd::getgid().as_raw());

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&plan.argv[1..])
        .env_clear()
        .envs(&plan.env)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setsid, setgroups, setgid, setuid, chdir) on values prepared before the
    // fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            if change_identity {
                let groups = [gid as libc::gid_t];
                check(libc::setgroups(1, groups.as_ptr()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::chdir(cwd_c.as_ptr()))
        });
    }
    reaper.spawn(&mut cmd).map_err(|e| match e.raw_os_error() {
        // The executable was found above, so ENOENT is about what it needs to run.
        Some(libc::ENOENT) => SpawnError::MissingInterpreter(argv0.to_string()),
        Some(libc::EPERM) => SpawnError::IdentityDenied(argv0.to_string(), e),
        Some(libc::EAGAIN) => SpawnError::ProcessLimit,
        Some(libc::EACCES | libc::ENOEXEC | libc::ENOTDIR) => {
            SpawnError::NotExecutable(argv0.to_string(), e)
        }
        _ => SpawnError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_layers() {
        let image = map(&[
            ("PATH", "/app/bin"),
            ("HTTP_PROXY", "http://corp:8080"),
            ("A", "image"),
        ]);
        let env = build_env(
            &image,
            &map(&[("A", "request"), ("NO_PROXY", "x")]),
            Some("/home/app"),
        );
        assert_eq!(env["PATH"], "/app/bin");
        assert_eq!(env["HTTP_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(env["https_proxy"], "http://127.0.0.1:3128");
        assert_eq!(env["no_proxy"], "localhost,127.0.0.1,::1");
        assert_eq!(env["NO_PROXY"], "x");
        assert_eq!(env["A"], "request");
        assert_eq!(env["HOME"], "/home/app");

        let env = build_env(&BTreeMap::new(), &map(&[("HOME", "/tmp")]), Some("/root"));
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["HOME"], "/tmp");
        assert_eq!(
            build_env(&BTreeMap::new(), &BTreeMap::new(), None)["HOME"],
            "/"
        );
    }

    #[test]
    fn finds_executables_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("data"), "").unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(
            find_executable("tool", &path, Path::new("/")).unwrap(),
            bin.join("tool")
        );
        assert!(matches!(
            find_executable("data", &path, Path::new("/")),
            Err(SpawnError::NotExecutable(..))
        ));
        assert!(matches!(
            find_executable("nope", &path, Path::new("/")),
            Err(SpawnError::NotFound(_))
        ));
        assert!(
            matches!(find_executable("./bin/tool", "", dir.path()), Ok(p) if p == Path::new("./bin/tool"))
        );
        assert!(matches!(
            find_executable("./bin/nope", "", dir.path()),
            Err(SpawnError::NotFound(_))
        ));
    }
}

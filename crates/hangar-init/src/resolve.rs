//! Resolves a path given to the files API to the file it names inside the sandbox.
//!
//! The path is walked component by component from the root, following symlinks by splicing their
//! target into the walk (an absolute target restarts at the root), so that a symlink can never
//! lead outside the root and the final location can be checked against the forbidden prefixes.
//! The root is an argument (always `/` in production) so that tests can use a temporary
//! directory. This module only inspects (`lstat`, `readlink`); it must never modify anything.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// At most this many symlinks are followed in one resolution (Linux's `MAXSYMLINKS`).
pub const MAX_SYMLINKS: usize = 40;

/// Prefixes the files API must never touch: kernel interfaces and the host link directory.
pub const FORBIDDEN: &[&str] = &["/proc", "/sys", "/dev", "/run/hangar"];

#[derive(Debug)]
pub enum ResolveError {
    /// Not absolute, contains `..` or NUL.
    Invalid(String),
    /// A symlink's `..` would climb above the root.
    Escape,
    TooManyLinks,
    /// Under a forbidden prefix after resolution.
    NotAllowed(String),
    Io(io::Error),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Invalid(why) => f.write_str(why),
            ResolveError::Escape => f.write_str("symlink escapes the sandbox root"),
            ResolveError::TooManyLinks => {
                write!(f, "too many levels of symlinks (more than {MAX_SYMLINKS})")
            }
            ResolveError::NotAllowed(p) => write!(f, "path not allowed: {p:?} is reserved"),
            ResolveError::Io(e) => write!(f, "cannot resolve path: {e}"),
        }
    }
}

/// A resolved path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The location inside the sandbox: absolute, no `.`/`..`, no symlinks except possibly the
    /// last component when it was not followed.
    pub sandbox: PathBuf,
    /// Where that is on this machine: `root` joined with `sandbox`.
    pub host: PathBuf,
}

/// Checks the syntax of a client-supplied path: absolute, no `..`, no NUL.
pub fn validate(path: &str) -> Result<(), ResolveError> {
    if path.contains('\0') {
        return Err(ResolveError::Invalid("path must not contain NUL".into()));
    }
    if !path.starts_with('/') {
        return Err(ResolveError::Invalid(format!(
            "path {path:?} must be absolute"
        )));
    }
    if Path::new(path)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(ResolveError::Invalid(format!(
            "path {path:?} must not contain \"..\""
        )));
    }
    Ok(())
}

fn host_path(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

fn sandbox_path(parts: &[OsString]) -> PathBuf {
    let mut p = PathBuf::from("/");
    p.extend(parts);
    p
}

/// Pushes the components of `target` to the front of `pending`.
fn splice(pending: &mut VecDeque<OsString>, target: &Path) {
    let parts: Vec<OsString> = target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    for p in parts.into_iter().rev() {
        pending.push_front(p);
    }
}

/// Resolves `path` under `root`. `follow_last`: whether a symlink in the last component is
/// followed (reading or writing content) or named itself (stat, delete). Components that do not
/// exist are kept as they are, so paths to be created resolve too.
pub fn resolve(root: &Path, path: &str, follow_last: bool) -> Result<Resolved, ResolveError> {
    validate(path)?;
    let mut pending: VecDeque<OsString> = VecDeque::new();
    splice(&mut pending, Path::new(path));
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    // Once a component is missing nothing below it can be a symlink; the rest is lexical.
    let mut missing = false;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            done.pop().ok_or(ResolveError::Escape)?;
            continue;
        }
        done.push(part);
        if missing || (pending.is_empty() && !follow_last) {
            continue;
        }
        let here = host_path(root, &done);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ResolveError::TooManyLinks);
                }
                let target = std::fs::read_link(&here).map_err(ResolveError::Io)?;
                done.pop();
                if target.is_absolute() {
                    done.clear();
                }
                splice(&mut pending, &target);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
            // ENOTDIR and the like: let the operation itself report it.
            Err(_) => missing = true,
        }
    }
    let sandbox = sandbox_path(&done);
    if FORBIDDEN.iter().any(|f| sandbox.starts_with(f)) {
        return Err(ResolveError::NotAllowed(sandbox.display().to_string()));
    }
    Ok(Resolved {
        host: host_path(root, &done),
        sandbox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A temporary root with: /etc/hosts, /data/a.txt, /data/dir/, /run/hangar/, /proc/,
    /// and a handful of symlinks.
    fn fixture() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["etc", "data/dir", "run/hangar", "proc", "home/u"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("etc/hosts"), "x").unwrap();
        std::fs::write(r.join("data/a.txt"), "a").unwrap();
        symlink("a.txt", r.join("data/rel")).unwrap();
        symlink("/etc", r.join("data/abs")).unwrap();
        symlink("../../../../..", r.join("data/dir/up")).unwrap();
        symlink("../etc/hosts", r.join("data/uphosts")).unwrap();
        symlink("/run/hangar", r.join("home/u/run")).unwrap();
        symlink("loop2", r.join("data/loop1")).unwrap();
        symlink("loop1", r.join("data/loop2")).unwrap();
        symlink("/data/dir/../a.txt", r.join("data/viaparent")).unwrap();
        t
    }

    fn check(root: &Path, path: &str, follow_last: bool, expect: Result<&str, &str>) {
        let got = resolve(root, path, follow_last);
        match (got, expect) {
            (Ok(r), Ok(e)) => {
                assert_eq!(r.sandbox, PathBuf::from(e), "{path}");
                assert_eq!(r.host, root.join(e.trim_start_matches('/')), "{path}");
            }
            (Err(err), Err(e)) => assert!(
                err.to_string().contains(e),
                "{path}: {err} does not contain {e:?}"
            ),
            (got, e) => panic!("{path}: got {got:?}, expected {e:?}"),
        }
    }

    #[test]
    fn syntax() {
        let t = fixture();
        let r = t.path();
        check(r, "relative/x", true, Err("must be absolute"));
        check(r, "/data/../etc", true, Err("must not contain \"..\""));
        check(r, "/data/a\0", true, Err("NUL"));
        check(r, "/", true, Ok("/"));
        check(r, "//data/./a.txt/", true, Ok("/data/a.txt"));
    }

    #[test]
    fn symlinks() {
        let t = fixture();
        let r = t.path();
        check(r, "/data/rel", true, Ok("/data/a.txt"));
        check(r, "/data/rel", false, Ok("/data/rel"));
        // An absolute target restarts at the root, not at the host's `/`.
        check(r, "/data/abs/hosts", true, Ok("/etc/hosts"));
        check(r, "/data/abs", false, Ok("/data/abs"));
        check(r, "/data/uphosts", true, Ok("/etc/hosts"));
        check(r, "/data/viaparent", true, Ok("/data/a.txt"));
        check(
            r,
            "/data/dir/up/etc",
            true,
            Err("symlink escapes the sandbox root"),
        );
        check(r, "/data/loop1", true, Err("too many levels of symlinks"));
        check(r, "/data/loop1", false, Ok("/data/loop1"));
    }

    #[test]
    fn missing_components_resolve_lexically() {
        let t = fixture();
        let r = t.path();
        check(
            r,
            "/data/new/deeper/file",
            true,
            Ok("/data/new/deeper/file"),
        );
        check(r, "/data/abs/new.conf", true, Ok("/etc/new.conf"));
        check(r, "/data/a.txt/below", true, Ok("/data/a.txt/below"));
    }

    #[test]
    fn forbidden_prefixes_apply_after_resolution() {
        let t = fixture();
        let r = t.path();
        check(r, "/proc/self/environ", true, Err("path not allowed"));
        check(r, "/run/hangar/init.json", true, Err("path not allowed"));
        check(r, "/home/u/run/control.sock", true, Err("path not allowed"));
        check(r, "/home/u/run", false, Ok("/home/u/run"));
        check(r, "/devices", true, Ok("/devices"));
        check(r, "/run/hangarx", true, Ok("/run/hangarx"));
    }
}

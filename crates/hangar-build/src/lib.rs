//! Images into Hangar's store: Dockerfile builds (buildah), imports (OCI layouts and
//! archives) and base images made with debootstrap.
//!
//! buildah runs with its own storage under the data directory (`<data>/buildah`, vfs driver,
//! chroot isolation), so base images and cached layers persist across builds and nothing is
//! shared with the host's containers. Every image that comes out of it is pushed once to an
//! OCI layout (`<data>/images/oci/<buildah image id>`), resolved by `hangar-image` (which
//! unpacks its layers into the shared layer store) and recorded in `hangar-store`. The layout
//! directory named after buildah's image id is also the record that an image was already
//! exported: a rebuild that buildah answers from its cache is not pushed again.
//!
//! This crate never pulls from a registry (`--pull=never`): images come from Dockerfiles,
//! archives, layouts or debootstrap. It never holds a lock across a build other than the
//! per-name lock that keeps two builds of one name from racing for the tag.

mod bootstrap;
mod build;
mod context;
mod import;
mod process;
mod register;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hangar_proto::agent::ImageInfo;
use tokio::sync::mpsc;

pub use bootstrap::{host_mirror, parse_mirror_sources, BootstrapSpec};
pub use build::BuildRequest;
pub use context::{BuildContext, ContextError, Upload};
pub use import::ImportSource;

/// Where bootstrapped root filesystems are cached for every Hangar on this host, unless
/// `HANGAR_BOOTSTRAP_CACHE` names another directory.
pub const DEFAULT_BOOTSTRAP_CACHE: &str = "/var/cache/hangar/bootstrap";

/// The image service: builds, imports and bootstraps images into the store.
#[derive(Clone)]
pub struct Images {
    pub data_dir: PathBuf,
    pub store: hangar_store::Store,
    /// Host-wide cache of bootstrapped base images (shared by every data directory).
    pub bootstrap_cache: PathBuf,
    /// buildah's storage driver: `vfs` (default; works on any filesystem, but copies the
    /// whole root filesystem for every step) or `overlay` (`HANGAR_BUILDAH_STORAGE_DRIVER`).
    pub storage_driver: String,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Why an image operation failed. `Invalid`, `BaseMissing`, `BuildFailed`, `StepFailed` (a
/// tool failed: debootstrap on a bad package name, buildah on a broken archive) and
/// `NotAnImage` are the caller's to fix; the rest are Hangar's or the host's.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("base image {image:?} is not in Hangar's image storage (images are never pulled from a registry); run `hangar images bootstrap debian:bookworm` for a Debian base, or `hangar images import` for an OCI/docker archive")]
    BaseMissing { image: String },
    #[error("the build failed; buildah's last output:\n{output}")]
    BuildFailed { output: String },
    #[error("{step} failed ({status}); its last output:\n{output}")]
    StepFailed {
        step: String,
        status: String,
        output: String,
    },
    #[error("{path}: {reason}")]
    NotAnImage { path: PathBuf, reason: String },
    #[error("`{program}` is not installed on the server's host: apt-get install {package}")]
    ToolMissing {
        program: &'static str,
        package: &'static str,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the built image is unusable")]
    Resolve(#[source] hangar_image::ResolveError),
    #[error("opening the image store")]
    OpenStore(#[source] hangar_image::OpenError),
    #[error("recording the image")]
    Store(#[from] hangar_store::StoreError),
}

impl ImageError {
    /// A stable code for the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::Invalid(_) => "invalid_request",
            ImageError::BaseMissing { .. } => "base_image_missing",
            ImageError::BuildFailed { .. } => "build_failed",
            ImageError::StepFailed { .. } => "step_failed",
            ImageError::NotAnImage { .. } => "not_an_image",
            ImageError::ToolMissing { .. } => "tool_missing",
            ImageError::Resolve(e) if e.is_user_error() => "invalid_image",
            _ => "internal",
        }
    }

    /// True if the input, not Hangar, is at fault.
    pub fn is_user_error(&self) -> bool {
        self.code() != "internal"
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Io { what, source }
    }
}

/// Where an operation's progress goes, one line at a time (buildah's and debootstrap's output,
/// and Hangar's own steps). Lines are dropped once the receiver is gone: an operation keeps
/// going when the client that asked for it disconnects.
#[derive(Clone, Default)]
pub struct Progress(Option<mpsc::UnboundedSender<String>>);

impl Progress {
    pub fn new(tx: mpsc::UnboundedSender<String>) -> Progress {
        Progress(Some(tx))
    }
    pub fn none() -> Progress {
        Progress(None)
    }
    pub fn line(&self, line: impl Into<String>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(line.into());
        }
    }
}

/// What a server that stopped in the middle of a build or export left: half-written layouts
/// (`<data>/images/oci/.tmp-*`) and unpacked contexts (`<data>/buildah/tmp/*`). Nothing else
/// uses them, and no build runs yet.
fn remove_leftovers(data_dir: &std::path::Path) {
    let oci = data_dir.join("images/oci");
    let tmp = data_dir.join("buildah/tmp");
    let leftovers = std::fs::read_dir(&oci)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .chain(std::fs::read_dir(&tmp).into_iter().flatten().flatten());
    for e in leftovers {
        let path = e.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a leftover of an interrupted build")
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a leftover of an interrupted build")
            }
        }
    }
}

/// `overlay` where the data directory can hold an overlayfs upper directory (builds share
/// the base image's files instead of copying them for every step: ~5× faster), else `vfs`.
/// Storage already made with one driver keeps it.
fn storage_driver_for(data_dir: &std::path::Path) -> &'static str {
    // The storage roots `Images::buildah` uses for each driver.
    if data_dir.join("buildah/storage-overlay").is_dir() {
        return "overlay";
    }
    if data_dir.join("buildah/storage").is_dir() {
        return "vfs";
    }
    let probe = data_dir.join("buildah/probe");
    let works = (|| -> std::io::Result<bool> {
        let _ = std::fs::remove_dir_all(&probe);
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(probe.join(d))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            probe.join("lower").display(),
            probe.join("upper").display(),
            probe.join("work").display()
        );
        let mounted = nix::mount::mount(
            Some("overlay"),
            &probe.join("merged"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        );
        if mounted.is_ok() {
            let _ = nix::mount::umount(&probe.join("merged"));
        }
        Ok(mounted.is_ok())
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_dir_all(&probe);
    let driver = if works { "overlay" } else { "vfs" };
    tracing::info!(driver, "buildah storage driver chosen");
    driver
}

impl Images {
    pub fn new(data_dir: PathBuf, store: hangar_store::Store) -> Images {
        let bootstrap_cache = std::env::var_os("HANGAR_BOOTSTRAP_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BOOTSTRAP_CACHE));
        let storage_driver = match std::env::var("HANGAR_BUILDAH_STORAGE_DRIVER").as_deref() {
            Ok("overlay") => "overlay",
            Ok("vfs") => "vfs",
            Ok(other) if !other.is_empty() => {
                tracing::warn!(
                    driver = other,
                    "unsupported HANGAR_BUILDAH_STORAGE_DRIVER (overlay or vfs); choosing by probe"
                );
                storage_driver_for(&data_dir)
            }
            _ => storage_driver_for(&data_dir),
        };
        remove_leftovers(&data_dir);
        Images {
            data_dir,
            store,
            bootstrap_cache,
            storage_driver: storage_driver.to_string(),
            locks: Arc::default(),
        }
    }

    /// Uses `dir` for the host-wide bootstrap cache instead of the default.
    pub fn with_bootstrap_cache(mut self, dir: PathBuf) -> Images {
        self.bootstrap_cache = dir;
        self
    }

    /// Every image in the store, oldest first, with the size of its layers.
    pub async fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let rows = self.store.images().await?;
        Ok(rows.iter().map(register::info).collect())
    }

    /// buildah's storage, run state and temp space, all under the data directory.
    pub(crate) fn buildah_dir(&self) -> PathBuf {
        self.data_dir.join("buildah")
    }

    /// Where uploads, build contexts and bootstrap root filesystems are unpacked.
    pub(crate) fn tmp_dir(&self) -> Result<PathBuf, ImageError> {
        let dir = self.buildah_dir().join("tmp");
        std::fs::create_dir_all(&dir)
            .map_err(ImageError::io(format!("creating {}", dir.display())))?;
        Ok(dir)
    }

    pub(crate) fn oci_dir(&self) -> PathBuf {
        self.data_dir.join("images/oci")
    }

    /// The lock that serialises operations on one image name.
    pub(crate) async fn lock_name(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// Checks an image name as buildah would tag it: `[registry/]path[:tag]`, lower-case path
/// components of `[a-z0-9._-]`, a tag of `[A-Za-z0-9_.-]` up to 128 characters.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let bad = |why: &str| {
        Err(ImageError::Invalid(format!(
            "invalid image name {name:?}: {why} (use e.g. `notes` or `team/notes:v2`)"
        )))
    };
    if name.is_empty() || name.len() > 255 {
        return bad("it must be 1 to 255 characters");
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let (path, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    if let Some(tag) = tag {
        if tag.is_empty()
            || tag.len() > 128
            || tag.starts_with(['.', '-'])
            || !tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return bad(
                "the tag must be letters, digits, '_', '.' or '-', not starting with '.' or '-'",
            );
        }
    }
    for (i, comp) in path.split('/').enumerate() {
        let registry = i == 0 && path.contains('/') && (comp.contains('.') || comp.contains(':'));
        let ok = if registry {
            comp.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
                && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
        } else {
            !comp.is_empty()
                && comp
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                && comp.starts_with(|c: char| c.is_ascii_alphanumeric())
                && comp.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        if !ok {
            return bad("each part must be lower-case letters, digits, '.', '_' or '-'");
        }
    }
    if path.starts_with("sha256") && tag.is_some_and(|t| t.len() == 64) {
        return bad("it looks like an image id");
    }
    Ok(())
}

/// True if `rel` is a relative path of plain components (no `..`, no root, not empty).
pub(crate) fn is_plain_relative(rel: &Path) -> bool {
    use std::path::Component;
    rel.components().next().is_some()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && rel.components().any(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "notes",
            "notes:v2",
            "team/notes:latest",
            "debian:bookworm",
            "localhost:5000/a/b:1.0",
            "docker.io/library/debian:bookworm",
            "a_b.c-d",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Notes",
            "notes:",
            "a//b",
            "-a",
            "a b",
            "a:b:c",
            "../x",
            "/abs",
            "notes:-x",
            "sha256:0123456789012345678901234567890123456789012345678901234567890123",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_relative() {
        for (p, ok) in [
            ("Dockerfile", true),
            ("./sub/Dockerfile", true),
            ("../Dockerfile", false),
            ("/Dockerfile", false),
            ("a/../../b", false),
            ("", false),
            (".", false),
        ] {
            assert_eq!(is_plain_relative(Path::new(p)), ok, "{p}");
        }
    }
}

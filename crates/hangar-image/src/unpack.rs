//! Unpacking one layer archive into a directory that overlayfs mounts as a lower layer as it is.
//!
//! OCI whiteouts become overlayfs ones: `.wh.NAME` a 0:0 character device `NAME`, `.wh..wh..opq` the
//! `trusted.overlay.opaque=y` attribute on its directory. Whatever the archive holds, this must never
//! create, change or follow anything outside the target directory, and never copy a `trusted.*`
//! attribute out of the archive, because overlayfs reads those as instructions.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::{Entry, EntryType};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("malformed layer archive")]
    ReadArchive(#[source] io::Error),
    #[error("entry {path:?} escapes the layer directory")]
    UnsafePath { path: PathBuf },
    #[error("hard link {path:?} must point to an earlier file in the same layer, not {target:?}")]
    BadHardLink { path: PathBuf, target: PathBuf },
    #[error("entry {path:?} needs a directory where the layer has something else")]
    NotADirectory { path: PathBuf },
    #[error("create {path:?}")]
    CreateEntry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create whiteout {path:?}")]
    Whiteout {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set attributes of {path:?}")]
    SetAttributes {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// True when the archive itself is at fault rather than this host.
    pub fn is_user_error(&self) -> bool {
        match self {
            UnpackError::ReadArchive(_)
            | UnpackError::UnsafePath { .. }
            | UnpackError::BadHardLink { .. }
            | UnpackError::NotADirectory { .. } => true,
            UnpackError::CreateEntry { .. }
            | UnpackError::Whiteout { .. }
            | UnpackError::SetAttributes { .. } => false,
        }
    }
}

const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

/// Unpacks the (already decompressed) tar stream `archive` into `root`, which must be an empty,
/// canonical directory that nobody else writes to while this runs.
pub(crate) fn unpack_layer(archive: impl Read, root: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(archive);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // tar would copy every xattr, `trusted.overlay.*` included; `wanted_xattrs` filters them instead.
    archive.set_unpack_xattrs(false);

    // Directory mtimes are set last: creating the entries inside a directory bumps its mtime.
    let mut dir_mtimes = Vec::new();
    for entry in archive.entries().map_err(UnpackError::ReadArchive)? {
        let mut entry = entry.map_err(UnpackError::ReadArchive)?;
        let raw_path = entry.path().map_err(UnpackError::ReadArchive)?.into_owned();
        let rel = relative_path(&raw_path)?;
        let (Some(parent_rel), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue; // `./`, the layer root itself: the store decides its attributes.
        };
        let name = name.to_owned();

        if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
            let parent = dir_inside(root, parent_rel, true)?;
            if hidden == b".wh..opq" {
                set_xattr(&parent, OPAQUE_XATTR, b"y").map_err(|source| UnpackError::Whiteout {
                    path: parent.clone(),
                    source,
                })?;
            } else if hidden.is_empty() || hidden.starts_with(b".wh.") {
                // aufs bookkeeping such as `.wh..wh.plnk`; meaningless to overlayfs.
                debug!(entry = ?rel, "skipping aufs metadata entry");
            } else {
                whiteout(&parent.join(OsStr::from_bytes(hidden)))?;
            }
            continue;
        }

        let kind = entry.header().entry_type();
        match kind {
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let parent = dir_inside(root, parent_rel, true)?;
                make_node(&entry, &parent.join(&name))?;
            }
            EntryType::Link => {
                let parent = dir_inside(root, parent_rel, true)?;
                hard_link(&entry, root, &rel, &parent.join(&name))?;
            }
            _ => {
                // tar checks this too, but its error cannot be told apart from a full disk.
                dir_inside(root, parent_rel, true)?;
                let xattrs = wanted_xattrs(&mut entry)?;
                let mtime = entry.header().mtime().map_err(UnpackError::ReadArchive)?;
                entry
                    .unpack_in(root)
                    .map_err(|source| UnpackError::CreateEntry {
                        path: root.join(&rel),
                        source,
                    })?;
                if kind.is_dir() {
                    dir_mtimes.push((rel.clone(), mtime));
                }
                if !xattrs.is_empty() && (kind.is_file() || kind.is_dir()) {
                    let path = dir_inside(root, parent_rel, false)?.join(&name);
                    for (key, value) in &xattrs {
                        set_xattr(&path, key, value).map_err(|source| {
                            UnpackError::SetAttributes {
                                path: path.clone(),
                                source,
                            }
                        })?;
                    }
                }
            }
        }
    }

    for (rel, mtime) in dir_mtimes {
        let (Some(parent_rel), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        // A later entry may have replaced or whited out the directory; then there is nothing to date.
        let parent = match dir_inside(root, parent_rel, false) {
            Ok(parent) => parent,
            Err(UnpackError::NotADirectory { .. } | UnpackError::UnsafePath { .. }) => continue,
            Err(e) => return Err(e),
        };
        let path = parent.join(name);
        let time = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        match utimensat(None, &path, &time, &time, UtimensatFlags::NoFollowSymlink) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(UnpackError::SetAttributes {
                    path,
                    source: errno.into(),
                })
            }
        }
    }
    Ok(())
}

/// The entry path relative to the layer root: leading `/` and `.` dropped, `..` refused.
fn relative_path(raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnpackError::UnsafePath {
                    path: raw.to_owned(),
                })
            }
            Component::Normal(part) => rel.push(part),
        }
    }
    Ok(rel)
}

/// Resolves the directory `rel` inside `root` to a real path without symlinks, creating missing
/// directories when `create` is set. Symlinks left by earlier entries are followed only where they
/// stay inside `root` (which must be canonical), so nothing written below the result can land outside.
fn dir_inside(root: &Path, rel: &Path, create: bool) -> Result<PathBuf, UnpackError> {
    let mut dir = root.to_path_buf();
    for component in rel.components() {
        let next = dir.join(component);
        match fs::symlink_metadata(&next) {
            Ok(meta) if meta.is_dir() => dir = next,
            Ok(meta) if meta.file_type().is_symlink() => {
                let resolved = fs::canonicalize(&next).map_err(|_| UnpackError::NotADirectory {
                    path: rel.to_owned(),
                })?;
                if !resolved.starts_with(root) {
                    return Err(UnpackError::UnsafePath {
                        path: rel.to_owned(),
                    });
                }
                if !resolved.is_dir() {
                    return Err(UnpackError::NotADirectory {
                        path: rel.to_owned(),
                    });
                }
                dir = resolved;
            }
            Ok(_) => {
                return Err(UnpackError::NotADirectory {
                    path: rel.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&next).map_err(|source| UnpackError::CreateEntry {
                    path: next.clone(),
                    source,
                })?;
                dir = next;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(UnpackError::NotADirectory {
                    path: rel.to_owned(),
                })
            }
            Err(source) => return Err(UnpackError::CreateEntry { path: next, source }),
        }
    }
    Ok(dir)
}

/// Removes whatever an earlier entry of this layer left at `path`, without following a symlink there.
fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An overlayfs whiteout: a character device with device number 0:0.
fn whiteout(path: &Path) -> Result<(), UnpackError> {
    remove_existing(path)
        .and_then(|()| Ok(mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))?))
        .map_err(|source| UnpackError::Whiteout {
            path: path.to_owned(),
            source,
        })
}

/// Fifos are recreated; a 0:0 character device already is an overlayfs whiteout and is kept; other
/// device nodes are dropped, since a sandbox gets its devices from the runtime, never from an image.
fn make_node<R: Read>(entry: &Entry<'_, R>, path: &Path) -> Result<(), UnpackError> {
    let header = entry.header();
    let kind = header.entry_type();
    if kind != EntryType::Fifo {
        let major = header.device_major().map_err(UnpackError::ReadArchive)?;
        let minor = header.device_minor().map_err(UnpackError::ReadArchive)?;
        if kind == EntryType::Char && major.unwrap_or(0) == 0 && minor.unwrap_or(0) == 0 {
            return whiteout(path);
        }
        debug!(?path, ?major, ?minor, "skipping device node");
        return Ok(());
    }
    let mode = header.mode().map_err(UnpackError::ReadArchive)? & 0o7777;
    let uid = header.uid().map_err(UnpackError::ReadArchive)?;
    let gid = header.gid().map_err(UnpackError::ReadArchive)?;
    let create = || -> io::Result<()> {
        remove_existing(path)?;
        mknod(path, SFlag::S_IFIFO, Mode::empty(), 0)?;
        std::os::unix::fs::lchown(path, u32::try_from(uid).ok(), u32::try_from(gid).ok())?;
        // After chown, which clears setuid bits, and explicit, because mknod applies the umask.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    };
    create().map_err(|source| UnpackError::CreateEntry {
        path: path.to_owned(),
        source,
    })
}

/// Hard links are made here rather than by tar so the target is checked to be an existing
/// non-directory inside this layer, reached without leaving it.
fn hard_link<R: Read>(
    entry: &Entry<'_, R>,
    root: &Path,
    rel: &Path,
    dst: &Path,
) -> Result<(), UnpackError> {
    let raw_target = entry
        .link_name()
        .map_err(UnpackError::ReadArchive)?
        .map(|target| target.into_owned())
        .unwrap_or_default();
    let bad = || UnpackError::BadHardLink {
        path: rel.to_owned(),
        target: raw_target.clone(),
    };
    let target_rel = relative_path(&raw_target).map_err(|_| bad())?;
    let (Some(target_parent), Some(target_name)) = (target_rel.parent(), target_rel.file_name())
    else {
        return Err(bad());
    };
    let target = dir_inside(root, target_parent, false)
        .map_err(|_| bad())?
        .join(target_name);
    match fs::symlink_metadata(&target) {
        Ok(meta) if !meta.is_dir() => {}
        _ => return Err(bad()),
    }
    if target == dst {
        return Ok(());
    }
    // std's hard_link is linkat(2) without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
    remove_existing(dst)
        .and_then(|()| fs::hard_link(&target, dst))
        .map_err(|source| UnpackError::CreateEntry {
            path: dst.to_owned(),
            source,
        })
}

/// The extended attributes worth keeping from the archive: file capabilities (which `ping` and the
/// like need) and the unprivileged `user.*` namespace. Everything else, `trusted.*` above all, is dropped.
fn wanted_xattrs<R: Read>(
    entry: &mut Entry<'_, R>,
) -> Result<Vec<(CString, Vec<u8>)>, UnpackError> {
    let mut wanted = Vec::new();
    let Some(extensions) = entry.pax_extensions().map_err(UnpackError::ReadArchive)? else {
        return Ok(wanted);
    };
    for extension in extensions {
        let extension = extension.map_err(UnpackError::ReadArchive)?;
        let Some(name) = extension
            .key()
            .ok()
            .and_then(|key| key.strip_prefix("SCHILY.xattr."))
        else {
            continue;
        };
        if name != "security.capability" && !name.starts_with("user.") {
            debug!(xattr = name, "dropping extended attribute");
            continue;
        }
        if let Ok(name) = CString::new(name) {
            wanted.push((name, extension.value_bytes().to_vec()));
        }
    }
    Ok(wanted)
}

fn set_xattr(path: &Path, name: &CStr, value: &[u8]) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `path` and `name` are NUL-terminated and outlive the call; `value` points to
    // `value.len()` readable bytes. lsetxattr reads them and keeps no pointer.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// One tar entry for tests. `path` is written into the header as raw bytes, so tests can build
    /// the hostile archives that `tar::Builder` refuses to.
    pub(crate) enum Spec<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        CharDev(&'a str, u32, u32),
    }

    pub(crate) fn tar_of(specs: &[Spec<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for spec in specs {
            let mut header = tar::Header::new_ustar();
            let (path, kind, data, link): (&str, EntryType, &[u8], Option<&str>) = match *spec {
                Spec::Dir(path) => (path, EntryType::Directory, b"", None),
                Spec::File(path, data) => (path, EntryType::Regular, data, None),
                Spec::Symlink(path, target) => (path, EntryType::Symlink, b"", Some(target)),
                Spec::HardLink(path, target) => (path, EntryType::Link, b"", Some(target)),
                Spec::CharDev(path, major, minor) => {
                    header.set_device_major(major).unwrap();
                    header.set_device_minor(minor).unwrap();
                    (path, EntryType::Char, b"", None)
                }
            };
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_uid(1000);
            header.set_gid(1000);
            header.set_mtime(1_000_000);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack(specs: &[Spec<'_>]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layer");
        fs::create_dir(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let result = unpack_layer(&tar_of(specs)[..], &root);
        (dir, result)
    }

    /// Hostile archives: each must fail as the archive's fault and leave nothing outside the layer.
    #[test]
    fn hostile_entries_are_refused() {
        use Spec::*;
        let cases: Vec<(&str, Vec<Spec<'_>>)> = vec![
            ("dot-dot", vec![File("../escape", b"x")]),
            (
                "nested dot-dot",
                vec![Dir("a"), File("a/../../escape", b"x")],
            ),
            (
                "through symlink",
                vec![Symlink("a", ".."), File("a/escape", b"x")],
            ),
            (
                "through abs symlink",
                vec![Symlink("a", "/tmp"), File("a/escape", b"x")],
            ),
            (
                "whiteout via symlink",
                vec![Symlink("a", ".."), File("a/.wh.escape", b"")],
            ),
            ("hard link out", vec![HardLink("h", "../escape")]),
            ("hard link abs", vec![HardLink("h", "/etc/passwd")]),
            (
                "hard link via symlink",
                vec![Symlink("a", "/etc"), HardLink("h", "a/passwd")],
            ),
        ];
        for (name, specs) in cases {
            let (dir, result) = unpack(&specs);
            let err = result.expect_err(name);
            assert!(err.is_user_error(), "{name}: {err:?}");
            let outside: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(outside, vec!["layer"], "{name}");
        }
    }

    #[test]
    fn symlinks_inside_the_layer_are_followed_and_kept() {
        use Spec::*;
        let (dir, result) = unpack(&[
            Dir("usr"),
            Dir("usr/lib"),
            Symlink("lib", "usr/lib"),
            File("lib/libc.so", b"elf"),
            HardLink("usr/libc-again.so", "/usr/lib/libc.so"),
        ]);
        result.unwrap();
        let root = dir.path().join("layer");
        assert_eq!(
            fs::read_link(root.join("lib")).unwrap(),
            Path::new("usr/lib")
        );
        let original = fs::metadata(root.join("usr/lib/libc.so")).unwrap();
        let linked = fs::metadata(root.join("usr/libc-again.so")).unwrap();
        assert_eq!(original.ino(), linked.ino());
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts_and_attributes_are_kept() {
        use Spec::*;
        let (dir, result) = unpack(&[
            Dir("etc"),
            File("etc/.wh.gone", b""),
            Dir("opaque"),
            File("opaque/.wh..wh..opq", b""),
            File("opaque/kept", b"k"),
            CharDev("dev-null", 1, 3),
            CharDev("already-whiteout", 0, 0),
        ]);
        result.unwrap();
        let root = dir.path().join("layer");
        for whiteout in ["etc/gone", "already-whiteout"] {
            let meta = fs::symlink_metadata(root.join(whiteout)).unwrap();
            assert!(meta.file_type().is_char_device(), "{whiteout}");
            assert_eq!(meta.rdev(), 0, "{whiteout}");
        }
        assert!(!root.join("etc/.wh.gone").exists());
        assert!(!root.join("dev-null").exists());
        assert_eq!(opaque_xattr(&root.join("opaque")), Some(b"y".to_vec()));
        let kept = fs::metadata(root.join("opaque/kept")).unwrap();
        assert_eq!(
            (kept.uid(), kept.gid(), kept.mode() & 0o7777),
            (1000, 1000, 0o644)
        );
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mtime(), 1_000_000);
    }

    pub(crate) fn opaque_xattr(path: &Path) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: both strings are NUL-terminated; `buf` has `buf.len()` writable bytes.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                OPAQUE_XATTR.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }
}

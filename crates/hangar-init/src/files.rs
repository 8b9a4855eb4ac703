//! The files API: read, write, list, delete and create directories inside the sandbox.
//!
//! Every path goes through [`crate::resolve`] first, so symlinks cannot lead outside the root or
//! into `/proc`, `/sys`, `/dev` or `/run/hangar`. Content streams both ways; a write lands in a
//! temporary file next to the target and is renamed over it, so a failed or oversized upload
//! never leaves a partial file behind.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use futures_util::StreamExt;
use hangar_proto::sandbox::{FileEntry, FileStat, FileType};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::error::ApiError;
use crate::resolve::{resolve, Resolved};

/// The largest file `PUT` accepts.
pub const MAX_UPLOAD: u64 = 1 << 30;

pub fn entry(name: String, m: &std::fs::Metadata) -> FileEntry {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    FileEntry {
        name,
        kind,
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime: m.mtime(),
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned())
}

/// `GET /files/content`: the file's bytes and length.
pub async fn read(root: &Path, path: &str) -> Result<(u64, Body), ApiError> {
    let r = resolve(root, path, true)?;
    let file = tokio::fs::File::open(&r.host)
        .await
        .map_err(|e| ApiError::io("opening", path, e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| ApiError::io("reading", path, e))?;
    if meta.is_dir() {
        return Err(ApiError::conflict(format!(
            "{path:?} is a directory; list it with GET /files"
        )));
    }
    Ok((meta.len(), Body::from_stream(ReaderStream::new(file))))
}

fn temp_name(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = target.as_os_str().to_owned();
    name.push(format!(
        ".hangar-tmp-{:x}{:x}{n}",
        std::process::id(),
        nanos as u64
    ));
    PathBuf::from(name)
}

/// `PUT /files/content`: streams `body` into the file (at most `limit` bytes; the API uses
/// [`MAX_UPLOAD`]).
pub async fn write(root: &Path, path: &str, body: Body, limit: u64) -> Result<FileEntry, ApiError> {
    let r = resolve(root, path, true)?;
    if r.sandbox == Path::new("/") {
        return Err(ApiError::conflict("\"/\" is a directory"));
    }
    let existing = std::fs::metadata(&r.host).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(ApiError::conflict(format!("{path:?} is a directory")));
    }
    if let Some(parent) = r.host.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| ApiError::io("creating parent of", path, e))?;
    }
    let tmp = temp_name(&r.host);
    // The new file keeps the owner of the file it replaces, or takes its directory's: the
    // agent (often not root) must still be able to use what was uploaded for it.
    let owner = existing.as_ref().map(|m| (m.uid(), m.gid())).or_else(|| {
        r.host
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| (m.uid(), m.gid()))
    });
    let result = write_temp(
        &tmp,
        path,
        body,
        existing.map(|m| m.permissions().mode()),
        owner,
        limit,
    )
    .await;
    let result = match result {
        Ok(()) => tokio::fs::rename(&tmp, &r.host)
            .await
            .map_err(|e| ApiError::io("renaming onto", path, e)),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| ApiError::io("stat", path, e))?;
    Ok(entry(name_of(&r.sandbox), &meta))
}

async fn write_temp(
    tmp: &Path,
    path: &str,
    body: Body,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    limit: u64,
) -> Result<(), ApiError> {
    // A fresh name, never an existing file or a symlink planted under it.
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .await
        .map_err(|e| ApiError::io("creating", path, e))?;
    if let Some((uid, gid)) = owner {
        let std_file = file
            .try_clone()
            .await
            .map_err(|e| ApiError::io("creating", path, e))?
            .into_std()
            .await;
        let _ = std::os::unix::fs::fchown(&std_file, Some(uid), Some(gid));
    }
    if let Some(mode) = mode {
        let _ = file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .await;
    }
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("reading the request body failed: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("file is larger than the limit of {limit} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::io("writing", path, e))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::io("writing", path, e))?;
    file.sync_all()
        .await
        .map_err(|e| ApiError::io("syncing", path, e))?;
    Ok(())
}

/// `DELETE /files/content`: a file, a symlink (not its target), an empty directory, or with
/// `recursive` a whole tree.
pub async fn delete(root: &Path, path: &str, recursive: bool) -> Result<(), ApiError> {
    let r = resolve(root, path, false)?;
    if r.sandbox == Path::new("/") {
        return Err(ApiError::bad_request("refusing to delete \"/\""));
    }
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| ApiError::io("stat", path, e))?;
    let result = if !meta.is_dir() {
        tokio::fs::remove_file(&r.host).await
    } else if recursive {
        tokio::fs::remove_dir_all(&r.host).await
    } else {
        tokio::fs::remove_dir(&r.host).await
    };
    result.map_err(|e| ApiError::io("deleting", path, e))
}

/// `GET /files`: the entry itself (not following a final symlink) and a directory's entries.
pub async fn stat(root: &Path, path: &str) -> Result<FileStat, ApiError> {
    let r = resolve(root, path, false)?;
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| ApiError::io("stat", path, e))?;
    let entries = if meta.is_dir() {
        Some(list(&r, path)?)
    } else {
        None
    };
    Ok(FileStat {
        path: path.to_string(),
        entry: entry(name_of(&r.sandbox), &meta),
        entries,
    })
}

fn list(r: &Resolved, path: &str) -> Result<Vec<FileEntry>, ApiError> {
    let dir = std::fs::read_dir(&r.host).map_err(|e| ApiError::io("listing", path, e))?;
    let mut entries = Vec::new();
    for item in dir {
        let item = item.map_err(|e| ApiError::io("listing", path, e))?;
        // An entry deleted while we list is simply skipped.
        if let Ok(m) = std::fs::symlink_metadata(item.path()) {
            entries.push(entry(item.file_name().to_string_lossy().into_owned(), &m));
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// `POST /files/mkdir`: `mkdir -p`.
pub async fn mkdir(root: &Path, path: &str) -> Result<FileEntry, ApiError> {
    let r = resolve(root, path, true)?;
    tokio::fs::create_dir_all(&r.host)
        .await
        .map_err(|e| ApiError::io("creating", path, e))?;
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| ApiError::io("stat", path, e))?;
    if !meta.is_dir() {
        return Err(ApiError::conflict(format!(
            "{path:?} exists and is not a directory"
        )));
    }
    Ok(entry(name_of(&r.sandbox), &meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_upload_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), "old").unwrap();
        let err = write(root, "/d/f", Body::from("too long"), 4)
            .await
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(std::fs::read_to_string(root.join("d/f")).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(root.join("d")).unwrap().count(),
            1,
            "temp file left behind"
        );

        let entry = write(root, "/d/f", Body::from("new"), 4).await.unwrap();
        assert_eq!((entry.name.as_str(), entry.size), ("f", 3));
        assert_eq!(std::fs::read_dir(root.join("d")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn writes_through_symlinks_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::os::unix::fs::symlink("/real", root.join("link")).unwrap();
        write(root, "/link/sub/f", Body::from("x"), 4)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("real/sub/f")).unwrap(),
            "x"
        );
        let stat = stat(root, "/link").await.unwrap();
        assert_eq!(stat.entry.kind, FileType::Symlink);
        delete(root, "/link", false).await.unwrap();
        assert!(
            root.join("real/sub/f").exists(),
            "deleting a symlink must not touch its target"
        );
    }
}

//! The errors of [`ImageStore::open`](crate::ImageStore::open) and
//! [`ImageStore::resolve`](crate::ImageStore::resolve).
//!
//! Messages for bad input name what is wrong with the image; they must never depend on the
//! `#[source]` being printed, and never repeat it.

use std::io;
use std::path::PathBuf;

use crate::digest::Sha256Digest;
use crate::unpack::UnpackError;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("create image store directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolve image store directory {path:?}")]
    Canonicalize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("image path must be absolute: {path:?}")]
    PathNotAbsolute { path: PathBuf },
    #[error("no such image path: {path:?}")]
    PathMissing { path: PathBuf },
    #[error("inspect image path {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not an OCI image layout or directory: {path:?}")]
    NotAnImage { path: PathBuf },
    #[error("OCI image layout is missing {path:?}")]
    MissingFile { path: PathBuf },
    #[error("read {path:?}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path:?} is too large for an image manifest, index or config")]
    TooLarge { path: PathBuf },
    #[error("malformed {what}")]
    ParseJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported digest {digest:?}: expected sha256:<64 lower-case hex digits>")]
    InvalidDigest { digest: String },
    #[error("image index has no manifest for linux/{arch}")]
    NoManifestForPlatform { arch: &'static str },
    #[error(
        "image index {digest} points to another index; only one level of nesting is supported"
    )]
    NestedIndex { digest: Sha256Digest },
    #[error("blob {digest} is neither an image manifest nor an image index")]
    NotAManifest { digest: Sha256Digest },
    #[error("unsupported layer media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    #[error("{what} {digest} digest mismatch")]
    DigestMismatch {
        what: &'static str,
        digest: Sha256Digest,
    },
    #[error("blob {digest} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        digest: Sha256Digest,
        expected: u64,
        actual: u64,
    },
    #[error("unpack layer {digest}")]
    UnpackLayer {
        digest: Sha256Digest,
        #[source]
        source: UnpackError,
    },
    #[error("store layer {path:?}")]
    StoreLayer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ResolveError {
    /// True when the image path or the image is at fault (the caller should say so, e.g. with a 400),
    /// false when this host failed (a 500).
    pub fn is_user_error(&self) -> bool {
        match self {
            ResolveError::PathNotAbsolute { .. }
            | ResolveError::PathMissing { .. }
            | ResolveError::NotAnImage { .. }
            | ResolveError::MissingFile { .. }
            | ResolveError::TooLarge { .. }
            | ResolveError::ParseJson { .. }
            | ResolveError::InvalidDigest { .. }
            | ResolveError::NoManifestForPlatform { .. }
            | ResolveError::NestedIndex { .. }
            | ResolveError::NotAManifest { .. }
            | ResolveError::UnsupportedMediaType { .. }
            | ResolveError::DigestMismatch { .. }
            | ResolveError::SizeMismatch { .. } => true,
            ResolveError::UnpackLayer { source, .. } => source.is_user_error(),
            ResolveError::Inspect { .. }
            | ResolveError::ReadFile { .. }
            | ResolveError::StoreLayer { .. } => false,
        }
    }
}

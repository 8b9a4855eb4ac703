//! Turns an image given as a host path into overlayfs lower directories plus the image's process config.
//!
//! An image is either an OCI image layout directory (as `buildah push IMG oci:DIR` writes) or a plain
//! root filesystem directory. OCI layers are verified against their digests, unpacked once into a
//! content-addressed store with whiteouts in overlayfs format, and shared by every sandbox as they are.
//! This crate is blocking and does no networking: it must never pull from a registry, never mount
//! anything, and never write outside its store directory.

mod decompress;
mod digest;
mod error;
mod layout;
mod store;
mod unpack;

use std::path::PathBuf;

pub use digest::Sha256Digest;
pub use error::{OpenError, ResolveError};
pub use store::ImageStore;
pub use unpack::UnpackError;

/// A resolved image, ready to be mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `sha256:<hex>` of the manifest for OCI layouts; for a rootfs dir `rootfs:<canonical path>`.
    pub id: String,
    /// Overlay lower directories, BOTTOM layer first (caller reverses for lowerdir=).
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// The process defaults an image asks for, as in the `config` object of an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V`, as in the OCI config.
    pub env: Vec<String>,
    /// Empty if unset.
    pub working_dir: String,
    /// Empty if unset.
    pub user: String,
    pub exposed_ports: Vec<String>,
}

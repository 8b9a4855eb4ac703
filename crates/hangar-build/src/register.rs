//! From buildah's storage into Hangar's: an OCI layout per buildah image id, resolved by
//! `hangar-image` (layers unpacked once into the shared layer store) and recorded in the store.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hangar_proto::agent::ImageInfo;
use hangar_store::ImageRow;

use crate::process::Cmd;
use crate::{ImageError, Images, Progress};

impl Images {
    /// Global buildah flags: Hangar's own storage, vfs, under the data directory.
    pub(crate) fn buildah(&self) -> Cmd {
        let dir = self.buildah_dir();
        // buildah stages big blobs in TMPDIR and fails if it is missing.
        let _ = std::fs::create_dir_all(dir.join("tmp"));
        // One storage root per driver: a root made by one cannot be opened by the other.
        let (root, run) = match self.storage_driver.as_str() {
            "vfs" => (dir.join("storage"), dir.join("run")),
            other => (
                dir.join(format!("storage-{other}")),
                dir.join(format!("run-{other}")),
            ),
        };
        Cmd::new("buildah", "buildah")
            .arg("--root")
            .arg(root)
            .arg("--runroot")
            .arg(run)
            .args(["--storage-driver", &self.storage_driver])
            // Big blobs are staged in TMPDIR (default /var/tmp): keep them on the data disk.
            .env("TMPDIR", dir.join("tmp"))
            .env("BUILDAH_ISOLATION", "chroot")
    }

    /// Exports buildah's image `buildah_id` (unless an earlier call did), resolves it and
    /// records it under `name`.
    pub(crate) async fn register(
        &self,
        buildah_id: &str,
        name: Option<&str>,
        progress: &Progress,
    ) -> Result<ImageInfo, ImageError> {
        let hex = parse_buildah_id(buildah_id)?;
        let layout = self.oci_dir().join(hex);
        if layout.join("index.json").is_file() {
            progress.line(format!(
                "image {} unchanged: reusing its OCI layout",
                &hex[..12]
            ));
        } else {
            progress.line(format!("exporting image {} to an OCI layout", &hex[..12]));
            let tmp = self.new_layout_tmp(hex)?;
            let pushed = self
                .buildah()
                .args(["push", "--quiet"])
                .arg(hex)
                .arg(format!("oci:{}", tmp.display()))
                .run("exporting the image (buildah push)", progress)
                .await;
            if let Err(e) = pushed {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            self.install_layout(&tmp, &layout)?;
        }
        self.record(&layout, name, progress).await
    }

    /// A fresh temp directory beside the final layout, for an atomic rename into place.
    pub(crate) fn new_layout_tmp(&self, hex: &str) -> Result<PathBuf, ImageError> {
        let oci = self.oci_dir();
        std::fs::create_dir_all(&oci)
            .map_err(ImageError::io(format!("creating {}", oci.display())))?;
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(oci.join(format!(".tmp-{}-{nonce}", &hex[..12])))
    }

    /// Renames a complete layout into place; a concurrent export of the same image may have
    /// won the race, which is as good.
    pub(crate) fn install_layout(&self, tmp: &Path, layout: &Path) -> Result<(), ImageError> {
        if let Err(e) = std::fs::rename(tmp, layout) {
            let _ = std::fs::remove_dir_all(tmp);
            if !layout.join("index.json").is_file() {
                return Err(ImageError::Io {
                    what: format!("moving the OCI layout to {}", layout.display()),
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// Resolves the layout (unpacking missing layers) and records it under `name`.
    pub(crate) async fn record(
        &self,
        layout: &Path,
        name: Option<&str>,
        progress: &Progress,
    ) -> Result<ImageInfo, ImageError> {
        let root = self.data_dir.join("images");
        let path = layout.to_path_buf();
        progress.line("unpacking layers into Hangar's layer store");
        let image = tokio::task::spawn_blocking(move || {
            let store = hangar_image::ImageStore::open(root).map_err(ImageError::OpenStore)?;
            store.resolve(&path).map_err(ImageError::Resolve)
        })
        .await
        .map_err(|e| ImageError::Io {
            what: "resolving the image".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        let row = ImageRow {
            id: image.id.clone(),
            name: name.map(str::to_string),
            layout: layout.display().to_string(),
            config: serde_json::to_value(&image.config).unwrap_or_default(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        self.store.put_image(&row).await?;
        // An image seen before keeps its first creation time.
        let row = self.store.image(&image.id).await?.unwrap_or(row);
        Ok(info(&row))
    }
}

/// `ImageInfo` for a stored image; the size is that of its layer blobs, read from the layout.
pub(crate) fn info(row: &ImageRow) -> ImageInfo {
    ImageInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        created_at: row.created_at.clone(),
        size: layers_size(Path::new(&row.layout)).unwrap_or(0),
    }
}

/// The sum of the layer sizes in the layout's (first) manifest.
fn layers_size(layout: &Path) -> Option<u64> {
    let read = |p: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    let index = read(layout.join("index.json"))?;
    let digest = index["manifests"][0]["digest"].as_str()?;
    let hex = digest.strip_prefix("sha256:")?;
    if hex.contains('/') {
        return None;
    }
    let manifest = read(layout.join("blobs/sha256").join(hex))?;
    Some(
        manifest["layers"]
            .as_array()?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum(),
    )
}

/// buildah prints and writes image ids as 64 hex digits, with or without `sha256:`.
pub(crate) fn parse_buildah_id(id: &str) -> Result<&str, ImageError> {
    let hex = id.trim().trim_start_matches("sha256:");
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(ImageError::Io {
            what: format!("buildah answered {id:?} where an image id was expected"),
            source: std::io::Error::other("unexpected buildah output"),
        })
    }
}

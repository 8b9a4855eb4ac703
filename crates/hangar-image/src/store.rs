//! The content-addressed layer store: `<root>/layers/sha256/<hex>/` holds the unpacked layer whose
//! compressed blob has that digest, ready to be an overlayfs lower directory.
//!
//! A layer directory appears only by an atomic `rename` of a fully unpacked and verified temp
//! directory, so a reader never sees half a layer. Once there it must never be written again:
//! running sandboxes have it mounted.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tracing::{debug, info};

use crate::decompress::decompressed;
use crate::digest::HashingReader;
use crate::layout::{self, LayerRef};
use crate::unpack::{unpack_layer, UnpackError};
use crate::{Image, ImageConfig, OpenError, ResolveError};

/// Resolves image paths to overlayfs lower layers, unpacking OCI layers into its root on first use.
#[derive(Debug, Clone)]
pub struct ImageStore {
    /// Canonical, so layer paths handed out are absolute and free of symlinks.
    root: PathBuf,
}

impl ImageStore {
    /// Creates the root (and root/layers, root/tmp) if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, OpenError> {
        let root = root.into();
        for dir in [root.join("layers/sha256"), root.join("tmp")] {
            fs::create_dir_all(&dir)
                .map_err(|source| OpenError::CreateDir { path: dir, source })?;
        }
        let root = fs::canonicalize(&root)
            .map_err(|source| OpenError::Canonicalize { path: root, source })?;
        Ok(ImageStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` must be absolute. An OCI image layout directory (has `oci-layout` + `index.json`) or a
    /// plain root filesystem directory (anything else that is a directory). Unpacks missing layers;
    /// returns the image.
    pub fn resolve(&self, path: &Path) -> Result<Image, ResolveError> {
        if !path.is_absolute() {
            return Err(ResolveError::PathNotAbsolute {
                path: path.to_owned(),
            });
        }
        let inspect = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => ResolveError::PathMissing {
                path: path.to_owned(),
            },
            _ => ResolveError::Inspect {
                path: path.to_owned(),
                source,
            },
        };
        if !fs::metadata(path).map_err(inspect)?.is_dir() {
            return Err(ResolveError::NotAnImage {
                path: path.to_owned(),
            });
        }
        let dir = fs::canonicalize(path).map_err(inspect)?;
        if layout::is_layout(&dir) {
            return self.resolve_layout(&dir);
        }
        // A plain directory is its own single lower layer; overlayfs never writes to lower layers.
        Ok(Image {
            id: format!("rootfs:{}", dir.display()),
            layers: vec![dir],
            config: ImageConfig::default(),
        })
    }

    fn resolve_layout(&self, layout: &Path) -> Result<Image, ResolveError> {
        let manifest = layout::read_manifest(layout)?;
        let layers = manifest
            .layers
            .iter()
            .map(|layer| self.ensure_layer(layout, layer))
            .collect::<Result<_, _>>()?;
        Ok(Image {
            id: manifest.digest.to_string(),
            layers,
            config: manifest.config,
        })
    }

    /// The layer's directory in the store, unpacking the blob first if it is not there yet.
    fn ensure_layer(&self, layout: &Path, layer: &LayerRef) -> Result<PathBuf, ResolveError> {
        let dest = self.root.join("layers/sha256").join(layer.digest.hex());
        if dest.is_dir() {
            debug!(layer = %layer.digest, "layer already unpacked");
            return Ok(dest);
        }
        let started = Instant::now();
        let blob = layout::blob_path(layout, &layer.digest);
        let file = File::open(&blob).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ResolveError::MissingFile { path: blob.clone() },
            _ => ResolveError::ReadFile {
                path: blob.clone(),
                source,
            },
        })?;
        let tmp = self.temp_dir(layer)?;
        if let Err(e) = unpack_verified(file, &blob, &tmp, layer) {
            remove_quietly(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dest) {
            Ok(()) => {
                info!(layer = %layer.digest, elapsed = ?started.elapsed(), "unpacked layer");
                Ok(dest)
            }
            // Another thread or process unpacked the same layer first; theirs is as good as ours.
            Err(_) if dest.is_dir() => {
                remove_quietly(&tmp);
                Ok(dest)
            }
            Err(source) => {
                remove_quietly(&tmp);
                Err(ResolveError::StoreLayer { path: dest, source })
            }
        }
    }

    /// A fresh directory under `<root>/tmp`, on the same filesystem as the layers so `rename` is atomic.
    fn temp_dir(&self, layer: &LayerRef) -> Result<PathBuf, ResolveError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("{}.{}.{n}", layer.digest.hex(), std::process::id());
            let path = self.root.join("tmp").join(name);
            match fs::create_dir(&path) {
                // The layer root's mode is what the sandbox sees at the top of this layer.
                Ok(()) => {
                    return fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map(|()| path.clone())
                        .map_err(|source| ResolveError::StoreLayer { path, source })
                }
                // Left behind by an earlier process that had the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(ResolveError::StoreLayer { path, source }),
            }
        }
    }
}

/// Unpacks the blob into `dir` while hashing it. The digest is checked before any unpack error is
/// reported: a corrupted blob usually fails to decompress too, and "digest mismatch" says why.
fn unpack_verified(
    file: File,
    blob: &Path,
    dir: &Path,
    layer: &LayerRef,
) -> Result<(), ResolveError> {
    let mut hashing = HashingReader::new(file);
    let unpacked = decompressed(BufReader::new(&mut hashing))
        .map_err(UnpackError::ReadArchive)
        .and_then(|archive| unpack_layer(archive, dir));
    let (hex, len) = hashing.finish().map_err(|source| ResolveError::ReadFile {
        path: blob.to_owned(),
        source,
    })?;
    layout::check_blob("layer", &layer.digest, layer.size, &hex, len)?;
    unpacked.map_err(|source| ResolveError::UnpackLayer {
        digest: layer.digest.clone(),
        source,
    })
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        tracing::warn!(?path, error = %e, "could not remove temporary layer directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompress::tests::zstd_raw_frame;
    use crate::unpack::tests::{opaque_xattr, tar_of, Spec};
    use sha2::{Digest as _, Sha256};
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::process::Command;

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// Writes `bytes` as a blob of the layout at `dir` and returns its descriptor.
    fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let hex = hex::encode(Sha256::digest(bytes));
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    fn manifest(
        dir: &Path,
        config: &serde_json::Value,
        layers: &[(&str, Vec<u8>)],
    ) -> serde_json::Value {
        let config = blob(
            dir,
            "application/vnd.oci.image.config.v1+json",
            config.to_string().as_bytes(),
        );
        let layers: Vec<_> = layers
            .iter()
            .map(|(media_type, bytes)| blob(dir, media_type, bytes))
            .collect();
        let manifest = serde_json::json!({"schemaVersion": 2, "config": config, "layers": layers});
        blob(
            dir,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    fn write_index(dir: &Path, manifests: &[serde_json::Value]) {
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
    }

    /// An OCI layout at `<tmp>/image` holding one image with `layers`; returns the manifest digest.
    fn layout(
        tmp: &Path,
        config: &serde_json::Value,
        layers: &[(&str, Vec<u8>)],
    ) -> (PathBuf, String) {
        let dir = tmp.join("image");
        let manifest = manifest(&dir, config, layers);
        write_index(&dir, std::slice::from_ref(&manifest));
        (dir, manifest["digest"].as_str().unwrap().to_owned())
    }

    fn store(tmp: &Path) -> ImageStore {
        ImageStore::open(tmp.join("store")).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn two_layers() -> Vec<(&'static str, Vec<u8>)> {
        use Spec::*;
        let lower = tar_of(&[
            Dir("etc"),
            File("etc/keep", b"keep"),
            File("etc/gone", b"gone"),
            Dir("data"),
            File("data/old", b"old"),
        ]);
        let upper = tar_of(&[
            Dir("etc"),
            File("etc/.wh.gone", b""),
            Dir("data"),
            File("data/.wh..wh..opq", b""),
            File("data/new", b"new"),
        ]);
        // The lower layer is gzip labelled as plain tar, as some tools write: the bytes must decide.
        vec![(TAR, gzip(&lower)), (ZSTD, zstd_raw_frame(&upper))]
    }

    /// Unmounts on drop, so a failing assertion does not leave a mount behind.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn layers_mount_as_overlayfs_with_whiteouts_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {
            "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["PATH=/bin"],
            "WorkingDir": "/data", "User": "1000", "ExposedPorts": {"80/tcp": {}}}});
        let (dir, digest) = layout(tmp.path(), &config, &two_layers());
        let store = store(tmp.path());

        let image = store.resolve(&dir).unwrap();

        assert_eq!(image.id, digest);
        assert_eq!(image.config.entrypoint, ["/bin/sh"]);
        assert_eq!(image.config.cmd, ["-c", "true"]);
        assert_eq!(image.config.env, ["PATH=/bin"]);
        assert_eq!(image.config.working_dir, "/data");
        assert_eq!(image.config.user, "1000");
        assert_eq!(image.config.exposed_ports, ["80/tcp"]);
        let [lower, upper] = &image.layers[..] else {
            panic!("{:?}", image.layers)
        };
        assert!(lower.starts_with(store.root().join("layers/sha256")));
        assert_eq!(fs::read(lower.join("etc/gone")).unwrap(), b"gone");
        let whiteout = fs::symlink_metadata(upper.join("etc/gone")).unwrap();
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
        assert_eq!(opaque_xattr(&upper.join("data")), Some(b"y".to_vec()));
        assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());

        let merged = tmp.path().join("merged");
        fs::create_dir(&merged).unwrap();
        let options = format!("lowerdir={}:{}", upper.display(), lower.display());
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .unwrap();
        assert!(status.success(), "mount overlay");
        let _mounted = Mounted(merged.clone());
        assert_eq!(names(&merged.join("etc")), ["keep"]);
        assert_eq!(names(&merged.join("data")), ["new"]);
    }

    #[test]
    fn second_resolve_reuses_unpacked_layers() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = layout(tmp.path(), &serde_json::json!({}), &two_layers());
        let store = store(tmp.path());
        let first = store.resolve(&dir).unwrap();
        let stamp = |p: &Path| {
            let meta = fs::metadata(p).unwrap();
            (meta.ino(), meta.mtime(), meta.mtime_nsec())
        };
        let before: Vec<_> = first.layers.iter().map(|l| stamp(l)).collect();

        let second = store.resolve(&dir).unwrap();

        assert_eq!(second, first);
        let after: Vec<_> = second.layers.iter().map(|l| stamp(l)).collect();
        assert_eq!(after, before);
        assert_eq!(second.config, ImageConfig::default());
    }

    #[test]
    fn concurrent_resolves_share_one_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = layout(tmp.path(), &serde_json::json!({}), &two_layers());
        let store = store(tmp.path());
        let images: Vec<Image> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| store.resolve(&dir).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(images.iter().all(|image| *image == images[0]));
        assert_eq!(names(&store.root().join("layers/sha256")).len(), 2);
        assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
    }

    #[test]
    fn nested_index_picks_this_platform() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("image");
        let layer = (DOCKER_GZIP, gzip(&tar_of(&[Spec::File("hello", b"hi")])));
        let ours = manifest(
            &dir,
            &serde_json::json!({"config": {"Cmd": ["ours"]}}),
            std::slice::from_ref(&layer),
        );
        let theirs = manifest(
            &dir,
            &serde_json::json!({"config": {"Cmd": ["theirs"]}}),
            &[layer],
        );
        let platform = |mut m: serde_json::Value, arch: &str| {
            m["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
            m
        };
        let nested = serde_json::json!({"schemaVersion": 2, "manifests": [
            platform(theirs, "s390x"), platform(ours.clone(), layout::host_arch())]});
        let nested = blob(
            &dir,
            "application/vnd.oci.image.index.v1+json",
            nested.to_string().as_bytes(),
        );
        write_index(&dir, &[nested]);

        let image = store(tmp.path()).resolve(&dir).unwrap();

        assert_eq!(image.id, ours["digest"].as_str().unwrap());
        assert_eq!(image.config.cmd, ["ours"]);
        assert_eq!(fs::read(image.layers[0].join("hello")).unwrap(), b"hi");
    }

    #[test]
    fn rootfs_directory_is_its_own_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        let canonical = rootfs.canonicalize().unwrap();

        let image = store(tmp.path()).resolve(&rootfs.join("bin/..")).unwrap();

        assert_eq!(image.id, format!("rootfs:{}", canonical.display()));
        assert_eq!(image.layers, [canonical]);
        assert_eq!(image.config, ImageConfig::default());
    }

    /// Each broken input must be refused as the caller's fault, with the given message, leaving
    /// nothing in the store.
    #[test]
    fn bad_input_is_a_user_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "not an image").unwrap();
        let check = |path: &Path, expected: &str| {
            let store = store(tmp.path());
            let err = store.resolve(path).unwrap_err();
            assert!(err.is_user_error(), "{path:?}: {err:?}");
            assert!(err.to_string().contains(expected), "{path:?}: {err}");
            assert_eq!(
                names(&store.root().join("layers/sha256")),
                Vec::<String>::new()
            );
            assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
        };
        check(
            Path::new("relative/image"),
            r#"image path must be absolute: "relative/image""#,
        );
        check(&tmp.path().join("missing"), "no such image path");
        check(&file, "not an OCI image layout or directory");

        let layer = tar_of(&[Spec::File("ok", b"fine")]);
        let broken = |name: &str, layers: &[(&str, Vec<u8>)]| {
            let dir = tmp.path().join(name);
            fs::create_dir(&dir).unwrap();
            layout(&dir, &serde_json::json!({}), layers).0
        };

        let corrupt = broken("corrupt", &[(TAR, layer.clone())]);
        let layer_hex = hex::encode(Sha256::digest(&layer));
        fs::write(
            corrupt.join("blobs/sha256").join(&layer_hex),
            tar_of(&[Spec::File("ok", b"evil")]),
        )
        .unwrap();
        check(
            &corrupt,
            &format!("layer sha256:{layer_hex} digest mismatch"),
        );

        let escape = broken(
            "escape",
            &[(
                TAR,
                tar_of(&[Spec::File("ok", b"x"), Spec::File("../escape", b"x")]),
            )],
        );
        check(&escape, "unpack layer sha256:");

        let foreign = broken(
            "foreign",
            &[("application/vnd.example.squashfs", layer.clone())],
        );
        check(
            &foreign,
            r#"unsupported layer media type "application/vnd.example.squashfs""#,
        );

        let missing_blob = broken("missing-blob", &[(TAR, layer.clone())]);
        fs::remove_file(missing_blob.join("blobs/sha256").join(&layer_hex)).unwrap();
        check(&missing_blob, "OCI image layout is missing");

        let no_index = broken("no-index", &[(TAR, layer)]);
        fs::remove_file(no_index.join("index.json")).unwrap();
        check(&no_index, "OCI image layout is missing");
        fs::write(no_index.join("index.json"), "{").unwrap();
        check(&no_index, "malformed index.json");
    }
}

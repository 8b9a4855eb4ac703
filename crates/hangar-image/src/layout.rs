//! Reading an OCI image layout directory: `index.json` → manifest → config and layer descriptors.
//!
//! Only the small JSON documents are read here, whole but bounded in size, and each is checked against
//! its digest before it is parsed. This must never write anything, and never read a layer: layers are
//! streamed and verified by the store as they are unpacked.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{HashingReader, Sha256Digest};
use crate::{ImageConfig, ResolveError};

/// Manifests, indexes and configs are a few KiB; this only stops a hostile layout from making us
/// allocate gigabytes.
const MAX_JSON_BYTES: u64 = 4 << 20;

/// Layer media types we can unpack; the codec itself is sniffed from the bytes.
const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// An image as the layout describes it, before any layer is unpacked.
pub(crate) struct ManifestInfo {
    pub(crate) digest: Sha256Digest,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<LayerRef>,
}

/// A layer blob, bottom layer first in [`ManifestInfo::layers`].
pub(crate) struct LayerRef {
    pub(crate) digest: Sha256Digest,
    pub(crate) size: u64,
}

/// True if `dir` declares itself an OCI image layout.
pub(crate) fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file()
}

pub(crate) fn blob_path(layout: &Path, digest: &Sha256Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

/// Reads `index.json`, picks the manifest for this host and reads it and its config.
pub(crate) fn read_manifest(layout: &Path) -> Result<ManifestInfo, ResolveError> {
    let index_path = layout.join("index.json");
    let index_bytes = read_bounded(&index_path)?;
    let index: Index = parse_json("index.json", &index_bytes)?;
    let mut chosen = choose(&index.manifests)?;
    let mut followed_index = false;
    loop {
        let digest = parse_digest(&chosen.digest)?;
        let bytes = read_blob(layout, "manifest", &digest, chosen.size)?;
        let document: ManifestOrIndex = parse_json(&format!("manifest {digest}"), &bytes)?;
        match document {
            ManifestOrIndex {
                manifests: Some(manifests),
                ..
            } => {
                // One level only: registries nest a per-platform index in an index, never deeper.
                if followed_index {
                    return Err(ResolveError::NestedIndex { digest });
                }
                followed_index = true;
                chosen = choose(&manifests)?.clone();
            }
            ManifestOrIndex {
                config: Some(config),
                layers: Some(layers),
                ..
            } => return read_image(layout, digest, &config, &layers),
            _ => return Err(ResolveError::NotAManifest { digest }),
        }
    }
}

fn read_image(
    layout: &Path,
    digest: Sha256Digest,
    config: &Descriptor,
    layers: &[Descriptor],
) -> Result<ManifestInfo, ResolveError> {
    let config_digest = parse_digest(&config.digest)?;
    let config_bytes = read_blob(layout, "config", &config_digest, config.size)?;
    let config_blob: ConfigBlob = parse_json(&format!("config {config_digest}"), &config_bytes)?;
    let layers = layers
        .iter()
        .map(|layer| {
            if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
                return Err(ResolveError::UnsupportedMediaType {
                    media_type: layer.media_type.clone(),
                });
            }
            Ok(LayerRef {
                digest: parse_digest(&layer.digest)?,
                size: layer.size,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(ManifestInfo {
        digest,
        config: config_blob.config.unwrap_or_default().into(),
        layers,
    })
}

/// The only manifest, or else the one for linux on this host's architecture.
fn choose(manifests: &[Descriptor]) -> Result<Descriptor, ResolveError> {
    if let [only] = manifests {
        return Ok(only.clone());
    }
    let arch = host_arch();
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .cloned()
        .ok_or(ResolveError::NoManifestForPlatform { arch })
}

/// The host architecture in GOARCH spelling, which is what image platforms use.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn parse_digest(digest: &str) -> Result<Sha256Digest, ResolveError> {
    Sha256Digest::parse(digest).ok_or_else(|| ResolveError::InvalidDigest {
        digest: digest.to_owned(),
    })
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, ResolveError> {
    serde_json::from_slice(bytes).map_err(|source| ResolveError::ParseJson {
        what: what.to_owned(),
        source,
    })
}

fn open(path: &Path) -> Result<File, ResolveError> {
    File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ResolveError::MissingFile {
            path: path.to_owned(),
        },
        _ => ResolveError::ReadFile {
            path: path.to_owned(),
            source,
        },
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ResolveError> {
    let mut bytes = Vec::new();
    open(path)?
        .take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ResolveError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(ResolveError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Reads a JSON blob and checks it is exactly the `size` bytes its descriptor promised, hashing to
/// `digest`.
fn read_blob(
    layout: &Path,
    what: &'static str,
    digest: &Sha256Digest,
    size: u64,
) -> Result<Vec<u8>, ResolveError> {
    let path = blob_path(layout, digest);
    if size > MAX_JSON_BYTES {
        return Err(ResolveError::TooLarge { path });
    }
    let mut reader = HashingReader::new(open(&path)?.take(size + 1));
    let mut bytes = Vec::new();
    let read = reader.read_to_end(&mut bytes).and_then(|_| reader.finish());
    let (hex, len) = read.map_err(|source| ResolveError::ReadFile {
        path: path.clone(),
        source,
    })?;
    check_blob(what, digest, size, &hex, len)?;
    Ok(bytes)
}

/// Checks a fully read blob against its descriptor.
pub(crate) fn check_blob(
    what: &'static str,
    digest: &Sha256Digest,
    size: u64,
    actual_hex: &str,
    actual_size: u64,
) -> Result<(), ResolveError> {
    if actual_hex != digest.hex() {
        return Err(ResolveError::DigestMismatch {
            what,
            digest: digest.clone(),
        });
    }
    // A blob that hashes right but has another size means the descriptor is wrong, not the blob.
    if actual_size != size {
        return Err(ResolveError::SizeMismatch {
            digest: digest.clone(),
            expected: size,
            actual: actual_size,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

/// Indexes and manifests are told apart by shape, since descriptors often omit or misstate mediaType.
#[derive(Deserialize)]
struct ManifestOrIndex {
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigBlob {
    config: Option<RuntimeConfig>,
}

/// The `config` object of an image config. Fields are `Option` because Docker writes explicit nulls.
#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

impl From<RuntimeConfig> for ImageConfig {
    fn from(config: RuntimeConfig) -> ImageConfig {
        ImageConfig {
            entrypoint: config.entrypoint.unwrap_or_default(),
            cmd: config.cmd.unwrap_or_default(),
            env: config.env.unwrap_or_default(),
            working_dir: config.working_dir.unwrap_or_default(),
            user: config.user.unwrap_or_default(),
            exposed_ports: config
                .exposed_ports
                .unwrap_or_default()
                .into_keys()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(json: &str) -> ImageConfig {
        let blob: ConfigBlob = serde_json::from_str(json).unwrap();
        blob.config.unwrap_or_default().into()
    }

    #[test]
    fn config_fields_missing_or_null_are_empty() {
        assert_eq!(
            config_of(r#"{"architecture":"amd64"}"#),
            ImageConfig::default()
        );
        assert_eq!(
            config_of(r#"{"config":{"Entrypoint":null,"Cmd":null,"Env":null}}"#),
            ImageConfig::default()
        );
    }

    #[test]
    fn config_fields_are_read() {
        let config = config_of(
            r#"{"config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["A=1","PATH=/bin"],
                "WorkingDir":"/work","User":"1000:1000","ExposedPorts":{"8080/tcp":{},"53/udp":{}},
                "Labels":{"x":"y"}}}"#,
        );
        assert_eq!(
            config,
            ImageConfig {
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo hi".into()],
                env: vec!["A=1".into(), "PATH=/bin".into()],
                working_dir: "/work".into(),
                user: "1000:1000".into(),
                exposed_ports: vec!["53/udp".into(), "8080/tcp".into()],
            }
        );
    }

    #[test]
    fn choose_takes_the_only_manifest_or_the_host_platform() {
        let descriptor = |arch: &str| Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{arch}"),
            size: 1,
            platform: Some(Platform {
                architecture: arch.to_owned(),
                os: "linux".to_owned(),
            }),
        };
        assert_eq!(
            choose(&[descriptor("s390x")]).unwrap().digest,
            "sha256:s390x"
        );
        let both = [descriptor("s390x"), descriptor(host_arch())];
        assert_eq!(
            choose(&both).unwrap().digest,
            format!("sha256:{}", host_arch())
        );
        let neither = [descriptor("s390x"), descriptor("mips")];
        assert!(choose(&neither).unwrap_err().is_user_error());
        assert!(choose(&[]).unwrap_err().is_user_error());
    }
}

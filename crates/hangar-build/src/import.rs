//! Importing an OCI image layout, an OCI archive or a docker archive (`docker save`): into
//! buildah's storage (so a Dockerfile can build `FROM` it) and into Hangar's store.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use hangar_proto::agent::ImageInfo;

use crate::register::parse_buildah_id;
use crate::{validate_name, ImageError, Images, Progress};

/// What to import, by its kind as detected from its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// A directory with `oci-layout` and `index.json`.
    OciLayout(PathBuf),
    /// A tar of an OCI layout.
    OciArchive(PathBuf),
    /// A `docker save` tarball (`manifest.json` at the top), plain or gzipped.
    DockerArchive(PathBuf),
}

impl ImportSource {
    /// Looks at `path` and says what kind of image it holds.
    pub fn detect(path: &Path) -> Result<ImportSource, ImageError> {
        let not = |reason: &str| ImageError::NotAnImage {
            path: path.to_owned(),
            reason: reason.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => not("no such file or directory on the server's host"),
            _ => not(&format!("cannot read it: {e}")),
        })?;
        if meta.is_dir() {
            if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
                return Ok(ImportSource::OciLayout(path.to_owned()));
            }
            return Err(not(
                "a directory that is not an OCI image layout (no oci-layout and index.json)",
            ));
        }
        let mut file = File::open(path).map_err(|e| not(&format!("cannot open it: {e}")))?;
        let mut magic = [0u8; 2];
        let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        let file = File::open(path).map_err(|e| not(&format!("cannot open it: {e}")))?;
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|_| not("not a tar archive of an image"))?;
        for entry in entries {
            let entry = entry.map_err(|_| not("not a tar archive of an image"))?;
            let name = entry
                .path()
                .map(|p| p.to_string_lossy().trim_start_matches("./").to_string())
                .unwrap_or_default();
            match name.as_str() {
                "oci-layout" if !gzip => return Ok(ImportSource::OciArchive(path.to_owned())),
                "manifest.json" => return Ok(ImportSource::DockerArchive(path.to_owned())),
                _ => {}
            }
        }
        Err(not(
            "not an image archive: an OCI archive has `oci-layout` at its top, a docker archive `manifest.json`",
        ))
    }

    fn transport(&self) -> String {
        match self {
            ImportSource::OciLayout(p) => format!("oci:{}", p.display()),
            ImportSource::OciArchive(p) => format!("oci-archive:{}", p.display()),
            ImportSource::DockerArchive(p) => format!("docker-archive:{}", p.display()),
        }
    }
}

impl Images {
    /// Imports the image at `path` (on the server's host) under `name`, if given.
    pub async fn import(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: &Progress,
    ) -> Result<ImageInfo, ImageError> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        if !path.is_absolute() {
            return Err(ImageError::Invalid(format!(
                "the path to import must be absolute, not {:?}",
                path.display()
            )));
        }
        let path = path.to_owned();
        let source = tokio::task::spawn_blocking(move || ImportSource::detect(&path))
            .await
            .map_err(|e| ImageError::Io {
                what: "inspecting the archive".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        progress.line(format!("importing {}", source.transport()));
        let _named = match name {
            Some(n) => Some(self.lock_name(n).await),
            None => None,
        };
        let hex = match &source {
            ImportSource::OciLayout(dir) => self.pull_layout(dir, progress).await?,
            other => {
                let out = self
                    .buildah()
                    .args(["pull", "--quiet"])
                    .arg(other.transport())
                    .run("importing the image (buildah pull)", progress)
                    .await?;
                last_id(&out.stdout)?
            }
        };
        if let Some(name) = name {
            self.buildah()
                .arg("tag")
                .arg(&hex)
                .arg(name)
                .run("tagging the image", progress)
                .await?;
        }
        self.register(&hex, name, progress).await
    }
}

/// The image id buildah prints last.
pub(crate) fn last_id(stdout: &[String]) -> Result<String, ImageError> {
    let id = stdout
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .cloned()
        .unwrap_or_default();
    Ok(parse_buildah_id(&id)?.to_string())
}

impl Images {
    /// Pulls an OCI layout directory into buildah's storage. buildah names an image pulled
    /// from `oci:PATH` after the path and refuses paths that are not a valid (lower-case)
    /// reference, so the layout is reached through a symlink with a plain name, relative
    /// to the working directory.
    pub(crate) async fn pull_layout(
        &self,
        dir: &Path,
        progress: &Progress,
    ) -> Result<String, ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix("pull-")
            .tempdir_in(self.tmp_dir()?)
            .map_err(ImageError::io("creating a temp directory"))?;
        std::os::unix::fs::symlink(dir, tmp.path().join("hangar-import"))
            .map_err(ImageError::io("linking the layout"))?;
        let out = self
            .buildah()
            .current_dir(tmp.path())
            .args(["pull", "--quiet", "oci:hangar-import"])
            .run("importing the image (buildah pull)", progress)
            .await?;
        last_id(&out.stdout)
    }
}

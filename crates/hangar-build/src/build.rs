//! `buildah build` of an uploaded context, with buildah's layer cache, never pulling.

use hangar_proto::agent::ImageInfo;

use crate::context::BuildContext;
use crate::register::parse_buildah_id;
use crate::{validate_name, ImageError, Images, Progress};

/// A build: the unpacked context, the Dockerfile's path in it and the image name.
pub struct BuildRequest {
    pub context: BuildContext,
    pub dockerfile: String,
    pub name: String,
}

impl Images {
    /// Builds the Dockerfile and registers the image under the request's name. A rebuild
    /// that buildah answers entirely from its layer cache yields the same image without
    /// exporting it again.
    pub async fn build(
        &self,
        req: BuildRequest,
        progress: &Progress,
    ) -> Result<ImageInfo, ImageError> {
        validate_name(&req.name)?;
        let dockerfile = req
            .context
            .dockerfile(&req.dockerfile)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let _named = self.lock_name(&req.name).await;
        let iidfile = req.context.scratch().join("iid");
        let built = self
            .buildah()
            .args(["build", "--layers", "--pull=never", "--isolation", "chroot"])
            .arg("--iidfile")
            .arg(&iidfile)
            .arg("-f")
            .arg(&dockerfile)
            .arg("-t")
            .arg(&req.name)
            .arg(req.context.dir())
            .run("the build", progress)
            .await;
        if let Err(ImageError::StepFailed { output, .. }) = &built {
            if let Some(image) = missing_base(output) {
                return Err(ImageError::BaseMissing { image });
            }
        }
        built?;
        let iid = std::fs::read_to_string(&iidfile)
            .map_err(ImageError::io("reading the id of the built image"))?;
        let hex = parse_buildah_id(&iid)?.to_string();
        self.register(&hex, Some(&req.name), progress).await
    }
}

/// The base image named in buildah's "image not known" error, which is what `--pull=never`
/// gives for a `FROM` that is not in local storage.
pub(crate) fn missing_base(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let rest = line.split("creating build container: ").nth(1)?;
        let image = rest.strip_suffix(": image not known")?;
        Some(image.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_missing() {
        let out = "STEP 1/2: FROM nosuch:latest\nError: creating build container: nosuch:latest: image not known";
        assert_eq!(missing_base(out).as_deref(), Some("nosuch:latest"));
        assert_eq!(
            missing_base(
                "STEP 2/2: RUN false\nError: building at STEP \"RUN false\": exit status 1"
            ),
            None
        );
    }
}

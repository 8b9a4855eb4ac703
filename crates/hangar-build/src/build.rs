//! `buildah build` of an uploaded context, with buildah's layer cache, never pulling.

use std::path::Path;

use hangar_proto::agent::ImageInfo;
use sha2::{Digest, Sha256};

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
        // buildah's own cache answers an unchanged build, but with vfs it still copies the
        // base image's root filesystem for every step (seconds for a Debian base). Hangar
        // remembers which image an identical context over identical base images gave.
        let key = self.build_key(&req, &dockerfile, progress).await;
        if let Some(key) = &key {
            if let Some(hex) = self.cached_build(key, progress).await {
                progress.line(format!(
                    "nothing changed since the last build of this context: image {}",
                    &hex[..12]
                ));
                self.buildah()
                    .quiet()
                    .arg("tag")
                    .arg(&hex)
                    .arg(&req.name)
                    .run("tagging the image", progress)
                    .await?;
                return self.register(&hex, Some(&req.name), progress).await;
            }
        }
        let iidfile = req.context.scratch().join("iid");
        // `--force-rm`: a failed step's working container (mounted) is removed too, not left
        // holding a mount and its files until someone cleans up by hand.
        let mut cmd = self.buildah().args([
            "build",
            "--layers",
            "--force-rm",
            "--pull=never",
            "--isolation",
            "chroot",
        ]);
        for v in self.host_trust() {
            cmd = cmd.arg("--volume").arg(v);
        }
        let built = cmd
            .arg("--iidfile")
            .arg(&iidfile)
            .arg("-f")
            .arg(&dockerfile)
            .arg("-t")
            .arg(&req.name)
            .arg(req.context.dir())
            .run("the build", progress)
            .await;
        if let Err(ImageError::StepFailed { output, .. }) = built {
            if let Some(image) = missing_base(&output) {
                return Err(ImageError::BaseMissing { image });
            }
            return Err(ImageError::BuildFailed { output });
        }
        built?;
        let iid = std::fs::read_to_string(&iidfile)
            .map_err(ImageError::io("reading the id of the built image"))?;
        let hex = parse_buildah_id(&iid)?.to_string();
        if let Some(key) = &key {
            self.remember_build(key, &hex);
        }
        self.register(&hex, Some(&req.name), progress).await
    }

    /// A digest of everything the build's result depends on: the Dockerfile's path, the
    /// context's files (paths, modes, contents) and the ids of the external images it
    /// builds on. None when that cannot be known cheaply (a `FROM $ARG`, a missing base).
    async fn build_key(
        &self,
        req: &BuildRequest,
        dockerfile: &Path,
        progress: &Progress,
    ) -> Option<String> {
        let text = std::fs::read_to_string(dockerfile).ok()?;
        let refs = external_refs(&text)?;
        let mut hasher = Sha256::new();
        hasher.update(format!("hangar-build-key 1\n{}\n", req.dockerfile));
        for r in refs {
            let out = self
                .buildah()
                .quiet()
                .args(["inspect", "--type", "image", "--format", "{{.FromImageID}}"])
                .arg(&r)
                .run("looking up a base image", progress)
                .await
                .ok()?;
            hasher.update(format!("base {r} {}\n", out.stdout.join("")));
        }
        let dir = req.context.dir();
        let context = tokio::task::spawn_blocking(move || hash_tree(&dir))
            .await
            .ok()?
            .ok()?;
        hasher.update(context);
        Some(hex::encode(hasher.finalize()))
    }

    /// Bind mounts that make `RUN` steps trust the host's certificate authorities, as the
    /// host's own tools do: builds reach package registries over the host's network, and
    /// where that network inspects TLS with its own CA, pip and curl inside the build must
    /// trust it too. Only while `RUN` executes; nothing of it is committed to the image.
    fn host_trust(&self) -> Vec<String> {
        const HOST_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
        if !Path::new(HOST_CA).is_file() {
            return vec![];
        }
        let pip_conf = self.buildah_dir().join("pip.conf");
        let text = format!("[global]\ncert = {HOST_CA}\n");
        if std::fs::read_to_string(&pip_conf).ok().as_deref() != Some(text.as_str())
            && std::fs::write(&pip_conf, &text).is_err()
        {
            return vec![];
        }
        vec![
            format!("{HOST_CA}:{HOST_CA}:ro"),
            format!("{}:/etc/pip.conf:ro", pip_conf.display()),
        ]
    }

    fn build_cache_file(&self, key: &str) -> std::path::PathBuf {
        self.buildah_dir().join("build-cache").join(key)
    }

    /// The image an identical earlier build gave, if buildah still has it.
    async fn cached_build(&self, key: &str, progress: &Progress) -> Option<String> {
        let hex = std::fs::read_to_string(self.build_cache_file(key)).ok()?;
        let hex = parse_buildah_id(&hex).ok()?.to_string();
        self.buildah()
            .quiet()
            .args(["inspect", "--type", "image", "--format", "{{.FromImageID}}"])
            .arg(&hex)
            .run("looking up the cached image", progress)
            .await
            .ok()?;
        Some(hex)
    }

    fn remember_build(&self, key: &str, hex: &str) {
        let path = self.build_cache_file(key);
        let tmp = path.with_extension("tmp");
        let written = std::fs::create_dir_all(path.parent().expect("has a parent"))
            .and_then(|()| std::fs::write(&tmp, hex))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the build in the build cache");
        }
    }
}

/// The images a Dockerfile reads from outside itself (`FROM` and `COPY --from=`), or None if
/// any is computed (`$ARG`) or hidden (`RUN --mount=...from=`, a parser directive).
pub(crate) fn external_refs(dockerfile: &str) -> Option<Vec<String>> {
    let mut stages: Vec<String> = Vec::new();
    let mut refs = Vec::new();
    let mut logical = String::new();
    let mut lines = Vec::new();
    for raw in dockerfile.lines() {
        let t = raw.trim();
        if t.starts_with('#') {
            if t.to_ascii_lowercase()
                .replace(' ', "")
                .starts_with("#escape=")
            {
                return None;
            }
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                logical.push_str(head);
                logical.push(' ');
            }
            None => {
                logical.push_str(t);
                lines.push(std::mem::take(&mut logical));
            }
        }
    }
    lines.push(logical);
    let mut stage_count = 0usize;
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        match first.to_ascii_uppercase().as_str() {
            "FROM" => {
                let mut rest = words[1..].iter().filter(|w| !w.starts_with("--"));
                let image = rest.next()?;
                if image.contains('$') {
                    return None;
                }
                let lower = image.to_ascii_lowercase();
                if lower != "scratch" && !stages.contains(&lower) {
                    refs.push(image.to_string());
                }
                if rest.next().is_some_and(|w| w.eq_ignore_ascii_case("as")) {
                    stages.push(rest.next()?.to_ascii_lowercase());
                }
                stage_count += 1;
            }
            "COPY" | "ADD" => {
                for w in &words[1..] {
                    if let Some(from) = w.strip_prefix("--from=") {
                        if from.contains('$') {
                            return None;
                        }
                        let lower = from.to_ascii_lowercase();
                        let stage = stages.contains(&lower)
                            || from.parse::<usize>().is_ok_and(|n| n < stage_count);
                        if !stage {
                            refs.push(from.to_string());
                        }
                    }
                }
            }
            "RUN" if line.contains("--mount") => return None,
            _ => {}
        }
    }
    refs.sort();
    refs.dedup();
    Some(refs)
}

/// A digest of a directory tree: every entry's path, kind and mode, and each file's content
/// or each symlink's target, in a fixed order. Times and owners are left out, as buildah's
/// cache leaves them out.
fn hash_tree(root: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, rel: &Path, h: &mut Sha256) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(e.path())?;
            let mode = meta.permissions().mode();
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(format!("\0{mode:o}\0").as_bytes());
            if meta.is_dir() {
                h.update(b"dir\0");
                walk(root, &rel, h)?;
            } else if meta.is_symlink() {
                h.update(b"link\0");
                h.update(std::fs::read_link(e.path())?.as_os_str().as_encoded_bytes());
            } else {
                h.update(format!("file {}\0", meta.len()).as_bytes());
                std::io::copy(&mut std::fs::File::open(e.path())?, h)?;
            }
            h.update(b"\n");
        }
        Ok(())
    }
    let mut h = Sha256::new();
    walk(root, Path::new(""), &mut h)?;
    Ok(h.finalize().to_vec())
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

    #[test]
    fn refs() {
        for (dockerfile, expect) in [
            ("FROM debian:bookworm\nRUN true\n", Some(vec!["debian:bookworm"])),
            (
                "# c\nFROM --platform=linux/amd64 a AS build\nRUN x \\\n  y\nFROM scratch\nCOPY --from=build /x /x\nCOPY --from=0 /y /y\nCOPY --from=other:1 /z /z\n",
                Some(vec!["a", "other:1"]),
            ),
            ("ARG V=1\nFROM debian:$V\n", None),
            ("FROM a\nRUN --mount=type=bind,from=b,target=/b true\n", None),
            ("# escape=`\nFROM a\n", None),
        ] {
            let expect = expect.map(|v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(external_refs(dockerfile), expect, "{dockerfile}");
        }
    }
}

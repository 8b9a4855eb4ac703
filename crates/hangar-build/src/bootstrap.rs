//! Debian base images made with debootstrap, so that `FROM debian:bookworm` resolves with no
//! registry.
//!
//! debootstrap takes ~30–60 s, so its result is cached for the whole host: an OCI layout per
//! (suite, packages, mirror, architecture) in the bootstrap cache directory, made once under
//! an exclusive `flock` (so concurrent servers wait for one debootstrap rather than run
//! several). Every data directory then imports the cached layout: into its buildah storage,
//! tagged `docker.io/library/debian:<suite>`, and into Hangar's store as `debian:<suite>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hangar_proto::agent::ImageInfo;
use sha2::{Digest, Sha256};

use crate::process::Cmd;
use crate::{ImageError, Images, Progress};

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bumped when what goes into a cached image changes, so old entries are not reused.
const CACHE_FORMAT: u32 = 1;

/// What to bootstrap: a Debian suite, extra packages and the mirror (None: the host's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapSpec {
    pub suite: String,
    pub packages: Vec<String>,
    pub mirror: Option<String>,
}

impl BootstrapSpec {
    /// Parses `debian:<suite>` (or `docker.io/library/debian:<suite>`), package names and
    /// an optional `http(s)://` mirror.
    pub fn parse(
        image: &str,
        packages: &[String],
        mirror: Option<&str>,
    ) -> Result<BootstrapSpec, ImageError> {
        let invalid = |m: String| Err(ImageError::Invalid(m));
        let rest = image
            .strip_prefix("docker.io/library/")
            .unwrap_or(image)
            .strip_prefix("debian:");
        let Some(suite) = rest else {
            return invalid(format!(
                "only Debian bases can be bootstrapped (e.g. `debian:bookworm`), not {image:?}; import other images with `hangar images import`"
            ));
        };
        if suite.is_empty() || !suite.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            return invalid(format!(
                "{suite:?} is not a Debian suite name (e.g. bookworm)"
            ));
        }
        let scripts = Path::new("/usr/share/debootstrap/scripts");
        if scripts.is_dir() && !scripts.join(suite).exists() {
            return invalid(format!(
                "debootstrap does not know the suite {suite:?} (see /usr/share/debootstrap/scripts)"
            ));
        }
        let mut pkgs = Vec::new();
        for p in packages.iter().flat_map(|p| p.split(',')).map(str::trim) {
            if p.is_empty() {
                continue;
            }
            let ok = p.len() >= 2
                && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
            if !ok {
                return invalid(format!("{p:?} is not a Debian package name"));
            }
            pkgs.push(p.to_string());
        }
        pkgs.sort();
        pkgs.dedup();
        if let Some(m) = mirror {
            let ok = (m.starts_with("http://") || m.starts_with("https://"))
                && m.len() > "https://".len()
                && !m.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || "\"'`\\".contains(c)
                });
            if !ok {
                return invalid(format!(
                    "the mirror must be an http:// or https:// URL, not {m:?}"
                ));
            }
        }
        Ok(BootstrapSpec {
            suite: suite.to_string(),
            packages: pkgs,
            mirror: mirror.map(|m| m.trim_end_matches('/').to_string()),
        })
    }

    /// The name the image gets in Hangar's store.
    pub fn name(&self) -> String {
        format!("debian:{}", self.suite)
    }
}

/// The host's Debian mirror from its apt sources, if it has one.
pub fn host_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().find_map(|f| {
        let name = f.file_name()?.to_str()?;
        let deb822 = name.ends_with(".sources");
        if !deb822 && !name.ends_with(".list") {
            return None;
        }
        parse_mirror_sources(&std::fs::read_to_string(f).ok()?, deb822)
    })
}

/// The first `deb` source of the main Debian archive (not security, not a third party that
/// happens to come first): a URI ending in `/debian`.
pub fn parse_mirror_sources(text: &str, deb822: bool) -> Option<String> {
    let good = |uri: &str| {
        let uri = uri.trim_end_matches('/');
        ((uri.starts_with("http://") || uri.starts_with("https://")) && uri.ends_with("/debian"))
            .then(|| uri.to_string())
    };
    if !deb822 {
        return text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "deb" {
                return None;
            }
            let mut uri = words.next()?;
            if uri.starts_with('[') {
                // Options: `[arch=amd64 signed-by=...]`, possibly spanning words.
                while !uri.ends_with(']') {
                    uri = words.next()?;
                }
                uri = words.next()?;
            }
            good(uri)
        });
    }
    text.split("\n\n").find_map(|stanza| {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(key)
                    .then(|| v.trim().to_string())
            })
        };
        if !field("Types")?.split_whitespace().any(|t| t == "deb") {
            return None;
        }
        if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no")) {
            return None;
        }
        field("URIs")?.split_whitespace().find_map(good)
    })
}

impl Images {
    /// Makes (or takes from the host-wide cache) the Debian base image and registers it.
    pub async fn bootstrap(
        &self,
        spec: &BootstrapSpec,
        progress: &Progress,
    ) -> Result<ImageInfo, ImageError> {
        let mirror = spec
            .mirror
            .clone()
            .or_else(host_mirror)
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
        let entry = self.cache_entry(spec, &mirror);
        let name = spec.name();
        let _named = self.lock_name(&name).await;
        let cached = entry.join("oci");
        {
            let _lock = self.lock_cache_entry(&entry, progress).await?;
            if cached.join("index.json").is_file() {
                progress.line(format!(
                    "using the cached {name} ({}) from {}",
                    describe(spec, &mirror),
                    entry.display()
                ));
            } else {
                self.bootstrap_cold(spec, &mirror, &entry, progress).await?;
            }
        }
        // Into this data directory's buildah storage, under the name a `FROM` looks for.
        let hex = self.pull_layout(&cached, progress).await?;
        let reference = format!("docker.io/library/debian:{}", spec.suite);
        self.buildah()
            .arg("tag")
            .arg(&hex)
            .arg(&reference)
            .run("tagging the base image", progress)
            .await?;
        // What `FROM debian:<suite>` will find with --pull=never.
        let seen = self
            .buildah()
            .quiet()
            .args(["inspect", "--type", "image", "--format", "{{.FromImageID}}"])
            .arg(&name)
            .run("checking that the base image resolves locally", progress)
            .await?;
        if !seen.stdout.iter().any(|l| l.trim().ends_with(&hex)) {
            return Err(ImageError::Io {
                what: format!(
                    "{name} resolves to {:?} in buildah's storage, not to the image just made ({hex})",
                    seen.stdout.join(" ")
                ),
                source: std::io::Error::other("short-name resolution"),
            });
        }
        progress.line(format!("`FROM {name}` resolves to {}", &hex[..12]));
        let layout = self.oci_dir().join(&hex);
        if !layout.join("index.json").is_file() {
            let tmp = self.new_layout_tmp(&hex)?;
            let (from, to) = (cached.clone(), tmp.clone());
            let copied = tokio::task::spawn_blocking(move || link_tree(&from, &to))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = copied {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(ImageError::Io {
                    what: "copying the cached layout".into(),
                    source: e,
                });
            }
            self.install_layout(&tmp, &layout)?;
        }
        self.record(&layout, Some(&name), progress).await
    }

    /// `<cache>/<suite>-<hash of what went in>`.
    fn cache_entry(&self, spec: &BootstrapSpec, mirror: &str) -> PathBuf {
        let key = serde_json::json!({
            "format": CACHE_FORMAT,
            "suite": spec.suite,
            "packages": spec.packages,
            "mirror": mirror,
            "arch": std::env::consts::ARCH,
        });
        let hash = hex::encode(Sha256::digest(key.to_string().as_bytes()));
        self.bootstrap_cache
            .join(format!("{}-{}", spec.suite, &hash[..16]))
    }

    /// An exclusive lock on one cache entry, waited for politely.
    async fn lock_cache_entry(
        &self,
        entry: &Path,
        progress: &Progress,
    ) -> Result<nix::fcntl::Flock<std::fs::File>, ImageError> {
        use nix::fcntl::{Flock, FlockArg};
        std::fs::create_dir_all(&self.bootstrap_cache).map_err(ImageError::io(format!(
            "creating the bootstrap cache {} (set HANGAR_BOOTSTRAP_CACHE to use another directory)",
            self.bootstrap_cache.display()
        )))?;
        let path = entry.with_extension("lock");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io(format!("opening {}", path.display())))?;
        let mut told = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if !told {
                        progress.line("waiting for another bootstrap of the same image to finish");
                        told = true;
                    }
                    file = f;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err((_, errno)) => {
                    return Err(ImageError::Io {
                        what: format!("locking {}", path.display()),
                        source: errno.into(),
                    })
                }
            }
        }
    }

    /// debootstrap → clean → tar → buildah commit → OCI layout in the cache entry.
    async fn bootstrap_cold(
        &self,
        spec: &BootstrapSpec,
        mirror: &str,
        entry: &Path,
        progress: &Progress,
    ) -> Result<(), ImageError> {
        progress.line(format!(
            "bootstrapping {} ({}) with debootstrap; this takes a minute, and is cached for next time",
            spec.name(),
            describe(spec, mirror)
        ));
        let tmp = tempfile::Builder::new()
            .prefix("bootstrap-")
            .tempdir_in(self.tmp_dir()?)
            .map_err(ImageError::io("creating a temp directory"))?;
        let rootfs = tmp.path().join("rootfs");
        let mut cmd = Cmd::new("debootstrap", "debootstrap").arg("--variant=minbase");
        if !spec.packages.is_empty() {
            cmd = cmd.arg(format!("--include={}", spec.packages.join(",")));
        }
        let ran = cmd
            .arg(&spec.suite)
            .arg(&rootfs)
            .arg(mirror)
            .run("debootstrap", progress)
            .await;
        if let Err(ImageError::StepFailed {
            step,
            status,
            mut output,
        }) = ran
        {
            // debootstrap's own log says which package failed; its stdout often does not.
            if let Ok(log) = std::fs::read_to_string(rootfs.join("debootstrap/debootstrap.log")) {
                let lines: Vec<&str> = log.lines().collect();
                output.push_str("\n--- debootstrap.log (end) ---\n");
                output.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
            }
            return Err(ImageError::StepFailed {
                step,
                status,
                output,
            });
        }
        ran?;
        progress.line("cleaning apt caches");
        for dir in [
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "var/cache/apt",
        ] {
            remove_files_in(&rootfs.join(dir));
        }
        progress.line("packing the root filesystem");
        let tarball = tmp.path().join("rootfs.tar");
        Cmd::new("tar", "tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
            .arg(&rootfs)
            // Runtimes make /dev; device nodes have no place in an image layer.
            .args(["--exclude=./dev/*", "-cf"])
            .arg(&tarball)
            .arg(".")
            .run("packing the root filesystem (tar)", progress)
            .await?;
        let _ = std::fs::remove_dir_all(&rootfs);
        let container = format!(
            "hangar-bootstrap-{}",
            tmp.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
                .trim_start_matches("bootstrap-")
                .to_ascii_lowercase()
        );
        self.buildah()
            .args(["from", "--quiet", "--pull=never", "--name"])
            .arg(&container)
            .arg("scratch")
            .run("creating a working container (buildah from)", progress)
            .await?;
        let committed = self.commit_rootfs(&container, &tarball, progress).await;
        if committed.is_err() {
            let _ = self
                .buildah()
                .quiet()
                .args(["rm", &container])
                .run("removing the working container", progress)
                .await;
        }
        let hex = committed?;
        progress.line("saving the base image to the host-wide bootstrap cache");
        let staging = entry.with_extension(format!("tmp-{}", &container[17..]));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .map_err(ImageError::io(format!("creating {}", staging.display())))?;
        let pushed = self
            .buildah()
            .args(["push", "--quiet"])
            .arg(&hex)
            .arg(format!("oci:{}", staging.join("oci").display()))
            .run("saving the base image (buildah push)", progress)
            .await;
        let info = serde_json::json!({
            "suite": spec.suite,
            "packages": spec.packages,
            "mirror": mirror,
            "arch": std::env::consts::ARCH,
            "created_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        let done = pushed.and_then(|_| {
            std::fs::write(staging.join("info.json"), info.to_string() + "\n")
                .map_err(ImageError::io("writing info.json"))?;
            let _ = std::fs::remove_dir_all(entry);
            std::fs::rename(&staging, entry).map_err(ImageError::io(format!(
                "moving the cache entry to {}",
                entry.display()
            )))
        });
        if done.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        done
    }

    async fn commit_rootfs(
        &self,
        container: &str,
        tarball: &Path,
        progress: &Progress,
    ) -> Result<String, ImageError> {
        self.buildah()
            .arg("add")
            .arg(container)
            .arg(tarball)
            .arg("/")
            .run("adding the root filesystem (buildah add)", progress)
            .await?;
        self.buildah()
            .args(["config", "--cmd", "[\"bash\"]", "--env", PATH_ENV])
            .arg(container)
            .run("configuring the image (buildah config)", progress)
            .await?;
        let out = self
            .buildah()
            .args(["commit", "--quiet", "--rm"])
            .arg(container)
            .run("committing the image (buildah commit)", progress)
            .await?;
        crate::import::last_id(&out.stdout)
    }
}

fn describe(spec: &BootstrapSpec, mirror: &str) -> String {
    let pkgs = if spec.packages.is_empty() {
        "no extra packages".to_string()
    } else {
        format!("with {}", spec.packages.join(", "))
    };
    format!("{pkgs}, from {mirror}")
}

/// Removes the regular files directly in `dir` (apt's caches), keeping its subdirectories.
fn remove_files_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() != "lock" {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies a directory tree of regular files, hard-linking where the filesystem allows (blobs
/// are content-addressed and never written in place, so sharing them is safe).
fn link_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if kind.is_dir() {
            link_tree(&src, &dst)?;
        } else if kind.is_file() && std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = BootstrapSpec::parse(
            "debian:bookworm",
            &["python3,curl".into(), "python3".into()],
            None,
        )
        .unwrap();
        assert_eq!(s.suite, "bookworm");
        assert_eq!(s.packages, ["curl", "python3"]);
        assert_eq!(s.name(), "debian:bookworm");
        for (image, pkgs, mirror) in [
            ("ubuntu:jammy", vec![], None),
            ("debian", vec![], None),
            ("debian:Bookworm", vec![], None),
            ("debian:bookworm", vec!["python3;rm".to_string()], None),
            ("debian:bookworm", vec![], Some("ftp://x")),
            ("debian:bookworm", vec![], Some("http://a b")),
        ] {
            assert!(
                BootstrapSpec::parse(image, &pkgs, mirror).is_err(),
                "{image} {pkgs:?} {mirror:?}"
            );
        }
    }

    #[test]
    fn mirrors() {
        let list = "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian/ bookworm main\ndeb http://deb.debian.org/debian bookworm main\n";
        assert_eq!(
            parse_mirror_sources(list, false).as_deref(),
            Some("http://mirror.example/debian")
        );
        let sources = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://ftp.example.org/debian\nSuites: bookworm\n";
        assert_eq!(
            parse_mirror_sources(sources, true).as_deref(),
            Some("http://ftp.example.org/debian")
        );
        assert_eq!(
            parse_mirror_sources("Types: deb-src\nURIs: http://x/debian\n", true),
            None
        );
    }
}

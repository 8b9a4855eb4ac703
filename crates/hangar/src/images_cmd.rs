//! `hangar images ls|build|import|bootstrap`: a client of `/v1/images`.
//!
//! Builds and imports stream their input (a tar of the build context, or the archive) to the
//! server as they read it, and print the server's progress lines to stderr as they arrive.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Subcommand;
use http_body_util::BodyExt;
use hyper::Method;
use serde::Deserialize;

use hangar_proto::agent::{ImageInfo, ImageList};
use hangar_proto::encode_query as encode;
use hangar_proto::ErrorDetail;

use crate::client::{self, Client};

#[derive(Subcommand)]
pub enum ImagesCmd {
    /// List the images in Hangar's store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Build an image from a directory with a Dockerfile (with buildah, on the server).
    Build {
        /// The build context.
        dir: PathBuf,
        /// The Dockerfile, relative to DIR.
        #[arg(long, short = 'f', default_value = "Dockerfile")]
        file: String,
        /// The image name (default: the directory's name).
        #[arg(long, short = 't')]
        name: Option<String>,
        /// Print the image as JSON.
        #[arg(long)]
        json: bool,
        /// Do not show the build's progress.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Import an OCI image layout directory, an OCI archive or a docker archive (`docker save`).
    Import {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// PATH is on the server's host: send the path instead of uploading the image.
        #[arg(long)]
        server_path: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Make a Debian base image with debootstrap (e.g. `debian:bookworm`), so that a
    /// Dockerfile's `FROM debian:bookworm` needs no registry.
    Bootstrap {
        image: String,
        /// Extra packages, comma-separated (e.g. python3,python3-venv).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// The Debian mirror (default: the server host's, else deb.debian.org).
        #[arg(long)]
        mirror: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
}

pub async fn run(client: &Client, cmd: ImagesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImagesCmd::Ls { json } => {
            let list: ImageList = client.json(Method::GET, "/v1/images", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<19} {:<32} {:>10}  CREATED", "ID", "NAME", "SIZE");
                for i in &list.images {
                    println!(
                        "{:<19} {:<32} {:>10}  {}",
                        short_id(&i.id),
                        i.name.as_deref().unwrap_or("<none>"),
                        human_size(i.size),
                        i.created_at
                    );
                }
            }
        }
        ImagesCmd::Build {
            dir,
            file,
            name,
            json,
            quiet,
        } => {
            let name = match name {
                Some(n) => n,
                None => default_name(&dir)?,
            };
            let image = build_dir(client, &dir, &file, &name, quiet || json).await?;
            print_image(&image, json)?;
        }
        ImagesCmd::Import {
            path,
            name,
            server_path,
            json,
            quiet,
        } => {
            let image = import(client, &path, name.as_deref(), server_path, quiet || json).await?;
            print_image(&image, json)?;
        }
        ImagesCmd::Bootstrap {
            image,
            packages,
            mirror,
            json,
            quiet,
        } => {
            let body = serde_json::json!({"image": image, "packages": packages, "mirror": mirror});
            let resp = client
                .send(
                    Method::POST,
                    "/v1/images/bootstrap",
                    &[("content-type", "application/json")],
                    client::full(serde_json::to_vec(&body)?),
                )
                .await?;
            let image = follow(resp, quiet || json).await?;
            print_image(&image, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds `dir` (tarred as it is read, honouring `.dockerignore`) into the image `name`,
/// showing the build's progress on stderr unless `quiet`.
pub async fn build_dir(
    client: &Client,
    dir: &Path,
    dockerfile: &str,
    name: &str,
    quiet: bool,
) -> anyhow::Result<ImageInfo> {
    if !dir.join(dockerfile).is_file() {
        bail!(
            "{} has no {dockerfile}: an image is built from a directory with a Dockerfile",
            dir.display()
        );
    }
    let ignore = DockerIgnore::load(dir)?;
    // Credentials are checked before a long upload, whose refusal would read as a broken pipe.
    client.call(Method::GET, "/v1/images", None).await?;
    let (body, tarring) = tar_stream(dir.to_path_buf(), ignore, dockerfile.to_string());
    let path = format!(
        "/v1/images/build?name={}&dockerfile={}",
        encode(name),
        encode(dockerfile)
    );
    let resp = client
        .send(
            Method::POST,
            &path,
            &[("content-type", "application/x-tar")],
            body,
        )
        .await;
    let what = format!("reading the build context {}", dir.display());
    follow(upload_answer(resp, tarring, what).await?, quiet).await
}

/// The server's answer to an upload; if the upload broke off, the reading error (which says
/// why) rather than the connection error it caused.
async fn upload_answer(
    resp: anyhow::Result<hyper::Response<hyper::body::Incoming>>,
    reading: Tarring,
    what: String,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    match resp {
        Ok(resp) => Ok(resp),
        Err(e) => match tokio::time::timeout(std::time::Duration::from_secs(5), reading).await {
            Ok(Ok(Err(read_err))) => Err(read_err.context(what)),
            _ => Err(e),
        },
    }
}

/// Imports an OCI layout directory or an OCI/docker archive as the image `name` (uploading
/// it, so the server need not see the client's files), showing progress unless `quiet`.
pub async fn import_path(
    client: &Client,
    path: &Path,
    name: &str,
    quiet: bool,
) -> anyhow::Result<ImageInfo> {
    import(client, path, Some(name), false, quiet).await
}

async fn import(
    client: &Client,
    path: &Path,
    name: Option<&str>,
    server_path: bool,
    quiet: bool,
) -> anyhow::Result<ImageInfo> {
    let query = match name {
        Some(n) => format!("/v1/images/import?name={}", encode(n)),
        None => "/v1/images/import".to_string(),
    };
    if server_path {
        let abs = std::path::absolute(path)?;
        let body = serde_json::json!({"path": abs});
        let resp = client
            .send(
                Method::POST,
                &query,
                &[("content-type", "application/json")],
                client::full(serde_json::to_vec(&body)?),
            )
            .await?;
        return follow(resp, quiet).await;
    }
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    client.call(Method::GET, "/v1/images", None).await?;
    let (body, reading) = if meta.is_dir() {
        // A layout directory travels as an OCI archive: the same files, in a tar.
        if !path.join("oci-layout").is_file() {
            bail!(
                "{} is a directory but not an OCI image layout (no oci-layout file)",
                path.display()
            );
        }
        tar_stream(path.to_path_buf(), DockerIgnore::default(), String::new())
    } else {
        file_stream(path.to_path_buf())
    };
    let resp = client
        .send(
            Method::POST,
            &query,
            &[("content-type", "application/x-tar")],
            body,
        )
        .await;
    let what = format!("reading {}", path.display());
    follow(upload_answer(resp, reading, what).await?, quiet).await
}

fn print_image(image: &ImageInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(image)?);
    } else {
        println!("{} {}", image.id, image.name.as_deref().unwrap_or("<none>"));
    }
    Ok(())
}

/// One line of the server's NDJSON answer.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ImageEvent {
    Progress(String),
    Image(ImageInfo),
    Error(ErrorDetail),
}

/// Reads an image operation's NDJSON answer to its end, echoing progress to stderr.
async fn follow(
    resp: hyper::Response<hyper::body::Incoming>,
    quiet: bool,
) -> anyhow::Result<ImageInfo> {
    if !resp.status().is_success() {
        client::check(resp).await?;
        bail!("the server refused the request");
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let handle = |line: &[u8]| -> anyhow::Result<Option<ImageInfo>> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        match serde_json::from_slice::<ImageEvent>(line).with_context(|| {
            format!(
                "unreadable line from the server: {}",
                String::from_utf8_lossy(line)
            )
        })? {
            ImageEvent::Progress(p) => {
                if !quiet {
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(err, "{p}");
                }
                Ok(None)
            }
            ImageEvent::Image(i) => Ok(Some(i)),
            ImageEvent::Error(e) => Err(anyhow!("{} ({})", e.message, e.code)),
        }
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the server's answer broke off")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if let Some(image) = handle(&line)? {
                return Ok(image);
            }
        }
    }
    if let Some(image) = handle(&buf)? {
        return Ok(image);
    }
    bail!("the server's answer ended before the image was ready (see the server's log)")
}

type Tarring = tokio::task::JoinHandle<anyhow::Result<()>>;

/// A request body fed by a blocking writer on another thread.
fn channel_body() -> (ChannelWriter, client::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((
            item.map(hyper::body::Frame::data)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            rx,
        ))
    });
    let body = http_body_util::StreamBody::new(stream).boxed_unsync();
    (
        ChannelWriter {
            tx,
            buf: Vec::new(),
        },
        body,
    )
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const CHUNK: usize = 256 * 1024;
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the server stopped reading the upload"))
    }
    fn fail(&self, e: &anyhow::Error) {
        let _ = self
            .tx
            .blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Streams a tar of `dir` (minus what `ignore` excludes; `keep` is always included).
fn tar_stream(dir: PathBuf, ignore: DockerIgnore, keep: String) -> (client::Body, Tarring) {
    let (mut writer, body) = channel_body();
    let task = tokio::task::spawn_blocking(move || {
        let result = (|| -> anyhow::Result<()> {
            let mut tar = tar::Builder::new(&mut writer);
            tar.follow_symlinks(false);
            tar.mode(tar::HeaderMode::Deterministic);
            append_tree(&mut tar, &dir, Path::new(""), &ignore, &keep)?;
            tar.finish()?;
            drop(tar);
            writer.flush()?;
            Ok(())
        })();
        if let Err(e) = &result {
            writer.fail(e);
        }
        result
    });
    (body, task)
}

fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    ignore: &DockerIgnore,
    keep: &str,
) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        let rel_str = rel.to_string_lossy().into_owned();
        let kind = e.file_type()?;
        let ignored = rel_str != keep && ignore.ignored(&rel_str);
        if kind.is_dir() {
            if !ignored {
                tar.append_dir(&rel, e.path())?;
            }
            // An ignored directory may still hold `!`-excepted files.
            if !ignored || ignore.has_exceptions() {
                append_tree(tar, root, &rel, ignore, keep)?;
            }
        } else if (kind.is_file() || kind.is_symlink()) && !ignored {
            tar.append_path_with_name(e.path(), &rel)
                .with_context(|| format!("adding {}", e.path().display()))?;
        }
        // Sockets, FIFOs and devices have no place in a build context.
    }
    Ok(())
}

/// Streams a file as it is.
fn file_stream(path: PathBuf) -> (client::Body, Tarring) {
    let (mut writer, body) = channel_body();
    let task = tokio::task::spawn_blocking(move || {
        let result = (|| -> anyhow::Result<()> {
            let mut f = std::fs::File::open(&path)?;
            std::io::copy(&mut f, &mut writer)?;
            writer.flush()?;
            Ok(())
        })();
        if let Err(e) = &result {
            writer.fail(e);
        }
        result
    });
    (body, task)
}

/// The patterns of a `.dockerignore`: `*`, `?` and `**` globs over `/`-separated paths; a
/// pattern that matches a directory excludes what is below it; `!` re-includes; the last
/// matching line wins.
#[derive(Default)]
struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn load(dir: &Path) -> anyhow::Result<DockerIgnore> {
        match std::fs::read_to_string(dir.join(".dockerignore")) {
            Ok(text) => Ok(DockerIgnore::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DockerIgnore::default()),
            Err(e) => Err(e).context("reading .dockerignore"),
        }
    }

    fn parse(text: &str) -> DockerIgnore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (exception, pat) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let parts = pat
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .map(str::to_string)
                    .collect();
                (exception, parts)
            })
            .collect();
        DockerIgnore { rules }
    }

    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(e, _)| *e)
    }

    fn ignored(&self, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').collect();
        let mut ignored = false;
        for (exception, pat) in &self.rules {
            // The path itself or one of its parent directories.
            let hit = (1..=comps.len()).any(|n| glob_path(pat, &comps[..n]));
            if hit {
                ignored = !exception;
            }
        }
        ignored
    }
}

fn glob_path(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| glob_path(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((p, prest)) => glob(first.as_bytes(), p.as_bytes()) && glob_path(rest, prest),
            None => false,
        },
    }
}

/// `*` and `?` within one path component.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// An image name from a directory's name: lower-case, with anything else made a `-`.
fn default_name(dir: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(dir)?;
    let base = abs
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() {
        bail!(
            "cannot make an image name from {}: pass --name",
            dir.display()
        );
    }
    Ok(name)
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore() {
        let ig = DockerIgnore::parse(
            "# c\n.git\n*.pyc\n**/node_modules\ntarget/\n!target/keep.txt\n/secret*\n",
        );
        for (path, ignored) in [
            (".git", true),
            (".git/config", true),
            ("a.pyc", true),
            ("sub/a.pyc", false),
            ("a/b/node_modules/x", true),
            ("node_modules", true),
            ("target/debug/x", true),
            ("target/keep.txt", false),
            ("secret.txt", true),
            ("src/main.py", false),
            ("Dockerfile", false),
        ] {
            assert_eq!(ig.ignored(path), ignored, "{path}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(default_name(Path::new("/x/My Agent")).unwrap(), "my-agent");
        assert_eq!(default_name(Path::new("/x/notes")).unwrap(), "notes");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
    }
}

//! `hangar sandbox ...`: a client of `/v1/sandboxes`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;

use hangar_proto::sandbox::{ExecEvent, Sandbox, SandboxList};

use hangar_proto::encode_query as encode;

use crate::client::{self, Client};

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox from an OCI image layout or a root filesystem directory.
    Create {
        /// Absolute path of the image (OCI layout directory or rootfs directory).
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "auto")]
        driver: String,
        #[arg(long, default_value_t = 1.0)]
        cpus: f64,
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        #[arg(long, default_value_t = 512)]
        pids: u64,
        /// Environment for the agent and exec, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Egress policy: none, allowlist or all.
        #[arg(long, default_value = "none")]
        egress: String,
        /// A host allowed by the allowlist policy, e.g. pypi.org or *.example.com:443 (repeatable).
        #[arg(long = "allow")]
        allow: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List sandboxes.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Run a command in a sandbox; exits with its exit code.
    Exec(ExecArgs),
    /// Copy a file into (`cp LOCAL ID:/path`) or out of (`cp ID:/path LOCAL|-`) a sandbox.
    Cp { src: String, dst: String },
    /// Suspend a sandbox (scale to zero).
    Suspend {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a suspended sandbox.
    Resume { id: String },
    /// Delete a sandbox and everything it stored.
    Rm { ids: Vec<String> },
}

pub async fn run(c: &Client, cmd: SandboxCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCmd::Create {
            image,
            driver,
            cpus,
            memory_mib,
            disk_mib,
            pids,
            env,
            egress,
            allow,
            json,
        } => {
            let env: serde_json::Map<String, serde_json::Value> = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .context(format!("--env {kv:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let image = if image.starts_with('/') {
                image
            } else {
                std::fs::canonicalize(&image)?
                    .to_string_lossy()
                    .into_owned()
            };
            let body = json!({
                "driver": driver, "image": image, "env": env,
                "resources": {"cpus": cpus, "memory_mib": memory_mib, "disk_mib": disk_mib, "pids": pids},
                "egress": {"policy": egress, "allow": allow},
            });
            eprintln!("creating sandbox…");
            let sb: Sandbox = c.json(Method::POST, "/v1/sandboxes", Some(body)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sb)?);
            } else {
                println!("{}", sb.id);
                eprintln!("created {} ({} driver)", sb.id, sb.driver);
            }
        }
        SandboxCmd::Ls { json } => {
            let list: SandboxList = c.json(Method::GET, "/v1/sandboxes", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<18} {:<10} {:<10} {:<21} IMAGE",
                    "ID", "DRIVER", "STATE", "CREATED"
                );
                for s in list.sandboxes {
                    let state = serde_json::to_value(s.state)?;
                    println!(
                        "{:<18} {:<10} {:<10} {:<21} {}",
                        s.id,
                        s.driver.as_str(),
                        state.as_str().unwrap_or(""),
                        s.created_at,
                        s.image
                    );
                }
            }
        }
        SandboxCmd::Get { id } => {
            let sb: serde_json::Value = c
                .json(Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&sb)?);
        }
        SandboxCmd::Exec(a) => return exec(c, "/v1/sandboxes", a).await,
        SandboxCmd::Cp { src, dst } => cp(c, &src, &dst, SANDBOX).await?,
        SandboxCmd::Suspend { id, json } => {
            let sb: Sandbox = c
                .json(Method::POST, &format!("/v1/sandboxes/{id}/suspend"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sb)?);
            } else if let Some(cp) = sb.checkpoint {
                let mode = serde_json::to_value(cp.mode)?;
                println!(
                    "suspended {id}: {} checkpoint, {:.1} MiB on disk, {} ms, {}",
                    mode.as_str().unwrap_or(""),
                    cp.bytes as f64 / 1048576.0,
                    cp.took_ms,
                    cp.hash
                );
            }
        }
        SandboxCmd::Resume { id } => {
            let _: Sandbox = c
                .json(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None)
                .await?;
            println!("resumed {id}");
        }
        SandboxCmd::Rm { ids } => {
            for id in ids {
                c.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                    .await?;
                println!("deleted {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `exec ID [--cwd] [--user] [--timeout] -- CMD...`, for sandboxes and sessions alike.
#[derive(clap::Args)]
pub struct ExecArgs {
    id: String,
    #[arg(long)]
    cwd: Option<String>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    timeout: Option<u64>,
    #[arg(trailing_var_arg = true, required = true)]
    cmd: Vec<String>,
}

/// Runs a command in sandbox or session `a.id` under `base` (`/v1/sandboxes` or
/// `/v1/sessions`), streaming its output; the exit code is the command's.
pub async fn exec(c: &Client, base: &str, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let base = format!("{base}/{}", a.id);
    let body = json!({"cmd": a.cmd, "cwd": a.cwd, "user": a.user, "timeout_s": a.timeout});
    let resp = c
        .send(
            Method::POST,
            &format!("{base}/exec"),
            &[
                ("content-type", "application/json"),
                ("accept", "application/x-ndjson"),
            ],
            client::full(serde_json::to_vec(&body)?),
        )
        .await?;
    if !resp.status().is_success() {
        client::check(resp).await?;
        unreachable!("check fails on an error status");
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut code = 1;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match serde_json::from_slice::<ExecEvent>(&line) {
                Ok(ExecEvent::Stdout(s)) => {
                    std::io::stdout().write_all(s.as_bytes())?;
                    std::io::stdout().flush()?;
                }
                Ok(ExecEvent::Stderr(s)) => std::io::stderr().write_all(s.as_bytes())?,
                Ok(ExecEvent::Exit {
                    exit_code,
                    timed_out,
                }) => {
                    if timed_out {
                        eprintln!("hangar: command timed out");
                    }
                    code = exit_code;
                }
                Err(_) => bail!("sandbox error: {}", String::from_utf8_lossy(&line).trim()),
            }
        }
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// What `cp` copies to and from: `ID:/path` where ID has `prefix`, at `{base}/ID`.
pub struct Remote {
    pub prefix: &'static str,
    pub base: &'static str,
    pub noun: &'static str,
}

pub const SANDBOX: Remote = Remote {
    prefix: "sb-",
    base: "/v1/sandboxes",
    noun: "SANDBOX",
};

fn split_remote<'a>(s: &'a str, remote: &Remote) -> Option<(&'a str, &'a str)> {
    let (id, path) = s.split_once(':')?;
    (id.starts_with(remote.prefix) && path.starts_with('/')).then_some((id, path))
}

pub async fn cp(c: &Client, src: &str, dst: &str, remote: Remote) -> anyhow::Result<()> {
    let base = remote.base;
    match (split_remote(src, &remote), split_remote(dst, &remote)) {
        (None, Some((id, path))) => {
            let data = std::fs::read(src).with_context(|| format!("reading {src}"))?;
            let resp = c
                .send(
                    Method::PUT,
                    &format!("{base}/{id}/files/content?path={}", encode(path)),
                    &[],
                    client::full(data),
                )
                .await?;
            client::check(resp).await?;
        }
        (Some((id, path)), None) => {
            let resp = c
                .send(
                    Method::GET,
                    &format!("{base}/{id}/files/content?path={}", encode(path)),
                    &[],
                    client::empty(),
                )
                .await?;
            let bytes = client::check(resp).await?;
            if dst == "-" {
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::fs::write(dst, &bytes).with_context(|| format!("writing {dst}"))?;
            }
        }
        _ => bail!(
            "one of SRC and DST must be {}:/absolute/path and the other a local path",
            remote.noun
        ),
    }
    Ok(())
}

//! `hangar bench sandbox`: Hangar's sandbox lifecycle against the raw runtime underneath,
//! measured in the same run so that the ratios hold on a noisy, shared machine.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::json;

use hangar_proto::sandbox::{ExecResult, Sandbox};

use crate::client::Client;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// create-to-exec-ready, exec round trip, suspend and resume, against `crun run`/`runsc run`.
    Sandbox(SandboxBench),
    /// The data plane's added latency and throughput against the agent reached directly.
    Gateway(crate::bench_agents::GatewayBench),
    /// First-request latency of a new session and of a suspended one.
    Sessions(crate::bench_agents::SessionsBench),
    /// What AG-UI and the Activity Protocol add over a streamed /responses call.
    Protocols(crate::bench_protocols::ProtocolsBench),
    /// What authentication (API key, JWT) adds to a data-plane request and the egress proxy
    /// to an HTTP request.
    Security(crate::bench_security::SecurityBench),
    /// What tracing costs the gateway: the same requests through `hangar serve --tracing on`
    /// and `--tracing off`, in alternating rounds.
    Tracing(crate::bench_tracing::TracingBench),
}

#[derive(Args)]
pub struct SandboxBench {
    #[arg(long, default_value = "container")]
    driver: String,
    /// A root filesystem directory with /bin/true (used by Hangar and by the raw baseline).
    #[arg(long)]
    image: String,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Also create this many sandboxes, suspend them all and measure the host memory they hold.
    #[arg(long, default_value_t = 0)]
    suspended: usize,
    #[arg(long)]
    json: bool,
}

/// The raw VMM baseline of `--driver vm`: QEMU booting the driver's kernel and initramfs to
/// `/init`, and restoring a snapshot of such a VM, on the accelerator the driver uses.
struct VmBaseline {
    vm: crate::serve::LocalVm,
    accel: hangar_sandbox::vm::qemu::Accel,
    work: tempfile::TempDir,
}

impl VmBaseline {
    fn new() -> anyhow::Result<VmBaseline> {
        let vm = crate::serve::LocalVm::from_env();
        let probe = vm.probe();
        if !probe.available {
            bail!("the vm driver is not available: {}", probe.detail);
        }
        Ok(VmBaseline {
            vm,
            accel: probe.accel,
            work: tempfile::tempdir()?,
        })
    }

    fn sample(&self) -> anyhow::Result<hangar_sandbox::vm::baseline::Sample> {
        hangar_sandbox::vm::baseline::sample(
            &self.vm.data_dir,
            self.vm.kernel.as_deref(),
            &self.vm.init,
            self.accel,
            512,
            self.work.path(),
        )
        .map_err(|e| anyhow::anyhow!("raw QEMU baseline: {e}"))
    }
}

pub async fn run(url: &str, cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Sandbox(b) => sandbox(&Client::new(url)?, b).await,
        BenchCmd::Gateway(b) => crate::bench_agents::gateway(url, b).await,
        BenchCmd::Sessions(b) => crate::bench_agents::sessions(url, b).await,
        BenchCmd::Protocols(b) => crate::bench_protocols::run(url, b).await,
        BenchCmd::Security(b) => crate::bench_security::run(url, b).await,
        BenchCmd::Tracing(b) => crate::bench_tracing::run(b).await,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Series {
    name: &'static str,
    samples: Vec<f64>,
}

impl Series {
    fn new(name: &'static str) -> Series {
        Series {
            name,
            samples: Vec::new(),
        }
    }
    fn p(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        pct(&s, p)
    }
}

async fn create(c: &Client, b: &SandboxBench) -> anyhow::Result<Sandbox> {
    c.json(
        Method::POST,
        "/v1/sandboxes",
        Some(json!({"driver": b.driver, "image": b.image, "resources": {"disk_mib": 64}})),
    )
    .await
}

async fn exec_true(c: &Client, id: &str) -> anyhow::Result<()> {
    let r: ExecResult = c
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"]})),
        )
        .await?;
    if r.exit_code != 0 {
        bail!("`true` exited {} in {id}", r.exit_code);
    }
    Ok(())
}

/// Host memory in use once written data is on disk and clean caches are dropped (as root), so
/// that page cache does not count as memory a suspended sandbox holds.
async fn settled_host_used() -> u64 {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    tokio::time::sleep(Duration::from_millis(500)).await;
    host_used()
}

/// Processes whose command line names one of `ids` (runtime daemons of those sandboxes).
fn sandbox_processes(ids: &[String]) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| {
            let cmd = String::from_utf8_lossy(cmd);
            ids.iter().any(|id| cmd.contains(id.as_str()))
        })
        .count()
}

/// Host memory in use (MemTotal - MemAvailable), in bytes.
fn host_used() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

async fn sandbox(c: &Client, b: SandboxBench) -> anyhow::Result<ExitCode> {
    let image =
        std::fs::canonicalize(&b.image).with_context(|| format!("no image at {}", b.image))?;
    if !image.join("bin/true").exists() && !image.join("usr/bin/true").exists() {
        bail!("--image must be a root filesystem directory with /bin/true (the raw baseline runs it directly)");
    }
    let b = SandboxBench {
        image: image.to_string_lossy().into_owned(),
        ..b
    };
    let runs = b.runs.max(1);
    let mut ready = Series::new("create-to-exec-ready");
    let mut exec = Series::new("exec round trip (`true`)");
    let mut suspend = Series::new("suspend");
    let mut resume = Series::new("resume");
    let mut raw = Series::new(match b.driver.as_str() {
        "gvisor" => "raw `runsc run` of true",
        "vm" => "raw QEMU boot to /init",
        _ => "raw `crun run` of true",
    });
    let mut raw_restore = Series::new("raw QEMU restore");
    let vm = if b.driver == "vm" {
        Some(VmBaseline::new()?)
    } else {
        None
    };

    eprintln!("bench: {runs} runs on driver {}", b.driver);
    // One sandbox is kept for the exec, suspend and resume series; the others are deleted as
    // soon as they are measured so that every sample sees the same, otherwise idle, host.
    let mut ids = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let sb = create(c, &b).await?;
        exec_true(c, &sb.id).await?;
        ready.samples.push(ms(t.elapsed()));
        if ids.is_empty() {
            ids.push(sb.id);
        } else {
            c.call(Method::DELETE, &format!("/v1/sandboxes/{}", sb.id), None)
                .await?;
        }
        match &vm {
            Some(vm) => {
                let s = tokio::task::block_in_place(|| vm.sample())?;
                raw.samples.push(ms(s.boot));
                raw_restore.samples.push(ms(s.restore));
            }
            None => raw.samples.push(ms(raw_run(&b.driver, &image, i)?)),
        }
    }
    let id = ids[0].clone();
    for _ in 0..runs {
        let t = Instant::now();
        let _: Sandbox = c
            .json(Method::POST, &format!("/v1/sandboxes/{id}/suspend"), None)
            .await?;
        suspend.samples.push(ms(t.elapsed()));
        let t = Instant::now();
        let _: Sandbox = c
            .json(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None)
            .await?;
        resume.samples.push(ms(t.elapsed()));
        // Resumed means usable: prove it before the next sample (untimed).
        exec_true(c, &id).await?;
    }
    // After suspend and resume: under gVisor every process a sandbox has run adds to what a
    // checkpoint must save, so the exec series would slow the suspend series down.
    for _ in 0..runs.max(100) {
        let t = Instant::now();
        exec_true(c, &id).await?;
        exec.samples.push(ms(t.elapsed()));
    }
    for id in &ids {
        c.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await?;
    }

    let mut suspended_mem = None;
    if b.suspended > 0 {
        eprintln!("bench: {} suspended sandboxes", b.suspended);
        let before = settled_host_used().await;
        let mut many = Vec::new();
        for _ in 0..b.suspended {
            let sb = create(c, &b).await?;
            exec_true(c, &sb.id).await?;
            let _: Sandbox = c
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/suspend", sb.id),
                    None,
                )
                .await?;
            many.push(sb.id);
        }
        let after = settled_host_used().await;
        let procs = sandbox_processes(&many);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts = mountinfo
            .lines()
            .filter(|l| many.iter().any(|id| l.contains(id.as_str())))
            .count();
        if procs + mounts > 0 {
            bail!("suspended sandboxes still hold {procs} processes and {mounts} mounts");
        }
        suspended_mem = Some(after as i64 - before as i64);
        for id in &many {
            c.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                .await?;
        }
    }

    let raw_p50 = raw.p(0.5);
    let mut series = vec![&ready, &exec, &suspend, &resume, &raw];
    if vm.is_some() {
        series.push(&raw_restore);
    }
    let resume_vs_raw = vm.as_ref().map(|_| resume.p(0.5) / raw_restore.p(0.5));
    if b.json {
        let rows: Vec<_> = series
            .iter()
            .map(|s| json!({"name": s.name, "p50_ms": s.p(0.5), "p95_ms": s.p(0.95), "n": s.samples.len()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "driver": b.driver, "series": rows,
                "ready_vs_raw_p50": ready.p(0.5) / raw_p50,
                "resume_vs_raw_restore_p50": resume_vs_raw,
                "accel": vm.as_ref().map(|v| v.accel.as_str()),
                "suspended": b.suspended, "suspended_host_bytes": suspended_mem,
            }))?
        );
    } else {
        match &vm {
            Some(v) => println!("driver: vm ({})", v.accel.as_str()),
            None => println!("driver: {}", b.driver),
        }
        println!("{:<28} {:>10} {:>10} {:>5}", "", "p50 ms", "p95 ms", "n");
        for s in series {
            println!(
                "{:<28} {:>10.2} {:>10.2} {:>5}",
                s.name,
                s.p(0.5),
                s.p(0.95),
                s.samples.len()
            );
        }
        println!(
            "create-to-exec-ready / raw run (p50): {:.2}x",
            ready.p(0.5) / raw_p50
        );
        if let Some(r) = resume_vs_raw {
            println!("resume / raw QEMU restore (p50): {r:.2}x");
        }
        if let Some(m) = suspended_mem {
            println!(
                "{} suspended sandboxes: no processes, no mounts; host memory in use changed by {:+.1} MiB (caches dropped; the machine's own noise is tens of MiB)",
                b.suspended,
                m as f64 / 1048576.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `/bin/true` with the bare runtime on the same root filesystem, read-only, and returns
/// how long the runtime's `run` took (the bundle is prepared beforehand, untimed).
fn raw_run(driver: &str, rootfs: &Path, i: usize) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let runtime = if driver == "gvisor" { "runsc" } else { "crun" };
    let mut spec = Command::new(runtime);
    spec.arg("spec").current_dir(dir.path());
    if runtime == "runsc" {
        spec.args(["--", "/bin/true"]);
    }
    let out = spec.output().context("generating a baseline OCI spec")?;
    if !out.status.success() {
        bail!(
            "{runtime} spec failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    cfg["root"] = json!({"path": rootfs, "readonly": true});
    cfg["process"]["args"] = json!(["/bin/true"]);
    cfg["process"]["terminal"] = json!(false);
    std::fs::write(&path, serde_json::to_vec(&cfg)?)?;
    let id = format!("hangar-bench-raw-{}-{i}", std::process::id());
    let mut cmd = if runtime == "runsc" {
        let mut c = Command::new("runsc");
        c.args([
            "--root",
            "/run/hangar-bench-runsc",
            "--network=none",
            "run",
            "--bundle",
        ]);
        c
    } else {
        let mut c = hangar_sandbox::container::ContainerDriver::new().crun_command();
        c.args(["run", "--bundle"]);
        c
    };
    cmd.arg(dir.path())
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let t = Instant::now();
    let status = cmd.status()?;
    let took = t.elapsed();
    if !status.success() {
        bail!("raw {runtime} run failed: {status}");
    }
    Ok(took)
}

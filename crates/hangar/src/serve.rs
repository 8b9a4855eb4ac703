//! `hangar serve`: opens the data directory, recovers sandboxes and serves the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    /// Where Hangar keeps images, sandboxes and its state. Default: /var/lib/hangar for
    /// root, else ~/.local/share/hangar.
    #[arg(long, env = "HANGAR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// End users signed in with this OpenID Connect provider may call agents with its JWTs
    /// (their `--oidc-user-claim` is the isolation key). Needs --oidc-audience.
    #[arg(long, env = "HANGAR_OIDC_ISSUER", value_name = "URL")]
    oidc_issuer: Option<String>,
    /// The `aud` the provider's tokens must carry.
    #[arg(long, env = "HANGAR_OIDC_AUDIENCE")]
    oidc_audience: Option<String>,
    /// The claim of an OIDC token that names the end user.
    #[arg(long, default_value = "sub")]
    oidc_user_claim: String,
    /// The `iss` of the tokens Hangar issues to its agents (session and on-behalf-of
    /// tokens), the URL where tools find `/.well-known/jwks.json`. Default: http:// and the
    /// listening address.
    #[arg(long, env = "HANGAR_ISSUER", value_name = "URL")]
    issuer: Option<String>,
    /// A host network namespace (`ip netns add NAME`) agents may send their egress through
    /// with `network.attach: NAME` (repeatable). None by default.
    #[arg(long = "netns", value_name = "NAME")]
    netns: Vec<String>,
    /// How long a session token lasts (at least 10s); sandboxes get a fresh one when a
    /// third of it is left.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    session_token_ttl: std::time::Duration,
    /// `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, env = "HANGAR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// `on`: a span per request and session operation, kept in the store (`/v1/traces`) and
    /// forwarded over OTLP when an endpoint is set; `off`: no tracing at all.
    #[arg(long, env = "HANGAR_TRACING", default_value = "on", value_parser = ["on", "off"])]
    tracing: String,
    /// Forward traces (Hangar's and its agents') to this OTLP/HTTP collector, a base URL
    /// like `http://collector:4318` (`/v1/traces` is added). Default: the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`; none if unset.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// How long traces are kept in the store.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    trace_retention: std::time::Duration,
    /// The most the store keeps of traces, in MiB (the oldest go first).
    #[arg(long, default_value_t = 256)]
    trace_store_mib: u64,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The hangar-init binary injected into sandboxes. Default: `hangar-init` beside this binary.
    #[arg(long, env = "HANGAR_INIT")]
    init: Option<PathBuf>,
    /// The largest file upload accepted, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_upload_mib: u64,
    /// A directory under which plain root filesystems may be used as images (repeatable).
    /// Default: the data directory, /tmp and /var/tmp. OCI layouts may come from anywhere.
    #[arg(long = "rootfs-root", value_name = "DIR")]
    rootfs_roots: Vec<PathBuf>,
    /// Session sandboxes that may run at once on this node; past it the least recently
    /// used idle session is suspended.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// The guest kernel (bzImage) of the vm driver. Default: the one
    /// scripts/install-host-deps.sh fetched into /var/lib/hangar/vm/kernels/current.
    #[arg(long, env = "HANGAR_VM_KERNEL", value_name = "PATH")]
    vm_kernel: Option<PathBuf>,
    /// The vm driver's accelerator: `auto` probes KVM once (the result is cached) and falls
    /// back to TCG.
    #[arg(long, env = "HANGAR_VM_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    vm_accel: String,
    /// A sandbox's console log (its agent's stdout and stderr, stamped by hangar-init) is
    /// rotated past this size, in KiB (at least 16); one older file is kept.
    #[arg(long, env = "HANGAR_CONSOLE_LOG_MAX_KIB", default_value_t = 8192)]
    console_log_max_kib: u64,
}

/// The `vm` driver's setup as commands other than `serve` see it (`doctor`, `bench`): the
/// default data directory, `hangar-init` beside this binary, and the same environment
/// variables `serve` reads for its flags.
pub struct LocalVm {
    pub data_dir: PathBuf,
    pub init: PathBuf,
    pub kernel: Option<PathBuf>,
    pub forced: Option<hangar_sandbox::vm::qemu::Accel>,
}

impl LocalVm {
    pub fn from_env() -> LocalVm {
        LocalVm {
            data_dir: crate::default_data_dir(),
            init: std::env::var_os("HANGAR_INIT")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::current_exe()
                        .unwrap_or_default()
                        .with_file_name("hangar-init")
                }),
            kernel: std::env::var_os("HANGAR_VM_KERNEL").map(PathBuf::from),
            forced: vm_accel(&std::env::var("HANGAR_VM_ACCEL").unwrap_or_default()),
        }
    }

    pub fn probe(&self) -> hangar_sandbox::vm::probe::VmProbe {
        hangar_sandbox::vm::probe_vm(
            &self.data_dir,
            self.kernel.as_deref(),
            &self.init,
            self.forced,
        )
    }
}

/// `--vm-accel` as the sandbox crate takes it.
pub fn vm_accel(s: &str) -> Option<hangar_sandbox::vm::qemu::Accel> {
    match s {
        "kvm" => Some(hangar_sandbox::vm::qemu::Accel::Kvm),
        "tcg" => Some(hangar_sandbox::vm::qemu::Accel::Tcg),
        _ => None,
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let endpoint = hangar_telemetry::Endpoint::resolve(args.otlp_endpoint.as_deref(), |k| {
        std::env::var(k).ok()
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let telemetry = (args.tracing == "on").then(hangar_telemetry::Telemetry::new);
    let provider = telemetry.as_ref().map(|t| t.provider());
    init_logs(&args.log_format, provider.as_ref());
    let data_dir = args.data_dir.unwrap_or_else(crate::default_data_dir);
    let init = match args.init {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("hangar-init"),
    };
    if !init.is_file() {
        bail!(
            "hangar-init not found at {}; build it (`cargo build -p hangar-init`) or pass --init",
            init.display()
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("hangar serve must run as root: sandboxes need mounts, namespaces and cgroups (see `hangar doctor`)");
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let issuer = match args.issuer {
        Some(i) if i.starts_with("https://") || i.starts_with("http://") => i,
        Some(i) => bail!("--issuer must be an http(s) URL, not {i:?}"),
        None => {
            if local.ip().is_unspecified() {
                tracing::warn!(
                    "the token issuer defaults to http://{local}, which tools cannot reach; \
                     set --issuer to the URL they use"
                );
            }
            format!("http://{local}")
        }
    };
    if args.session_token_ttl < std::time::Duration::from_secs(10) {
        bail!("--session-token-ttl must be at least 10s");
    }
    let store = hangar_store::Store::open(&data_dir.join("hangar.db"))
        .await
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let secrets_key = hangar_agents::SecretKey::load_or_create(&data_dir.join("secrets.key"))
        .map_err(|e| anyhow::anyhow!("the key for secrets: {e}"))?;
    if let Some(t) = &telemetry {
        let traces = hangar_store::TraceStore::open(&data_dir.join("traces.db"))
            .await
            .with_context(|| format!("opening the trace store in {}", data_dir.display()))?;
        t.start(hangar_telemetry::Config {
            store: traces,
            endpoint,
            retention: args.trace_retention,
            max_bytes: args.trace_store_mib * 1024 * 1024,
        });
    }
    let metrics = std::sync::Arc::new(hangar_metrics::Metrics::new());
    let (egress_tx, egress_rx) = tokio::sync::mpsc::channel(4096);
    let egress = hangar_sandbox::egress::Shared {
        log: Some(egress_tx),
        secrets: Some(std::sync::Arc::new(hangar_agents::SecretVault::new(
            store.clone(),
            secrets_key.clone(),
        ))),
        internal: Default::default(),
    };
    let sandboxes = hangar_sandbox::Sandboxes::open(hangar_sandbox::Config {
        data_dir: data_dir.clone(),
        init_binary: init,
        forbidden: vec![local],
        rootfs_roots: if args.rootfs_roots.is_empty() {
            hangar_sandbox::Config::default_rootfs_roots(&data_dir)
        } else {
            args.rootfs_roots
        },
        vm_kernel: args.vm_kernel,
        vm_accel: vm_accel(&args.vm_accel),
        egress: egress.clone(),
        attachable: args.netns,
        metrics: Some(metrics.clone()),
        console_max_bytes: args.console_log_max_kib.saturating_mul(1024),
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let images = hangar_build::Images::new(data_dir.clone(), store.clone());
    let agents = hangar_agents::Agents::open(
        store,
        sandboxes.clone(),
        hangar_agents::Config {
            max_running: args.max_running,
            secrets_key: Some(secrets_key),
            metrics: Some(metrics.clone()),
            identity: Some(hangar_agents::IdentityConfig {
                session_ttl: args.session_token_ttl,
                ..hangar_agents::IdentityConfig::new(issuer)
            }),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("recovering sessions: {e}"))?;
    let audit = std::sync::Arc::new(hangar_api::Audit::new(agents.store().clone(), &data_dir));
    let oidc = match (&args.oidc_issuer, &args.oidc_audience) {
        (Some(i), Some(a)) => Some(
            hangar_api::Oidc::new(i, a, &args.oidc_user_claim)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        (None, None) => None,
        _ => anyhow::bail!("--oidc-issuer and --oidc-audience go together"),
    };
    let keys = hangar_api::Keys::open(agents.store().clone(), oidc)
        .await
        .map_err(|e| anyhow::anyhow!("loading API keys: {e}"))?;
    keys.ensure_admin(&data_dir)
        .await
        .map_err(|e| anyhow::anyhow!("the admin key: {e}"))?;
    tokio::spawn(record_egress(
        egress_rx,
        agents.clone(),
        audit.clone(),
        metrics.clone(),
    ));
    let state = hangar_api::AppState {
        sandboxes,
        images,
        agents,
        audit,
        keys: std::sync::Arc::new(keys),
        pool: Default::default(),
        idp: std::sync::Arc::new(
            hangar_api::IdentityProviders::new().map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        channels: Default::default(),
        max_upload: args.max_upload_mib * 1024 * 1024,
        metrics,
        data_dir: data_dir.clone(),
        stats: Default::default(),
        telemetry,
    };
    // Sandboxes reach Hangar's identity endpoints at http://hangar.internal via their proxy.
    let _ = egress
        .internal
        .set(hangar_api::internal_service(state.clone()));
    let audit = state.audit.clone();
    let app = hangar_api::router(state);
    tracing::info!(listen = %local, data_dir = %data_dir.display(), "hangar serving");
    // Stopping the server leaves sandboxes running; the next `hangar serve` adopts them.
    // Small answers written in more than one segment would otherwise wait for the client's
    // delayed ACK (40 ms) under Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; sandboxes keep running");
        })
        .await?;
    // Calls answered just before the end still get their audit records.
    if !audit.drain(std::time::Duration::from_secs(30)).await {
        tracing::error!("audit records were still being written when hangar serve stopped");
    }
    if let Some(p) = provider {
        // The last spans reach the store before the process ends.
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Hangar's logs on stderr (text, or one JSON object per line carrying its spans, the
/// request's with its `trace_id`), and with tracing on, its spans into the trace store. Each has its own
/// filter: `RUST_LOG` quiets the logs without taking spans away.
fn init_logs(format: &str, provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        "json" => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
        _ => logs.with_filter(filter).boxed(),
    };
    let spans = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("hangar"))
            // Spans carry what they are about, not Hangar's source paths, threads or timings
            // of its own polling.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("hangar", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
}

/// Records each connection the egress proxy reports: per session in the store, and in the
/// audit trail as an egress decision.
async fn record_egress(
    mut events: tokio::sync::mpsc::Receiver<hangar_sandbox::egress::EgressEvent>,
    agents: hangar_agents::Agents,
    audit: std::sync::Arc<hangar_api::Audit>,
    metrics: std::sync::Arc<hangar_metrics::Metrics>,
) {
    while let Some(e) = events.recv().await {
        let (agent, session) = agents.session_of_sandbox(&e.sandbox).unzip();
        let name = agent.as_deref().unwrap_or_default();
        metrics.egress(name, e.allowed, e.bytes_out, e.bytes_in);
        if !e.dlp.is_empty() {
            metrics.dlp_hit(name);
        }
        if !e.dlp.is_empty() {
            audit
                .record(hangar_store::AuditEntry {
                    actor: format!("sandbox:{}", e.sandbox),
                    action: "dlp.hit".into(),
                    agent: agent.clone(),
                    session: session.clone(),
                    request_id: None,
                    detail: serde_json::json!({
                        "where": "egress", "host": e.host, "port": e.port,
                        "detectors": e.dlp, "action": "block",
                    }),
                })
                .await;
        }
        let record = hangar_store::EgressRecord {
            seq: 0,
            at: hangar_agents::now_rfc3339(),
            sandbox: e.sandbox.clone(),
            agent: agent.clone(),
            session: session.clone(),
            host: e.host.clone(),
            port: e.port,
            allowed: e.allowed,
            reason: e.reason.clone(),
            bytes_out: e.bytes_out,
            bytes_in: e.bytes_in,
        };
        if let Err(err) = agents.store().put_egress(&record).await {
            tracing::error!(error = %err, "cannot record an egress connection");
        }
        audit
            .record(hangar_store::AuditEntry {
                actor: format!("sandbox:{}", e.sandbox),
                action: if e.allowed {
                    "egress.allowed"
                } else {
                    "egress.denied"
                }
                .into(),
                agent,
                session,
                request_id: None,
                detail: serde_json::json!({
                    "sandbox": e.sandbox, "host": e.host, "port": e.port, "reason": e.reason,
                    "bytes_out": e.bytes_out, "bytes_in": e.bytes_in,
                }),
            })
            .await;
    }
}

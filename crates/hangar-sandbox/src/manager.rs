//! `Sandboxes`: the sandbox service. It owns every sandbox's record and state machine,
//! picks the driver, prepares the volume and the link, runs the egress proxy, and recovers
//! everything after a restart. Driver calls run on blocking threads; one lock per sandbox
//! serialises its lifecycle operations while exec and files calls run concurrently.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hangar_image::{ImageStore, ResolveError};
use hangar_proto::init::{
    GuardLimits, InitConfig, ProcessDefaults, ProcessSpec, VmGuest, DEFAULT_AGENT_PORT,
};
use hangar_proto::sandbox::{
    Checkpoint, CheckpointMode, CreateSandbox, DriverKind, ResumeInfo, Sandbox, SandboxState,
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::console::{self, Consoles};
use crate::container::ContainerDriver;
use crate::driver::{log_tail, Driver, DriverError, Layout, Recovered, Resumed, SandboxSpec};
use crate::egress::{self, EgressPolicy};
use crate::gvisor::GvisorDriver;
use crate::link::{ExecStream, InitLink, LinkError};
use crate::probe::{probe_host, HostProbe};
use crate::record::{now_rfc3339, Record};
use crate::vm::qemu::Accel;
use crate::vm::{VmConfig, VmDriver};
use crate::volume;

/// How long a sandbox may take from start to a `hangar-init` that answers.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The `hangar-init` binary to inject into sandboxes.
    pub init_binary: PathBuf,
    /// Addresses no sandbox may reach through the egress proxy (Hangar's own listeners).
    pub forbidden: Vec<SocketAddr>,
    /// Directories under which a plain root filesystem may be used as an image. Such a
    /// directory becomes the sandbox's read-only root as it is, so without this anyone who can
    /// call the API could have a sandbox read the host's own files (`"image": "/"`). OCI layouts
    /// are copied into the store and may come from anywhere.
    pub rootfs_roots: Vec<PathBuf>,
    /// The `vm` driver's guest kernel, instead of the one the install script fetched.
    pub vm_kernel: Option<PathBuf>,
    /// The `vm` driver's accelerator, instead of probing for KVM.
    pub vm_accel: Option<Accel>,
    /// Where lifecycle operations' durations are counted.
    pub metrics: Option<Arc<hangar_metrics::Metrics>>,
    /// The host network namespaces sandboxes may attach their egress to (`network.attach`):
    /// the operator's choice, since a namespace reaches whatever its network reaches.
    pub attachable: Vec<String>,
    /// What every sandbox's egress proxy shares: where it reports each connection, where the
    /// secrets it injects and Hangar's internal service come from.
    pub egress: crate::egress::Shared,
    /// The size past which a sandbox's console log is rotated (one older file is kept):
    /// [`crate::console::DEFAULT_MAX_BYTES`] unless the operator says otherwise.
    pub console_max_bytes: u64,
}

impl Config {
    /// The default rootfs roots: Hangar's data directory and the system's temporary directories.
    pub fn default_rootfs_roots(data_dir: &Path) -> Vec<PathBuf> {
        vec![
            data_dir.to_path_buf(),
            PathBuf::from("/tmp"),
            PathBuf::from("/var/tmp"),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{0}")]
    Internal(String),
}

impl From<DriverError> for SandboxError {
    fn from(e: DriverError) -> Self {
        SandboxError::Internal(error_chain(&e))
    }
}

/// An error and its sources in one line, as `error: cause: cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

struct Entry {
    id: String,
    record: Mutex<Record>,
    egress: StdMutex<Option<JoinHandle<()>>>,
}

struct Inner {
    cfg: Config,
    root: PathBuf,
    init_dir: PathBuf,
    images: Arc<ImageStore>,
    probe: HostProbe,
    drivers: HashMap<DriverKind, Arc<dyn Driver>>,
    entries: StdMutex<HashMap<String, Arc<Entry>>>,
    /// The network namespaces sandboxes' egress is attached to.
    netns: crate::netns::Netns,
    /// The sandboxes' console logs: their bound, and the lock their rotations and readers share.
    consoles: Consoles,
}

#[derive(Clone)]
pub struct Sandboxes {
    inner: Arc<Inner>,
}

impl Sandboxes {
    /// Opens the data directory and recovers every sandbox recorded there.
    pub async fn open(cfg: Config) -> Result<Sandboxes, SandboxError> {
        let root = cfg.data_dir.join("sandboxes");
        let init_dir = cfg.data_dir.join("lib").join("init");
        for d in [&root, &init_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| SandboxError::Internal(format!("creating {}: {e}", d.display())))?;
        }
        // Sandboxes write into their run directories and volumes; no other host user may even
        // look in (a set-uid file planted there must not be reachable from the host).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| SandboxError::Internal(format!("securing {}: {e}", root.display())))?;
        install_init(&cfg.init_binary, &init_dir)?;
        crate::reaper::install()
            .map_err(|e| SandboxError::Internal(format!("becoming a child subreaper: {e}")))?;
        let images = Arc::new(
            ImageStore::open(cfg.data_dir.join("images"))
                .map_err(|e| SandboxError::Internal(error_chain(&e)))?,
        );
        let vm_input = (
            cfg.data_dir.clone(),
            cfg.vm_kernel.clone(),
            init_dir.join("hangar-init"),
            cfg.vm_accel,
        );
        let (vm, probe) = tokio::task::spawn_blocking(move || {
            let (data, kernel, init, force) = vm_input;
            let vm = crate::vm::probe_vm(&data, kernel.as_deref(), &init, force);
            let host = probe_host(&vm);
            (vm, host)
        })
        .await
        .map_err(|e| SandboxError::Internal(e.to_string()))?;
        let mut drivers: HashMap<DriverKind, Arc<dyn Driver>> = HashMap::new();
        if vm.available {
            if let Some(qemu) = crate::vm::qemu::Qemu::find() {
                drivers.insert(
                    DriverKind::Vm,
                    Arc::new(VmDriver::new(
                        Arc::new(qemu),
                        VmConfig {
                            data_dir: cfg.data_dir.clone(),
                            kernel: cfg.vm_kernel.clone(),
                            accel: vm.accel,
                        },
                    )),
                );
            }
        }
        drivers.insert(DriverKind::Gvisor, Arc::new(GvisorDriver::new()));
        drivers.insert(DriverKind::Container, Arc::new(ContainerDriver::new()));
        let console_max_bytes = cfg.console_max_bytes;
        let inner = Inner {
            cfg,
            root,
            init_dir,
            images,
            probe,
            drivers,
            entries: StdMutex::new(HashMap::new()),
            netns: Default::default(),
            consoles: Consoles::new(console_max_bytes),
        };
        let me = Sandboxes {
            inner: Arc::new(inner),
        };
        me.recover().await;
        me.start_console_rotation();
        Ok(me)
    }

    /// Checks every sandbox's console against its bound, every [`console::ROTATE_EVERY`],
    /// for as long as the service lives. Here rather than in a driver: the runtimes keep
    /// writing to the file whoever started them, and this process may be a later one.
    fn start_console_rotation(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(console::ROTATE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let logs: Vec<PathBuf> = inner
                    .entries
                    .lock()
                    .unwrap()
                    .keys()
                    .map(|id| Layout::new(&inner.root, id).console_log())
                    .collect();
                let consoles = inner.consoles.clone();
                drop(inner);
                let _ = tokio::task::spawn_blocking(move || {
                    for log in logs {
                        match consoles.rotate(&log) {
                            Ok(Some(bytes)) => {
                                tracing::debug!(log = %log.display(), bytes, "console rotated")
                            }
                            Ok(None) => {}
                            // A sandbox being deleted takes its directory with it.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                tracing::warn!(log = %log.display(), error = %e, "cannot rotate a console log")
                            }
                        }
                    }
                })
                .await;
            }
        });
    }

    /// The sandboxes' console logs, for reading them.
    pub fn consoles(&self) -> &Consoles {
        &self.inner.consoles
    }

    pub fn probe(&self) -> &HostProbe {
        &self.inner.probe
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, SandboxError> {
        self.inner
            .entries
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))
    }

    /// Makes a sandbox known to the service (it is then listed and addressable).
    fn register(&self, rec: &Record) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            id: rec.sandbox.id.clone(),
            record: Mutex::new(rec.clone()),
            egress: StdMutex::new(None),
        });
        self.inner
            .entries
            .lock()
            .unwrap()
            .insert(entry.id.clone(), entry.clone());
        entry
    }

    fn layout(&self, id: &str) -> Layout {
        Layout::new(&self.inner.root, id)
    }

    /// The host side of a sandbox's `agent.sock`: each connection reaches the agent's port.
    pub fn agent_socket(&self, id: &str) -> PathBuf {
        self.layout(id).agent_socket()
    }

    /// The last `lines` lines of the sandbox's console.
    pub fn console_tail(&self, id: &str, lines: usize) -> String {
        log_tail(&self.layout(id).console_log(), lines)
    }

    /// The sandbox's console: `hangar-init`'s and the agent's stdout and stderr. Read it
    /// through [`Sandboxes::consoles`], which knows its rotations.
    pub fn console_log(&self, id: &str) -> PathBuf {
        self.layout(id).console_log()
    }

    fn driver(&self, kind: DriverKind) -> Result<Arc<dyn Driver>, SandboxError> {
        self.inner
            .drivers
            .get(&kind)
            .cloned()
            .ok_or_else(|| SandboxError::Unavailable(format!("driver {kind} is not built yet")))
    }

    /// Runs a driver operation on a blocking thread with the sandbox's spec.
    async fn drive<R: Send + 'static>(
        &self,
        rec: &Record,
        f: impl FnOnce(&dyn Driver, &SandboxSpec) -> R + Send + 'static,
    ) -> Result<R, SandboxError> {
        let driver = self.driver(rec.sandbox.driver)?;
        let layout = self.layout(&rec.sandbox.id);
        let image = rec.image();
        let resources = rec.sandbox.resources.clone();
        let init_dir = self.inner.init_dir.clone();
        let init = init_config(rec);
        tokio::task::spawn_blocking(move || {
            let spec = SandboxSpec {
                layout: &layout,
                image: &image,
                resources: &resources,
                init_dir: &init_dir,
                init: &init,
            };
            f(driver.as_ref(), &spec)
        })
        .await
        .map_err(|e| SandboxError::Internal(format!("driver task failed: {e}")))
    }

    fn link(&self, rec: &Record) -> InitLink {
        InitLink::new(
            self.layout(&rec.sandbox.id).control_socket(),
            rec.secret.clone(),
        )
    }

    fn save(&self, rec: &Record) -> Result<(), SandboxError> {
        rec.save(&self.layout(&rec.sandbox.id).record())
            .map_err(|e| SandboxError::Internal(format!("saving the sandbox record: {e}")))
    }

    pub async fn create(&self, req: CreateSandbox) -> Result<Sandbox, SandboxError> {
        let me = self.clone();
        detach(async move { me.create_now(req).await }).await
    }

    async fn create_now(&self, req: CreateSandbox) -> Result<Sandbox, SandboxError> {
        let kind = match req.driver {
            DriverKind::Auto => self.inner.probe.auto.ok_or_else(|| {
                SandboxError::Unavailable(
                    "no sandbox driver works on this host; run `hangar doctor`".into(),
                )
            })?,
            k => {
                self.inner
                    .probe
                    .available(k)
                    .map_err(SandboxError::Unavailable)?;
                k
            }
        };
        let r = &req.resources;
        if !(r.cpus > 0.0 && r.cpus <= 256.0) || r.memory_mib < 16 || r.disk_mib < 16 || r.pids < 8
        {
            return Err(SandboxError::Invalid(
                "resources out of range: cpus must be > 0, memory_mib >= 16, disk_mib >= 16, pids >= 8".into(),
            ));
        }
        if req.command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(SandboxError::Invalid(
                "command must not be empty; omit it to use the image's".into(),
            ));
        }
        self.driver(kind)?
            .check_resources(r)
            .map_err(SandboxError::Invalid)?;
        EgressPolicy::new(&req.egress, vec![])
            .and_then(|p| p.with_injections(&req.inject))
            .and_then(|p| p.with_dlp(req.dlp.as_ref()))
            .map_err(SandboxError::Invalid)?;
        if let Some(name) = &req.egress.attach {
            if req.egress.policy == hangar_proto::sandbox::EgressPolicyKind::None {
                return Err(SandboxError::Invalid(
                    "egress.attach needs a policy other than \"none\"".into(),
                ));
            }
            self.check_attach(name)?;
        }
        let path = PathBuf::from(&req.image);
        let images = self.inner.images.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&path))
            .await
            .map_err(|e| SandboxError::Internal(e.to_string()))?
            .map_err(|e: ResolveError| {
                if e.is_user_error() {
                    SandboxError::Invalid(error_chain(&e))
                } else {
                    SandboxError::Internal(error_chain(&e))
                }
            })?;

        if let Some(dir) = image.id.strip_prefix("rootfs:") {
            let dir = Path::new(dir);
            let allowed = self.inner.cfg.rootfs_roots.iter().any(|root| {
                let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
                dir.starts_with(&root) && dir != root
            });
            if !allowed {
                return Err(SandboxError::Invalid(format!(
                    "{} is not under a directory that root filesystems may come from ({}); \
                     use an OCI image layout, or start hangar serve with --rootfs-root",
                    dir.display(),
                    self.inner
                        .cfg
                        .rootfs_roots
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        // Layers become overlayfs `lowerdir=` entries, where ':' and ',' are separators.
        if let Some(bad) = image
            .layers
            .iter()
            .find(|l| l.to_string_lossy().contains([':', ',']))
        {
            return Err(SandboxError::Invalid(format!(
                "image path {} contains ':' or ',', which overlayfs cannot take; move or rename it",
                bad.display()
            )));
        }
        let id = format!("sb-{}", random_hex(6));
        let sandbox = Sandbox {
            id: id.clone(),
            driver: kind,
            state: SandboxState::Creating,
            image: req.image.clone(),
            resources: req.resources.clone(),
            egress: req.egress.clone(),
            created_at: now_rfc3339(),
            checkpoint: None,
            last_resume: None,
            error: None,
        };
        let rec = Record {
            sandbox,
            secret: random_hex(32),
            env: req.env.clone(),
            command: req.command.clone(),
            image_id: image.id.clone(),
            layers: image.layers.clone(),
            image_config: image.config.clone(),
            inject: req.inject.clone(),
            token: req.token.clone(),
            dlp: req.dlp.clone(),
        };
        let layout = self.layout(&id);
        std::fs::create_dir_all(layout.run_dir())
            .map_err(|e| SandboxError::Internal(format!("creating the sandbox directory: {e}")))?;
        self.save(&rec)?;
        let entry = self.register(&rec);
        let mut guard = entry.record.lock().await;

        let t0 = Instant::now();
        let started = async {
            let img = layout.volume_image();
            let size = rec.sandbox.resources.disk_mib;
            let templates = self.inner.cfg.data_dir.join("volumes");
            tokio::task::spawn_blocking(move || volume::create(&img, size, &templates))
                .await
                .map_err(|e| SandboxError::Internal(e.to_string()))?
                .map_err(|e| SandboxError::Internal(error_chain(&e)))?;
            let volume = t0.elapsed();
            self.start_egress(&entry, &rec)?;
            self.drive(&rec, |d, sb| d.start(sb)).await??;
            let runtime = t0.elapsed();
            self.wait_ready(&rec).await?;
            tracing::debug!(sandbox = %id, ?volume, ?runtime, ready = ?t0.elapsed(), "sandbox started");
            Ok(())
        }
        .await;
        match started {
            Ok(()) => {
                guard.sandbox.state = SandboxState::Running;
                self.save(&guard)?;
                self.measured(kind, "create", t0);
                Ok(guard.sandbox.clone())
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "sandbox failed to start");
                drop(guard);
                let _ = self.remove(&id, &entry).await;
                Err(e)
            }
        }
    }

    fn start_egress(&self, entry: &Entry, rec: &Record) -> Result<(), SandboxError> {
        let layout = self.layout(&rec.sandbox.id);
        let attach = match &rec.sandbox.egress.attach {
            Some(name) => Some(self.inner.netns.get(name).map_err(SandboxError::Invalid)?),
            None => None,
        };
        let policy = EgressPolicy::new(&rec.sandbox.egress, self.inner.cfg.forbidden.clone())
            .and_then(|p| p.with_injections(&rec.inject))
            .and_then(|p| p.with_dlp(rec.dlp.as_ref()))
            .map_err(SandboxError::Invalid)?
            .attached(attach);
        let path = layout.egress_socket();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| SandboxError::Internal(format!("binding {}: {e}", path.display())))?;
        let task = tokio::spawn(egress::serve(
            listener,
            Arc::new(policy),
            rec.sandbox.id.clone(),
            self.inner.cfg.egress.clone(),
        ));
        if let Some(old) = entry.egress.lock().unwrap().replace(task) {
            old.abort();
        }
        Ok(())
    }

    fn stop_egress(&self, entry: &Entry, id: &str) {
        if let Some(task) = entry.egress.lock().unwrap().take() {
            task.abort();
        }
        let _ = std::fs::remove_file(self.layout(id).egress_socket());
    }

    /// Waits until `hangar-init` answers on `control.sock`, failing early if the runtime dies.
    async fn wait_ready(&self, rec: &Record) -> Result<(), SandboxError> {
        let link = self.link(rec);
        let sock = self.layout(&rec.sandbox.id).control_socket();
        let started = Instant::now();
        let mut next_check = started + Duration::from_millis(200);
        let mut last = String::from("control.sock never appeared");
        while started.elapsed() < READY_TIMEOUT {
            if sock.exists() {
                match link.health().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_millis(200);
                if !self.drive(rec, |d, sb| d.alive(sb)).await? {
                    last = "the sandbox stopped while starting".into();
                    break;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let tail = log_tail(&self.layout(&rec.sandbox.id).console_log(), 10);
        Err(SandboxError::Internal(format!(
            "hangar-init did not become ready after {:?} ({last}); console:\n{tail}",
            started.elapsed(),
        )))
    }

    pub async fn list(&self) -> Vec<Sandbox> {
        let entries: Vec<Arc<Entry>> = self
            .inner
            .entries
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            // A sandbox in the middle of a transition holds its lock for as long as the driver
            // takes; its persisted record (written before every transition) answers instead.
            match tokio::time::timeout(Duration::from_millis(20), e.record.lock()).await {
                Ok(rec) => out.push(rec.sandbox.clone()),
                Err(_) => {
                    let id = e.id.clone();
                    if let Ok(rec) = Record::load(&self.layout(&id).record()) {
                        out.push(rec.sandbox);
                    }
                }
            }
        }
        out.retain(|s| s.state != SandboxState::Deleted);
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, SandboxError> {
        Ok(self.entry(id)?.record.lock().await.sandbox.clone())
    }

    /// The link to a running sandbox's `hangar-init`, for exec and files.
    pub async fn running_link(&self, id: &str) -> Result<InitLink, SandboxError> {
        let entry = self.entry(id)?;
        let rec = entry.record.lock().await;
        if rec.sandbox.state == SandboxState::Deleted {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        if rec.sandbox.state != SandboxState::Running {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is {}; resume it first",
                serde_json::to_value(rec.sandbox.state)
                    .unwrap()
                    .as_str()
                    .unwrap_or("not running")
            )));
        }
        Ok(self.link(&rec))
    }

    pub async fn exec(
        &self,
        id: &str,
        req: &hangar_proto::sandbox::ExecRequest,
    ) -> Result<ExecStream, SandboxError> {
        if req.cmd.is_empty() {
            return Err(SandboxError::Invalid("cmd must name a program".into()));
        }
        let link = self.running_link(id).await?;
        Ok(link.exec(req).await?)
    }

    pub async fn suspend(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let me = self.clone();
        let id = id.to_owned();
        detach(async move { me.suspend_now(&id).await }).await
    }

    async fn suspend_now(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let entry = self.entry(id)?;
        let mut rec = entry.record.lock().await;
        match rec.sandbox.state {
            SandboxState::Running => {}
            SandboxState::Suspended => return Ok(rec.sandbox.clone()),
            s => {
                return Err(SandboxError::Conflict(
                    format!("sandbox {id} cannot be suspended while {s:?}").to_lowercase(),
                ))
            }
        }
        let t0 = Instant::now();
        rec.sandbox.state = SandboxState::Suspending;
        self.save(&rec)?;
        let link = self.link(&rec);
        let result = self.drive(&rec, move |d, sb| d.suspend(sb, &link)).await?;
        let kept = match result {
            Ok(kept) => kept,
            Err(e) => {
                // Where the suspend stopped decides what the sandbox is now: still running (the
                // checkpoint was refused), or stopped with its files on disk.
                let alive = self.drive(&rec, |d, sb| d.alive(sb)).await?;
                if alive {
                    rec.sandbox.state = SandboxState::Running;
                } else {
                    rec.sandbox.state = SandboxState::Failed;
                    rec.sandbox.error = Some(format!(
                        "suspend failed: {e}; resume starts it again on its files"
                    ));
                    self.stop_egress(&entry, id);
                }
                self.save(&rec)?;
                return Err(e.into());
            }
        };
        self.stop_egress(&entry, id);
        let layout = self.layout(id);
        let files = self.drive(&rec, |d, sb| d.kept_files(sb)).await?;
        // The sandbox is stopped whatever happens now; a checkpoint that cannot be hashed is
        // still the sandbox's state, so it is recorded as suspended either way.
        let digest = tokio::task::spawn_blocking(move || checkpoint_digest(&layout, &files)).await;
        let (bytes, hash) = match digest {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot hash the checkpoint");
                (0, format!("unavailable: {e}"))
            }
            Err(e) => (0, format!("unavailable: {e}")),
        };
        rec.sandbox.checkpoint = Some(Checkpoint {
            mode: kept.mode,
            note: kept.note,
            bytes,
            hash,
            took_ms: t0.elapsed().as_millis() as u64,
            created_at: now_rfc3339(),
        });
        rec.sandbox.state = SandboxState::Suspended;
        self.save(&rec)?;
        self.measured(rec.sandbox.driver, "suspend", t0);
        Ok(rec.sandbox.clone())
    }

    pub async fn resume(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let me = self.clone();
        let id = id.to_owned();
        detach(async move { me.resume_now(&id).await }).await
    }

    async fn resume_now(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let entry = self.entry(id)?;
        let mut rec = entry.record.lock().await;
        match rec.sandbox.state {
            // A failed sandbox is stopped with its files intact: resuming starts it again.
            SandboxState::Suspended | SandboxState::Failed => {}
            SandboxState::Running => return Ok(rec.sandbox.clone()),
            s => {
                return Err(SandboxError::Conflict(
                    format!("sandbox {id} cannot be resumed while {s:?}").to_lowercase(),
                ))
            }
        }
        let t0 = Instant::now();
        rec.sandbox.state = SandboxState::Resuming;
        self.save(&rec)?;
        self.start_egress(&entry, &rec)?;
        let started = match self.drive(&rec, |d, sb| d.resume(sb)).await? {
            Ok(how) => self.wait_ready(&rec).await.map(|()| how),
            Err(e) => Err(e.into()),
        };
        let how = match started {
            Ok(how) => how,
            Err(e) => {
                // Leave nothing half-started; the files stay for the next attempt.
                let _ = self.drive(&rec, |d, sb| d.destroy(sb)).await;
                self.stop_egress(&entry, id);
                rec.sandbox.state = SandboxState::Failed;
                rec.sandbox.error = Some(format!("resume failed: {e}"));
                self.save(&rec)?;
                return Err(e);
            }
        };
        let (mode, note) = match how {
            Resumed::Memory => (CheckpointMode::Memory, None),
            Resumed::Filesystem { note } => (CheckpointMode::Filesystem, note),
        };
        rec.sandbox.last_resume = Some(ResumeInfo {
            mode,
            took_ms: t0.elapsed().as_millis() as u64,
            note,
            at: now_rfc3339(),
        });
        rec.sandbox.state = SandboxState::Running;
        rec.sandbox.error = None;
        self.save(&rec)?;
        self.measured(rec.sandbox.driver, "resume", t0);
        Ok(rec.sandbox.clone())
    }

    fn measured(&self, driver: DriverKind, operation: &str, since: Instant) {
        if let Some(m) = &self.inner.cfg.metrics {
            m.sandbox_operation(driver.as_str(), operation, since.elapsed().as_secs_f64());
        }
    }

    /// Sandboxes by state (for the metrics).
    pub async fn counts(&self) -> Vec<(String, i64)> {
        let mut by: std::collections::BTreeMap<String, i64> = Default::default();
        for sb in self.list().await {
            let state = serde_json::to_value(sb.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *by.entry(state).or_default() += 1;
        }
        by.into_iter().collect()
    }

    /// Whether sandboxes may attach their egress to network namespace `name`: one the operator
    /// named (`hangar serve --netns`), and that exists.
    pub fn check_attach(&self, name: &str) -> Result<(), SandboxError> {
        if !self.inner.cfg.attachable.iter().any(|n| n == name) {
            return Err(SandboxError::Invalid(format!(
                "network namespace {name:?} is not one sandboxes may attach to; the operator \
                 allows it with `hangar serve --netns {name}`"
            )));
        }
        self.inner
            .netns
            .get(name)
            .map(drop)
            .map_err(SandboxError::Invalid)
    }

    /// Sets a sandbox's session token: handed to `hangar-init` now if the sandbox runs, else
    /// when it next starts or resumes.
    pub async fn set_token(&self, id: &str, token: String) -> Result<(), SandboxError> {
        let entry = self.entry(id)?;
        let link = {
            let mut rec = entry.record.lock().await;
            rec.token = Some(token.clone());
            match rec.sandbox.state {
                SandboxState::Running => self.link(&rec),
                SandboxState::Deleted => return Err(SandboxError::NotFound(id.to_owned())),
                _ => return Ok(()),
            }
        };
        // Not under the record's lock: a sandbox slow to answer must not hold up its
        // transitions. A suspend that comes first makes this fail, and the resume hands the
        // recorded token over.
        Ok(link.set_token(&token).await?)
    }

    pub async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        let me = self.clone();
        let id = id.to_owned();
        detach(async move { me.delete_now(&id).await }).await
    }

    async fn delete_now(&self, id: &str) -> Result<(), SandboxError> {
        let entry = self.entry(id)?;
        self.remove(id, &entry).await
    }

    async fn remove(&self, id: &str, entry: &Arc<Entry>) -> Result<(), SandboxError> {
        let mut rec = entry.record.lock().await;
        if rec.sandbox.state == SandboxState::Deleted {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        self.stop_egress(entry, id);
        self.drive(&rec, |d, sb| d.destroy(sb)).await??;
        rec.sandbox.state = SandboxState::Deleted;
        let dir = self.layout(id).dir;
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .map_err(|e| SandboxError::Internal(e.to_string()))?
            .map_err(|e| SandboxError::Internal(format!("removing the sandbox's files: {e}")))?;
        self.inner.entries.lock().unwrap().remove(id);
        Ok(())
    }

    /// Re-reads every record after a restart: running sandboxes are adopted or started
    /// again on their files; interrupted transitions are settled.
    async fn recover(&self) {
        let Ok(dir) = std::fs::read_dir(&self.inner.root) else {
            return;
        };
        for d in dir.flatten() {
            let id = d.file_name().to_string_lossy().into_owned();
            let layout = self.layout(&id);
            let mut rec = match Record::load(&layout.record()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "unreadable sandbox record; leaving its files alone");
                    continue;
                }
            };
            let entry = self.register(&rec);
            let outcome = self.recover_one(&entry, &mut rec).await;
            if let Err(e) = outcome {
                tracing::warn!(sandbox = %id, error = %e, "could not recover sandbox");
                rec.sandbox.state = SandboxState::Failed;
                rec.sandbox.error = Some(format!("recovery failed: {e}"));
                let _ = self.save(&rec);
            }
            tracing::info!(sandbox = %id, state = ?rec.sandbox.state, "recovered sandbox");
            *entry.record.lock().await = rec;
        }
    }

    async fn recover_one(&self, entry: &Entry, rec: &mut Record) -> Result<(), SandboxError> {
        match rec.sandbox.state {
            SandboxState::Suspended | SandboxState::Failed | SandboxState::Deleted => Ok(()),
            SandboxState::Creating
            | SandboxState::Running
            | SandboxState::Resuming
            | SandboxState::Suspending => {
                let was = rec.sandbox.state;
                match self.drive(rec, |d, sb| d.recover(sb)).await?? {
                    Recovered::Adopted => {
                        self.start_egress(entry, rec)?;
                        rec.sandbox.state = SandboxState::Running;
                    }
                    Recovered::Stopped if was == SandboxState::Suspending => {
                        // The suspend got as far as stopping it: what is on disk is the checkpoint.
                        rec.sandbox.state = SandboxState::Suspended;
                    }
                    Recovered::Stopped => {
                        self.start_egress(entry, rec)?;
                        self.drive(rec, |d, sb| d.resume(sb)).await??;
                        self.wait_ready(rec).await?;
                        rec.sandbox.state = SandboxState::Running;
                    }
                }
                self.save(rec)
            }
        }
    }
}

/// Runs a lifecycle transition on a task of its own: if the caller goes away (an HTTP client
/// that disconnects), the transition still finishes and its outcome is recorded, instead of
/// stopping half-way with the sandbox's lock released and its state stuck.
async fn detach<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, SandboxError>> + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::spawn(f)
        .await
        .map_err(|e| SandboxError::Internal(format!("sandbox transition failed: {e}")))?
}

/// The agent process and exec defaults that `hangar-init` gets on a cold start.
fn init_config(rec: &Record) -> InitConfig {
    let cfg = &rec.image_config;
    let argv = match &rec.command {
        Some(c) => c.clone(),
        None => cfg
            .entrypoint
            .iter()
            .chain(cfg.cmd.iter())
            .cloned()
            .collect(),
    };
    let mut env: BTreeMap<String, String> = cfg
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    env.extend(rec.env.clone());
    // Like Docker: an image that sets no PATH gets the conventional one.
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    InitConfig {
        secret: rec.secret.clone(),
        agent: (!argv.is_empty()).then_some(ProcessSpec { argv }),
        agent_port: env
            .get("PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_AGENT_PORT),
        defaults: ProcessDefaults {
            env,
            user: cfg.user.clone(),
            cwd: cfg.working_dir.clone(),
        },
        guard: (rec.sandbox.driver == DriverKind::Gvisor).then_some(GuardLimits {
            memory_mib: rec.sandbox.resources.memory_mib,
        }),
        vm: (rec.sandbox.driver == DriverKind::Vm).then_some(VmGuest {
            pids_max: rec.sandbox.resources.pids,
        }),
        token: rec.token.clone(),
    }
}

/// Bytes on disk and a content hash of what a suspended sandbox keeps: its volume, the files
/// the driver keeps besides (a VM's RAM), and, for memory checkpoints, the checkpoint image.
/// Sparse files are hashed over their data extents only.
fn checkpoint_digest(layout: &Layout, kept: &[PathBuf]) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut bytes = 0;
    for file in std::iter::once(&layout.volume_image()).chain(kept) {
        bytes += volume::allocated_bytes(file);
        volume::hash_sparse(file, &mut hasher)?;
    }
    if let Ok(dir) = std::fs::read_dir(layout.checkpoint()) {
        // Drivers' marker files (`hangar-complete`, `hangar-durable`) are bookkeeping, and may
        // appear after the digest: not part of the checkpoint's content.
        let mut files: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("hangar-")
            })
            .collect();
        files.sort();
        for f in files {
            hasher.update(f.file_name().unwrap().as_encoded_bytes());
            let mut file = std::fs::File::open(&f)?;
            bytes += volume::allocated_bytes(&f);
            std::io::copy(&mut file, &mut hasher)?;
        }
    }
    Ok((bytes, format!("sha256:{}", hex::encode(hasher.finalize()))))
}

/// Copies `hangar-init` where sandboxes mount it from. A copy, not the build output itself,
/// so that rebuilding Hangar never changes a binary a running sandbox has mounted.
fn install_init(binary: &Path, dir: &Path) -> Result<(), SandboxError> {
    let dest = dir.join("hangar-init");
    let tmp = dir.join(".hangar-init.tmp");
    std::fs::copy(binary, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &dest))
        .map_err(|e| {
            SandboxError::Internal(format!(
                "installing hangar-init from {}: {e}",
                binary.display()
            ))
        })?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("the OS random source works");
    hex::encode(buf)
}

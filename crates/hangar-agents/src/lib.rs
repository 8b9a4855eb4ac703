//! Agents, versions and sessions: the service behind `/v1/agents`, `/v1/sessions` and the
//! data plane.
//!
//! A session is a row in the store and a sandbox. Every state transition is written to the
//! store before it is acted on, so that `hangar serve` can be restarted at any point and
//! [`Agents::open`] reconciles each session with what its sandbox really is.
//!
//! Per session, a [`Live`] entry holds what changes on every request and is not worth a
//! write each time: the number of requests in flight and the time of the last one (flushed
//! to the store by the scheduler). Its async lock serialises the transitions (create,
//! suspend, resume, delete); a request holds it only while it makes sure the sandbox runs
//! and counts itself in, so that the scheduler can never suspend a session with a request
//! in flight.

mod agent_link;
mod error;
pub mod identity;
mod scheduler;
mod secrets;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tracing::Instrument;

use hangar_proto::agent::{Agent, AgentSpec, DeployRequest, Session, SessionState, Version};
use hangar_proto::sandbox::{Checkpoint, CreateSandbox, Egress, SandboxState, SecretInjection};
use hangar_sandbox::{SandboxError, Sandboxes};
use hangar_store::{RefKind, SessionRow, Store, ThreadKey, ThreadRow, VersionRow};

pub use agent_link::{connect, BoxError};
pub use error::{AgentsError, ErrorSource};
pub use identity::{Identity, IdentityConfig, SessionClaims};
pub use secrets::{SecretKey, SecretVault, MAX_SECRET};

/// Node-wide settings of the session service.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sandboxes that may run at once on this node; past it the least recently used idle
    /// session is suspended.
    pub max_running: usize,
    /// How often the scheduler looks for idle and expired sessions.
    pub tick: Duration,
    /// Seals agent secrets at rest; without it, secrets cannot be set or used.
    pub secrets_key: Option<SecretKey>,
    /// Hangar as its agents' token issuer (needs `secrets_key`, which seals the signing keys).
    pub identity: Option<IdentityConfig>,
    /// Where idle suspensions are counted.
    pub metrics: Option<Arc<hangar_metrics::Metrics>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_running: 64,
            tick: Duration::from_millis(500),
            secrets_key: None,
            identity: None,
            metrics: None,
        }
    }
}

/// What a session needs from its version, cached (versions are immutable).
#[derive(Debug)]
struct VersionInfo {
    spec: AgentSpec,
    layout: String,
    /// The detectors on its answers, if it has guardrails.
    guard: Option<Arc<OutputGuard>>,
}

/// An agent version's data-loss detectors on its answers, and what a hit does.
#[derive(Debug)]
pub struct OutputGuard {
    pub scanner: hangar_dlp::Scanner,
    pub action: hangar_proto::agent::OutputAction,
}

struct Live {
    id: String,
    agent: String,
    version: i64,
    isolation_key: String,
    /// The session's sandbox, once it has one (mirrored from the store).
    sandbox: StdMutex<Option<String>>,
    /// Serialises transitions; see the module documentation.
    lock: Mutex<()>,
    inflight: AtomicUsize,
    /// The persisted state, mirrored (written under `lock`).
    state: StdMutex<SessionState>,
    last_activity: StdMutex<SystemTime>,
    /// `last_activity` changed since it was last written to the store.
    dirty: std::sync::atomic::AtomicBool,
    /// When the session token its sandbox holds expires (`None`: it holds none yet).
    token_expires: StdMutex<Option<SystemTime>>,
    /// A renewal of the token is under way.
    renewing: std::sync::atomic::AtomicBool,
}

impl Live {
    fn state(&self) -> SessionState {
        *self.state.lock().unwrap()
    }
    fn touch(&self) {
        *self.last_activity.lock().unwrap() = SystemTime::now();
        self.dirty.store(true, Ordering::Relaxed);
    }
    fn last_activity(&self) -> SystemTime {
        *self.last_activity.lock().unwrap()
    }
}

struct Inner {
    store: Store,
    sandboxes: Sandboxes,
    cfg: Config,
    live: StdMutex<HashMap<String, Arc<Live>>>,
    versions: StdMutex<HashMap<(String, i64), Arc<VersionInfo>>>,
    identity: Option<Arc<Identity>>,
}

#[derive(Clone)]
pub struct Agents {
    inner: Arc<Inner>,
}

/// A request's hold on a running session: while it lives, the session is not suspended.
pub struct Lease {
    live: Arc<Live>,
    pub session_id: String,
    pub agent: String,
    pub version: i64,
    /// The host side of the session's `agent.sock`.
    pub socket: PathBuf,
}

impl Lease {
    /// The end user whose session this is.
    pub fn isolation_key(&self) -> &str {
        &self.live.isolation_key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.live.touch();
        self.live.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A mapped protocol's conversation, routed to its session: where its chain of responses has
/// got to, so that the next turn continues it.
pub struct Thread {
    pub lease: Lease,
    pub last_response_id: Option<String>,
    pub last_message_id: Option<String>,
}

/// How a data-plane request names its session.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// `agent_session_id` (body or query) or `x-agent-session-id`.
    pub session_id: Option<String>,
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn parse_time(s: &str) -> SystemTime {
    humantime::parse_rfc3339_weak(s).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("the OS random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Agents {
    /// Loads every session from the store and reconciles it with its sandbox (which
    /// `Sandboxes::open` has recovered), then starts the scheduler.
    pub async fn open(
        store: Store,
        sandboxes: Sandboxes,
        cfg: Config,
    ) -> Result<Agents, AgentsError> {
        let identity = match (&cfg.identity, &cfg.secrets_key) {
            (Some(id), Some(key)) => Some(Arc::new(Identity::new(
                store.clone(),
                key.clone(),
                id.clone(),
            ))),
            (Some(_), None) => {
                return Err(AgentsError::Invalid(
                    "agent identities need the key for secrets, which seals their signing keys"
                        .into(),
                ))
            }
            (None, _) => None,
        };
        let me = Agents {
            inner: Arc::new(Inner {
                store,
                sandboxes,
                cfg,
                live: StdMutex::new(HashMap::new()),
                versions: StdMutex::new(HashMap::new()),
                identity,
            }),
        };
        me.recover().await?;
        tokio::spawn(scheduler::run(me.clone()));
        Ok(me)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The detectors on the answers of the version a lease's session runs, if it has any.
    pub async fn output_guard(&self, lease: &Lease) -> Option<Arc<OutputGuard>> {
        match self.version_info(&lease.agent, lease.version).await {
            Ok(info) => info.guard.clone(),
            Err(e) => {
                tracing::warn!(agent = %lease.agent, version = lease.version, error = %e, "cannot read a version's guardrails");
                None
            }
        }
    }

    /// Sessions by agent and state, as the API shows states (for the metrics).
    pub fn session_counts(&self) -> Vec<(String, String, i64)> {
        let mut by: BTreeMap<(String, String), i64> = BTreeMap::new();
        for live in self.all_live() {
            let state = self.view_state(&live).as_str().to_owned();
            *by.entry((live.agent.clone(), state)).or_default() += 1;
        }
        by.into_iter().map(|((a, s), n)| (a, s, n)).collect()
    }

    pub(crate) fn count_idle_suspension(&self, agent: &str) {
        if let Some(m) = &self.inner.cfg.metrics {
            m.idle_suspension(agent);
        }
    }

    /// Hangar as its agents' token issuer, if configured.
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.inner.identity.as_ref()
    }

    /// A fresh session token for `live`, noted as the one its sandbox will hold.
    async fn mint_token(&self, live: &Live) -> Result<Option<String>, AgentsError> {
        let Some(identity) = &self.inner.identity else {
            return Ok(None);
        };
        let (token, expires) = identity
            .session_token(&live.agent, live.version, &live.id, &live.isolation_key)
            .await?;
        *live.token_expires.lock().unwrap() = Some(expires);
        Ok(Some(token))
    }

    /// Gives a running session's sandbox a fresh token when a third of the current one's
    /// life is left (or it has none, after a restart of `hangar serve`).
    pub(crate) async fn renew_token(&self, live: &Arc<Live>) {
        let Some(identity) = &self.inner.identity else {
            return;
        };
        let due = match *live.token_expires.lock().unwrap() {
            None => true,
            Some(exp) => {
                exp.duration_since(SystemTime::now()).unwrap_or_default()
                    < identity.session_ttl() / 3
            }
        };
        if !due || live.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let sandbox = live.sandbox.lock().unwrap().clone();
            let result = async {
                let sandbox = sandbox.ok_or_else(|| no_session(&live.id))?;
                let token = me.mint_token(&live).await?.unwrap_or_default();
                if let Err(e) = me.inner.sandboxes.set_token(&sandbox, token).await {
                    // Due again after TOKEN_RETRY rather than at every tick: a sandbox that
                    // does not answer is not asked twice a second.
                    let ttl = me
                        .inner
                        .identity
                        .as_ref()
                        .map(|i| i.session_ttl())
                        .unwrap_or_default();
                    *live.token_expires.lock().unwrap() =
                        Some(SystemTime::now() + ttl / 3 + TOKEN_RETRY);
                    return Err(e.into());
                }
                Ok::<_, AgentsError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(session = %live.id, error = %e, "cannot renew the session token yet");
            }
            live.renewing.store(false, Ordering::Release);
        });
    }

    /// Hands a token to a running sandbox, trying a few times; if it cannot, the scheduler's
    /// next tick sends a fresh one.
    async fn hand_token(&self, live: &Live, sandbox: &str, token: String) {
        for attempt in 1..=3 {
            match self.inner.sandboxes.set_token(sandbox, token.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(session = %live.id, %sandbox, attempt, error = %e, "cannot hand the session token over");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        *live.token_expires.lock().unwrap() = None;
    }

    /// RFC 8693 token exchange for a sandbox: its session token for an on-behalf-of token of
    /// the session's user, for `audience`. Refused unless the token is valid and is the
    /// session token of the session that `sandbox` serves, which still belongs to that user.
    pub async fn exchange_token(
        &self,
        sandbox: &str,
        subject_token: &str,
        audience: &str,
        scope: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, SessionClaims), ExchangeError> {
        let identity = self
            .inner
            .identity
            .as_ref()
            .ok_or_else(|| ExchangeError::Unavailable("this server issues no tokens".into()))?;
        if audience.is_empty()
            || audience.len() > 512
            || audience
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ExchangeError::Target(
                "audience must be 1 to 512 characters without spaces".into(),
            ));
        }
        // Hangar itself is no audience: a token for it would pass where session tokens do.
        if audience.trim_end_matches('/') == identity.issuer()
            || audience.starts_with(&format!("{}/", identity.issuer()))
        {
            return Err(ExchangeError::Target(
                "the audience must be a tool or service, not Hangar's issuer".into(),
            ));
        }
        if scope.is_some_and(|s| s.len() > 1024 || s.chars().any(char::is_control)) {
            return Err(ExchangeError::Target(
                "scope must be at most 1024 characters without control characters".into(),
            ));
        }
        let claims = identity
            .verify_session_token(subject_token)
            .await
            .map_err(|e| ExchangeError::Grant(format!("the subject token is not valid: {e}")))?;
        let owner = self.session_of_sandbox(sandbox);
        if owner.as_ref().map(|(_, s)| s.as_str()) != Some(claims.session_id.as_str()) {
            return Err(ExchangeError::Grant(
                "the subject token is not the session token of this sandbox's session".into(),
            ));
        }
        let live = self
            .live(&claims.session_id)
            .filter(|l| l.isolation_key == claims.isolation_key && l.agent == claims.agent)
            .ok_or_else(|| {
                ExchangeError::Grant("the subject token's session is not its user's".into())
            })?;
        if matches!(live.state(), SessionState::Deleted | SessionState::Failed) {
            return Err(ExchangeError::Grant("the session is over".into()));
        }
        let token = identity
            .obo_token(&claims, audience, scope, ttl)
            .await
            .map_err(|e| ExchangeError::Unavailable(e.to_string()))?;
        Ok((token, claims))
    }

    async fn recover(&self) -> Result<(), AgentsError> {
        let rows = self.inner.store.all_sessions().await?;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for row in &rows {
            let stored: SessionState = row.state.parse().unwrap_or(SessionState::Failed);
            let sandbox = match &row.sandbox_id {
                Some(id) => self.inner.sandboxes.get(id).await.ok(),
                None => None,
            };
            if stored == SessionState::Deleted {
                // A deletion that did not finish: finish it (never bring the session back).
                if let Some(id) = &row.sandbox_id {
                    let _ = self.inner.sandboxes.delete(id).await;
                }
                self.inner.store.delete_session(&row.id).await?;
                continue;
            }
            let (state, error) = match (stored, sandbox.map(|s| s.state)) {
                (SessionState::Failed, _) => (SessionState::Failed, row.error.clone()),
                (SessionState::Creating, sb) => {
                    if let (Some(id), Some(_)) = (&row.sandbox_id, sb) {
                        let _ = self.inner.sandboxes.delete(id).await;
                    }
                    (
                        SessionState::Failed,
                        Some("hangar serve stopped while the session was being created".into()),
                    )
                }
                (_, Some(SandboxState::Running)) => (SessionState::Running, None),
                (_, Some(SandboxState::Suspended)) => (SessionState::Suspended, None),
                // A failed sandbox keeps its files; the next request starts it again.
                (_, Some(SandboxState::Failed)) => (SessionState::Suspended, None),
                (_, _) => (
                    SessionState::Failed,
                    Some("the session's sandbox is gone".to_string()),
                ),
            };
            if state != stored || error != row.error {
                self.inner
                    .store
                    .set_session_state(
                        &row.id,
                        state.as_str(),
                        row.sandbox_id.as_deref(),
                        row.checkpoint.as_ref(),
                        error.as_deref(),
                    )
                    .await?;
            }
            *counts.entry(state.as_str()).or_default() += 1;
            self.add_live(row, state);
        }
        if !rows.is_empty() {
            tracing::info!(?counts, "sessions recovered");
        }
        Ok(())
    }

    fn add_live(&self, row: &SessionRow, state: SessionState) -> Arc<Live> {
        let live = Arc::new(Live {
            id: row.id.clone(),
            agent: row.agent.clone(),
            version: row.version,
            isolation_key: row.isolation_key.clone(),
            sandbox: StdMutex::new(row.sandbox_id.clone()),
            lock: Mutex::new(()),
            inflight: AtomicUsize::new(0),
            state: StdMutex::new(state),
            last_activity: StdMutex::new(parse_time(&row.last_activity)),
            dirty: Default::default(),
            token_expires: StdMutex::new(None),
            renewing: Default::default(),
        });
        self.inner
            .live
            .lock()
            .unwrap()
            .insert(row.id.clone(), live.clone());
        live
    }

    fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.inner.live.lock().unwrap().get(id).cloned()
    }

    fn all_live(&self) -> Vec<Arc<Live>> {
        self.inner.live.lock().unwrap().values().cloned().collect()
    }

    async fn version_info(
        &self,
        agent: &str,
        number: i64,
    ) -> Result<Arc<VersionInfo>, AgentsError> {
        let key = (agent.to_owned(), number);
        if let Some(v) = self.inner.versions.lock().unwrap().get(&key) {
            return Ok(v.clone());
        }
        let row = self
            .inner
            .store
            .version(agent, number)
            .await?
            .ok_or_else(|| {
                AgentsError::NotFound(format!("agent {agent:?} has no version {number}"))
            })?;
        let spec: AgentSpec = serde_json::from_value(row.spec.clone())
            .map_err(|e| AgentsError::Store(hangar_store::StoreError::Json(e)))?;
        let image = self
            .inner
            .store
            .image(&row.image_id)
            .await?
            .ok_or_else(|| AgentsError::NotFound(format!("image {} is gone", row.image_id)))?;
        let guard = output_guard(&spec).map_err(AgentsError::Invalid)?;
        let info = Arc::new(VersionInfo {
            spec,
            layout: image.layout,
            guard,
        });
        self.inner
            .versions
            .lock()
            .unwrap()
            .insert(key, info.clone());
        Ok(info)
    }

    // ---- agents and versions ----

    pub async fn deploy(&self, name: &str, req: DeployRequest) -> Result<Version, AgentsError> {
        req.spec.validate().map_err(AgentsError::Invalid)?;
        output_guard(&req.spec).map_err(AgentsError::Invalid)?;
        if let Some(name) = &req.spec.network.attach {
            self.inner.sandboxes.check_attach(name)?;
        }
        // The secrets' bindings, checked now rather than at each session's start.
        hangar_sandbox::egress::EgressPolicy::new(
            &Egress {
                policy: req.spec.network.egress,
                allow: req.spec.network.allow.clone(),
                attach: None,
            },
            vec![],
        )
        .and_then(|p| p.with_injections(&injections(name, &req.spec)))
        .map_err(|e| AgentsError::Invalid(format!("network: {e}")))?;
        if req.spec.name != name {
            return Err(AgentsError::Invalid(format!(
                "the spec names agent {:?}, but it is being deployed as {name:?}",
                req.spec.name
            )));
        }
        if req.traffic.is_some_and(|t| t > 100) {
            return Err(AgentsError::Invalid("traffic must be 0..=100".into()));
        }
        if req.spec.isolation != hangar_proto::sandbox::DriverKind::Auto {
            self.inner
                .sandboxes
                .probe()
                .available(req.spec.isolation)
                .map_err(|e| AgentsError::Invalid(format!("isolation: {e}")))?;
        }
        let image = self.inner.store.image(&req.image).await?.ok_or_else(|| {
            AgentsError::NotFound(format!(
                "no image {:?}; build or import it first",
                req.image
            ))
        })?;
        let spec = serde_json::to_value(&req.spec).expect("spec serialises");
        // Deploying what is already the latest version changes nothing (a script that
        // deploys on every run does not pile up identical versions).
        if req.traffic.is_none() {
            if let Some(last) = self.inner.store.versions(name).await?.pop() {
                if last.image_id == image.id && last.spec == spec {
                    let mut v = version_view(last)?;
                    v.unchanged = true;
                    return Ok(v);
                }
            }
        }
        let row = self
            .inner
            .store
            .deploy(
                name,
                &image.id,
                &spec,
                req.traffic.map(i64::from),
                &now_rfc3339(),
            )
            .await?;
        tracing::info!(agent = name, version = row.number, image = %image.id, "deployed");
        version_view(row)
    }

    pub async fn agents(&self) -> Result<Vec<Agent>, AgentsError> {
        let mut out = vec![];
        for a in self.inner.store.agents().await? {
            out.push(self.agent_view(a).await?);
        }
        Ok(out)
    }

    pub async fn agent(&self, name: &str) -> Result<Agent, AgentsError> {
        let a = self
            .inner
            .store
            .agent(name)
            .await?
            .ok_or_else(|| no_agent(name))?;
        self.agent_view(a).await
    }

    async fn agent_view(&self, a: hangar_store::AgentRow) -> Result<Agent, AgentsError> {
        let versions = self.inner.store.versions(&a.name).await?;
        let traffic = self.inner.store.traffic(&a.name).await?;
        let mut sessions: BTreeMap<String, u64> = BTreeMap::new();
        for l in self.all_live() {
            if l.agent == a.name {
                *sessions.entry(self.view_state(&l).to_string()).or_default() += 1;
            }
        }
        let description = versions
            .last()
            .and_then(|v| v.spec.get("description"))
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .to_owned();
        Ok(Agent {
            endpoint: format!("/agents/{}", a.name),
            name: a.name,
            description,
            versions: versions.iter().map(|v| v.number).collect(),
            traffic: traffic.into_iter().collect(),
            created_at: a.created_at,
            updated_at: a.updated_at,
            sessions,
        })
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<Version>, AgentsError> {
        self.require_agent(name).await?;
        self.inner
            .store
            .versions(name)
            .await?
            .into_iter()
            .map(version_view)
            .collect()
    }

    pub async fn set_traffic(
        &self,
        name: &str,
        weights: &BTreeMap<i64, i64>,
    ) -> Result<(), AgentsError> {
        self.require_agent(name).await?;
        let split: Vec<(i64, i64)> = weights.iter().map(|(v, w)| (*v, *w)).collect();
        self.inner.store.set_traffic(name, &split).await?;
        tracing::info!(agent = name, ?weights, "traffic set");
        Ok(())
    }

    /// Deletes an agent, every session of it and their sandboxes.
    pub async fn delete_agent(&self, name: &str) -> Result<(), AgentsError> {
        self.require_agent(name).await?;
        // Versions go first, so that no new session can start; then every session (a
        // creation in flight finishes first: its lock is awaited), then the agent.
        self.inner.store.delete_agent_versions(name).await?;
        self.inner
            .versions
            .lock()
            .unwrap()
            .retain(|(a, _), _| a != name);
        for l in self.all_live() {
            if l.agent == name {
                match self.delete_session(&l.id, None).await {
                    Ok(()) | Err(AgentsError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.inner.store.delete_agent(name).await?;
        if let Some(identity) = &self.inner.identity {
            identity.forget(name);
        }
        Ok(())
    }

    async fn require_agent(&self, name: &str) -> Result<(), AgentsError> {
        match self.inner.store.agent(name).await? {
            Some(_) => Ok(()),
            None => Err(no_agent(name)),
        }
    }

    // ---- sessions ----

    /// Creates a session for `isolation_key`, on `version` or one picked by the traffic
    /// weights, and waits until its agent is ready.
    pub async fn create_session(
        &self,
        agent: &str,
        isolation_key: &str,
        version: Option<i64>,
    ) -> Result<Session, AgentsError> {
        let (live, _) = self
            .spawn_new_session(agent, isolation_key, version, false)
            .await?;
        self.session_view(&live.id, None).await
    }

    /// [`Agents::new_session`] on a task of its own: a client that goes away does not cut a
    /// creation short half way.
    async fn spawn_new_session(
        &self,
        agent: &str,
        isolation_key: &str,
        version: Option<i64>,
        lease: bool,
    ) -> Result<(Arc<Live>, Option<Lease>), AgentsError> {
        let me = self.clone();
        let (agent, key) = (agent.to_owned(), isolation_key.to_owned());
        detached(async move { me.new_session(&agent, &key, version, lease).await }).await
    }

    /// Makes a session: its row (`creating`), room under the node's cap, its sandbox, and
    /// the agent's readiness. With `lease`, the first request's lease is taken under the
    /// session's lock, so that nothing can suspend it before that request arrives.
    #[tracing::instrument(
        name = "create_session",
        target = "hangar::trace",
        skip_all,
        fields(gen_ai.agent.name = %agent, hangar.session.id = tracing::field::Empty)
    )]
    async fn new_session(
        &self,
        agent: &str,
        isolation_key: &str,
        version: Option<i64>,
        lease: bool,
    ) -> Result<(Arc<Live>, Option<Lease>), AgentsError> {
        if isolation_key.is_empty() || isolation_key.len() > 256 {
            return Err(AgentsError::Invalid(
                "isolation_key must be 1 to 256 bytes".into(),
            ));
        }
        self.require_agent(agent).await?;
        let version = match version {
            Some(v) => v,
            None => pick_version(&self.inner.store.traffic(agent).await?).ok_or_else(|| {
                AgentsError::Conflict(format!("agent {agent:?} has no version with traffic"))
            })?,
        };
        let info = self.version_info(agent, version).await?;
        let id = format!("sess_{}", random_hex(12));
        tracing::Span::current().record("hangar.session.id", id.as_str());
        let now = now_rfc3339();
        let row = SessionRow {
            id: id.clone(),
            agent: agent.to_owned(),
            version,
            isolation_key: isolation_key.to_owned(),
            state: SessionState::Creating.as_str().into(),
            sandbox_id: None,
            created_at: now.clone(),
            last_activity: now,
            checkpoint: None,
            error: None,
        };
        self.inner.store.create_session(&row).await?;
        let live = self.add_live(&row, SessionState::Creating);
        let guard = live.lock.lock().await;
        if let Err(e) = self.make_room(&live.id).await {
            // Nothing was made for it: no failed session is left behind either.
            drop(guard);
            self.forget(&live.id).await;
            return Err(e);
        }
        let result = async {
            let spec = &info.spec;
            let token = self.mint_token(&live).await?;
            let mut env = spec.env.clone();
            if token.is_some() {
                env.insert(
                    "HANGAR_TOKEN_FILE".into(),
                    format!(
                        "{}/{}",
                        hangar_proto::init::RUN_DIR_IN_SANDBOX,
                        hangar_proto::init::TOKEN_FILE
                    ),
                );
                env.insert(
                    "HANGAR_TOKEN_ENDPOINT".into(),
                    identity::TOKEN_ENDPOINT_IN_SANDBOX.into(),
                );
            }
            env.insert("PORT".into(), spec.port.to_string());
            env.insert("FOUNDRY_AGENT_NAME".into(), agent.to_owned());
            env.insert("FOUNDRY_AGENT_VERSION".into(), version.to_string());
            env.insert("FOUNDRY_AGENT_ID".into(), format!("{agent}:{version}"));
            env.insert("FOUNDRY_AGENT_SESSION_ID".into(), id.clone());
            // Not FOUNDRY_HOSTING_ENVIRONMENT: the azure-ai-agentserver packages take any
            // value of it to mean Foundry's cloud and then refuse to start without a Foundry
            // project endpoint. Agents learn where they run from HANGAR_SESSION_ID instead.
            env.insert("HANGAR_SESSION_ID".into(), id.clone());
            // The agent's own spans go to Hangar (through its proxy), which keeps them beside
            // its own and forwards them; an agent.yaml that names a collector keeps it.
            for (k, v) in [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://hangar.internal"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_SERVICE_NAME", agent),
            ] {
                env.entry(k.into()).or_insert_with(|| v.into());
            }
            let start = tracing::info_span!(
                target: "hangar::trace",
                "start_sandbox",
                hangar.driver = %spec.isolation.as_str(),
                hangar.sandbox.id = tracing::field::Empty,
            );
            let sb = self
                .inner
                .sandboxes
                .create(CreateSandbox {
                    driver: spec.isolation,
                    image: info.layout.clone(),
                    resources: spec.resources.to_sandbox(),
                    env,
                    egress: Egress {
                        policy: spec.network.egress,
                        allow: spec.network.allow.clone(),
                        attach: spec.network.attach.clone(),
                    },
                    command: None,
                    inject: injections(agent, spec),
                    token,
                    dlp: (!spec.guardrails.is_empty()
                        && spec.guardrails.egress == hangar_proto::agent::EgressAction::Block)
                        .then(|| hangar_proto::sandbox::EgressDlp {
                            detectors: spec.guardrails.detectors.clone(),
                            patterns: spec.guardrails.patterns.clone(),
                        }),
                })
                .instrument(start.clone())
                .await?;
            start.record("hangar.sandbox.id", sb.id.as_str());
            let started = async {
                self.inner
                    .store
                    .set_session_state(
                        &id,
                        SessionState::Creating.as_str(),
                        Some(&sb.id),
                        None,
                        None,
                    )
                    .await?;
                self.wait_agent(&sb.id, spec.startup_timeout.0).await?;
                self.set_state(&live, SessionState::Running, Some(&sb.id), None, None)
                    .await
            }
            .await;
            if let Err(e) = started {
                let _ = self.inner.sandboxes.delete(&sb.id).await;
                return Err(e);
            }
            Ok::<_, AgentsError>(sb.id)
        }
        .await;
        match result {
            Ok(sandbox) => {
                live.touch();
                tracing::info!(session = %id, agent, version, %sandbox, "session created");
                let lease = lease.then(|| self.lease(&live, &sandbox));
                drop(guard);
                Ok((live, lease))
            }
            Err(e) => {
                let (stored, told) = match e {
                    AgentsError::Agent(m) => {
                        // The agent's log is for the operator (the session's error), not
                        // for the end user whose request failed.
                        let short = m.split("; the agent's log ends with:").next().unwrap_or(&m);
                        let told = AgentsError::Agent(format!(
                            "session {id} failed to start: {short} (its log is in the session's error)"
                        ));
                        (m, told)
                    }
                    e => (e.to_string(), e),
                };
                tracing::warn!(session = %id, agent, error = %stored, "session failed to start");
                self.set_state(&live, SessionState::Failed, None, None, Some(&stored))
                    .await?;
                Err(told)
            }
        }
    }

    /// Counts a request in (the caller holds the session's lock, and it is running).
    fn lease(&self, live: &Arc<Live>, sandbox: &str) -> Lease {
        live.inflight.fetch_add(1, Ordering::AcqRel);
        live.touch();
        Lease {
            socket: self.inner.sandboxes.agent_socket(sandbox),
            session_id: live.id.clone(),
            agent: live.agent.clone(),
            version: live.version,
            live: live.clone(),
        }
    }

    /// Drops a session that never got a sandbox, from the store and from memory.
    async fn forget(&self, id: &str) {
        if let Err(e) = self.inner.store.delete_session(id).await {
            tracing::warn!(session = %id, error = %e, "cannot remove a session that was never made");
        }
        self.inner.live.lock().unwrap().remove(id);
    }

    /// Waits for the agent's readiness, failing early if its process cannot start.
    async fn wait_agent(&self, sandbox: &str, timeout: Duration) -> Result<(), AgentsError> {
        let socket = self.inner.sandboxes.agent_socket(sandbox);
        let sandboxes = &self.inner.sandboxes;
        let waited = agent_link::wait_ready(&socket, timeout, || async move {
            let link = sandboxes
                .running_link(sandbox)
                .await
                .map_err(|e| e.to_string())?;
            let health = link.health().await.map_err(|e| e.to_string())?;
            if health.agent.state == hangar_proto::init::AgentState::Failed {
                return Err(format!(
                    "the agent process cannot start: {}",
                    health.agent.last_error.unwrap_or_default()
                ));
            }
            Ok(())
        })
        .await;
        waited.map_err(|e| {
            let log = self.inner.sandboxes.console_tail(sandbox, 20);
            AgentsError::Agent(if log.is_empty() {
                e
            } else {
                format!("{e}; the agent's log ends with:\n{log}")
            })
        })
    }

    async fn set_state(
        &self,
        live: &Live,
        state: SessionState,
        sandbox: Option<&str>,
        checkpoint: Option<&Checkpoint>,
        error: Option<&str>,
    ) -> Result<(), AgentsError> {
        let checkpoint =
            checkpoint.map(|c| serde_json::to_value(c).expect("checkpoint serialises"));
        self.inner
            .store
            .set_session_state(
                &live.id,
                state.as_str(),
                sandbox,
                checkpoint.as_ref(),
                error,
            )
            .await?;
        *live.state.lock().unwrap() = state;
        *live.sandbox.lock().unwrap() = sandbox.map(str::to_owned);
        Ok(())
    }

    /// Suspends least recently used idle sessions until a new sandbox fits under the cap.
    /// A victim that is busy or cannot be suspended is passed over; when none is left, or
    /// room does not appear within a few seconds, the answer is "no capacity".
    async fn make_room(&self, except: &str) -> Result<(), AgentsError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut passed_over: std::collections::HashSet<String> = Default::default();
        loop {
            let mut running: Vec<Arc<Live>> = self
                .all_live()
                .into_iter()
                .filter(|l| {
                    l.id != except
                        && matches!(
                            l.state(),
                            SessionState::Running
                                | SessionState::Creating
                                | SessionState::Resuming
                                | SessionState::Suspending
                        )
                })
                .collect();
            if running.len() < self.inner.cfg.max_running {
                return Ok(());
            }
            let suspending = running
                .iter()
                .any(|l| l.state() == SessionState::Suspending);
            running.retain(|l| {
                l.state() == SessionState::Running
                    && l.inflight.load(Ordering::Acquire) == 0
                    && !passed_over.contains(&l.id)
            });
            running.sort_by_key(|l| l.last_activity());
            let victim = match running.first() {
                Some(v) => v.clone(),
                // Someone else's suspension frees a slot soon: wait for it.
                None if suspending && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                None => {
                    return Err(AgentsError::Capacity(format!(
                        "this node runs its maximum of {} sandboxes and all of them are busy; try again shortly",
                        self.inner.cfg.max_running
                    )))
                }
            };
            tracing::info!(session = %victim.id, "suspending the least recently used session to make room");
            match self.suspend_if_idle(&victim, None).await {
                Ok(Some(())) => {}
                // Taken by a request, or in another transition, or it would not suspend.
                Ok(None) | Err(_) => {
                    passed_over.insert(victim.id.clone());
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// Finds the session a data-plane request belongs to, creating one if nothing names
    /// one, and makes sure it runs. `created` tells whether it is new.
    pub async fn route(
        &self,
        agent: &str,
        isolation_key: &str,
        route: &Route,
    ) -> Result<(Lease, bool), AgentsError> {
        if let Some(id) = &route.session_id {
            let lease = self.acquire(agent, id, isolation_key).await?;
            return Ok((lease, false));
        }
        if let Some(resp) = &route.previous_response_id {
            let id = self
                .inner
                .store
                .session_by_ref(agent, isolation_key, RefKind::Response, resp)
                .await?
                .ok_or_else(|| AgentsError::NotFound(format!("no response {resp:?}")))?;
            let lease = self
                .acquire(agent, &id, isolation_key)
                .await
                .map_err(|e| match e {
                    AgentsError::NotFound(_) => {
                        AgentsError::NotFound(format!("no response {resp:?}"))
                    }
                    e => e,
                })?;
            return Ok((lease, false));
        }
        if let Some(conv) = &route.conversation {
            // Conversation ids are per isolation key: another user's id of the same spelling
            // is simply a different conversation.
            if let Some(id) = self
                .inner
                .store
                .session_by_ref(agent, isolation_key, RefKind::Conversation, conv)
                .await?
            {
                if self.live(&id).is_some() {
                    let lease = self.acquire(agent, &id, isolation_key).await?;
                    return Ok((lease, false));
                }
            }
        }
        // Its lease is taken as it is made, so that nothing can suspend it before this
        // request reaches it.
        let (_, lease) = self
            .spawn_new_session(agent, isolation_key, None, true)
            .await?;
        let lease = lease.expect("a lease was asked for");
        if let Some(conv) = &route.conversation {
            // Two first requests of one conversation may race: the first binding wins, and
            // the loser's request still gets its answer from its own new session.
            self.remember(
                agent,
                isolation_key,
                RefKind::Conversation,
                conv,
                &lease.session_id,
            )
            .await?;
        }
        Ok((lease, true))
    }

    /// The session of a mapped protocol's conversation (`protocol` is `ag-ui` or `activity`),
    /// running; a conversation seen for the first time, or whose session is gone, gets a new
    /// session.
    pub async fn route_thread(
        &self,
        agent: &str,
        isolation_key: &str,
        protocol: &str,
        thread: &str,
    ) -> Result<Thread, AgentsError> {
        let key = ThreadKey {
            agent,
            isolation_key,
            protocol,
            thread,
        };
        if let Some(row) = self.inner.store.thread(&key).await? {
            // A failed session keeps its files for the operator, but its conversation goes
            // on in a new one.
            let usable = self
                .live(&row.session_id)
                .is_some_and(|l| *l.state.lock().unwrap() != SessionState::Failed);
            if usable {
                match self.acquire(agent, &row.session_id, isolation_key).await {
                    Ok(lease) => {
                        return Ok(Thread {
                            lease,
                            last_response_id: row.last_response_id,
                            last_message_id: row.last_message_id,
                        })
                    }
                    Err(AgentsError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let (_, lease) = self
            .spawn_new_session(agent, isolation_key, None, true)
            .await?;
        let lease = lease.expect("a lease was asked for");
        let row = ThreadRow {
            session_id: lease.session_id.clone(),
            last_response_id: None,
            last_message_id: None,
        };
        self.inner
            .store
            .put_thread(&key, &row, &now_rfc3339())
            .await?;
        Ok(Thread {
            lease,
            last_response_id: None,
            last_message_id: None,
        })
    }

    /// Records where a mapped conversation stands after a turn in `session`.
    pub async fn thread_turn(
        &self,
        agent: &str,
        isolation_key: &str,
        protocol: &str,
        thread: &str,
        row: &ThreadRow,
    ) -> Result<(), AgentsError> {
        let key = ThreadKey {
            agent,
            isolation_key,
            protocol,
            thread,
        };
        self.inner
            .store
            .put_thread(&key, row, &now_rfc3339())
            .await?;
        Ok(())
    }

    /// The spec of the newest version that takes traffic: where the agent's settings for
    /// its endpoint (its channels, the protocols to map onto) come from. A version deployed
    /// with no traffic changes nothing until it gets some.
    pub async fn serving_spec(&self, agent: &str) -> Result<AgentSpec, AgentsError> {
        self.require_agent(agent).await?;
        let newest = self
            .inner
            .store
            .traffic(agent)
            .await?
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(v, _)| v)
            .max()
            .ok_or_else(|| {
                AgentsError::NotFound(format!("agent {agent:?} has no version taking traffic"))
            })?;
        Ok(self.version_info(agent, newest).await?.spec.clone())
    }

    /// The session that made response `response`, running, for `GET/DELETE .../responses/{id}`.
    pub async fn route_response(
        &self,
        agent: &str,
        isolation_key: &str,
        response: &str,
    ) -> Result<Lease, AgentsError> {
        self.require_agent(agent).await?;
        let not_found = || AgentsError::NotFound(format!("no response {response:?}"));
        let id = self
            .inner
            .store
            .session_by_ref(agent, isolation_key, RefKind::Response, response)
            .await?
            .ok_or_else(not_found)?;
        self.acquire(agent, &id, isolation_key)
            .await
            .map_err(|e| match e {
                AgentsError::NotFound(_) => not_found(),
                e => e,
            })
    }

    pub async fn remember(
        &self,
        agent: &str,
        isolation_key: &str,
        kind: RefKind,
        reference: &str,
        session: &str,
    ) -> Result<(), AgentsError> {
        self.inner
            .store
            .put_ref(
                agent,
                isolation_key,
                kind,
                reference,
                session,
                &now_rfc3339(),
            )
            .await?;
        Ok(())
    }

    /// Holds session `id` (of `agent`, owned by `isolation_key`) running for one request,
    /// resuming it if it is suspended.
    pub async fn acquire(
        &self,
        agent: &str,
        id: &str,
        isolation_key: &str,
    ) -> Result<Lease, AgentsError> {
        // Every session is in memory: no store round trip on the data plane's hot path.
        let live = self
            .live(id)
            .filter(|l| l.agent == agent && l.isolation_key == isolation_key)
            .ok_or_else(|| no_session(id))?;
        self.hold_live(live).await
    }

    async fn hold(&self, row: &SessionRow) -> Result<Lease, AgentsError> {
        let live = self.live(&row.id).ok_or_else(|| no_session(&row.id))?;
        self.hold_live(live).await
    }

    async fn hold_live(&self, live: Arc<Live>) -> Result<Lease, AgentsError> {
        // On a task of its own: a resume runs to its end even if the request goes away.
        let me = self.clone();
        detached(async move {
            let guard = live.lock.lock().await;
            match live.state() {
                SessionState::Running => {}
                SessionState::Suspended => me.resume_locked(&live).await?,
                SessionState::Failed => {
                    let row = me
                        .inner
                        .store
                        .session(&live.id)
                        .await?
                        .ok_or_else(|| no_session(&live.id))?;
                    let error = row.error.unwrap_or_else(|| "unknown error".into());
                    let short = error
                        .split("; the agent's log ends with:")
                        .next()
                        .unwrap_or_default();
                    return Err(AgentsError::Agent(format!(
                        "session {} failed: {short}",
                        live.id
                    )));
                }
                SessionState::Deleted => return Err(no_session(&live.id)),
                s => {
                    return Err(AgentsError::Conflict(format!(
                        "session {} is {s}; try again",
                        live.id
                    )))
                }
            }
            let sandbox = live
                .sandbox
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| no_session(&live.id))?;
            let lease = me.lease(&live, &sandbox);
            drop(guard);
            Ok(lease)
        })
        .await
    }

    #[tracing::instrument(
        name = "resume_session",
        target = "hangar::trace",
        skip_all,
        fields(
            gen_ai.agent.name = %live.agent,
            hangar.session.id = %live.id,
            hangar.resume.mode = tracing::field::Empty,
        )
    )]
    async fn resume_locked(&self, live: &Live) -> Result<(), AgentsError> {
        let row = self
            .inner
            .store
            .session(&live.id)
            .await?
            .ok_or_else(|| no_session(&live.id))?;
        let sandbox = row.sandbox_id.clone().ok_or_else(|| no_session(&live.id))?;
        let info = self.version_info(&live.agent, live.version).await?;
        // Take the slot first (Resuming counts as running), then make room for it: two
        // resumes at once cannot both see the same free slot.
        self.set_state(live, SessionState::Resuming, Some(&sandbox), None, None)
            .await?;
        if let Err(e) = self.make_room(&live.id).await {
            let cp: Option<Checkpoint> = row
                .checkpoint
                .as_ref()
                .and_then(|c| serde_json::from_value(c.clone()).ok());
            self.set_state(
                live,
                SessionState::Suspended,
                Some(&sandbox),
                cp.as_ref(),
                None,
            )
            .await?;
            return Err(e);
        }
        let resumed = async {
            // The sandbox gets a fresh token as it resumes: the one it held may have expired
            // while it was suspended. Recorded first (a cold start writes it before the agent
            // starts), then handed to the running sandbox (a restored memory holds the old).
            let token = self.mint_token(live).await?;
            if let Some(t) = &token {
                self.inner.sandboxes.set_token(&sandbox, t.clone()).await?;
            }
            let restore = tracing::info_span!(
                target: "hangar::trace",
                "restore_sandbox",
                hangar.driver = %info.spec.isolation.as_str(),
                hangar.sandbox.id = %sandbox,
                hangar.resume.mode = tracing::field::Empty,
                hangar.resume.note = tracing::field::Empty,
            );
            let sb = self
                .inner
                .sandboxes
                .resume(&sandbox)
                .instrument(restore.clone())
                .await?;
            if let Some(r) = &sb.last_resume {
                let mode = serde_json::to_value(r.mode).unwrap_or_default();
                let mode = mode.as_str().unwrap_or_default();
                restore.record("hangar.resume.mode", mode);
                tracing::Span::current().record("hangar.resume.mode", mode);
                if let Some(note) = &r.note {
                    restore.record("hangar.resume.note", note.as_str());
                }
                let detail =
                    serde_json::json!({"mode": mode, "took_ms": r.took_ms, "note": r.note});
                if let Err(e) = self
                    .inner
                    .store
                    .session_event(&live.id, &r.at, "restored", Some(&detail))
                    .await
                {
                    tracing::warn!(session = %live.id, error = %e, "cannot record the resume");
                }
            }
            // Minted again: a resume can take longer than a short token lives (a failed
            // restore falls back to a cold start).
            if token.is_some() {
                if let Some(t) = self.mint_token(live).await? {
                    self.hand_token(live, &sandbox, t).await;
                }
            }
            self.wait_agent(&sandbox, info.spec.startup_timeout.0).await
        }
        .await;
        match resumed {
            Ok(()) => {
                self.set_state(live, SessionState::Running, Some(&sandbox), None, None)
                    .await?;
                tracing::info!(session = %live.id, %sandbox, "session resumed");
                Ok(())
            }
            Err(e) => {
                // The files are intact whatever failed: stay suspended, so that a later
                // request tries again, and say why.
                let _ = self.inner.sandboxes.suspend(&sandbox).await;
                let state = match self.inner.sandboxes.get(&sandbox).await {
                    Ok(sb) if sb.state == SandboxState::Running => SessionState::Running,
                    _ => SessionState::Suspended,
                };
                self.set_state(
                    live,
                    state,
                    Some(&sandbox),
                    row.checkpoint
                        .as_ref()
                        .and_then(|c| serde_json::from_value(c.clone()).ok())
                        .as_ref(),
                    Some(&e.to_string()),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// Suspends `live` if no request holds it. `None` if it was busy or not running.
    async fn suspend_if_idle(
        &self,
        live: &Live,
        idle_for: Option<Duration>,
    ) -> Result<Option<()>, AgentsError> {
        let Ok(_guard) = live.lock.try_lock() else {
            return Ok(None);
        };
        if live.state() != SessionState::Running || live.inflight.load(Ordering::Acquire) != 0 {
            return Ok(None);
        }
        if let Some(idle) = idle_for {
            let since = SystemTime::now()
                .duration_since(live.last_activity())
                .unwrap_or_default();
            if since < idle {
                return Ok(None);
            }
        }
        self.suspend_locked(live).await.map(Some)
    }

    async fn suspend_locked(&self, live: &Live) -> Result<(), AgentsError> {
        let row = self
            .inner
            .store
            .session(&live.id)
            .await?
            .ok_or_else(|| no_session(&live.id))?;
        let sandbox = row.sandbox_id.clone().ok_or_else(|| no_session(&live.id))?;
        self.flush_activity(live).await?;
        self.set_state(live, SessionState::Suspending, Some(&sandbox), None, None)
            .await?;
        match self.inner.sandboxes.suspend(&sandbox).await {
            Ok(sb) => {
                self.set_state(
                    live,
                    SessionState::Suspended,
                    Some(&sandbox),
                    sb.checkpoint.as_ref(),
                    None,
                )
                .await?;
                tracing::info!(session = %live.id, %sandbox, mode = ?sb.checkpoint.as_ref().map(|c| c.mode), "session suspended");
                Ok(())
            }
            Err(e) => {
                let state = match self.inner.sandboxes.get(&sandbox).await {
                    Ok(sb) if sb.state == SandboxState::Running => SessionState::Running,
                    Ok(_) => SessionState::Suspended,
                    Err(_) => SessionState::Failed,
                };
                self.set_state(live, state, Some(&sandbox), None, Some(&e.to_string()))
                    .await?;
                Err(e.into())
            }
        }
    }

    async fn flush_activity(&self, live: &Live) -> Result<(), AgentsError> {
        if live.dirty.swap(false, Ordering::AcqRel) {
            let t = humantime::format_rfc3339_millis(live.last_activity()).to_string();
            self.inner.store.touch_session(&live.id, &t).await?;
        }
        Ok(())
    }

    /// A session, as `isolation_key` sees it (`None`: the operator, who sees every session).
    async fn owned(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<SessionRow, AgentsError> {
        let row = match isolation_key {
            Some(k) => self.inner.store.session_for(id, k).await?,
            None => self.inner.store.session(id).await?,
        };
        row.ok_or_else(|| no_session(id))
    }

    /// The agent a session belongs to, as `isolation_key` sees it (a cheap ownership check).
    pub async fn session_agent(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<String, AgentsError> {
        Ok(self.owned(id, isolation_key).await?.agent)
    }

    pub async fn session(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<Session, AgentsError> {
        self.session_view(id, isolation_key).await
    }

    async fn session_view(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<Session, AgentsError> {
        let row = self.owned(id, isolation_key).await?;
        let mut s = self.row_view(&row);
        if matches!(s.state, SessionState::Running | SessionState::Idle) {
            if let Some(sb) = &row.sandbox_id {
                if let Ok(link) = self.inner.sandboxes.running_link(sb).await {
                    s.agent_process = link.health().await.ok().map(|h| h.agent);
                }
            }
        }
        Ok(s)
    }

    fn view_state(&self, live: &Live) -> SessionState {
        match live.state() {
            SessionState::Running if live.inflight.load(Ordering::Acquire) == 0 => {
                SessionState::Idle
            }
            s => s,
        }
    }

    fn row_view(&self, row: &SessionRow) -> Session {
        let live = self.live(&row.id);
        let state = match &live {
            Some(l) => self.view_state(l),
            None => row.state.parse().unwrap_or(SessionState::Failed),
        };
        let last_activity = match &live {
            Some(l) => humantime::format_rfc3339_millis(l.last_activity()).to_string(),
            None => row.last_activity.clone(),
        };
        Session {
            id: row.id.clone(),
            agent: row.agent.clone(),
            version: row.version,
            isolation_key: row.isolation_key.clone(),
            state,
            sandbox: row.sandbox_id.clone(),
            created_at: row.created_at.clone(),
            last_activity,
            checkpoint: row
                .checkpoint
                .as_ref()
                .and_then(|c| serde_json::from_value(c.clone()).ok()),
            error: row.error.clone(),
            agent_process: None,
        }
    }

    pub async fn sessions(
        &self,
        agent: &str,
        isolation_key: Option<&str>,
    ) -> Result<Vec<Session>, AgentsError> {
        self.require_agent(agent).await?;
        Ok(self
            .inner
            .store
            .sessions(agent, isolation_key)
            .await?
            .iter()
            .map(|r| self.row_view(r))
            .collect())
    }

    /// The running sandbox of a session, resumed if needed, for exec and files. The lease
    /// keeps it from being suspended while the caller uses it.
    pub async fn sandbox_of(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<(Lease, String), AgentsError> {
        let row = self.owned(id, isolation_key).await?;
        let lease = self.hold(&row).await?;
        let sandbox = self
            .inner
            .store
            .session(id)
            .await?
            .and_then(|r| r.sandbox_id)
            .ok_or_else(|| no_session(id))?;
        Ok((lease, sandbox))
    }

    /// The agent and session whose sandbox `sandbox` is, if it is a session's.
    pub fn session_of_sandbox(&self, sandbox: &str) -> Option<(String, String)> {
        self.inner
            .live
            .lock()
            .unwrap()
            .values()
            .find(|l| l.sandbox.lock().unwrap().as_deref() == Some(sandbox))
            .map(|l| (l.agent.clone(), l.id.clone()))
    }

    /// The console log of a session's sandbox (the agent's stdout and stderr).
    pub async fn log_path(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<PathBuf, AgentsError> {
        let row = self.owned(id, isolation_key).await?;
        let sandbox = row
            .sandbox_id
            .ok_or_else(|| AgentsError::Conflict(format!("session {id} has no sandbox (yet)")))?;
        Ok(self.inner.sandboxes.console_log(&sandbox))
    }

    pub async fn suspend_session(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<Session, AgentsError> {
        self.owned(id, isolation_key).await?;
        let live = self.live(id).ok_or_else(|| no_session(id))?;
        let me = self.clone();
        detached(async move {
            let _guard = live.lock.lock().await;
            match live.state() {
                SessionState::Suspended => Ok(()),
                SessionState::Running => {
                    if live.inflight.load(Ordering::Acquire) != 0 {
                        return Err(AgentsError::Conflict(format!(
                            "session {} is serving a request; suspend it when it is idle",
                            live.id
                        )));
                    }
                    me.suspend_locked(&live).await
                }
                s => Err(AgentsError::Conflict(format!(
                    "session {} is {s} and cannot be suspended",
                    live.id
                ))),
            }
        })
        .await?;
        self.session_view(id, isolation_key).await
    }

    pub async fn resume_session(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<Session, AgentsError> {
        let row = self.owned(id, isolation_key).await?;
        drop(self.hold(&row).await?);
        self.session_view(id, isolation_key).await
    }

    pub async fn delete_session(
        &self,
        id: &str,
        isolation_key: Option<&str>,
    ) -> Result<(), AgentsError> {
        self.owned(id, isolation_key).await?;
        let live = self.live(id).ok_or_else(|| no_session(id))?;
        let me = self.clone();
        detached(async move {
            let _guard = live.lock.lock().await;
            me.delete_locked(&live).await
        })
        .await
    }

    /// Deletes a session whose retention has passed, unless a request came in meanwhile.
    /// Never waits for a session's lock (the scheduler must not stall behind a resume).
    async fn delete_if_expired(
        &self,
        live: &Arc<Live>,
        retention: Duration,
    ) -> Result<bool, AgentsError> {
        let Ok(_guard) = live.lock.try_lock() else {
            return Ok(false);
        };
        let idle = SystemTime::now()
            .duration_since(live.last_activity())
            .unwrap_or_default();
        if live.inflight.load(Ordering::Acquire) != 0 || idle < retention {
            return Ok(false);
        }
        self.delete_locked(live).await.map(|()| true)
    }

    /// Deletes the session's sandbox, then its row. The caller holds the session's lock. A
    /// deletion that failed half way (state `deleted`, sandbox still there) is finished.
    async fn delete_locked(&self, live: &Arc<Live>) -> Result<(), AgentsError> {
        let id = &live.id;
        // Read under the lock: a creation that just finished has set the sandbox.
        let row = self
            .inner
            .store
            .session(id)
            .await?
            .ok_or_else(|| no_session(id))?;
        self.set_state(
            live,
            SessionState::Deleted,
            row.sandbox_id.as_deref(),
            None,
            None,
        )
        .await?;
        if let Some(sb) = &row.sandbox_id {
            match self.inner.sandboxes.delete(sb).await {
                Ok(()) | Err(SandboxError::NotFound(_)) => {}
                // The row stays (state deleted), and a next attempt finishes the job.
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.store.delete_session(id).await?;
        self.inner.live.lock().unwrap().remove(id);
        tracing::info!(session = %id, "session deleted");
        Ok(())
    }
}

/// Runs `f` on a task of its own and waits for it: a transition started for a request goes
/// to its end even if the request is dropped (its client went away) meanwhile.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, AgentsError>> + Send + 'static,
) -> Result<T, AgentsError> {
    // The task stays in the caller's span (a request's trace shows its session's work).
    tokio::spawn(tracing::Instrument::in_current_span(f))
        .await
        .map_err(|e| {
            AgentsError::Sandbox(SandboxError::Internal(format!("session task failed: {e}")))
        })?
}

fn version_view(row: VersionRow) -> Result<Version, AgentsError> {
    Ok(Version {
        spec: serde_json::from_value(row.spec)
            .map_err(|e| AgentsError::Store(hangar_store::StoreError::Json(e)))?,
        agent: row.agent,
        number: row.number,
        image: row.image_id,
        created_at: row.created_at,
        unchanged: false,
    })
}

/// What the egress proxy of `agent`'s sessions adds to requests (`network.inject`).
fn injections(agent: &str, spec: &AgentSpec) -> Vec<SecretInjection> {
    spec.network
        .inject
        .iter()
        .map(|i| SecretInjection {
            hosts: i.hosts.clone(),
            header: i.header.clone(),
            format: i.format(),
            secret: SecretVault::reference(agent, &i.secret),
            tls: i.tls,
        })
        .collect()
}

/// The detectors of a spec's guardrails, built; `None` without guardrails.
fn output_guard(spec: &AgentSpec) -> Result<Option<Arc<OutputGuard>>, String> {
    let g = &spec.guardrails;
    if g.is_empty() {
        return Ok(None);
    }
    let scanner = hangar_dlp::Scanner::from_config(&g.detectors, &g.patterns)
        .map_err(|e| format!("guardrails: {e}"))?;
    Ok(Some(Arc::new(OutputGuard {
        scanner,
        action: g.output,
    })))
}

/// How long after a failed token renewal the next is tried.
const TOKEN_RETRY: Duration = Duration::from_secs(5);

/// Why a token exchange was refused, as RFC 6749's error codes.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// `invalid_grant`: the subject token is bad or not this sandbox's.
    #[error("{0}")]
    Grant(String),
    /// `invalid_target`: the audience.
    #[error("{0}")]
    Target(String),
    /// The server cannot issue tokens.
    #[error("{0}")]
    Unavailable(String),
}

fn no_agent(name: &str) -> AgentsError {
    AgentsError::NotFound(format!("no agent {name:?}"))
}

fn no_session(id: &str) -> AgentsError {
    AgentsError::NotFound(format!("no session {id:?}"))
}

/// Picks a version by weight (the split sums to 100).
fn pick_version(split: &[(i64, i64)]) -> Option<i64> {
    let total: i64 = split.iter().map(|(_, w)| w).sum();
    if total <= 0 {
        return None;
    }
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    let mut r = (u64::from_le_bytes(b) % total as u64) as i64;
    for (v, w) in split {
        if r < *w {
            return Some(*v);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn weighted_pick_follows_weights_and_skips_zero() {
        let split = [(1, 90), (2, 10), (3, 0)];
        let mut counts = [0usize; 4];
        for _ in 0..10_000 {
            counts[super::pick_version(&split).unwrap() as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        assert!((8700..=9300).contains(&counts[1]), "{counts:?}");
        assert_eq!(super::pick_version(&[(1, 0)]), None);
    }
}

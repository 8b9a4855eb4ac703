//! Agents, versions, traffic, sessions and images: the API of `/v1/agents`, `/v1/sessions`
//! and `/v1/images`, and [`AgentSpec`], the typed form of `agent.yaml`.
//!
//! `agent.yaml` is parsed by the CLI (which can name the line of a mistake) into an
//! [`AgentSpec`] and sent as JSON; the server parses the same type with unknown keys
//! refused, so a spec is validated the same way whichever way it arrives.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sandbox::{Checkpoint, DriverKind, EgressPolicyKind};

/// `agent.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// A DNS label: lowercase letters, digits and `-`, 1 to 63 characters.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub build: BuildSpec,
    /// The protocols the container implements natively.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    pub isolation: DriverKind,
    #[serde(default)]
    pub resources: AgentResources,
    /// Scale to zero after this long without a request.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// How long a session (and its volume) is kept after its last request.
    #[serde(default = "default_retention")]
    pub session_retention: HumanDuration,
    /// How long a new sandbox may take before `GET /readiness` answers 200.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: HumanDuration,
    /// The port the agent listens on inside its sandbox (`PORT` is set to it).
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Network,
    /// How users reach the agent over protocols it does not implement itself.
    #[serde(default, skip_serializing_if = "Channels::is_empty")]
    pub channels: Channels,
    /// Data-loss detectors on the agent's answers and its sandboxes' egress.
    #[serde(default, skip_serializing_if = "Guardrails::is_empty")]
    pub guardrails: Guardrails,
}

/// `guardrails:` in agent.yaml: detectors (built-ins by name, custom regular expressions by
/// name) and what a hit does to an answer and to an egress request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Guardrails {
    /// Built-in detectors: `card_number`, `private_key`, `cloud_key`, `email`.
    pub detectors: Vec<String>,
    /// Custom detectors: name → regular expression.
    pub patterns: BTreeMap<String, String>,
    /// What a hit in the agent's answer does.
    pub output: OutputAction,
    /// What a hit in the body of a plain-HTTP egress request does.
    pub egress: EgressAction,
}

impl Guardrails {
    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty() && self.patterns.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputAction {
    /// Each hit is replaced by `[REDACTED:<detector>]`.
    #[default]
    Redact,
    /// An answer with a hit is withheld: the caller gets an error instead.
    Block,
    /// Hits are only audited.
    Off,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EgressAction {
    /// A request whose body has a hit is refused (403).
    #[default]
    Block,
    /// Egress bodies are not inspected.
    Off,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Responses]
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 60))
}
fn default_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 24 * 3600))
}
fn default_startup_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_port() -> u16 {
    crate::init::DEFAULT_AGENT_PORT
}

impl AgentSpec {
    /// Checks what serde cannot: the name, ranges, exactly one build source.
    pub fn validate(&self) -> Result<(), String> {
        valid_agent_name(&self.name)?;
        self.build.source()?;
        let r = &self.resources;
        if !(r.cpus > 0.0 && r.cpus <= 256.0) {
            return Err(format!(
                "resources.cpus must be > 0 and <= 256, not {}",
                r.cpus
            ));
        }
        if r.memory.0 < 16 * MIB {
            return Err("resources.memory must be at least 16Mi".into());
        }
        if r.disk.0 < 16 * MIB {
            return Err("resources.disk must be at least 16Mi".into());
        }
        if r.pids < 8 {
            return Err("resources.pids must be at least 8".into());
        }
        if self.idle_timeout.0 < Duration::from_secs(1) {
            return Err("idle_timeout must be at least 1s".into());
        }
        if self.session_retention.0 < self.idle_timeout.0 {
            return Err("session_retention must not be shorter than idle_timeout".into());
        }
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        if self.protocols.is_empty() {
            return Err("protocols must name at least one protocol".into());
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("env key {k:?} is not a valid variable name"));
            }
        }
        if let Some(a) = &self.channels.activity {
            a.validate()?;
        }
        self.network.validate()?;
        Ok(())
    }
}

/// Agent names become URL path segments and, later, DNS labels.
pub fn valid_agent_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent name {name:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        ))
    }
}

/// Where the image comes from: exactly one of the fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// A Dockerfile, relative to `context` (default: the agent's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// An image already in Hangar's store, by name or id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An OCI image layout directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// A plain root filesystem directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildSource<'a> {
    Dockerfile(&'a str),
    Image(&'a str),
    Oci(&'a str),
    Rootfs(&'a str),
}

impl BuildSpec {
    pub fn source(&self) -> Result<BuildSource<'_>, String> {
        let mut found = vec![];
        if let Some(d) = &self.dockerfile {
            found.push(BuildSource::Dockerfile(d));
        }
        if let Some(d) = &self.image {
            found.push(BuildSource::Image(d));
        }
        if let Some(d) = &self.oci {
            found.push(BuildSource::Oci(d));
        }
        if let Some(d) = &self.rootfs {
            found.push(BuildSource::Rootfs(d));
        }
        if self.context.is_some() && self.dockerfile.is_none() {
            return Err("build.context only goes with build.dockerfile".into());
        }
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err("build needs one of dockerfile, image, oci or rootfs".into()),
            _ => Err("build takes only one of dockerfile, image, oci or rootfs".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Responses,
    Invocations,
    Activity,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentResources {
    pub cpus: f64,
    pub memory: ByteSize,
    pub disk: ByteSize,
    pub pids: u64,
}

impl Default for AgentResources {
    fn default() -> Self {
        AgentResources {
            cpus: 1.0,
            memory: ByteSize(512 * MIB),
            disk: ByteSize(2048 * MIB),
            pids: 512,
        }
    }
}

impl AgentResources {
    pub fn to_sandbox(&self) -> crate::sandbox::Resources {
        crate::sandbox::Resources {
            cpus: self.cpus,
            memory_mib: self.memory.0.div_ceil(MIB),
            disk_mib: self.disk.0.div_ceil(MIB),
            pids: self.pids,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub egress: EgressPolicyKind,
    pub allow: Vec<String>,
    /// A host network namespace (`ip netns add NAME`) that the egress proxy connects from:
    /// the operator's route out for this agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// Secrets the egress proxy adds to the agent's requests to some hosts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<Inject>,
}

/// `network.inject[]` in agent.yaml: the agent calls `http://HOST/...` through its proxy
/// without credentials, and the request leaves with the secret in a header (over TLS that
/// Hangar makes, unless `tls: false`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    /// The name of an agent secret (`hangar secrets set AGENT NAME`).
    pub secret: String,
    /// Host patterns as in `allow`; each must also be allowed by the egress policy.
    pub hosts: Vec<String>,
    #[serde(default = "default_inject_header")]
    pub header: String,
    /// The header's value with `{value}` for the secret. Default: `Bearer {value}` for
    /// `Authorization`, else `{value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default = "default_true")]
    pub tls: bool,
}

fn default_inject_header() -> String {
    "Authorization".into()
}
fn default_true() -> bool {
    true
}

impl Inject {
    /// The header value template, defaults applied.
    pub fn format(&self) -> String {
        match &self.format {
            Some(f) => f.clone(),
            None if self.header.eq_ignore_ascii_case("authorization") => "Bearer {value}".into(),
            None => "{value}".into(),
        }
    }
}

impl Network {
    fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.attach {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name != "."
                && name != ".."
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(format!(
                    "network.attach {name:?} must name a network namespace (1-64 letters, digits, '_', '.', '-')"
                ));
            }
            if self.egress == EgressPolicyKind::None {
                return Err("network.attach needs an egress policy other than \"none\"".into());
            }
        }
        for (i, inj) in self.inject.iter().enumerate() {
            valid_secret_name(&inj.secret)
                .map_err(|e| format!("network.inject[{i}].secret: {e}"))?;
            if inj.hosts.is_empty() {
                return Err(format!(
                    "network.inject[{i}].hosts must name at least one host"
                ));
            }
            if self.egress == EgressPolicyKind::None {
                return Err(format!(
                    "network.inject[{i}] cannot reach its hosts: the egress policy is \"none\""
                ));
            }
            if !inj.format().contains("{value}") {
                return Err(format!(
                    "network.inject[{i}].format must contain {{value}} where the secret goes"
                ));
            }
            if inj.format().contains(['\r', '\n']) {
                return Err(format!("network.inject[{i}].format must be one line"));
            }
        }
        Ok(())
    }
}

/// `channels:` in agent.yaml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Channels {
    /// The Bot Framework / Microsoft 365 Activity Protocol at `/agents/{name}/api/messages`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<ActivityChannel>,
}

impl Channels {
    pub fn is_empty(&self) -> bool {
        self.activity.is_none()
    }
}

/// The Bot Framework registration an agent answers Activity Protocol calls as.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActivityChannel {
    /// The bot's Microsoft App ID: the audience of the channel's tokens, and the client id
    /// of the token Hangar gets to reply.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_id: String,
    /// The Entra tenant of a single-tenant bot; multi-tenant bots use `botframework.com`.
    #[serde(default = "default_bot_tenant")]
    pub tenant: String,
    /// The name of the agent secret (`hangar secrets set`) holding the app's client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// Where the reply token comes from (OAuth client credentials). Default:
    /// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    #[serde(default = "default_bot_scope")]
    pub scope: String,
    /// The OpenID configuration naming the keys that sign the channel's tokens.
    #[serde(default = "default_bot_openid")]
    pub openid_metadata: String,
    /// The issuer of the channel's tokens.
    #[serde(default = "default_bot_issuer")]
    pub issuer: String,
    /// Accept requests that carry no credentials at all (local testing only).
    #[serde(default)]
    pub anonymous: bool,
}

fn default_bot_tenant() -> String {
    "botframework.com".into()
}
fn default_bot_scope() -> String {
    "https://api.botframework.com/.default".into()
}
fn default_bot_openid() -> String {
    "https://login.botframework.com/v1/.well-known/openidconfiguration".into()
}
fn default_bot_issuer() -> String {
    "https://api.botframework.com".into()
}

impl ActivityChannel {
    /// The token endpoint, defaulted from the tenant.
    pub fn token_endpoint(&self) -> String {
        self.token_endpoint.clone().unwrap_or_else(|| {
            format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                self.tenant
            )
        })
    }

    fn validate(&self) -> Result<(), String> {
        if self.app_id.is_empty() && !self.anonymous {
            return Err(
                "channels.activity.app_id is required (the bot's Microsoft App ID), unless anonymous: true"
                    .into(),
            );
        }
        // Keys and the client secret travel over these: https, or http to this machine only.
        for (key, url) in [
            ("openid_metadata", Some(self.openid_metadata.as_str())),
            ("token_endpoint", self.token_endpoint.as_deref()),
        ] {
            if let Some(url) = url {
                let local = url.strip_prefix("http://").is_some_and(|rest| {
                    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
                    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
                        if port.bytes().all(|b| b.is_ascii_digit()) {
                            h
                        } else {
                            host
                        }
                    });
                    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
                });
                if !(url.starts_with("https://") || local) {
                    return Err(format!(
                        "channels.activity.{key} must be an https URL (http only to localhost), not {url:?}"
                    ));
                }
            }
        }
        if let Some(s) = &self.client_secret {
            valid_secret_name(s).map_err(|e| format!("channels.activity.client_secret: {e}"))?;
        }
        Ok(())
    }
}

/// Secret names: letters, digits, `_`, `-` and `.`, 1 to 128 characters.
pub fn valid_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a secret name (letters, digits, `_`, `-` and `.`, at most 128)"
        ))
    }
}

/// `GET /v1/agents/{name}/secrets`: names and when they were set, never values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: String,
    /// The hosts the egress proxy may send it to (`network.inject`); none: only Hangar
    /// itself uses it.
    #[serde(default)]
    pub hosts: Vec<String>,
}

const MIB: u64 = 1024 * 1024;

/// A size written the Kubernetes way: `512Mi`, `2Gi`, `1G`, `100M`, or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 512Mi or 2Gi"))?;
        let mult: u64 = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?}; use Ki, Mi, Gi, Ti (or k, M, G, T)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, m) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, ByteSize)
    }
}

/// A value written either as a plain number (`from_number` says what it means) or as text
/// in the type's own notation (`512Mi`, `15m`).
fn number_or_text<'de, D, T>(d: D, from_number: impl FnOnce(u64) -> T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(from_number(n)),
        Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// A duration written like `30s`, `15m`, `2h`, `30d` (or a number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_nanos() != 0 {
            return write!(f, "{}ms", self.0.as_millis());
        }
        for (unit, m) in [("d", 86400), ("h", 3600), ("m", 60)] {
            if secs >= m && secs.is_multiple_of(m) {
                return write!(f, "{}{unit}", secs / m);
            }
        }
        write!(f, "{secs}s")
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("{s:?} is not a duration like 30s, 15m, 2h or 30d: {e}"))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, |secs| HumanDuration(Duration::from_secs(secs)))
    }
}

/// `POST /v1/agents/{name}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// An image in Hangar's store, by id (`sha256:…`) or name.
    pub image: String,
    pub spec: AgentSpec,
    /// The new version's share of traffic (0..=100). The first version always gets 100;
    /// a later one gets this (taken proportionally from the others), or 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Version {
    pub agent: String,
    pub number: i64,
    pub image: String,
    pub spec: AgentSpec,
    pub created_at: String,
    /// Set on a deploy's answer when the image and spec equal the latest version's: no new
    /// version was made, and this is that latest one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrafficSplit {
    /// Version number → weight in percent; weights sum to 100.
    pub weights: BTreeMap<i64, i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Agent {
    pub name: String,
    pub description: String,
    pub versions: Vec<i64>,
    pub traffic: BTreeMap<i64, i64>,
    pub created_at: String,
    pub updated_at: String,
    /// Sessions by state.
    pub sessions: BTreeMap<String, u64>,
    /// The stable endpoint, relative to the server's URL.
    pub endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentList {
    pub agents: Vec<Agent>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionList {
    pub versions: Vec<Version>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Creating,
    /// A request is in flight.
    Running,
    /// Running, with no request in flight.
    Idle,
    Suspending,
    Suspended,
    Resuming,
    Failed,
    Deleted,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Creating => "creating",
            SessionState::Running => "running",
            SessionState::Idle => "idle",
            SessionState::Suspending => "suspending",
            SessionState::Suspended => "suspended",
            SessionState::Resuming => "resuming",
            SessionState::Failed => "failed",
            SessionState::Deleted => "deleted",
        }
    }
}

impl std::str::FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "creating" => SessionState::Creating,
            "running" => SessionState::Running,
            "idle" => SessionState::Idle,
            "suspending" => SessionState::Suspending,
            "suspended" => SessionState::Suspended,
            "resuming" => SessionState::Resuming,
            "failed" => SessionState::Failed,
            "deleted" => SessionState::Deleted,
            other => return Err(format!("unknown session state {other:?}")),
        })
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/agents/{name}/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    pub isolation_key: String,
    /// Pin a version; default: picked by the traffic weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub agent: String,
    pub version: i64,
    pub isolation_key: String,
    pub state: SessionState,
    pub sandbox: Option<String>,
    pub created_at: String,
    pub last_activity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The agent process as `hangar-init` reports it (running sessions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_process: Option<crate::init::AgentStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionList {
    pub sessions: Vec<Session>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub name: Option<String>,
    pub created_at: String,
    /// Bytes of the image's layers as stored (compressed).
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// Header naming the session a data-plane request belongs to (set on every answer).
pub const SESSION_HEADER: &str = "x-agent-session-id";
/// Names one call of `/invocations`: the caller's, or one Hangar makes; the agent sees it
/// and the answer carries it.
pub const INVOCATION_HEADER: &str = "x-agent-invocation-id";
/// Header by which a trusted caller names the end user (the isolation key).
pub const USER_HEADER: &str = "x-agent-user-id";
/// Header on every platform-made error: `platform`, `user` or `upstream`.
pub const ERROR_SOURCE_HEADER: &str = "x-platform-error-source";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_round_trip() {
        for (s, n) in [
            ("512Mi", 512 << 20),
            ("2Gi", 2 << 30),
            ("1G", 1_000_000_000u64),
            ("4096", 4096),
        ] {
            let b: ByteSize = s.parse().unwrap();
            assert_eq!(b.0, n);
            assert_eq!(b.to_string().parse::<ByteSize>().unwrap(), b);
        }
        assert!("12Qi".parse::<ByteSize>().is_err());
        assert!("Mi".parse::<ByteSize>().is_err());
        for (s, secs) in [("15m", 900), ("30d", 30 * 86400), ("10s", 10), ("2h", 7200)] {
            let d: HumanDuration = s.parse().unwrap();
            assert_eq!(d.0.as_secs(), secs);
            assert_eq!(d.to_string(), s);
        }
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn spec_defaults_and_validation() {
        let spec: AgentSpec =
            serde_json::from_str(r#"{"name": "notes", "build": {"dockerfile": "Dockerfile"}}"#)
                .unwrap();
        assert_eq!(spec.port, 8088);
        assert_eq!(spec.idle_timeout.0.as_secs(), 900);
        spec.validate().unwrap();
        let bad: Result<AgentSpec, _> =
            serde_json::from_str(r#"{"name": "notes", "build": {}, "idle_timout": "1m"}"#);
        assert!(bad.unwrap_err().to_string().contains("idle_timout"));
        let mut two = spec.clone();
        two.build.image = Some("x".into());
        assert!(two.validate().unwrap_err().contains("only one"));
        let mut name = spec;
        name.name = "Notes".into();
        assert!(name.validate().is_err());
    }
}

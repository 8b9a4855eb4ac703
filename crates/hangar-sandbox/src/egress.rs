//! Hangar's egress proxy: the only way out of a sandbox.
//!
//! `hangar-init` serves an HTTP proxy on the sandbox's loopback and tunnels every connection,
//! byte for byte, over the sandbox's `egress.sock` to this proxy on the host. Here the first
//! request (`CONNECT host:port` or an absolute-form `GET http://host/...`) is parsed, the
//! sandbox's policy is applied, names are resolved (never inside the sandbox) and the
//! connection is made. Loopback, link-local and unspecified addresses — the host itself,
//! Hangar's API, cloud metadata services — are refused unless an exact allowlist entry names them.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use hangar_proto::sandbox::{Egress, EgressPolicyKind, SecretInjection};

/// The name under which a sandbox reaches Hangar's own services for sandboxes (its identity
/// endpoints) through the proxy: `http://hangar.internal/…`. Never resolved, never egress.
pub const INTERNAL_HOST: &str = "hangar.internal";

/// Where the proxy finds the values of the secrets it injects.
pub trait SecretSource: Send + Sync {
    /// The value named by `reference` (a [`SecretInjection::secret`]) and the host patterns
    /// it may be sent to, or why there is none.
    #[allow(clippy::type_complexity)]
    fn secret(
        &self,
        reference: &str,
    ) -> Pin<Box<dyn Future<Output = Result<(String, Vec<String>), String>> + Send>>;
}

/// Checks a host pattern as `allow` and `network.inject` take them.
pub fn valid_host_pattern(s: &str) -> Result<(), String> {
    parse_rule(s).map(drop)
}

/// Serves a connection a sandbox made to [`INTERNAL_HOST`]; the first argument is the sandbox.
pub type InternalService =
    Arc<dyn Fn(String, Prefixed) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What every sandbox's proxy shares: where it records, where secrets and Hangar's internal
/// service come from (the latter set once `hangar serve` has built its router).
#[derive(Clone, Default)]
pub struct Shared {
    pub log: Option<EgressLog>,
    pub secrets: Option<Arc<dyn SecretSource>>,
    pub internal: Arc<OnceLock<InternalService>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("log", &self.log.is_some())
            .field("secrets", &self.secrets.is_some())
            .field("internal", &self.internal.get().is_some())
            .finish()
    }
}

/// A connection whose first bytes were already read (the proxy's look at the request head),
/// handed on as if they had not been.
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: UnixStream,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: UnixStream) -> Prefixed {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Lower-case host, or the suffix after `*.` for wildcards.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct EgressPolicy {
    kind: EgressPolicyKind,
    rules: Vec<Rule>,
    /// Addresses never reachable whatever the policy says (Hangar's own API).
    forbidden: Vec<SocketAddr>,
    /// Secrets added to requests to some hosts, with the hosts' parsed patterns.
    injections: Vec<(Vec<Rule>, SecretInjection)>,
    /// The network namespace connections are made from (`network.attach`), if not the host's.
    attach: Option<crate::netns::NetnsConnector>,
    /// Detectors run on plain-HTTP request bodies; a hit refuses the request.
    dlp: Option<hangar_dlp::Scanner>,
}

impl EgressPolicy {
    /// Validates an egress setting; the error names the bad entry.
    pub fn new(egress: &Egress, forbidden: Vec<SocketAddr>) -> Result<EgressPolicy, String> {
        if egress.policy != EgressPolicyKind::Allowlist && !egress.allow.is_empty() {
            return Err("egress.allow is only meaningful with policy \"allowlist\"".into());
        }
        let rules = egress
            .allow
            .iter()
            .map(|s| parse_rule(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EgressPolicy {
            kind: egress.policy,
            rules,
            forbidden,
            injections: Vec::new(),
            attach: None,
            dlp: None,
        })
    }

    /// Adds the detectors for request bodies; the error names a bad detector.
    pub fn with_dlp(
        mut self,
        dlp: Option<&hangar_proto::sandbox::EgressDlp>,
    ) -> Result<EgressPolicy, String> {
        if let Some(d) = dlp {
            self.dlp = Some(
                hangar_dlp::Scanner::from_config(&d.detectors, &d.patterns)
                    .map_err(|e| format!("guardrails: {e}"))?,
            );
        }
        Ok(self)
    }

    /// Makes the connections from inside this namespace instead of the host's network.
    pub fn attached(mut self, netns: Option<crate::netns::NetnsConnector>) -> EgressPolicy {
        self.attach = netns;
        self
    }

    /// Adds the secrets to inject; the error names a bad host pattern or header.
    pub fn with_injections(mut self, inject: &[SecretInjection]) -> Result<EgressPolicy, String> {
        for i in inject {
            let rules = i
                .hosts
                .iter()
                .map(|h| parse_rule(h))
                .collect::<Result<Vec<_>, _>>()?;
            if i.header.is_empty()
                || !i
                    .header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return Err(format!("invalid header name {:?}", i.header));
            }
            self.injections.push((rules, i.clone()));
        }
        Ok(self)
    }

    /// The secret to add to a request to `host:port`, if any.
    fn injection(&self, host: &str, port: u16) -> Option<&SecretInjection> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.injections
            .iter()
            .find(|(rules, _)| rules.iter().any(|r| r.matches(&host, port)))
            .map(|(_, i)| i)
    }

    /// Whether `addr` is one of Hangar's own listeners, whatever form the address takes
    /// (IPv4-mapped, loopback for a wildcard listener, …).
    fn forbids(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.forbidden.iter().any(|f| {
            f.port() == addr.port()
                && (f.ip().is_unspecified() || f.ip().to_canonical() == ip || ip.is_loopback())
        })
    }

    /// Whether the policy lets a connection to `host:port` go out, and if so whether an exact
    /// rule names the address itself (an IP literal or `localhost`), which may then be one that
    /// is otherwise refused (loopback, a private network). A host *name* never earns that: its
    /// DNS, which someone else may control, could point it anywhere.
    fn check(&self, host: &str, port: u16) -> Result<bool, String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self.kind {
            EgressPolicyKind::None => Err(format!("egress policy \"none\" refuses {host}:{port}")),
            EgressPolicyKind::All => Ok(false),
            EgressPolicyKind::Allowlist => {
                if let Some(r) = self.rules.iter().find(|r| r.matches(&host, port)) {
                    return Ok(!r.wildcard
                        && (host == "localhost"
                            || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()));
                }
                Err(format!(
                    "{host}:{port} is not on this sandbox's egress allowlist"
                ))
            }
        }
    }
}

impl Rule {
    /// Whether this rule names `host` (lower case, no trailing dot) on `port`.
    fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1 && host.ends_with(&format!(".{}", self.host))
        } else {
            self.host == host
        }
    }
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    let bad = || {
        format!("invalid egress allow entry {s:?}: expected a host name, \"*.domain\" or either with \":port\"")
    };
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let (wildcard, host) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(bad());
    }
    Ok(Rule {
        host: host.to_ascii_lowercase(),
        wildcard,
        port,
    })
}

/// Addresses a sandbox reaches only through an exact allowlist entry naming them: the host
/// itself, link-local (cloud metadata), private and shared networks (the host's LAN, other
/// machines' internals).
fn refused_address(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_private()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || (v6.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| refused_address(IpAddr::V4(v4)))
        }
    }
}

/// One connection through the proxy, as decided and as it ended: what the operator sees per
/// session, and what the audit trail records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressEvent {
    pub sandbox: String,
    pub host: String,
    pub port: u16,
    pub allowed: bool,
    /// Why it was refused, or how an allowed connection failed.
    pub reason: Option<String>,
    /// Bytes from the sandbox to the destination, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// The data-loss detectors the request's body set off (it was refused).
    pub dlp: Vec<String>,
}

/// Where the proxy reports its connections; never blocks a connection (a full queue drops
/// the report, with a warning in Hangar's log).
pub type EgressLog = tokio::sync::mpsc::Sender<EgressEvent>;

/// Reports an event that must not be lost (a guardrail hit): waits for room in the queue.
async fn report_surely(log: Option<&EgressLog>, event: EgressEvent) {
    if let Some(log) = log {
        if log.send(event).await.is_err() {
            tracing::error!("a guardrail hit was not recorded: the recorder is gone");
        }
    }
}

fn report(log: Option<&EgressLog>, event: EgressEvent) {
    if let Some(log) = log {
        if let Err(e) = log.try_send(event) {
            tracing::warn!(error = %e, "an egress connection was not recorded: the queue is full");
        }
    }
}

/// Connections one sandbox may have open through the proxy at once.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its request head, and a name to resolve.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
const LOOKUP_DEADLINE: Duration = Duration::from_secs(10);
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Serves one sandbox's `egress.sock` until this task is aborted, which also closes every
/// connection it carries (they live in its `JoinSet`).
pub async fn serve(
    listener: UnixListener,
    policy: Arc<EgressPolicy>,
    sandbox: String,
    shared: Shared,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Bytes of request bodies the guardrails may hold for this sandbox at once.
    let budget = Arc::new(tokio::sync::Semaphore::new(DLP_BUDGET));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((mut conn, _)) = accepted else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = refuse(
                &mut conn,
                503,
                "too many connections through the egress proxy",
            )
            .await;
            continue;
        };
        let policy = policy.clone();
        let sandbox = sandbox.clone();
        let shared = shared.clone();
        let budget = budget.clone();
        conns.spawn(async move {
            if let Err(e) = handle(conn, &policy, &sandbox, &shared, &budget).await {
                tracing::debug!(%sandbox, error = %e, "egress connection ended");
            }
            drop(slot);
        });
    }
}

/// The first request of a proxied connection.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    connect: bool,
    host: String,
    port: u16,
    /// For plain HTTP: the head to send upstream, rewritten to origin form, with `Host` set to
    /// the URL's authority and `Connection: close`.
    forward: Vec<u8>,
    /// How the body is framed (plain HTTP).
    content_length: Option<usize>,
    chunked: bool,
}

/// `tchar` of RFC 9110: what a method or a field name is made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a proxy request head (everything up to and including the blank line). It is
/// checked strictly and rebuilt from its parts, so that what the destination parses is what
/// the proxy checked: no bare CR or LF, no control characters, no folded or nameless lines,
/// one framing of the body, and the `Host` of the URL (never the sandbox's own).
fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or("request head does not end with a blank line")?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let parts: Vec<&str> = first.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("malformed request line {first:?}"));
    };
    if !is_token(method) || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(format!("malformed request line {first:?}"));
    }
    if target.bytes().any(|b| b.is_ascii_control()) {
        return Err("the request target has control characters".into());
    }
    if method == "CONNECT" {
        let (host, port) = split_host_port(target, None)?;
        return Ok(Head {
            connect: true,
            host,
            port,
            forward: Vec::new(),
            content_length: None,
            chunked: false,
        });
    }
    // TRACE echoes the request, headers the proxy added included, back to the sandbox.
    if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
        return Err(format!("{method} is not carried by the egress proxy"));
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| {
        format!("only CONNECT and absolute http:// requests go through the proxy, not {target:?}")
    })?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not carried (use a header)".into());
    }
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    let mut forward = format!("{method} {path} {version}\r\nHost: {authority}\r\n").into_bytes();
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut encodings = 0;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err("folded header lines are not accepted".into());
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header line {line:?}"))?;
        if !is_token(name) {
            return Err(format!("malformed header name {name:?}"));
        }
        if value
            .bytes()
            .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
        {
            return Err(format!("header {name} has control characters"));
        }
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            // One request per upstream connection, and the URL's host: the connection is
            // spliced after this head, so a second request from a keep-alive client would
            // reach this host unchecked, and a `Host` of the sandbox's choosing could send it
            // (and a secret added to it) to another site behind the same address.
            "proxy-connection"
            | "proxy-authorization"
            | "connection"
            | "keep-alive"
            | "host"
            | "te"
            | "upgrade" => continue,
            "content-length" => {
                let n: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                encodings += 1;
                if !value.trim().eq_ignore_ascii_case("chunked") || encodings > 1 {
                    return Err(format!(
                        "Transfer-Encoding {value:?} is not carried (only chunked)"
                    ));
                }
                chunked = true;
            }
            _ => {}
        }
        forward.extend_from_slice(line.as_bytes());
        forward.extend_from_slice(b"\r\n");
    }
    if chunked && content_length.is_some() {
        return Err("a request may not have both Content-Length and Transfer-Encoding".into());
    }
    forward.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Head {
        connect: false,
        host,
        port,
        forward,
        content_length,
        chunked,
    })
}

fn split_host_port(s: &str, default: Option<u16>) -> Result<(String, u16), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once(']')
            .ok_or_else(|| format!("malformed authority {s:?}"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port in {s:?}"))?,
            None => default.ok_or_else(|| format!("missing port in {s:?}"))?,
        };
        return Ok((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().map_err(|_| format!("bad port in {s:?}"))?,
        )),
        None => Ok((
            s.to_string(),
            default.ok_or_else(|| format!("missing port in {s:?}"))?,
        )),
    }
}

async fn handle(
    mut conn: UnixStream,
    policy: &EgressPolicy,
    sandbox: &str,
    shared: &Shared,
    budget: &Arc<tokio::sync::Semaphore>,
) -> std::io::Result<()> {
    let log = shared.log.as_ref();
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HEAD_DEADLINE;
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return refuse(&mut conn, 431, "request head too large").await;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .map_err(std::io::Error::other)??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut head = match parse_head(&buf[..head_len]) {
        Ok(h) => h,
        Err(e) => return refuse(&mut conn, 400, &e).await,
    };
    if head
        .host
        .trim_end_matches('.')
        .eq_ignore_ascii_case(INTERNAL_HOST)
    {
        if head.connect || head.port != 80 {
            return refuse(
                &mut conn,
                400,
                "hangar.internal speaks plain HTTP on port 80: use http://hangar.internal/...",
            )
            .await;
        }
        let Some(service) = shared.internal.get() else {
            return refuse(&mut conn, 503, "Hangar's internal service is not ready").await;
        };
        service(sandbox.to_owned(), Prefixed::new(buf, conn)).await;
        return Ok(());
    }
    // A binding to `host:443` with TLS serves `http://host/…` (the port the request will
    // really use).
    let injection = policy
        .injection(&head.host, head.port)
        .or_else(|| {
            (head.port == 80)
                .then(|| policy.injection(&head.host, 443))
                .flatten()
                .filter(|i| i.tls)
        })
        .cloned();
    // TLS that Hangar originates goes to the HTTPS port unless the URL named another.
    let tls = injection.as_ref().is_some_and(|i| i.tls);
    let port = if tls && head.port == 80 {
        443
    } else {
        head.port
    };
    let event =
        |allowed: bool, reason: Option<String>, bytes_out: u64, bytes_in: u64| EgressEvent {
            sandbox: sandbox.to_owned(),
            host: head.host.clone(),
            port,
            allowed,
            reason,
            bytes_out,
            bytes_in,
            dlp: Vec::new(),
        };
    if head.connect && injection.is_some() {
        let reason = format!(
            "{}:{} gets a secret from Hangar, which it can add only to plain requests: \
             send http://{}/... through the proxy and Hangar makes the TLS connection",
            head.host, head.port, head.host
        );
        report(log, event(false, Some(reason.clone()), 0, 0));
        return refuse(&mut conn, 403, &reason).await;
    }
    let exact = match policy.check(&head.host, port) {
        Ok(exact) => exact,
        Err(reason) => {
            tracing::info!(%sandbox, host = %head.host, port, "egress denied");
            report(log, event(false, Some(reason.clone()), 0, 0));
            return refuse(&mut conn, 403, &reason).await;
        }
    };
    if let Some(inj) = &injection {
        let value = match &shared.secrets {
            Some(source) => source.secret(&inj.secret).await,
            None => Err("this server keeps no secrets".to_owned()),
        }
        .and_then(|(v, hosts)| {
            // The admin who set the secret named where it may go; agent.yaml cannot widen it.
            let host = head.host.trim_end_matches('.').to_ascii_lowercase();
            let may = hosts
                .iter()
                .filter_map(|h| parse_rule(h).ok())
                .any(|r| r.matches(&host, port) || r.matches(&host, head.port));
            if !may {
                return Err(format!(
                    "{} is not one of the hosts the secret may be sent to \
                     (hangar secrets set AGENT NAME --host {})",
                    head.host, head.host
                ));
            }
            Ok(v)
        })
        .and_then(|v| {
            if v.is_empty() || v.contains(['\r', '\n', '\0']) {
                Err("its value is empty or has a line break, which cannot go in a header".into())
            } else {
                Ok(v)
            }
        })
        .and_then(|v| {
            inject_header(&head.forward, &inj.header, &inj.format, &v)
                .ok_or_else(|| "the request head is not text".to_owned())
        });
        match value {
            Ok(forward) => head.forward = forward,
            Err(e) => {
                let reason = format!("cannot add the secret for {}: {e}", head.host);
                report(log, event(false, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, 502, &reason).await;
            }
        }
    }
    let lookup = async {
        match &policy.attach {
            Some(ns) => ns.lookup(&head.host, port).await,
            None => tokio::net::lookup_host((head.host.as_str(), port))
                .await
                .map(Iterator::collect),
        }
    };
    // With guardrails, the whole request (head and body) is read and inspected before
    // anything leaves, and nothing the client sends after it is carried.
    let mut body_only = false;
    let _budget;
    if let (Some(scanner), false) = (&policy.dlp, head.connect) {
        let want = head
            .content_length
            .unwrap_or(if head.chunked { MAX_DLP_BODY } else { 0 });
        _budget = match budget
            .clone()
            .try_acquire_many_owned(want.min(MAX_DLP_BODY) as u32)
        {
            Ok(p) => Some(p),
            Err(_) => {
                let reason =
                    "too many request bodies are being inspected for this sandbox; try again"
                        .to_owned();
                report(log, event(false, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, 503, &reason).await;
            }
        };
        let decoded = match read_body(&mut conn, &mut buf, head_len, &head, deadline).await {
            Ok(d) => d,
            Err(e) => {
                let (status, reason) = match e {
                    BodyError::TooLarge => (
                        413,
                        format!(
                            "the request body is larger than the {} MiB the data-loss guardrails inspect",
                            MAX_DLP_BODY >> 20
                        ),
                    ),
                    BodyError::Bad(m) => (400, format!("malformed request body: {m}")),
                    BodyError::Io(e) => (408, format!("the request body did not arrive: {e}")),
                };
                report(log, event(false, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, status, &reason).await;
            }
        };
        if head
            .forward
            .windows(14)
            .any(|w| w.eq_ignore_ascii_case(b"\r\nexpect: 100-"))
        {
            head.forward = without_header(&head.forward, "expect");
        }
        let mut names: Vec<String> = scanner
            .scan_bytes(&buf[..head_len])
            .into_iter()
            .chain(scanner.scan_bytes(&decoded))
            .map(|h| h.detector)
            .collect();
        names.sort();
        names.dedup();
        if !names.is_empty() {
            let reason = format!(
                "blocked by the data-loss guardrails: the request contains {}",
                names.join(", ")
            );
            tracing::info!(%sandbox, host = %head.host, port, detectors = ?names, "egress blocked by guardrails");
            let mut e = event(false, Some(reason.clone()), 0, 0);
            e.dlp = names;
            report_surely(log, e).await;
            return refuse(&mut conn, 403, &reason).await;
        }
        body_only = true;
    }
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(LOOKUP_DEADLINE, lookup)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
    {
        Ok(a) => a,
        Err(e) => {
            let reason = format!("cannot resolve {}: {e}", head.host);
            report(log, event(true, Some(reason.clone()), 0, 0));
            return refuse(&mut conn, 502, &reason).await;
        }
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !policy.forbids(*a) && (exact || !refused_address(a.ip())))
        .collect();
    if allowed.is_empty() {
        tracing::info!(%sandbox, host = %head.host, port, "egress denied: address not allowed");
        let reason = format!(
            "{}:{port} resolves to an address sandboxes may not reach",
            head.host
        );
        report(log, event(false, Some(reason.clone()), 0, 0));
        return refuse(&mut conn, 403, &reason).await;
    }
    let connect = async {
        match &policy.attach {
            Some(ns) => ns.connect(&allowed, CONNECT_DEADLINE).await,
            None => TcpStream::connect(&allowed[..]).await,
        }
    };
    let upstream = match tokio::time::timeout(CONNECT_DEADLINE, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = format!("cannot connect to {}:{port}: {e}", head.host);
            report(log, event(true, Some(reason.clone()), 0, 0));
            return refuse(&mut conn, 502, &reason).await;
        }
        Err(_) => {
            let reason = format!("timed out connecting to {}:{port}", head.host);
            report(log, event(true, Some(reason.clone()), 0, 0));
            return refuse(&mut conn, 504, &reason).await;
        }
    };
    tracing::info!(%sandbox, host = %head.host, port, "egress allowed");
    let mut upstream: Box<dyn Upstream> = if tls {
        match tls_connect(&head.host, upstream).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                let reason = format!("TLS to {}:{port} failed: {e}", head.host);
                report(log, event(true, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, 502, &reason).await;
            }
        }
    } else {
        Box::new(upstream)
    };
    if head.connect {
        conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
    } else {
        upstream.write_all(&head.forward).await?;
    }
    upstream.write_all(&buf[head_len..]).await?;
    let early = (buf.len() - head_len) as u64
        + if head.connect {
            0
        } else {
            head.forward.len() as u64
        };
    let copied = if body_only {
        // The request was inspected whole: only the answer flows from here on.
        upstream.flush().await?;
        tokio::io::copy(&mut upstream, &mut conn)
            .await
            .map(|back| (0, back))
    } else {
        tokio::io::copy_bidirectional(&mut conn, &mut upstream).await
    };
    match &copied {
        Ok((out, back)) => report(log, event(true, None, early + out, *back)),
        Err(e) => report(log, event(true, Some(format!("ended: {e}")), early, 0)),
    }
    copied.map(drop)
}

/// The largest request body the data-loss guardrails inspect; a larger one is refused.
const MAX_DLP_BODY: usize = 4 << 20;
/// The bytes of request bodies one sandbox's proxy holds for inspection at once.
const DLP_BUDGET: usize = 16 << 20;

enum BodyError {
    Io(std::io::Error),
    TooLarge,
    Bad(String),
}

/// Reads a plain-HTTP request's whole body into `buf` (after the head at `..head_len`), by its
/// `Content-Length` or its chunked framing (decoded as it comes), so that it can be inspected
/// before anything leaves; returns the decoded body. A client waiting on
/// `Expect: 100-continue` is told to go on here.
async fn read_body(
    conn: &mut UnixStream,
    buf: &mut Vec<u8>,
    head_len: usize,
    head: &Head,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, BodyError> {
    if head.content_length.is_none() && !head.chunked {
        // No body; a client that sends bytes anyway has them dropped (see `body_only`).
        buf.truncate(head_len);
        return Ok(Vec::new());
    }
    if head.content_length.is_some_and(|n| n > MAX_DLP_BODY) {
        return Err(BodyError::TooLarge);
    }
    let expects = String::from_utf8_lossy(&buf[..head_len])
        .to_ascii_lowercase()
        .contains("\r\nexpect: 100-continue");
    if expects {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(BodyError::Io)?;
    }
    let mut chunks = Chunked::default();
    loop {
        let done = match head.content_length {
            Some(n) => {
                if buf.len() - head_len >= n {
                    buf.truncate(head_len + n);
                    true
                } else {
                    false
                }
            }
            None => {
                let end = chunks.advance(&buf[head_len..]).map_err(BodyError::Bad)?;
                if let Some(end) = end {
                    buf.truncate(head_len + end);
                    true
                } else {
                    false
                }
            }
        };
        if done {
            break;
        }
        if buf.len() - head_len > MAX_DLP_BODY + 64 * 1024 {
            return Err(BodyError::TooLarge);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .map_err(|e| BodyError::Io(std::io::Error::other(e)))?
            .map_err(BodyError::Io)?;
        if n == 0 {
            return Err(BodyError::Io(std::io::Error::other(
                "the connection closed before the end of the body",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(match head.content_length {
        Some(_) => buf[head_len..].to_vec(),
        None => chunks.decoded,
    })
}

/// An incremental decoder of the chunked transfer coding (RFC 9112 section 7.1): chunk sizes
/// in hex with optional extensions, data, CRLF; a last chunk of size 0, optional trailer
/// lines, and a blank line.
#[derive(Default)]
struct Chunked {
    /// Where in the raw body the next element starts.
    pos: usize,
    /// Data still owed by the current chunk (its CRLF follows it).
    remaining: Option<usize>,
    in_trailers: bool,
    decoded: Vec<u8>,
}

impl Chunked {
    /// Consumes what `raw` (the whole body so far) holds; `Some(end)` once the body is whole.
    fn advance(&mut self, raw: &[u8]) -> Result<Option<usize>, String> {
        loop {
            if let Some(n) = self.remaining {
                if raw.len() < self.pos + n + 2 {
                    return Ok(None);
                }
                if &raw[self.pos + n..self.pos + n + 2] != b"\r\n" {
                    return Err("a chunk does not end with CRLF".into());
                }
                self.decoded.extend_from_slice(&raw[self.pos..self.pos + n]);
                self.pos += n + 2;
                self.remaining = None;
                continue;
            }
            let Some(eol) = raw[self.pos..].windows(2).position(|w| w == b"\r\n") else {
                if raw.len() - self.pos > 4096 {
                    return Err("a chunk-size or trailer line is too long".into());
                }
                return Ok(None);
            };
            let line = &raw[self.pos..self.pos + eol];
            self.pos += eol + 2;
            if self.in_trailers {
                if line.is_empty() {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or("a chunk size is not hexadecimal")?;
            if size == 0 {
                self.in_trailers = true;
            } else if size > MAX_DLP_BODY {
                return Err("a chunk is larger than the guardrails inspect".into());
            } else {
                self.remaining = Some(size);
            }
        }
    }
}

/// A request head without the lines of header `name` (lower case).
fn without_header(head: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive("\r\n") {
        let named = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name));
        if !named {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

/// An upstream connection, plain or TLS.
trait Upstream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Upstream for T {}

/// The request head with `header` set to `format` (where `{value}` is the secret), replacing
/// any value the sandbox sent; `None` if the head has no end.
fn inject_header(head: &[u8], header: &str, format: &str, value: &str) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let body_start = text.find("\r\n\r\n")?;
    let mut out = String::with_capacity(head.len() + format.len() + value.len());
    for (i, line) in text[..body_start].split("\r\n").enumerate() {
        let named = line
            .split_once(':')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case(header));
        if i > 0 && named {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(header);
    out.push_str(": ");
    out.push_str(&format.replace("{value}", value));
    out.push_str("\r\n\r\n");
    Some(out.into_bytes())
}

/// The client side of TLS that the proxy originates, trusting the host's CA store
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
async fn tls_connect(
    host: &str,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio_rustls::rustls;
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let config = CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no CA certificates found on this host (install ca-certificates)".into(),
                );
            }
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(std::io::Error::other)?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

async fn refuse(conn: &mut UnixStream, status: u16, reason: &str) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Bad Gateway",
    };
    let body = format!("hangar egress proxy: {reason}\n");
    let resp = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nX-Hangar-Egress: denied\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: EgressPolicyKind, allow: &[&str]) -> EgressPolicy {
        EgressPolicy::new(
            &Egress {
                policy: kind,
                allow: allow.iter().map(|s| s.to_string()).collect(),
                attach: None,
            },
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn allowlist_matches_hosts_wildcards_and_ports() {
        let p = policy(
            EgressPolicyKind::Allowlist,
            &["pypi.org", "*.example.com:443", "localhost:8080"],
        );
        let check = |h: &str, port: u16| p.check(h, port);
        assert_eq!(
            check("pypi.org", 443),
            Ok(false),
            "a name never names the address itself"
        );
        assert_eq!(check("PyPI.org.", 80), Ok(false));
        assert_eq!(check("a.example.com", 443), Ok(false));
        assert!(check("a.example.com", 80).is_err());
        assert!(
            check("example.com", 443).is_err(),
            "a wildcard does not match the bare domain"
        );
        assert!(check("evil-example.com", 443).is_err());
        assert_eq!(check("localhost", 8080), Ok(true));
        assert!(check("localhost", 8081).is_err());
        assert!(policy(EgressPolicyKind::None, &[])
            .check("pypi.org", 443)
            .is_err());
        assert_eq!(
            policy(EgressPolicyKind::All, &[]).check("pypi.org", 443),
            Ok(false)
        );
    }

    #[test]
    fn bad_rules_are_rejected() {
        for bad in ["", "*.", "host:port", "a b", "http://x"] {
            let e = Egress {
                policy: EgressPolicyKind::Allowlist,
                allow: vec![bad.into()],
                attach: None,
            };
            assert!(EgressPolicy::new(&e, vec![]).is_err(), "{bad:?}");
        }
        let e = Egress {
            policy: EgressPolicyKind::None,
            allow: vec!["x.org".into()],
            attach: None,
        };
        assert!(EgressPolicy::new(&e, vec![]).is_err());
    }

    #[test]
    fn heads_parse_to_destinations() {
        let h = parse_head(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n").unwrap();
        assert_eq!(
            (h.connect, h.host.as_str(), h.port),
            (true, "pypi.org", 443)
        );
        let h = parse_head(b"GET http://example.org/a?b HTTP/1.1\r\nHost: example.org\r\nProxy-Connection: keep-alive\r\n\r\n").unwrap();
        assert_eq!(
            (h.connect, h.host.as_str(), h.port),
            (false, "example.org", 80)
        );
        assert_eq!(
            h.forward,
            b"GET /a?b HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n"
        );
        let h = parse_head(
            b"GET http://a.org/ HTTP/1.1\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            h.forward,
            b"GET / HTTP/1.1\r\nHost: a.org\r\nConnection: close\r\n\r\n"
        );
        let h = parse_head(b"GET http://[::1]:81 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.forward.as_slice()),
            (
                "::1",
                81,
                &b"GET / HTTP/1.1\r\nHost: [::1]:81\r\nConnection: close\r\n\r\n"[..]
            )
        );
        let h = parse_head(
            b"POST http://a.org/x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!((h.content_length, h.chunked), (Some(5), false));
        assert!(parse_head(b"GET /relative HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_are_decoded_whatever_the_split() {
        let raw = b"4;ext=1\r\n4111\r\n0f\r\n 1111 1111 1111\r\n0\r\nX-Trailer: y\r\n\r\nEXTRA";
        let end = raw.len() - "EXTRA".len();
        for cut in 0..raw.len() {
            let mut c = Chunked::default();
            let first = c.advance(&raw[..cut]).unwrap();
            if cut < end {
                assert_eq!(first, None, "cut {cut}");
            }
            let whole = match first {
                Some(e) => Some(e),
                None => c.advance(raw).unwrap(),
            };
            assert_eq!(whole, Some(end), "cut {cut}");
            assert_eq!(c.decoded, b"4111 1111 1111 1111", "cut {cut}");
        }
        // A chunk's data that ends like a last chunk does not end the body.
        let mut c = Chunked::default();
        assert_eq!(c.advance(b"5\r\nab0\r\n\r\n").unwrap(), None);
        for bad in [&b"zz\r\n"[..], b"3\r\nabcXY", b"\r\n"] {
            assert!(Chunked::default().advance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_sandbox_cannot_choose_the_host_or_smuggle_lines() {
        // The URL's host, never the sandbox's `Host`: a secret for api.example must not reach
        // another site behind the same front end.
        let h = parse_head(
            b"GET http://api.example/v1 HTTP/1.1\r\nHost: paste.example\r\nHOST: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            h.forward,
            b"GET /v1 HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n"
        );
        for bad in [
            &b"GET http://a.org/ HTTP/1.1\r\nX: a\nContent-Length: 300\r\n\r\n"[..],
            b"GET http://a.org/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\n folded\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nBad Name: v\r\n\r\n",
            b"GET http://a.org/ HTTP/1.1\r\nnocolon\r\n\r\n",
            b"GET http://a.org/ HTTP/2\r\n\r\n",
            b"GET http://a.org/x\nFoo: HTTP/1.1\r\n\r\n",
            b"TRACE http://a.org/ HTTP/1.1\r\n\r\n",
            b"GET http://user:pw@a.org/ HTTP/1.1\r\n\r\n",
            b"POST http://a.org/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST http://a.org/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST http://a.org/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn host_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert!(refused_address(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "100.128.0.1", "2001:db8::1"] {
            assert!(!refused_address(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn hangars_own_listeners_are_forbidden_in_every_form() {
        let e = Egress {
            policy: EgressPolicyKind::All,
            allow: vec![],
            attach: None,
        };
        let p = EgressPolicy::new(&e, vec!["127.0.0.1:7070".parse().unwrap()]).unwrap();
        for a in [
            "127.0.0.1:7070",
            "[::ffff:127.0.0.1]:7070",
            "127.0.0.2:7070",
            "[::1]:7070",
        ] {
            assert!(p.forbids(a.parse().unwrap()), "{a}");
        }
        assert!(!p.forbids("127.0.0.1:7071".parse().unwrap()));
        let wild = EgressPolicy::new(&e, vec!["0.0.0.0:7070".parse().unwrap()]).unwrap();
        assert!(wild.forbids("192.168.1.10:7070".parse().unwrap()));
    }

    #[test]
    fn secrets_are_injected_in_place_of_the_sandboxs_own() {
        let head = b"GET /v1/models HTTP/1.1\r\nHost: api.example\r\nauthorization: Bearer fake\r\nAccept: */*\r\nConnection: close\r\n\r\n";
        let out = inject_header(head, "Authorization", "Bearer {value}", "s3cret").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v1/models HTTP/1.1\r\nHost: api.example\r\nAccept: */*\r\nConnection: close\r\nAuthorization: Bearer s3cret\r\n\r\n"
        );
        let p = policy(EgressPolicyKind::All, &[])
            .with_injections(&[SecretInjection {
                hosts: vec!["*.example.com".into(), "api.example:8080".into()],
                header: "X-Api-Key".into(),
                format: "{value}".into(),
                secret: "a/b".into(),
                tls: false,
            }])
            .unwrap();
        assert!(p.injection("x.example.com", 80).is_some());
        assert!(p.injection("API.example.", 8080).is_some());
        assert!(p.injection("api.example", 80).is_none());
        assert!(p.injection("example.com", 80).is_none());
        let bad = SecretInjection {
            hosts: vec!["a.org".into()],
            header: "X Key".into(),
            format: "{value}".into(),
            secret: "a/b".into(),
            tls: false,
        };
        assert!(policy(EgressPolicyKind::All, &[])
            .with_injections(&[bad])
            .is_err());
    }

    #[test]
    fn exact_rules_name_addresses_only_as_literals() {
        let p = policy(
            EgressPolicyKind::Allowlist,
            &["10.0.0.5:5432", "internal.example:80"],
        );
        assert_eq!(p.check("10.0.0.5", 5432), Ok(true));
        assert_eq!(p.check("internal.example", 80), Ok(false));
    }
}

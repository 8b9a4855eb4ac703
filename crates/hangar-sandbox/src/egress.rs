//! Hangar's egress proxy: the only way out of a sandbox.
//!
//! `hangar-init` serves an HTTP proxy on the sandbox's loopback and tunnels every connection,
//! byte for byte, over the sandbox's `egress.sock` to this proxy on the host. Here the first
//! request (`CONNECT host:port` or an absolute-form `GET http://host/...`) is parsed, the
//! sandbox's policy is applied, names are resolved (never inside the sandbox) and the
//! connection is made. Loopback, link-local and unspecified addresses — the host itself,
//! Hangar's API, cloud metadata services — are refused unless an exact allowlist entry names them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use hangar_proto::sandbox::{Egress, EgressPolicyKind};

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
        })
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
                for r in &self.rules {
                    if r.port.is_some_and(|p| p != port) {
                        continue;
                    }
                    if !r.wildcard && r.host == host {
                        return Ok(host == "localhost"
                            || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok());
                    }
                    if r.wildcard
                        && host.len() > r.host.len() + 1
                        && host.ends_with(&format!(".{}", r.host))
                    {
                        return Ok(false);
                    }
                }
                Err(format!(
                    "{host}:{port} is not on this sandbox's egress allowlist"
                ))
            }
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
}

/// Where the proxy reports its connections; never blocks a connection (a full queue drops
/// the report, with a warning in Hangar's log).
pub type EgressLog = tokio::sync::mpsc::Sender<EgressEvent>;

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

/// Serves one sandbox's `egress.sock` until this task is aborted, which also closes every
/// connection it carries (they live in its `JoinSet`).
pub async fn serve(
    listener: UnixListener,
    policy: Arc<EgressPolicy>,
    sandbox: String,
    log: Option<EgressLog>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let log = log.clone();
        conns.spawn(async move {
            if let Err(e) = handle(conn, &policy, &sandbox, log.as_ref()).await {
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
    /// For plain HTTP: the head to send upstream, rewritten to origin form.
    forward: Vec<u8>,
}

/// Parses a proxy request head (everything up to and including the blank line).
fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {first:?}"));
    };
    if method == "CONNECT" {
        let (host, port) = split_host_port(target, None)?;
        return Ok(Head {
            connect: true,
            host,
            port,
            forward: Vec::new(),
        });
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| {
        format!("only CONNECT and absolute http:// requests go through the proxy, not {target:?}")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    let mut forward = format!("{method} {path} {version}\r\n").into_bytes();
    let mut closed = false;
    for line in lines {
        let lower = line.to_ascii_lowercase();
        // One request per upstream connection: the connection is spliced after this head, so
        // a second request from a keep-alive client would reach this host unchecked.
        if lower.starts_with("proxy-connection:")
            || lower.starts_with("proxy-authorization:")
            || lower.starts_with("connection:")
            || lower.starts_with("keep-alive:")
        {
            continue;
        }
        if line.is_empty() && !closed {
            forward.extend_from_slice(b"Connection: close\r\n");
            closed = true;
        }
        forward.extend_from_slice(line.as_bytes());
        forward.extend_from_slice(b"\r\n");
    }
    // `lines` ends with the two empty strings of the final CRLFCRLF; keep exactly one blank line.
    while forward.ends_with(b"\r\n\r\n\r\n") {
        forward.truncate(forward.len() - 2);
    }
    Ok(Head {
        connect: false,
        host,
        port,
        forward,
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
    log: Option<&EgressLog>,
) -> std::io::Result<()> {
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
    let head = match parse_head(&buf[..head_len]) {
        Ok(h) => h,
        Err(e) => return refuse(&mut conn, 400, &e).await,
    };
    let event =
        |allowed: bool, reason: Option<String>, bytes_out: u64, bytes_in: u64| EgressEvent {
            sandbox: sandbox.to_owned(),
            host: head.host.clone(),
            port: head.port,
            allowed,
            reason,
            bytes_out,
            bytes_in,
        };
    let exact = match policy.check(&head.host, head.port) {
        Ok(exact) => exact,
        Err(reason) => {
            tracing::info!(%sandbox, host = %head.host, port = head.port, "egress denied");
            report(log, event(false, Some(reason.clone()), 0, 0));
            return refuse(&mut conn, 403, &reason).await;
        }
    };
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        LOOKUP_DEADLINE,
        tokio::net::lookup_host((head.host.as_str(), head.port)),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
    {
        Ok(a) => a.collect(),
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
        tracing::info!(%sandbox, host = %head.host, port = head.port, "egress denied: address not allowed");
        let reason = format!(
            "{}:{} resolves to an address sandboxes may not reach",
            head.host, head.port
        );
        report(log, event(false, Some(reason.clone()), 0, 0));
        return refuse(&mut conn, 403, &reason).await;
    }
    let mut upstream =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&allowed[..])).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = format!("cannot connect to {}:{}: {e}", head.host, head.port);
                report(log, event(true, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, 502, &reason).await;
            }
            Err(_) => {
                let reason = format!("timed out connecting to {}:{}", head.host, head.port);
                report(log, event(true, Some(reason.clone()), 0, 0));
                return refuse(&mut conn, 504, &reason).await;
            }
        };
    tracing::info!(%sandbox, host = %head.host, port = head.port, "egress allowed");
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
    let copied = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    match &copied {
        Ok((out, back)) => report(log, event(true, None, early + out, *back)),
        Err(e) => report(log, event(true, Some(format!("ended: {e}")), early, 0)),
    }
    copied.map(drop)
}

async fn refuse(conn: &mut UnixStream, status: u16, reason: &str) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
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
            };
            assert!(EgressPolicy::new(&e, vec![]).is_err(), "{bad:?}");
        }
        let e = Egress {
            policy: EgressPolicyKind::None,
            allow: vec!["x.org".into()],
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
        assert_eq!(h.forward, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        let h = parse_head(b"GET http://[::1]:81 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.forward.as_slice()),
            (
                "::1",
                81,
                &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..]
            )
        );
        assert!(parse_head(b"GET /relative HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
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
    fn exact_rules_name_addresses_only_as_literals() {
        let p = policy(
            EgressPolicyKind::Allowlist,
            &["10.0.0.5:5432", "internal.example:80"],
        );
        assert_eq!(p.check("10.0.0.5", 5432), Ok(true));
        assert_eq!(p.check("internal.example", 80), Ok(false));
    }
}

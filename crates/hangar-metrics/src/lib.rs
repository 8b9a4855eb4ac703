//! Hangar's metrics, exposed at `/metrics` in the Prometheus text format (0.0.4).
//!
//! One [`Metrics`] per server, shared by the layers that count: the sandbox service (how long
//! lifecycle operations take, per driver), the session service (idle suspensions), the API
//! (data-plane requests) and the egress recorder. What is only known at scrape time (sessions
//! by state, the host's memory, CPU and disk) is passed to [`Metrics::encode`].
//!
//! Labels are bounded: agent, version, protocol, status, driver, operation, state, direction —
//! never a session or sandbox id.

use std::sync::Mutex;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    agent: String,
    version: String,
    protocol: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestKind {
    agent: String,
    version: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    driver: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressBytes {
    agent: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressDecision {
    agent: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionState {
    agent: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

/// What the host looks like at scrape time.
#[derive(Debug, Clone, Default)]
pub struct HostStats {
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// CPU time of all cores since boot, busy and idle.
    pub cpu_busy_seconds: f64,
    pub cpu_idle_seconds: f64,
    /// The data directory's file system.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// Disk blocks the sandboxes' own files (volumes, checkpoints, VM memory) take.
    pub sandboxes_disk_bytes: u64,
    /// Memory charged to sandboxes' cgroups now, and the CPU time they have used (all of
    /// this host's Hangar sandboxes: the cgroups are shared by every server on it).
    pub sandboxes_memory_bytes: u64,
    pub sandboxes_cpu_seconds: f64,
    /// Sandboxes by state, whatever they serve.
    pub sandboxes: Vec<(String, i64)>,
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    request_seconds: Family<RequestKind, Histogram>,
    operations: Family<Operation, Histogram>,
    idle_suspensions: Family<AgentLabel, Counter>,
    egress_bytes: Family<EgressBytes, Counter>,
    egress_connections: Family<EgressDecision, Counter>,
    dlp_hits: Family<AgentLabel, Counter>,
    sessions: Family<SessionState, Gauge>,
    sandboxes: Family<SessionState, Gauge>,
    memory: Family<Kind, Gauge>,
    cpu: Family<Kind, Counter<f64, std::sync::atomic::AtomicU64>>,
    disk: Family<Kind, Gauge>,
    /// Serialises scrapes: they reset the scrape-time gauges.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hangar");
        let requests = Family::<Request, Counter>::default();
        registry.register(
            "requests",
            "Data-plane requests by agent, version, protocol and status",
            requests.clone(),
        );
        // 1 ms to ~65 s; time to the answer's headers (a stream's first byte).
        let request_seconds = Family::<RequestKind, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "request_duration_seconds",
            "Data-plane requests' time to the answer's headers, by agent, version and protocol",
            request_seconds.clone(),
        );
        // 1 ms to ~65 s: a container starts in milliseconds, a VM under TCG in seconds.
        let operations = Family::<Operation, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "sandbox_operation_seconds",
            "How long sandbox creations, suspensions and resumptions took, by driver",
            operations.clone(),
        );
        let idle_suspensions = Family::<AgentLabel, Counter>::default();
        registry.register(
            "idle_suspensions",
            "Sessions scaled to zero after their idle timeout",
            idle_suspensions.clone(),
        );
        let egress_bytes = Family::<EgressBytes, Counter>::default();
        registry.register(
            "egress_bytes",
            "Bytes carried by sandboxes' egress proxies, out (to destinations) and in",
            egress_bytes.clone(),
        );
        let egress_connections = Family::<EgressDecision, Counter>::default();
        registry.register(
            "egress_connections",
            "Egress connections, allowed or denied",
            egress_connections.clone(),
        );
        let dlp_hits = Family::<AgentLabel, Counter>::default();
        registry.register(
            "dlp_hits",
            "Data-loss guardrail hits, in answers and egress requests",
            dlp_hits.clone(),
        );
        let sessions = Family::<SessionState, Gauge>::default();
        registry.register("sessions", "Sessions by agent and state", sessions.clone());
        let sandboxes = Family::<SessionState, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes by state (the agent label is empty)",
            sandboxes.clone(),
        );
        let memory = Family::<Kind, Gauge>::default();
        registry.register("host_memory_bytes", "The host's memory", memory.clone());
        let cpu = Family::<Kind, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "host_cpu_seconds",
            "The host's CPU time since boot, all cores",
            cpu.clone(),
        );
        let disk = Family::<Kind, Gauge>::default();
        registry.register(
            "disk_bytes",
            "The data directory's file system, and what sandboxes take of it",
            disk.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            operations,
            idle_suspensions,
            egress_bytes,
            egress_connections,
            dlp_hits,
            sessions,
            sandboxes,
            memory,
            cpu,
            disk,
            scrape: Mutex::new(()),
        }
    }

    pub fn request(&self, agent: &str, version: Option<i64>, protocol: &str, status: u16) {
        self.requests
            .get_or_create(&Request {
                agent: agent.to_owned(),
                version: version.map(|v| v.to_string()).unwrap_or_default(),
                protocol: protocol.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    /// How long a data-plane request took to its answer's headers.
    pub fn request_duration(
        &self,
        agent: &str,
        version: Option<i64>,
        protocol: &str,
        seconds: f64,
    ) {
        self.request_seconds
            .get_or_create(&RequestKind {
                agent: agent.to_owned(),
                version: version.map(|v| v.to_string()).unwrap_or_default(),
                protocol: protocol.to_owned(),
            })
            .observe(seconds);
    }

    /// A sandbox lifecycle operation (`create`, `suspend`, `resume`) that succeeded.
    pub fn sandbox_operation(&self, driver: &str, operation: &str, seconds: f64) {
        self.operations
            .get_or_create(&Operation {
                driver: driver.to_owned(),
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    pub fn idle_suspension(&self, agent: &str) {
        self.idle_suspensions
            .get_or_create(&AgentLabel {
                agent: agent.to_owned(),
            })
            .inc();
    }

    pub fn egress(&self, agent: &str, allowed: bool, bytes_out: u64, bytes_in: u64) {
        let agent = agent.to_owned();
        self.egress_connections
            .get_or_create(&EgressDecision {
                agent: agent.clone(),
                decision: if allowed { "allowed" } else { "denied" }.into(),
            })
            .inc();
        for (direction, n) in [("out", bytes_out), ("in", bytes_in)] {
            self.egress_bytes
                .get_or_create(&EgressBytes {
                    agent: agent.clone(),
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }

    pub fn dlp_hit(&self, agent: &str) {
        self.dlp_hits
            .get_or_create(&AgentLabel {
                agent: agent.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the scrape-time values: sessions by (agent, state) and the
    /// host.
    pub fn encode(&self, sessions: &[(String, String, i64)], host: &HostStats) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.sessions.clear();
        for (agent, state, n) in sessions {
            self.sessions
                .get_or_create(&SessionState {
                    agent: agent.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        self.sandboxes.clear();
        for (state, n) in &host.sandboxes {
            self.sandboxes
                .get_or_create(&SessionState {
                    agent: String::new(),
                    state: state.clone(),
                })
                .set(*n);
        }
        let gauge = |f: &Family<Kind, Gauge>, kind: &str, v: u64| {
            f.get_or_create(&Kind { kind: kind.into() })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.memory, "total", host.memory_total_bytes);
        gauge(&self.memory, "available", host.memory_available_bytes);
        gauge(&self.memory, "sandboxes", host.sandboxes_memory_bytes);
        gauge(&self.disk, "total", host.disk_total_bytes);
        gauge(&self.disk, "free", host.disk_free_bytes);
        gauge(&self.disk, "sandboxes", host.sandboxes_disk_bytes);
        // A counter cannot be set: add what it lacks (the kernel's count only grows).
        for (kind, v) in [
            ("busy", host.cpu_busy_seconds),
            ("idle", host.cpu_idle_seconds),
            ("sandboxes", host.sandboxes_cpu_seconds),
        ] {
            let c = self.cpu.get_or_create(&Kind { kind: kind.into() });
            let now = c.get();
            if v > now {
                c.inc_by(v - now);
            }
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The host's memory and CPU from `/proc`, and the file system holding `data_dir`.
pub fn host_stats(data_dir: &std::path::Path) -> HostStats {
    let mut s = HostStats::default();
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        for line in meminfo.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(kb)) = (parts.next(), parts.next()) else {
                continue;
            };
            let bytes = kb.parse::<u64>().unwrap_or(0) * 1024;
            match key {
                "MemTotal:" => s.memory_total_bytes = bytes,
                "MemAvailable:" => s.memory_available_bytes = bytes,
                _ => {}
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) {
            // user nice system idle iowait irq softirq steal ...; USER_HZ is 100 on Linux.
            let v: Vec<f64> = cpu
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
            let total: f64 = v.iter().take(8).sum();
            s.cpu_idle_seconds = idle / 100.0;
            s.cpu_busy_seconds = (total - idle) / 100.0;
        }
    }
    if let Ok(fs) = statvfs(data_dir) {
        s.disk_total_bytes = fs.0;
        s.disk_free_bytes = fs.1;
    }
    s.sandboxes_disk_bytes = allocated(&data_dir.join("sandboxes"), 3);
    (s.sandboxes_memory_bytes, s.sandboxes_cpu_seconds) = sandbox_cgroups();
    s
}

/// What the sandboxes' cgroups hold: `hangar/<id>` (crun, runsc) and `hangar-vm/<name>`
/// (QEMU). A parent cgroup's counters include its children's, past ones too for the CPU.
fn sandbox_cgroups() -> (u64, f64) {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let read = |p: std::path::PathBuf| -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    let (mut memory, mut cpu_ns) = (0u64, 0u64);
    for group in ["hangar", "hangar-vm"] {
        if root.join("cgroup.controllers").exists() {
            // cgroup v2: memory.current, and cpu.stat's usage_usec.
            memory += read(root.join(group).join("memory.current")).unwrap_or(0);
            if let Ok(stat) = std::fs::read_to_string(root.join(group).join("cpu.stat")) {
                cpu_ns += stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1000;
            }
        } else {
            memory += read(
                root.join("memory")
                    .join(group)
                    .join("memory.usage_in_bytes"),
            )
            .unwrap_or(0);
            cpu_ns += read(root.join("cpuacct").join(group).join("cpuacct.usage")).unwrap_or(0);
        }
    }
    (memory, cpu_ns as f64 / 1e9)
}

fn statvfs(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)?;
    // All u64 on 64-bit Linux.
    let frsize = st.fragment_size();
    Ok((st.blocks() * frsize, st.blocks_available() * frsize))
}

/// Disk blocks taken by the files under `dir`, `depth` levels down (sparse files count what
/// they hold, not their size).
fn allocated(dir: &std::path::Path, depth: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() {
            if depth > 0 {
                total += allocated(&e.path(), depth - 1);
            }
        } else if m.is_file() {
            total += m.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_prometheus_text() {
        let m = Metrics::new();
        m.request("notes", Some(2), "responses", 200);
        m.request("notes", Some(2), "responses", 200);
        m.request_duration("notes", Some(2), "responses", 0.003);
        m.sandbox_operation("gvisor", "create", 0.2);
        m.egress("notes", true, 10, 20);
        let text = m.encode(
            &[("notes".into(), "running".into(), 3)],
            &HostStats {
                cpu_busy_seconds: 5.0,
                ..Default::default()
            },
        );
        assert!(
            text.contains("# TYPE hangar_requests_total counter"),
            "{text}"
        );
        assert!(text.contains(
            r#"hangar_requests_total{agent="notes",version="2",protocol="responses",status="200"} 2"#
        ));
        assert!(text.contains(
            r#"hangar_request_duration_seconds_bucket{agent="notes",version="2",protocol="responses",le="0.004"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"hangar_sandbox_operation_seconds_count{driver="gvisor",operation="create"} 1"#
        ));
        assert!(text.contains(r#"hangar_sessions{agent="notes",state="running"} 3"#));
        assert!(text.contains(r#"hangar_egress_bytes_total{agent="notes",direction="in"} 20"#));
        assert!(text.contains(r#"hangar_host_cpu_seconds_total{kind="busy"} 5"#));
        assert!(!text.contains("# EOF"), "OpenMetrics, not Prometheus text");
        // Scrape-time gauges are replaced, not added to.
        let text = m.encode(&[], &HostStats::default());
        assert!(!text.contains(r#"hangar_sessions{"#), "{text}");
    }

    #[test]
    fn host_stats_come_from_proc() {
        let s = host_stats(std::path::Path::new("/tmp"));
        assert!(s.memory_total_bytes > 0 && s.memory_available_bytes <= s.memory_total_bytes);
        assert!(s.cpu_busy_seconds + s.cpu_idle_seconds > 0.0);
        assert!(s.disk_total_bytes > 0);
    }
}

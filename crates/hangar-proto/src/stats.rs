//! `GET /v1/stats`: recent data-plane requests per agent and version — counts, errors and
//! latency percentiles over a window of one-minute buckets (the dashboard's numbers and
//! charts, without a Prometheus server). `docs/dashboard.md` documents the answer.

use serde::{Deserialize, Serialize};

/// The whole answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsAnswer {
    /// How far back the figures reach (the window), in seconds.
    pub window_seconds: u64,
    /// The width of one point of a series, in seconds.
    pub bucket_seconds: u64,
    /// When the figures were taken (Unix seconds).
    pub now: u64,
    /// Every entry below merged (the fleet, or the one agent asked for).
    pub total: Figures,
    /// One entry per agent and version that had requests in the window, by agent then
    /// version. `version` is null for requests refused before a version was chosen.
    pub agents: Vec<AgentFigures>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentFigures {
    pub agent: String,
    pub version: Option<i64>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Figures over the window, and per bucket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Figures {
    pub requests: u64,
    /// Answers with a 5xx status: the agent or the platform failed.
    pub errors: u64,
    /// Answers with a 4xx status: the caller's request was refused.
    pub client_errors: u64,
    /// Requests per minute, averaged over the window (or since the server started, if later).
    pub rate_per_min: f64,
    /// Time to the answer's headers, in milliseconds; null without requests.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Every bucket of the window, oldest first (empty ones included).
    pub series: Vec<Point>,
}

/// One bucket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// The bucket's start (Unix seconds).
    pub start: u64,
    pub requests: u64,
    pub errors: u64,
    pub client_errors: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

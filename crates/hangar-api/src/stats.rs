//! Recent data-plane requests per agent and version, for the dashboard: request rate,
//! errors and latency percentiles without a Prometheus server.
//!
//! Each (agent, version) has a ring of one-minute buckets covering the last hour; a bucket
//! holds its request and error counts and a fixed histogram of latencies (log-spaced, four
//! buckets per doubling, so a percentile read from it is within ~10 % of the true value).
//! Merging histograms is exact, so the fleet's and each bucket's percentiles are computed
//! from the merged counts, never averaged. The audit layer records every data-plane call
//! (`Stats::request`) with the time to the answer's headers: for a streamed answer that is
//! the time to its first byte, not to its end.
//!
//! Memory is bounded: a minute without requests holds no histogram, and at most
//! [`MAX_SERIES`] (agent, version) pairs are kept (the agent name comes from the URL, so a
//! caller could otherwise make up any number of them).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use hangar_proto::agent::USER_HEADER;
use hangar_proto::stats::{AgentFigures, Figures, Point, StatsAnswer};

use crate::{ApiError, AppState};

/// The width of one bucket, in seconds.
const BUCKET_SECONDS: u64 = 60;
/// Buckets in the window: an hour.
const BUCKETS: usize = 60;
/// The most (agent, version) pairs kept.
pub const MAX_SERIES: usize = 512;

/// Latency histogram buckets: bucket 0 is up to [`FIRST_US`], bucket `i` up to
/// `FIRST_US · 2^(i/4)`; the last one (~23 min) also takes anything longer.
const HIST_BUCKETS: usize = 96;
const FIRST_US: f64 = 100.0;
const PER_DOUBLING: f64 = 4.0;

fn upper_us(i: usize) -> f64 {
    FIRST_US * (i as f64 / PER_DOUBLING).exp2()
}

fn lower_us(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        upper_us(i - 1)
    }
}

fn bucket_of(us: u64) -> usize {
    let v = us as f64;
    if v <= FIRST_US {
        return 0;
    }
    let i = (PER_DOUBLING * (v / FIRST_US).log2()).ceil() as usize;
    // Rounding may put a value on a bound one bucket off; the bounds decide.
    let i = i.min(HIST_BUCKETS - 1);
    if i > 0 && v <= upper_us(i - 1) {
        i - 1
    } else {
        i
    }
}

/// Latencies in microseconds, merged exactly by adding counts.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Empty until the first sample (most buckets of most series see none).
    counts: Vec<u32>,
    total: u64,
    min_us: u64,
    max_us: u64,
}

impl Histogram {
    fn observe(&mut self, us: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_BUCKETS];
            self.min_us = us;
            self.max_us = us;
        }
        let b = &mut self.counts[bucket_of(us)];
        *b = b.saturating_add(1);
        self.total += 1;
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        if self.total == 0 {
            *self = other.clone();
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The `q` quantile (0 < q ≤ 1) in milliseconds: interpolated inside the bucket that
    /// holds it, and never outside what was seen.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let c = u64::from(c);
            if c == 0 || below + c < rank {
                below += c;
                continue;
            }
            let within = (rank - below) as f64 / c as f64;
            let (lo, hi) = (lower_us(i), upper_us(i));
            let us = (lo + (hi - lo) * within).clamp(self.min_us as f64, self.max_us as f64);
            return Some((us / 10.0).round() / 100.0);
        }
        Some(self.max_us as f64 / 1000.0)
    }
}

/// One minute of one series.
#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Which minute (Unix seconds / 60) this slot holds now.
    minute: u64,
    requests: u64,
    errors: u64,
    client_errors: u64,
    latency: Histogram,
}

impl Bucket {
    fn merge(&mut self, other: &Bucket) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.client_errors += other.client_errors;
        self.latency.merge(&other.latency);
    }
}

/// The ring of one (agent, version): slot `minute % BUCKETS`.
#[derive(Debug)]
struct Series {
    slots: Vec<Bucket>,
}

impl Series {
    fn new() -> Series {
        Series {
            slots: vec![
                Bucket {
                    minute: u64::MAX,
                    ..Default::default()
                };
                BUCKETS
            ],
        }
    }

    /// The bucket of `minute`, if it is still in the slot.
    fn at(&self, minute: u64) -> Option<&Bucket> {
        let b = &self.slots[(minute % BUCKETS as u64) as usize];
        (b.minute == minute).then_some(b)
    }

    /// Whether anything in it is still inside the window ending at `minute`.
    fn live(&self, minute: u64) -> bool {
        self.slots
            .iter()
            .any(|b| b.minute != u64::MAX && b.minute + (BUCKETS as u64) > minute)
    }
}

type Key = (String, Option<i64>);

/// Per agent and version, a window of request counts and latencies.
#[derive(Debug)]
pub struct Stats {
    /// When counting began (Unix seconds): the rate of a young server is over its life.
    started: u64,
    series: Mutex<HashMap<Key, Series>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new(unix_now())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Stats {
    fn new(started: u64) -> Stats {
        Stats {
            started,
            series: Mutex::new(HashMap::new()),
        }
    }

    /// A data-plane call that was answered with `status` after `elapsed`. `version` is
    /// `None` when the request was refused before a version was chosen.
    pub fn request(&self, agent: &str, version: Option<i64>, status: u16, elapsed: Duration) {
        self.record_at(unix_now(), agent, version, status, elapsed);
    }

    fn record_at(
        &self,
        now: u64,
        agent: &str,
        version: Option<i64>,
        status: u16,
        elapsed: Duration,
    ) {
        let minute = now / BUCKET_SECONDS;
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let key = (agent.to_owned(), version);
        if !all.contains_key(&key) {
            if all.len() >= MAX_SERIES {
                all.retain(|_, s| s.live(minute));
            }
            if all.len() >= MAX_SERIES {
                return;
            }
            all.insert(key.clone(), Series::new());
        }
        let series = all.get_mut(&key).expect("inserted above");
        let slot = &mut series.slots[(minute % BUCKETS as u64) as usize];
        if slot.minute != minute {
            *slot = Bucket {
                minute,
                ..Default::default()
            };
        }
        slot.requests += 1;
        match status {
            500..=599 => slot.errors += 1,
            400..=499 => slot.client_errors += 1,
            _ => {}
        }
        slot.latency
            .observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// The figures now, for every agent or for one.
    pub fn snapshot(&self, agent: Option<&str>) -> StatsAnswer {
        self.snapshot_at(unix_now(), agent)
    }

    fn snapshot_at(&self, now: u64, agent: Option<&str>) -> StatsAnswer {
        let minute = now / BUCKET_SECONDS;
        let first = (minute + 1).saturating_sub(BUCKETS as u64);
        // Minutes the rate is averaged over: the window, or the server's life if shorter.
        let minutes = (now.saturating_sub(self.started).div_ceil(BUCKET_SECONDS))
            .clamp(1, BUCKETS as u64) as f64;
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, s| s.live(minute));
        let mut chosen: BTreeMap<&Key, &Series> = all
            .iter()
            .filter(|((a, _), _)| agent.is_none_or(|want| a == want))
            .collect();
        chosen.retain(|_, s| (first..=minute).any(|m| s.at(m).is_some_and(|b| b.requests > 0)));
        let mut total: Vec<Bucket> = vec![Bucket::default(); BUCKETS];
        let mut agents = Vec::new();
        for ((name, version), series) in chosen {
            let buckets: Vec<Bucket> = (first..=minute)
                .map(|m| series.at(m).cloned().unwrap_or_default())
                .collect();
            for (t, b) in total.iter_mut().zip(&buckets) {
                t.merge(b);
            }
            agents.push(AgentFigures {
                agent: name.clone(),
                version: *version,
                figures: figures(&buckets, first, minutes),
            });
        }
        StatsAnswer {
            window_seconds: BUCKETS as u64 * BUCKET_SECONDS,
            bucket_seconds: BUCKET_SECONDS,
            now,
            total: figures(&total[..(minute + 1 - first) as usize], first, minutes),
            agents,
        }
    }
}

/// The figures of consecutive buckets, the first of which is minute `first`.
fn figures(buckets: &[Bucket], first: u64, minutes: f64) -> Figures {
    let mut all = Bucket::default();
    let mut series = Vec::with_capacity(buckets.len());
    for (i, b) in buckets.iter().enumerate() {
        all.merge(b);
        series.push(Point {
            start: (first + i as u64) * BUCKET_SECONDS,
            requests: b.requests,
            errors: b.errors,
            client_errors: b.client_errors,
            p50_ms: b.latency.quantile_ms(0.50),
            p95_ms: b.latency.quantile_ms(0.95),
            p99_ms: b.latency.quantile_ms(0.99),
        });
    }
    Figures {
        requests: all.requests,
        errors: all.errors,
        client_errors: all.client_errors,
        rate_per_min: ((all.requests as f64 / minutes) * 100.0).round() / 100.0,
        p50_ms: all.latency.quantile_ms(0.50),
        p95_ms: all.latency.quantile_ms(0.95),
        p99_ms: all.latency.quantile_ms(0.99),
        series,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    agent: Option<String>,
}

/// `GET /v1/stats?agent=`: the operator's view of the fleet (a caller acting as one end
/// user sees none of it).
pub async fn get(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StatsQuery>,
) -> Result<Json<StatsAnswer>, ApiError> {
    if headers.contains_key(USER_HEADER) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("fleet statistics are the operator's, not an end user's ({USER_HEADER})"),
        ));
    }
    Ok(Json(st.stats.snapshot(q.agent.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_764_237_600; // a minute boundary

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn near(got: Option<f64>, want: f64) {
        let got = got.expect("a percentile");
        assert!(
            (got - want).abs() <= want * 0.1,
            "got {got} ms, want {want} ms ± 10 %"
        );
    }

    #[test]
    fn buckets_hold_their_bounds() {
        for us in [0, 1, 100, 101, 118, 119, 1000, 65_432, 10_000_000, u64::MAX] {
            let i = bucket_of(us);
            assert!(i < HIST_BUCKETS);
            assert!(us as f64 > lower_us(i) || i == 0, "{us} below bucket {i}");
            assert!(
                us as f64 <= upper_us(i) || i == HIST_BUCKETS - 1,
                "{us} above bucket {i}"
            );
        }
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let s = Stats::new(T0);
        // 90 fast requests, 9 slow, 1 very slow.
        for i in 0..90 {
            s.record_at(T0 + 5, "notes", Some(1), 200, ms(10 + i % 5));
        }
        for _ in 0..9 {
            s.record_at(T0 + 5, "notes", Some(1), 200, ms(400));
        }
        s.record_at(T0 + 5, "notes", Some(1), 502, ms(2000));
        let a = s.snapshot_at(T0 + 30, None);
        let f = &a.agents[0].figures;
        assert_eq!((f.requests, f.errors, f.client_errors), (100, 1, 0));
        near(f.p50_ms, 12.0);
        near(f.p95_ms, 400.0);
        near(f.p99_ms, 400.0);
        // The slowest is the maximum, exactly.
        let h = s.series.lock().unwrap()[&("notes".to_owned(), Some(1))].slots
            [(T0 / 60 % 60) as usize]
            .latency
            .clone();
        assert_eq!(h.quantile_ms(1.0), Some(2000.0));
        // One sample is itself at every percentile.
        let mut one = Histogram::default();
        one.observe(42_000);
        assert_eq!(one.quantile_ms(0.5), Some(42.0));
        assert_eq!(one.quantile_ms(0.99), Some(42.0));
        assert_eq!(Histogram::default().quantile_ms(0.5), None);
    }

    #[test]
    fn the_fleet_merges_histograms_not_percentiles() {
        let s = Stats::new(T0);
        for _ in 0..99 {
            s.record_at(T0, "fast", Some(1), 200, ms(5));
        }
        s.record_at(T0, "slow", Some(3), 200, ms(900));
        s.record_at(T0, "slow", None, 404, ms(1));
        let a = s.snapshot_at(T0 + 1, None);
        let keys: Vec<_> = a
            .agents
            .iter()
            .map(|f| (f.agent.as_str(), f.version))
            .collect();
        assert_eq!(keys, [("fast", Some(1)), ("slow", None), ("slow", Some(3))]);
        assert_eq!(a.total.requests, 101);
        assert_eq!(a.total.client_errors, 1);
        near(a.total.p50_ms, 5.0);
        near(a.total.p99_ms, 5.0);
        assert_eq!(a.total.series.len(), BUCKETS);
        // One agent's view.
        let slow = s.snapshot_at(T0 + 1, Some("slow"));
        assert_eq!(slow.agents.len(), 2);
        assert_eq!(slow.total.requests, 2);
        near(slow.total.p99_ms, 900.0);
    }

    #[test]
    fn the_window_rolls_over() {
        let s = Stats::new(T0);
        s.record_at(T0, "notes", Some(1), 200, ms(10));
        s.record_at(T0 + 60, "notes", Some(1), 500, ms(20));
        s.record_at(T0 + 61, "notes", Some(1), 200, ms(20));
        let a = s.snapshot_at(T0 + 90, None);
        let f = &a.agents[0].figures;
        assert_eq!((f.requests, f.errors), (3, 1));
        // Two minutes of life: the rate is over them, not over the hour.
        assert_eq!(f.rate_per_min, 1.5);
        let last = f.series.last().unwrap();
        assert_eq!((last.start, last.requests), (T0 + 60, 2));
        assert_eq!(f.series[BUCKETS - 2].start, T0);
        assert_eq!(f.series[BUCKETS - 2].requests, 1);
        assert!(f.series[0].p50_ms.is_none());

        // An hour on, the first minute has left the window; its slot is reused.
        let later = T0 + 60 * 60;
        let a = s.snapshot_at(later, None);
        assert_eq!(a.agents[0].figures.requests, 2);
        assert_eq!(a.agents[0].figures.rate_per_min, 0.03);
        s.record_at(later + 5, "notes", Some(1), 200, ms(30));
        let a = s.snapshot_at(later + 6, None);
        assert_eq!(a.agents[0].figures.requests, 3);
        assert_eq!(a.agents[0].figures.series.last().unwrap().requests, 1);

        // Two hours on, nothing is left, and the series is dropped.
        let a = s.snapshot_at(later + 2 * 3600, None);
        assert!(a.agents.is_empty());
        assert_eq!(a.total.requests, 0);
        assert!(s.series.lock().unwrap().is_empty());
    }

    #[test]
    fn series_are_bounded() {
        let s = Stats::new(T0);
        for i in 0..MAX_SERIES + 10 {
            s.record_at(T0, &format!("a{i}"), Some(1), 404, ms(1));
        }
        assert_eq!(s.series.lock().unwrap().len(), MAX_SERIES);
        // Once the old ones have left the window, new ones take their place.
        s.record_at(T0 + 2 * 3600, "new", Some(1), 200, ms(1));
        assert_eq!(s.series.lock().unwrap().len(), 1);
    }
}

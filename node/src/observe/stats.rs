//! Golden signals over a sliding window: requests, failures and a latency
//! histogram per service (each way through this agent) and per route rule
//! and arm. `gossamer stat` and `gossamer top` read them through
//! `GET /v1/stats`; with `mesh=true` the agent also asks its peers for
//! theirs over the mesh ([`STREAM_STATS`]) and merges the histograms, so
//! mesh-wide percentiles are exact to the histogram's resolution, not
//! averages of percentiles.
//!
//! The window is kept as [`SLOTS`] slots of [`SLOT`] each; a slot's
//! histogram is allocated on its first request, so a service with no
//! traffic costs a few words. Latencies fall into log-linear bins, 16 per
//! power of two, so a reported percentile is within about 3 % of the truth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One slot's span.
pub const SLOT: Duration = Duration::from_secs(2);
/// Slots kept: the longest window is `SLOT * (SLOTS - 1)`.
pub const SLOTS: usize = 31;
/// The longest window a caller may ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
/// Services tracked at most (requests for others are not counted).
pub const MAX_SERVICES: usize = 4096;
/// Route rule/arm pairs tracked per service at most.
const MAX_ROUTES: usize = 64;
/// Bins below this are one microsecond wide.
const LINEAR: u64 = 16;
/// Sub-bins per power of two.
const SUB_BITS: u32 = 4;
/// Enough bins for 2^31 µs (about 36 minutes); longer falls in the last.
pub const BINS: usize = (LINEAR as usize) + (31 - SUB_BITS as usize) * (1 << SUB_BITS);

/// The bin of a latency in microseconds.
pub fn bin(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    let power = 63 - micros.leading_zeros(); // ≥ SUB_BITS
    let sub = (micros >> (power - SUB_BITS)) & (LINEAR - 1);
    let index = LINEAR as usize + (power - SUB_BITS) as usize * LINEAR as usize + sub as usize;
    index.min(BINS - 1)
}

/// The middle of a bin, in microseconds.
pub fn bin_value(index: usize) -> f64 {
    if (index as u64) < LINEAR {
        return index as f64;
    }
    let rest = index as u64 - LINEAR;
    let shift = (rest / LINEAR) as u32;
    let low = (LINEAR + rest % LINEAR) << shift;
    low as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
}

#[derive(Debug, Default, Clone)]
struct Slot {
    epoch: u64,
    requests: u64,
    failures: u64,
    bins: Vec<u32>,
}

/// One series: the slots of a service one way, or of a route arm.
#[derive(Debug, Clone)]
struct Series {
    slots: Vec<Slot>,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            slots: vec![Slot::default(); SLOTS],
        }
    }
}

impl Series {
    fn record(&mut self, epoch: u64, latency: Duration, failed: bool) {
        let slot = &mut self.slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.requests = 0;
            slot.failures = 0;
            slot.bins.iter_mut().for_each(|b| *b = 0);
        }
        if slot.bins.is_empty() {
            slot.bins = vec![0; BINS];
        }
        slot.requests += 1;
        slot.failures += u64::from(failed);
        let b = bin(latency.as_micros().min(u128::from(u64::MAX)) as u64);
        slot.bins[b] = slot.bins[b].saturating_add(1);
    }

    /// The sum over slots from `first` to `last` (epochs).
    fn window(&self, first: u64, last: u64) -> Counts {
        let mut out = Counts::default();
        for slot in &self.slots {
            if slot.epoch < first || slot.epoch > last || slot.requests == 0 {
                continue;
            }
            out.requests += slot.requests;
            out.failures += slot.failures;
            out.add_bins(slot.bins.iter().enumerate().map(|(i, &n)| (i, n)));
        }
        out
    }

    fn last_epoch(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.requests > 0)
            .map(|s| s.epoch)
            .max()
            .unwrap_or(0)
    }
}

/// Requests, failures and latency bins (sparse: bin index and count).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests answered.
    pub requests: u64,
    /// Of which failed (5xx, or no answer).
    pub failures: u64,
    /// `(bin, count)`, sorted by bin.
    pub bins: Vec<(u16, u32)>,
}

impl Counts {
    fn add_bins(&mut self, bins: impl Iterator<Item = (usize, u32)>) {
        let mut dense = self.dense();
        for (i, n) in bins {
            if n > 0 && i < BINS {
                dense[i] = dense[i].saturating_add(n);
            }
        }
        self.bins = dense
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, &n)| (i as u16, n))
            .collect();
    }

    fn dense(&self) -> Vec<u32> {
        let mut dense = vec![0u32; BINS];
        for &(i, n) in &self.bins {
            if let Some(d) = dense.get_mut(usize::from(i)) {
                *d = d.saturating_add(n);
            }
        }
        dense
    }

    /// Adds another's counts (another node's, for the mesh-wide view).
    pub fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.add_bins(other.bins.iter().map(|&(i, n)| (usize::from(i), n)));
    }

    /// The latency below which a share `q` of requests fell, in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.bins.iter().map(|&(_, n)| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(i, n) in &self.bins {
            seen += u64::from(n);
            if seen >= rank {
                return Some(bin_value(usize::from(i)) / 1000.0);
            }
        }
        None
    }
}

/// Which way requests went through this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From local clients (and gateway routes) to the service: the callers'
    /// view, with retries and failover included.
    Outbound,
    /// From the mesh to a local instance of the service.
    Inbound,
}

#[derive(Debug, Default)]
struct ServiceSeries {
    outbound: Series,
    inbound: Series,
    /// `(rule, arm)` → series.
    routes: Vec<(String, String, Series)>,
}

/// Every series of this agent.
#[derive(Debug)]
pub struct Stats {
    start: Instant,
    services: RwLock<HashMap<String, Arc<Mutex<ServiceSeries>>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            services: RwLock::default(),
        }
    }
}

/// One row of a window: a service one way, or one route arm of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Which way.
    pub direction: Direction,
    /// The destination service.
    pub service: String,
    /// `rule/arm` for a route arm's row, `None` for the service's.
    pub route: Option<String>,
    /// What the window holds.
    pub counts: Counts,
}

impl Stats {
    fn epoch(&self, at: Instant) -> u64 {
        // Epoch 0 means "never used" in a slot, so count from 1.
        1 + (at.saturating_duration_since(self.start).as_millis() / SLOT.as_millis()) as u64
    }

    fn series(&self, service: &str) -> Option<Arc<Mutex<ServiceSeries>>> {
        if let Some(s) = self.services.read().expect("stats lock").get(service) {
            return Some(s.clone());
        }
        let mut all = self.services.write().expect("stats lock");
        if all.len() >= MAX_SERVICES && !all.contains_key(service) {
            return None;
        }
        Some(all.entry(service.to_owned()).or_default().clone())
    }

    /// Counts one request to `service`, answered `at`.
    pub fn record(
        &self,
        direction: Direction,
        service: &str,
        latency: Duration,
        failed: bool,
        at: Instant,
    ) {
        let Some(series) = self.series(service) else {
            return;
        };
        let epoch = self.epoch(at);
        let mut s = series.lock().expect("stats lock");
        match direction {
            Direction::Outbound => s.outbound.record(epoch, latency, failed),
            Direction::Inbound => s.inbound.record(epoch, latency, failed),
        }
    }

    /// Counts one request under `service`'s route document, by the rule
    /// that matched and the arm taken, answered `at`.
    pub fn record_route(
        &self,
        service: &str,
        rule: &str,
        arm: &str,
        latency: Duration,
        failed: bool,
        at: Instant,
    ) {
        let Some(series) = self.series(service) else {
            return;
        };
        let epoch = self.epoch(at);
        let mut s = series.lock().expect("stats lock");
        let found = s.routes.iter().position(|(r, a, _)| r == rule && a == arm);
        let index = match found {
            Some(i) => i,
            None if s.routes.len() < MAX_ROUTES => {
                s.routes
                    .push((rule.to_owned(), arm.to_owned(), Series::default()));
                s.routes.len() - 1
            }
            None => return,
        };
        s.routes[index].2.record(epoch, latency, failed);
    }

    /// The rows of the last `window` (capped at [`MAX_WINDOW`]) and the
    /// seconds it really covers (less while the agent is younger). Services
    /// idle for the whole kept history are forgotten.
    pub fn window(&self, window: Duration) -> (Vec<Row>, f64) {
        let now = Instant::now();
        let window = window.clamp(SLOT, MAX_WINDOW);
        let last = self.epoch(now);
        let slots = (window.as_millis().div_ceil(SLOT.as_millis())) as u64;
        let first = last.saturating_sub(slots).max(1);
        // The current slot is partly filled: the window ends now and
        // starts `slots` whole slots before the current one began.
        let into_current = now.saturating_duration_since(self.start).as_secs_f64()
            - (last - 1) as f64 * SLOT.as_secs_f64();
        let covered = ((last - first) as f64 * SLOT.as_secs_f64() + into_current)
            .min(now.saturating_duration_since(self.start).as_secs_f64())
            .max(0.001);
        let mut rows = Vec::new();
        let mut idle = Vec::new();
        {
            let all = self.services.read().expect("stats lock");
            for (name, series) in all.iter() {
                let s = series.lock().expect("stats lock");
                let newest = s.outbound.last_epoch().max(s.inbound.last_epoch());
                if newest + (SLOTS as u64) < last {
                    idle.push(name.clone());
                    continue;
                }
                for (direction, series) in [
                    (Direction::Outbound, &s.outbound),
                    (Direction::Inbound, &s.inbound),
                ] {
                    let counts = series.window(first, last);
                    if counts.requests > 0 {
                        rows.push(Row {
                            direction,
                            service: name.clone(),
                            route: None,
                            counts,
                        });
                    }
                }
                for (rule, arm, series) in &s.routes {
                    let counts = series.window(first, last);
                    if counts.requests > 0 {
                        rows.push(Row {
                            direction: Direction::Outbound,
                            service: name.clone(),
                            route: Some(format!("{rule}/{arm}")),
                            counts,
                        });
                    }
                }
            }
        }
        if !idle.is_empty() {
            let mut all = self.services.write().expect("stats lock");
            for name in idle {
                all.remove(&name);
            }
        }
        rows.sort_by(|a, b| {
            (a.direction, &a.service, &a.route).cmp(&(b.direction, &b.service, &b.route))
        });
        (rows, covered)
    }
}

impl PartialOrd for Direction {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Direction {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

/// A row as `GET /v1/stats` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Which way.
    pub direction: Direction,
    /// The service.
    pub service: String,
    /// `rule/arm`, for a route arm.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub route: Option<String>,
    /// The agent that saw them (with `by_node`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests that did not fail, 0 to 1.
    pub success_rate: f64,
    /// Latency percentiles, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
}

impl Summary {
    /// The summary of merged rows over `seconds`.
    pub fn of(row: &Row, seconds: f64) -> Self {
        let c = &row.counts;
        Self {
            direction: row.direction,
            service: row.service.clone(),
            route: row.route.clone(),
            node: None,
            requests: c.requests,
            rps: c.requests as f64 / seconds.max(0.001),
            success_rate: if c.requests == 0 {
                1.0
            } else {
                1.0 - c.failures as f64 / c.requests as f64
            },
            p50_ms: c.quantile_ms(0.50),
            p90_ms: c.quantile_ms(0.90),
            p99_ms: c.quantile_ms(0.99),
        }
    }
}

/// Adds `more` rows into `into`, row by row (same direction, service and
/// route).
pub fn merge(into: &mut Vec<Row>, more: Vec<Row>) {
    for row in more {
        match into.iter_mut().find(|r| {
            r.direction == row.direction && r.service == row.service && r.route == row.route
        }) {
            Some(r) => r.counts.merge(&row.counts),
            None => into.push(row),
        }
    }
    into.sort_by(|a, b| {
        (a.direction, &a.service, &a.route).cmp(&(b.direction, &b.service, &b.route))
    });
}

/// First byte of a stats stream: the opener sends the window in ms (one
/// frame), the server answers with its rows.
pub const STREAM_STATS: u8 = 6;
/// Largest answer (4096 services, two ways, sparse bins).
const MAX_FRAME: usize = 4 * 1024 * 1024;
/// How long one peer may take.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one stats stream (the kind byte already read).
pub async fn serve(
    from: String,
    mut tx: gossamer_transport::SendStream,
    mut rx: gossamer_transport::RecvStream,
    stats: Arc<Stats>,
) {
    use gossamer_membership::codec;
    use gossamer_transport::frame::{read_frame, write_frame};
    let answer = async {
        let frame = read_frame(&mut rx, 64).await.ok()??;
        let millis: u64 = codec::decode_large(&frame, 64).ok()?;
        let (rows, seconds) = stats.window(Duration::from_millis(millis));
        let bytes = codec::encode_large(&(rows, seconds), MAX_FRAME).ok()?;
        write_frame(&mut tx, &bytes).await.ok()?;
        let _ = tx.finish();
        Some(())
    };
    if tokio::time::timeout(PEER_TIMEOUT, answer)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        tracing::debug!(peer = %from, "stats request not answered");
    }
}

/// Asks `peer` for its rows over `window`.
pub async fn ask(
    transport: &gossamer_transport::Transport,
    peer: &str,
    addr: std::net::SocketAddr,
    window: Duration,
) -> Result<(Vec<Row>, f64), String> {
    use gossamer_membership::codec;
    use gossamer_transport::frame::{read_frame, write_frame};
    let exchange = async {
        let (mut tx, mut rx) = transport
            .open_bi(peer, addr)
            .await
            .map_err(|e| e.to_string())?;
        tx.write_all(&[STREAM_STATS])
            .await
            .map_err(|e| e.to_string())?;
        let request =
            codec::encode_large(&(window.as_millis() as u64), 64).map_err(|e| e.to_string())?;
        write_frame(&mut tx, &request)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tx.finish();
        let frame = read_frame(&mut rx, MAX_FRAME)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no answer")?;
        let (rows, seconds): (Vec<Row>, f64) =
            codec::decode_large(&frame, MAX_FRAME).map_err(|e| e.to_string())?;
        if rows.len() > 2 * MAX_SERVICES * (1 + MAX_ROUTES) {
            return Err(format!("{} rows is over the limit", rows.len()));
        }
        Ok((rows, seconds))
    };
    tokio::time::timeout(PEER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PEER_TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_ordered_and_tight() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            1000,
            50_000,
            1_000_000,
            1 << 40,
        ] {
            let b = bin(us);
            assert!(b >= last, "bin({us}) = {b} < {last}");
            last = b;
            if (16..1 << 30).contains(&us) {
                let v = bin_value(b);
                assert!((v - us as f64).abs() / us as f64 <= 0.035, "{us} → {v}");
            }
        }
        assert_eq!(bin(u64::MAX), BINS - 1);
    }

    #[test]
    fn quantiles_of_a_known_load() {
        let stats = Stats::default();
        for i in 0..1000u64 {
            let latency = if i % 100 == 0 {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(50)
            };
            stats.record(
                Direction::Outbound,
                "web",
                latency,
                i % 10 == 0,
                Instant::now(),
            );
            stats.record_route("web", "0", "v2", latency, i % 10 == 0, Instant::now());
        }
        let (rows, secs) = stats.window(Duration::from_secs(10));
        assert!(secs > 0.0);
        assert_eq!(rows.len(), 2);
        let s = Summary::of(&rows[0], 10.0);
        assert_eq!(s.requests, 1000);
        assert!((s.success_rate - 0.9).abs() < 1e-9);
        let p50 = s.p50_ms.unwrap();
        assert!((p50 - 50.0).abs() < 1.5, "{p50}");
        let p99 = s.p99_ms.unwrap();
        assert!((p99 - 50.0).abs() < 1.5, "{p99}"); // 1 % is at 200 ms: p99 is still 50
        let p999 = rows[0].counts.quantile_ms(0.999).unwrap();
        assert!((p999 - 200.0).abs() < 6.0, "{p999}");
        assert_eq!(rows[1].route.as_deref(), Some("0/v2"));
    }

    #[test]
    fn merging_adds_histograms() {
        let a = Stats::default();
        let b = Stats::default();
        for _ in 0..90 {
            a.record(
                Direction::Inbound,
                "db",
                Duration::from_millis(1),
                false,
                Instant::now(),
            );
        }
        for _ in 0..10 {
            b.record(
                Direction::Inbound,
                "db",
                Duration::from_millis(100),
                true,
                Instant::now(),
            );
        }
        let mut rows = a.window(Duration::from_secs(10)).0;
        merge(&mut rows, b.window(Duration::from_secs(10)).0);
        assert_eq!(rows.len(), 1);
        let s = Summary::of(&rows[0], 1.0);
        assert_eq!((s.requests, s.rps as u64), (100, 100));
        assert!((s.success_rate - 0.9).abs() < 1e-9);
        assert!(s.p50_ms.unwrap() < 1.1);
        assert!(s.p99_ms.unwrap() > 95.0);
    }

    #[test]
    fn old_slots_leave_the_window() {
        let mut series = Series::default();
        series.record(5, Duration::from_millis(1), false);
        series.record(5 + SLOTS as u64, Duration::from_millis(1), true);
        // The slot was reused: only the newer request is left.
        let c = series.window(0, u64::MAX);
        assert_eq!((c.requests, c.failures), (1, 1));
        assert_eq!(series.window(0, 5).requests, 0);
    }
}

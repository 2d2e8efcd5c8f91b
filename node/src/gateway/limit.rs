//! Token buckets for a route's rate limits: one for the whole route and
//! one per client IP. Their state is local to each gateway: N gateways
//! behind a load balancer let through up to N times a route's limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::documents::ingress::RateLimit;

/// Client buckets kept per route; past this, full (idle) ones are dropped,
/// and if none is full the oldest half goes.
const MAX_CLIENTS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(size: f64, now: Instant) -> Self {
        Self {
            tokens: size,
            at: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: f64, size: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(size);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// A route's buckets.
#[derive(Debug, Clone)]
pub struct Buckets(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    settings: RateLimit,
    route: Option<Mutex<Bucket>>,
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// This client's.
    Client(Duration),
    /// The route's, on this gateway.
    Route(Duration),
}

impl Over {
    /// Whole seconds until a retry can pass (at least 1).
    pub fn retry_after(self) -> u64 {
        let (Self::Client(d) | Self::Route(d)) = self;
        d.as_secs_f64().ceil().max(1.0) as u64
    }
}

impl Buckets {
    /// Full buckets for checked settings.
    pub fn new(settings: &RateLimit) -> Self {
        let now = Instant::now();
        let route = settings
            .per_route
            .map(|rate| Mutex::new(Bucket::full(settings.burst.unwrap_or(rate), now)));
        Self(Arc::new(Inner {
            settings: settings.clone(),
            route,
            clients: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether a new document kept the same limits (then the state stays).
    pub fn same_settings(&self, other: &Self) -> bool {
        self.0.settings == other.0.settings
    }

    /// Admits one request from `client`, or says which limit it is over.
    /// The client's bucket is charged first, so one client over its own
    /// limit does not use up the route's.
    pub fn admit(&self, client: IpAddr) -> Result<(), Over> {
        self.admit_at(client, Instant::now())
    }

    fn admit_at(&self, client: IpAddr, now: Instant) -> Result<(), Over> {
        let s = &self.0.settings;
        if let Some(rate) = s.per_client {
            let size = s.burst.unwrap_or(rate);
            let mut clients = self.0.clients.lock().unwrap_or_else(|e| e.into_inner());
            if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
                prune(&mut clients, rate, size, now);
            }
            clients
                .entry(client)
                .or_insert_with(|| Bucket::full(size, now))
                .take(rate, size, now)
                .map_err(Over::Client)?;
        }
        if let (Some(rate), Some(bucket)) = (s.per_route, &self.0.route) {
            let size = s.burst.unwrap_or(rate);
            bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(rate, size, now)
                .map_err(Over::Route)?;
        }
        Ok(())
    }
}

/// Drops buckets that have refilled (a new one would be the same), or
/// else the least recently used half.
fn prune(clients: &mut HashMap<IpAddr, Bucket>, rate: f64, size: f64, now: Instant) {
    clients
        .retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < size);
    if clients.len() >= MAX_CLIENTS {
        let mut ages: Vec<Instant> = clients.values().map(|b| b.at).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 2];
        clients.retain(|_, b| b.at > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_client: Option<f64>, per_route: Option<f64>) -> Buckets {
        Buckets::new(&RateLimit {
            per_client,
            per_route,
            burst: None,
        })
    }

    #[test]
    fn a_client_gets_its_rate_and_another_is_unaffected() {
        let b = limits(Some(50.0), None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let c: IpAddr = "10.0.0.2".parse().unwrap();
        let start = Instant::now();
        // 200 requests/s for 10 s from one client: about 50/s pass (plus
        // the initial burst of 50).
        let mut passed = 0;
        for i in 0..2000u32 {
            let now = start + Duration::from_millis(u64::from(i) * 5);
            if b.admit_at(a, now).is_ok() {
                passed += 1;
            }
        }
        assert!((540..=560).contains(&passed), "{passed}");
        assert!(b.admit_at(c, start + Duration::from_secs(10)).is_ok());
        let end = start + Duration::from_secs(10);
        let over = (0..3)
            .find_map(|_| b.admit_at(a, end).err())
            .expect("the bucket runs dry");
        assert!(matches!(over, Over::Client(_)));
        assert_eq!(over.retry_after(), 1);
    }

    #[test]
    fn the_route_bucket_is_shared() {
        let b = limits(None, Some(2.0));
        let now = Instant::now();
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        assert!(b.admit_at(ip(1), now).is_ok());
        assert!(b.admit_at(ip(2), now).is_ok());
        assert!(matches!(b.admit_at(ip(3), now), Err(Over::Route(_))));
        assert!(b.admit_at(ip(3), now + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn client_table_stays_bounded() {
        let b = limits(Some(1.0), None);
        let now = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            let _ = b.admit_at(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(b.0.clients.lock().unwrap().len() <= MAX_CLIENTS);
    }
}

//! The simulated network: latency with jitter, loss, and partitions.
//!
//! Every decision comes from one seeded RNG and integer arithmetic, so the
//! same seed gives the same deliveries on any machine.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Loss is drawn against this many parts (parts per million).
const LOSS_SCALE: u32 = 1_000_000;
/// One datagram in this many waits in a queue on its way.
const QUEUED_ONE_IN: u32 = 20;
/// The queueing tail adds up to this many times the base latency.
const QUEUE_TAIL: u64 = 3;
/// A lost stream segment costs this many one-way latencies (a QUIC probe
/// timeout is about three round trips) before the retransmission.
const STREAM_RETRANSMIT: u64 = 6;
/// Retransmissions modelled per stream message before it gets through.
const MAX_STREAM_RETRANSMITS: u32 = 10;

/// The network's shape, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetParams {
    /// Mean one-way latency.
    pub latency: Duration,
    /// Probability that a datagram is lost, 0.0 to 1.0.
    pub loss: f64,
}

/// The network between simulated nodes.
///
/// One-way delay is the base latency ±10 % (uniform), and one datagram in
/// 20 also waits in a queue for a further 0 to 3 × the base (uniform), so
/// datagrams can overtake each other. Loss is independent per datagram.
/// Streams (catalog fetches and digests) are reliable, as QUIC streams are:
/// each loss costs a retransmission delay instead of the message.
#[derive(Debug)]
pub struct Network {
    latency_ns: u64,
    loss_ppm: u32,
    rng: StdRng,
    groups: Option<Vec<u8>>,
    last_heal: Option<Duration>,
}

impl Network {
    /// A fully connected network.
    pub fn new(params: NetParams, seed: u64) -> Self {
        let latency_ns = u64::try_from(params.latency.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1_000);
        // Rounded to parts per million: exact for every value the CLI takes.
        let loss_ppm = (params.loss.clamp(0.0, 1.0) * f64::from(LOSS_SCALE)).round() as u32;
        Self {
            latency_ns,
            loss_ppm,
            rng: StdRng::seed_from_u64(seed),
            groups: None,
            last_heal: None,
        }
    }

    /// The one-way delay of the next datagram.
    pub fn delay(&mut self) -> Duration {
        let base = self.latency_ns;
        let mut d = base * 9 / 10 + self.rng.random_range(0..=base / 5);
        if self.rng.random_range(0..QUEUED_ONE_IN) == 0 {
            d += self.rng.random_range(0..=QUEUE_TAIL * base);
        }
        Duration::from_nanos(d)
    }

    /// Whether the next datagram is lost.
    pub fn lost(&mut self) -> bool {
        self.loss_ppm > 0 && self.rng.random_range(0..LOSS_SCALE) < self.loss_ppm
    }

    /// The delay of one stream message: a datagram's delay plus one
    /// retransmission timeout per lost segment.
    pub fn stream_delay(&mut self) -> Duration {
        let mut d = self.delay();
        let mut tries = 0;
        while tries < MAX_STREAM_RETRANSMITS && self.lost() {
            d += Duration::from_nanos(STREAM_RETRANSMIT * self.latency_ns);
            tries += 1;
        }
        d
    }

    /// Splits the nodes into groups (`groups[node]` is its side); nothing
    /// crosses between sides until [`Network::heal`].
    pub fn split(&mut self, groups: Vec<u8>) {
        self.groups = Some(groups);
    }

    /// Reconnects every side.
    pub fn heal(&mut self, now: Duration) {
        if self.groups.take().is_some() {
            self.last_heal = Some(now);
        }
    }

    /// Whether `a` and `b` cannot reach each other right now.
    pub fn separated(&self, a: usize, b: usize) -> bool {
        self.groups
            .as_ref()
            .is_some_and(|g| side(g, a) != side(g, b))
    }

    /// If a partition is in force, `now`; if one healed less than `window`
    /// ago, when it healed; otherwise `None`. Verdicts reached during a split
    /// (a suspicion timer running out, a `down` gossiped from the other
    /// side) keep arriving for a while after the heal.
    pub fn split_within(&self, now: Duration, window: Duration) -> Option<Duration> {
        if self.groups.is_some() {
            return Some(now);
        }
        self.last_heal
            .filter(|healed| now.saturating_sub(*healed) < window)
    }

    /// Whether a partition is in force.
    pub fn is_split(&self) -> bool {
        self.groups.is_some()
    }
}

fn side(groups: &[u8], node: usize) -> u8 {
    groups.get(node).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(loss: f64) -> Network {
        Network::new(
            NetParams {
                latency: Duration::from_millis(2),
                loss,
            },
            7,
        )
    }

    #[test]
    fn delays_stay_in_the_documented_range() {
        let mut n = net(0.0);
        for _ in 0..10_000 {
            let d = n.delay();
            assert!(d >= Duration::from_micros(1_800), "{d:?}");
            assert!(d <= Duration::from_micros(2_200 + 6_000), "{d:?}");
        }
    }

    #[test]
    fn loss_rate_is_close_to_the_parameter() {
        let mut n = net(0.1);
        let lost = (0..100_000).filter(|_| n.lost()).count();
        assert!((9_000..11_000).contains(&lost), "{lost}");
        let mut none = net(0.0);
        assert!((0..10_000).all(|_| !none.lost()));
    }

    #[test]
    fn partitions_separate_sides_and_remember_the_heal() {
        let mut n = net(0.0);
        let w = Duration::from_secs(5);
        assert_eq!(n.split_within(Duration::from_secs(1), w), None);
        n.split(vec![0, 0, 1, 1]);
        assert!(n.separated(0, 2));
        assert!(!n.separated(0, 1));
        assert_eq!(
            n.split_within(Duration::from_secs(3), w),
            Some(Duration::from_secs(3))
        );
        n.heal(Duration::from_secs(10));
        assert!(!n.separated(0, 2));
        assert_eq!(
            n.split_within(Duration::from_secs(12), w),
            Some(Duration::from_secs(10))
        );
        assert_eq!(n.split_within(Duration::from_secs(16), w), None);
    }

    #[test]
    fn same_seed_same_network() {
        let (mut a, mut b) = (net(0.05), net(0.05));
        for _ in 0..1_000 {
            assert_eq!(a.lost(), b.lost());
            assert_eq!(a.delay(), b.delay());
        }
    }
}

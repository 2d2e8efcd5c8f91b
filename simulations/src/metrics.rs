//! Counters, time series and failure-detection trackers.

use std::time::Duration;

/// Monotonic counters over a whole run. Subtract two snapshots to get the
/// figures of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// SWIM datagrams handed to the network.
    pub datagrams: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams dropped by random loss.
    pub lost: u64,
    /// Datagrams dropped by a partition.
    pub cut: u64,
    /// Datagrams that arrived at a node that was not running.
    pub undeliverable: u64,
    /// Datagrams dropped because the link to their peer was still being
    /// made and its queue was full, or the dial failed (connection model).
    pub dial_drops: u64,
    /// Datagrams the receiving core refused (stale or misdirected).
    pub refused: u64,
    /// Catalog fetches and digests sent over streams.
    pub stream_messages: u64,
    /// Bytes of member sync payloads sent.
    pub sync_bytes: u64,
    /// Stream messages that failed (peer unreachable or restarted).
    pub stream_failures: u64,
    /// Fetches of entries that were never published (version 0): counted,
    /// not simulated, since they cannot change anything.
    pub empty_fetches: u64,
    /// `down` events about a node that was running with that very identity
    /// and reachable: the failure detector was wrong.
    pub false_downs: u64,
    /// False downs whose subject is a slow (stalling) node.
    pub false_downs_of_slow: u64,
    /// `down` events about an identity that lived through a partition,
    /// during the split or in the three suspicion windows after the heal:
    /// expected, not counted as false.
    pub partition_downs: u64,
    /// `down` events about nodes that really were gone.
    pub true_downs: u64,
    /// `left` events.
    pub lefts: u64,
    /// `down` events about a node that had left gracefully (observers that
    /// missed the leave notice).
    pub downs_after_leave: u64,
    /// Suspicions (each member, generation and incarnation once, when first
    /// sent) of a node that was running that generation, partitions aside.
    pub false_suspicions: u64,
    /// Those whose subject is a slow node.
    pub false_suspicions_of_slow: u64,
    /// Suspicions of processes that were really gone.
    pub true_suspicions: u64,
    /// Suspicions of an identity that lived through a partition, during
    /// the split or shortly after (as for `partition_downs`).
    pub partition_suspicions: u64,
    /// Nodes that renewed their identity (they learned they were declared
    /// down, or were told so).
    pub rejoins: u64,
    /// Renewals of a running node that no member had declared down: foca
    /// 2.0 sends `TurnUndead` when a suspicion timer expires even if the
    /// suspect refuted in time.
    pub rejoins_without_down: u64,
    /// Process starts (first starts and restarts).
    pub starts: u64,
    /// Crashes.
    pub crashes: u64,
    /// Graceful leaves.
    pub leaves: u64,
    /// Stalls begun.
    pub stalls: u64,
    /// Integral of running nodes over virtual time, in node-nanoseconds.
    pub node_nanos: u128,
}

impl Counters {
    /// The counts accumulated since `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            datagrams: self.datagrams - earlier.datagrams,
            bytes: self.bytes - earlier.bytes,
            lost: self.lost - earlier.lost,
            cut: self.cut - earlier.cut,
            undeliverable: self.undeliverable - earlier.undeliverable,
            dial_drops: self.dial_drops - earlier.dial_drops,
            refused: self.refused - earlier.refused,
            stream_messages: self.stream_messages - earlier.stream_messages,
            sync_bytes: self.sync_bytes - earlier.sync_bytes,
            stream_failures: self.stream_failures - earlier.stream_failures,
            empty_fetches: self.empty_fetches - earlier.empty_fetches,
            false_downs: self.false_downs - earlier.false_downs,
            false_downs_of_slow: self.false_downs_of_slow - earlier.false_downs_of_slow,
            partition_downs: self.partition_downs - earlier.partition_downs,
            true_downs: self.true_downs - earlier.true_downs,
            lefts: self.lefts - earlier.lefts,
            downs_after_leave: self.downs_after_leave - earlier.downs_after_leave,
            false_suspicions: self.false_suspicions - earlier.false_suspicions,
            false_suspicions_of_slow: self.false_suspicions_of_slow
                - earlier.false_suspicions_of_slow,
            true_suspicions: self.true_suspicions - earlier.true_suspicions,
            partition_suspicions: self.partition_suspicions - earlier.partition_suspicions,
            rejoins: self.rejoins - earlier.rejoins,
            rejoins_without_down: self.rejoins_without_down - earlier.rejoins_without_down,
            starts: self.starts - earlier.starts,
            crashes: self.crashes - earlier.crashes,
            leaves: self.leaves - earlier.leaves,
            stalls: self.stalls - earlier.stalls,
            node_nanos: self.node_nanos - earlier.node_nanos,
        }
    }

    /// Node-seconds of running time.
    pub fn node_seconds(&self) -> f64 {
        self.node_nanos as f64 / 1e9
    }
}

/// One row of the time series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Virtual time.
    pub at: Duration,
    /// Running nodes.
    pub live: usize,
    /// Running nodes whose membership view is exactly right.
    pub view_ok: usize,
    /// Running nodes holding every current catalog entry.
    pub catalog_ok: usize,
    /// Wrong (observer, member) pairs.
    pub membership_mismatch: u64,
    /// Outdated (node, entry) pairs.
    pub catalog_mismatch: u64,
    /// Datagrams sent since the previous sample.
    pub datagrams: u64,
    /// Bytes sent since the previous sample.
    pub bytes: u64,
    /// False downs so far.
    pub false_downs: u64,
    /// Nodes stalled right now.
    pub stalled: usize,
}

/// How fast the mesh noticed one crashed node.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The crashed node.
    pub victim: usize,
    /// The generation that crashed.
    pub generation: u64,
    /// When it crashed.
    pub crashed_at: Duration,
    /// When the first datagram carrying a suspicion of it was sent.
    pub first_suspicion: Option<Duration>,
    /// Running nodes that held the victim active when it crashed.
    pub observers: usize,
    /// When each observer declared it down, in time order.
    pub downs: Vec<Duration>,
    /// `pending[x]`: `x`'s process life if it is an observer that has not
    /// declared the victim down yet, else `0`.
    pending: Vec<u32>,
}

/// Observer fractions reported for detection.
pub const DETECTION_FRACTIONS: [f64; 3] = [0.5, 0.99, 1.0];

impl Detection {
    /// Starts tracking `victim` (generation `generation`), crashed at `now`;
    /// `lives[x]` is the process life of each running observer (`0` for the
    /// others).
    pub fn new(victim: usize, generation: u64, now: Duration, lives: Vec<u32>) -> Self {
        let observers = lives.iter().filter(|&&l| l != 0).count();
        Self {
            victim,
            generation,
            crashed_at: now,
            first_suspicion: None,
            observers,
            downs: Vec::new(),
            pending: lives,
        }
    }

    /// Observer `x` (process life `life`) declared the victim down.
    pub fn observe(&mut self, x: usize, life: u32, now: Duration) {
        if self.pending.get(x).is_some_and(|&l| l != 0 && l == life) {
            self.pending[x] = 0;
            self.downs.push(now);
        }
    }

    /// How long after the crash `fraction` of observers had declared it
    /// down.
    pub fn time_to(&self, fraction: f64) -> Option<Duration> {
        let needed = crate::catalog::needed(self.observers, fraction);
        if needed == 0 {
            return Some(Duration::ZERO);
        }
        self.downs
            .get(needed - 1)
            .map(|t| t.saturating_sub(self.crashed_at))
    }

    /// Time from the crash to the first suspicion.
    pub fn suspicion_after(&self) -> Option<Duration> {
        self.first_suspicion
            .map(|t| t.saturating_sub(self.crashed_at))
    }
}

/// Percentile (nearest rank) of a sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = crate::catalog::needed(sorted.len(), p).max(1);
    sorted.get(rank - 1).copied()
}

/// The mean of a slice.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<f64>() / values.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_counts_each_observer_once() {
        let ms = Duration::from_millis;
        let mut d = Detection::new(0, 1, ms(100), vec![0, 1, 1, 0, 3]);
        assert_eq!(d.observers, 3);
        d.observe(1, 1, ms(200));
        d.observe(1, 1, ms(250));
        d.observe(3, 1, ms(260));
        d.observe(4, 2, ms(270));
        assert_eq!(
            d.downs.len(),
            1,
            "repeats, non-observers and new lives ignored"
        );
        d.observe(2, 1, ms(300));
        d.observe(4, 3, ms(400));
        assert_eq!(d.time_to(0.5), Some(ms(200)));
        assert_eq!(d.time_to(1.0), Some(ms(300)));
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), Some(2.0));
        assert_eq!(percentile(&v, 1.0), Some(4.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(mean(&v), Some(2.5));
    }
}

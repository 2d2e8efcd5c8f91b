//! Rendezvous (highest-random-weight) hashing, compiled into a lookup table.
//!
//! The hash space is cut into a fixed number of slots, `M = 2^18`. Each
//! slot belongs to the backend with the highest score `h(slot, backend)`
//! (weighted: `w / -ln(u)`). A lookup is one key hash and one array read.
//! `M` never depends on the number of backends: a table size that changed
//! with it would remap most keys whenever the size stepped.
//!
//! Why this one (measured in `benches/balance.rs`, see docs/benchmarks.md):
//! - movement is minimal by construction: adding a backend only moves slots
//!   *to* it, removing one only moves *its* slots, in any order;
//! - the table is a pure function of the set of backends, so every agent
//!   with the same catalog maps a key to the same backend;
//! - with 2^18 slots, shares stay within a few percent of the weights up to
//!   a few hundred backends (property tests hold max/avg to ≤ 1.1 up to 150)..
//!
//! The price is build time, `M × n` scores (see docs/benchmarks.md), and
//! 512 KiB per table. Tables are built off the request path, only for
//! services an agent routes to, and cached until the backend set changes.
//!
//! Failover walks the slots after the key's slot to the first usable
//! backend, so keys of usable backends never move when another is skipped.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// log2 of the number of slots.
const BITS: u32 = 18;

/// Hashes a request key; the same on every machine.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// A built lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    slots: Vec<u16>,
    shift: u32,
    backends: usize,
}

/// Most backends a table can hold (slots store 16-bit indices).
pub const MAX_BACKENDS: usize = u16::MAX as usize + 1;

fn mix(x: u64) -> u64 {
    // splitmix64's finaliser: cheap and well spread.
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Table {
    /// Builds the table for backends given as `(name, weight)`; indices in
    /// answers refer to this order. Weights of 0 count as 1.
    pub fn build<N: AsRef<[u8]>>(backends: &[(N, u32)]) -> Self {
        let backends = &backends[..backends.len().min(MAX_BACKENDS)];
        let n = backends.len();
        if n == 0 {
            return Self {
                slots: Vec::new(),
                shift: 64,
                backends: 0,
            };
        }
        let ids: Vec<u64> = backends
            .iter()
            .map(|(name, _)| xxh3_64_with_seed(name.as_ref(), 0x6873_7277))
            .collect();
        let weights: Vec<f64> = backends
            .iter()
            .map(|(_, w)| f64::from((*w).max(1)))
            .collect();
        let equal = weights.iter().all(|w| *w == weights[0]);
        let slots = (0..1u64 << BITS)
            .map(|s| {
                let seed = mix(s.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                if equal {
                    // Integer scores: identical on every machine.
                    let mut best = (0u64, 0u16);
                    for (i, &id) in ids.iter().enumerate() {
                        let score = mix(seed ^ id);
                        if score > best.0 || (score == best.0 && i as u16 > best.1) {
                            best = (score, i as u16);
                        }
                    }
                    best.1
                } else {
                    // Weighted rendezvous: w / -ln(u), u uniform in (0, 1).
                    let mut best = (f64::NEG_INFINITY, 0u16);
                    for (i, (&id, &w)) in ids.iter().zip(&weights).enumerate() {
                        let u = ((mix(seed ^ id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                        let score = w / -u.ln();
                        if score > best.0 {
                            best = (score, i as u16);
                        }
                    }
                    best.1
                }
            })
            .collect();
        Self {
            slots,
            shift: 64 - BITS,
            backends: n,
        }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends
    }

    /// Whether there are no backends.
    pub fn is_empty(&self) -> bool {
        self.backends == 0
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The backend a key hash maps to.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(hash >> self.shift) as usize] as usize)
    }

    /// The first backend, in hash order from the key's slot, that `usable`
    /// accepts. Visits at most every slot once.
    pub fn lookup_usable(&self, hash: u64, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let start = (hash >> self.shift) as usize;
        let (before, after) = self.slots.split_at(start);
        after
            .iter()
            .chain(before)
            .map(|&b| b as usize)
            .find(|&b| usable(b))
    }

    /// Slots owned by each backend.
    pub fn shares(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends];
        for &b in &self.slots {
            counts[b as usize] += 1;
        }
        counts
    }

    /// The owner of every slot (for comparing tables).
    pub fn owners(&self) -> &[u16] {
        &self.slots
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("node{i}/web-{i}"), 1)).collect()
    }

    #[test]
    fn empty_and_single() {
        let empty: Vec<(String, u32)> = vec![];
        assert_eq!(Table::build(&empty).lookup(1), None);
        assert_eq!(Table::build(&names(1)).lookup(u64::MAX), Some(0));
    }

    #[test]
    fn deterministic() {
        assert_eq!(Table::build(&names(20)), Table::build(&names(20)));
    }

    #[test]
    fn weights_are_honoured() {
        let backends = vec![("a".to_string(), 10), ("b".to_string(), 30)];
        let shares = Table::build(&backends).shares();
        let ratio = shares[1] as f64 / shares[0] as f64;
        assert!((2.4..3.6).contains(&ratio), "{shares:?}");
    }

    #[test]
    fn three_equal_instances_and_many_keys() {
        let t = Table::build(&names(3));
        let mut load = [0usize; 3];
        for k in 0..1_000u32 {
            load[t.lookup(hash_key(format!("key-{k}").as_bytes())).unwrap()] += 1;
        }
        let max = *load.iter().max().unwrap() as f64;
        assert!(max / (1000.0 / 3.0) <= 1.2, "{load:?}");
    }

    #[test]
    fn failover_keeps_other_keys() {
        let t = Table::build(&names(5));
        for k in 0..10_000u64 {
            let h = hash_key(&k.to_le_bytes());
            let first = t.lookup(h).unwrap();
            let skip3 = t.lookup_usable(h, |b| b != 3).unwrap();
            if first == 3 {
                assert_ne!(skip3, 3);
            } else {
                assert_eq!(first, skip3, "a key of a usable backend moved");
            }
        }
    }

    /// Fraction of slots whose owner differs, mapping `a`'s indices to `b`'s.
    fn moved(a: &Table, b: &Table, map: impl Fn(usize) -> Option<usize>) -> f64 {
        let changed = a
            .owners()
            .iter()
            .zip(b.owners())
            .filter(|&(&x, &y)| map(x as usize) != Some(y as usize))
            .count();
        changed as f64 / a.slots() as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn balance(n in 2usize..150) {
            let shares = Table::build(&names(n)).shares();
            let avg = shares.iter().sum::<usize>() as f64 / n as f64;
            let max = *shares.iter().max().unwrap() as f64;
            prop_assert!(max / avg <= 1.1, "n={} max/avg={}", n, max / avg);
        }

        #[test]
        fn minimal_movement_on_remove(n in 3usize..120, victim in any::<prop::sample::Index>()) {
            let all = names(n);
            let victim = victim.index(n);
            let mut rest = all.clone();
            rest.remove(victim);
            let (before, after) = (Table::build(&all), Table::build(&rest));
            let m = moved(&before, &after, |i| match i.cmp(&victim) {
                std::cmp::Ordering::Less => Some(i),
                std::cmp::Ordering::Equal => None,
                std::cmp::Ordering::Greater => Some(i - 1),
            });
            // Only the victim's slots moved...
            let victim_share = before.shares()[victim] as f64 / before.slots() as f64;
            prop_assert!((m - victim_share).abs() < 1e-12, "moved {} share {}", m, victim_share);
            // ...and that is close to the ideal 1/n.
            prop_assert!(m <= 1.1 / n as f64, "n={} moved={} ideal={}", n, m, 1.0 / n as f64);
        }

        #[test]
        fn minimal_movement_on_add(n in 2usize..120) {
            let (before, after) = (Table::build(&names(n)), Table::build(&names(n + 1)));
            let m = moved(&before, &after, Some);
            let new_share = after.shares()[n] as f64 / after.slots() as f64;
            prop_assert!((m - new_share).abs() < 1e-12, "moved {} new share {}", m, new_share);
            prop_assert!(m <= 1.1 / (n + 1) as f64, "n={} moved={} ideal={}", n, m, 1.0 / (n + 1) as f64);
        }
    }
}

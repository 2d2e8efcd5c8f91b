//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! A lookup table of `M = 65,537` slots (a prime) is filled
//! by letting backends take turns claiming their next preferred free slot,
//! each backend's preference order being a permutation of the slots derived
//! from the hash of its name. Turns are handed out in proportion to weight.
//!
//! Kept as the measured alternative to [`super::multiprobe`]: its table
//! balance is near perfect and it builds fast, but adding or removing one
//! backend moves about twice the ideal share of keys (see
//! `benches/balance.rs` and `docs/benchmarks.md`), which is why the proxy
//! does not use it.
//!
//! Failover walks the slots after the key's slot: the next slot that belongs
//! to a usable backend. Keys of usable backends never move when another
//! backend is skipped.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Table size: the prime the Maglev paper uses, fixed so that the table
/// does not change size (and remap everything) as backends come and go.
const SIZE: u32 = 65_537;

/// A built lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
    backends: usize,
}

/// Hashes a request key; the same on every machine.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

fn table_size(_backends: usize) -> u32 {
    SIZE
}

impl Maglev {
    /// Builds the table for backends given as `(name, weight)`, in the order
    /// the caller wants indices reported (sort them the same way everywhere).
    /// Weights of 0 are treated as 1.
    pub fn build<N: AsRef<[u8]>>(backends: &[(N, u32)]) -> Self {
        let n = backends.len();
        if n == 0 {
            return Self {
                table: Vec::new(),
                backends: 0,
            };
        }
        let m = table_size(n);
        let m64 = u64::from(m);
        // Permutation of each backend: position starts at `offset` and steps
        // by `skip` (coprime with the prime m).
        let mut pos: Vec<u32> = Vec::with_capacity(n);
        let mut skip: Vec<u32> = Vec::with_capacity(n);
        for (name, _) in backends {
            let name = name.as_ref();
            pos.push((xxh3_64_with_seed(name, 0x6d61_676c) % m64) as u32);
            skip.push((xxh3_64_with_seed(name, 0x6576_0001) % (m64 - 1) + 1) as u32);
        }
        let weights: Vec<u64> = backends
            .iter()
            .map(|(_, w)| u64::from((*w).max(1)))
            .collect();
        let wmax = *weights.iter().max().expect("non-empty");
        let mut credit = vec![0u64; n];
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0u32;
        'fill: loop {
            for i in 0..n {
                credit[i] += weights[i];
                if credit[i] < wmax {
                    continue;
                }
                credit[i] -= wmax;
                let mut c = pos[i];
                while table[c as usize] != EMPTY {
                    c += skip[i];
                    if c >= m {
                        c -= m;
                    }
                }
                table[c as usize] = i as u32;
                let next = c + skip[i];
                pos[i] = if next >= m { next - m } else { next };
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self { table, backends: n }
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
        self.table.len()
    }

    fn slot(&self, hash: u64) -> usize {
        // Multiply-shift: maps the hash onto [0, M) without a division.
        ((u128::from(hash) * self.table.len() as u128) >> 64) as usize
    }

    /// The backend a key hash maps to.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[self.slot(hash)] as usize)
    }

    /// The first backend, in hash order from the key's slot, that `usable`
    /// accepts. Visits at most every slot once.
    pub fn lookup_usable(&self, hash: u64, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = self.slot(hash);
        let (after, before) = self.table.split_at(start);
        before
            .iter()
            .chain(after)
            .map(|&b| b as usize)
            .find(|&b| usable(b))
    }

    /// Slots owned by each backend.
    pub fn shares(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends];
        for &b in &self.table {
            counts[b as usize] += 1;
        }
        counts
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
        assert_eq!(Maglev::build(&empty).lookup(1), None);
        let one = Maglev::build(&names(1));
        assert_eq!(one.lookup(12345), Some(0));
    }

    #[test]
    fn deterministic() {
        assert_eq!(Maglev::build(&names(20)), Maglev::build(&names(20)));
    }

    #[test]
    fn weights_are_honoured() {
        let backends = vec![("a".to_string(), 1), ("b".to_string(), 3)];
        let shares = Maglev::build(&backends).shares();
        let ratio = shares[1] as f64 / shares[0] as f64;
        assert!((ratio - 3.0).abs() < 0.05, "{shares:?}");
    }

    #[test]
    fn failover_keeps_other_keys() {
        let m = Maglev::build(&names(5));
        for k in 0..10_000u64 {
            let h = hash_key(&k.to_le_bytes());
            let first = m.lookup(h).unwrap();
            let with_3_down = m.lookup_usable(h, |b| b != 3).unwrap();
            if first != 3 {
                assert_eq!(first, with_3_down, "a key of a usable backend moved");
            } else {
                assert_ne!(with_3_down, 3);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn balance(n in 1usize..300) {
            let shares = Maglev::build(&names(n)).shares();
            let avg = shares.iter().sum::<usize>() as f64 / n as f64;
            let max = *shares.iter().max().unwrap() as f64;
            prop_assert!(max / avg <= 1.02, "n={} max/avg={}", n, max / avg);
        }

    }
}

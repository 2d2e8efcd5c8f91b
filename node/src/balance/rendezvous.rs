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
//! services an agent routes to; until one is ready a [`Scorer`] answers
//! the same lookups directly in O(n). When the backend set changes, the
//! table is updated from the previous one ([`Table::updated`]): only the
//! slots an added backend wins and those of a removed backend are scored,
//! `M × (1 + added)` scores instead of `M × n`.
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

/// The backends' scores: what a table is built from, and what answers a
/// lookup directly (O(n) per key) before the table is built.
#[derive(Debug, Clone, PartialEq)]
pub struct Scorer {
    ids: Vec<u64>,
    weights: Vec<f64>,
    equal: bool,
}

fn slot_seed(slot: u64) -> u64 {
    mix(slot.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

impl Scorer {
    /// The scorer of backends given as `(name, weight)`; weights of 0
    /// count as 1.
    pub fn new<N: AsRef<[u8]>>(backends: &[(N, u32)]) -> Self {
        let backends = &backends[..backends.len().min(MAX_BACKENDS)];
        let ids = backends
            .iter()
            .map(|(name, _)| xxh3_64_with_seed(name.as_ref(), 0x6873_7277))
            .collect();
        let weights: Vec<f64> = backends
            .iter()
            .map(|(_, w)| f64::from((*w).max(1)))
            .collect();
        let equal = weights.iter().all(|w| *w == weights[0]);
        Self {
            ids,
            weights,
            equal,
        }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The owner of `slot`: the backend with the highest score.
    fn owner(&self, slot: u64) -> u16 {
        let seed = slot_seed(slot);
        if self.equal {
            // Integer scores: identical on every machine.
            let mut best = (0u64, 0u16);
            for (i, &id) in self.ids.iter().enumerate() {
                let score = mix(seed ^ id);
                if score > best.0 || (score == best.0 && i as u16 > best.1) {
                    best = (score, i as u16);
                }
            }
            best.1
        } else {
            // Weighted rendezvous: w / -ln(u), u uniform in (0, 1).
            let mut best = (f64::NEG_INFINITY, 0u16);
            for (i, (&id, &w)) in self.ids.iter().zip(&self.weights).enumerate() {
                let u = ((mix(seed ^ id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let score = w / -u.ln();
                if score > best.0 {
                    best = (score, i as u16);
                }
            }
            best.1
        }
    }

    /// What [`Table::lookup`] answers, computed for this key alone.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        (!self.is_empty()).then(|| self.owner(hash >> (64 - BITS)) as usize)
    }

    /// What [`Table::lookup_usable`] answers, computed slot by slot.
    pub fn lookup_usable(&self, hash: u64, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        if !(0..self.len()).any(&mut usable) {
            return None;
        }
        let start = hash >> (64 - BITS);
        (0..1u64 << BITS)
            .map(|step| self.owner((start + step) & ((1 << BITS) - 1)) as usize)
            .find(|&b| usable(b))
    }
}

impl Table {
    /// Builds the table for backends given as `(name, weight)`; indices in
    /// answers refer to this order. Weights of 0 count as 1.
    pub fn build<N: AsRef<[u8]>>(backends: &[(N, u32)]) -> Self {
        Self::from_scorer(&Scorer::new(backends))
    }

    /// Builds the table of `scorer`'s backends.
    pub fn from_scorer(scorer: &Scorer) -> Self {
        if scorer.is_empty() {
            return Self {
                slots: Vec::new(),
                shift: 64,
                backends: 0,
            };
        }
        Self {
            slots: (0..1u64 << BITS).map(|s| scorer.owner(s)).collect(),
            shift: 64 - BITS,
            backends: scorer.len(),
        }
    }

    /// The table of `new`'s backends, made from this table of `old`'s by
    /// moving only the slots whose owner changes: a slot goes to an added
    /// backend if it outscores the owner, and a removed backend's slots are
    /// scored again. The result equals [`Table::from_scorer`]`(new)`; the
    /// cost is `M × (1 + added)` scores plus `n` for each slot of a removed
    /// backend, instead of `M × n`. `None` for weighted backends (their
    /// scores cost a logarithm each: build them whole) or when `old` is
    /// not what this table was built from.
    pub fn updated(&self, old: &Scorer, new: &Scorer) -> Option<Self> {
        if !(old.equal && new.equal)
            || old.len() != self.backends
            || old.is_empty()
            || new.is_empty()
        {
            return None;
        }
        let at: std::collections::HashMap<u64, u16> = new
            .ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u16))
            .collect();
        if at.len() != new.len() {
            return None; // two backends hash alike: keep to the plain build
        }
        let kept: Vec<Option<u16>> = old.ids.iter().map(|id| at.get(id).copied()).collect();
        let before: std::collections::HashSet<u64> = old.ids.iter().copied().collect();
        let added: Vec<(u16, u64)> = new
            .ids
            .iter()
            .enumerate()
            .filter(|(_, id)| !before.contains(id))
            .map(|(i, &id)| (i as u16, id))
            .collect();
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, &owner)| match kept[owner as usize] {
                None => new.owner(slot as u64),
                Some(j) => {
                    let seed = slot_seed(slot as u64);
                    let mut best = (mix(seed ^ new.ids[j as usize]), j);
                    for &(i, id) in &added {
                        let score = mix(seed ^ id);
                        if score > best.0 || (score == best.0 && i > best.1) {
                            best = (score, i);
                        }
                    }
                    best.1
                }
            })
            .collect();
        Some(Self {
            slots,
            shift: 64 - BITS,
            backends: new.len(),
        })
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

    #[test]
    fn direct_lookups_answer_like_the_table() {
        for n in [1usize, 2, 7, 40] {
            let backends = names(n);
            let (table, scorer) = (Table::build(&backends), Scorer::new(&backends));
            for k in 0..2_000u64 {
                let h = hash_key(&k.to_le_bytes());
                assert_eq!(table.lookup(h), scorer.lookup(h));
                let skip = |b: usize| b % 3 != 1;
                assert_eq!(table.lookup_usable(h, skip), scorer.lookup_usable(h, skip));
            }
            assert_eq!(scorer.lookup_usable(7, |_| false), None);
        }
        let weighted = vec![("a".to_string(), 1), ("b".to_string(), 5)];
        let (t, s) = (Table::build(&weighted), Scorer::new(&weighted));
        for k in 0..500u64 {
            assert_eq!(t.lookup(k << 40), s.lookup(k << 40));
        }
    }

    #[test]
    fn weighted_tables_are_not_updated_in_place() {
        let a = vec![("a".to_string(), 1), ("b".to_string(), 5)];
        let b = vec![("a".to_string(), 1), ("c".to_string(), 5)];
        let t = Table::build(&a);
        assert!(t.updated(&Scorer::new(&a), &Scorer::new(&b)).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn updates_equal_a_fresh_build(
            n in 1usize..60,
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
            added in 0usize..4,
        ) {
            let old = names(n);
            let mut new = old.clone();
            for r in &removed {
                if new.len() > 1 {
                    new.remove(r.index(new.len()));
                }
            }
            for a in 0..added {
                new.push((format!("new{a}/x"), 1));
            }
            new.sort();
            let table = Table::build(&old);
            let updated = table.updated(&Scorer::new(&old), &Scorer::new(&new)).unwrap();
            prop_assert_eq!(updated, Table::build(&new));
        }

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

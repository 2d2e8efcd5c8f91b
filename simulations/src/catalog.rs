//! The catalog as far as the simulator needs it: entry versions.
//!
//! Only owners that published at least once get a slot (everyone starts
//! with version 0 of every other entry, which needs no exchange). For each
//! node the simulator keeps the highest notice it received and the version
//! of each entry it holds (fetched from the owner). Agreement means every
//! running node holds the current version of every running owner's entry.
//! Each publish gets a [`Spread`] that records when each node got the
//! notice and the entry.

use std::time::Duration;

/// How one catalog change spread.
#[derive(Debug, Clone)]
pub struct Spread {
    /// The publishing node.
    pub owner: usize,
    /// The version it published.
    pub version: u64,
    /// When it published.
    pub published_at: Duration,
    /// Nodes other than the owner running at publish time.
    pub population: usize,
    /// When each of them received the notice, in time order.
    pub notices: Vec<Duration>,
    /// When each of them held the new entry, in time order.
    pub fetches: Vec<Duration>,
    /// `members[x]`: the process life of `x` counted in the population,
    /// `0` if `x` is not counted.
    members: Vec<u32>,
}

/// Fractions of the population reported for every spread.
pub const SPREAD_FRACTIONS: [f64; 4] = [0.5, 0.99, 0.999, 1.0];

impl Spread {
    /// How long after the publish `fraction` of the population had the
    /// notice (`fetched == false`) or the entry (`fetched == true`).
    pub fn time_to(&self, fraction: f64, fetched: bool) -> Option<Duration> {
        let arrivals = if fetched {
            &self.fetches
        } else {
            &self.notices
        };
        let needed = needed(self.population, fraction);
        if needed == 0 {
            return Some(Duration::ZERO);
        }
        arrivals
            .get(needed - 1)
            .map(|t| t.saturating_sub(self.published_at))
    }
}

/// Nodes needed for `fraction` of `population` (rounded up).
pub fn needed(population: usize, fraction: f64) -> usize {
    ((population as f64) * fraction - 1e-9).ceil().max(0.0) as usize
}

/// Catalog versions, who holds what, and agreement counts.
#[derive(Debug)]
pub struct Catalogs {
    /// Owner of each slot.
    owner: Vec<usize>,
    /// Slot of each owner.
    slot_of: Vec<Option<usize>>,
    /// Current version of each slot's entry.
    version: Vec<u64>,
    /// `fetched[x][slot]`: the entry version `x` holds.
    fetched: Vec<Vec<u64>>,
    /// `noticed[x][slot]`: the highest notice `x` received.
    noticed: Vec<Vec<u64>>,
    /// Life of each node's process while running, `0` when stopped.
    life: Vec<u32>,
    /// Outdated entries per running node.
    mismatch: Vec<u32>,
    total_mismatch: u64,
    agreeing: usize,
    live: usize,
    spreads: Vec<Spread>,
    spreads_of: Vec<Vec<usize>>,
}

impl Catalogs {
    /// `n` nodes, no entry published yet.
    pub fn new(n: usize) -> Self {
        Self {
            owner: Vec::new(),
            slot_of: vec![None; n],
            version: Vec::new(),
            fetched: vec![Vec::new(); n],
            noticed: vec![Vec::new(); n],
            life: vec![0; n],
            mismatch: vec![0; n],
            total_mismatch: 0,
            agreeing: 0,
            live: 0,
            spreads: Vec::new(),
            spreads_of: Vec::new(),
        }
    }

    /// The slot of `owner`'s entry, if it ever published.
    pub fn slot(&self, owner: usize) -> Option<usize> {
        self.slot_of[owner]
    }

    /// The entry version `x` holds for `slot`.
    fn fetched(&self, x: usize, slot: usize) -> u64 {
        self.fetched[x].get(slot).copied().unwrap_or(0)
    }

    /// Whether every running node holds every running owner's entry.
    pub fn agreed(&self) -> bool {
        self.total_mismatch == 0
    }

    /// Outdated (node, entry) pairs.
    pub fn total_mismatch(&self) -> u64 {
        self.total_mismatch
    }

    /// Running nodes holding every current entry.
    pub fn agreeing(&self) -> usize {
        self.agreeing
    }

    /// Every catalog change so far.
    pub fn spreads(&self) -> &[Spread] {
        &self.spreads
    }

    fn wrong(&self, x: usize, slot: usize) -> bool {
        let owner = self.owner[slot];
        owner != x && self.life[owner] != 0 && self.fetched(x, slot) != self.version[slot]
    }

    fn row_mismatch(&self, x: usize) -> u32 {
        let wrong = (0..self.owner.len()).filter(|&s| self.wrong(x, s)).count();
        u32::try_from(wrong).unwrap_or(u32::MAX)
    }

    fn add_row(&mut self, x: usize) {
        self.total_mismatch += u64::from(self.mismatch[x]);
        if self.mismatch[x] == 0 {
            self.agreeing += 1;
        }
    }

    fn remove_row(&mut self, x: usize) {
        self.total_mismatch -= u64::from(self.mismatch[x]);
        if self.mismatch[x] == 0 {
            self.agreeing -= 1;
        }
    }

    /// Recomputes every running node's agreement about `slot`, around a
    /// change made by `change`.
    fn update_slot(&mut self, slot: usize, change: impl FnOnce(&mut Self)) {
        let n = self.life.len();
        let before: Vec<bool> = (0..n)
            .map(|x| self.life[x] != 0 && self.wrong(x, slot))
            .collect();
        change(self);
        for (x, was) in before.into_iter().enumerate() {
            if self.life[x] == 0 {
                continue;
            }
            let is = self.wrong(x, slot);
            if was != is {
                self.remove_row(x);
                if is {
                    self.mismatch[x] += 1;
                } else {
                    self.mismatch[x] -= 1;
                }
                self.add_row(x);
            }
        }
    }

    /// `x` starts a process (life `life`): it holds its own entry and learns
    /// the others by fetching them.
    pub fn start(&mut self, x: usize, life: u32) {
        debug_assert!(life != 0);
        let slots = self.owner.len();
        self.fetched[x] = vec![0; slots];
        self.noticed[x] = vec![0; slots];
        if let Some(s) = self.slot_of[x] {
            self.fetched[x][s] = self.version[s];
            self.noticed[x][s] = self.version[s];
        }
        let own = self.slot_of[x];
        match own {
            Some(s) => self.update_slot(s, |c| c.life[x] = life),
            None => self.life[x] = life,
        }
        self.mismatch[x] = self.row_mismatch(x);
        self.add_row(x);
        self.live += 1;
    }

    /// `x`'s process stops; what it held is lost (the owner keeps its
    /// version on disk).
    pub fn stop(&mut self, x: usize) {
        if self.life[x] == 0 {
            return;
        }
        self.remove_row(x);
        self.mismatch[x] = 0;
        self.live -= 1;
        match self.slot_of[x] {
            Some(s) => self.update_slot(s, |c| c.life[x] = 0),
            None => self.life[x] = 0,
        }
        self.fetched[x] = Vec::new();
        self.noticed[x] = Vec::new();
    }

    /// `owner` publishes `version` at `now`.
    pub fn publish(&mut self, owner: usize, version: u64, now: Duration) {
        let slot = match self.slot_of[owner] {
            Some(s) => s,
            None => {
                let s = self.owner.len();
                self.owner.push(owner);
                self.slot_of[owner] = Some(s);
                self.version.push(0);
                self.spreads_of.push(Vec::new());
                for x in 0..self.life.len() {
                    if self.life[x] != 0 {
                        self.fetched[x].push(0);
                        self.noticed[x].push(0);
                    }
                }
                s
            }
        };
        self.update_slot(slot, |c| {
            c.version[slot] = version;
            c.fetched[owner][slot] = version;
            c.noticed[owner][slot] = version;
        });
        let members: Vec<u32> = self
            .life
            .iter()
            .enumerate()
            .map(|(x, &l)| if x == owner { 0 } else { l })
            .collect();
        let population = members.iter().filter(|&&l| l != 0).count();
        self.spreads_of[slot].push(self.spreads.len());
        self.spreads.push(Spread {
            owner,
            version,
            published_at: now,
            population,
            notices: Vec::new(),
            fetches: Vec::new(),
            members,
        });
    }

    /// Records arrivals at `x` for every spread of `slot` with a version in
    /// `(old, new]`.
    fn arrive(&mut self, x: usize, slot: usize, old: u64, new: u64, now: Duration, fetched: bool) {
        let life = self.life[x];
        for &i in &self.spreads_of[slot] {
            let s = &mut self.spreads[i];
            if s.version > old && s.version <= new && s.members[x] == life && life != 0 {
                if fetched {
                    s.fetches.push(now);
                } else {
                    s.notices.push(now);
                }
            }
        }
    }

    /// `x` received a notice of `owner`'s `version`. Returns whether it is
    /// newer than the entry `x` holds (so `x` should fetch it).
    pub fn notice(&mut self, x: usize, owner: usize, version: u64, now: Duration) -> bool {
        let Some(slot) = self.slot_of[owner] else {
            return false;
        };
        if self.life[x] == 0 {
            return false;
        }
        let old = self.noticed[x][slot];
        if version > old {
            self.noticed[x][slot] = version;
            self.arrive(x, slot, old, version, now, false);
        }
        version > self.fetched[x][slot]
    }

    /// `x` fetched `owner`'s entry at `version`.
    pub fn fetched_entry(&mut self, x: usize, owner: usize, version: u64, now: Duration) {
        let Some(slot) = self.slot_of[owner] else {
            return;
        };
        if self.life[x] == 0 {
            return;
        }
        let old = self.fetched[x][slot];
        if version <= old {
            return;
        }
        // Holding the entry implies knowing of it.
        let old_notice = self.noticed[x][slot];
        if version > old_notice {
            self.noticed[x][slot] = version;
            self.arrive(x, slot, old_notice, version, now, false);
        }
        let was = self.wrong(x, slot);
        self.fetched[x][slot] = version;
        let is = self.wrong(x, slot);
        if was != is {
            self.remove_row(x);
            if is {
                self.mismatch[x] += 1;
            } else {
                self.mismatch[x] -= 1;
            }
            self.add_row(x);
        }
        self.arrive(x, slot, old, version, now, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn agreement_and_spread() {
        let mut c = Catalogs::new(3);
        for x in 0..3 {
            c.start(x, 1);
        }
        assert!(c.agreed());
        c.publish(0, 5, t(0));
        assert_eq!(c.total_mismatch(), 2);
        assert!(c.notice(1, 0, 5, t(10)));
        c.fetched_entry(1, 0, 5, t(12));
        assert_eq!(c.total_mismatch(), 1);
        c.fetched_entry(2, 0, 5, t(20));
        assert!(c.agreed());
        let s = &c.spreads()[0];
        assert_eq!(s.population, 2);
        assert_eq!(s.time_to(0.5, false), Some(t(10)));
        assert_eq!(
            s.time_to(1.0, false),
            Some(t(20)),
            "a fetch implies the notice"
        );
        assert_eq!(s.time_to(1.0, true), Some(t(20)));
        // The owner stops: its entry no longer counts; a restarted node
        // must fetch again.
        c.stop(0);
        c.stop(2);
        c.start(2, 2);
        assert!(c.agreed());
        c.start(0, 2);
        assert_eq!(c.total_mismatch(), 1, "node 2 lost what it held");
        assert_eq!(c.fetched(1, 0), 5, "node 1 kept what it held");
    }

    #[test]
    fn needed_rounds_up() {
        assert_eq!(needed(100, 0.5), 50);
        assert_eq!(needed(100, 0.999), 100);
        assert_eq!(needed(1000, 0.999), 999);
        assert_eq!(needed(3, 0.99), 3);
        assert_eq!(needed(0, 1.0), 0);
    }
}

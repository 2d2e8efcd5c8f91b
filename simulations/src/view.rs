//! Ground truth against what each node believes, kept up to date from the
//! membership events each core emits.
//!
//! For every running node `x` and every other node `y`, `x` agrees about `y`
//! when it holds `y` active (alive or suspect) with exactly the generation
//! `y` runs now, or holds it inactive when `y` is not running. The counts
//! are maintained incrementally, so "does everyone agree" costs nothing to
//! ask after every simulated event, even at 10,000 nodes; a change of
//! ground truth costs one pass over the nodes.

/// A generation as tracked here; `0` means "not running" or "not active".
pub type Gen = u32;

/// Converts a [`gossamer_membership::NodeId`] generation (starting at 1 in
/// the simulator) to a [`Gen`].
pub fn gen_of(generation: u64) -> Gen {
    Gen::try_from(generation).unwrap_or(Gen::MAX)
}

/// Ground truth and per-node beliefs.
#[derive(Debug)]
pub struct Views {
    /// Generation each node runs, `0` when it is not running.
    truth: Vec<Gen>,
    /// `belief[x][y]`: the generation of `y` that `x` holds active, or `0`.
    /// Empty for nodes that are not running.
    belief: Vec<Vec<Gen>>,
    /// Disagreements in each running node's row.
    mismatch: Vec<u32>,
    total_mismatch: u64,
    agreeing: usize,
    live: usize,
}

impl Views {
    /// `n` nodes, none running.
    pub fn new(n: usize) -> Self {
        Self {
            truth: vec![0; n],
            belief: vec![Vec::new(); n],
            mismatch: vec![0; n],
            total_mismatch: 0,
            agreeing: 0,
            live: 0,
        }
    }

    /// Whether `x` runs.
    pub fn is_live(&self, x: usize) -> bool {
        self.truth[x] != 0
    }

    /// The generation `x` runs (`0` if none).
    pub fn truth(&self, x: usize) -> Gen {
        self.truth[x]
    }

    /// Running nodes.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Running nodes whose view is exactly right.
    pub fn agreeing(&self) -> usize {
        self.agreeing
    }

    /// Wrong (observer, member) pairs over all running nodes.
    pub fn total_mismatch(&self) -> u64 {
        self.total_mismatch
    }

    /// Share of (running observer, other node) pairs that are right.
    pub fn pairs_right(&self) -> f64 {
        let pairs = self.live as f64 * self.truth.len().saturating_sub(1) as f64;
        if pairs == 0.0 {
            1.0
        } else {
            1.0 - self.total_mismatch as f64 / pairs
        }
    }

    /// Whether every running node sees exactly the running nodes.
    pub fn agreed(&self) -> bool {
        self.total_mismatch == 0
    }

    /// What `x` believes about `y` (`0`: not active).
    pub fn belief(&self, x: usize, y: usize) -> Gen {
        self.belief[x].get(y).copied().unwrap_or(0)
    }

    /// The members `x` holds active, in index order.
    pub fn active_of(&self, x: usize) -> impl Iterator<Item = usize> + '_ {
        self.belief[x]
            .iter()
            .enumerate()
            .filter(|&(_, &g)| g != 0)
            .map(|(y, _)| y)
    }

    /// How many members `x` holds active.
    pub fn active_count(&self, x: usize) -> usize {
        self.belief[x].iter().filter(|&&g| g != 0).count()
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

    /// Applies a change of one pair's agreement to running row `x`.
    fn adjust(&mut self, x: usize, was_wrong: bool, is_wrong: bool) {
        if was_wrong == is_wrong {
            return;
        }
        self.remove_row(x);
        if is_wrong {
            self.mismatch[x] += 1;
        } else {
            self.mismatch[x] -= 1;
        }
        self.add_row(x);
    }

    /// Ground truth for `y` changes to `generation` (`0`: stops running):
    /// every running observer's agreement about `y` is re-evaluated.
    fn set_truth(&mut self, y: usize, generation: Gen) {
        let old = self.truth[y];
        self.truth[y] = generation;
        for x in 0..self.truth.len() {
            if x == y || self.truth[x] == 0 {
                continue;
            }
            let b = self.belief(x, y);
            self.adjust(x, b != old, b != generation);
        }
    }

    /// Up to `limit` wrong pairs, as `(observer, member, believed, truth)`
    /// generations, in index order. Costs O(N²) in the worst case.
    pub fn wrong_pairs(&self, limit: usize) -> Vec<(usize, usize, Gen, Gen)> {
        let mut out = Vec::new();
        for x in 0..self.truth.len() {
            if self.truth[x] == 0 || self.mismatch[x] == 0 {
                continue;
            }
            for y in 0..self.truth.len() {
                let b = self.belief(x, y);
                if y != x && b != self.truth[y] {
                    out.push((x, y, b, self.truth[y]));
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// `x` starts running `generation` with an empty view.
    pub fn start(&mut self, x: usize, generation: Gen) {
        debug_assert!(generation != 0 && self.truth[x] == 0);
        self.set_truth(x, generation);
        let n = self.truth.len();
        self.belief[x] = vec![0; n];
        self.mismatch[x] = (0..n)
            .filter(|&y| y != x && self.truth[y] != 0)
            .count()
            .try_into()
            .unwrap_or(u32::MAX);
        self.add_row(x);
        self.live += 1;
    }

    /// `x` stops running (crash or leave).
    pub fn stop(&mut self, x: usize) {
        if self.truth[x] == 0 {
            return;
        }
        self.remove_row(x);
        self.mismatch[x] = 0;
        self.belief[x] = Vec::new();
        self.live -= 1;
        self.set_truth(x, 0);
    }

    /// `x` renewed its identity (declared down, rejoined as `generation`).
    pub fn renew(&mut self, x: usize, generation: Gen) {
        if self.truth[x] != 0 {
            self.set_truth(x, generation);
        }
    }

    /// `x` now holds `y` active as `generation` (`0`: inactive).
    pub fn set_belief(&mut self, x: usize, y: usize, generation: Gen) {
        if x == y || self.truth[x] == 0 {
            return;
        }
        let old = self.belief[x][y];
        self.belief[x][y] = generation;
        let truth = self.truth[y];
        self.adjust(x, old != truth, generation != truth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_events() {
        let mut v = Views::new(3);
        v.start(0, 1);
        assert!(v.agreed(), "alone and right");
        v.start(1, 1);
        assert_eq!(v.total_mismatch(), 2);
        v.set_belief(0, 1, 1);
        v.set_belief(1, 0, 1);
        assert!(v.agreed());
        assert_eq!(v.agreeing(), 2);
        v.stop(1);
        assert_eq!(v.total_mismatch(), 1, "0 still holds 1 active");
        v.set_belief(0, 1, 0);
        assert!(v.agreed());
        v.start(1, 2);
        v.set_belief(0, 1, 1);
        assert_eq!(v.total_mismatch(), 2, "stale generation is wrong");
        v.set_belief(0, 1, 2);
        v.set_belief(1, 0, 1);
        assert!(v.agreed());
        v.renew(0, 2);
        assert_eq!(v.total_mismatch(), 1);
        v.set_belief(1, 0, 2);
        assert!(v.agreed());
        assert_eq!(v.active_of(0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(v.live(), 2);
    }
}

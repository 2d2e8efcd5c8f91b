//! Passive health: outlier ejection after consecutive failures, and a
//! retry budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ejection settings.
#[derive(Debug, Clone)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject an instance.
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each ejection in a row.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
    /// Largest share of a service's instances ejected at once.
    pub max_share: f64,
}

#[derive(Debug, Default)]
struct InstanceState {
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Per-instance failure tracking, keyed by `node/id`.
#[derive(Debug, Default)]
pub struct Outliers {
    state: Mutex<HashMap<String, InstanceState>>,
}

/// What recording a result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Kept,
    /// The instance was just ejected for this long.
    Ejected(Duration),
}

impl Outliers {
    /// Whether `key` is ejected right now.
    pub fn is_ejected(&self, key: &str, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .get(key)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Records a success: resets the failure streak and, once an ejection
    /// has run out without new failures, the backoff. Returns whether this
    /// ended an ejection (the instance is back in rotation).
    pub fn success(&self, key: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = state.get_mut(key) {
            s.failures = 0;
            if s.ejected_until.is_some_and(|u| u <= Instant::now()) {
                s.ejected_until = None;
                s.ejections = 0;
                return true;
            }
        }
        false
    }

    /// Records a failure; ejects when the streak reaches the threshold and
    /// fewer than `max_share` of the service's `instances` (their keys) are
    /// ejected already.
    pub fn failure(
        &self,
        key: &str,
        instances: &[impl AsRef<str>],
        policy: &EjectionPolicy,
        now: Instant,
    ) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ejected = instances
            .iter()
            .filter(|k| {
                state
                    .get(k.as_ref())
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|u| u > now)
            })
            .count();
        let s = state.entry(key.to_owned()).or_default();
        if s.ejected_until.is_some_and(|u| u > now) {
            return Verdict::Kept;
        }
        s.failures += 1;
        if s.failures < policy.consecutive_failures {
            return Verdict::Kept;
        }
        let allowed = ((instances.len() as f64 * policy.max_share).floor() as usize).max(1);
        if ejected >= allowed || instances.len() <= 1 {
            return Verdict::Kept;
        }
        let factor = 1u32 << s.ejections.min(16);
        let time = policy.base.saturating_mul(factor).min(policy.max);
        s.ejections += 1;
        s.failures = 0;
        s.ejected_until = Some(now + time);
        Verdict::Ejected(time)
    }
}

/// At most `ratio` extra load from retries (with a floor so a quiet
/// service can still retry), over a 10 s window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_window: u64,
    window: Mutex<(Instant, u64, u64)>,
}

const WINDOW: Duration = Duration::from_secs(10);

impl RetryBudget {
    /// A budget allowing `ratio` retries per request, and at least
    /// `min_per_window` per 10 s.
    pub fn new(ratio: f64, min_per_window: u64) -> Self {
        Self {
            ratio,
            min_per_window,
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    fn roll(w: &mut (Instant, u64, u64), now: Instant) {
        if now.saturating_duration_since(w.0) >= WINDOW {
            *w = (now, 0, 0);
        }
    }

    /// Counts a request made `now`.
    pub fn request(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w, now);
        w.1 += 1;
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_retry(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w, Instant::now());
        let allowed = ((w.1 as f64 * self.ratio) as u64).max(self.min_per_window);
        if w.2 < allowed {
            w.2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: 3,
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            max_share: 0.5,
        }
    }

    #[test]
    fn ejects_after_streak_with_backoff_and_cap() {
        let o = Outliers::default();
        let keys: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let now = Instant::now();
        assert_eq!(o.failure("a", &keys, &policy(), now), Verdict::Kept);
        assert_eq!(o.failure("a", &keys, &policy(), now), Verdict::Kept);
        assert_eq!(
            o.failure("a", &keys, &policy(), now),
            Verdict::Ejected(Duration::from_secs(10))
        );
        assert!(o.is_ejected("a", now));
        assert!(!o.is_ejected("a", now + Duration::from_secs(11)));
        // Second ejection in a row doubles.
        let later = now + Duration::from_secs(11);
        for _ in 0..2 {
            o.failure("a", &keys, &policy(), later);
        }
        assert_eq!(
            o.failure("a", &keys, &policy(), later),
            Verdict::Ejected(Duration::from_secs(20))
        );
        // At most half of the instances: b gets ejected, c does not.
        for _ in 0..3 {
            o.failure("b", &keys, &policy(), later);
        }
        assert!(o.is_ejected("b", later));
        for _ in 0..3 {
            o.failure("c", &keys, &policy(), later);
        }
        assert!(!o.is_ejected("c", later));
    }

    #[test]
    fn budget_limits_retries() {
        let b = RetryBudget::new(0.2, 2);
        assert!(b.try_retry());
        assert!(b.try_retry());
        assert!(!b.try_retry());
        for _ in 0..100 {
            b.request(Instant::now());
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 18, "20 allowed, 2 already used");
    }
}

//! A clock for what only needs the time to a few milliseconds (idleness,
//! header deadlines of seconds) but reads it on every request.
//!
//! A precise reading (`Instant::now`, `CLOCK_MONOTONIC` through the vDSO)
//! reads the CPU's time-stamp counter and scales it: about 20 ns here, more
//! when the vDSO's page is out of cache. `CLOCK_MONOTONIC_COARSE` returns
//! the time of the kernel's last tick (1–10 ms old) without the counter:
//! about 3 ns. Each proxied request read the clock four to six times for
//! such bookkeeping.

/// Milliseconds on a monotonic clock with the resolution of the kernel's
/// tick (1–10 ms on Linux). Never 0, so 0 can mean "unset". Compare only
/// with other readings of this clock.
pub fn coarse_ms() -> u64 {
    imp::coarse_ms().max(1)
}

#[cfg(target_os = "linux")]
mod imp {
    #[allow(unsafe_code)]
    pub(super) fn coarse_ms() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE
        // exists on every Linux since 2.6.32, and the call only writes `ts`.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        if rc != 0 {
            return super::fallback_ms();
        }
        (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn coarse_ms() -> u64 {
        super::fallback_ms()
    }
}

/// Milliseconds since the first call, from the precise clock.
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn fallback_ms() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn it_is_monotonic_and_keeps_pace_with_the_precise_clock() {
        let (start, fine) = (coarse_ms(), Instant::now());
        let mut last = start;
        for _ in 0..1000 {
            let now = coarse_ms();
            assert!(now >= last, "went back from {last} to {now}");
            last = now;
        }
        std::thread::sleep(Duration::from_millis(60));
        let coarse = coarse_ms() - start;
        let precise = fine.elapsed().as_millis() as u64;
        // A tick is at most 10 ms; each reading may be one tick old.
        assert!(
            coarse + 25 >= precise && coarse <= precise + 25,
            "coarse {coarse} ms against precise {precise} ms"
        );
        assert!(coarse >= 30, "only {coarse} ms passed in 60");
    }
}

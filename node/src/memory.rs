//! The allocator, and giving memory back after a burst.
//!
//! The agent allocates with mimalloc (the `#[global_allocator]` in
//! `lib.rs`), built without transparent huge pages: an agent spends less
//! CPU a request in it than in glibc's allocator, and a fresh agent holds
//! less anonymous memory (docs/benchmarks.md, "mimalloc, kept").
//!
//! mimalloc keeps each size of allocation on pages of its own, so what a
//! burst (hundreds of concurrent HTTP/2 streams, each with its QUIC stream,
//! buffers and upstream connection) frees comes back as whole pages. It
//! returns them to the system lazily, as later allocations come by; an
//! agent that went quiet after a burst was measured still holding them two
//! minutes later. [`give_back`] forces a collection every [`CHECK_EVERY`],
//! which returns them at once.

use std::time::Duration;

/// How often the allocator is asked to give back what it holds free.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Collects every [`CHECK_EVERY`] until the agent stops.
pub async fn give_back() {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        collect();
    }
}

/// Eagerly frees what the allocator holds free and returns it to the
/// system (`mi_collect(true)`).
#[allow(unsafe_code)]
pub fn collect() {
    // SAFETY: mi_collect only walks the allocator's own free pages under
    // its own synchronisation; it has no preconditions and touches no live
    // allocation.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn rss_kib() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_freed_burst_is_given_back_and_what_lives_stays() {
        // A burst of buffers with small long-lived allocations made
        // between them, as a burst of connections leaves a few entries
        // behind.
        let mut kept = Vec::new();
        let mut freed = Vec::new();
        for i in 0..4096 {
            freed.push(vec![(i % 251) as u8; 4000]);
            if i % 8 == 0 {
                kept.push(vec![(i % 13) as u8; 48]);
            }
        }
        drop(freed);
        let before = rss_kib();
        collect();
        let after = rss_kib();
        // About 16 MB were freed; other tests run alongside, so ask for
        // less than that.
        assert!(
            before >= after + 4096,
            "RSS {before} KiB before the collection, {after} after"
        );
        let intact = kept
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == ((i * 8) % 13) as u8));
        assert!(intact, "a live block changed");
    }
}

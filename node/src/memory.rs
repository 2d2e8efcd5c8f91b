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
//!
//! An agent's start is its churn: the configuration parsed, the catalog
//! loaded and saved, the peers' catalogs merged, routes built. mimalloc
//! purges a freed page only after a delay (1 s), so pages the start freed
//! are reused by long-lived allocations while still resident, and a few
//! objects keep whole 64 KiB pages in. [`purge_at_once`] makes the start
//! purge each page as it is freed, and [`give_back`] restores the delay
//! after [`SETTLING`]: purging at once under load costs 8–22 % more CPU a
//! request (docs/benchmarks.md, "A fresh agent's heap").

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// How often the allocator is asked to give back what it holds free.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// How long after [`purge_at_once`] the purge delay comes back.
pub const SETTLING: Duration = Duration::from_secs(30);

/// `mi_option_purge_delay`: its position in mimalloc v3's `mi_option_t`,
/// which libmimalloc-sys does not name.
const PURGE_DELAY: mi_option_t = 15;

/// The purge delay [`purge_at_once`] replaced, until it is restored.
static DELAY: AtomicI64 = AtomicI64::new(NONE);
const NONE: i64 = i64::MIN;

/// Makes the allocator purge each page as it is freed, until
/// [`give_back`] restores the delay after [`SETTLING`].
#[allow(unsafe_code)]
pub fn purge_at_once() {
    // SAFETY: options are plain values inside mimalloc, read on each use;
    // getting and setting one has no preconditions.
    #[allow(clippy::useless_conversion)] // c_long is narrower on some targets
    let delay = i64::from(unsafe { mi_option_get(PURGE_DELAY) });
    if DELAY
        .compare_exchange(NONE, delay, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        // SAFETY: as above.
        unsafe { mi_option_set(PURGE_DELAY, 0) };
    }
}

/// Puts back the delay [`purge_at_once`] replaced, if it did.
#[allow(unsafe_code)]
fn restore_delay() {
    let delay = DELAY.swap(NONE, Ordering::AcqRel);
    if delay != NONE {
        // SAFETY: as in `purge_at_once`; the value is one mimalloc gave.
        unsafe { mi_option_set(PURGE_DELAY, delay as _) };
    }
}

/// Collects every [`CHECK_EVERY`] until the agent stops, restoring the
/// purge delay at the first collection after [`SETTLING`].
pub async fn give_back() {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if start.elapsed() >= SETTLING {
            restore_delay();
        }
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

    #[test]
    #[allow(unsafe_code)]
    fn the_start_purges_at_once_and_the_delay_comes_back() {
        // SAFETY: reading an option has no preconditions.
        #[allow(clippy::useless_conversion)]
        let get = || i64::from(unsafe { mi_option_get(PURGE_DELAY) });
        let before = get();
        // mimalloc v3 purges after 1,000 ms unless told otherwise; no
        // neighbouring option has that default, so this also checks that
        // PURGE_DELAY names the purge delay.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(before, 1000);
        }
        purge_at_once();
        assert_eq!(get(), 0);
        purge_at_once();
        restore_delay();
        assert_eq!(get(), before, "a second call must not lose the delay");
        restore_delay();
        assert_eq!(get(), before);
    }

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

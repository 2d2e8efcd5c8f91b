//! Giving the heap back after a burst.
//!
//! glibc's allocator returns freed memory to the system only from the top
//! of its heap. After a burst (hundreds of concurrent HTTP/2 streams, each
//! with its QUIC stream, buffers and upstream connection) the freed chunks
//! lie between live ones and stay resident: an agent measured at 30 MB
//! (caller) and 40 MB (owner) after such a burst went back to 24 and 32 MB
//! with one `malloc_trim`. [`give_back`] checks every
//! [`CHECK_EVERY`] how much the allocator holds free and trims when that is
//! at least [`TRIM_ABOVE`]; an agent at rest or under steady load finds
//! little free and does nothing.

use std::time::Duration;

/// How often the allocator's free memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Free heap, in bytes, worth a trim.
pub const TRIM_ABOVE: usize = 2 << 20;

/// Trims the heap every [`CHECK_EVERY`] when it holds at least
/// [`TRIM_ABOVE`] free. Runs until the agent stops.
pub async fn give_back() {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Some(freed) = trim_if_above(TRIM_ABOVE) {
            tracing::debug!(free_bytes = freed, "returned free heap to the system");
        }
    }
}

/// The allocator's free bytes, or `None` where they cannot be read (any
/// allocator but glibc's).
pub fn heap_free() -> Option<usize> {
    imp::heap_free()
}

/// Trims when at least `threshold` bytes are free; returns how many were.
pub fn trim_if_above(threshold: usize) -> Option<usize> {
    let free = heap_free()?;
    (free >= threshold).then(|| {
        imp::trim();
        free
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub fn heap_free() -> Option<usize> {
        // SAFETY: mallinfo2 reads the allocator's statistics under its
        // own locks; it has no preconditions and returns a plain struct.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }

    pub fn trim() {
        // SAFETY: malloc_trim releases free pages under the allocator's
        // locks; it has no preconditions and touches no live allocation.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn heap_free() -> Option<usize> {
        None
    }

    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_freed_burst_is_given_back_and_what_lives_stays() {
        // Keep one block in eight, as a burst of connections leaves a few
        // long-lived allocations between the freed ones: the free chunks
        // are not at the heap's top, so free() alone keeps them resident.
        let mut kept = Vec::new();
        let mut freed = Vec::new();
        for i in 0..4096 {
            let block = vec![(i % 251) as u8; 4000];
            if i % 8 == 0 {
                kept.push(block);
            } else {
                freed.push(block);
            }
        }
        drop(freed);
        let free = heap_free().expect("glibc reports its free heap");
        assert!(free >= 8 << 20, "{free} bytes free after the burst");
        assert_eq!(trim_if_above(usize::MAX), None, "below the threshold");
        let before = rss_kib();
        assert!(trim_if_above(8 << 20).is_some());
        let after = rss_kib();
        // About 14 MB were freed; other tests run alongside, so ask for
        // less than that.
        assert!(
            before >= after + 4096,
            "RSS {before} KiB before the trim, {after} after"
        );
        let intact = kept
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == ((i * 8) % 251) as u8));
        assert!(intact, "a live block changed");
    }
}

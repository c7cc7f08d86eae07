//! The binaries' memory allocator (mimalloc), and handing freed memory back to the OS.
//!
//! Why mimalloc: with glibc's allocator, `malloc` and `free` were a fifth of the
//! relay-server's instructions per small request at 16 connections, and an idle tunnel
//! held 9.9–10.7 KiB where mimalloc holds 7.0 (`docs/PERFORMANCE.md`). Each binary
//! declares it in its `main.rs`:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: relay_config_file::allocator::Allocator = relay_config_file::allocator::Allocator;
//! ```
//!
//! mimalloc keeps a heap per thread and returns a thread's free pages to the OS (after a
//! short delay) only while that thread runs allocator code. A tokio worker that falls idle
//! after a burst would keep its share of the burst's memory until its next request, so each
//! worker collects its heap when it parks ([`on_park`], installed by [`crate::runtime`]):
//! at most once a second, and thoroughly once after [`release`] asked for it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The allocator both binaries use.
#[cfg(not(feature = "system-allocator"))]
pub use mimalloc::MiMalloc as Allocator;
/// The allocator both binaries use: the system's, built with `system-allocator` for heap
/// profilers that intercept `malloc` (mimalloc never calls it, so DHAT saw no allocation).
#[cfg(feature = "system-allocator")]
pub use std::alloc::System as Allocator;

/// How often an idle worker collects its heap at most: parking happens thousands of times
/// a second under load, a collection walks the thread's pages.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Bumped by [`release`]: a worker that parks and has not collected since collects fully.
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The thread's last collection: when, and the [`RELEASES`] count it answered.
    static LAST: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// Hands the memory freed since the last collection back to the OS: on this thread at
/// once, on the runtime's other workers when they next park. Costs a walk of the heaps (and
/// of glibc's arenas, which C libraries and any in-process test still use): call it after a
/// load peak, never per request.
pub fn release() {
    RELEASES.fetch_add(1, Ordering::Relaxed);
    collect(true);
    LAST.with(|l| l.set(Some((Instant::now(), RELEASES.load(Ordering::Relaxed)))));
    malloc_trim();
}

/// A worker thread parks (it has nothing to run): it collects its heap when a [`release`]
/// asked since it last did (fully), or when a second passed (the pages freed meanwhile).
pub fn on_park() {
    let asked = RELEASES.load(Ordering::Relaxed);
    let now = Instant::now();
    if let Some(force) = due(LAST.with(Cell::get), asked, now) {
        collect(force);
        LAST.with(|l| l.set(Some((now, asked))));
    }
}

/// Whether a thread whose last collection was `last` collects now, and fully: `Some(true)`
/// when a release was asked since, `Some(false)` a second after the last, else `None`.
fn due(last: Option<(Instant, u64)>, asked: u64, now: Instant) -> Option<bool> {
    match last {
        Some((_, seen)) if seen != asked => Some(true),
        Some((at, _)) if now.duration_since(at) < COLLECT_EVERY => None,
        _ => Some(false),
    }
}

#[allow(unsafe_code)]
fn collect(force: bool) {
    // SAFETY: mi_collect takes no pointers; it frees what the calling thread's heap no
    // longer uses (and, forced, the abandoned segments and caches).
    unsafe { libmimalloc_sys::mi_collect(force) }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn malloc_trim() {
    // SAFETY: malloc_trim takes no pointers; it only locks and walks glibc's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parking_worker_collects_once_a_second_and_fully_after_a_release() {
        let t0 = Instant::now();
        assert_eq!(
            due(None, 0, t0),
            Some(false),
            "a thread's first park collects"
        );
        let last = Some((t0, 0));
        assert_eq!(due(last, 0, t0 + Duration::from_millis(999)), None);
        assert_eq!(due(last, 0, t0 + COLLECT_EVERY), Some(false));
        assert_eq!(
            due(last, 1, t0 + Duration::from_millis(1)),
            Some(true),
            "a release is answered at the next park, however recent the last collection"
        );
    }

    #[test]
    fn release_and_park_run_on_a_live_heap() {
        // Real calls into mimalloc and glibc, with memory in use and freed around them.
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        drop((0..64).map(|_| vec![0u8; 64 << 10]).collect::<Vec<_>>());
        release();
        let seen = LAST
            .with(Cell::get)
            .expect("release records its collection")
            .1;
        assert_eq!(seen, RELEASES.load(Ordering::Relaxed));
        on_park();
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, v)| v.iter().all(|&b| b == i as u8)));
    }
}

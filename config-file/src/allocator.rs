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

/// The allocator both binaries use: mimalloc, asked for alignment only when a type needs
/// more than every block has.
///
/// The `mimalloc` crate's allocator calls `mi_malloc_aligned` for every allocation, which
/// checks the free block's alignment and takes a slower path when it does not fit (a
/// 24-byte block is 8-aligned only). Every mimalloc block is aligned to a word (block sizes
/// are multiples of 8 bytes, `MI_INTPTR_SIZE`), so a type that needs no more takes the
/// plain `mi_malloc`, as Rust's own `System` allocator does with `malloc` (about 2 % of the
/// relay-server's instructions per small request).
#[cfg(not(feature = "system-allocator"))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Allocator;

/// A block of `layout` from `plain` when every block has its alignment, else `aligned`.
///
/// # Safety
/// As [`std::alloc::GlobalAlloc::alloc`]: `layout` has a non-zero size.
#[cfg(not(feature = "system-allocator"))]
#[allow(unsafe_code)]
#[inline]
unsafe fn by_alignment(
    layout: std::alloc::Layout,
    plain: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    // SAFETY: mimalloc's allocation functions take sizes only.
    unsafe {
        if every_block_fits(layout) {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

/// The alignment every mimalloc block has.
#[cfg(not(feature = "system-allocator"))]
const WORD: usize = std::mem::size_of::<usize>();

/// Whether every mimalloc block has `layout`'s alignment: the plain functions serve it.
#[cfg(not(feature = "system-allocator"))]
#[inline]
fn every_block_fits(layout: std::alloc::Layout) -> bool {
    layout.align() <= WORD
}

// SAFETY: every method hands its pointer and sizes to mimalloc's matching function; plain
// `mi_malloc` and `mi_realloc` only for alignments every block has (`WORD`), the aligned
// functions otherwise, and `mi_free` frees either kind.
#[cfg(not(feature = "system-allocator"))]
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        by_alignment(
            layout,
            libmimalloc_sys::mi_malloc,
            libmimalloc_sys::mi_malloc_aligned,
        )
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        by_alignment(
            layout,
            libmimalloc_sys::mi_zalloc,
            libmimalloc_sys::mi_zalloc_aligned,
        )
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        if every_block_fits(layout) {
            mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}
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

/// Asks the kernel not to back this process's memory with transparent huge pages
/// (`PR_SET_THP_DISABLE`, which also overrides the allocator's own `MADV_HUGEPAGE`); call
/// it once, early in `main`, after the logs are set up. Returns whether the kernel took
/// it; a refusal (a seccomp filter) is logged at debug level, and only the cost of a heap's
/// first growth comes back.
///
/// Why: mimalloc asks for huge pages for its arenas, so a growing heap is faulted in 2 MiB
/// at a time, each first touch zeroing all of it. On the benchmark VM a relay-server's
/// first burst of 10 000 requests after its start took 0.31–0.34 s in four runs of twelve
/// (against 0.20–0.26 s for the next bursts), two thirds of its CPU in the kernel zeroing
/// those pages (`perf record -g`: `clear_page_erms` under `do_huge_pmd_anonymous_page`,
/// from the allocator growing its heap); with 4 KiB pages no first burst of nine was slow,
/// and the steady rates did not change (`docs/PERFORMANCE.md`, twenty-eighth round). The
/// relay's heap is many small blocks that come and go with requests: huge pages buy it
/// little and cost it zeroing, and resident memory, in 2 MiB steps.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn no_huge_pages() -> bool {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag of this process.
    let took = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 };
    if !took {
        tracing::debug!("transparent huge pages stay as the system has them (prctl refused)");
    }
    took
}

/// Transparent huge pages are Linux's; elsewhere there is nothing to switch off.
#[cfg(not(target_os = "linux"))]
pub fn no_huge_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process (this test binary) asks for no huge pages, and the kernel says it has
    /// none for it from then on.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_can_switch_its_huge_pages_off() {
        assert!(no_huge_pages(), "prctl refused");
        #[allow(unsafe_code)]
        // SAFETY: PR_GET_THP_DISABLE takes integers only and reads a flag of this process.
        let off = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(off, 1);
    }

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

    /// Every layout gets a block of its alignment, whole and writable, through allocation,
    /// zeroed allocation and growth (an alignment above a word through the plain functions
    /// would fail here: a 24-byte block is often only 8-aligned).
    #[cfg(not(feature = "system-allocator"))]
    #[test]
    #[allow(unsafe_code)]
    fn every_layout_gets_its_alignment() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = Allocator;
        let mut blocks = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=200).chain([1000, 4096, 70_000]) {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // SAFETY: non-zero sizes; each block is freed below with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{layout:?}"
                    );
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align), "zeroed {layout:?}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert!((grown as usize).is_multiple_of(align), "grown {layout:?}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xa5), "kept {layout:?}");
                    blocks.push((grown, Layout::from_size_align(size * 3, align).unwrap()));
                    blocks.push((z, layout));
                }
            }
        }
        for (p, layout) in blocks {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { a.dealloc(p, layout) };
        }
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

//! Handing freed memory back to the operating system after a load peak.
//!
//! An allocator keeps the pages of freed memory: after a burst of 10 000 parked requests
//! the process would stay at its peak size although nothing is live any more (measured by
//! the benchmark suite, `docs/PERFORMANCE.md`). [`relay_config_file::allocator::release`]
//! returns them; it walks every heap, so it runs only when the load has fallen well below
//! a peak, never per request.
//!
//! The binaries' allocator is mimalloc, whose workers also hand back their free pages when
//! they park (at most once a second, `relay_config_file::allocator::on_park`): that covers
//! memory freed while the load stays up. The free-memory signal below ([`allocator_free`])
//! is glibc's, for where glibc's allocator serves the relay (the in-process tests, a build
//! without mimalloc); in the binaries it counts what C libraries allocate and stays flat.

/// The load (requests, connections) a peak must reach before a fall is worth a trim.
const MIN_PEAK: usize = 256;

/// Memory freed since the allocator's low point that is worth a trim once things are
/// quiet, whatever the load: a burst of 6 000 tunnels opened at once leaves about 2 KiB
/// each of its setup's memory (request futures, connection buffers) free in the arenas
/// while the tunnels stay open (measured, `docs/PERFORMANCE.md`), and the load never falls.
const FREED_WORTH_TRIM: usize = 4 << 20;

/// One tick's look at the relay.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The highest load since the previous tick (a burst between two ticks counts).
    pub peak: usize,
    /// The load now.
    pub load: usize,
    /// No new request arrived since the previous tick.
    pub quiet: bool,
    /// Bytes free in the allocator's arenas ([`allocator_free`]), if known.
    pub free: Option<usize>,
}

/// Trims after the load falls to an eighth of its peak, or on a quiet tick once memory
/// has been freed since the allocator's low point. Never under a steady stream of requests
/// (they would fault the trimmed pages back in), never per request.
#[derive(Debug, Default)]
pub struct Trimmer {
    peak: usize,
    /// The least free memory seen since the last trim.
    free_low: Option<usize>,
}

impl Trimmer {
    /// Records one tick; true when it trimmed.
    pub fn tick(&mut self, s: Sample) -> bool {
        self.peak = self.peak.max(s.peak).max(s.load);
        let fell = self.peak >= MIN_PEAK && s.load <= self.peak / 8;
        let freed = match (s.free, &mut self.free_low) {
            (Some(free), Some(low)) => {
                *low = (*low).min(free);
                free - *low >= FREED_WORTH_TRIM
            }
            (Some(free), low @ None) => {
                *low = Some(free);
                false
            }
            (None, _) => false,
        };
        tracing::trace!(?s, low = ?self.free_low, fell, freed, "trim check");
        if !(fell || (freed && s.quiet)) {
            return false;
        }
        tracing::debug!(load = s.load, free = ?s.free, fell, "handing freed memory back");
        self.peak = s.load;
        // The chunks stay free in the allocator's count after a trim (only their pages
        // go back): the low point starts again from here.
        self.free_low = s.free;
        release();
        true
    }
}

/// Bytes in free chunks of glibc's arenas (`mallinfo2`), where known.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn allocator_free() -> Option<usize> {
    // SAFETY: mallinfo2 takes no pointers and returns its counters by value; it only locks
    // and walks the arenas' free lists.
    Some(unsafe { libc::mallinfo2() }.fordblks)
}

/// Bytes in free chunks of the allocator's arenas, where known.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn allocator_free() -> Option<usize> {
    None
}

fn release() {
    relay_config_file::allocator::release();
}

#[cfg(test)]
mod tests {
    use super::{Sample, Trimmer, FREED_WORTH_TRIM};

    fn at(peak: usize, load: usize) -> Sample {
        Sample {
            peak,
            load,
            quiet: false,
            free: None,
        }
    }

    #[test]
    fn trims_once_after_a_peak_falls() {
        let mut t = Trimmer::default();
        assert!(!t.tick(at(10, 10)), "small loads never trim");
        assert!(!t.tick(at(2_000, 1_000)), "half the peak is still load");
        assert!(t.tick(at(300, 100)), "an eighth of the peak trims");
        assert!(
            !t.tick(at(50, 50)),
            "the peak restarts from the trimmed level"
        );
        assert!(!t.tick(at(0, 0)));
        assert!(t.tick(at(5_000, 0)), "a burst between two ticks counts");
    }

    #[test]
    fn memory_freed_under_a_steady_load_is_trimmed_once_things_are_quiet() {
        let mut t = Trimmer::default();
        let tick = |t: &mut Trimmer, free: usize, quiet: bool| {
            t.tick(Sample {
                peak: 6_000,
                load: 6_000,
                quiet,
                free: Some(free),
            })
        };
        assert!(!tick(&mut t, 1 << 20, false));
        // A burst's setup memory is freed while requests still arrive: no trim yet.
        assert!(!tick(&mut t, (1 << 20) + FREED_WORTH_TRIM, false));
        // The first quiet tick trims...
        assert!(tick(&mut t, (1 << 20) + FREED_WORTH_TRIM, true));
        // ...once: the free chunks stay counted after a trim.
        assert!(!tick(&mut t, (1 << 20) + FREED_WORTH_TRIM, true));
        // Less than the threshold freed again: nothing.
        assert!(!tick(&mut t, (1 << 20) + FREED_WORTH_TRIM + 1024, true));
        // Reused, then freed again past the threshold: the low point counts.
        assert!(!tick(&mut t, 1 << 20, true));
        assert!(tick(&mut t, (1 << 20) + FREED_WORTH_TRIM, true));
    }
}

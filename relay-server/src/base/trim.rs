//! Handing freed memory back to the operating system after a load peak.
//!
//! glibc's allocator keeps the pages of freed chunks in its arenas: after a burst of 10 000
//! parked requests the process stays at its peak size although nothing is live any more
//! (measured by the benchmark suite, `docs/PERFORMANCE.md`). `malloc_trim` returns those
//! pages; it walks every arena, so it runs only when the load has fallen well below a peak,
//! never per request.

/// The load (requests, connections) a peak must reach before a fall is worth a trim.
const MIN_PEAK: usize = 256;

/// Watches the load once a tick and trims after it falls to an eighth of its peak. `peak` is
/// the highest load since the previous tick (a burst between two ticks counts).
#[derive(Debug, Default)]
pub struct Trimmer {
    peak: usize,
}

impl Trimmer {
    /// Records `load`; true when this tick trimmed.
    pub fn tick(&mut self, peak: usize, load: usize) -> bool {
        self.peak = self.peak.max(peak).max(load);
        if self.peak < MIN_PEAK || load > self.peak / 8 {
            return false;
        }
        self.peak = load;
        release();
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() {
    // SAFETY: malloc_trim takes no pointers; it only locks and walks the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::Trimmer;

    #[test]
    fn trims_once_after_a_peak_falls() {
        let mut t = Trimmer::default();
        assert!(!t.tick(10, 10), "small loads never trim");
        assert!(!t.tick(2_000, 1_000), "half the peak is still load");
        assert!(t.tick(300, 100), "an eighth of the peak trims");
        assert!(!t.tick(50, 50), "the peak restarts from the trimmed level");
        assert!(!t.tick(0, 0));
        assert!(t.tick(5_000, 0), "a burst between two ticks counts");
    }
}

//! The tokio runtime of both binaries, sized by `--worker-threads`.
//!
//! Why a flag: every hand-off between tasks on different worker threads costs a futex or
//! an eventfd write and often a context switch. A relayed small request crosses several
//! tasks, so on a machine the relay shares with its backend or its agent (2 cores in the
//! benchmarks) one worker thread serves more requests per CPU second and answers sooner
//! than one per core; see `docs/PERFORMANCE.md`. A server on a machine of its own wants
//! one per core, the default.

use std::io;

/// Builds the runtime: `threads` worker threads, or one per core when 0.
pub fn build(threads: usize, name: &str) -> io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name(name);
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.build()
}

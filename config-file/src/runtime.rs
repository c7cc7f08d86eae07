//! The tokio runtime of both binaries, sized by `--worker-threads`.
//!
//! Why a flag: every hand-off between tasks on different worker threads costs a futex or
//! an eventfd write and often a context switch. A relayed small request crosses several
//! tasks, so on a machine the relay shares with its backend or its agent (2 cores in the
//! benchmarks) one worker thread serves more small requests per CPU second and answers
//! them sooner than one per core. But with one thread, a bulk transfer that keeps it busy
//! delays the small requests beside it (small GETs beside a 1 GiB download: median 1.1 ms
//! with the agent on one thread, 0.44 ms on two; 99th percentile 7 ms either way). So the
//! relay-client, which runs beside its backend, defaults to one thread, and the
//! relay-server, whose host is its own, to one per core; see `docs/PERFORMANCE.md`.

use std::io;
use std::time::Duration;

/// Builds the runtime: `threads` worker threads, or one per core when 0.
///
/// One thread is tokio's current-thread scheduler, on the thread that calls `block_on`:
/// the future given to `block_on` and the tasks it spawns then run on that one thread. A
/// multi-threaded runtime with one worker ran them on two (`block_on`'s caller and the
/// worker), so every hand-off between the main future and a task crossed threads; and its
/// scheduler keeps per-worker queues and idle counts with atomics that one thread does not
/// need. The agent, one thread by default, spends 9 % fewer instructions per small request
/// this way (19 540 -> 17 707 at 16 connections, `docs/PERFORMANCE.md`).
///
/// `spin` is the current-thread runtime's spinning window (`crate::spin`; zero for none);
/// multi-threaded runtimes do not spin.
pub fn build(threads: usize, name: &str, spin: Duration) -> io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return single(spin);
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all()
        .thread_name(name)
        .on_thread_park(crate::allocator::on_park);
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.build()
}

/// A single-threaded runtime for one thread of its own (the relay-server's shards: see
/// `relay-server/src/shards.rs`), with the same allocator hook as [`build`]'s workers,
/// spinning for `spin` after its work before it parks (`crate::spin`; zero: never).
pub fn single(spin: Duration) -> io::Result<tokio::runtime::Runtime> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(|| {
            crate::spin::on_park();
            crate::allocator::on_park();
        })
        .on_thread_unpark(crate::spin::on_unpark)
        .build()?;
    if !spin.is_zero() {
        // Owned by the runtime: it ends when the runtime is dropped.
        rt.spawn(crate::spin::spinner(spin));
    }
    Ok(rt)
}

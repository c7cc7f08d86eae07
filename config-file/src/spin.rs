//! Spinning before parking (`--spin`): a single-threaded runtime that has just run work
//! keeps polling its I/O without blocking for a short window before it parks.
//!
//! Why: a relayed request hops between processes (user, relay-server, agent, backend and
//! back), and each hop wakes a thread, often on the other core. On a virtual machine whose
//! idle vCPU halts (this project's 2-core benchmark machine has guest halt-polling off,
//! `guest_halt_poll_ns` 0), waking a task on an idle core costs about 28 µs (a pipe
//! ping-pong between two threads: 58 µs per round trip on two cores, 1.8 µs on one), and
//! the scheduler trace of a 16-connection load showed a fifth of the machine idle while
//! woken threads waited for it. A runtime thread that spins for a moment after its work
//! does not halt its vCPU: the next event for it is seen at once, and a thread woken onto
//! its core runs as soon as the spinner yields to it (`sched_yield` on every turn). This is
//! what guest halt-polling, Go's spinning threads and the kernel's busy polling do; see
//! `docs/PERFORMANCE.md` ("Spinning before parking").
//!
//! How: a task spawned on the runtime ([`spinner`]) yields in a loop; a yielded task makes
//! tokio's current-thread scheduler poll its driver without blocking before running it
//! again. When the runtime's own tasks did no work for the window (its thread's CPU time
//! per turn says so: [`OTHER_WORK`]), it waits for the runtime's next wake-up
//! from a park ([`on_unpark`], the runtime's `on_thread_unpark` hook), so the thread parks.
//! The window adapts to how soon the wake-ups come ([`adapt`]): a relay woken only now and
//! then (idle agents' pings) soon stops spinning at all, one under load spins for the most.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The default longest window (`--spin` on both binaries).
pub const DEFAULT: &str = "200us";

/// This thread's CPU time in one turn of the spinner beyond its cheapest turn: more means a
/// task of the runtime ran, and the window starts again. One turn (a poll of the driver, a
/// `sched_yield` and a read of the thread's clock: three system calls) takes 1–3 µs.
///
/// The thread's own CPU time, not the wall clock: another thread that ran on this core in
/// between (which is what `sched_yield` is for) did none of this runtime's work. With the
/// wall clock, two spinners sharing a core (a relay-server and its agent on one machine)
/// took each other's turns for work and spun on for as long as both were idle: a whole core
/// (the nineteenth round in `docs/PERFORMANCE.md`).
const OTHER_WORK: Duration = Duration::from_micros(3);

/// The longest park that counts as no event for the window: the runtime was woken just
/// before or as it parked, or the timer wheel woke it to move a timer to a finer level and
/// it parked again (tokio's wheel does, on the way to a timer tens of milliseconds off:
/// a park of about 5 µs after it, which at 4 µs here grew the window of an idle runtime
/// again on every timer).
const AT_ONCE: Duration = Duration::from_micros(20);

thread_local! {
    /// The parked spinner of this thread's runtime.
    static WAITING: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// Whether the runtime woke from a park since the spinner last looked.
    static UNPARKED: Cell<bool> = const { Cell::new(false) };
    /// When the current park began, and how long the last one lasted.
    static PARKED: Cell<(Option<Instant>, Duration)> = const { Cell::new((None, Duration::ZERO)) };
    /// Parks and spinning turns on this thread (read by tests).
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The runtime's `on_thread_park` hook: counts the park and notes when it began.
pub fn on_park() {
    COUNTS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    PARKED.with(|p| p.set((Some(Instant::now()), Duration::ZERO)));
}

/// The runtime's `on_thread_unpark` hook: the thread woke from a park, so the spinner
/// spins again.
pub fn on_unpark() {
    PARKED.with(|p| {
        let lasted = p.get().0.map_or(Duration::MAX, |at| at.elapsed());
        p.set((None, lasted));
    });
    UNPARKED.with(|u| u.set(true));
    if let Some(w) = WAITING.with(|w| w.borrow_mut().take()) {
        w.wake();
    }
}

/// Parks and spinning turns so far on the calling thread.
pub fn counts() -> (u64, u64) {
    COUNTS.with(Cell::get)
}

/// Spins while the runtime works and for up to `max` after; then lets it park until it
/// wakes. Spawned once per single-threaded runtime (`crate::runtime::single`); it lives as
/// long as the runtime.
pub async fn spinner(max: Duration) {
    let mut window = max;
    loop {
        let mut last_work = Instant::now();
        let mut prev = thread_cpu();
        // The cheapest turn of this spell: what a turn without work costs here.
        let mut cheapest = Duration::MAX;
        while !window.is_zero() {
            tokio::task::yield_now().await;
            yield_core();
            COUNTS.with(|c| c.set((c.get().0, c.get().1 + 1)));
            let cpu = thread_cpu();
            let turn = cpu.saturating_sub(prev);
            prev = cpu;
            cheapest = cheapest.min(turn);
            let now = Instant::now();
            if turn > cheapest + OTHER_WORK {
                last_work = now;
            }
            if now - last_work >= window {
                break;
            }
        }
        UNPARKED.with(|u| u.set(false));
        // A park that ended at once (the runtime was woken just before it parked) is no
        // event: waited through, so it neither starts spinning nor adapts the window.
        loop {
            poll_fn(|cx| {
                if UNPARKED.with(|u| u.replace(false)) {
                    return Poll::Ready(());
                }
                WAITING.with(|w| *w.borrow_mut() = Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            if PARKED.with(Cell::get).1 > AT_ONCE {
                break;
            }
        }
        window = adapt(window, max, last_work.elapsed());
    }
}

/// The next window after the thread was idle for `idle` (from its last work to the event
/// that woke it), as the guest's halt-polling adapts its own (Linux,
/// `drivers/cpuidle/governors/haltpoll.c`): an event that came within `max` would have been
/// caught by spinning for `max`, so the window doubles (from a quarter of `max`); one that
/// came later was not worth any spinning, so the window halves, down to none. A relay that
/// wakes only now and then (idle agents' pings, a request a second) soon stops spinning;
/// one under load spins for the whole `max`.
fn adapt(window: Duration, max: Duration, idle: Duration) -> Duration {
    let start = max / 4;
    if idle <= max {
        (window * 2).clamp(start, max)
    } else if window / 2 < start {
        Duration::ZERO
    } else {
        window / 2
    }
}

/// The CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`: a system call, as the
/// vDSO serves only the wall clocks).
#[allow(unsafe_code)]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a timespec to write to; the calling thread's CPU clock always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Lets a thread that is waiting for this core run (a no-op when none is).
#[allow(unsafe_code)]
fn yield_core() {
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe {
        libc::sched_yield();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{adapt, counts};

    /// The window grows while events come within the longest window and shrinks to none
    /// while they come later.
    #[test]
    fn the_window_grows_with_events_that_spinning_would_catch_and_shrinks_to_none_without() {
        let max = Duration::from_micros(100);
        let us = Duration::from_micros;
        // Late events: 100 -> 50 -> 25 -> none, and it stays at none.
        assert_eq!(adapt(max, max, us(1500)), us(50));
        assert_eq!(adapt(us(50), max, us(1500)), us(25));
        assert_eq!(adapt(us(25), max, us(1500)), Duration::ZERO);
        assert_eq!(adapt(Duration::ZERO, max, us(1500)), Duration::ZERO);
        // An early event starts it again at a quarter, then it doubles up to the maximum.
        assert_eq!(adapt(Duration::ZERO, max, us(60)), us(25));
        assert_eq!(adapt(us(25), max, us(60)), us(50));
        assert_eq!(adapt(us(50), max, us(100)), max);
        assert_eq!(adapt(max, max, us(10)), max);
    }

    /// A runtime with a window spins after it starts and parks once it has been idle for
    /// the window (else it would spin for ever); wake-ups long after its work (here timers
    /// 20 ms apart) soon stop its spinning.
    #[test]
    fn a_runtime_spins_after_work_parks_once_idle_and_stops_spinning_for_late_wake_ups() {
        let rt = crate::runtime::single(Duration::from_micros(200)).expect("runtime");
        rt.block_on(async {
            let (parks0, turns0) = counts();
            // Bounded: a loaded machine may keep restarting the window for a while.
            for _ in 0..500 {
                if counts().0 > parks0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (parks1, turns1) = counts();
            assert!(parks1 > parks0, "the runtime never parked");
            assert!(turns1 > turns0, "the spinner never turned");
            // 200 -> 100 -> 50 -> none: a few late wake-ups, then one without a turn.
            let mut quiet = false;
            let mut seen = Vec::new();
            for _ in 0..50 {
                let before = counts();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let after = counts();
                seen.push((after.0 - before.0, after.1 - before.1));
                if after.1 == before.1 {
                    quiet = true;
                    break;
                }
            }
            assert!(
                quiet,
                "the spinner kept spinning after late wake-ups {seen:?}"
            );
        });
    }

    /// Two spinning runtimes on one core (a relay-server and its agent on a one-core
    /// machine) still park when both are idle: each one's turns, which the other's
    /// `sched_yield` lets run, are not work of its own. (Counting any gap between turns as
    /// work, they kept each other spinning, a whole core, for as long as both stayed idle.)
    #[test]
    fn two_runtimes_spinning_on_one_core_park_when_idle() {
        let cpu = first_allowed_cpu();
        let sides: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    pin_to(cpu);
                    let rt = crate::runtime::single(Duration::from_micros(200)).expect("runtime");
                    rt.block_on(async {
                        let parks0 = counts().0;
                        // Bounded: the timer wakes the runtime every 10 ms; a runtime that
                        // spins through its timers never parks.
                        for _ in 0..300 {
                            if counts().0 >= parks0 + 5 {
                                return true;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        false
                    })
                })
            })
            .collect();
        for side in sides {
            assert!(
                side.join().expect("thread"),
                "a runtime kept spinning while idle"
            );
        }
    }

    /// The lowest CPU this process may run on.
    #[allow(unsafe_code)]
    fn first_allowed_cpu() -> usize {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &set))
                .expect("some CPU")
        }
    }

    /// Keeps the calling thread on `cpu`.
    #[allow(unsafe_code)]
    fn pin_to(cpu: usize) {
        // SAFETY: as above; the set names one CPU this process may use.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                0
            );
        }
    }

    /// Without a window there is no spinner: the runtime parks as soon as it is idle.
    #[test]
    fn a_runtime_without_a_window_never_spins() {
        let rt = crate::runtime::single(Duration::ZERO).expect("runtime");
        rt.block_on(async {
            let (parks0, turns0) = counts();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(counts().0 > parks0);
            assert_eq!(counts().1, turns0);
        });
    }
}

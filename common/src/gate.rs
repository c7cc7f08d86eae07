//! A future polled again only after its own wake-up: for the rare-event branches of a
//! `select!` in a loop (stop, revocation, drain, idle limit) that stay pending while the
//! loop turns for other reasons.
//!
//! `tokio::select!` polls every branch whenever its task wakes. A session's loop turns a few
//! times per relayed request, and each turn polled its cancellation futures again: a
//! `CancellationToken`'s future locks the token's node to check it and locks its `Notify`'s
//! waiter list to re-check the registration (tokio's `Notified` compares the waker under
//! that lock), four lock round trips per branch per turn, on locks shared by every session
//! and connection of the process. A [`Gated`] future hands the inner future a waker of its
//! own; until that waker fires, polling the gate costs one atomic swap and a waker
//! comparison.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `inner`, polled only on its first poll and after its own waker fired.
pub struct Gated<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
    /// The waker handed to `inner` (the gate's), made once.
    waker: Waker,
    /// Whether `inner` was polled once: its wake-ups go through the gate from then on.
    armed: bool,
}

/// What a wake-up of the inner future leaves behind: a flag, and the task to wake.
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Flag first: the task, once woken, must see it.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Wraps `inner` (one allocation for it, one for the gate: meant for futures that live
/// across many polls, not one per request).
pub fn gated<F: Future>(inner: F) -> Gated<F> {
    let gate = Arc::new(Gate {
        woken: AtomicBool::new(false),
        task: AtomicWaker::new(),
    });
    Gated {
        inner: Box::pin(inner),
        waker: Waker::from(gate.clone()),
        gate,
        armed: false,
    }
}

impl<F: Future> Gated<F> {
    /// Replaces the inner future in place (no allocation); the next poll reaches it.
    pub fn reset(&mut self, inner: F) {
        self.inner.set(inner);
        self.armed = false;
    }

    /// The inner future, for calls it offers before its first poll (`Notified::enable`).
    pub fn inner_mut(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read: a wake-up after the read wakes this task
        // (and is seen by its next poll).
        this.gate.task.register(cx.waker());
        if this.armed && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.armed = true;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::gated;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use tokio_util::sync::CancellationToken;

    /// Counts its polls; pending until `ready` is set, then wakes nobody by itself.
    struct Counted {
        polls: Arc<AtomicUsize>,
        token: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.token.as_mut().poll(cx)
        }
    }

    /// Polls while nothing happened do not reach the inner future; the inner future's own
    /// wake-up lets the next poll through, and its result comes out.
    #[tokio::test]
    async fn the_inner_future_is_polled_only_after_its_wake_up() {
        let token = CancellationToken::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut g = Box::pin(gated(Counted {
            polls: polls.clone(),
            token: Box::pin(token.clone().cancelled_owned()),
        }));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(g.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "only the first poll went in"
        );
        token.cancel();
        assert!(g.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    /// A wake-up of the inner future wakes the task that polled the gate last, also when
    /// it comes from another thread while that task waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_up_reaches_the_waiting_task() {
        let token = CancellationToken::new();
        let waiting = gated(token.clone().cancelled_owned());
        let canceller = tokio::spawn(async move {
            tokio::task::yield_now().await;
            token.cancel();
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the gate passed the wake-up on");
        canceller.await.unwrap();
    }
}

//! The bounded queue between a relayed response's exchanges (one sender) and its user side
//! (one receiver): a response body's chunks, or a tunnel's backend→user bytes.
//!
//! Why not tokio's `mpsc`: its channel allocates its slots in blocks of 32 whatever the
//! bound, 2 KiB for 64-byte deliveries, on the first send, and keeps them; with its own
//! state it was a quarter of what an idle tunnel cost the relay-server (a heap profile of
//! 300 idle tunnels, `docs/PERFORMANCE.md`). Here the slots are a `VecDeque` that grows
//! to what is waiting (at most the bound) and nothing is allocated before the first
//! chunk. The lock is held for a push or a pop; chunks are up to an exchange frame's
//! size, so it is taken a few times per 64 KiB at most.
//!
//! Like tokio's channels, a push or pop that makes progress spends the task's cooperative
//! budget (`tokio::task::coop`): a task that finds chunks always ready (a fast download
//! through the user's connection) yields to the scheduler every so often instead of
//! keeping its worker thread while small requests wait (issue 13's scenario 8).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use tokio::task::coop;

/// A bounded queue of at most `bound` items; `bound` must be at least 1.
pub fn queue<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    assert!(bound > 0, "bug: a queue needs room for one item");
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bound,
            receiver: None,
            sender: None,
            receiver_gone: false,
            sender_gone: false,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    items: VecDeque<T>,
    bound: usize,
    /// The receiver waiting for an item (or the end).
    receiver: Option<Waker>,
    /// The sender waiting for room.
    sender: Option<Waker>,
    receiver_gone: bool,
    sender_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the queue half-changed (each
        // change is one push or pop), so a poisoned lock is still a valid queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Puts wakers to use outside the lock.
fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// The sending end (one per queue).
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item`, waiting while the queue is full. Gives it back when the receiver is
    /// gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let mut item = Some(item);
        poll_fn(|cx| self.poll_send(cx, &mut item)).await
    }

    fn poll_send(&self, cx: &mut Context<'_>, item: &mut Option<T>) -> Poll<Result<(), T>> {
        let coop = ready!(coop::poll_proceed(cx));
        let mut s = self.shared.lock();
        let it = item.take().expect("bug: polled after it finished");
        if s.receiver_gone {
            return Poll::Ready(Err(it));
        }
        if s.items.len() >= s.bound {
            *item = Some(it);
            s.sender = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.items.push_back(it);
        let receiver = s.receiver.take();
        drop(s);
        coop.made_progress();
        wake(receiver);
        Poll::Ready(Ok(()))
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.sender_gone = true;
        let receiver = s.receiver.take();
        drop(s);
        wake(receiver);
    }
}

/// The receiving end (one per queue).
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item; `None` once the sender is gone and everything it sent was taken.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let coop = ready!(coop::poll_proceed(cx));
        let mut s = self.shared.lock();
        if let Some(item) = s.items.pop_front() {
            let sender = s.sender.take();
            drop(s);
            coop.made_progress();
            wake(sender);
            return Poll::Ready(Some(item));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        s.receiver = Some(cx.waker().clone());
        Poll::Pending
    }

    /// See [`Receiver::poll_recv`].
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver_gone = true;
        // Dropped outside the lock: an item may hold what it frees on drop (the budget).
        let items = std::mem::take(&mut s.items);
        let sender = s.sender.take();
        drop(s);
        drop(items);
        wake(sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn items_come_in_order_and_the_bound_holds_the_sender() {
        let (tx, mut rx) = queue(2);
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        // Full: the third waits until the receiver takes one.
        {
            let third = tx.send(3);
            tokio::pin!(third);
            assert!((&mut third).now_or_never().is_none());
            assert_eq!(rx.recv().await, Some(1));
            third.await.unwrap();
        }
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert!(rx.recv().now_or_never().is_none(), "nothing more yet");
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_receiver_that_always_finds_items_still_yields_to_the_scheduler() {
        let (tx, mut rx) = queue(1000);
        for i in 0..1000 {
            tx.send(i).await.unwrap();
        }
        // Items are waiting, yet a receive is pending once the task's budget is spent…
        let mut got = 0;
        while let Some(item) = rx.recv().now_or_never() {
            assert_eq!(item, Some(got));
            got += 1;
        }
        assert!(got < 1000, "the budget ran out before the queue did");
        // …and goes on in order after the task yielded.
        tokio::task::yield_now().await;
        assert_eq!(rx.recv().await, Some(got));
    }

    #[tokio::test]
    async fn what_the_sender_queued_before_it_went_is_still_received() {
        let (tx, mut rx) = queue(4);
        tx.send("a").await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some("a"));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_gone_receiver_frees_what_waited_and_fails_the_sender_even_one_waiting() {
        let held = Arc::new(());
        let (tx, rx) = queue(1);
        tx.send(held.clone()).await.unwrap();
        let waiting = tokio::spawn(async move {
            let r = tx.send(Arc::new(())).await;
            r.is_err()
        });
        // The waiting sender is woken by the receiver's going and gets its item back.
        tokio::task::yield_now().await;
        drop(rx);
        assert!(waiting.await.unwrap());
        assert_eq!(Arc::strong_count(&held), 1, "the queued item was dropped");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_end() {
        let (tx, mut rx) = queue::<u8>(1);
        let recv = tokio::spawn(async move { (rx.recv().await, rx.recv().await) });
        tokio::task::yield_now().await;
        tx.send(7).await.unwrap();
        drop(tx);
        assert_eq!(recv.await.unwrap(), (Some(7), None));
    }
}

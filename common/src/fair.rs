//! Bulk bytes charged to the task's cooperative budget, so that one large body or tunnel
//! cannot hold a worker thread while small requests wait behind it.
//!
//! Why: tokio gives each task poll a budget of 128 operations, and a socket read or write
//! is one operation whatever its size. A body pump whose source and sink are both always
//! ready (a backend and a user on loopback, a download at 1 GB/s) moves hundreds of
//! KiB per operation, so a single poll of its task ran for about 10 ms; every small
//! request queued on that worker waited that long (`relay-bench` scenario 8 with one
//! worker thread: small GETs' median 10.5 ms beside a 1 GiB download). Here a step of
//! `n` bytes costs one operation per unit of bytes, so a task moves at most 128 units per
//! poll before tokio makes it yield (`docs/PERFORMANCE.md`):
//! - an HTTP body, [`BODY_UNIT`] (512 bytes): 64 KiB per poll, about 60 µs at 1 GB/s.
//!   Beside a 1 GiB download this took the small GETs' median from 1.5–2.2 to 0.4–0.7 ms
//!   and their p99 from 6.9–9.2 to 2.1–6.1 ms (four alternating rounds). The price: the
//!   pumps yield four times as often; 100 MB bodies alone moved within noise of before
//!   in eight alternating rounds (a tenth slower in one set of four), about 2× rathole's;
//! - a tunnel's bytes, [`TUNNEL_UNIT`] (2 KiB): 256 KiB per poll. A tunnel's bytes pass
//!   three relay processes (`relay-client connect`, the relay-server, the agent), and at
//!   512 bytes its throughput fell by 5–28 % (three rounds).
//!
//! Outside a tokio task (no budget) nothing is charged and nothing waits.

use std::task::{ready, Context, Poll};

use tokio::task::coop;

/// Bytes of an HTTP body that cost one operation of the task's budget.
pub const BODY_UNIT: usize = 512;
/// Bytes of a tunnel (a switched connection) that cost one operation.
pub const TUNNEL_UNIT: usize = 2 * 1024;

/// A step about to be taken: `Pending` (the task yields, and is polled again after the
/// other tasks waiting for its worker) when the task's budget is spent. Call
/// [`Turn::moved`] with the bytes the step moved; a turn dropped without it (the source was
/// not ready) costs nothing.
pub fn poll_turn(cx: &mut Context<'_>) -> Poll<Turn> {
    Poll::Ready(Turn(Some(ready!(coop::poll_proceed(cx)))))
}

/// See [`poll_turn`].
pub struct Turn(Option<coop::RestoreOnPending>);

impl Turn {
    /// The step moved `n` bytes: one operation, plus one per further `unit` bytes
    /// ([`BODY_UNIT`] or [`TUNNEL_UNIT`]) while the budget lasts (the step itself is done;
    /// only the next one waits).
    pub fn moved(mut self, cx: &mut Context<'_>, n: usize, unit: usize) {
        if let Some(first) = self.0.take() {
            first.made_progress();
        }
        for _ in 1..n.div_ceil(unit) {
            if !coop::has_budget_remaining() {
                break;
            }
            if let Poll::Ready(more) = coop::poll_proceed(cx) {
                more.made_progress();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Steps of `n` bytes taken until the budget says wait: how many fit in one poll.
    async fn steps_per_poll(n: usize) -> usize {
        steps_per_poll_of(n, TUNNEL_UNIT).await
    }

    /// Steps of `n` bytes charged by `unit` taken until the budget says wait.
    async fn steps_per_poll_of(n: usize, unit: usize) -> usize {
        // A fresh poll of the task: a full budget.
        tokio::task::yield_now().await;
        poll_fn(|cx| {
            let mut steps = 0;
            loop {
                match poll_turn(cx) {
                    Poll::Ready(turn) => {
                        turn.moved(cx, n, unit);
                        steps += 1;
                    }
                    Poll::Pending => return Poll::Ready(steps),
                }
                if steps > 10_000 {
                    return Poll::Ready(steps);
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn large_steps_spend_the_budget_by_their_size() {
        // Small steps: one operation each, as any tokio resource.
        assert_eq!(steps_per_poll(100).await, 128);
        // 64 KiB steps cost 32 operations: 4 fit in a budget of 128 (256 KiB).
        assert_eq!(steps_per_poll(64 * 1024).await, 4);
        // A step that is not a multiple of the unit is rounded up: 5 KiB costs 3.
        assert_eq!(steps_per_poll(5 * 1024).await, 43);
        // A step larger than the whole budget is still taken, once.
        assert_eq!(steps_per_poll(4 << 20).await, 1);
    }

    #[tokio::test]
    async fn a_body_yields_four_times_as_often_as_a_tunnel() {
        // 16 KiB steps of a body cost 32 operations: 4 fit in a poll (64 KiB)…
        assert_eq!(steps_per_poll_of(16 * 1024, BODY_UNIT).await, 4);
        // …where a tunnel's cost 8 each: 16 fit (256 KiB).
        assert_eq!(steps_per_poll_of(16 * 1024, TUNNEL_UNIT).await, 16);
        // A 64 KiB body read spends the whole budget at once.
        assert_eq!(steps_per_poll_of(64 * 1024, BODY_UNIT).await, 1);
    }

    #[tokio::test]
    async fn a_turn_that_moved_nothing_costs_nothing() {
        let steps = poll_fn(|cx| {
            for _ in 0..1000 {
                let turn = std::task::ready!(poll_turn(cx));
                drop(turn);
            }
            Poll::Ready(1000)
        })
        .await;
        assert_eq!(steps, 1000);
    }

    #[test]
    fn outside_a_task_nothing_waits() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..1000 {
            let Poll::Ready(turn) = poll_turn(&mut cx) else {
                panic!("no budget outside a runtime: never pending");
            };
            turn.moved(&mut cx, 1 << 20, BODY_UNIT);
        }
    }
}

//! The HTTP/2 streams of one connection, run on the connection's own task.
//!
//! hyper hands every HTTP/2 stream it accepts (the request's service future, then the
//! response body's pipe) to its executor. With tokio's, each stream was a task of its own:
//! an allocation, a trip through the scheduler, and often a worker woken on the other core,
//! which then took h2's connection lock against the connection's task for every step of
//! the stream (receive the head, send the response, send its body). Each connection now has
//! an executor of its own ([`Streams::exec`], given to the hyper connection's builder),
//! which queues the stream there, and [`Streams`] polls it from that connection's task, as
//! nginx and Envoy keep each connection's streams on one worker.
//!
//! What the connection's task does is I/O and hand-overs (the relayed work runs in the
//! agent's session and the user's request futures), so one core per connection is not a
//! limit for the streams of one client; many clients still spread over every worker.
//!
//! The streams belong to the connection: when it ends they are dropped with it (their
//! requests are cancelled by their own guards, as when a user leaves), instead of
//! outliving it as detached tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

/// One stream's future, as hyper gives it to the executor.
type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The streams a connection accepted, waiting to be taken into its [`Streams`].
#[derive(Default)]
struct Accepted {
    /// Whether `queue` may hold any: a connection's task looks at every poll, and an
    /// HTTP/1.1 connection never queues one.
    any: AtomicBool,
    queue: Mutex<Vec<Stream>>,
}

/// hyper's executor for one of the relay's connections (made by [`Streams::exec`]): it
/// queues a stream on that connection's task.
#[derive(Clone)]
pub struct ConnExec(Arc<Accepted>);

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Written into its box as it is made: the stream (344 bytes for a user's request)
        // is copied once, not at each move into the queue.
        let stream: Box<F> = Box::write(Box::new_uninit(), fut);
        self.0
            .queue
            .lock()
            .expect("bug: poisoned")
            .push(Box::into_pin(stream));
        self.0.any.store(true, Ordering::Release);
    }
}

/// The streams of one connection, polled by its task.
#[derive(Default)]
pub struct Streams {
    accepted: Arc<Accepted>,
    /// Made at the first stream: an HTTP/1.1 connection (every parked long poll, every
    /// tunnel) never needs one, and an empty set is two allocations.
    running: Option<FuturesUnordered<Stream>>,
}

impl Streams {
    /// The executor for this connection's hyper connection: its streams come here.
    pub fn exec(&self) -> ConnExec {
        ConnExec(self.accepted.clone())
    }

    /// Drives the connection `conn` and its streams until the connection ends; then the
    /// streams still running are dropped with this set.
    pub async fn drive<C: Future + Unpin>(&mut self, conn: &mut C) -> C::Output {
        std::future::poll_fn(|cx| self.poll_with(Pin::new(&mut *conn), cx)).await
    }

    /// One turn: the streams first (a response they send is then written by the
    /// connection's poll in the same turn), then the connection, and again the streams it
    /// just accepted, so that their requests are on their way before the task sleeps.
    fn poll_with<C: Future>(
        &mut self,
        mut conn: Pin<&mut C>,
        cx: &mut Context<'_>,
    ) -> Poll<C::Output> {
        loop {
            self.poll_streams(cx);
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if !self.take_accepted() {
                return Poll::Pending;
            }
        }
    }

    /// Takes the streams accepted since the last look; whether there were any.
    fn take_accepted(&mut self) -> bool {
        if !self.accepted.any.swap(false, Ordering::Acquire) {
            return false;
        }
        let mut q = self.accepted.queue.lock().expect("bug: poisoned");
        // The flag can outlive what it announced: `execute` sets it after its push, so an
        // earlier take may have drained that stream already.
        if q.is_empty() {
            return false;
        }
        self.running
            .get_or_insert_with(FuturesUnordered::new)
            .extend(q.drain(..));
        true
    }

    /// Polls the streams that were woken or just accepted, until none is ready.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        loop {
            self.take_accepted();
            let Some(running) = self.running.as_mut() else {
                return;
            };
            match running.poll_next_unpin(cx) {
                // A stream ended; look again (FuturesUnordered yields after a round of
                // streams that woke themselves, so this ends).
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) | Poll::Pending => {
                    // A stream just polled may have queued another (an HTTP/2 upgrade's
                    // tunnel); poll it too before sleeping.
                    if !self.take_accepted() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    /// One poll of `fut`, whatever it returns.
    async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
    }

    /// A stream accepted while the connection's task polls the connection runs on that
    /// task, and in the same turn: its request is on its way before the task sleeps.
    #[tokio::test]
    async fn a_stream_runs_on_its_connections_task_in_the_turn_that_accepted_it() {
        // In a task, as a connection is (the test's own future is not one).
        let conn_task = tokio::spawn(async {
            let conn_task = tokio::task::id();
            let mut streams = Streams::default();
            let exec = streams.exec();
            let (ran_on, mut seen) = oneshot::channel();
            let mut ran_on = Some(ran_on);
            let mut conn = std::future::poll_fn(move |_| {
                if let Some(tx) = ran_on.take() {
                    exec.execute(async move {
                        let _ = tx.send(tokio::task::id());
                        std::future::pending::<()>().await
                    });
                }
                Poll::<()>::Pending
            });
            let turn = poll_once(&mut Box::pin(streams.drive(&mut conn))).await;
            assert!(turn.is_pending());
            assert_eq!(
                seen.try_recv(),
                Ok(conn_task),
                "polled in the same turn, same task"
            );
            assert_eq!(streams.running.as_ref().map(FuturesUnordered::len), Some(1));
        });
        conn_task.await.expect("the checks passed");
    }

    /// When the connection ends, the streams still running end with it (their guards drop)
    /// instead of outliving it; until then, a woken stream runs to its end.
    #[tokio::test]
    async fn a_connections_streams_end_with_it() {
        let mut streams = Streams::default();
        let exec = streams.exec();
        let (go, wait) = oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let (guard, dropped) = oneshot::channel::<()>();
        let (end_conn, conn_ends) = oneshot::channel::<()>();
        let f = finished.clone();
        exec.execute(async move {
            let _ = wait.await;
            f.store(true, Ordering::SeqCst);
        });
        exec.execute(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let mut conn = conn_ends;
        let mut drive = Box::pin(streams.drive(&mut conn));
        assert!(poll_once(&mut drive).await.is_pending());
        go.send(()).expect("the first stream waits");
        assert!(poll_once(&mut drive).await.is_pending());
        assert!(finished.load(Ordering::SeqCst), "a woken stream ran");
        end_conn.send(()).expect("the connection runs");
        assert!(poll_once(&mut drive).await.is_ready());
        drop(drive);
        drop(streams);
        let mut dropped = dropped;
        assert_eq!(
            dropped.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the pending stream was dropped"
        );
    }
}

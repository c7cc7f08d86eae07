//! Requests in progress on one connection, for its idle timer (`connection::supervise`),
//! and the response body that keeps its connection busy until it is over.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests in progress on one connection, for its idle timer: one timer for the
/// connection's life, where hyper's HTTP/1.1 header read timeout armed and cleared a timer
/// for every request (an allocation, a `now` and two locked timer-wheel updates; 4 % of a
/// small request's instructions on the relay-server).
#[derive(Default)]
pub struct Activity {
    state: Mutex<Requests>,
    /// The connection sent the HTTP/2 preface.
    http2: AtomicBool,
    /// The last request in progress ended while the idle timer waited for it.
    ended: Notify,
}

/// What [`Activity`] counts, under its lock.
#[derive(Default)]
struct Requests {
    /// Requests in progress.
    busy: usize,
    /// When the last one ended (or the connection's first idle look).
    since: Option<Instant>,
    /// The idle timer waits for the end of the requests in progress, not on a clock.
    parked: bool,
}

/// How long a connection may go without a request in progress, by protocol.
#[derive(Clone, Copy, Debug)]
pub struct IdleBounds {
    /// An HTTP/1.1 connection: from its start or the end of its last response to a
    /// complete head (what hyper's header read timeout counted).
    pub http1: Duration,
    /// A connection that sent the HTTP/2 preface.
    pub http2: Duration,
}

/// One request in progress; dropped when its response body is over.
pub struct Busy(Arc<Activity>);

impl Activity {
    /// The connection sent the whole HTTP/2 preface (`limits::FirstBytes` tells).
    pub fn speaks_http2(&self) {
        self.http2.store(true, Ordering::Release);
    }

    /// Whether the connection sent the HTTP/2 preface.
    pub fn http2(&self) -> bool {
        self.http2.load(Ordering::Acquire)
    }

    /// Whether a request is in progress.
    pub fn busy(&self) -> bool {
        self.state.lock().expect("bug: poisoned").busy > 0
    }

    /// Marks a request as started.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.state.lock().expect("bug: poisoned").busy += 1;
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in progress for its bound.
    ///
    /// While requests are in progress it waits for the last to end, not on a timer: a
    /// parked long poll (protocol 1) holds its connection busy for half a minute at a time, and
    /// a timer looking every header read timeout woke 10 000 idle long-poll agents' tasks
    /// 1 000 times a second. The wake costs the request that ends a busy period one
    /// `notify_one`, and only when the timer is waiting for it.
    pub async fn idle_for(&self, bounds: IdleBounds) {
        loop {
            let limit = match self.http2() {
                true => bounds.http2,
                false => bounds.http1,
            };
            let wait = {
                let mut s = self.state.lock().expect("bug: poisoned");
                match (s.busy, s.since) {
                    // One clock read: with two, the second could pass the limit the first
                    // did not, and the subtraction would overflow.
                    (0, Some(since)) => match limit.checked_sub(since.elapsed()) {
                        None | Some(Duration::ZERO) => return,
                        left => left,
                    },
                    (0, None) => {
                        s.since = Some(Instant::now());
                        Some(limit)
                    }
                    _ => {
                        s.parked = true;
                        None
                    }
                }
            };
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                // An end between the unlock and this wait leaves a permit: none is lost.
                None => self.ended.notified().await,
            }
        }
    }
}

/// A response body that keeps its connection busy until it is over (or dropped). Length and
/// end-of-stream pass through, so `Content-Length` is kept.
pub struct Tracked<B> {
    inner: B,
    _busy: Busy,
}

impl<B> Tracked<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, busy: Busy) -> Self {
        Tracked { inner, _busy: busy }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let wake = {
            let mut s = self.0.state.lock().expect("bug: poisoned");
            s.busy -= 1;
            s.since = (s.busy == 0).then(Instant::now);
            s.busy == 0 && std::mem::take(&mut s.parked)
        };
        if wake {
            self.0.ended.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle timer counts from the connection's start or the end of its last request,
    /// by the bound of the connection's protocol; while a request is in progress it waits
    /// for its end without a timer (paused time moves only to a timer that is armed).
    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_waits_for_the_last_request_then_counts_its_bound() {
        let bounds = IdleBounds {
            http1: Duration::from_secs(10),
            http2: Duration::from_secs(75),
        };
        let activity = Arc::new(Activity::default());
        let start = Instant::now();
        activity.idle_for(bounds).await;
        assert_eq!(start.elapsed(), bounds.http1);

        let activity = Arc::new(Activity::default());
        let busy = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(bounds).await }
        });
        // Far past the bound, the request still in progress: the timer has not ended, and it
        // armed no clock of its own (the test's sleep is the only one to advance to).
        let slept = Instant::now();
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        assert!(!idle.is_finished());
        assert!(activity.state.lock().unwrap().parked);
        drop(busy);
        let ended = Instant::now();
        assert_eq!(ended - slept, Duration::from_secs(3_600));
        idle.await.unwrap();
        assert_eq!(
            ended.elapsed(),
            bounds.http1,
            "counted from the request's end"
        );

        // A connection that sent the HTTP/2 preface is bound by the idle timeout.
        let activity = Arc::new(Activity::default());
        activity.http2.store(true, Ordering::Release);
        let start = Instant::now();
        activity.idle_for(bounds).await;
        assert_eq!(start.elapsed(), bounds.http2);
    }
}

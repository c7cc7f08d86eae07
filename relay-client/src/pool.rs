//! The agent's HTTP/1.1 connections to a plain-HTTP backend, each driven by the request
//! that uses it instead of by a task of its own.
//!
//! Why: hyper-util's pooled client gives every backend connection a task, so a request
//! crosses tasks (and usually worker threads) on its way out and again on its way back:
//! its head goes to the connection's task through a channel, the response head and body
//! come back through others. On small requests those hand-offs cost more than the work
//! (`docs/PERFORMANCE.md`). Here the request's own task polls the connection while it
//! waits for the response head and while whoever reads the body reads it; a connection
//! whose exchange is complete waits in the pool, unpolled, for the next request. HTTPS,
//! HTTP/2 and upgrades keep the pooled client (`upstream`).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::upstream::BackendBody;

/// The shortest time between two sweeps.
const MIN_SWEEP: Duration = Duration::from_millis(500);
/// How long connecting to the backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request through the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The backend could not be reached.
    #[error("connecting to {addr} failed")]
    Connect {
        /// The backend's `host:port`.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The exchange with the backend failed.
    #[error("the backend connection failed")]
    Http(#[from] hyper::Error),
}

/// One connection: the sender of its requests and its driver (the connection's state
/// machine, polled by whoever uses the connection).
struct Conn {
    send: http1::SendRequest<BackendBody>,
    /// Dropped as soon as it finishes (closed or failed), as a connection task would end:
    /// that hands back a request it never wrote and ends a body it was reading.
    driver: Option<http1::Connection<TokioIo<TcpStream>, BackendBody>>,
}

impl Conn {
    /// Drives the connection as far as it can go now.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(d) = &mut self.driver {
            if Pin::new(d).poll(cx).is_ready() {
                self.driver = None;
            }
        }
    }

    /// Whether the connection can carry another request.
    fn reusable(&self) -> bool {
        self.driver.is_some() && !self.send.is_closed()
    }
}

/// Idle connections to one backend, most recently used last.
pub struct Pool {
    addr: String,
    max_idle: usize,
    /// An idle connection older than this is closed rather than reused (as hyper-util's
    /// pool does; `--backend-idle-timeout`).
    idle_for: Duration,
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
    /// A connection came back: one request waiting for its own connection takes it.
    returned: Notify,
}

impl Pool {
    /// A pool for the backend at `addr` (`host:port`) keeping at most `max_idle` idle
    /// connections, each for at most `idle_for`.
    pub fn new(addr: String, max_idle: usize, idle_for: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            max_idle,
            idle_for,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
        })
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection or a new one.
    /// A request that an idle connection refused unwritten (the backend had closed it)
    /// goes again on another: it never reached the backend, so this is no replay.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<BackendBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let (mut conn, reused) = match self.take() {
                Some(c) => (c, true),
                // Boxed: a fresh connection is rare once the pool is warm, and this future
                // is part of every request's.
                None => Box::pin(self.fresh()).await?,
            };
            let mut answer = pin!(conn.send.try_send_request(req));
            let result = poll_fn(|cx| {
                conn.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => {
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        conn: Some(conn),
                        pool: self.clone(),
                    }))
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    fn take(&self) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().expect("bug: poisoned");
        while let Some((conn, since)) = idle.pop() {
            if conn.reusable() && since.elapsed() < self.idle_for {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection, or one another request gives back first (whichever comes first,
    /// as in hyper-util's pool): in a burst, requests go on connections that finished
    /// instead of waiting for connects the backend's accept queue may be slow to take.
    async fn fresh(&self) -> Result<(Box<Conn>, bool), PoolError> {
        let mut connect = pin!(self.connect());
        loop {
            tokio::select! {
                biased;
                c = &mut connect => return c.map(|c| (c, false)),
                // A connection that came back since `take` left a permit: no wake-up lost.
                _ = self.returned.notified() => {
                    if let Some(c) = self.take() {
                        return Ok((c, true));
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, PoolError> {
        let failed = |source| PoolError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await
        {
            Ok(r) => r.map_err(failed)?,
            Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
        };
        // Small requests and answers go out at once (RFC 9293 §3.7.4: Nagle delays them).
        tcp.set_nodelay(true).map_err(failed)?;
        let (send, driver) = http1::handshake(TokioIo::new(tcp)).await?;
        Ok(Box::new(Conn {
            send,
            driver: Some(driver),
        }))
    }

    /// Closes, every half idle timeout, the idle connections that are past their time or
    /// that the backend closed (one turn of each notices its end): a quiet agent holds no
    /// half-closed sockets. Runs until dropped.
    pub async fn sweep(&self) {
        // `--backend-idle-timeout 0s` keeps nothing for reuse; a zero period would panic.
        let mut every = tokio::time::interval((self.idle_for / 2).max(MIN_SWEEP));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut idle = self.idle.lock().expect("bug: poisoned");
            let mut cx = Context::from_waker(Waker::noop());
            idle.retain_mut(|(conn, since)| {
                conn.drive(&mut cx);
                conn.reusable() && since.elapsed() < self.idle_for
            });
        }
    }

    /// Keeps a connection whose exchange is complete for the next request, if it can take
    /// one and the pool has room; otherwise it closes (dropped).
    fn put(&self, conn: Box<Conn>) {
        if !conn.reusable() || !conn.send.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("bug: poisoned");
        // The oldest are first: those past their time close now, not at the next take.
        let stale = idle.partition_point(|(_, since)| now - *since >= self.idle_for);
        idle.drain(..stale);
        if idle.len() < self.max_idle {
            idle.push((conn, now));
            drop(idle);
            self.returned.notify_one();
        }
    }
}

/// A backend response's body read from a pooled connection: reading it drives the
/// connection, and the connection goes back to the pool when the body is complete. Dropped
/// before its end (the user left), it closes the connection (HTTP/1.1 cannot abandon one
/// response and go on with the next).
pub struct PooledBody {
    body: Incoming,
    /// Boxed: a connection's state is several KiB, and the request's future moves it.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
}

impl PooledBody {
    /// Hands the connection to a task of its own for a body that streams (big, or of
    /// unknown length): reading the backend then overlaps with sending to the relay, and
    /// one long body never has its task doing both. The task gives the connection back
    /// once the exchange is complete.
    pub fn detach(mut self) -> Self {
        if let Some(mut conn) = self.conn.take() {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                poll_fn(|cx| {
                    conn.drive(cx);
                    match !conn.reusable() || conn.send.is_ready() {
                        true => Poll::Ready(()),
                        false => Poll::Pending,
                    }
                })
                .await;
                pool.put(conn);
            });
        }
        self
    }

    /// The body is complete: one more turn lets the connection reach its idle state (and
    /// want the next request), then it goes back to the pool.
    fn finish(&mut self, cx: &mut Context<'_>) {
        if let Some(mut conn) = self.conn.take() {
            conn.drive(cx);
            self.pool.put(conn);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(conn) = &mut this.conn {
            conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.finish(cx);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing to read (204, 304, HEAD, `Content-Length: 0`) is dropped
        // unread: its connection is still good.
        if self.conn.is_some() && self.body.is_end_stream() {
            self.finish(&mut Context::from_waker(Waker::noop()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_timeout_of_zero_sweeps_without_a_panic() {
        let pool = Pool::new("127.0.0.1:9".into(), 4, Duration::ZERO);
        // A zero period would panic on the first poll; a sweep waits between turns.
        let swept = tokio::time::timeout(Duration::from_millis(100), pool.sweep()).await;
        assert!(swept.is_err(), "the sweep runs until dropped");
    }
}

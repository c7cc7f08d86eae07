//! The agent's HTTP/1.1 connections to a plain-HTTP backend, each driven by the request
//! that uses it instead of by a task of its own.
//!
//! Why: hyper-util's pooled client gives every backend connection a task, so a request
//! crosses tasks (and usually worker threads) on its way out and again on its way back:
//! its head goes to the connection's task through a channel, the response head and body
//! come back through others. On small requests those hand-offs cost more than the work
//! (`docs/PERFORMANCE.md`). Here the request's own task polls the connection while it
//! waits for the response head and while whoever reads the body reads it; a connection
//! whose exchange is complete waits in the pool, unpolled, for the next request. HTTPS
//! and upgrades keep the pooled client, h2c backends have `h2c` (`upstream`).

use std::future::poll_fn;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use super::conn::{idempotent, Conn, Inline, PooledBody, FIRST_READ};
use super::h1::{self, Framing, H1Error};
use super::response::HeadFields;
use super::BackendBody;
use crate::keepalive;

/// The shortest time between two sweeps.
const MIN_SWEEP: Duration = Duration::from_millis(500);
/// How long a connection beyond `max_idle` may wait idle for the next request before it
/// closes. Not at once: while a burst lasts, the server sends the next request as soon as
/// this one's slot is free, and a connection closed as it came back would be opened again
/// a moment later (a burst of 10 000 opened about 1 400 backend connections for at most
/// 1 024 requests in flight, and half the agent's CPU went to connecting and closing).
const SURPLUS_IDLE: Duration = Duration::from_secs(1);
/// How long a request may wait for a connection of its own: for a turn to connect (see
/// [`MAX_CONNECTING`]) and for the connect itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections to the backend may be opening at once. A request that finds no
/// idle connection waits for a turn to open one, and takes a connection another request
/// gives back if that comes first. Without the limit, a burst of 10 000 requests made each
/// open a connection at once: about 5 000 connects per burst (the rest were served by
/// connections that came back during the connects), a third of the agent's and the
/// backend's CPU in it, and a burst took 0.63-0.79 s where one that found ~900 connections
/// waiting took 0.43-0.46 s (`docs/PERFORMANCE.md`, twenty-first round). A connect on a
/// loopback or LAN backend takes well under a millisecond, so requests that hold their
/// connections for long (event streams, long polls) still get new ones at thousands a
/// second.
const MAX_CONNECTING: usize = 16;

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
    Http(#[from] H1Error),
}

/// A request whose head is already written for an HTTP/1.1 connection.
pub struct Written {
    /// The head, framing field included.
    pub head: Bytes,
    /// Its method (a response to HEAD has no body; idempotent ones may go again).
    pub method: Method,
    /// The body to send after it.
    pub body: BackendBody,
    /// How the body is framed (the head names it).
    pub framing: Framing,
}

/// A backend's answer on a pooled connection: its head, and its body, which reading drives
/// the connection with.
pub struct Answered {
    /// The final status.
    pub status: StatusCode,
    /// The head's fields.
    pub fields: HeadFields,
    /// The body.
    pub body: PooledBody,
}

/// Idle connections to one backend, most recently used last.
pub struct Pool {
    addr: String,
    max_idle: usize,
    /// An idle connection older than this is closed rather than reused (as hyper-util's
    /// pool does; `--backend-idle-timeout`).
    idle_for: Duration,
    /// TCP keep-alive interval of new connections (`--tcp-keepalive`).
    keepalive: Duration,
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
    /// A connection came back: one request waiting for its own connection takes it.
    returned: Notify,
    /// Turns to open a connection ([`MAX_CONNECTING`]).
    connecting: Semaphore,
    /// The idle connections went beyond `max_idle`: the sweep looks sooner.
    surplus: Notify,
}

impl Pool {
    /// A pool for the backend at `addr` (`host:port`) keeping at most `max_idle` idle
    /// connections, each for at most `idle_for`, its connections probed by TCP keep-alive
    /// after `keepalive` of silence (`crate::keepalive`).
    pub fn new(
        addr: String,
        max_idle: usize,
        idle_for: Duration,
        keepalive: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            max_idle,
            idle_for,
            keepalive,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            connecting: Semaphore::new(MAX_CONNECTING),
            surplus: Notify::new(),
        })
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection or a new one.
    /// A request that a reused connection failed before anything of it was written, or
    /// before any answer when it is idempotent and has no body (RFC 9110 §9.2.2: the
    /// backend closed the idle connection as the request went out), goes again on another.
    pub async fn send(self: &Arc<Self>, req: Request<BackendBody>) -> Result<Answered, PoolError> {
        let (parts, body) = req.into_parts();
        let framing = Framing::of(&body);
        let method = parts.method.clone();
        let mut head = BytesMut::new();
        h1::put_request_head(&mut head, &Request::from_parts(parts, ()), framing);
        self.send_written(Written {
            head: head.freeze(),
            method,
            body,
            framing,
        })
        .await
    }

    /// Sends a request whose head is written (see [`Pool::send`]).
    pub async fn send_written(self: &Arc<Self>, req: Written) -> Result<Answered, PoolError> {
        let Written {
            head,
            method,
            body,
            framing,
        } = req;
        let mut body = (framing != Framing::None).then_some(body);
        loop {
            let (mut conn, reused) = match self.take() {
                Some(c) => (c, true),
                // Boxed: a fresh connection is rare once the pool is warm, and this future
                // is part of every request's.
                None => Box::pin(self.fresh()).await?,
            };
            conn.start(head.clone(), body.take(), framing);
            let answer = poll_fn(|cx| {
                if !conn.sent() {
                    if let Poll::Ready(Err(e)) = conn.poll_request(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                loop {
                    if let Some(h) = h1::parse_head(&mut conn.rd, &method)? {
                        return Poll::Ready(Ok(h));
                    }
                    if conn.eof {
                        return Poll::Ready(Err(H1Error::Closed));
                    }
                    ready!(conn.poll_read(cx))?;
                }
            })
            .await;
            match answer {
                Ok(h) => {
                    conn.keep_alive = h.keep_alive;
                    return Ok(Answered {
                        status: h.status,
                        fields: h.fields,
                        body: PooledBody::Inline(Inline {
                            decoder: h.body,
                            conn: Some(conn),
                            pool: self.clone(),
                        }),
                    });
                }
                Err(e) => {
                    let stale =
                        reused && !conn.heard && matches!(&e, H1Error::Closed | H1Error::Io(_));
                    if stale && !conn.wrote {
                        // The body is polled only once the head is out: it is untouched.
                        body = conn.body.take();
                        continue;
                    }
                    if stale && framing == Framing::None && idempotent(&method) {
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
    }

    fn take(&self) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().expect("bug: poisoned");
        while let Some((mut conn, since)) = idle.pop() {
            if since.elapsed() < self.idle_for && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// A connection another request gives back, or a new one (whichever comes first, as
    /// in hyper-util's pool): in a burst, requests go on connections that finished instead
    /// of each opening its own. At most [`MAX_CONNECTING`] open at once; the wait for a
    /// turn counts toward [`CONNECT_TIMEOUT`].
    async fn fresh(&self) -> Result<(Box<Conn>, bool), PoolError> {
        let timed_out = || self.connect_failed(std::io::ErrorKind::TimedOut.into());
        let deadline = tokio::time::sleep(CONNECT_TIMEOUT);
        tokio::pin!(deadline);
        // A connection that came back since `take` left a permit: no wake-up lost.
        let _turn = loop {
            tokio::select! {
                biased;
                _ = self.returned.notified() => {
                    if let Some(c) = self.take() {
                        return Ok((c, true));
                    }
                }
                turn = self.connecting.acquire() => break turn.expect("bug: never closed"),
                _ = &mut deadline => return Err(timed_out()),
            }
        };
        let mut connect = pin!(self.connect());
        loop {
            tokio::select! {
                biased;
                c = &mut connect => return c.map(|c| (c, false)),
                _ = self.returned.notified() => {
                    if let Some(c) = self.take() {
                        return Ok((c, true));
                    }
                }
                _ = &mut deadline => return Err(timed_out()),
            }
        }
    }

    fn connect_failed(&self, source: std::io::Error) -> PoolError {
        PoolError::Connect {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, PoolError> {
        let failed = |e| self.connect_failed(e);
        // The caller bounds the time (`CONNECT_TIMEOUT`).
        let tcp = TcpStream::connect(&self.addr).await.map_err(failed)?;
        // Small requests and answers go out at once (RFC 9293 §3.7.4: Nagle delays them).
        tcp.set_nodelay(true).map_err(failed)?;
        // A connection whose backend went away without a FIN fails, idle or under a quiet
        // answer (an event stream, a long poll), instead of hanging the request on it.
        keepalive::apply(&tcp, self.keepalive, false).map_err(failed)?;
        Ok(Box::new(Conn::new(tcp)))
    }

    /// Closes, every half idle timeout, the idle connections that are past their time or
    /// that the backend closed: a quiet agent holds no half-closed sockets. While there are
    /// more than `max_idle`, it looks every [`SURPLUS_IDLE`] and closes those beyond
    /// `max_idle` that waited that long. Runs until dropped.
    pub async fn sweep(&self) {
        // `--backend-idle-timeout 0s` keeps nothing for reuse; a zero period would panic.
        let period = (self.idle_for / 2).max(MIN_SWEEP);
        let mut scanned = Instant::now();
        loop {
            // Every connection's liveness is checked (a readiness poll each, under the
            // lock every request's `take` and `put` need) once per period only, not on
            // the looks a burst's surplus brings every second: those close only the
            // surplus, found from the front. `take` checks what it hands out anyway.
            let now = Instant::now();
            let scan = now - scanned >= period;
            let (surplus, closed) = {
                let mut idle = self.idle.lock().expect("bug: poisoned");
                let mut closed: Vec<_> = if scan {
                    scanned = now;
                    idle.extract_if(.., |(conn, since)| {
                        now - *since >= self.idle_for || !conn.still_open()
                    })
                    .collect()
                } else {
                    Vec::new()
                };
                closed.extend(self.close_surplus(&mut idle, now));
                (idle.len() > self.max_idle, closed)
            };
            // Closed outside the lock: the end of a burst may close hundreds.
            drop(closed);
            let wait = if surplus {
                SURPLUS_IDLE.min(period)
            } else {
                period
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Left as a permit if it comes while the sweep works: no surplus missed.
                _ = self.surplus.notified(), if !surplus => {
                    tokio::time::sleep(SURPLUS_IDLE.min(period)).await;
                }
            }
        }
    }

    /// Takes out, to be closed, the oldest idle connections beyond `max_idle` that have
    /// waited at least [`SURPLUS_IDLE`] (`idle` is oldest first).
    fn close_surplus(
        &self,
        idle: &mut Vec<(Box<Conn>, Instant)>,
        now: Instant,
    ) -> Vec<(Box<Conn>, Instant)> {
        let beyond = idle.len().saturating_sub(self.max_idle);
        if beyond == 0 {
            return Vec::new();
        }
        let waited = idle[..beyond]
            .iter()
            .take_while(|(_, since)| now - *since >= SURPLUS_IDLE)
            .count();
        idle.drain(..waited).collect()
    }

    /// Keeps a connection whose exchange is complete for the next request, if it can take
    /// one; otherwise it closes (dropped). Beyond `max_idle` it is kept for
    /// [`SURPLUS_IDLE`] only (the sweep closes it then), for the next request of a burst.
    pub(super) fn put(&self, mut conn: Box<Conn>) {
        // Bytes after the response (none are asked for) or a request still going out make
        // the connection's next exchange ambiguous: it closes.
        if !conn.keep_alive || conn.eof || !conn.sent() || !conn.rd.is_empty() {
            return;
        }
        if conn.rd.capacity() > FIRST_READ || conn.want > FIRST_READ {
            // A download's big buffer is not kept for the next small answer, and neither is
            // its read size: kept, every later answer on the connection reserved a buffer of
            // up to `MAX_READ` again, and this dropped it again.
            conn.rd = BytesMut::new();
            conn.want = FIRST_READ;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("bug: poisoned");
        // The oldest are first: those past their time close now, not at the next take.
        // From the front, not a binary search: usually none is, and one look says so.
        let stale = idle
            .iter()
            .take_while(|(_, since)| now - *since >= self.idle_for)
            .count();
        let mut closed = match stale {
            0 => Vec::new(),
            n => idle.drain(..n).collect(),
        };
        if self.max_idle == 0 {
            return;
        }
        closed.extend(self.close_surplus(&mut idle, now));
        idle.push((conn, now));
        let first_surplus = idle.len() == self.max_idle + 1;
        drop(idle);
        drop(closed);
        self.returned.notify_one();
        if first_surplus {
            self.surplus.notify_one();
        }
    }
}
#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;

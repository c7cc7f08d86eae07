//! The relay's own HTTP/1.1 server for the commonest user request: a `GET` without a body.
//!
//! Why: hyper's HTTP/1.1 server cost about a fifth of a small relayed request's
//! instructions on the relay-server (its dispatcher, buffered reader and writer, and
//! polling the socket 3.35 times per request), for requests that need none of its
//! generality. The front reads a head, parses it with httparse into the `http` types the
//! user side takes ([`head`]), routes it ([`crate::dispatch::route_front`]), and writes the
//! response as its frames come, with the framing hyper would give it ([`response`],
//! [`exchange`]).
//!
//! It serves agents' long polls too (bodiless `GET`s that park for minutes): on hyper, each
//! parked poll held hyper's two 8 KiB buffers.
//!
//! Anything else — a request with a body, an upgrade, `Expect`, HTTP/1.0, HEAD, a head
//! httparse refuses, another agent endpoint, the HTTP/2 preface — goes to hyper with every byte
//! read so far, and hyper keeps the connection from then on: hyper stays the one
//! implementation of everything the front does not take, including every refusal of a
//! malformed head.

mod exchange;
mod head;
mod response;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use relay_common::gate::gated;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::base::activity::{Activity, IdleBounds};
use crate::base::auth::Grant;
use crate::base::limits::ConnPermit;
use crate::listener::Face;
use crate::State;

/// The first read's room; the buffer grows to `--max-head-bytes` for a longer head.
const FIRST_READ: usize = 4096;

/// How the front left a connection.
pub enum Ended {
    /// Closed (by either side, or after the response the user or the relay closed with).
    Closed,
    /// For hyper, with the bytes read and not yet served, to be read first.
    Hyper(Bytes),
}

/// One connection's front.
pub struct Front<'a> {
    /// The server.
    pub state: &'a Arc<State>,
    /// The connection's peer.
    pub peer: SocketAddr,
    /// Whether the connection came through the relay's TLS.
    pub https: bool,
    /// The listener it came to.
    pub face: Face,
    /// The connection's requests in progress.
    pub activity: &'a Arc<Activity>,
    /// The connection's place in the limits (an agent's leaves its address's count).
    pub permit: &'a ConnPermit,
    /// What the connection's client certificate grants (TLS), once known.
    pub cert: &'a OnceLock<Grant>,
}

impl Front<'_> {
    /// Serves requests from `io` until it closes or a request is hyper's. Checks `stop`
    /// after each response (the supervisor ends the wait between requests).
    pub async fn serve<S>(&self, io: &mut S, stop: &CancellationToken) -> io::Result<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let max = self.state.cfg.max_head_bytes;
        let mut buf = BytesMut::new();
        let mut scratch = BytesMut::new();
        loop {
            let (mut req, close, head) = loop {
                if !buf.is_empty() {
                    match head::parse(&mut buf, self.state.cfg.max_headers) {
                        head::Parsed::Plain(req, close, head) => break (req, close, head),
                        // hyper answers a head over the limit (431) or a malformed one.
                        head::Parsed::Partial if buf.len() < max => {}
                        _ => return Ok(Ended::Hyper(buf.freeze())),
                    }
                }
                if buf.capacity() - buf.len() < FIRST_READ / 4 {
                    buf.reserve(FIRST_READ);
                }
                if io.read_buf(&mut buf).await? == 0 {
                    return Ok(Ended::Closed);
                }
            };
            let cert = self.cert.get();
            crate::dispatch::exempt_agent(self.state, self.permit, self.face, &mut req, cert);
            let (peer, https, face) = (self.peer, self.https, self.face);
            let routed = crate::dispatch::route_front(self.state, req, peer, https, face, cert);
            let Some(routed) = routed else {
                let mut rest = BytesMut::from(head);
                rest.extend_from_slice(&buf);
                return Ok(Ended::Hyper(rest.freeze()));
            };
            let busy = self.activity.begin();
            let conn = exchange::Conn {
                io: &mut *io,
                buf: &mut buf,
                max,
                scratch: &mut scratch,
            };
            if !exchange::run(conn, routed, busy, close).await? || stop.is_cancelled() {
                // RFC 9112 §9.6: the response said the connection closes; it does.
                let _ = io.shutdown().await;
                return Ok(Ended::Closed);
            }
        }
    }
}

/// Runs a connection's front to its end. When the server stops, or the connection has had
/// no request in progress for its idle bound, a connection between requests closes at once
/// and one with a response in progress finishes it (within a second after a stop) — what
/// `connection::supervise` asks of hyper.
///
/// It takes the front pinned where the caller keeps it: an `async fn` keeps a future it was
/// given by value twice, as its argument and as the local it pins (960 bytes each).
pub async fn supervise<F: Future<Output = io::Result<Ended>>>(
    mut front: std::pin::Pin<&mut F>,
    activity: &Activity,
    idle: IdleBounds,
    stop: &CancellationToken,
) -> io::Result<Ended> {
    let stopped = gated(stop.cancelled());
    let idled = gated(activity.idle_for(idle));
    tokio::select! {
        // In order: the task polls this for every read and every response.
        biased;
        r = &mut front => return r,
        _ = stopped => {}
        _ = idled => return Ok(Ended::Closed),
    }
    if !activity.busy() {
        return Ok(Ended::Closed);
    }
    match tokio::time::timeout(Duration::from_secs(1), front).await {
        Ok(r) => r,
        Err(_) => Ok(Ended::Closed),
    }
}

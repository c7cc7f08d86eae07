//! One request on the front, from its routed handler to the last byte of its response:
//! one poll function that drives the handler, writes the response as its frames come, and
//! meanwhile reads what the user sends (a pipelined next head, kept; the end of the
//! connection, which abandons the request as hyper does: the handler's drop guards cancel
//! it at the agent).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::Body;
use relay_common::h1;
use tokio::io::{AsyncRead, AsyncWrite};

use super::response::{self, Framing};
use crate::base::activity::Busy;
use crate::base::body::RelayBody;
use crate::dispatch::Routed;

/// Bytes of a response gathered before they are written (frames ready at once are written
/// together; a frame larger than this goes alone, uncopied).
const GATHER: usize = 64 * 1024;

/// What one exchange needs of its connection.
pub struct Conn<'a, S> {
    /// The connection.
    pub io: &'a mut S,
    /// Bytes read and not yet parsed.
    pub buf: &'a mut BytesMut,
    /// The most the buffer holds before reading stops (`--max-head-bytes`).
    pub max: usize,
    /// Where response heads are written: one allocation for the connection, reused once
    /// the last head written from it is gone.
    pub scratch: &'a mut BytesMut,
}

/// Serves one request: its answer, written. `Ok(true)` when the connection stays open for
/// the next. `busy` marks the connection busy until the response is over.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Conn<'_, S>,
    routed: Routed,
    busy: Busy,
    close: bool,
) -> io::Result<bool> {
    let mut x = Exchange {
        conn,
        routed: Some(routed),
        body: None,
        busy: Some(busy),
        out: VecDeque::new(),
        queued: 0,
        framing: Framing::None,
        left: 0,
        keep_alive: false,
    };
    std::future::poll_fn(|cx| x.poll(cx, close)).await
}

struct Exchange<'a, S> {
    conn: Conn<'a, S>,
    routed: Option<Routed>,
    body: Option<RelayBody>,
    busy: Option<Busy>,
    /// Bytes to write, in order: heads and chunk framing, and the body's own frames.
    out: VecDeque<Bytes>,
    queued: usize,
    framing: Framing,
    /// Bytes a `Content-Length` body still owes.
    left: u64,
    keep_alive: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<'_, S> {
    fn poll(&mut self, cx: &mut Context<'_>, close: bool) -> Poll<io::Result<bool>> {
        if let Some(routed) = &mut self.routed {
            let Poll::Ready(resp) = Pin::new(routed).poll(cx) else {
                return self.watch(cx);
            };
            self.routed = None;
            let hint = resp.body().size_hint();
            let scratch = &mut *self.conn.scratch;
            let (framing, keep_alive) = response::encode(&resp, &hint, close, scratch);
            let head = scratch.split().freeze();
            self.push(head);
            (self.framing, self.keep_alive) = (framing, keep_alive);
            if let Framing::Length(n) = framing {
                self.left = n;
            }
            // A body without bytes to send is over with its head.
            match framing {
                Framing::None | Framing::Length(0) => self.finish(),
                _ => self.body = Some(resp.into_body()),
            }
        }
        loop {
            let waiting = self.gather(cx)?;
            let written = self.write(cx)?;
            if !self.out.is_empty() {
                // The socket takes no more for now (and wakes the task when it does).
                if written == 0 {
                    return self.watch(cx);
                }
                continue;
            }
            // Gathering stopped at its limit, not at a frame not ready: nothing would wake
            // the task for the frames after it.
            if self.body.is_some() && !waiting {
                continue;
            }
            ready!(Pin::new(&mut *self.conn.io).poll_flush(cx))?;
            if self.body.is_none() {
                return Poll::Ready(Ok(self.keep_alive));
            }
            // Everything written; the body has nothing ready.
            return self.watch(cx);
        }
    }

    /// Takes the body's frames that are ready, up to [`GATHER`] bytes; `true` when it
    /// stopped at a frame not ready (the body wakes the task for it).
    fn gather(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        while self.queued < GATHER {
            let Some(body) = &mut self.body else {
                return Ok(false);
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(true),
                Poll::Ready(None) => {
                    if matches!(self.framing, Framing::Length(_)) && self.left > 0 {
                        return Err(aborted("the response body ended short of its length"));
                    }
                    if self.framing == Framing::Chunked {
                        self.push(h1::last_chunk(None));
                    }
                    self.finish();
                    return Ok(false);
                }
                Poll::Ready(Some(Err(e))) => return Err(aborted(&e.to_string())),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            // Trailers go only to a user that asked for them (TE: trailers, RFC 9110
            // §6.5.1), and the front leaves such requests to hyper.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            match self.framing {
                Framing::Chunked => {
                    // RFC 9112 §7.1: the chunk's size in hex, then its bytes.
                    let line = h1::chunk_line(self.conn.scratch, data.len());
                    self.push(line);
                    self.push(data);
                    self.push(Bytes::from_static(b"\r\n"));
                }
                Framing::Length(_) => {
                    let n = data.len() as u64;
                    if n > self.left {
                        return Err(aborted("the response body is longer than its length"));
                    }
                    self.left -= n;
                    self.push(data);
                }
                Framing::None => {}
            }
        }
        Ok(false)
    }

    /// Writes what is queued until the socket would block; the bytes written.
    fn write(&mut self, cx: &mut Context<'_>) -> io::Result<usize> {
        let wrote = match h1::poll_write_queued(&mut *self.conn.io, cx, &mut self.out) {
            Poll::Pending => 0,
            Poll::Ready(wrote) => wrote?,
        };
        self.queued -= wrote;
        Ok(wrote)
    }

    fn push(&mut self, b: Bytes) {
        self.queued += b.len();
        self.out.push_back(b);
    }

    /// The response is complete once queued: the connection is no longer busy for it.
    fn finish(&mut self) {
        self.body = None;
        self.busy = None;
    }

    /// Waits, reading meanwhile: a next head is kept (up to the buffer's limit); the end
    /// of the connection ends the exchange (the request is dropped, as hyper drops it).
    fn watch(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.conn.buf.len() < self.conn.max {
            if self.conn.buf.capacity() - self.conn.buf.len() < 1024 {
                self.conn.buf.reserve(4096);
            }
            let io = Pin::new(&mut *self.conn.io);
            match tokio_util::io::poll_read_buf(io, cx, self.conn.buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(aborted("the user closed the connection")))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Pending
    }
}

fn aborted(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why.to_owned())
}

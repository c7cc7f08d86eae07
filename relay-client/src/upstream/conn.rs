//! One HTTP/1.1 connection to a plain-HTTP backend and the exchange it carries, driven by
//! the request that uses it (`pool`), and the response body read from it.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::Method;
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::h1::{self, Decoder, Framing, H1Error, Step};
use super::pool::Pool;
use super::BackendBody;

/// The first read of a response asks for this much; reads that fill the buffer double it
/// up to [`MAX_READ`] (as hyper's adaptive read strategy), so a download moves in big
/// reads and a small answer costs no big buffer.
pub(super) const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Frames a detached body reads ahead of its reader.
const DETACHED_AHEAD: usize = 2;

/// One connection to the backend and the exchange it carries.
pub(super) struct Conn {
    pub(super) io: TcpStream,
    /// Bytes read and not yet taken (a response head, body bytes).
    pub(super) rd: BytesMut,
    /// The next read's size.
    pub(super) want: usize,
    /// Bytes to write, in order (the head, chunk lines, body data).
    pub(super) out: VecDeque<Bytes>,
    /// Where chunk-size lines are written before they are queued.
    lines: BytesMut,
    /// The request body still to send, and its framing.
    pub(super) body: Option<BackendBody>,
    pub(super) framing: Framing,
    /// Body bytes still owed under `Content-Length`.
    pub(super) owed: u64,
    /// Whether anything of this exchange reached the socket, and anything of its answer came
    /// back: a request on a reused connection that failed with neither may go again.
    pub(super) wrote: bool,
    pub(super) heard: bool,
    /// The backend closed its end.
    pub(super) eof: bool,
    /// The connection can carry the next exchange once this one completes.
    pub(super) keep_alive: bool,
}

impl Conn {
    pub(super) fn new(io: TcpStream) -> Self {
        Conn {
            io,
            rd: BytesMut::new(),
            want: FIRST_READ,
            out: VecDeque::new(),
            lines: BytesMut::new(),
            body: None,
            framing: Framing::None,
            owed: 0,
            wrote: false,
            heard: false,
            eof: false,
            keep_alive: true,
        }
    }

    /// Starts an exchange: the head (already framed) and the body to send after it.
    pub(super) fn start(&mut self, head: Bytes, body: Option<BackendBody>, framing: Framing) {
        self.out.push_back(head);
        self.body = body;
        self.framing = framing;
        self.owed = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        (self.wrote, self.heard) = (false, false);
    }

    /// Whether the request is completely written: its queued bytes are out, and its body
    /// ended or, under `Content-Length`, sent its last byte (RFC 9112 §6.2: the length
    /// delimits the message). An upload's own end comes through the relay and may arrive
    /// after the backend has answered; waiting for it cost the connection (the pool closes
    /// one whose request is still going out), so the next request opened another.
    pub(super) fn sent(&self) -> bool {
        self.out.is_empty()
            && (self.body.is_none() || matches!(self.framing, Framing::Length(_)) && self.owed == 0)
    }

    /// Writes what the request has ready: queued bytes, then body frames as they come.
    pub(super) fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            while !self.out.is_empty() {
                if ready!(h1::poll_write_queued(&mut self.io, cx, &mut self.out))? > 0 {
                    self.wrote = true;
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    match self.framing {
                        Framing::Chunked => self.out.push_back(h1::last_chunk(None)),
                        Framing::Length(_) if self.owed > 0 => {
                            return Poll::Ready(Err(H1Error::RequestBody(format!(
                                "it ended {} bytes short of its length",
                                self.owed
                            ))))
                        }
                        _ => {}
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(H1Error::RequestBody(e.to_string())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => match self.framing {
                        Framing::Chunked => {
                            self.out.push_back(h1::chunk_line(&mut self.lines, d.len()));
                            self.out.push_back(d);
                            self.out.push_back(Bytes::from_static(b"\r\n"));
                        }
                        _ if d.len() as u64 > self.owed => {
                            self.body = None;
                            return Poll::Ready(Err(H1Error::RequestBody(
                                "it is longer than its length".into(),
                            )));
                        }
                        _ => {
                            self.owed -= d.len() as u64;
                            self.out.push_back(d);
                        }
                    },
                    // Trailers end the body; only chunked framing can carry them (RFC 9112
                    // §7.1.2), a body of known length drops them, as hyper does.
                    Err(f) => {
                        self.body = None;
                        if let (Framing::Chunked, Ok(t)) = (self.framing, f.into_trailers()) {
                            self.out.push_back(h1::last_chunk(Some(&t)));
                        } else if self.framing == Framing::Chunked {
                            self.out.push_back(h1::last_chunk(None));
                        }
                    }
                },
            }
        }
    }

    /// Reads more of the response into `rd`; `eof` is set when the backend closed.
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        self.rd.reserve(self.want);
        let room = self.rd.capacity() - self.rd.len();
        // Through `AsyncRead`, not `try_read_buf`: a read that leaves room in the buffer
        // drained the socket, and only this path then clears the poller's readiness. Kept,
        // it made the next `still_open` probe the socket with a read that found nothing:
        // one wasted system call per request.
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rd
        ))? {
            0 => self.eof = true,
            n => {
                self.heard = true;
                if n == room {
                    self.want = (self.want * 2).min(MAX_READ);
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether an idle connection is still open: a backend that closed it (its own idle
    /// timeout) made it readable. No system call unless the poller saw something.
    pub(super) fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.io.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// RFC 9110 §9.2.2.
pub(super) fn idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// A backend response's body read from a pooled connection.
pub enum PooledBody {
    /// Read by whoever reads the body: reading drives the connection, and the connection
    /// goes back to the pool when the exchange is complete. Dropped before its end (the
    /// user left), it closes the connection (HTTP/1.1 cannot abandon one response and go
    /// on with the next).
    Inline(Inline),
    /// Read ahead by a task of its own ([`PooledBody::detach`]): frames, then `None` at the
    /// body's end. A channel that closes without that `None` (the task was dropped: a
    /// runtime shutting down, a panic) is an error, never a clean end.
    Detached {
        /// The frames.
        rx: mpsc::Receiver<Option<Result<Frame<Bytes>, H1Error>>>,
        /// The end (or an error) came.
        done: bool,
    },
}

/// A body read where it is polled.
pub struct Inline {
    pub(super) decoder: Decoder,
    /// Boxed: the request's future moves it.
    pub(super) conn: Option<Box<Conn>>,
    pub(super) pool: Arc<Pool>,
}

impl Inline {
    /// The exchange is complete: the connection goes back to the pool (if it can).
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put(conn);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // A request body still going out goes on (the backend may answer before reading
        // all of it); if it fails, the answer is still read, and the connection closes.
        if !conn.sent() {
            if let Poll::Ready(Err(_)) = conn.poll_request(cx) {
                conn.keep_alive = false;
                conn.body = None;
                conn.out.clear();
            }
        }
        loop {
            match self.decoder.decode(&mut conn.rd, conn.eof) {
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Step::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Step::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {
                    if let Err(e) = ready!(conn.poll_read(cx)) {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }
}

impl PooledBody {
    /// Hands the body to a task of its own for a body that streams (big, or of unknown
    /// length): reading the backend then overlaps with sending to the relay, and one long
    /// body never has its task doing both. The task ends with the body, or when the
    /// reader drops it (closing the connection).
    pub fn detach(self) -> Self {
        let PooledBody::Inline(mut inline) = self else {
            return self;
        };
        if inline.decoder.is_done() {
            return PooledBody::Inline(inline);
        }
        let (tx, rx) = mpsc::channel(DETACHED_AHEAD);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = poll_fn(|cx| inline.poll_frame(cx)) => f,
                    _ = tx.closed() => return,
                };
                let last = frame.as_ref().is_none_or(Result::is_err);
                if tx.send(frame).await.is_err() || last {
                    return;
                }
            }
        });
        PooledBody::Detached { rx, done: false }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        match self.get_mut() {
            PooledBody::Inline(b) => b.poll_frame(cx),
            PooledBody::Detached { done: true, .. } => Poll::Ready(None),
            PooledBody::Detached { rx, done } => {
                let frame = match ready!(rx.poll_recv(cx)) {
                    Some(frame) => frame,
                    None => Some(Err(H1Error::ReaderGone)),
                };
                *done = frame.as_ref().is_none_or(Result::is_err);
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PooledBody::Inline(b) => b.conn.is_none() || b.decoder.is_done(),
            PooledBody::Detached { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PooledBody::Inline(Inline {
                decoder: Decoder::Length(n),
                ..
            }) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for Inline {
    fn drop(&mut self) {
        // A body with nothing to read (204, 304, HEAD, `Content-Length: 0`) is dropped
        // unread: its connection is still good.
        if self.decoder.is_done() {
            self.finish();
        }
    }
}

//! Bodies the agent produces: the framed response sent to the server, bounded exchange
//! bodies, and the backend request body fed by upload exchanges.

use relay_common::readbuf::ReadBuf;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use relay_common::frame::{self, Kind};
use relay_common::message::{encode_headers, Trailers};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

/// The backend's response as frames: HEAD, then DATA (header and payload as separate
/// buffers, so payload bytes are never copied), then END or TRAILERS, or ABORT when the
/// backend body fails. Never fails itself.
pub struct ResponseFrames {
    head: Option<Bytes>,
    body: Option<Source>,
    queued: Option<Bytes>,
    /// Body bytes emitted so far.
    pub offset: u64,
    /// Whether a final frame (END, TRAILERS, ABORT) was emitted.
    pub finished: bool,
}

/// Where response body bytes come from.
pub enum Source {
    /// The backend's response body.
    Body(Incoming),
    /// After a 101: the backend→user side of the switched connection, and a read buffer.
    Tunnel(Box<dyn AsyncRead + Send + Unpin>, ReadBuf),
}

/// One step of a response source.
enum Chunk {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    Failed(String),
}

/// Largest read of tunnel bytes.
pub const TUNNEL_READ: usize = 64 * 1024;

impl ResponseFrames {
    /// Frames for a response whose HEAD frame is `head` and body `body` (`None`: no body).
    pub fn new(head: Bytes, body: Option<Source>) -> Self {
        ResponseFrames {
            head: Some(head),
            finished: body.is_none(),
            body,
            queued: None,
            offset: 0,
        }
    }

    /// Whether every frame, the final one included, was emitted.
    pub fn done(&self) -> bool {
        self.finished && self.head.is_none() && self.queued.is_none()
    }
}

fn trailers_frame(t: &HeaderMap) -> Bytes {
    let json = serde_json::to_vec(&Trailers {
        headers: encode_headers(t),
    })
    .expect("bug: trailers always serialise");
    frame::control(Kind::Trailers, &json)
}

impl Body for ResponseFrames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(h) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        if let Some(b) = this.queued.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let chunk = match body {
                Source::Body(b) => match Pin::new(b).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => Chunk::End,
                    Poll::Ready(Some(Err(e))) => {
                        Chunk::Failed(format!("the backend's response body failed: {e}"))
                    }
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(d) => Chunk::Data(d),
                        Err(f) => match f.into_trailers() {
                            Ok(t) => Chunk::Trailers(t),
                            Err(_) => continue,
                        },
                    },
                },
                Source::Tunnel(rd, buf) => match buf.poll_read(Pin::new(rd), cx) {
                    Poll::Pending => return Poll::Pending,
                    // The backend shut down writing: END carries the half-close.
                    Poll::Ready(Ok(None)) => Chunk::End,
                    Poll::Ready(Ok(Some(data))) => Chunk::Data(data),
                    Poll::Ready(Err(e)) => {
                        Chunk::Failed(format!("the backend connection failed: {e}"))
                    }
                },
            };
            let out = match chunk {
                Chunk::Data(data) if data.is_empty() => continue,
                Chunk::Data(data) => {
                    this.offset += data.len() as u64;
                    let h = frame::header(Kind::Data, data.len());
                    this.queued = Some(data);
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                Chunk::Trailers(t) => trailers_frame(&t),
                Chunk::Failed(why) => frame::control(Kind::Abort, why.as_bytes()),
                Chunk::End => frame::control(Kind::End, b""),
            };
            this.body = None;
            this.finished = true;
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
    }
}

/// A body of buffers collected for one bounded exchange, with its exact length (so the POST
/// carries Content-Length, as buffering proxies require).
pub struct ChunksBody {
    chunks: VecDeque<Bytes>,
    len: u64,
}

impl ChunksBody {
    /// Body over `chunks`.
    pub fn new(chunks: VecDeque<Bytes>) -> Self {
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        ChunksBody { chunks, len }
    }
}

impl Body for ChunksBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.chunks.pop_front() {
            Some(c) => {
                self.len -= c.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(c))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// What the upload pump sends into the backend request body.
pub enum UploadMsg {
    /// Body bytes.
    Data(Bytes),
    /// Trailers; the body ends.
    Trailers(HeaderMap),
    /// Clean end.
    End,
    /// The upload broke; the backend request must fail, not end cleanly.
    Abort(String),
}

/// Depth of the channel between upload exchanges and the backend request.
pub const UPLOAD_CHANNEL_DEPTH: usize = 8;

/// The backend request body. A channel closed without `End` is an error, so a dead pump can
/// never pass for a complete upload.
pub struct UploadBody {
    rx: mpsc::Receiver<UploadMsg>,
    content_length: Option<u64>,
    done: bool,
}

impl UploadBody {
    /// Body over `rx` announcing `content_length` (so the backend gets the same framing as
    /// the user sent).
    pub fn new(rx: mpsc::Receiver<UploadMsg>, content_length: Option<u64>) -> Self {
        UploadBody {
            rx,
            content_length,
            done: false,
        }
    }
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let msg = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(m) => m,
        };
        let fail = |why: String| Poll::Ready(Some(Err(std::io::Error::other(why))));
        match msg {
            Some(UploadMsg::Data(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(UploadMsg::Trailers(t)) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Some(UploadMsg::End) => {
                self.done = true;
                Poll::Ready(None)
            }
            Some(UploadMsg::Abort(why)) => {
                self.done = true;
                fail(why)
            }
            None => {
                self.done = true;
                fail("the upload stream from the relay-server was cut".into())
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.content_length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

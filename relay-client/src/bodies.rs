//! Bodies the agent produces: the framed response sent to the server, bounded exchange
//! bodies, and the backend request body fed by upload exchanges.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use relay_common::codec::{encode, encode_head, BodyMsg, Encoded};
use relay_common::message::ResponseHead;
use relay_common::source::SourceError;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::upstream::BackendResponse;

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

/// Where response body bytes come from: the backend's response body, or after a 101 the
/// backend→user side of the switched connection.
pub type Source = relay_common::source::Source<BackendResponse, Box<dyn AsyncRead + Send + Unpin>>;

impl ResponseFrames {
    /// Frames for a response with `head` and body `body` (`None`: no body).
    pub fn new(head: &ResponseHead, body: Option<Source>) -> Self {
        ResponseFrames {
            head: Some(encode_head(head)),
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
        let msg = match body.poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(msg)) => msg,
            Poll::Ready(Err(SourceError::Body(e))) => {
                BodyMsg::Abort(format!("the backend's response body failed: {e}"))
            }
            Poll::Ready(Err(SourceError::Tunnel(e))) => {
                BodyMsg::Abort(format!("the backend connection failed: {e}"))
            }
        };
        if let BodyMsg::Data(d) = &msg {
            this.offset += d.len() as u64;
        } else {
            this.body = None;
            this.finished = true;
        }
        let Encoded { frame, payload } = encode(msg);
        this.queued = payload;
        Poll::Ready(Some(Ok(Frame::data(frame))))
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

/// The backend request body. A channel closed without `End` is an error, so a dead pump can
/// never pass for a complete upload.
pub struct UploadBody {
    rx: mpsc::Receiver<BodyMsg>,
    content_length: Option<u64>,
    done: bool,
}

impl UploadBody {
    /// Body over `rx` announcing `content_length` (so the backend gets the same framing as
    /// the user sent).
    pub fn new(rx: mpsc::Receiver<BodyMsg>, content_length: Option<u64>) -> Self {
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
            Some(BodyMsg::Data(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(BodyMsg::Trailers(t)) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(*t))))
            }
            Some(BodyMsg::End) => {
                self.done = true;
                Poll::Ready(None)
            }
            Some(BodyMsg::Abort(why)) => {
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

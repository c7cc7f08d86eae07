//! Response bodies the server produces: fixed text, a relayed response that arrived whole,
//! and the streamed body of a relayed response, fed by `/server/response` exchanges (or a
//! session) through a bounded channel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
#[cfg(test)]
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Error type of every body the server sends. An error mid-body makes hyper abort the
/// response: HTTP/1.1 closes the connection without the final chunk, HTTP/2 sends RST_STREAM.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type of server responses.
pub type RelayBody = UnsyncBoxBody<Bytes, BodyError>;

/// A complete body.
pub fn full(b: Bytes) -> RelayBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body (`is_end_stream` is true, so HTTP/2 ends the stream on HEADERS).
pub fn empty() -> RelayBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub use relay_common::codec::BodyMsg;

/// What `/server/response` exchanges push towards the user: a body step, and for DATA its
/// size held from the global [`crate::base::budget::Budget`] until the user side takes it.
#[derive(Debug)]
pub struct Delivery {
    /// The step.
    pub msg: BodyMsg,
    /// The budget the bytes hold while they wait.
    pub held: Option<crate::base::budget::Held>,
}

impl From<BodyMsg> for Delivery {
    fn from(msg: BodyMsg) -> Self {
        Delivery { msg, held: None }
    }
}

/// A relayed response's body that arrived whole (a session's RESPONSE): the bytes, the
/// budget they hold until the user side takes them, and the trailers.
#[derive(Debug)]
pub struct Whole {
    /// The body.
    pub data: Bytes,
    /// What the bytes hold of the budget.
    pub held: Option<crate::base::budget::Held>,
    /// Trailer fields, sent after the body (boxed: rare, and a map inline made every
    /// response start 88 bytes larger, copied at each move through the head's channel).
    pub trailers: Option<Box<http::HeaderMap>>,
}

/// The user-facing body of a response that arrived [`Whole`]: nothing to wait for, so no
/// channel and no watch on the agent (it already sent everything). Dropping it frees the
/// request (`guard`).
pub struct WholeBody<G> {
    whole: Whole,
    /// The length the head announced (then the size hint is exact, as for a streamed body).
    declared: Option<u64>,
    _guard: G,
}

impl<G> WholeBody<G> {
    /// Body of `whole`, whose head announced `content_length`.
    pub fn new(whole: Whole, content_length: Option<u64>, guard: G) -> Self {
        WholeBody {
            whole,
            declared: content_length,
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for WholeBody<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let w = &mut self.get_mut().whole;
        if !w.data.is_empty() {
            // Taken: the bytes no longer wait in the relay's budget.
            w.held = None;
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut w.data)))));
        }
        Poll::Ready(w.trailers.take().map(|t| Ok(Frame::trailers(*t))))
    }

    fn is_end_stream(&self) -> bool {
        self.whole.data.is_empty() && self.whole.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(_) => SizeHint::with_exact(self.whole.data.len() as u64),
            None => SizeHint::default(),
        }
    }
}

/// The user-facing body of a relayed response. Dropping it (the user left) drops `guard`,
/// which cancels the request everywhere. When the agent that serves it is declared gone
/// (`gone`), the body aborts instead of waiting for an exchange that will never come.
pub struct RelayedBody<G> {
    rx: crate::base::queue::Receiver<Delivery>,
    remaining: Option<u64>,
    done: bool,
    /// An abort received and held back for one turn (see `poll_frame`).
    aborting: Option<String>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    _guard: G,
}

impl<G> RelayedBody<G> {
    /// Body over `rx`; `content_length` is announced through `size_hint`.
    pub fn new(
        rx: crate::base::queue::Receiver<Delivery>,
        content_length: Option<u64>,
        gone: CancellationToken,
        guard: G,
    ) -> Self {
        RelayedBody {
            rx,
            remaining: content_length,
            done: false,
            aborting: None,
            gone: Box::pin(gone.cancelled_owned()),
            _guard: guard,
        }
    }
}

/// Why a relayed body was aborted.
#[derive(Debug, thiserror::Error)]
#[error("relayed body aborted: {0}")]
pub struct Aborted(pub String);

impl<G: Unpin> Body for RelayedBody<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let abort = |this: &mut Self, why: String| {
            this.done = true;
            Poll::Ready(Some(Err(Box::new(Aborted(why)) as BodyError)))
        };
        if let Some(why) = this.aborting.take() {
            return abort(this, why);
        }
        // An abort right behind data is held back for one turn: hyper flushes what it
        // buffered (the head, the bytes so far) when the body is not ready, so the user
        // sees the response begin and then break rather than a connection closed with
        // nothing.
        let defer = |this: &mut Self, why: String, cx: &mut Context<'_>| {
            this.aborting = Some(why);
            cx.waker().wake_by_ref();
            Poll::Pending
        };
        // Charged to the task's budget by size (relay_common::fair): the user's
        // connection task yields its worker every 64 KiB of a large download.
        let turn = std::task::ready!(relay_common::fair::poll_turn(cx));
        let msg = match this.rx.poll_recv(cx) {
            Poll::Ready(m) => m.map(|d| d.msg),
            Poll::Pending => {
                if this.gone.as_mut().poll(cx).is_ready() {
                    return abort(this, "the relay-client disconnected".into());
                }
                return Poll::Pending;
            }
        };
        match msg {
            Some(BodyMsg::Data(b)) => {
                turn.moved(cx, b.len(), relay_common::fair::BODY_UNIT);
                if let Some(rem) = this.remaining.as_mut() {
                    match rem.checked_sub(b.len() as u64) {
                        Some(r) => *rem = r,
                        None => return abort(this, "body longer than its Content-Length".into()),
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Some(BodyMsg::Trailers(t)) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(*t))))
            }
            Some(BodyMsg::End) => {
                this.done = true;
                if this.remaining.is_some_and(|r| r > 0) {
                    return abort(this, "body shorter than its Content-Length".into());
                }
                Poll::Ready(None)
            }
            Some(BodyMsg::Abort(why)) => defer(this, why, cx),
            None => defer(
                this,
                "the relay-client's response stream was cut".into(),
                cx,
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A response body that aborts once the credential that admitted its request is revoked
/// (and keeps the request registered for revocation while it streams).
pub struct Revocable {
    inner: RelayBody,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    _admission: std::sync::Arc<crate::base::revocation::Admission>,
}

impl Revocable {
    /// `inner`, cut when `admission`'s credential is revoked.
    pub fn new(
        inner: RelayBody,
        admission: std::sync::Arc<crate::base::revocation::Admission>,
    ) -> Self {
        Revocable {
            inner,
            cut: Box::pin(admission.cut().clone().cancelled_owned()),
            _admission: admission,
        }
    }
}

impl Body for Revocable {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            let why = "the credential that admitted the request was revoked";
            return Poll::Ready(Some(Err(Box::new(Aborted(why.into())))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The user's request body, with the first frame when the relay already read it. Reading
/// what is buffered before the request is queued makes malformed framing (a bad chunk size
/// sent with the head) a 400 that no agent ever sees.
pub struct UserBody {
    first: Option<Frame<Bytes>>,
    inner: Inner,
}

enum Inner {
    Hyper(hyper::body::Incoming),
    /// Unit tests: chunks as a test sends them; the body ends when the sender goes.
    #[cfg(test)]
    Test(mpsc::Receiver<Bytes>),
}

impl UserBody {
    /// Takes whatever `inner` has buffered, without waiting for more.
    pub fn prefetch(mut inner: hyper::body::Incoming) -> Result<Self, hyper::Error> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let first = match Pin::new(&mut inner).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => Some(f),
            Poll::Ready(Some(Err(e))) => return Err(e),
            Poll::Ready(None) | Poll::Pending => None,
        };
        Ok(UserBody {
            first,
            inner: Inner::Hyper(inner),
        })
    }

    /// A body of the chunks sent into the returned sender (unit tests).
    #[cfg(test)]
    pub fn test() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(16);
        let body = UserBody {
            first: None,
            inner: Inner::Test(rx),
        };
        (tx, body)
    }
}

impl Body for UserBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        match &mut self.inner {
            Inner::Hyper(b) => Pin::new(b).poll_frame(cx),
            #[cfg(test)]
            Inner::Test(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && match &self.inner {
                Inner::Hyper(b) => b.is_end_stream(),
                #[cfg(test)]
                Inner::Test(_) => false,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.inner {
            Inner::Hyper(b) => b.size_hint(),
            #[cfg(test)]
            Inner::Test(_) => SizeHint::default(),
        };
        if let Some(n) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        {
            // Upper first: `set_lower` asserts the new lower bound stays below the upper.
            if let Some(u) = hint.upper() {
                hint.set_upper(u + n);
            }
            hint.set_lower(hint.lower() + n);
        }
        hint
    }
}

/// A `text/plain` response whose body is `msg` and a newline.
pub fn text_response(status: StatusCode, msg: &str) -> Response<RelayBody> {
    let mut resp = Response::new(full(Bytes::from(format!("{msg}\n"))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

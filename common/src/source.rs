//! Where the bytes of a framed body come from, on either side: an HTTP body (the user's
//! upload on the server, the backend's response on the agent) or, after a 101, one
//! direction of the switched connection. Each step is a [`BodyMsg`], so the framing that
//! follows ([`crate::codec::encode`]) is the same whatever the source.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use tokio::io::AsyncRead;

use crate::codec::BodyMsg;
use crate::readbuf::ReadBuf;
use crate::TUNNEL_READ;

/// A source of body steps.
pub enum Source<B, R> {
    /// An HTTP body: DATA and trailers as they arrive.
    Body(B),
    /// One direction of a switched connection, read into an adaptive buffer. Its end is a
    /// half-close, sent on as END.
    Tunnel(R, ReadBuf),
}

/// Why a source failed.
#[derive(Debug)]
pub enum SourceError<E> {
    /// The HTTP body failed (its error, so the caller can tell a user's malformed framing
    /// from a cut connection).
    Body(E),
    /// Reading the switched connection failed.
    Tunnel(std::io::Error),
}

impl<E: std::fmt::Display> std::fmt::Display for SourceError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceError::Body(e) => e.fmt(f),
            SourceError::Tunnel(e) => e.fmt(f),
        }
    }
}

impl<B, R> Source<B, R>
where
    B: Body<Data = Bytes> + Unpin,
    R: AsyncRead + Unpin,
{
    /// A tunnel source over `rd`.
    pub fn tunnel(rd: R) -> Self {
        Source::Tunnel(rd, ReadBuf::new(TUNNEL_READ))
    }

    /// Whether this is an HTTP body (body limits apply) rather than tunnel bytes.
    pub fn is_body(&self) -> bool {
        matches!(self, Source::Body(_))
    }

    /// The next step: non-empty `Data`, `Trailers` or `End` (never `Abort`: a failure is the
    /// error, for the caller to describe).
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BodyMsg, SourceError<B::Error>>> {
        // Charged to the task's budget by size (crate::fair): a pump whose both ends are
        // always ready yields its worker every 64 KiB of a body, 256 KiB of a tunnel.
        let turn = std::task::ready!(crate::fair::poll_turn(cx));
        loop {
            let msg = match self {
                Source::Body(b) => match Pin::new(b).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => BodyMsg::End,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(SourceError::Body(e))),
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(d) => BodyMsg::Data(d),
                        Err(f) => match f.into_trailers() {
                            Ok(t) => BodyMsg::Trailers(Box::new(t)),
                            Err(_) => continue,
                        },
                    },
                },
                Source::Tunnel(rd, buf) => match buf.poll_read(Pin::new(rd), cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(None)) => BodyMsg::End,
                    Poll::Ready(Ok(Some(d))) => BodyMsg::Data(d),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(SourceError::Tunnel(e))),
                },
            };
            if matches!(&msg, BodyMsg::Data(d) if d.is_empty()) {
                continue;
            }
            let n = match &msg {
                BodyMsg::Data(d) => d.len(),
                _ => 0,
            };
            let unit = match self {
                Source::Body(_) => crate::fair::BODY_UNIT,
                Source::Tunnel(..) => crate::fair::TUNNEL_UNIT,
            };
            turn.moved(cx, n, unit);
            return Poll::Ready(Ok(msg));
        }
    }
}

//! `/server/requeststream`: one upload exchange, the user's upload framed for the agent.
//!
//! The exchange leases the upload ([`crate::agent::upload_side`]), streams DATA frames as
//! the user sends bytes (no buffering: each user chunk becomes one frame header plus the
//! chunk itself), and ends with END or TRAILERS when the upload is complete, ABORT when it
//! broke, or CONTINUE after `max` bytes or `idle` without bytes, handing the upload back
//! for the next exchange. An exchange dropped before its last frame drops its lease, which
//! marks the upload broken: bytes may have been lost in flight, and the request must not go
//! on with a hole in its body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use relay_common::codec::{encode, encode_continue, BodyMsg, Encoded};
use relay_common::source::SourceError;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::agent::endpoints::no_store;
use crate::agent::error::AgentCallError;
use crate::agent::pending::Pending;
use crate::agent::upload_side::{lease, Phase, Refusal, UploadFailure, UploadLease};
use crate::base::body::{BodyError, RelayBody};
use crate::State;

/// How long an upload exchange of an upgrade request waits for the 101 to reach the user.
const UPGRADE_WAIT: Duration = Duration::from_secs(30);

/// Limits on a user's request body (not on tunnel bytes, which have their own idle timer).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Most body bytes (413 beyond).
    pub max_body: Option<u64>,
    /// Longest wait for the next body byte (408 beyond).
    pub inactivity: Duration,
}

/// Serves one upload exchange for `pending` starting at `offset`, of at most `max` bytes.
pub async fn serve(
    state: &State,
    pending: Arc<Pending>,
    offset: Option<u64>,
    max: Option<u64>,
) -> Result<Response<RelayBody>, AgentCallError> {
    let lease = lease_when_switched(&pending, offset).await?;
    let max = max.unwrap_or(u64::MAX).max(1);
    let exchange = UploadExchange::new(lease, max, state.cfg.exchange_idle, limits(state));
    Ok(no_store(Response::builder())
        .header(header::CONTENT_TYPE, "application/x-relay-frames")
        // nginx passes this response on as it arrives instead of buffering it.
        .header("x-accel-buffering", "no")
        .body(exchange.boxed_unsync())
        .expect("bug: static response"))
}

/// The upload of `pending` from `offset`, once it can be read: an upgrade's user bytes only
/// after the 101 reached the user.
pub(crate) async fn lease_when_switched(
    pending: &Arc<Pending>,
    offset: Option<u64>,
) -> Result<UploadLease, AgentCallError> {
    let deadline = tokio::time::Instant::now() + UPGRADE_WAIT;
    loop {
        match lease(pending, offset) {
            Ok(lease) => return Ok(lease),
            Err(Refusal::Refused(e)) => return Err(e),
            // An upgrade whose 101 has not reached the user yet: wait for the switch.
            Err(Refusal::Wait) => tokio::select! {
                _ = pending.upload.wait_for(|p| *p != Phase::AwaitingUpgrade) => {}
                _ = pending.done.cancelled() => return Err(AgentCallError::UnknownId),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(AgentCallError::Conflict("the connection was not switched".into()));
                }
            },
        }
    }
}

/// The limits on user bodies the server is configured with.
pub(crate) fn limits(state: &State) -> UploadLimits {
    UploadLimits {
        max_body: state.cfg.max_request_body,
        inactivity: state.cfg.upload_inactivity_timeout,
    }
}

/// One upload exchange, as the body of the `/server/requeststream` answer.
pub struct UploadExchange {
    /// The upload, until the exchange's last frame.
    lease: Option<UploadLease>,
    sent: u64,
    max: u64,
    queued: Option<Bytes>,
    idle: Pin<Box<Sleep>>,
    idle_for: Duration,
    user_gone: Pin<Box<WaitForCancellationFutureOwned>>,
    limits: UploadLimits,
}

/// How the exchange hands the upload on.
enum Next {
    Continue,
    Finished,
    Broken,
    Failed(UploadFailure),
}

type Polled = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

impl UploadExchange {
    /// An exchange over `lease` of at most `max` bytes, ending with CONTINUE after
    /// `idle_for` without a byte.
    pub fn new(lease: UploadLease, max: u64, idle_for: Duration, limits: UploadLimits) -> Self {
        let user_gone = Box::pin(lease.pending().done.clone().cancelled_owned());
        let mut x = UploadExchange {
            lease: Some(lease),
            sent: 0,
            max,
            queued: None,
            idle: Box::pin(tokio::time::sleep(idle_for)),
            idle_for,
            user_gone,
            limits,
        };
        x.reset_idle(None);
        x
    }

    fn lease(&mut self) -> &mut UploadLease {
        self.lease
            .as_mut()
            .expect("bug: polled after the last frame")
    }

    /// The idle timer ends the exchange (CONTINUE) after `idle_for`, or earlier when the
    /// body's inactivity limit comes first. `last_byte` is the time of the latest body
    /// byte when the caller knows it (it just recorded it), else it is read.
    fn reset_idle(&mut self, last_byte: Option<tokio::time::Instant>) {
        let now = tokio::time::Instant::now();
        let mut deadline = now + self.idle_for;
        let lease = self.lease();
        if lease.is_body() {
            let last = last_byte.unwrap_or_else(|| lease.pending().upload.last_byte());
            let stall = last + self.limits.inactivity;
            deadline = deadline.min(stall.max(now));
        }
        self.idle.as_mut().reset(deadline);
    }

    /// Ends the exchange with `last` and hands the upload on as `next` says.
    fn finish(&mut self, next: Next, last: Bytes) -> Polled {
        let lease = self.lease.take().expect("bug: an exchange finishes once");
        match next {
            Next::Continue => lease.give_back(),
            Next::Finished => lease.finish(),
            Next::Broken => lease.break_off(),
            Next::Failed(why) => lease.fail(why),
        }
        Poll::Ready(Some(Ok(Frame::data(last))))
    }

    /// Gives up on the user's body: the agent gets ABORT, the user its status.
    fn fail(&mut self, why: UploadFailure) -> Polled {
        let text = match why {
            UploadFailure::TooLarge(n) => format!("the request body is larger than {n} bytes"),
            UploadFailure::Stalled(d) => format!("the request body stalled for {d:?}"),
            UploadFailure::Malformed => "the request body's framing is malformed".to_owned(),
        };
        self.finish(Next::Failed(why), encode(BodyMsg::Abort(text)).frame)
    }

    /// Nothing to send: the exchange ends when the user left (ABORT), the body stalled past
    /// its limit (ABORT, 408 to the user) or the exchange idled (CONTINUE).
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Polled {
        if self.user_gone.as_mut().poll(cx).is_ready() {
            let why = BodyMsg::Abort("the user went away".into());
            return self.finish(Next::Broken, encode(why).frame);
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            let inactivity = self.limits.inactivity;
            let lease = self.lease();
            if lease.is_body() && lease.pending().upload.last_byte().elapsed() >= inactivity {
                return self.fail(UploadFailure::Stalled(self.limits.inactivity));
            }
            return self.finish(Next::Continue, encode_continue());
        }
        Poll::Pending
    }

    /// One DATA frame of `data` (header now, payload next).
    fn data(&mut self, data: Bytes) -> Polled {
        let len = data.len() as u64;
        let max_body = self.limits.max_body;
        let lease = self.lease();
        if let (true, Some(max)) = (lease.is_body(), max_body) {
            if lease.offset() + len > max {
                return self.fail(UploadFailure::TooLarge(max));
            }
        }
        let last_byte = self.lease().delivered(len);
        self.sent += len;
        self.reset_idle(last_byte);
        let Encoded { frame, payload } = encode(BodyMsg::Data(data));
        self.queued = payload;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

impl Body for UploadExchange {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        if let Some(b) = this.queued.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.lease.is_none() {
            return Poll::Ready(None);
        }
        if this.sent >= this.max {
            return this.finish(Next::Continue, encode_continue());
        }
        match this.lease().source().poll_next(cx) {
            Poll::Ready(Ok(BodyMsg::Data(data))) => this.data(data),
            // END or TRAILERS: the upload is complete.
            Poll::Ready(Ok(last)) => this.finish(Next::Finished, encode(last).frame),
            Poll::Ready(Err(SourceError::Body(e))) if e.is_parse() => {
                this.fail(UploadFailure::Malformed)
            }
            Poll::Ready(Err(e)) => {
                let why = format!("the user's side failed: {e}");
                this.finish(Next::Broken, encode(BodyMsg::Abort(why)).frame)
            }
            Poll::Pending => this.poll_quiet(cx),
        }
    }
}

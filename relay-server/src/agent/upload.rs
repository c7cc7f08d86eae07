//! The body of a `/server/requeststream` answer: the user's upload, framed, for one exchange.
//!
//! The exchange takes the user's body out of its slot, streams DATA frames as the user sends
//! bytes (no buffering: each user chunk becomes one frame header plus the chunk itself), and
//! ends with END or TRAILERS when the upload is complete, ABORT when it broke, or CONTINUE
//! after `max` bytes or `idle` without bytes, handing the body back for the next exchange.
//! An exchange dropped before its last frame marks the upload broken: bytes may have been
//! lost in flight, and the request must not go on with a hole in its body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use relay_common::codec::{encode, encode_continue, BodyMsg, Encoded};
use relay_common::source::SourceError;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::agent::pending::{Pending, UploadFailure, UploadSlot, UploadSource};
use crate::base::body::BodyError;

/// Limits on a user's request body (not on tunnel bytes, which have their own idle timer).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Most body bytes (413 beyond).
    pub max_body: Option<u64>,
    /// Longest wait for the next body byte (408 beyond).
    pub inactivity: Duration,
}

/// What becomes of the upload after this exchange.
enum Next {
    Continue,
    Finished,
    Broken,
}

/// One upload exchange.
pub struct UploadExchange {
    pending: Arc<Pending>,
    source: Option<UploadSource>,
    offset: u64,
    sent: u64,
    max: u64,
    queued: Option<Bytes>,
    idle: Pin<Box<Sleep>>,
    idle_for: Duration,
    user_gone: Pin<Box<WaitForCancellationFutureOwned>>,
    finished: bool,
    limits: UploadLimits,
}

impl UploadExchange {
    /// Starts an exchange over `source`, which has delivered `offset` bytes before.
    pub fn new(
        pending: Arc<Pending>,
        source: UploadSource,
        offset: u64,
        max: u64,
        idle_for: Duration,
        limits: UploadLimits,
    ) -> Self {
        let user_gone = Box::pin(pending.done.clone().cancelled_owned());
        let mut x = UploadExchange {
            pending,
            source: Some(source),
            offset,
            sent: 0,
            max,
            queued: None,
            idle: Box::pin(tokio::time::sleep(idle_for)),
            idle_for,
            user_gone,
            finished: false,
            limits,
        };
        x.reset_idle(None);
        x
    }

    fn is_body(&self) -> bool {
        self.source.as_ref().is_some_and(UploadSource::is_body)
    }

    /// The idle timer ends the exchange (CONTINUE) after `idle_for`, or earlier when the
    /// body's inactivity limit comes first. `last_byte` is the time of the latest body
    /// byte when the caller knows it (it just recorded it), else it is read.
    fn reset_idle(&mut self, last_byte: Option<std::time::Instant>) {
        let now = tokio::time::Instant::now();
        let mut deadline = now + self.idle_for;
        if self.is_body() {
            let last = last_byte
                .unwrap_or_else(|| *self.pending.last_upload.lock().expect("bug: poisoned"));
            let stall = tokio::time::Instant::from_std(last) + self.limits.inactivity;
            deadline = deadline.min(stall.max(now));
        }
        self.idle.as_mut().reset(deadline);
    }

    /// Gives up on the user's body: the agent gets ABORT, the user its status.
    fn fail(&mut self, why: UploadFailure) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.pending.fail_upload(why);
        let text = match why {
            UploadFailure::TooLarge(n) => format!("the request body is larger than {n} bytes"),
            UploadFailure::Stalled(d) => format!("the request body stalled for {d:?}"),
            UploadFailure::Malformed => "the request body's framing is malformed".to_owned(),
        };
        self.finish(Next::Broken, encode(BodyMsg::Abort(text)).frame)
    }

    fn finish(&mut self, next: Next, last: Bytes) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.finished = true;
        let source = self.source.take().expect("bug: exchange finished twice");
        let slot = match next {
            Next::Continue => UploadSlot::Ready {
                source,
                offset: self.offset,
            },
            Next::Finished => UploadSlot::Finished,
            Next::Broken => UploadSlot::Broken,
        };
        // The user side may have finished meanwhile (slot Finished); keep that.
        let in_use = matches!(
            *self.pending.upload.lock().expect("bug: poisoned"),
            UploadSlot::InUse
        );
        if in_use {
            self.pending.set_upload(slot);
        }
        Poll::Ready(Some(Ok(Frame::data(last))))
    }
}

impl Body for UploadExchange {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(b) = this.queued.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        if this.sent >= this.max {
            return this.finish(Next::Continue, encode_continue());
        }
        let source = this
            .source
            .as_mut()
            .expect("bug: source taken before finish");
        let msg = match source.poll_next(cx) {
            Poll::Ready(Ok(msg)) => msg,
            Poll::Ready(Err(SourceError::Body(e))) if e.is_parse() => {
                return this.fail(UploadFailure::Malformed)
            }
            Poll::Ready(Err(e)) => {
                let why = format!("the user's side failed: {e}");
                return this.finish(Next::Broken, encode(BodyMsg::Abort(why)).frame);
            }
            Poll::Pending => return this.poll_quiet(cx),
        };
        let BodyMsg::Data(data) = msg else {
            // END or TRAILERS: the upload is complete.
            return this.finish(Next::Finished, encode(msg).frame);
        };
        let len = data.len() as u64;
        if let (true, Some(max)) = (this.is_body(), this.limits.max_body) {
            if this.offset + len > max {
                return this.fail(UploadFailure::TooLarge(max));
            }
        }
        let last_byte = this.is_body().then(|| {
            let now = std::time::Instant::now();
            *this.pending.last_upload.lock().expect("bug: poisoned") = now;
            now
        });
        this.sent += len;
        this.offset += len;
        this.pending
            .upload_bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        this.reset_idle(last_byte);
        let Encoded { frame, payload } = encode(BodyMsg::Data(data));
        this.queued = payload;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

impl UploadExchange {
    /// Nothing to send: the exchange ends when the user left (ABORT), the body stalled past
    /// its limit (ABORT, 408 to the user) or the exchange idled (CONTINUE).
    fn poll_quiet(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.user_gone.as_mut().poll(cx).is_ready() {
            let why = BodyMsg::Abort("the user went away".into());
            return self.finish(Next::Broken, encode(why).frame);
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            if self.is_body() {
                let last = *self.pending.last_upload.lock().expect("bug: poisoned");
                if last.elapsed() >= self.limits.inactivity {
                    return self.fail(UploadFailure::Stalled(self.limits.inactivity));
                }
            }
            return self.finish(Next::Continue, encode_continue());
        }
        Poll::Pending
    }
}

impl Drop for UploadExchange {
    fn drop(&mut self) {
        if !self.finished {
            let in_use = matches!(
                *self.pending.upload.lock().expect("bug: poisoned"),
                UploadSlot::InUse
            );
            if in_use {
                self.pending.set_upload(UploadSlot::Broken);
            }
        }
    }
}

//! The body of a `/server/requeststream` answer: the user's upload, framed, for one exchange.
//!
//! The exchange takes the user's body out of its slot, streams DATA frames as the user sends
//! bytes (no buffering: each user chunk becomes one frame header plus the chunk itself), and
//! ends with END or TRAILERS when the upload is complete, ABORT when it broke, or CONTINUE
//! after `max` bytes or `idle` without bytes, handing the body back for the next exchange.
//! An exchange dropped before its last frame marks the upload broken: bytes may have been
//! lost in flight, and the request must not go on with a hole in its body.

use relay_common::readbuf::ReadBuf;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use relay_common::frame::{self, Kind};
use relay_common::message::{encode_headers, Trailers};
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::body::BodyError;
use crate::pending::{Pending, UploadFailure, UploadSlot, UploadSource};

/// Largest read of tunnel bytes.
const TUNNEL_READ: usize = 64 * 1024;

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
    buf: ReadBuf,
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
            buf: ReadBuf::new(TUNNEL_READ),
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
        matches!(self.source, Some(UploadSource::Body(_)))
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
        self.finish(Next::Broken, frame::control(Kind::Abort, text.as_bytes()))
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
        loop {
            if this.sent >= this.max {
                return this.finish(Next::Continue, frame::control(Kind::Continue, b""));
            }
            let chunk = match this
                .source
                .as_mut()
                .expect("bug: source taken before finish")
            {
                UploadSource::Body(body) => Pin::new(body).poll_frame(cx).map(|f| {
                    f.map(|r| {
                        r.map(|f| {
                            f.into_data()
                                .map_err(|f| f.into_trailers().unwrap_or_default())
                        })
                        .map_err(|e| (e.is_parse(), e.to_string()))
                    })
                }),
                UploadSource::Tunnel(rd) => match this.buf.poll_read(Pin::new(rd), cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(None)) => Poll::Ready(None),
                    Poll::Ready(Ok(Some(data))) => Poll::Ready(Some(Ok(Ok(data)))),
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err((false, e.to_string())))),
                },
            };
            match chunk {
                Poll::Ready(Some(Ok(item))) => match item {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let len = data.len();
                        if let (true, Some(max)) = (this.is_body(), this.limits.max_body) {
                            if this.offset + len as u64 > max {
                                return this.fail(UploadFailure::TooLarge(max));
                            }
                        }
                        let last_byte = this.is_body().then(|| {
                            let now = std::time::Instant::now();
                            *this.pending.last_upload.lock().expect("bug: poisoned") = now;
                            now
                        });
                        this.sent += len as u64;
                        this.offset += len as u64;
                        this.pending
                            .upload_bytes
                            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                        this.reset_idle(last_byte);
                        this.queued = Some(data);
                        return Poll::Ready(Some(Ok(Frame::data(frame::header(Kind::Data, len)))));
                    }
                    Err(t) => {
                        let json = serde_json::to_vec(&Trailers {
                            headers: encode_headers(&t),
                        })
                        .expect("bug: trailers always serialise");
                        return this.finish(Next::Finished, frame::control(Kind::Trailers, &json));
                    }
                },
                Poll::Ready(Some(Err((true, _)))) => return this.fail(UploadFailure::Malformed),
                Poll::Ready(Some(Err((false, e)))) => {
                    let why = format!("the user's side failed: {e}");
                    return this.finish(Next::Broken, frame::control(Kind::Abort, why.as_bytes()));
                }
                Poll::Ready(None) => {
                    return this.finish(Next::Finished, frame::control(Kind::End, b""));
                }
                Poll::Pending => {
                    if this.user_gone.as_mut().poll(cx).is_ready() {
                        return this.finish(
                            Next::Broken,
                            frame::control(Kind::Abort, b"the user went away"),
                        );
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        if this.is_body() {
                            let last = *this.pending.last_upload.lock().expect("bug: poisoned");
                            if last.elapsed() >= this.limits.inactivity {
                                return this.fail(UploadFailure::Stalled(this.limits.inactivity));
                            }
                        }
                        return this.finish(Next::Continue, frame::control(Kind::Continue, b""));
                    }
                    return Poll::Pending;
                }
            }
        }
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

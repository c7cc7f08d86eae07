//! The response side of a request in flight: where `/server/response` exchanges deliver.
//! One exchange at a time holds it as a [`ResponseLease`]; a lease dropped before the
//! response ended or the exchange handed over cleanly fails the user's response (502 before
//! the head, an aborted body after it), so a cut exchange is never a silent truncation.
//!
//! ```text
//! AwaitingHead --head with a body--> Streaming --END / TRAILERS / ABORT--> Over
//!              --head without a body, head with the whole body, or ABORT--> Over
//! any --lease dropped uncleanly--> Over (the user's side sees the senders go)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use relay_common::codec::BodyMsg;
use relay_common::message::{BodyKind, ResponseHead};
use relay_common::BODY_CHANNEL_DEPTH;
use tokio::sync::{oneshot, Mutex, OwnedMutexGuard};

use crate::base::body::{Delivery, Whole};
use crate::base::budget::Held;

/// What the first response exchange hands to the waiting user handler.
pub enum ResponseStart {
    /// The response head, and the body channel when a body follows.
    Head(ResponseHead, Option<crate::base::queue::Receiver<Delivery>>),
    /// The response head with its whole body (a session's RESPONSE): no channel.
    Whole(ResponseHead, Whole),
    /// The agent gave up before the head (its reason).
    Abort(String),
}

enum Sink {
    AwaitingHead(oneshot::Sender<ResponseStart>),
    Streaming(crate::base::queue::Sender<Delivery>),
    Over,
}

struct SinkState {
    sink: Sink,
    /// Body bytes delivered so far: the offset the next exchange must start at.
    offset: u64,
    /// Trailer fields that came before the end (v1alpha1 messages may carry trailers on
    /// any message; they all go out with the end).
    trailers: http::HeaderMap,
}

/// The response side of one request.
pub struct ResponseSide {
    state: Arc<Mutex<SinkState>>,
    /// Set once the agent sent a final frame or broke the protocol: it needs no cancel
    /// notice when the request ends.
    agent_finished: AtomicBool,
}

/// Why a delivery stopped.
#[derive(Debug)]
pub enum DeliverError {
    /// The user's side is gone.
    UserGone,
    /// The frame does not fit the response's state (the agent's protocol error).
    Protocol(&'static str),
}

impl ResponseSide {
    /// A response side whose head goes to `head_tx`.
    pub fn new(head_tx: oneshot::Sender<ResponseStart>) -> Self {
        ResponseSide {
            state: Arc::new(Mutex::new(SinkState {
                sink: Sink::AwaitingHead(head_tx),
                offset: 0,
                trailers: http::HeaderMap::new(),
            })),
            agent_finished: AtomicBool::new(false),
        }
    }

    /// Whether the agent is done with the request (no cancel notice needed).
    pub fn agent_finished(&self) -> bool {
        self.agent_finished.load(Ordering::Acquire)
    }

    /// Where the response stands, for the log line of a request that timed out.
    pub fn describe(&self) -> &'static str {
        match self.state.try_lock() {
            Err(_) => "an exchange or the session is delivering it",
            Ok(s) => match s.sink {
                Sink::AwaitingHead(_) => "no response head arrived",
                Sink::Streaming(_) => "the body is streaming",
                Sink::Over => "over",
            },
        }
    }

    /// Takes the response for one exchange; `None` while another exchange holds it.
    pub fn lease(self: &Arc<Self>) -> Option<ResponseLease> {
        let state = self.state.clone().try_lock_owned().ok()?;
        Some(ResponseLease {
            state,
            side: self.clone(),
            clean: false,
        })
    }
}

/// The response, held by one exchange.
pub struct ResponseLease {
    state: OwnedMutexGuard<SinkState>,
    side: Arc<ResponseSide>,
    clean: bool,
}

impl ResponseLease {
    /// The offset the exchange must start at.
    pub fn offset(&self) -> u64 {
        self.state.offset
    }

    /// Whether the head is still to come.
    pub fn awaiting_head(&self) -> bool {
        matches!(self.state.sink, Sink::AwaitingHead(_))
    }

    /// Keeps trailer fields for the end of the body.
    pub fn stash_trailers(&mut self, fields: http::HeaderMap) {
        // A name is given once for all its values (`None` repeats the last).
        let mut last = None;
        for (name, value) in fields {
            last = name.or(last);
            if let Some(name) = &last {
                self.state.trailers.append(name.clone(), value);
            }
        }
    }

    /// The trailer fields kept so far.
    pub fn take_trailers(&mut self) -> http::HeaderMap {
        std::mem::take(&mut self.state.trailers)
    }

    /// Delivers the head. `Ok(true)` when a body follows.
    pub fn head(&mut self, head: ResponseHead) -> Result<bool, DeliverError> {
        let Sink::AwaitingHead(_) = &self.state.sink else {
            return Err(DeliverError::Protocol("HEAD sent twice"));
        };
        let (next, rx) = if head.body == BodyKind::Stream {
            let (tx, rx) = crate::base::queue::queue(BODY_CHANNEL_DEPTH);
            (Sink::Streaming(tx), Some(rx))
        } else {
            (Sink::Over, None)
        };
        let Sink::AwaitingHead(head_tx) = std::mem::replace(&mut self.state.sink, next) else {
            unreachable!("bug: matched above")
        };
        let body = rx.is_some();
        head_tx
            .send(ResponseStart::Head(head, rx))
            .map_err(|_| DeliverError::UserGone)?;
        if !body {
            self.finished();
        }
        Ok(body)
    }

    /// Delivers the head with the whole body at once; the response is over.
    pub fn whole(&mut self, head: ResponseHead, body: Whole) -> Result<(), DeliverError> {
        let Sink::AwaitingHead(_) = &self.state.sink else {
            return Err(DeliverError::Protocol("HEAD sent twice"));
        };
        let Sink::AwaitingHead(head_tx) = std::mem::replace(&mut self.state.sink, Sink::Over)
        else {
            unreachable!("bug: matched above")
        };
        self.state.offset += body.data.len() as u64;
        self.finished();
        head_tx
            .send(ResponseStart::Whole(head, body))
            .map_err(|_| DeliverError::UserGone)
    }

    /// Delivers body bytes holding `held` of the budget until the user side takes them.
    pub async fn data(&mut self, data: Bytes, held: Held) -> Result<(), DeliverError> {
        let len = data.len() as u64;
        let msg = BodyMsg::Data(data);
        self.send(Delivery {
            msg,
            held: Some(held),
        })
        .await?;
        self.state.offset += len;
        Ok(())
    }

    /// Delivers the last message (END, TRAILERS or ABORT); the response is over.
    pub async fn end(&mut self, last: BodyMsg) -> Result<(), DeliverError> {
        debug_assert!(last.is_last(), "bug: DATA is not a last message");
        let sink = std::mem::replace(&mut self.state.sink, Sink::Over);
        self.finished();
        match (sink, last) {
            (Sink::AwaitingHead(tx), BodyMsg::Abort(why)) => {
                let _ = tx.send(ResponseStart::Abort(why));
                Ok(())
            }
            // The user may have gone while the agent gave up: nothing to tell.
            (Sink::Streaming(tx), msg @ BodyMsg::Abort(_)) => {
                let _ = tx.send(msg.into()).await;
                Ok(())
            }
            (Sink::Streaming(tx), msg) => tx
                .send(msg.into())
                .await
                .map_err(|_| DeliverError::UserGone),
            _ => Err(DeliverError::Protocol("body frame without a streamed HEAD")),
        }
    }

    async fn send(&mut self, d: Delivery) -> Result<(), DeliverError> {
        match &self.state.sink {
            Sink::Streaming(tx) => tx.send(d).await.map_err(|_| DeliverError::UserGone),
            _ => Err(DeliverError::Protocol("body frame without a streamed HEAD")),
        }
    }

    /// The exchange handed over cleanly (CONTINUE, or the user left): the response stays
    /// as it is for the next exchange.
    pub fn hand_over(mut self) {
        self.clean = true;
    }

    /// The agent broke the protocol (or sent a gap): the user's response fails and the
    /// agent, which caused it, needs no cancel notice.
    pub fn protocol_error(self) {
        self.side.agent_finished.store(true, Ordering::Release);
    }

    fn finished(&mut self) {
        self.clean = true;
        self.side.agent_finished.store(true, Ordering::Release);
    }
}

impl Drop for ResponseLease {
    fn drop(&mut self) {
        if !self.clean {
            // Dropping the senders makes the user side answer 502 (no head yet) or abort
            // the body (head sent).
            self.state.sink = Sink::Over;
        }
    }
}

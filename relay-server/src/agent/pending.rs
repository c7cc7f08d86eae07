//! One user request in flight: its head (until an agent takes it), who claimed it, where the
//! agent's response goes, and the user's upload body (until the agent pulls it).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use relay_common::id::RequestId;
use relay_common::message::{RequestHead, ResponseHead};
use tokio::io::ReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agent::broker::{Agent, Backend, Broker};
use crate::base::body::Delivery;

enum Claim {
    /// Waiting in the backend's queue; holds one slot of the global parked count.
    Queued {
        notify: oneshot::Sender<Arc<Agent>>,
        parked: Arc<AtomicUsize>,
    },
    Claimed(Arc<Agent>),
    Cancelled,
}

/// What the first response exchange hands to the waiting user handler.
pub enum ResponseStart {
    /// The response head, and the body channel when a body follows.
    Head(ResponseHead, Option<mpsc::Receiver<Delivery>>),
    /// The agent gave up before the head (its reason).
    Abort(String),
}

/// Where `/server/response` exchanges deliver. Owned by the exchange in progress (one at a
/// time, through the async mutex), so offsets and frames stay in order.
pub struct ResponseSink {
    /// Until the head was delivered.
    pub head_tx: Option<oneshot::Sender<ResponseStart>>,
    /// While a body is being delivered.
    pub body_tx: Option<mpsc::Sender<Delivery>>,
    /// Body bytes delivered so far: the offset the next exchange must start at.
    pub offset: u64,
}

/// Where upload bytes come from: the request body, or after a 101 the user's side of the
/// switched connection.
pub type UploadSource =
    relay_common::source::Source<crate::base::body::UserBody, ReadHalf<TokioIo<Upgraded>>>;

/// The user's upload as seen by `/server/requeststream`.
pub enum UploadSlot {
    /// The request has no body.
    NoBody,
    /// An upgrade request: the tunnel's user→backend bytes become available once the 101 is
    /// sent to the user (never before: no bytes are forwarded ahead of the switch).
    AwaitingUpgrade,
    /// Ready for the next exchange.
    Ready {
        /// The bytes' source.
        source: UploadSource,
        /// Bytes already delivered to the agent.
        offset: u64,
    },
    /// An exchange is streaming it now.
    InUse,
    /// Delivered completely (END or TRAILERS sent).
    Finished,
    /// An exchange was cut mid-way; bytes may be lost, so the request cannot go on.
    Broken,
}

/// A request in flight.
pub struct Pending {
    /// Its id.
    pub id: RequestId,
    /// Backend name it belongs to.
    pub name: String,
    head: Mutex<Option<RequestHead>>,
    claim: Mutex<Claim>,
    /// Response delivery state.
    pub response: Arc<tokio::sync::Mutex<ResponseSink>>,
    /// Upload state.
    pub upload: Mutex<UploadSlot>,
    /// Cancelled when the user side is gone or the response is over.
    pub done: CancellationToken,
    /// Set once the agent sent END, TRAILERS or ABORT: it needs no cancel notice then.
    pub agent_finished: AtomicBool,
    /// Woken when the upload slot changes from `AwaitingUpgrade`.
    pub upload_ready: tokio::sync::Notify,
    /// Cancelled when the upload is over (Finished or Broken).
    pub upload_done: CancellationToken,
    /// Upload bytes delivered so far, all exchanges together (tunnel idle tracking).
    pub upload_bytes: AtomicU64,
    /// Why the relay gave up on the user's request body (set once).
    pub upload_failure: std::sync::OnceLock<UploadFailure>,
    /// Cancelled when `upload_failure` is set: the user gets its status at once.
    pub upload_failed: CancellationToken,
    /// When the request arrived.
    pub arrived: std::time::Instant,
    /// Response body bytes delivered towards the user.
    pub download_bytes: AtomicU64,
    /// When the last request body byte arrived (the request's arrival before the first).
    pub last_upload: Mutex<std::time::Instant>,
}

/// A request body the relay refused part way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadFailure {
    /// More bytes than the configured maximum (413).
    TooLarge(u64),
    /// No byte for this long while the relay waited for one (408).
    Stalled(std::time::Duration),
    /// The body's framing broke (a bad chunk; 400).
    Malformed,
}

impl Pending {
    /// A new request; `head_tx` receives the response head.
    pub fn new(
        id: RequestId,
        name: String,
        head: RequestHead,
        upload: UploadSlot,
        head_tx: oneshot::Sender<ResponseStart>,
    ) -> Self {
        Pending {
            id,
            name,
            head: Mutex::new(Some(head)),
            claim: Mutex::new(Claim::Cancelled),
            response: Arc::new(tokio::sync::Mutex::new(ResponseSink {
                head_tx: Some(head_tx),
                body_tx: None,
                offset: 0,
            })),
            upload: Mutex::new(upload),
            done: CancellationToken::new(),
            agent_finished: AtomicBool::new(false),
            upload_ready: tokio::sync::Notify::new(),
            upload_done: CancellationToken::new(),
            upload_bytes: AtomicU64::new(0),
            upload_failure: std::sync::OnceLock::new(),
            upload_failed: CancellationToken::new(),
            last_upload: Mutex::new(std::time::Instant::now()),
            arrived: std::time::Instant::now(),
            download_bytes: AtomicU64::new(0),
        }
    }

    /// Replaces the upload slot, waking exchanges waiting for a tunnel and recording the end.
    pub fn set_upload(&self, slot: UploadSlot) {
        let over = matches!(slot, UploadSlot::Finished | UploadSlot::Broken);
        *self.upload.lock().expect("bug: poisoned") = slot;
        self.upload_ready.notify_waiters();
        if over {
            self.upload_done.cancel();
        }
    }

    /// Records why the relay gave up on the body and wakes the user handler.
    pub fn fail_upload(&self, why: UploadFailure) {
        let _ = self.upload_failure.set(why);
        self.upload_failed.cancel();
    }

    /// Whether the upload ended broken (reset) rather than finished (half-close).
    pub fn upload_broken(&self) -> bool {
        matches!(
            *self.upload.lock().expect("bug: poisoned"),
            UploadSlot::Broken
        )
    }

    /// Enters the Queued state, taking one global parked slot.
    pub(crate) fn set_queued(&self, notify: oneshot::Sender<Arc<Agent>>, parked: Arc<AtomicUsize>) {
        parked.fetch_add(1, Ordering::AcqRel);
        *self.claim.lock().expect("bug: poisoned") = Claim::Queued { notify, parked };
    }

    /// Queued → Claimed by `agent`. False when the request was cancelled meanwhile.
    pub(crate) fn claim(&self, agent: &Arc<Agent>) -> bool {
        let mut c = self.claim.lock().expect("bug: poisoned");
        match std::mem::replace(&mut *c, Claim::Claimed(agent.clone())) {
            Claim::Queued { notify, parked } => {
                parked.fetch_sub(1, Ordering::AcqRel);
                let _ = notify.send(agent.clone());
                true
            }
            other => {
                *c = other;
                false
            }
        }
    }

    /// Queued → Cancelled. False when an agent claimed it first.
    pub fn cancel_queued(&self) -> bool {
        let mut c = self.claim.lock().expect("bug: poisoned");
        match &*c {
            Claim::Queued { parked, .. } => {
                parked.fetch_sub(1, Ordering::AcqRel);
                *c = Claim::Cancelled;
                true
            }
            _ => false,
        }
    }

    fn claimed_by(&self) -> Option<Arc<Agent>> {
        match &*self.claim.lock().expect("bug: poisoned") {
            Claim::Claimed(a) => Some(a.clone()),
            _ => None,
        }
    }

    /// The head, once (to the poll that claimed the request).
    pub(crate) fn take_head(&self) -> Option<RequestHead> {
        self.head.lock().expect("bug: poisoned").take()
    }
}

/// Ties a request's table entry, queue slot and agent-side work to the user side: dropping
/// it (response finished, user gone, error) releases all of them and tells the agent.
pub struct PendingGuard {
    broker: Arc<Broker>,
    backend: Arc<Backend>,
    pending: Arc<Pending>,
}

impl PendingGuard {
    /// The guarded request.
    pub fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }

    pub(crate) fn new(broker: Arc<Broker>, backend: Arc<Backend>, pending: Arc<Pending>) -> Self {
        PendingGuard {
            broker,
            backend,
            pending,
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let p = &self.pending;
        p.done.cancel();
        self.broker.forget(p.id);
        if p.cancel_queued() {
            self.backend.unqueue(p.id);
        } else if let Some(agent) = p.claimed_by() {
            if !p.agent_finished.load(Ordering::Acquire) {
                agent.notify_cancel(p.id);
            }
        }
        // Release the user's upload body now rather than when the last Arc goes.
        p.set_upload(UploadSlot::Finished);
        self.broker.metrics.finished(
            self.broker.is_connected(&p.name).then_some(p.name.as_str()),
            p.arrived.elapsed(),
            p.upload_bytes.load(Ordering::Relaxed),
            p.download_bytes.load(Ordering::Relaxed),
        );
    }
}

//! One user request in flight: its head (until an agent takes it), who claimed it, its
//! upload and response sides, and the guard that ends it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use relay_common::id::RequestId;
use relay_common::message::RequestHead;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::agent::broker::{Agent, Broker, NameQueue};
use crate::agent::response_side::{ResponseSide, ResponseStart};
use crate::agent::upload_side::UploadSide;
use crate::base::budget::Account;

enum Claim {
    /// Waiting in the backend's queue; holds one slot of the global parked count.
    Queued {
        notify: oneshot::Sender<Arc<Agent>>,
        parked: Arc<AtomicUsize>,
    },
    Claimed(Arc<Agent>),
    Cancelled,
}

/// A request in flight: its head until an agent takes it, who claimed it, and its two
/// sides, each a state machine of its own ([`UploadSide`], [`ResponseSide`]).
pub struct Pending {
    /// Its id.
    pub id: RequestId,
    /// Backend name it belongs to.
    pub name: String,
    head: Mutex<Option<RequestHead>>,
    claim: Mutex<Claim>,
    /// Where response exchanges deliver.
    pub response: Arc<ResponseSide>,
    /// Where upload exchanges take the user's bytes from.
    pub upload: UploadSide,
    /// Cancelled when the request is over (the user left or the response ended): exchanges
    /// still running for it stop.
    pub done: CancellationToken,
    /// When the request arrived.
    pub arrived: std::time::Instant,
    /// Response body bytes delivered towards the user.
    pub download_bytes: AtomicU64,
    /// What its waiting response bytes hold of the memory budget and their shares.
    pub account: Account,
}

impl Pending {
    /// A new request; its response head goes to `head_tx`.
    pub fn new(
        id: RequestId,
        name: String,
        head: RequestHead,
        upload: UploadSide,
        head_tx: oneshot::Sender<ResponseStart>,
        account: Account,
    ) -> Self {
        Pending {
            id,
            name,
            head: Mutex::new(Some(head)),
            claim: Mutex::new(Claim::Cancelled),
            response: Arc::new(ResponseSide::new(head_tx)),
            upload,
            done: CancellationToken::new(),
            arrived: std::time::Instant::now(),
            download_bytes: AtomicU64::new(0),
            account,
        }
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
    backend: Arc<NameQueue>,
    pending: Arc<Pending>,
}

impl PendingGuard {
    /// The guarded request.
    pub fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }

    pub(crate) fn new(broker: Arc<Broker>, backend: Arc<NameQueue>, pending: Arc<Pending>) -> Self {
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
            if !p.response.agent_finished() {
                agent.notify_cancel(p.id);
            }
        }
        // Release the user's upload body now rather than when the last Arc goes.
        p.upload.close();
        self.broker.metrics.finished(
            self.broker.is_connected(&p.name).then_some(p.name.as_str()),
            p.arrived.elapsed(),
            p.upload.bytes(),
            p.download_bytes.load(Ordering::Relaxed),
        );
    }
}

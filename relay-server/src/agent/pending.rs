//! One user request in flight: its head (until an agent takes it), who claimed it, its
//! upload and response sides, and the guard that ends it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use relay_common::id::RequestId;
use relay_common::message::RequestHead;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::agent::broker::{Broker, NameQueue};
use crate::agent::registration::Agent;
use crate::agent::response_side::{ResponseSide, ResponseStart};
use crate::agent::upload_side::UploadSide;
use crate::base::budget::Account;

enum Claim {
    /// Waiting in the backend's queue; holds one slot of the global parked count. `notify`
    /// tells the user side who claimed it (`None` once it has been told: a request put back
    /// after its delivery to an agent failed).
    Queued {
        notify: Option<oneshot::Sender<Arc<Agent>>>,
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
    /// Woken when a request that was put back is claimed again (its user side follows the
    /// new claimer, see [`Pending::claimer_gone`]).
    reclaimed: Notify,
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
            reclaimed: Notify::new(),
        }
    }

    /// Enters the Queued state, taking one global parked slot.
    pub(crate) fn set_queued(&self, notify: oneshot::Sender<Arc<Agent>>, parked: Arc<AtomicUsize>) {
        parked.fetch_add(1, Ordering::AcqRel);
        *self.claim.lock().expect("bug: poisoned") = Claim::Queued {
            notify: Some(notify),
            parked,
        };
    }

    /// Queued → Claimed by `agent`. False when the request was cancelled meanwhile.
    pub(crate) fn claim(&self, agent: &Arc<Agent>) -> bool {
        let mut c = self.claim.lock().expect("bug: poisoned");
        match std::mem::replace(&mut *c, Claim::Claimed(agent.clone())) {
            Claim::Queued { notify, parked } => {
                parked.fetch_sub(1, Ordering::AcqRel);
                match notify {
                    Some(n) => {
                        let _ = n.send(agent.clone());
                    }
                    // Put back earlier: the user side waits on the claimer it knew.
                    None => self.reclaimed.notify_waiters(),
                }
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

    /// Claimed → Queued again, with its head back: its delivery to the agent failed before
    /// any of it was written, so the request has had no effect yet. False (nothing done)
    /// when the request is over (the user left). Called with the name's queue locked, so
    /// that a user leaving meanwhile finds it queued and takes it out.
    pub(crate) fn put_back(&self, head: RequestHead, parked: &Arc<AtomicUsize>) -> bool {
        let mut c = self.claim.lock().expect("bug: poisoned");
        if self.done.is_cancelled() || !matches!(*c, Claim::Claimed(_)) {
            return false;
        }
        parked.fetch_add(1, Ordering::AcqRel);
        *c = Claim::Queued {
            notify: None,
            parked: parked.clone(),
        };
        *self.head.lock().expect("bug: poisoned") = Some(head);
        true
    }

    /// Resolves when the agent holding the request is declared gone. A request put back
    /// and claimed by another agent follows the new one; while it waits in the queue again
    /// no agent's end concerns it.
    pub async fn claimer_gone(&self) {
        loop {
            let changed = self.reclaimed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let claimer = match &*self.claim.lock().expect("bug: poisoned") {
                Claim::Claimed(agent) => Some(agent.clone()),
                Claim::Queued { .. } => None,
                // Orphaned (its name has no agent any more) or over.
                Claim::Cancelled => return,
            };
            match claimer {
                Some(agent) => tokio::select! {
                    _ = agent.gone.cancelled() => return,
                    _ = &mut changed => {}
                },
                None => changed.await,
            }
        }
    }

    /// A put-back request whose name lost its last agent: it leaves the queue and its user
    /// side (in [`Pending::claimer_gone`]) fails it, as it would have with its agent.
    pub(crate) fn orphan(&self) {
        let mut c = self.claim.lock().expect("bug: poisoned");
        if let Claim::Queued {
            notify: None,
            parked,
        } = &*c
        {
            parked.fetch_sub(1, Ordering::AcqRel);
            *c = Claim::Cancelled;
            drop(c);
            self.reclaimed.notify_waiters();
        }
    }

    /// The agent holding the request, if one claimed it.
    pub fn claimed_by(&self) -> Option<Arc<Agent>> {
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

//! One user request in flight: its head (until an agent takes it), who claimed it, its
//! upload and response sides, and the guard that ends it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use relay_common::id::RequestId;
use relay_common::message::RequestHead;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::agent::broker::{Broker, NameQueue};
use crate::agent::registration::Agent;
use crate::agent::response_side::{ResponseSide, ResponseStart};
use crate::agent::upload_side::UploadSide;
use crate::base::budget::{Account, LazyAccount};

enum Claim {
    /// Waiting in the backend's queue; holds one slot of the global parked count. `again`:
    /// put back after its delivery to an agent failed. `notify`: told of the first claim
    /// (traced requests only, whose pickup span ends there).
    Queued {
        again: bool,
        parked: Arc<AtomicUsize>,
        notify: Option<oneshot::Sender<()>>,
    },
    Claimed(Arc<Agent>),
    Cancelled,
}

/// Where a request's claim stands, for its user side's single wait (see
/// `user::relayed::dispatch`): the user side is never woken by a claim, only by the head,
/// a timeout, or the loss of its claimer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pickup {
    /// No agent has taken it yet: the pickup timeout applies.
    Waiting,
    /// An agent took it (it may wait in the queue again after a failed delivery): the
    /// response timeout applies.
    Taken,
    /// It left the queue without an agent (cancelled, or orphaned).
    Over,
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
    /// What its waiting response bytes hold of the memory budget and their shares
    /// ([`Pending::account`]).
    account: LazyAccount,
    /// When an agent first took it (the pickup time is measured from `arrived`).
    picked_at: OnceLock<std::time::Instant>,
    /// Set (and `lost_notify` woken) when the agent holding the request is declared gone,
    /// or a put-back request is orphaned: see [`Pending::claimer_lost`].
    lost: AtomicBool,
    /// Set (and `lost_notify` woken) when the relay stops: see [`Pending::interrupted`].
    stopped: AtomicBool,
    /// When the waits for an agent end.
    deadlines: Deadlines,
    /// Set (and `lost_notify` woken) by the broker's sweep ([`Pending::check_overdue`]) when
    /// one of `deadlines` passed; taken by [`Pending::interrupted`].
    overdue: AtomicBool,
    lost_notify: Notify,
}

/// When the waits for a request's agent end. Checked by the broker's periodic sweep
/// (`Broker::sweep_overdue`), not by a timer per request: a tokio timer armed and dropped
/// for every request cost the relay-server about 600 instructions per small request (2 %),
/// and its timer wheel's upkeep at every park.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// No agent took the request by then: 503.
    pub pickup: std::time::Instant,
    /// No response head by then: 504.
    pub response: std::time::Instant,
}

/// Why the user side of a request stops waiting for its response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// The agent holding it was declared gone (or a put-back request was orphaned).
    ClaimerLost,
    /// The relay stopped (its drain ended).
    Stopped,
    /// One of its [`Deadlines`] passed (the user side tells which, and whether it still
    /// applies: a request taken after its pickup deadline waits for the response deadline).
    Overdue,
}

impl Pending {
    /// A new request; its response head goes to `head_tx`.
    pub fn new(
        id: RequestId,
        name: String,
        head: RequestHead,
        upload: UploadSide,
        head_tx: oneshot::Sender<ResponseStart>,
        account: LazyAccount,
        deadlines: Deadlines,
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
            picked_at: OnceLock::new(),
            lost: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            deadlines,
            overdue: AtomicBool::new(false),
            lost_notify: Notify::new(),
        }
    }

    /// When the waits for its agent end.
    pub fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    /// The broker's sweep: marks the request overdue (and wakes its user side) if, at `now`,
    /// no agent has taken it by its pickup deadline, or it is past its response deadline.
    /// The user side takes the mark and tells whether it still applies (its response head
    /// may have arrived); a mark not taken stays, so a request that outlives its deadlines
    /// (a long download, a tunnel) is woken once, and each sweep passes it with one load.
    pub(crate) fn check_overdue(&self, now: std::time::Instant) {
        let d = &self.deadlines;
        if now < d.pickup.min(d.response) || self.overdue.load(Ordering::Relaxed) {
            return;
        }
        let due = match self.pickup() {
            Pickup::Waiting | Pickup::Over => now >= d.pickup,
            Pickup::Taken => now >= d.response,
        };
        if due && !self.overdue.swap(true, Ordering::AcqRel) {
            self.lost_notify.notify_waiters();
        }
    }

    /// What its waiting response bytes hold of the memory budget and their shares.
    pub fn account(&self) -> &Account {
        self.account.get(&self.name)
    }

    /// Enters the Queued state, taking one global parked slot.
    pub(crate) fn set_queued(&self, parked: Arc<AtomicUsize>, notify: Option<oneshot::Sender<()>>) {
        parked.fetch_add(1, Ordering::AcqRel);
        *self.claim.lock().expect("bug: poisoned") = Claim::Queued {
            again: false,
            parked,
            notify,
        };
    }

    /// Queued → Claimed by `agent`. False when the request was cancelled meanwhile. Nobody
    /// is woken: the user side learns of the claim only through what follows it.
    pub(crate) fn claim(&self, agent: &Arc<Agent>) -> bool {
        let mut c = self.claim.lock().expect("bug: poisoned");
        match std::mem::replace(&mut *c, Claim::Claimed(agent.clone())) {
            Claim::Queued { parked, notify, .. } => {
                parked.fetch_sub(1, Ordering::AcqRel);
                let _ = self.picked_at.set(std::time::Instant::now());
                if let Some(n) = notify {
                    let _ = n.send(());
                }
                drop(c);
                // Declared gone between taking the request and this claim: the broker's
                // sweep of the agent's requests (`Broker::claimer_gone`) may have missed it.
                if agent.gone.is_cancelled() {
                    self.lose_claimer();
                }
                true
            }
            other => {
                *c = other;
                false
            }
        }
    }

    /// Where the claim stands (see [`Pickup`]).
    pub fn pickup(&self) -> Pickup {
        match &*self.claim.lock().expect("bug: poisoned") {
            Claim::Queued { again: false, .. } => Pickup::Waiting,
            Claim::Queued { again: true, .. } | Claim::Claimed(_) => Pickup::Taken,
            Claim::Cancelled => Pickup::Over,
        }
    }

    /// How long the request waited for an agent, once one took it.
    pub fn picked_after(&self) -> Option<std::time::Duration> {
        self.picked_at.get().map(|t| t.duration_since(self.arrived))
    }

    /// Fails the request's user side as if its agent had disconnected (idempotent).
    fn lose_claimer(&self) {
        self.lost.store(true, Ordering::Release);
        self.lost_notify.notify_waiters();
    }

    /// The agent `gone` was declared gone: the request fails if that agent holds it (one put
    /// back in the queue meanwhile waits for another agent, and follows that one).
    pub(crate) fn claimer_gone(&self, gone: &Arc<Agent>) {
        let holds = matches!(&*self.claim.lock().expect("bug: poisoned"),
            Claim::Claimed(a) if Arc::ptr_eq(a, gone));
        if holds {
            self.lose_claimer();
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
            again: true,
            parked: parked.clone(),
            notify: None,
        };
        *self.head.lock().expect("bug: poisoned") = Some(head);
        true
    }

    /// Resolves when the agent holding the request is declared gone (or a put-back request
    /// is orphaned). Only the broker's sweep of a gone agent wakes it: a claim does not.
    pub async fn claimer_lost(&self) {
        self.interrupted(true, false).await;
    }

    /// Resolves when the agent holding the request is declared gone, or (unless
    /// `stop_seen`) when the relay stopped, or (with `overdue`) when the broker's sweep
    /// found a deadline passed (taking that mark). The stop reaches each request through the
    /// broker ([`Pending::stop`]) rather than through every request registering with the
    /// relay's stop token, whose waiter list all requests of all threads would share.
    pub async fn interrupted(&self, stop_seen: bool, overdue: bool) -> Interrupt {
        loop {
            let lost = self.lost_notify.notified();
            tokio::pin!(lost);
            lost.as_mut().enable();
            if self.lost.load(Ordering::Acquire) {
                return Interrupt::ClaimerLost;
            }
            if !stop_seen && self.stopped.load(Ordering::Acquire) {
                return Interrupt::Stopped;
            }
            if overdue && self.overdue.swap(false, Ordering::AcqRel) {
                return Interrupt::Overdue;
            }
            lost.await;
        }
    }

    /// The relay stopped: the user side decides what that means for its request (one no
    /// agent took is refused, one taken is still answered).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.lost_notify.notify_waiters();
    }

    /// A put-back request whose name lost its last agent: it leaves the queue and its user
    /// side (in [`Pending::claimer_gone`]) fails it, as it would have with its agent.
    pub(crate) fn orphan(&self) {
        let mut c = self.claim.lock().expect("bug: poisoned");
        if let Claim::Queued {
            again: true,
            parked,
            ..
        } = &*c
        {
            parked.fetch_sub(1, Ordering::AcqRel);
            *c = Claim::Cancelled;
            drop(c);
            self.lose_claimer();
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
            self.backend.label(),
            p.arrived.elapsed(),
            p.upload.bytes(),
            p.download_bytes.load(Ordering::Relaxed),
        );
    }
}

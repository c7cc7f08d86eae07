//! The upload side of a request in flight: where the user's bytes wait between upload
//! exchanges. One exchange at a time holds them as an [`UploadLease`]; how the lease ends is
//! the next state, and a lease dropped without an ending means bytes may be lost in flight.
//!
//! ```text
//! NoBody
//! AwaitingUpgrade --open_tunnel--> Ready            (only once the 101 reached the user)
//! Ready --lease--> Leased --give_back--> Ready      (CONTINUE: the next exchange goes on)
//!                         --finish-----> Over(Finished)
//!                         --fail(why)--> Over(Failed) (the user gets 413, 408 or 400 at once)
//!                         --drop-------> Over(Broken) (a cut exchange: the request cannot go on)
//! any --close--> Over(Finished)                     (the request is over; the source is freed;
//!                                                    NoBody stays NoBody)
//! ```
//!
//! Waiters (the user handler, the tunnel, an exchange waiting for the switch) watch the
//! phase instead of holding signals of their own: a `Notify` woken on each change of phase,
//! not a `watch` channel, whose sender locks and wakes its eight waiter lists when it is
//! dropped, with or without waiters (424 instructions of every small request, 1 %).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::ReadHalf;
use tokio::sync::Notify;

use crate::agent::error::AgentCallError;
use crate::agent::pending::Pending;
use crate::base::body::UserBody;

/// Where upload bytes come from: the request body, or after a 101 the user's side of the
/// switched connection.
pub type UploadSource = relay_common::source::Source<UserBody, ReadHalf<TokioIo<Upgraded>>>;

/// A request body the relay refused part way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadFailure {
    /// More bytes than the configured maximum (413).
    TooLarge(u64),
    /// No byte for this long while the relay waited for one (408).
    Stalled(Duration),
    /// The body's framing broke (a bad chunk; 400).
    Malformed,
}

/// How an upload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadEnd {
    /// Delivered completely (END or TRAILERS sent), or released with the request.
    Finished,
    /// An exchange was cut mid-way: bytes may be lost, so the request cannot go on.
    Broken,
    /// The relay refused the body.
    Failed(UploadFailure),
}

/// What waiters see of the upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The request has no body.
    NoBody,
    /// An upgrade request whose 101 has not reached the user yet.
    AwaitingUpgrade,
    /// Bytes may flow (waiting for an exchange, or in one).
    Open,
    /// Over.
    Over(UploadEnd),
}

enum Slot {
    NoBody,
    AwaitingUpgrade,
    Ready { source: UploadSource, offset: u64 },
    Leased,
    Over(UploadEnd),
}

impl Slot {
    fn phase(&self) -> Phase {
        match self {
            Slot::NoBody => Phase::NoBody,
            Slot::AwaitingUpgrade => Phase::AwaitingUpgrade,
            Slot::Ready { .. } | Slot::Leased => Phase::Open,
            Slot::Over(end) => Phase::Over(*end),
        }
    }
}

/// Why an upload cannot be leased now.
pub enum Refusal {
    /// An upgrade that has not switched yet: wait for the phase to change.
    Wait,
    /// Refused for good (the error the agent gets).
    Refused(AgentCallError),
}

/// The upload side of one request.
pub struct UploadSide {
    slot: Mutex<Slot>,
    /// Woken (all waiters) when the phase changes.
    changed: Notify,
    /// Bytes delivered to the agent, all exchanges together (tunnel idle tracking, metrics).
    bytes: AtomicU64,
    /// When the last body byte arrived (the request's arrival before the first): the
    /// inactivity limit counts from here across exchanges. Tokio's clock, so paused-time
    /// tests see it move.
    last_byte: Mutex<Instant>,
}

impl UploadSide {
    /// An upload of the request `body`.
    pub fn body(body: UserBody) -> Self {
        Self::with(Slot::Ready {
            source: UploadSource::Body(body),
            offset: 0,
        })
    }

    /// An upgrade request's upload, open once the connection switched.
    pub fn awaiting_upgrade() -> Self {
        Self::with(Slot::AwaitingUpgrade)
    }

    /// No upload.
    pub fn none() -> Self {
        Self::with(Slot::NoBody)
    }

    fn with(slot: Slot) -> Self {
        UploadSide {
            changed: Notify::new(),
            slot: Mutex::new(slot),
            bytes: AtomicU64::new(0),
            last_byte: Mutex::new(Instant::now()),
        }
    }

    fn set(&self, slot: &mut Slot, next: Slot) {
        let changed = next.phase() != slot.phase();
        *slot = next;
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Moves `Leased` on to `next`; any other state stays (the request was closed meanwhile).
    fn settle(&self, next: Slot) {
        let mut slot = self.slot.lock().expect("bug: poisoned");
        if matches!(*slot, Slot::Leased) {
            self.set(&mut slot, next);
        }
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.slot.lock().expect("bug: poisoned").phase()
    }

    /// Bytes delivered so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The offset the next exchange starts at, while the upload waits for one (protocols
    /// without offsets of their own, v1alpha1, continue where the last exchange ended).
    pub fn next_offset(&self) -> Option<u64> {
        match &*self.slot.lock().expect("bug: poisoned") {
            Slot::Ready { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// When the last body byte arrived.
    pub fn last_byte(&self) -> Instant {
        *self.last_byte.lock().expect("bug: poisoned")
    }

    /// The switched connection's read half becomes the upload (only from `AwaitingUpgrade`:
    /// no user byte is forwarded ahead of the switch).
    pub fn open_tunnel(&self, rd: ReadHalf<TokioIo<Upgraded>>) {
        let mut slot = self.slot.lock().expect("bug: poisoned");
        if matches!(*slot, Slot::AwaitingUpgrade) {
            let source = UploadSource::tunnel(rd);
            self.set(&mut slot, Slot::Ready { source, offset: 0 });
        }
    }

    /// Ends the upload with the request: the source is freed now, not when the last
    /// reference to the request goes.
    pub fn close(&self) {
        let mut slot = self.slot.lock().expect("bug: poisoned");
        // A request without a body has nothing to free and nobody watching for the end:
        // it stays NoBody.
        if !matches!(*slot, Slot::Over(_) | Slot::NoBody) {
            self.set(&mut slot, Slot::Over(UploadEnd::Finished));
        }
    }

    /// Waits until the phase satisfies `f` and returns it.
    pub async fn wait_for(&self, mut f: impl FnMut(&Phase) -> bool) -> Phase {
        loop {
            // Registered before the phase is read: a change in between still wakes it.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let p = self.phase();
            if f(&p) {
                return p;
            }
            changed.await;
        }
    }

    /// Waits until the upload is over.
    pub async fn ended(&self) -> UploadEnd {
        match self.wait_for(|p| matches!(p, Phase::Over(_))).await {
            Phase::Over(end) => end,
            _ => unreachable!("bug: waited for Over"),
        }
    }

    /// Waits until the relay refused the body (forever if it never does).
    pub async fn failed(&self) -> UploadFailure {
        if self.phase() == Phase::NoBody {
            // Never changes: no need to subscribe to the phase.
            return std::future::pending().await;
        }
        match self
            .wait_for(|p| matches!(p, Phase::Over(UploadEnd::Failed(_))))
            .await
        {
            Phase::Over(UploadEnd::Failed(why)) => why,
            _ => unreachable!("bug: waited for Failed"),
        }
    }
}

/// Takes the upload of `pending` for one exchange starting at `offset`.
pub fn lease(pending: &Arc<Pending>, offset: Option<u64>) -> Result<UploadLease, Refusal> {
    let side = &pending.upload;
    let mut slot = side.slot.lock().expect("bug: poisoned");
    let refused = |status: fn(String) -> AgentCallError, msg: &str| {
        Err(Refusal::Refused(status(msg.to_owned())))
    };
    match &*slot {
        Slot::Ready { offset: at, .. } if Some(*at) == offset => {}
        Slot::Ready { offset: at, .. } => {
            let msg = format!("offset mismatch: the next upload byte is {at}");
            return refused(AgentCallError::Conflict, &msg);
        }
        Slot::AwaitingUpgrade => return Err(Refusal::Wait),
        Slot::Leased => {
            return refused(
                AgentCallError::Conflict,
                "another upload exchange is in progress",
            )
        }
        Slot::NoBody => return refused(AgentCallError::Gone, "the request has no body"),
        Slot::Over(UploadEnd::Broken) => {
            return refused(
                AgentCallError::Gone,
                "the request body was lost in a cut exchange",
            )
        }
        Slot::Over(_) => {
            return refused(
                AgentCallError::Gone,
                "the request body was already delivered",
            )
        }
    }
    let Slot::Ready { source, offset } = std::mem::replace(&mut *slot, Slot::Leased) else {
        unreachable!("bug: matched Ready above")
    };
    Ok(UploadLease {
        pending: pending.clone(),
        source: Some(source),
        offset,
    })
}

/// The upload, held by one exchange. Dropping it without [`give_back`](Self::give_back),
/// [`finish`](Self::finish) or [`fail`](Self::fail) marks the upload broken.
pub struct UploadLease {
    pending: Arc<Pending>,
    source: Option<UploadSource>,
    offset: u64,
}

impl UploadLease {
    /// The bytes' source.
    pub fn source(&mut self) -> &mut UploadSource {
        self.source
            .as_mut()
            .expect("bug: a lease keeps its source until it ends")
    }

    /// Whether the source is a request body (body limits apply) rather than tunnel bytes.
    pub fn is_body(&self) -> bool {
        self.source.as_ref().is_some_and(UploadSource::is_body)
    }

    /// Bytes delivered before the next one.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The request this upload belongs to.
    pub fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }

    /// Records `n` delivered bytes; for a body, also the time of the latest byte (returned).
    pub fn delivered(&mut self, n: u64) -> Option<Instant> {
        self.offset += n;
        let side = &self.pending.upload;
        side.bytes.fetch_add(n, Ordering::Relaxed);
        self.is_body().then(|| {
            let now = Instant::now();
            *side.last_byte.lock().expect("bug: poisoned") = now;
            now
        })
    }

    /// The exchange ended with CONTINUE: the next one goes on from here.
    pub fn give_back(mut self) {
        let source = self.source.take().expect("bug: a lease ends once");
        let offset = self.offset;
        self.pending.upload.settle(Slot::Ready { source, offset });
    }

    /// The upload is complete (END or TRAILERS sent).
    pub fn finish(self) {
        self.end(UploadEnd::Finished);
    }

    /// The relay refuses the body: the user gets its status at once.
    pub fn fail(self, why: UploadFailure) {
        self.end(UploadEnd::Failed(why));
    }

    /// The upload broke (the user's side failed or left).
    pub fn break_off(self) {
        self.end(UploadEnd::Broken);
    }

    fn end(mut self, end: UploadEnd) {
        self.source = None;
        self.pending.upload.settle(Slot::Over(end));
    }
}

impl Drop for UploadLease {
    fn drop(&mut self) {
        if self.source.take().is_some() {
            self.pending.upload.settle(Slot::Over(UploadEnd::Broken));
        }
    }
}

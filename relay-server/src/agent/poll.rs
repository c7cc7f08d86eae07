//! One parked long poll: what it waits for (work for its name, cancel notices for its
//! agent, its deadline, the stop, its agent's revocation) and the bookkeeping its end does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use relay_common::gate::{gated, Gated};
use tokio::sync::futures::OwnedNotified;
use tokio_util::sync::CancellationToken;

use crate::agent::broker::{NameQueue, PollBatch};
use crate::agent::handout::Handout;
use crate::agent::registration::Agent;

/// One parked poll. Dropping it (answer sent or agent connection gone) records the time,
/// which starts the agent's grace period.
pub struct PollHandle {
    backend: Arc<NameQueue>,
    agent: Arc<Agent>,
}

impl PollHandle {
    pub(super) fn new(backend: Arc<NameQueue>, agent: Arc<Agent>) -> Self {
        PollHandle { backend, agent }
    }

    /// Waits for work: up to `max` requests, or cancel notices, or `deadline`/`stop`.
    /// `max == 0` only waits for cancel notices (the agent is at capacity or draining).
    pub async fn next(&self, max: usize, hold: Duration, stop: &CancellationToken) -> PollBatch {
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            if let Some(batch) = self.try_next(max) {
                return batch;
            }
            tokio::select! {
                _ = self.wait(max) => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.cancelled() => break,
                // Revoked: the poll ends without work.
                _ = self.agent.gone.cancelled() => break,
            }
        }
        PollBatch {
            requests: Vec::new(),
            claimed: Vec::new(),
            cancel: Vec::new(),
        }
    }

    /// Takes what is there now: up to `max` requests and the cancel notices, or `None`.
    pub fn try_next(&self, max: usize) -> Option<PollBatch> {
        let mut claimed = Vec::new();
        if max > 0 {
            self.backend.take(&self.agent, max, &mut claimed);
        }
        let cancel = std::mem::take(&mut self.agent.state.lock().expect("bug: poisoned").cancels);
        if claimed.is_empty() && cancel.is_empty() {
            return None;
        }
        // Another poll may be waiting for what is still queued.
        if max > 0 && !self.backend.queue.lock().expect("bug: poisoned").is_empty() {
            self.backend.work.notify_one();
        }
        let mut requests = Vec::with_capacity(claimed.len());
        let mut kept = Vec::with_capacity(claimed.len());
        for p in claimed {
            if let Some(head) = p.take_head() {
                requests.push(head);
                kept.push(p);
            }
        }
        Some(PollBatch {
            requests,
            claimed: kept,
            cancel,
        })
    }

    /// Returns when [`PollHandle::try_next`] may find something: a request was queued (only
    /// when `max > 0`) or a cancel notice came. Waits that end the poll (deadline, stop,
    /// revocation) are the caller's, so a session keeps them across its turns instead of
    /// registering them again for every request.
    pub async fn wait(&self, max: usize) {
        // Only polls that take work may register for work notifications: notify_one hands
        // its wake-up to one registered waiter, and a poll that would ignore it would
        // swallow the notification. (A registered waiter dropped after its wake-up passes
        // it on.)
        let work = (max > 0).then(|| self.backend.work.notified());
        let wake = self.agent.wake.notified();
        tokio::pin!(work, wake);
        if let Some(w) = work.as_mut().as_pin_mut() {
            w.enable();
        }
        wake.as_mut().enable();
        // Registered before this check: what comes after it wakes us.
        if self.agent.gone.is_cancelled() {
            return std::future::pending().await;
        }
        let queued = max > 0 && !self.backend.queue.lock().expect("bug: poisoned").is_empty();
        if queued
            || !self
                .agent
                .state
                .lock()
                .expect("bug: poisoned")
                .cancels
                .is_empty()
        {
            return;
        }
        tokio::select! {
            _ = async { work.as_mut().as_pin_mut().expect("bug: guarded by max").await }, if max > 0 => {}
            _ = &mut wake => {}
        }
    }

    /// Keeps a session's registrations for work and cancel notices standing for its next
    /// turn: made (and enabled) where missing or spent, the one for work only while the
    /// session takes work (`max > 0`, as in [`PollHandle::wait`]). Called before
    /// [`PollHandle::try_next`], so what is queued after that check wakes the session.
    pub fn stand(&self, s: &mut Standing, max: usize) {
        match (&mut s.work, max > 0) {
            (None, true) => {
                let mut g = gated(self.backend.work.clone().notified_owned());
                g.inner_mut().enable();
                s.work = Some(g);
            }
            (Some(g), true) if s.work_spent => {
                g.reset(self.backend.work.clone().notified_owned());
                g.inner_mut().enable();
            }
            // Dropped, a registration that got a wake-up passes it on to another poll.
            (Some(_), false) => s.work = None,
            _ => {}
        }
        s.work_spent = false;
        if s.wake_spent {
            s.wake.reset(self.agent.wake.clone().notified_owned());
            s.wake.inner_mut().enable();
            s.wake_spent = false;
        }
    }

    /// Fresh standing registrations for a session of this poll's agent.
    pub fn standing(&self) -> Standing {
        let mut wake = gated(self.agent.wake.clone().notified_owned());
        wake.inner_mut().enable();
        Standing {
            work: None,
            work_spent: false,
            wake,
            wake_spent: false,
        }
    }

    /// An empty record of requests handed out through this poll's name queue.
    pub fn handout(&self) -> Handout {
        Handout::new(self.backend.clone())
    }

    /// The agent behind this poll.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }
}

/// A session's registrations for work and cancel notices, kept across its turns (made
/// once per wake-up, not once per turn, and gated: polling them while nothing happened costs
/// no lock).
pub struct Standing {
    work: Option<Gated<OwnedNotified>>,
    work_spent: bool,
    wake: Gated<OwnedNotified>,
    wake_spent: bool,
}

impl Standing {
    /// Resolves when something may be there for [`PollHandle::try_next`].
    pub async fn fired(&mut self) {
        std::future::poll_fn(|cx| {
            let mut fired = false;
            if let Some(w) = &mut self.work {
                if Pin::new(w).poll(cx).is_ready() {
                    self.work_spent = true;
                    fired = true;
                }
            }
            if Pin::new(&mut self.wake).poll(cx).is_ready() {
                self.wake_spent = true;
                fired = true;
            }
            match fired {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for PollHandle {
    fn drop(&mut self) {
        let mut s = self.agent.state.lock().expect("bug: poisoned");
        s.polls -= 1;
        s.last_seen = Instant::now();
    }
}

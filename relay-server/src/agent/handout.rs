//! Requests handed to an agent whose delivery is not yet known. A request goes back to the
//! head of its queue when none of it reached the agent (the connection died before the
//! bytes were written), because it has had no effect yet; a request that may have reached
//! the agent is never handed out twice (no blind retries): it stays with that agent and
//! fails visibly if the agent is gone.
//!
//! Two carriers use it: a long poll's answer ([`PollAnswerBody`]: put back unless the body
//! reached its end, which an agent needs to read any of it) and a session (each OPEN frame
//! is marked with its end in the session's byte stream and put back if the writer never
//! got that far; OPENs are numbered, and the agent acknowledges how many it received, so
//! when it gives up on a session it can tell the server, from its next session, which
//! ones never arrived: see [`Parked`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use relay_common::message::RequestHead;

use crate::agent::broker::NameQueue;
use crate::agent::pending::Pending;
use crate::base::body::BodyError;

/// Handed-out requests, oldest first, each with a mark (where its delivery ends in the
/// carrier's stream), its number on the carrier and its head. Dropping it puts back every
/// request still in it.
pub struct Handout {
    queue: Arc<NameQueue>,
    items: VecDeque<Item>,
    /// Number of the next request pushed.
    next: u64,
}

struct Item {
    mark: u64,
    number: u64,
    pending: Arc<Pending>,
    head: RequestHead,
}

/// Most requests a session keeps for a resume; older ones are let go (they stay with the
/// agent, as without a resume). An agent acknowledges long before this.
const KEEP_MAX: usize = 4096;

impl Handout {
    pub(crate) fn new(queue: Arc<NameQueue>) -> Self {
        Handout {
            queue,
            items: VecDeque::new(),
            next: 0,
        }
    }

    /// Records `pending`, delivered once the carrier is past `mark`.
    pub fn push(&mut self, mark: u64, pending: Arc<Pending>, head: RequestHead) {
        let number = self.next;
        self.next += 1;
        self.items.push_back(Item {
            mark,
            number,
            pending,
            head,
        });
        if self.items.len() > KEEP_MAX {
            self.items.pop_front();
        }
    }

    /// Forgets the requests delivered: those marked at or before `upto`.
    pub fn delivered(&mut self, upto: u64) {
        while self.items.front().is_some_and(|i| i.mark <= upto) {
            self.items.pop_front();
        }
    }

    /// Forgets the first `n` requests (the agent received them), and ones at the front
    /// that are over.
    pub fn received(&mut self, n: u64) {
        while self
            .items
            .front()
            .is_some_and(|i| i.number < n || i.pending.done.is_cancelled())
        {
            self.items.pop_front();
        }
    }

    /// Forgets every request: all were delivered.
    pub fn delivered_all(&mut self) {
        self.items.clear();
    }

    /// Puts back the requests marked after `upto` now (they will never be written), and
    /// keeps the others. Dropping the handout puts back all that are left.
    pub fn put_back_after(&mut self, upto: u64) {
        while self.items.back().is_some_and(|i| i.mark > upto) {
            let i = self.items.pop_back().expect("bug: checked");
            self.queue.put_back(i.pending, i.head);
        }
    }

    /// Moves what is left into a [`Parked`], for the agent's next session to settle.
    pub fn park(&mut self) -> Parked {
        Parked(Some(Handout {
            queue: self.queue.clone(),
            items: std::mem::take(&mut self.items),
            next: self.next,
        }))
    }

    /// Requests not yet known to be delivered.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether every request was delivered.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl Drop for Handout {
    fn drop(&mut self) {
        // Newest first: each goes to the front, so the queue keeps their order.
        while let Some(i) = self.items.pop_back() {
            self.queue.put_back(i.pending, i.head);
        }
    }
}

/// The requests of a session that ended, written to it but not acknowledged by the agent:
/// they may have reached it or not. The agent's next session in the same slot says how
/// many OPENs it received on this one ([`Parked::resume`]): the rest never arrived (the
/// agent stopped reading that connection for good) and go back to the queue. Dropped
/// without a resume, they stay with the agent, which finishes them or fails them by going.
pub struct Parked(Option<Handout>);

impl Parked {
    /// The agent received `n` OPENs of the session: put back the others.
    pub fn resume(mut self, n: u64) {
        if let Some(mut h) = self.0.take() {
            h.received(n);
            let back = h.len();
            if back > 0 {
                tracing::debug!(
                    back,
                    "requests the agent never received go back to the queue"
                );
            }
            // Dropping the handout puts back what is left.
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(h) = &mut self.0 {
            h.delivered_all();
        }
    }
}

/// A long poll's answer. Its requests count as delivered only when the body reaches its
/// end; dropped before (the connection failed while it was written) they go back to the
/// queue. The answer has no declared length, so HTTP/1.1 sends it chunked (RFC 9112
/// §7.1): an agent cannot read an answer whose last chunk never came, so "not at the end"
/// means "not delivered". After the data the body yields once, waking itself, which lets
/// the connection flush the bytes first: a write to a dead connection then fails before
/// the end is reached.
pub struct PollAnswerBody {
    data: Option<Bytes>,
    flushed: bool,
    handout: Handout,
}

impl PollAnswerBody {
    /// `data`, delivering `handout`'s requests.
    pub fn new(data: Bytes, handout: Handout) -> Self {
        PollAnswerBody {
            data: Some(data),
            flushed: false,
            handout,
        }
    }
}

impl Body for PollAnswerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !this.flushed {
            this.flushed = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.handout.delivered_all();
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

//! Whole responses that come up a session, delivered into their requests' response sides
//! as a `/server/response` exchange would deliver them (`agent::response_side`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::FutureExt;
use relay_common::codec::BodyMsg;
use relay_common::message::{decode_headers, BodyKind};
use relay_common::session;

use crate::agent::pending::Pending;
use crate::agent::response_side::ResponseLease;
use crate::base::auth::Grant;
use crate::base::body::Whole;
use crate::base::budget::Held;
use crate::State;

/// Delivers one whole response. The common case (budget available, the user waiting)
/// completes at once, inside the session's loop: head, body and trailers go to the user
/// handler in one hand-over (no body channel, no task). A delivery that has to wait (the
/// memory budget is spent) finishes in a task of its own, so one slow request never holds
/// up the session's other requests.
/// The largest whole response body delivered without holding its size from the memory
/// budget. Below a request's own state on the relay-server (about 5 KiB of futures and
/// tables, bounded by the connection and stream limits, not by the budget) the budget's
/// account would cost more than it bounds: a hold and its release took three semaphore
/// updates, each under a lock, and two table updates, about 1 000 instructions of a small
/// request's 35 000. (A user who does not read cannot make such a body wait either: it
/// fits the socket's send buffer.)
const UNCOUNTED_WHOLE: usize = 4 * 1024;

pub(super) fn deliver_response(state: &Arc<State>, grant: &Grant, r: session::Response) {
    let Some(pending) = state.broker.lookup(&r.id, |n| grant.allows(n)) else {
        // Finished or cancelled meanwhile (its CANCEL may be on the way): nothing to do.
        tracing::debug!(id = r.id, "session response for a request that is over");
        return;
    };
    let streamed = r.head.body == BodyKind::Stream;
    let contradicts = streamed
        && r.head
            .content_length
            .is_some_and(|n| n != r.body.len() as u64);
    if r.head.status == 101 || contradicts {
        // A switch of protocols (a tunnel's bytes stream on) or a body that must be
        // failed after its head: the streamed path.
        let mut fut = Box::pin(deliver_streamed(pending, r));
        if (&mut fut).now_or_never().is_none() {
            state.agent_sessions.spawn(fut);
        }
        return;
    }
    let trailers = match r.trailers.as_ref().map(|t| decode_headers(&t.headers)) {
        None => None,
        Some(Ok(t)) => Some(Box::new(t)),
        Some(Err(e)) => {
            tracing::debug!(id = r.id, error = %e, "bad trailers in a session response");
            if let Some(lease) = ready_lease(&pending, &r.id) {
                lease.protocol_error();
            }
            return;
        }
    };
    let needs = match streamed {
        true if r.body.len() > UNCOUNTED_WHOLE => r.body.len(),
        _ => 0,
    };
    if needs == 0 {
        return hand_over(&pending, r, trailers, None);
    }
    if let Some(held) = pending.account().try_hold(needs) {
        return hand_over(&pending, r, trailers, Some(held));
    }
    state.agent_sessions.spawn(async move {
        let held = tokio::select! {
            h = pending.account().hold(needs) => h,
            _ = pending.done.cancelled() => return,
        };
        hand_over(&pending, r, trailers, Some(held));
    });
}

/// The request's response side, ready for the head of a response that came on the
/// session; `None` when an exchange holds it, or (reported as a protocol error) when a
/// head or bytes already went.
fn ready_lease(pending: &Pending, id: &str) -> Option<ResponseLease> {
    let Some(lease) = pending.response.lease() else {
        tracing::debug!(id, "session response while an exchange holds the response");
        return None;
    };
    if lease.offset() != 0 || !lease.awaiting_head() {
        lease.protocol_error();
        return None;
    }
    Some(lease)
}

/// Hands a complete response to the user handler at once: its bytes hold `held` of the
/// budget until hyper takes them.
fn hand_over(
    pending: &Pending,
    r: session::Response,
    trailers: Option<Box<http::HeaderMap>>,
    held: Option<Held>,
) {
    let Some(mut lease) = ready_lease(pending, &r.id) else {
        return;
    };
    if r.head.body != BodyKind::Stream {
        // No body follows (a HEAD request, 204, 304): the head is all.
        let _ = lease.head(r.head);
        return;
    }
    let len = r.body.len() as u64;
    let whole = Whole {
        data: r.body,
        held,
        trailers,
    };
    if lease.whole(r.head, whole).is_ok() {
        pending.download_bytes.fetch_add(len, Ordering::Relaxed);
    }
}

/// Delivers a 101 or a response whose body contradicts its length through the body
/// channel, as an exchange would: the head, then the bytes or the abort.
async fn deliver_streamed(pending: Arc<Pending>, r: session::Response) {
    let Some(mut lease) = ready_lease(&pending, &r.id) else {
        return;
    };
    let trailers = match r.trailers.map(|t| decode_headers(&t.headers)).transpose() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(id = r.id, error = %e, "bad trailers in a session response");
            lease.protocol_error();
            return;
        }
    };
    let declared = r.head.content_length;
    let has_body = match lease.head(r.head) {
        Ok(b) => b,
        Err(_) => return,
    };
    if !has_body {
        return;
    }
    if declared.is_some_and(|n| n != r.body.len() as u64) {
        // A whole response whose length contradicts its head: fail it, never pass on a
        // body that looks complete and is not.
        let _ = lease
            .end(BodyMsg::Abort(
                "the body does not match its Content-Length".into(),
            ))
            .await;
        return;
    }
    if !r.body.is_empty() {
        let len = r.body.len();
        let held = tokio::select! {
            h = pending.account().hold(len) => h,
            _ = pending.done.cancelled() => return,
        };
        if lease.data(r.body, held).await.is_err() {
            return;
        }
        pending
            .download_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
    }
    let last = match trailers {
        Some(t) => BodyMsg::Trailers(Box::new(t)),
        None => BodyMsg::End,
    };
    let _ = lease.end(last).await;
}

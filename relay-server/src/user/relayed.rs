//! A prepared request queued for an agent, and the agent's answer turned into the user's
//! response: its head, its streamed body, or a switch to a tunnel.

use std::sync::Arc;

use futures_util::future::Either;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop, upgrade_matches};
use relay_common::id::RequestId;
use relay_common::message::{BodyKind, RequestHead};
use tokio::sync::oneshot;

use crate::agent::pending::{Deadlines, Interrupt, Pending, Pickup};
use crate::agent::response_side::ResponseStart;
use crate::agent::upload_side::{UploadFailure, UploadSide};
use crate::base::body::{empty, RelayBody, RelayedBody, WholeBody};
use crate::base::budget::LazyAccount;
use crate::base::revocation::{revoked, Admission};
use crate::user::error::RelayError;
use crate::user::prepare::Prepared;
use crate::State;

/// Queues a prepared request for `backend`'s agents and turns their answer into the
/// response: queue → claimed by a poll → response head → the user's response.
///
/// The request is queued at once, when the future is made, and the future keeps only what
/// the wait needs ([`Queued`]): an `async` block that took the [`Prepared`] (440 bytes)
/// would keep its slot for the whole wait although the request moved on at the start, and
/// every request in flight is such a future (a burst holds 10 000 of them).
#[inline(always)] // the future it returns built in place, not copied out (see `handle`)
pub fn dispatch(
    state: &Arc<State>,
    backend: &Arc<crate::agent::broker::NameQueue>,
    p: Prepared,
) -> impl std::future::Future<Output = Result<Response<RelayBody>, RelayError>> + Send + 'static {
    match queue(state, backend, p) {
        Ok(q) => Either::Left(answer(state.clone(), q)),
        Err(e) => Either::Right(std::future::ready(Err(e))),
    }
}

/// A request in its agents' queue, and what its answer needs.
struct Queued {
    pending: Arc<Pending>,
    /// Frees the request when the answer (or its body) is over.
    guard: crate::agent::pending::PendingGuard,
    head_rx: oneshot::Receiver<ResponseStart>,
    /// Told of the claim: only a traced request (see [`wait_for_head`]).
    claimed: Option<oneshot::Receiver<()>>,
    upgrade: Option<String>,
    on_upgrade: Option<crate::base::switch::Switch>,
    admission: Option<Arc<Admission>>,
    name: String,
    arrival: tokio::time::Instant,
    response_timeout: std::time::Duration,
    is_head: bool,
}

/// Queues `p` for `backend`'s agents.
fn queue(
    state: &Arc<State>,
    backend: &Arc<crate::agent::broker::NameQueue>,
    p: Prepared,
) -> Result<Queued, RelayError> {
    let is_head = p.method == Method::HEAD;
    let (name, arrival) = (p.name.clone(), p.arrival);
    let response_timeout = match p.upgrade {
        Some(_) => state.cfg.upgrade_response_timeout,
        None => state.cfg.response_timeout,
    };
    let admission = p.admission.clone();
    // Spans of the two waits, only when traces are exported: the logs never use them, and
    // each span is a registry allocation per request.
    let traced = relay_config_file::telemetry::enabled();
    let deadlines = Deadlines {
        pickup: std::time::Instant::now() + state.cfg.pickup_timeout,
        response: arrival.into_std() + response_timeout,
    };
    let (pending, head_rx, upgrade, on_upgrade) = request(state, p, deadlines);
    // Only a traced request learns of its claim as it happens (to end its pickup span):
    // for the others a claim wakes nobody.
    let (claim_tx, claimed) = match traced {
        true => {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let guard = state.broker.enqueue(backend, pending, claim_tx)?;
    let pending = guard.pending().clone();
    // Queued after the broker told every request of the stop (listener::drain): the
    // broker's table held it first, so either its sweep saw it or this check sees the stop.
    if state.stop.is_cancelled() {
        pending.stop();
    }
    Ok(Queued {
        pending,
        guard,
        head_rx,
        claimed,
        upgrade,
        on_upgrade,
        admission,
        name,
        arrival,
        response_timeout,
        is_head,
    })
}

/// The answer to a queued request. Not an `async fn` (it would keep `q` twice), and `q`'s
/// fields are used in place until the head came.
#[allow(clippy::manual_async_fn)] // the arguments once, not twice (see above)
#[inline(always)] // the future it returns built in place, not copied out (see `handle`)
fn answer(
    state: Arc<State>,
    mut q: Queued,
) -> impl std::future::Future<Output = Result<Response<RelayBody>, RelayError>> + Send + 'static {
    async move {
        let start = wait_for_head(
            &q.pending,
            &mut q.head_rx,
            &mut q.claimed,
            q.admission.as_deref(),
            q.response_timeout,
            &q.name,
        );
        let start = start.await;
        let Queued {
            pending,
            guard,
            upgrade,
            on_upgrade,
            admission,
            arrival,
            is_head,
            ..
        } = q;
        if let Some(waited) = pending.picked_after() {
            state.metrics.pickup(waited);
        }
        let (mut head, body_rx, whole) = match start? {
            ResponseStart::Head(head, rx) => (head, rx, None),
            ResponseStart::Whole(head, whole) => (head, None, Some(whole)),
            ResponseStart::Abort(why) => {
                return Err(RelayError::Agent(format!("the relay-client failed: {why}")))
            }
        };
        // The agent that answered holds the request (one put back holds it again once taken).
        let agent = pending
            .claimed_by()
            .ok_or_else(|| RelayError::Agent("the relay-client disconnected".into()))?;
        state.metrics.head(arrival.elapsed());
        let mut resp_headers = head
            .headers
            .take_map()
            .map_err(|e| RelayError::Agent(format!("the relay-client sent an {e}")))?;
        if head.status == 101 {
            let tunnel = Tunnel {
                requested: upgrade,
                on_upgrade,
                body_rx,
                guard,
                agent,
                admission,
            };
            return switch(&state, resp_headers, tunnel);
        }
        strip_hop_by_hop(&mut resp_headers, false);
        let status = StatusCode::from_u16(head.status)
            .ok()
            .filter(|s| s.as_u16() >= 200)
            .ok_or_else(|| {
                RelayError::Backend(format!(
                    "the backend answered status {} to a request that did not ask to upgrade",
                    head.status
                ))
            })?;
        // RFC 9110 §8.6: a HEAD or 304 response may carry the length the body would have had.
        // A body's own length needs no field: the body's exact size (below) makes hyper write
        // `Content-Length` (HTTP/1.1 and HTTP/2 alike), without a map insert per response.
        if let Some(n) = head.content_length {
            if is_head || status == StatusCode::NOT_MODIFIED {
                resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        let body = match (body_rx, whole) {
            (Some(rx), _) => {
                RelayedBody::new(rx, head.content_length, agent.gone.clone(), guard).boxed_unsync()
            }
            (None, Some(whole)) => WholeBody::new(whole, head.content_length, guard).boxed_unsync(),
            (None, None) => {
                drop(guard);
                empty()
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = resp_headers;
        Ok(resp)
    }
}

/// Waits for the response head: one wait from the queue to the head, so the claim between
/// them wakes nobody (`claimed` is set only for a traced request, whose pickup span ends at
/// the claim). The pickup timeout applies until an agent takes the request, the response
/// timeout after (both in the request's [`Deadlines`], which the broker's sweep watches:
/// no timer per request); draining refuses only requests no agent took.
async fn wait_for_head(
    pending: &Arc<Pending>,
    head_rx: &mut oneshot::Receiver<ResponseStart>,
    claimed: &mut Option<oneshot::Receiver<()>>,
    admission: Option<&Admission>,
    response_timeout: std::time::Duration,
    name: &str,
) -> Result<ResponseStart, RelayError> {
    let traced = claimed.is_some();
    let wait_span = |what: &'static str| match traced {
        true => tracing::info_span!("wait", otel.name = what, backend = %name),
        false => tracing::Span::none(),
    };
    let mut span = wait_span("pickup");
    let mut stop_seen = false;
    loop {
        tokio::select! {
            // In this order, not from a random start (a draw at every poll): the head is
            // what usually comes, and every other branch ends the wait or marks a state.
            biased;
            r = &mut *head_rx => {
                // The claim and the head can be ready in one poll, and the head's branch
                // goes first: a traced request still shows its (then short) wait for the
                // head, so its trace has the same shape every time.
                if claimed.is_some() {
                    drop(span);
                    span = wait_span("response head");
                }
                drop(span);
                return r.map_err(|_| RelayError::Agent(
                    "the relay-client failed before sending a response head".into()));
            }
            _ = async { claimed.as_mut().expect("only polled when set").await }, if claimed.is_some() => {
                *claimed = None;
                span = wait_span("response head");
            }
            // The agent holding the request was declared gone (a request put back and taken
            // by another agent follows that one), the relay stopped, or a deadline passed.
            why = pending.interrupted(stop_seen, true) => match why {
                Interrupt::ClaimerLost => {
                    return Err(RelayError::Agent("the relay-client disconnected".into()));
                }
                // A request an agent took is answered during the drain.
                Interrupt::Stopped if pending.pickup() != Pickup::Taken => {
                    return Err(RelayError::Draining);
                }
                Interrupt::Stopped => stop_seen = true,
                Interrupt::Overdue => {
                    let now = std::time::Instant::now();
                    let at = pending.deadlines();
                    match pending.pickup() {
                        Pickup::Waiting | Pickup::Over if now >= at.pickup => {
                            return Err(RelayError::PickupTimeout(name.to_owned()));
                        }
                        Pickup::Taken if now >= at.response => {
                            // Which agent holds it and where its response stands: what an
                            // operator needs to tell a slow backend from a request lost on
                            // the way.
                            tracing::warn!(
                                id = %pending.id,
                                name,
                                agent = pending.claimed_by().as_deref().map_or("none", |a| a.id.as_str()),
                                response = pending.response.describe(),
                                "no response head within the response timeout (504)"
                            );
                            return Err(RelayError::ResponseTimeout(response_timeout));
                        }
                        // Taken since the sweep looked: the response deadline applies now.
                        _ => {}
                    }
                }
            },
            why = pending.upload.failed() => return Err(refused_upload(why)),
            _ = revoked(admission) => return Err(credential_revoked()),
        }
    }
}

/// The request in flight for `p`, with a fresh id (tagged with this replica in cluster
/// mode), where its response head will arrive, and its upgrade, if any.
fn request(
    state: &State,
    p: Prepared,
    deadlines: Deadlines,
) -> (
    Arc<Pending>,
    oneshot::Receiver<ResponseStart>,
    Option<String>,
    Option<crate::base::switch::Switch>,
) {
    let body_kind = match p.body {
        Some(_) => BodyKind::Stream,
        None => BodyKind::Empty,
    };
    let id = match &state.cluster {
        Some(c) => RequestId::tagged(c.tag()),
        None => RequestId::random(),
    };
    if p.spanned {
        tracing::Span::current().record("id", tracing::field::display(id));
    }
    let head = RequestHead {
        id: id.to_hex_string(),
        method: p.method.as_str().to_owned(),
        target: p.target,
        // The map goes as it is: a session encodes it straight into the OPEN frame, a long
        // poll's JSON lists it (`Fields`' `Serialize`).
        headers: p.headers,
        body: body_kind,
        content_length: p.content_length.filter(|_| body_kind == BodyKind::Stream),
        upgrade: p.upgrade.clone(),
    };
    let upload = match p.body {
        Some(body) => UploadSide::body(body),
        None if p.upgrade.is_some() => UploadSide::awaiting_upgrade(),
        None => UploadSide::none(),
    };
    let (head_tx, head_rx) = oneshot::channel();
    let account = LazyAccount::new(state.budget.clone(), p.client);
    // Built in its `Arc` here: a `Pending` is 672 bytes, copied at each move by value.
    let pending = Arc::new(Pending::new(
        id, p.name, head, upload, head_tx, account, deadlines,
    ));
    (pending, head_rx, p.upgrade, p.on_upgrade)
}

/// The user's answer when the credential that admitted the request was revoked while it
/// waited.
fn credential_revoked() -> RelayError {
    RelayError::Access(crate::user::access::AccessError::Forbidden(
        "the credential that admitted this request was revoked".into(),
    ))
}

/// The user's status for a body the relay refused.
fn refused_upload(why: UploadFailure) -> RelayError {
    match why {
        UploadFailure::TooLarge(n) => RelayError::PayloadTooLarge(n),
        UploadFailure::Stalled(d) => RelayError::UploadStalled(d),
        UploadFailure::Malformed => {
            RelayError::BadRequest("the request body's framing is malformed".into())
        }
    }
}

/// What a switch to a tunnel takes over from the request.
struct Tunnel {
    /// The protocol the user asked for.
    requested: Option<String>,
    /// The user connection's switch.
    on_upgrade: Option<crate::base::switch::Switch>,
    /// Backend→user bytes.
    body_rx: Option<crate::base::queue::Receiver<crate::base::body::Delivery>>,
    /// Frees the request when the tunnel ends.
    guard: crate::agent::pending::PendingGuard,
    /// The agent carrying it.
    agent: Arc<crate::agent::registration::Agent>,
    /// The registration of the credential that admitted it, if one did.
    admission: Option<Arc<Admission>>,
}

/// Answers 101 and hands the connection to a tunnel, if the user asked for exactly this
/// switch (RFC 9110 §15.2.2: the server switches to one of the protocols in `Upgrade`).
/// Otherwise the 101 is a protocol violation of the backend: 502, no tunnel.
fn switch(
    state: &Arc<State>,
    mut headers: HeaderMap,
    t: Tunnel,
) -> Result<Response<RelayBody>, RelayError> {
    let answered = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (Some(requested), Some(on_upgrade)) = (t.requested, t.on_upgrade) else {
        return Err(RelayError::Backend(
            "the backend answered 101 to a request that did not ask to upgrade".into(),
        ));
    };
    if !upgrade_matches(&requested, &answered) {
        return Err(RelayError::Backend(format!(
            "the backend switched to {answered:?}, which the user did not ask for"
        )));
    }
    strip_hop_by_hop(&mut headers, false);
    set_upgrade_headers(&mut headers, &answered);
    state.tunnels.spawn(crate::user::tunnel::bridge(
        on_upgrade,
        t.body_rx,
        t.guard,
        t.agent.gone.clone(),
        t.admission,
        crate::user::tunnel::Limits {
            idle: state.cfg.tunnel_idle_timeout,
            write: state.cfg.user_write_timeout,
        },
        state.stop.clone(),
    ));
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    Ok(resp)
}

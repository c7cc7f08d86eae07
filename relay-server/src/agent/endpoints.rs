//! The agent side: `/server/request` (long poll), `/server/response` (response exchanges) and
//! `/server/requeststream` (upload exchanges). Every call is authenticated, and every id is
//! checked against the names the caller's token may serve.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use relay_common::codec::{BodyMsg, FrameReader, Message};
use relay_common::message::{BodyKind, PollAnswer};
use relay_common::name::is_valid_name;
use relay_common::AGENT_ID_HEADER;
use relay_common::{BODY_CHANNEL_DEPTH, MAX_POLL_BATCH};
use tokio::sync::mpsc;

use crate::agent::broker::AgentInfo;
use crate::agent::error::AgentCallError;
use crate::agent::pending::{Pending, ResponseSink, ResponseStart, UploadSlot, UploadSource};
use crate::agent::upload::{UploadExchange, UploadLimits};
use crate::base::auth::Grant;
use crate::base::body::text_response;
use crate::base::body::{full, Delivery, RelayBody};
use crate::State;

/// Authenticates an agent call by its token or client certificate.
pub fn authenticate(
    state: &State,
    req: &Request<Incoming>,
    cert: Option<&Grant>,
) -> Result<Grant, AgentCallError> {
    state
        .auth()
        .tokens
        .authenticate_agent(req.headers(), cert)
        .map_err(|e| {
            state.metrics.auth_failure("agent");
            AgentCallError::Unauthenticated(e.to_string())
        })
}

/// The request an exchange call (`/server/response`, `/server/requeststream`) is about,
/// when its id is well-formed (in cluster mode its tag names the replica that owns it).
pub fn exchange_id(req: &Request<Incoming>) -> Option<relay_common::id::RequestId> {
    match req.uri().path() {
        "/server/response" | "/server/requeststream" => {
            Query::parse(req.uri().query().unwrap_or(""))
                .id
                .and_then(relay_common::id::RequestId::parse)
        }
        _ => None,
    }
}

/// Serves an authenticated agent call (`grant` says which names the caller may serve).
pub async fn serve(
    state: Arc<State>,
    grant: Grant,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<RelayBody> {
    let uri = req.uri().clone();
    let query = Query::parse(uri.query().unwrap_or(""));
    match uri.path() {
        "/server/request" => poll(state, grant, &req, query, peer).await,
        "/server/response" => response(state, grant, req, query).await,
        "/server/requeststream" => request_stream(state, grant, query).await,
        // Answered before its body is read: an agent that gets this answer while its
        // streaming body is still open knows nothing in between buffers request bodies.
        "/server/probe" => text_response(StatusCode::OK, "streaming"),
        _ => text_response(StatusCode::NOT_FOUND, "no such agent endpoint"),
    }
}

/// The query parameters agent calls use. Values are never percent-decoded: names and ids
/// are restricted to characters that need no escaping.
#[derive(Default)]
struct Query<'a> {
    server: Option<&'a str>,
    id: Option<&'a str>,
    offset: Option<u64>,
    max: Option<u64>,
    draining: bool,
}

impl<'a> Query<'a> {
    fn parse(q: &'a str) -> Self {
        let mut out = Query::default();
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "server" => out.server = Some(v),
                "id" => out.id = Some(v),
                "offset" => out.offset = v.parse().ok(),
                "max" => out.max = v.parse().ok(),
                "draining" => out.draining = v == "1" || v == "true",
                _ => {}
            }
        }
        out
    }
}

fn unknown_id() -> Response<RelayBody> {
    // Same answer for an id that never existed, has finished, or belongs to a name the
    // caller may not serve: nothing about other names can be learned from it.
    text_response(StatusCode::NOT_FOUND, "unknown request id")
}

fn lookup(state: &State, grant: &Grant, id: Option<&str>) -> Option<Arc<Pending>> {
    state.broker.lookup(id?, |name| grant.allows(name))
}

async fn poll(
    state: Arc<State>,
    grant: Grant,
    req: &Request<Incoming>,
    q: Query<'_>,
    peer: std::net::SocketAddr,
) -> Response<RelayBody> {
    let Some(name) = q.server.filter(|n| is_valid_name(n)) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "missing or invalid server query parameter (a backend name)",
        );
    };
    if !grant.allows(name) {
        state.metrics.auth_failure("agent");
        return text_response(
            StatusCode::FORBIDDEN,
            &format!("this token may not serve backend {name:?}"),
        );
    }
    let Some(agent_id) = req
        .headers()
        .get(AGENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
    else {
        return text_response(StatusCode::BAD_REQUEST, "missing X-Relay-Agent-Id header");
    };
    let draining = q.draining || state.draining();
    let max = if draining {
        0
    } else {
        q.max.unwrap_or(1).min(MAX_POLL_BATCH as u64) as usize
    };
    let handle = state
        .broker
        .begin_poll(name, agent_id, q.draining, || AgentInfo {
            addr: peer.ip().to_string(),
            version: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .chars()
                .take(64)
                .collect(),
        });
    let batch = handle.next(max, state.cfg.poll_timeout, &state.stop).await;
    drop(handle);
    if batch.requests.is_empty() && batch.cancel.is_empty() {
        return no_store(Response::builder().status(StatusCode::NO_CONTENT))
            .body(full(Bytes::new()))
            .expect("bug: static response");
    }
    let answer = PollAnswer {
        requests: batch.requests,
        cancel: batch.cancel.iter().map(|id| id.to_string()).collect(),
    };
    let json = serde_json::to_vec(&answer).expect("bug: poll answers always serialise");
    no_store(Response::builder())
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(json)))
        .expect("bug: static response")
}

fn no_store(b: http::response::Builder) -> http::response::Builder {
    b.header(header::CACHE_CONTROL, "no-store")
}

/// How long an upload exchange of an upgrade request waits for the 101 to reach the user.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

enum Take {
    Taken(UploadSource, u64),
    Wait,
    Refused(StatusCode, String),
}

fn take_upload(pending: &Pending, offset: Option<u64>) -> Take {
    let mut slot = pending.upload.lock().expect("bug: poisoned");
    match std::mem::replace(&mut *slot, UploadSlot::InUse) {
        UploadSlot::Ready { source, offset: at } if Some(at) == offset => Take::Taken(source, at),
        other => {
            let outcome = match &other {
                UploadSlot::Ready { offset, .. } => Take::Refused(
                    StatusCode::CONFLICT,
                    format!("offset mismatch: the next upload byte is {offset}"),
                ),
                UploadSlot::AwaitingUpgrade => Take::Wait,
                UploadSlot::InUse => Take::Refused(
                    StatusCode::CONFLICT,
                    "another upload exchange is in progress".into(),
                ),
                UploadSlot::NoBody => {
                    Take::Refused(StatusCode::GONE, "the request has no body".into())
                }
                UploadSlot::Finished => Take::Refused(
                    StatusCode::GONE,
                    "the request body was already delivered".into(),
                ),
                UploadSlot::Broken => Take::Refused(
                    StatusCode::GONE,
                    "the request body was lost in a cut exchange".into(),
                ),
            };
            *slot = other;
            outcome
        }
    }
}

async fn request_stream(state: Arc<State>, grant: Grant, q: Query<'_>) -> Response<RelayBody> {
    let Some(pending) = lookup(&state, &grant, q.id) else {
        return unknown_id();
    };
    let deadline = tokio::time::Instant::now() + UPGRADE_WAIT;
    let (source, offset) = loop {
        let ready = pending.upload_ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        match take_upload(&pending, q.offset) {
            Take::Taken(source, offset) => break (source, offset),
            Take::Refused(status, msg) => return text_response(status, &msg),
            // An upgrade whose 101 has not reached the user yet: wait for the switch.
            Take::Wait => tokio::select! {
                _ = &mut ready => {}
                _ = pending.done.cancelled() => return unknown_id(),
                _ = tokio::time::sleep_until(deadline) => {
                    return text_response(StatusCode::CONFLICT, "the connection was not switched");
                }
            },
        }
    };
    let max = q.max.unwrap_or(u64::MAX).max(1);
    let limits = UploadLimits {
        max_body: state.cfg.max_request_body,
        inactivity: state.cfg.upload_inactivity_timeout,
    };
    let exchange = UploadExchange::new(
        pending,
        source,
        offset,
        max,
        state.cfg.exchange_idle,
        limits,
    );
    no_store(Response::builder())
        .header(header::CONTENT_TYPE, "application/x-relay-frames")
        // nginx passes this response on as it arrives instead of buffering it.
        .header("x-accel-buffering", "no")
        .body(exchange.boxed_unsync())
        .expect("bug: static response")
}

/// Owns the response sink for one exchange; if the exchange ends without CONTINUE or a
/// final frame (agent connection cut, bad frame), the request is aborted on the user side.
struct ExchangeGuard {
    sink: tokio::sync::OwnedMutexGuard<ResponseSink>,
    clean: bool,
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        if !self.clean {
            // Dropping the senders makes the user side answer 502 (no head yet) or abort
            // the body (head sent).
            self.sink.head_tx = None;
            self.sink.body_tx = None;
        }
    }
}

/// Why an exchange stopped early; the agent learns it from the status.
enum ExchangeError {
    Gone,
    Protocol(String),
}

async fn response(
    state: Arc<State>,
    grant: Grant,
    req: Request<Incoming>,
    q: Query<'_>,
) -> Response<RelayBody> {
    let Some(pending) = lookup(&state, &grant, q.id) else {
        return unknown_id();
    };
    let Ok(sink) = pending.response.clone().try_lock_owned() else {
        return text_response(
            StatusCode::CONFLICT,
            "another response exchange is in progress",
        );
    };
    let mut guard = ExchangeGuard { sink, clean: false };
    if Some(guard.sink.offset) != q.offset {
        // A gap or a duplicate: the body can no longer be delivered intact, so the guard
        // (not clean) aborts the user's response rather than let it hang.
        let msg = format!(
            "offset mismatch: the next response byte is {}",
            guard.sink.offset
        );
        pending.agent_finished.store(true, Ordering::Release);
        return text_response(StatusCode::CONFLICT, &msg);
    }
    let body = req.into_body();
    let result = tokio::select! {
        r = run_exchange(&mut guard, body, &state.budget, &pending.download_bytes) => r,
        _ = pending.done.cancelled() => Err(ExchangeError::Gone),
    };
    match result {
        Ok(done) => {
            guard.clean = true;
            if done {
                pending.agent_finished.store(true, Ordering::Release);
            }
            text_response(StatusCode::OK, "ok")
        }
        Err(ExchangeError::Gone) => {
            guard.clean = true;
            text_response(StatusCode::GONE, "the user went away; cancel the request")
        }
        Err(ExchangeError::Protocol(msg)) => {
            pending.agent_finished.store(true, Ordering::Release);
            text_response(StatusCode::BAD_REQUEST, &msg)
        }
    }
}

/// Runs one exchange; `Ok(true)` when the response is complete, `Ok(false)` on CONTINUE.
async fn run_exchange(
    guard: &mut ExchangeGuard,
    body: Incoming,
    budget: &crate::base::budget::Budget,
    downloaded: &std::sync::atomic::AtomicU64,
) -> Result<bool, ExchangeError> {
    let sink = &mut *guard.sink;
    let mut reader = FrameReader::new(body);
    loop {
        let msg = reader
            .next()
            .await
            .map_err(|e| ExchangeError::Protocol(e.to_string()))?;
        match msg {
            Message::Head(head) => {
                let head_tx = sink
                    .head_tx
                    .take()
                    .ok_or_else(|| ExchangeError::Protocol("HEAD sent twice".into()))?;
                let rx = if head.body == BodyKind::Stream {
                    let (tx, rx) = mpsc::channel(BODY_CHANNEL_DEPTH);
                    sink.body_tx = Some(tx);
                    Some(rx)
                } else {
                    None
                };
                let empty = rx.is_none();
                head_tx
                    .send(ResponseStart::Head(head, rx))
                    .map_err(|_| ExchangeError::Gone)?;
                if empty {
                    return Ok(true);
                }
            }
            Message::Body(BodyMsg::Data(bytes)) => {
                let len = bytes.len() as u64;
                // Waits while the global budget is spent (the caller gives up when the
                // user leaves).
                let held = Some(budget.hold(bytes.len()).await);
                let msg = BodyMsg::Data(bytes);
                deliver(sink, Delivery { msg, held }).await?;
                sink.offset += len;
                downloaded.fetch_add(len, Ordering::Relaxed);
            }
            Message::Body(BodyMsg::Abort(why)) => {
                if let Some(tx) = sink.head_tx.take() {
                    let _ = tx.send(ResponseStart::Abort(why));
                } else {
                    let _ = deliver(sink, BodyMsg::Abort(why).into()).await;
                }
                sink.body_tx = None;
                return Ok(true);
            }
            // END or TRAILERS.
            Message::Body(last) => {
                deliver(sink, last.into()).await?;
                sink.body_tx = None;
                return Ok(true);
            }
            // Also valid before HEAD: the agent has nothing to say yet.
            Message::Continue => return Ok(false),
        }
    }
}

async fn deliver(sink: &mut ResponseSink, msg: Delivery) -> Result<(), ExchangeError> {
    let tx = sink
        .body_tx
        .as_ref()
        .ok_or_else(|| ExchangeError::Protocol("body frame without a streamed HEAD".into()))?;
    tx.send(msg).await.map_err(|_| ExchangeError::Gone)
}

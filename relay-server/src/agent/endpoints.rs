//! The agent endpoints: authentication, `/server/request` (the long poll) and the routing
//! of exchange calls to [`response`] and [`upload`]. Every call is authenticated, every id
//! is checked against the names the caller's token may serve, and each endpoint's future
//! is boxed on its own ([`Call`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use relay_common::message::PollAnswer;
use relay_common::name::is_valid_name;
use relay_common::{AGENT_ID_HEADER, MAX_POLL_BATCH};

use crate::agent::error::AgentCallError;
use crate::agent::handout::PollAnswerBody;
use crate::agent::pending::Pending;
use crate::agent::poll::PollHandle;
use crate::agent::registration::{AgentInfo, AgentProtocol};
use crate::agent::{response, session, tunnel, upload, v1alpha1};
use crate::base::auth::{AuthError, Grant};
use crate::base::body::{full, text_response, RelayBody};
use crate::State;

/// An agent call's handler, boxed on its own. hyper keeps a request's future for as long as
/// the request runs, and a parked poll runs for minutes: boxed per endpoint, a call holds
/// only its own endpoint's state, not the largest endpoint's (a parked poll held 4.4 KB
/// when all of them shared one `async fn`).
pub type Call = Pin<Box<dyn Future<Output = Response<RelayBody>> + Send>>;

/// What an agent call's credentials prove by themselves.
pub enum Verdict {
    /// Its token or client certificate grants these names.
    Granted(Grant),
    /// Neither proves anything, and the agents' authorization service decides
    /// ([`ask_service`]).
    AskService,
}

/// The verdict on an agent call, at once, from what its token or client certificate proved
/// (`local`, `TokenStore::authenticate_agent`'s answer).
pub fn verdict(state: &State, local: Result<Grant, AuthError>) -> Result<Verdict, AgentCallError> {
    match local {
        Ok(grant) => Ok(Verdict::Granted(grant)),
        Err(_) if state.auth().agent_forward_auth.is_some() => Ok(Verdict::AskService),
        Err(e) => {
            state.metrics.auth_failure("agent");
            Err(AgentCallError::Unauthenticated(e.to_string()))
        }
    }
}

/// The verdict of the agents' authorization service on a call its credentials did not
/// prove ([`Verdict::AskService`]).
pub async fn ask_service(
    state: &State,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Grant, AgentCallError> {
    let auth = state.auth();
    let Some(service) = &auth.agent_forward_auth else {
        // Unset by a reload since the call came in.
        state.metrics.auth_failure("agent");
        return Err(AgentCallError::Unauthenticated(
            "no valid agent credential".into(),
        ));
    };
    service.check(headers, peer).await.inspect_err(|e| {
        if !matches!(e, AgentCallError::AuthService(_)) {
            state.metrics.auth_failure("agent");
        }
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

/// Serves an authenticated agent call (`grant` says which names the caller may serve). The
/// endpoint is chosen, and the checks that need no wait are made, at once; what waits is
/// the endpoint's own future.
pub fn serve(
    state: Arc<State>,
    grant: Grant,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Call {
    if v1alpha1::is_v1alpha1(&req) {
        return v1alpha1::serve(state, grant, req, peer);
    }
    let uri = req.uri().clone();
    let query = Query::parse(uri.query().unwrap_or(""));
    match uri.path() {
        "/server/request" => serve_poll(state, grant, req, peer),
        relay_common::session::SESSION_PATH => now(session::serve(state, grant, req, peer)),
        "/server/response" => match lookup(&state, &grant, query.id) {
            Ok(pending) => later(response::serve(pending, req, query.offset)),
            Err(e) => now(Err(e)),
        },
        "/server/requeststream" => match lookup(&state, &grant, query.id) {
            Ok(pending) => {
                let (offset, max) = (query.offset, query.max);
                later(async move { upload::serve(&state, pending, offset, max).await })
            }
            Err(e) => now(Err(e)),
        },
        relay_common::tunnel::TUNNEL_PATH => now(lookup(&state, &grant, query.id)
            .and_then(|pending| tunnel::serve(&state, pending, req))),
        // Answered before its body is read: an agent that gets this answer while its
        // streaming body is still open knows nothing in between buffers request bodies.
        "/server/probe" => now(Ok(text_response(StatusCode::OK, "streaming"))),
        _ => now(Err(AgentCallError::NoEndpoint)),
    }
}

/// Serves an authenticated long poll (`/server/request`, either protocol): checked and
/// registered at once; the call is the wait, which holds neither the request nor its body
/// type (the relay's own HTTP/1.1 front serves polls too, see `crate::front`).
pub fn serve_poll<B>(
    state: Arc<State>,
    grant: Grant,
    req: Request<B>,
    peer: std::net::SocketAddr,
) -> Call {
    if v1alpha1::is_v1alpha1(&req) {
        return v1alpha1::serve_poll(state, grant, &req, peer);
    }
    let q = Query::parse(req.uri().query().unwrap_or(""));
    poll(state, grant, &req, &q, peer).unwrap_or_else(|e| now(Err(e)))
}

/// A call answered already.
pub fn now(result: Result<Response<RelayBody>, AgentCallError>) -> Call {
    Box::pin(std::future::ready(
        result.unwrap_or_else(AgentCallError::into_response),
    ))
}

/// A call whose endpoint's future answers (a combinator, not an `async` block, so the box
/// is the endpoint's future and nothing more).
fn later(
    fut: impl Future<Output = Result<Response<RelayBody>, AgentCallError>> + Send + 'static,
) -> Call {
    Box::pin(fut.map(|r| r.unwrap_or_else(AgentCallError::into_response)))
}

/// The query parameters agent calls use. Values are never percent-decoded: names and ids
/// are restricted to characters that need no escaping.
#[derive(Default)]
pub(crate) struct Query<'a> {
    pub(crate) server: Option<&'a str>,
    pub(crate) id: Option<&'a str>,
    pub(crate) offset: Option<u64>,
    pub(crate) max: Option<u64>,
    pub(crate) draining: bool,
    /// A session's slot (the agent's relay URL index; 0 when absent).
    pub(crate) slot: u32,
    /// The agent's number for this session (0: none, no resume).
    pub(crate) session: u64,
    /// `resume=<session>.<opens>`: the agent received `opens` OPENs on its earlier
    /// session `session` in this slot, then gave it up.
    pub(crate) resume: Option<(u64, u64)>,
}

impl<'a> Query<'a> {
    pub(crate) fn parse(q: &'a str) -> Self {
        let mut out = Query::default();
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "server" => out.server = Some(v),
                "id" => out.id = Some(v),
                "offset" => out.offset = v.parse().ok(),
                "max" => out.max = v.parse().ok(),
                "draining" => out.draining = v == "1" || v == "true",
                "slot" => out.slot = v.parse().unwrap_or(0),
                "session" => out.session = v.parse().unwrap_or(0),
                "resume" => {
                    out.resume = v
                        .split_once('.')
                        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                }
                _ => {}
            }
        }
        out
    }
}

/// The request `id` names, if the caller may serve its name.
fn lookup(state: &State, grant: &Grant, id: Option<&str>) -> Result<Arc<Pending>, AgentCallError> {
    id.and_then(|id| state.broker.lookup(id, |name| grant.allows(name)))
        .ok_or(AgentCallError::UnknownId)
}

/// The name (`server=`) and agent id (`X-Relay-Agent-Id`) of a poll or session, checked
/// against what the caller's grant allows.
pub(crate) fn poller_identity<B>(
    state: &State,
    grant: &Grant,
    req: &Request<B>,
    q: &Query<'_>,
) -> Result<(String, String), AgentCallError> {
    let Some(name) = q.server.filter(|n| is_valid_name(n)) else {
        return Err(AgentCallError::BadRequest(
            "missing or invalid server query parameter (a backend name)".into(),
        ));
    };
    if !grant.allows(name) {
        state.metrics.auth_failure("agent");
        return Err(AgentCallError::Forbidden(name.to_owned()));
    }
    let Some(agent_id) = req
        .headers()
        .get(AGENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
    else {
        return Err(AgentCallError::BadRequest(
            "missing X-Relay-Agent-Id header".into(),
        ));
    };
    Ok((name.to_owned(), agent_id.to_owned()))
}

/// A protocol 1 long poll: checked and registered at once; the call it returns is the wait,
/// which holds the handle and what the answer needs, not the request.
fn poll<B>(
    state: Arc<State>,
    grant: Grant,
    req: &Request<B>,
    q: &Query<'_>,
    peer: std::net::SocketAddr,
) -> Result<Call, AgentCallError> {
    let (name, agent_id) = poller_identity(&state, &grant, req, q)?;
    let draining = q.draining || state.draining();
    let max = if draining {
        0
    } else {
        q.max.unwrap_or(1).min(MAX_POLL_BATCH as u64) as usize
    };
    let handle = state
        .broker
        .begin_poll(&name, &agent_id, grant.token(), q.draining, || {
            agent_info(req, peer, AgentProtocol::Relay1)
        });
    Ok(later(parked(state, grant, name, handle, max)))
}

/// A registered long poll, parked until work, its deadline, the stop or its agent's
/// revocation.
async fn parked(
    state: Arc<State>,
    grant: Grant,
    name: String,
    handle: PollHandle,
    max: usize,
) -> Result<Response<RelayBody>, AgentCallError> {
    let batch = handle.next(max, state.cfg.poll_timeout, &state.stop).await;
    let gone = handle.agent().gone.is_cancelled();
    let handout = handle.handout();
    drop(handle);
    // A reload may have revoked the token while the poll was parked: what it claimed in
    // that instant is not handed out (it goes back to the queue for other agents), and the
    // agent learns it must stop.
    if gone && !state.auth().tokens.still_grants(&grant, &name) {
        let mut handout = handout;
        for (pending, head) in batch.claimed.into_iter().zip(batch.requests) {
            handout.push(0, pending, head);
        }
        state.metrics.auth_failure("agent");
        return Err(AgentCallError::Unauthenticated(
            "the agent token was revoked by a configuration reload".into(),
        ));
    }
    if batch.requests.is_empty() && batch.cancel.is_empty() {
        return Ok(no_store(Response::builder().status(StatusCode::NO_CONTENT))
            .body(full(Bytes::new()))
            .expect("bug: static response"));
    }
    let answer = PollAnswer {
        requests: batch.requests,
        cancel: batch.cancel.iter().map(|id| id.to_string()).collect(),
    };
    let json = serde_json::to_vec(&answer).expect("bug: poll answers always serialise");
    let mut handout = handout;
    for (pending, head) in batch.claimed.into_iter().zip(answer.requests) {
        handout.push(0, pending, head);
    }
    let body = PollAnswerBody::new(Bytes::from(json), handout);
    Ok(no_store(Response::builder())
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.boxed_unsync())
        .expect("bug: static response"))
}

/// What the status page shows of an agent: the address of its first poll, its
/// `User-Agent` (cut to 64 characters) and its protocol.
pub fn agent_info<B>(
    req: &Request<B>,
    peer: std::net::SocketAddr,
    protocol: AgentProtocol,
) -> AgentInfo {
    AgentInfo {
        addr: peer.ip().to_string(),
        version: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .chars()
            .take(64)
            .collect(),
        protocol,
    }
}

/// Agent answers are never cached (RFC 9111 §5.2.2.5): each poll answer is for one agent.
pub fn no_store(b: http::response::Builder) -> http::response::Builder {
    b.header(header::CACHE_CONTROL, "no-store")
}

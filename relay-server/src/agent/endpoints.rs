//! The agent endpoints: authentication, `/server/request` (the long poll) and the routing
//! of exchange calls to [`response`] and [`upload`]. Every call is authenticated, and every id is checked
//! against the names the caller's token may serve.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use relay_common::message::PollAnswer;
use relay_common::name::is_valid_name;
use relay_common::{AGENT_ID_HEADER, MAX_POLL_BATCH};

use crate::agent::error::AgentCallError;
use crate::agent::handout::PollAnswerBody;
use crate::agent::pending::Pending;
use crate::agent::registration::{AgentInfo, AgentProtocol};
use crate::agent::{response, session, tunnel, upload, v1alpha1};
use crate::base::auth::Grant;
use crate::base::body::{full, text_response, RelayBody};
use crate::State;

/// Authenticates an agent call by its token or client certificate, or else, when one is
/// configured, by the verdict of the agents' authorization service.
pub async fn authenticate(
    state: &State,
    req: &Request<Incoming>,
    cert: Option<&Grant>,
    peer: std::net::SocketAddr,
) -> Result<Grant, AgentCallError> {
    let auth = state.auth();
    let refused = |e: AgentCallError| {
        if !matches!(e, AgentCallError::AuthService(_)) {
            state.metrics.auth_failure("agent");
        }
        e
    };
    match auth.tokens.authenticate_agent(req.headers(), cert) {
        Ok(grant) => Ok(grant),
        Err(e) => match &auth.agent_forward_auth {
            Some(service) => service.check(req.headers(), peer).await.map_err(refused),
            None => Err(refused(AgentCallError::Unauthenticated(e.to_string()))),
        },
    }
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
    if v1alpha1::is_v1alpha1(&req) {
        return v1alpha1::serve(state, grant, req, peer).await;
    }
    let uri = req.uri().clone();
    let query = Query::parse(uri.query().unwrap_or(""));
    let result = match uri.path() {
        "/server/request" => poll(state, grant, &req, query, peer).await,
        relay_common::session::SESSION_PATH => session::serve(state, grant, req, peer),
        "/server/response" => match lookup(&state, &grant, query.id) {
            Ok(pending) => response::serve(pending, req, query.offset).await,
            Err(e) => Err(e),
        },
        "/server/requeststream" => match lookup(&state, &grant, query.id) {
            Ok(pending) => upload::serve(&state, pending, query.offset, query.max).await,
            Err(e) => Err(e),
        },
        relay_common::tunnel::TUNNEL_PATH => match lookup(&state, &grant, query.id) {
            Ok(pending) => tunnel::serve(&state, pending, req),
            Err(e) => Err(e),
        },
        // Answered before its body is read: an agent that gets this answer while its
        // streaming body is still open knows nothing in between buffers request bodies.
        "/server/probe" => Ok(text_response(StatusCode::OK, "streaming")),
        _ => Err(AgentCallError::NoEndpoint),
    };
    result.unwrap_or_else(AgentCallError::into_response)
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
pub(crate) fn poller_identity(
    state: &State,
    grant: &Grant,
    req: &Request<Incoming>,
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

async fn poll(
    state: Arc<State>,
    grant: Grant,
    req: &Request<Incoming>,
    q: Query<'_>,
    peer: std::net::SocketAddr,
) -> Result<Response<RelayBody>, AgentCallError> {
    let (name, agent_id) = poller_identity(&state, &grant, req, &q)?;
    let (name, agent_id) = (name.as_str(), agent_id.as_str());
    let draining = q.draining || state.draining();
    let max = if draining {
        0
    } else {
        q.max.unwrap_or(1).min(MAX_POLL_BATCH as u64) as usize
    };
    let handle = state
        .broker
        .begin_poll(name, agent_id, grant.token(), q.draining, || {
            agent_info(req, peer, AgentProtocol::Relay1)
        });
    let batch = handle.next(max, state.cfg.poll_timeout, &state.stop).await;
    let gone = handle.agent().gone.is_cancelled();
    let handout = handle.handout();
    drop(handle);
    // A reload may have revoked the token while the poll was parked: what it claimed in
    // that instant is not handed out (it goes back to the queue for other agents), and the
    // agent learns it must stop.
    if gone && !state.auth().tokens.still_grants(&grant, name) {
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

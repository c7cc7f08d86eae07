//! Calls between replicas in cluster mode, and the cluster listener that answers them.
//!
//! - A user request that reaches a replica without a local agent for its name is prepared
//!   there (routing, access, the backend's headers) and sent to a replica that has one as
//!   `<method> /cluster/request` with the prepared head as JSON in `X-Relay-Cluster-Head`
//!   and the user's body as the body. The owner queues it like its own request; its
//!   response (status, headers, streamed body, trailers) is the user's response. Ordinary
//!   requests share one HTTP/2 connection per peer (trailers, many streams); upgrade
//!   requests take an HTTP/1.1 connection of their own whose 101 is spliced to the user's.
//! - An agent call (`/server/response`, `/server/requeststream`) for an id owned by another
//!   replica goes there verbatim, with the caller's grant in `X-Relay-Cluster-Grant` (the
//!   receiving replica checked the credential; the owner checks the id against the grant).
//!
//! Every call is authenticated by `X-Relay-Cluster-Auth`, a MAC over its method, target,
//! time and the relay's own headers with a key derived from the cluster secret (the secret
//! itself never crosses the wire; see [`super::seal`]). A peer that cannot be connected to is skipped for the next one holding the name;
//! once a request was sent it is never repeated (its body is gone and it may have had
//! effects): a failure then is a 502, a broken body an aborted response.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use relay_common::headers::strip_hop_by_hop;
use relay_common::message::decode_headers;

use crate::base::auth::Grant;
use crate::base::body::text_response;
use crate::base::body::{empty, BodyError, RelayBody};
use crate::base::revocation::{revoked, Admission};
use crate::cluster::directory::{now_ms, Cluster};
use crate::cluster::head::{PeerHead, HEAD_HEADER};
use crate::cluster::pool::PeerIo;
use crate::cluster::seal::AUTH_HEADER;
use crate::user::error::RelayError;
use crate::user::prepare::{prefetch, Prepared};
use crate::user::relayed::dispatch;
use crate::State;

/// Path of forwarded user requests on the cluster listener.
pub const FORWARD_PATH: &str = "/cluster/request";
/// Header with the grant of a forwarded agent call.
pub const GRANT_HEADER: &str = "x-relay-cluster-grant";

/// How much longer than its own response timeout the owner may take to answer.
const OWNER_GRACE: Duration = Duration::from_secs(5);
fn header_value(s: &str) -> Result<HeaderValue, RelayError> {
    HeaderValue::from_str(s)
        .map_err(|_| RelayError::Replica("a value cannot cross to another replica".into()))
}

/// The relay's own headers of a call between replicas, which its MAC covers besides the
/// method and target: the forwarded head and the agent's grant (empty when absent).
fn bound(h: &HeaderMap) -> [&[u8]; 2] {
    let value = |name| h.get(name).map_or(&[][..], |v: &HeaderValue| v.as_bytes());
    [value(HEAD_HEADER), value(GRANT_HEADER)]
}

/// Authenticates a call to another replica (`X-Relay-Cluster-Auth`, see [`super::seal`]).
pub(super) fn sign<B>(cluster: &Cluster, req: &mut Request<B>) {
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let value = cluster.seal().call(
        req.method().as_str(),
        target,
        &bound(req.headers()),
        now_ms(),
    );
    let value = HeaderValue::from_str(&value).expect("bug: the auth value is ASCII");
    req.headers_mut().insert(AUTH_HEADER, value);
}

/// Sends a prepared user request to the first of `peers` (replicas holding an agent for
/// its name, from [`Cluster::replicas_for`]) that accepts a connection.
pub async fn forward_user(
    state: &Arc<State>,
    cluster: &Arc<Cluster>,
    mut p: Prepared,
    peers: Vec<crate::cluster::directory::Peer>,
) -> Result<Response<RelayBody>, RelayError> {
    let head = PeerHead {
        name: p.name.clone(),
        target: p.target,
        headers: p.headers.to_list(),
        content_length: p.content_length,
        upgrade: p.upgrade.clone(),
        client: Some(p.client),
    };
    let head = head.encode();
    let mut body = p
        .body
        .take()
        .map(|b| b.map_err(BodyError::from).boxed_unsync());
    let mut on_upgrade = p.on_upgrade.take();
    let build = |url: &str, body: RelayBody| -> Result<Request<RelayBody>, RelayError> {
        let mut req = Request::new(body);
        *req.method_mut() = p.method.clone();
        *req.uri_mut() = format!("{url}{FORWARD_PATH}")
            .parse()
            .map_err(|_| RelayError::Replica(format!("bad replica address {url:?}")))?;
        let h = req.headers_mut();
        h.insert(HEAD_HEADER, head.clone());
        if let Some(n) = p.content_length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if let Some(proto) = &p.upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, header_value(proto)?);
        }
        sign(cluster, &mut req);
        Ok(req)
    };
    // Nothing is sent before a connection stands, so an unreachable peer is skipped.
    let mut last = String::new();
    for peer in peers {
        if on_upgrade.is_some() {
            let io = match cluster.peers.connect(&peer.url, false).await {
                Ok(t) => t,
                Err(e) => {
                    cluster.forget_peer(peer.tag);
                    last = format!("{}: {e}", peer.url);
                    continue;
                }
            };
            let req = build(&peer.url, empty())?;
            let user = on_upgrade.take().expect("bug: checked above");
            let deadline = p.arrival + state.cfg.upgrade_response_timeout + OWNER_GRACE;
            return upgrade(state, io, req, (user, p.admission.take()), deadline).await;
        }
        let send = match cluster.peers.h2(&peer.url).await {
            Ok(s) => s,
            Err(e) => {
                cluster.forget_peer(peer.tag);
                last = format!("{}: {e}", peer.url);
                continue;
            }
        };
        let req = build(&peer.url, body.take().unwrap_or_else(empty))?;
        state.metrics.forwarded("user_out");
        // The owner answers within its response timeout; a replica that stopped answering
        // (a partition, not a crash) must not hold the user longer than that.
        let limit = state.cfg.response_timeout + OWNER_GRACE;
        return match tokio::time::timeout_at(
            p.arrival + limit,
            exchange(cluster, &peer.url, send, req),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(RelayError::ResponseTimeout(limit)),
        };
    }
    Err(RelayError::Replica(format!(
        "no relay replica holding backend {:?} could be reached ({last})",
        p.name
    )))
}

/// One request on a pooled HTTP/2 connection; the answer passes through as it streams.
async fn exchange(
    cluster: &Cluster,
    url: &str,
    mut send: http2::SendRequest<RelayBody>,
    req: Request<RelayBody>,
) -> Result<Response<RelayBody>, RelayError> {
    let sent = async {
        send.ready().await?;
        send.send_request(req).await
    };
    match sent.await {
        Ok(resp) => Ok(resp.map(|b| b.map_err(BodyError::from).boxed_unsync())),
        Err(e) => {
            cluster.peers.drop_conn(url);
            Err(RelayError::Replica(format!(
                "the relay replica at {url} failed: {e}"
            )))
        }
    }
}

/// A forwarded upgrade request on its own HTTP/1.1 connection: a 101 from the owner is
/// answered to the user and both switched connections are spliced.
async fn upgrade(
    state: &Arc<State>,
    io: Box<dyn PeerIo>,
    req: Request<RelayBody>,
    (user, admission): (crate::base::switch::Switch, Option<Arc<Admission>>),
    deadline: tokio::time::Instant,
) -> Result<Response<RelayBody>, RelayError> {
    let fail = |e: hyper::Error| RelayError::Replica(format!("the relay replica failed: {e}"));
    let (mut send, conn) = http1::handshake(TokioIo::new(io)).await.map_err(fail)?;
    state.carriers.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    state.metrics.forwarded("user_out");
    let mut resp = tokio::time::timeout_at(deadline, send.send_request(req))
        .await
        .map_err(|_| RelayError::ResponseTimeout(state.cfg.upgrade_response_timeout))?
        .map_err(fail)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp.map(|b| b.map_err(BodyError::from).boxed_unsync()));
    }
    let peer = hyper::upgrade::on(&mut resp);
    let stop = state.stop.clone();
    state.tunnels.spawn(async move {
        // The user's connection keeps its place under the limits while it is spliced.
        let (Ok((user, _place)), Ok(peer)) = tokio::join!(user.switched(), peer) else {
            return;
        };
        let (mut user, mut peer) = (TokioIo::new(user), TokioIo::new(peer));
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut user, &mut peer) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "forwarded tunnel ended");
                }
            }
            _ = stop.cancelled() => {}
            // The user's credential was revoked: the tunnel ends here too.
            _ = revoked(admission.as_deref()) => {}
        }
    });
    let mut out = Response::new(empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = resp.headers().clone();
    Ok(out)
}

/// Sends an agent call for a request owned by the replica tagged `owner` there.
pub async fn forward_agent(
    state: &Arc<State>,
    cluster: &Arc<Cluster>,
    req: Request<RelayBody>,
    owner: u32,
    grant: &Grant,
) -> Response<RelayBody> {
    let url = match cluster.url_of(owner).await {
        Ok(Some(url)) => url,
        // The owner is gone, and its requests with it.
        Ok(None) => return text_response(StatusCode::NOT_FOUND, "unknown request id"),
        Err(e) => {
            return RelayError::ClusterUnavailable(format!("(request owner: {e})"))
                .into_response(state.cfg.retry_after_secs)
        }
    };
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Request::new(body);
    *out.method_mut() = parts.method.clone();
    let Ok(uri) = format!("{url}{target}").parse() else {
        return text_response(StatusCode::BAD_GATEWAY, "bad replica address");
    };
    *out.uri_mut() = uri;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, false);
    // The owner trusts the grant, not a credential it would have to check again.
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    *out.headers_mut() = headers;
    let h = out.headers_mut();
    // Only this replica speaks for the call.
    h.remove(HEAD_HEADER);
    let Ok(grant) = HeaderValue::from_str(&grant.encode()) else {
        return text_response(StatusCode::INTERNAL_SERVER_ERROR, "bug: a grant is ASCII");
    };
    h.insert(GRANT_HEADER, grant);
    sign(cluster, &mut out);
    let send = match cluster.peers.h2(&url).await {
        Ok(s) => s,
        Err(e) => {
            cluster.forget_peer(owner);
            return text_response(
                StatusCode::BAD_GATEWAY,
                &format!("the relay replica owning this request is unreachable: {e}"),
            );
        }
    };
    state.metrics.forwarded("agent_out");
    match exchange(cluster, &url, send, out).await {
        Ok(r) => r,
        Err(e) => e.into_response(state.cfg.retry_after_secs),
    }
}

/// Serves a call on the cluster listener: forwarded user requests and agent calls.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<RelayBody> {
    let Some(cluster) = state.cluster.clone() else {
        return text_response(StatusCode::NOT_FOUND, "cluster mode is off");
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let checked = cluster.seal().check_call(
        req.headers().get(AUTH_HEADER).map(|v| v.as_bytes()),
        req.method().as_str(),
        target,
        &bound(req.headers()),
        now_ms(),
    );
    if let Err(e) = checked {
        state.metrics.auth_failure("cluster");
        return text_response(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    let path = req.uri().path().to_owned();
    match path.as_str() {
        FORWARD_PATH => {
            state.metrics.forwarded("user_in");
            let retry = state.cfg.retry_after_secs;
            let span = tracing::info_span!(
                "forwarded",
                method = %req.method(),
                id = tracing::field::Empty,
                backend = tracing::field::Empty,
            );
            use tracing::Instrument;
            match forwarded_request(&state, req, peer).instrument(span).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "forwarded request failed");
                    e.into_response(retry)
                }
            }
        }
        p if p.starts_with(super::parked::PARKED_PATH) => {
            super::parked::answer(&state, &p[super::parked::PARKED_PATH.len()..])
        }
        "/server/response" | "/server/requeststream" => {
            let Some(grant) = req
                .headers()
                .get(GRANT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(Grant::decode)
            else {
                return text_response(StatusCode::BAD_REQUEST, "missing X-Relay-Cluster-Grant");
            };
            state.metrics.forwarded("agent_in");
            crate::agent::endpoints::serve(state, grant, req, peer).await
        }
        _ => text_response(StatusCode::NOT_FOUND, "no such cluster endpoint"),
    }
}

/// A user request another replica prepared, queued here for a local agent.
async fn forwarded_request(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<RelayBody>, RelayError> {
    let head = req
        .headers()
        .get(HEAD_HEADER)
        .and_then(PeerHead::decode)
        .ok_or_else(|| RelayError::BadRequest(format!("missing or malformed {HEAD_HEADER}")))?;
    tracing::Span::current().record("backend", head.name.as_str());
    let headers: HeaderMap = decode_headers(&head.headers)
        .map_err(|e| RelayError::BadRequest(format!("the forwarded head has an {e}")))?;
    let on_upgrade = head
        .upgrade
        .as_ref()
        .map(|_| crate::base::switch::Switch::of(&mut req));
    let method: Method = req.method().clone();
    let body = req.into_body();
    let body = if hyper::body::Body::is_end_stream(&body) {
        None
    } else {
        Some(prefetch(body)?)
    };
    let backend = state
        .broker
        .live_backend(&head.name)
        .ok_or_else(|| RelayError::NoAgent(head.name.clone()))?;
    let prepared = Prepared {
        name: head.name,
        method,
        target: head.target,
        headers: headers.into(),
        content_length: head.content_length,
        upgrade: head.upgrade,
        on_upgrade,
        body,
        arrival: tokio::time::Instant::now(),
        // A head without one (an older replica) is charged to the replica that sent it.
        client: head.client.unwrap_or(peer.ip()),
        // The replica the user reached checked the credential and watches it.
        admission: None,
        spanned: crate::user::downstream::spanned(),
    };
    dispatch(state, &backend, prepared).await
}

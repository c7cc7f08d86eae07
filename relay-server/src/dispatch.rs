//! Where each request goes: the operator endpoints, the agent endpoints, the cluster
//! listener or the user side, by listener (face), path and host. This is the one place that
//! knows every layer; the layers themselves only know the ones below them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;

use crate::agent::endpoints;
use crate::base::auth::Grant;
use crate::base::body::{full, text_response, RelayBody};
use crate::cluster::parked;
use crate::listener::Face;
use crate::user::downstream;
use crate::user::error::RelayError;
use crate::user::prepare::{request_host, Prepared};
use crate::user::relayed;
use crate::user::router;
use crate::State;

pub use crate::agent_call::exempt_agent;
use crate::agent_call::{agent_call, granted_call};

/// Routes one request to its handler. The routing itself runs at once; what it returns is
/// either the answer (health, readiness, operator pages, refusals) or the handler's boxed
/// future. Each handler is boxed: hyper keeps the future of a connection's request in
/// progress for as long as it lasts, and unboxed it would be as large as the largest path (a
/// user request, 5 KiB) even for the parked polls that idle agents hold for minutes. And
/// `route` is not itself an `async fn`: as one, its future (864 bytes, the request kept in
/// three slots) sat inside every connection's request future, which hyper copies into place
/// for each request (HTTP/1.1) or into a task of its own for each stream (HTTP/2).
pub fn route(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
    face: Face,
    cert: &Arc<OnceLock<Grant>>,
) -> Routed {
    match target(&state, &req, peer, face) {
        Target::Now(resp) => Routed::now(resp),
        Target::User => Routed::later(|| user_request(state, req, peer, https)),
        Target::Cluster => Routed::later(|| crate::cluster::peer::handle(state, req, peer)),
        Target::Agent { strip } => {
            let mut req = req;
            if strip > 0 {
                unmount(&mut req, strip);
            }
            Routed::Later(agent_call(state, req, peer, cert.get(), granted_call))
        }
    }
}

/// Routes a request the relay's own HTTP/1.1 front read (`crate::front`): a user's, or an
/// agent's long poll (`cert`: what the connection's client certificate grants); `None` for
/// one that only hyper serves (the other agent endpoints, replica calls).
pub fn route_front(
    state: &Arc<State>,
    mut req: Request<Empty<Bytes>>,
    peer: SocketAddr,
    https: bool,
    face: Face,
    cert: Option<&Grant>,
) -> Option<Routed> {
    match target(state, &req, peer, face) {
        Target::Now(resp) => Some(Routed::now(resp)),
        Target::User => {
            let state = state.clone();
            Some(Routed::later(|| user_request(state, req, peer, https)))
        }
        // A parked poll holds its connection for minutes: on the front, an idle long-poll
        // agent costs the front's buffers, not hyper's two of 8 KiB.
        Target::Agent { strip } if &req.uri().path()[strip..] == "/server/request" => {
            if strip > 0 {
                unmount(&mut req, strip);
            }
            let call = agent_call(state.clone(), req, peer, cert, endpoints::serve_poll);
            Some(Routed::Later(call))
        }
        Target::Agent { .. } | Target::Cluster => None,
    }
}

/// Where a request goes, decided from its head alone.
pub enum Target {
    /// Answered at once (probes, operator pages, refusals).
    Now(Response<RelayBody>),
    /// The user side ([`user_request`]).
    User,
    /// An agent endpoint.
    Agent {
        /// The length of the base path it is below.
        strip: usize,
    },
    /// The cluster listener's replica calls.
    Cluster,
}

/// The routing decision of [`route`], by listener (face), path and host.
pub fn target<B>(state: &State, req: &Request<B>, peer: SocketAddr, face: Face) -> Target {
    // A backend's own origin (`<name>.<public domain>`) belongs to the backend entirely,
    // including paths like /healthz and /server/.
    let host_routed = !matches!(face, Face::Agent | Face::Admin | Face::Cluster)
        && state.cfg.public_domain.as_deref().is_some_and(|d| {
            request_host(req).is_some_and(|h| router::host_backend(h, d).is_some())
        });
    if host_routed {
        return Target::User;
    }
    let path = req.uri().path();
    // Below --base-path the endpoints see the path without it; outside it only the probes
    // and operator pages answer (and users routed by X-Server-Name, see the router).
    let (strip, mounted) = match state.cfg.base_path.as_deref() {
        Some(base) => match path.strip_prefix(base) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => (base.len(), true),
            _ => (0, false),
        },
        None => (0, true),
    };
    let path = match &path[strip..] {
        "" => "/",
        p => p,
    };
    match path {
        "/healthz" => return Target::Now(Response::new(full(Bytes::from_static(b"ok\n")))),
        "/readyz" if state.draining() => {
            return Target::Now(text_response(StatusCode::SERVICE_UNAVAILABLE, "draining"))
        }
        // Still ready: the replica serves its own agents; only forwarding is down.
        "/readyz" if state.cluster.as_ref().is_some_and(|c| !c.redis_up()) => {
            return Target::Now(text_response(
                StatusCode::OK,
                "degraded: the cluster directory (Redis) is unreachable; serving local agents only",
            ))
        }
        "/readyz" => return Target::Now(text_response(StatusCode::OK, "ready")),
        "/metrics" | "/status" | "/status.json" if ops_allowed(state, face, peer) => {
            return Target::Now(crate::ops::page::answer(state, path));
        }
        _ => {}
    }
    if face == Face::Cluster {
        return Target::Cluster;
    }
    if face == Face::Admin {
        return Target::Now(text_response(
            StatusCode::NOT_FOUND,
            "this listener serves /healthz, /readyz, /metrics, /status and /status.json",
        ));
    }
    let agent_path = mounted && path.starts_with("/server/");
    if agent_path && face == Face::Public {
        return Target::Now(text_response(
            StatusCode::NOT_FOUND,
            "agent endpoints are not served here",
        ));
    }
    if !agent_path && face == Face::Agent {
        return Target::Now(text_response(
            StatusCode::NOT_FOUND,
            "this listener serves relay-clients only; users use the public address",
        ));
    }
    if agent_path
        && matches!(
            path,
            "/server/request"
                | "/server/response"
                | "/server/requeststream"
                | "/server/probe"
                | "/server/session"
                | "/server/tunnel"
        )
    {
        return Target::Agent { strip };
    }
    if agent_path {
        return Target::Now(text_response(
            StatusCode::NOT_FOUND,
            "no such agent endpoint",
        ));
    }
    Target::User
}

/// What [`route`] found: the answer, or the handler's future (boxed, see there).
pub enum Routed {
    /// Answered already (taken when polled).
    Now(Option<Response<RelayBody>>),
    /// The handler, running.
    Later(Pin<Box<dyn Future<Output = Response<RelayBody>> + Send>>),
}

impl Routed {
    fn now(resp: Response<RelayBody>) -> Self {
        Routed::Now(Some(resp))
    }

    fn later<F: Future<Output = Response<RelayBody>> + Send + 'static>(
        make: impl FnOnce() -> F,
    ) -> Self {
        let fut: Box<F> = Box::write(Box::<F>::new_uninit(), make());
        Routed::Later(Box::into_pin(fut))
    }
}

impl Future for Routed {
    type Output = Response<RelayBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<RelayBody>> {
        match self.get_mut() {
            Routed::Now(resp) => Poll::Ready(resp.take().expect("bug: polled after it ended")),
            Routed::Later(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// Takes the first `strip` bytes (the base path) off the request's path, so agent
/// endpoints, and the replica a call is forwarded to, see the path they know.
fn unmount<B>(req: &mut Request<B>, strip: usize) {
    let Some(pq) = req.uri().path_and_query() else {
        return;
    };
    let rest = &pq.as_str()[strip..];
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = rest.parse().ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Whether the operator pages may be shown to `peer` on this listener: always on the admin
/// listener; without one, on the public listener of a loopback address to loopback peers
/// only, and not to a trusted proxy on loopback (a local reverse proxy would pass the world's
/// requests on). Never on the agent or cluster listener.
fn ops_allowed(state: &State, face: Face, peer: SocketAddr) -> bool {
    match face {
        Face::Admin => true,
        Face::Public | Face::Shared => {
            state.ops_on_public.load(Ordering::Acquire)
                && peer.ip().is_loopback()
                && !state.auth().trusts(peer.ip())
        }
        Face::Agent | Face::Cluster => false,
    }
}

/// A user request: the user side routes and admits it, then [`deliver`] finds its agent.
pub fn user_request<B: crate::user::prepare::RequestBody>(
    state: Arc<State>,
    req: Request<B>,
    peer: SocketAddr,
    https: bool,
) -> impl Future<Output = Response<RelayBody>> {
    downstream::handle(state, req, peer, https, deliver)
}

/// Hands a prepared request to a local agent, or in cluster mode to the replica that holds
/// one for its name.
///
/// Not an `async` block: one would keep the [`Prepared`] (440 bytes) for as long as the
/// request waits, although it moves on at once. Without a cluster the request is queued
/// here, when the future is made ([`relayed::dispatch`]); the cluster's path, which may ask
/// Redis first, is boxed, so it adds 8 bytes to the others' futures.
#[inline(always)] // the future it returns built in place, not copied out (see `handle`)
fn deliver(
    state: Arc<State>,
    prepared: Prepared,
) -> impl Future<Output = Result<Response<RelayBody>, RelayError>> + Send {
    if let Some(cluster) = state.cluster.clone() {
        return Either::Right(Box::pin(deliver_clustered(state, cluster, prepared)));
    }
    Either::Left(match state.broker.live_backend(&prepared.name) {
        Some(backend) => Either::Left(relayed::dispatch(&state, &backend, prepared)),
        None => Either::Right(std::future::ready(Err(RelayError::NoAgent(prepared.name)))),
    })
}

/// [`deliver`] in cluster mode.
async fn deliver_clustered(
    state: Arc<State>,
    cluster: Arc<crate::cluster::directory::Cluster>,
    prepared: Prepared,
) -> Result<Response<RelayBody>, RelayError> {
    let name = prepared.name.clone();
    let local = state.broker.live_backend(&name);
    // Another replica may hold an agent for the name. An agent reached through a
    // balancer moves between replicas as its connections do, so a local agent without
    // a parked poll may not come back here: then a replica that holds the name with a
    // poll parked is preferred; with none parked anywhere, the local agent keeps it.
    // Both boxed: this whole path is boxed already (see `deliver`), and inline the
    // replica hop's futures would make its box 750 bytes larger.
    if local.as_ref().is_none_or(|b| !b.has_parked_poll()) {
        match Box::pin(parked::route(&cluster, &name, local.is_some())).await {
            Ok(Some(peers)) => {
                return Box::pin(crate::cluster::peer::forward_user(
                    &state, &cluster, prepared, peers,
                ))
                .await
            }
            Err(_) if local.is_none() => return Err(RelayError::ClusterUnavailable(name)),
            _ => {}
        }
    }
    match local {
        Some(backend) => relayed::dispatch(&state, &backend, prepared).await,
        None => Err(RelayError::NoAgent(name)),
    }
}

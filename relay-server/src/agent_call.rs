//! Agent calls on their way in: authenticated at once where a token or certificate decides,
//! exempted from their address's connection count, and in cluster mode forwarded to the
//! replica that owns the request they are about.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::agent::endpoints::{self, Verdict};
use crate::agent::v1alpha1;
use crate::base::auth::{AuthError, Grant};
use crate::base::body::{full, BodyError, RelayBody};
use crate::listener::Face;
use crate::State;

/// What [`exempt_agent`] found a request's token or certificate to prove (the grant, or why
/// not), kept in the request's extensions so that [`agent_call`] does not check the same
/// token again, whether it passed or not. Only the relay inserts it (a peer cannot put
/// anything into a request's extensions).
#[derive(Clone)]
struct Checked(Result<Grant, AuthError>);

/// A connection whose agent call authenticates leaves its address's count (agents behind
/// one NAT address are many); checked for each request, hyper's or the front's, before
/// routing (a connection on probation is refused unless it is exempted). The answer goes
/// with the request to [`agent_call`]: the token is digested once per call, not twice
/// (a call the authorization service decides included).
pub fn exempt_agent<B>(
    state: &State,
    permit: &crate::base::limits::ConnPermit,
    face: Face,
    req: &mut Request<B>,
    cert: Option<&Grant>,
) {
    if !(permit.counts_per_ip() && req.uri().path().starts_with("/server/") && face != Face::Public)
    {
        return;
    }
    let checked = state.auth().tokens.authenticate_agent(req.headers(), cert);
    if checked.is_ok() {
        permit.exempt_from_per_ip();
    }
    req.extensions_mut().insert(Checked(checked));
}

/// An agent call: authenticated here, at once when its token or certificate decides, then
/// served by `serve`. What waits is boxed by endpoint ([`endpoints::Call`]).
pub(crate) fn agent_call<B: Send + 'static>(
    state: Arc<State>,
    req: Request<B>,
    peer: SocketAddr,
    cert: Option<&Grant>,
    serve: fn(Arc<State>, Grant, Request<B>, SocketAddr) -> endpoints::Call,
) -> endpoints::Call {
    let mut req = req;
    let local = match req.extensions_mut().remove() {
        Some(Checked(checked)) => checked,
        None => state.auth().tokens.authenticate_agent(req.headers(), cert),
    };
    match endpoints::verdict(&state, local) {
        Ok(Verdict::Granted(grant)) => serve(state, grant, req, peer),
        // The authorization service's path: one more box, around the endpoint's.
        Ok(Verdict::AskService) => Box::pin(async move {
            match endpoints::ask_service(&state, req.headers(), peer).await {
                Ok(grant) => serve(state, grant, req, peer).await,
                Err(refused) => refused.into_response(),
            }
        }),
        Err(refused) => endpoints::now(Err(refused)),
    }
}

/// An agent call hyper read, once the caller's grant is known: in cluster mode a call about
/// a request another replica owns (the load balancer sent it here) goes to that replica with
/// the caller's grant.
pub(crate) fn granted_call(
    state: Arc<State>,
    grant: Grant,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> endpoints::Call {
    let Some(cluster) = state.cluster.clone() else {
        return endpoints::serve(state, grant, req, peer);
    };
    if let Some(id) = endpoints::exchange_id(&req) {
        if id.tag() != cluster.tag() {
            let req = req.map(|b| b.map_err(BodyError::from).boxed_unsync());
            return Box::pin(async move {
                crate::cluster::peer::forward_agent(&state, &cluster, req, id.tag(), &grant).await
            });
        }
    }
    // A Go client's response message names its request inside the message.
    if v1alpha1::is_v1alpha1(&req) && req.uri().path() == "/server/response" {
        return Box::pin(v1alpha1_response(state, cluster, grant, req));
    }
    endpoints::serve(state, grant, req, peer)
}

/// A Go client's response message in cluster mode: served here, or forwarded to the replica
/// that owns the request it names.
async fn v1alpha1_response(
    state: Arc<State>,
    cluster: Arc<crate::cluster::directory::Cluster>,
    grant: Grant,
    req: Request<Incoming>,
) -> Response<RelayBody> {
    let (parts, body) = req.into_parts();
    let bytes = match v1alpha1::response::read_message(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let owner = v1alpha1::response::message_id(&bytes)
        .and_then(|id| relay_common::id::RequestId::parse(&id))
        .map(|id| id.tag())
        .filter(|tag| *tag != cluster.tag());
    if let Some(owner) = owner {
        let req = Request::from_parts(parts, full(bytes));
        return crate::cluster::peer::forward_agent(&state, &cluster, req, owner, &grant).await;
    }
    v1alpha1::response::serve_message(&state, &grant, bytes)
        .await
        .unwrap_or_else(v1alpha1::GoCallError::into_response)
}

//! Agent sessions (protocol 2, `relay_common::session`): an agent opens one WebSocket on
//! `/server/session` and the requests for its name travel over it as frames: request heads
//! down, whole small responses up, cancel notices, credit, pings. Streaming or large
//! bodies, uploads and tunnels still use the exchanges of protocol 1 under the same ids.
//!
//! This module is the handshake (RFC 6455 §4.2: the upgrade is checked and answered here,
//! the session itself runs in [`run`] once hyper has switched the connection).

pub mod delivery;
pub mod liveness;
pub mod run;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use relay_common::headers::has_token;
use relay_common::session::Heads;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::agent::endpoints::{agent_info, no_store, poller_identity, Query};
use crate::agent::error::AgentCallError;
use crate::agent::registration::AgentProtocol;
use crate::base::auth::Grant;
use crate::base::body::{full, RelayBody};
use crate::State;

/// Answers `/server/session`: checks the caller like a poll (name, token, agent id) and the
/// WebSocket handshake, answers 101 and starts the session on the switched connection.
pub fn serve(
    state: Arc<State>,
    grant: Grant,
    mut req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<RelayBody>, AgentCallError> {
    let q = Query::parse(req.uri().query().unwrap_or(""));
    let (name, agent_id) = poller_identity(&state, &grant, &req, &q)?;
    let key = websocket_key(&req)?;
    if state.draining() {
        // A session now would only be told to go away: the agent should find another
        // replica (or wait for this one's successor).
        return Err(AgentCallError::Draining);
    }
    let info = agent_info(&req, peer, AgentProtocol::Session);
    let carrier = run::Carrier {
        slot: q.slot,
        number: q.session,
        resume: q.resume,
    };
    // RFC 6455 §4.2.2: the server names one of the offered subprotocols, or none.
    let (heads, subprotocol) = Heads::choose(
        req.headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let switch = crate::base::switch::Switch::of(&mut req);
    state.agent_sessions.spawn(run::run(
        state.clone(),
        grant,
        (name, agent_id),
        carrier,
        info,
        (switch, heads),
    ));
    let mut resp = no_store(Response::builder())
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(full(Bytes::new()))
        .expect("bug: static response");
    if let Some(p) = subprotocol {
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok(resp)
}

/// The `Sec-WebSocket-Key` of a valid upgrade request (RFC 6455 §4.2.1), or 426 naming
/// what is missing: a proxy that drops `Upgrade` (nginx without WebSocket settings) gets
/// this answer, and the agent falls back to long polls.
fn websocket_key(req: &Request<Incoming>) -> Result<String, AgentCallError> {
    if req.method() != http::Method::GET
        || !has_token(req.headers(), header::UPGRADE, "websocket")
        || !has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return Err(AgentCallError::UpgradeRequired(
            "an agent session is a WebSocket: send GET with Upgrade: websocket".into(),
        ));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(AgentCallError::UpgradeRequired(
            "only WebSocket version 13 is supported (Sec-WebSocket-Version: 13)".into(),
        ));
    }
    req.headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .map(str::to_owned)
        .ok_or_else(|| AgentCallError::BadRequest("missing Sec-WebSocket-Key".into()))
}

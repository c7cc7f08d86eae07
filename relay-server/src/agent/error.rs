//! Why an agent call was refused or cut short. Each variant maps to the one status the agent
//! acts on: 401 (stop and fix the token), 403 (the name is not this token's, or the
//! authorization service refused the agent), 502 (that service failed), 404 or 410
//! (the request is over: cancel it), 409 (the exchange does not fit the request's state: an
//! offset mismatch, a second exchange at once, an upgrade that did not switch), 400 (a
//! protocol error of the agent, which gives the request up), 426 (a session call that is
//! no WebSocket: fall back to polls) and 503 (shutting down: no new session).

use http::{header, HeaderValue, Response, StatusCode};

use crate::base::body::{text_response, RelayBody};

/// A refused or failed agent call.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// No valid token or client certificate.
    #[error("{0}")]
    Unauthenticated(String),
    /// The agents' authorization service refused the caller (403: the Go client exits).
    #[error("{0}")]
    Unauthorized(String),
    /// The agents' authorization service failed or did not answer in time.
    #[error("the agents' authorization service failed: {0}")]
    AuthService(String),
    /// The token may not serve this name.
    #[error("this token may not serve backend {0:?}")]
    Forbidden(String),
    /// A malformed call or a protocol error in an exchange.
    #[error("{0}")]
    BadRequest(String),
    /// The id never existed, has finished, or belongs to a name the caller may not serve:
    /// one answer for all three, so nothing about other names can be learned from it.
    #[error("unknown request id")]
    UnknownId,
    /// A path under `/server/` that is no endpoint.
    #[error("no such agent endpoint")]
    NoEndpoint,
    /// The call does not fit the request's state now.
    #[error("{0}")]
    Conflict(String),
    /// The body the call asks for is over.
    #[error("{0}")]
    Gone(String),
    /// The user went away while the exchange ran: the agent cancels the request.
    #[error("the user went away; cancel the request")]
    UserGone,
    /// `/server/session` without a WebSocket upgrade (426, RFC 9110 §15.5.22): something
    /// in between dropped the `Upgrade` header; the agent falls back to long polls.
    #[error("{0}")]
    UpgradeRequired(String),
    /// The server is shutting down and opens no session (503: try again or elsewhere).
    #[error("the relay-server is shutting down")]
    Draining,
}

impl AgentCallError {
    /// The one status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            AgentCallError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AgentCallError::Forbidden(_) | AgentCallError::Unauthorized(_) => StatusCode::FORBIDDEN,
            AgentCallError::AuthService(_) => StatusCode::BAD_GATEWAY,
            AgentCallError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentCallError::UnknownId | AgentCallError::NoEndpoint => StatusCode::NOT_FOUND,
            AgentCallError::Conflict(_) => StatusCode::CONFLICT,
            AgentCallError::Gone(_) | AgentCallError::UserGone => StatusCode::GONE,
            AgentCallError::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            AgentCallError::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The text response the agent gets.
    pub fn into_response(self) -> Response<RelayBody> {
        let mut r = text_response(self.status(), &self.to_string());
        if r.status() == StatusCode::UNAUTHORIZED {
            // RFC 9110 §15.5.2: a 401 carries a challenge; RFC 6750 §3 for Bearer.
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if r.status() == StatusCode::UPGRADE_REQUIRED {
            // RFC 9110 §15.5.22: a 426 names the protocol to switch to.
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_has_its_status_and_a_challenge_only_on_401() {
        let cases = [
            (AgentCallError::Unauthenticated("no token".into()), 401),
            (AgentCallError::Forbidden("a".into()), 403),
            (AgentCallError::Unauthorized("no".into()), 403),
            (AgentCallError::AuthService("down".into()), 502),
            (AgentCallError::BadRequest("bad".into()), 400),
            (AgentCallError::UnknownId, 404),
            (AgentCallError::NoEndpoint, 404),
            (AgentCallError::Conflict("offset".into()), 409),
            (AgentCallError::Gone("over".into()), 410),
            (AgentCallError::UserGone, 410),
            (AgentCallError::UpgradeRequired("ws".into()), 426),
            (AgentCallError::Draining, 503),
        ];
        for (e, status) in cases {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(
                r.headers().contains_key(header::WWW_AUTHENTICATE),
                status == 401
            );
        }
    }
}

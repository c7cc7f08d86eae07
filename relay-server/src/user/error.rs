//! Errors the user side can see, each mapped to exactly one status with a one-line body.

use http::{header, HeaderValue, Response, StatusCode};

use crate::base::body::{text_response, RelayBody};
use crate::user::access::AccessError;

/// A failure while relaying one user request. The variant says which side failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The user's request cannot be routed (user side).
    #[error("{0}")]
    BadRequest(String),
    /// No such route (user side).
    #[error("{0}")]
    NotFound(String),
    /// The request target is longer than the limit (user side).
    #[error("the request target is longer than {0} bytes")]
    UriTooLong(usize),
    /// The user is not admitted to the backend (user side).
    #[error(transparent)]
    Access(#[from] crate::user::access::AccessError),
    /// The request uses something the relay does not implement (user side).
    #[error("{0}")]
    NotImplemented(String),
    /// The request body is larger than allowed (user side).
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(u64),
    /// The user stopped sending the request body (user side).
    #[error("the request body stalled for {0:?}")]
    UploadStalled(std::time::Duration),
    /// No agent is connected for the name (agent side, fail fast).
    #[error("no relay-client is connected for backend {0:?}")]
    NoAgent(String),
    /// Agents are connected but none took the request in time (agent side).
    #[error("no relay-client for backend {0:?} picked up the request in time")]
    PickupTimeout(String),
    /// Too many requests waiting (internal limit).
    #[error(transparent)]
    Overloaded(#[from] crate::agent::broker::QueueFull),
    /// The user's address holds as many tunnels as it may (user side).
    #[error(transparent)]
    TooManyTunnels(#[from] crate::base::tunnel_places::TooManyTunnels),
    /// The server is shutting down.
    #[error("the relay is shutting down")]
    Draining,
    /// The agent reported a failure, broke the protocol or vanished before the response
    /// head (agent side).
    #[error("{0}")]
    Agent(String),
    /// The backend answered something the relay cannot pass on (backend side).
    #[error("{0}")]
    Backend(String),
    /// The replica that holds the name failed or could not be reached (cluster).
    #[error("{0}")]
    Replica(String),
    /// The request needs another replica and the cluster directory cannot say which.
    #[error(
        "backend {0:?} is not connected to this relay replica and the cluster directory \
         (Redis) is unreachable; try again shortly"
    )]
    ClusterUnavailable(String),
    /// No response head in time (backend side: the agent passes on what its backend does).
    #[error("the backend did not answer within {0:?}")]
    ResponseTimeout(std::time::Duration),
}

impl RelayError {
    /// The one status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            RelayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RelayError::NotFound(_) => StatusCode::NOT_FOUND,
            RelayError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            RelayError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            RelayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::UploadStalled(_) => StatusCode::REQUEST_TIMEOUT,
            RelayError::Access(AccessError::Unauthenticated(_)) => StatusCode::UNAUTHORIZED,
            RelayError::Access(AccessError::Forbidden(_)) => StatusCode::FORBIDDEN,
            RelayError::Access(AccessError::AuthService(_)) => StatusCode::BAD_GATEWAY,
            RelayError::NoAgent(_)
            | RelayError::PickupTimeout(_)
            | RelayError::Overloaded(_)
            | RelayError::TooManyTunnels(_)
            | RelayError::ClusterUnavailable(_)
            | RelayError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            RelayError::Agent(_) | RelayError::Backend(_) | RelayError::Replica(_) => {
                StatusCode::BAD_GATEWAY
            }
            RelayError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The text response the user sees.
    pub fn into_response(self, retry_after_secs: u64) -> Response<RelayBody> {
        let status = self.status();
        let mut resp = text_response(status, &self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §15.5.2: a 401 carries a challenge; RFC 6750 §3 for Bearer.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"relay\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}

//! A user request's routing pieces, and the routed, admitted request made ready for an
//! agent: upgrade detection, framing checks, body limits and the prefetched body (the
//! headers the backend sees are [`crate::user::forwarded`]'s).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::Empty;
use hyper::body::{Body, Incoming};
use relay_common::headers::{has_token, upgrade_request};
use relay_common::message::Fields;

use crate::base::body::UserBody;
use crate::base::revocation::Admission;
use crate::user::error::RelayError;
use crate::user::forwarded::{backend_headers, Via};
use crate::user::router::{host_backend, route_in, Route, RouteError};
use crate::State;

/// A user request routed, admitted and ready for an agent: what a replica hands to the
/// replica that holds the agent, or to its own broker.
pub struct Prepared {
    /// Backend name.
    pub name: String,
    /// Method.
    pub method: Method,
    /// Backend request target.
    pub target: String,
    /// Headers the backend gets (hop-by-hop removed, `X-Forwarded-*` set): encoded for a
    /// session at once for a plain head, a map otherwise (see [`backend_headers`]).
    pub headers: Fields,
    /// Declared body length.
    pub content_length: Option<u64>,
    /// The protocol of a genuine upgrade request.
    pub upgrade: Option<String>,
    /// The user connection's switch, for upgrade requests.
    pub on_upgrade: Option<crate::base::switch::Switch>,
    /// The request body, when it has one.
    pub body: Option<UserBody>,
    /// When the request arrived (timeouts count from here).
    pub arrival: tokio::time::Instant,
    /// The user's address: the peer's, or behind a trusted proxy the client it names
    /// (whose share of the memory budget the response uses).
    pub client: std::net::IpAddr,
    /// The registration of a request admitted by a revocable credential: a tunnel keeps
    /// it and closes when it is cut.
    pub admission: Option<Arc<Admission>>,
    /// Whether the request has a span to record into (see `downstream::spanned`),
    /// decided once when it arrived.
    pub spanned: bool,
}

/// A user request's body as the connection that read its head hands it over: hyper's, or
/// none (the relay's own HTTP/1.1 front, `crate::front`, takes only bodiless requests).
pub trait RequestBody: Body<Data = Bytes> + Send + Unpin + 'static {
    /// The body with its first frame read; `None` when there is none.
    fn into_user_body(self) -> Result<Option<UserBody>, RelayError>;
}

impl RequestBody for Incoming {
    fn into_user_body(self) -> Result<Option<UserBody>, RelayError> {
        match self.is_end_stream() {
            true => Ok(None),
            false => prefetch(self).map(Some),
        }
    }
}

impl RequestBody for Empty<Bytes> {
    fn into_user_body(self) -> Result<Option<UserBody>, RelayError> {
        Ok(None)
    }
}

/// What a user request is routed by, taken from its head once its framing was checked: the
/// owned pieces its [`Route`] borrows.
pub struct Routing {
    uri: http::Uri,
    server_name: Option<Vec<u8>>,
    host: Option<String>,
}

impl Routing {
    /// The routing pieces of `req`, or why it is refused before routing.
    pub fn of<B: RequestBody>(state: &State, req: &Request<B>) -> Result<Self, RelayError> {
        // RFC 9113 §3.1 / RFC 7540 §3.2: h2c upgrades from users would open an HTTP/2
        // connection that bypasses the relay's routing; only prior knowledge is served.
        if has_token(req.headers(), header::UPGRADE, "h2c") {
            return Err(RelayError::BadRequest(
                "Upgrade: h2c is not supported; use HTTP/2 with prior knowledge".into(),
            ));
        }
        check_framing(req)?;
        if state.draining() {
            return Err(RelayError::Draining);
        }
        // RFC 9110 §15.5.15: a target longer than the server will interpret is 414.
        let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > state.cfg.max_uri_bytes {
            return Err(RelayError::UriTooLong(state.cfg.max_uri_bytes));
        }
        Ok(Routing {
            uri: req.uri().clone(),
            server_name: req
                .headers()
                .get(X_SERVER_NAME)
                .map(|v| v.as_bytes().to_vec()),
            // DNS names are case-insensitive (RFC 4343): `A.relay` and `a.relay` are one
            // backend.
            host: request_host(req).map(str::to_ascii_lowercase),
        })
    }

    /// The backend name and target the request goes to.
    pub fn route(&self, state: &State) -> Result<Route<'_>, RelayError> {
        let host_label = state
            .cfg
            .public_domain
            .as_deref()
            .zip(self.host.as_deref())
            .and_then(|(domain, host)| host_backend(host, domain));
        let mount = state.cfg.base_path.as_deref().unwrap_or("");
        route_in(
            mount,
            self.uri.path(),
            self.uri.query(),
            self.server_name.as_deref(),
            host_label,
        )
        .map_err(|e| match e {
            RouteError::Bad(m) => RelayError::BadRequest(m),
            RouteError::NoRoute(m) => RelayError::NotFound(m),
        })
    }
}

/// Names, not `&str`s: looking a `&str` up parses it into a name first, per request.
const X_SERVER_NAME: http::HeaderName = http::HeaderName::from_static("x-server-name");

/// Everything between admission and the broker: upgrade detection, the backend's headers,
/// body limits.
pub fn prepare<B: RequestBody>(
    state: &State,
    mut req: Request<B>,
    route: crate::user::router::Route<'_>,
    peer: SocketAddr,
    https: bool,
    arrival: tokio::time::Instant,
    spanned: bool,
) -> Result<Prepared, RelayError> {
    // A genuine upgrade (HTTP/1.1, `Connection: upgrade`, no body) is relayed as such; the
    // switch happens only if the backend answers 101. Anything else loses its Upgrade
    // header with the other hop-by-hop headers and is an ordinary request.
    let upgrade = (req.version() == http::Version::HTTP_11 && req.body().is_end_stream())
        .then(|| upgrade_request(req.headers()))
        .flatten();
    let mut on_upgrade = upgrade
        .as_ref()
        .map(|_| crate::base::switch::Switch::of(&mut req));
    let (parts, body) = req.into_parts();
    let trusted = state.auth().trusts(peer.ip());
    let via = Via {
        peer,
        https,
        prefix: route.prefix,
        trusted,
    };
    let (headers, client) = backend_headers(&parts, &via, upgrade.as_deref())?;
    // A tunnel's place under its address's allowance, taken before the backend is asked:
    // past it the backend never hears of the request. Held until the tunnel closes, or
    // freed with the switch when the backend does not switch.
    if let Some(switch) = &mut on_upgrade {
        let place = state.tunnel_places.take(client).inspect_err(|_| {
            state.metrics.rejected("tunnels_per_ip");
        })?;
        switch.hold(place);
    }
    let content_length = body.size_hint().exact();
    // RFC 9110 §15.5.14: refuse a declared oversize body before anything is relayed.
    if let (Some(n), Some(max)) = (content_length, state.cfg.max_request_body) {
        if n > max {
            return Err(RelayError::PayloadTooLarge(max));
        }
    }
    let body = body.into_user_body()?;
    Ok(Prepared {
        name: route.name.to_owned(),
        method: parts.method,
        target: route.target,
        headers,
        content_length,
        upgrade,
        on_upgrade,
        body,
        arrival,
        client,
        admission: None,
        spanned,
    })
}

/// The user's body with its first frame read (see [`UserBody::prefetch`]).
pub fn prefetch(body: Incoming) -> Result<UserBody, RelayError> {
    UserBody::prefetch(body).map_err(|e| {
        RelayError::BadRequest(format!("the request body's framing is malformed: {e}"))
    })
}

/// Refuses HTTP/1.1 framing that hyper accepts but the relay cannot pass on faithfully.
/// RFC 9112 §6.1: a transfer coding other than the final `chunked` is not understood here
/// (501), since the backend would get undecoded bytes without knowing. (Both
/// Transfer-Encoding and Content-Length: hyper frames by Transfer-Encoding, drops
/// Content-Length and closes the connection after the answer, RFC 9112 §6.3.)
pub fn check_framing<B: hyper::body::Body>(req: &Request<B>) -> Result<(), RelayError> {
    // A bodiless request has no Transfer-Encoding: hyper gives a request with one a chunked
    // body or refuses it (RFC 9112 §6.1), so the lookup is spared for most requests.
    if req.version() >= http::Version::HTTP_2 || req.body().is_end_stream() {
        return Ok(());
    }
    let h = req.headers();
    let te: Vec<_> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    if te.is_empty() {
        return Ok(());
    }
    let codings: Vec<String> = te
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    if codings != ["chunked"] {
        return Err(RelayError::NotImplemented(format!(
            "transfer coding {:?} is not supported; only chunked is",
            codings.join(", ")
        )));
    }
    Ok(())
}

/// The host the user addressed: `:authority` (HTTP/2, RFC 9113 §8.3.1) or `Host`.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

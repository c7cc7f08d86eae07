//! The user side: route a request to a backend name, queue it for an agent, and turn the
//! agent's answer into the user's response.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use relay_common::headers::{
    has_token, set_upgrade_headers, strip_hop_by_hop, upgrade_matches, upgrade_request,
};
use relay_common::id::RequestId;
use relay_common::message::{decode_headers, encode_headers, BodyKind, RequestHead};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::agent::pending::Pending;
use crate::agent::response_side::ResponseStart;
use crate::agent::upload_side::{UploadFailure, UploadSide};
use crate::base::body::{empty, RelayBody, RelayedBody, UserBody};
use crate::user::access::{
    check_link, check_token, strip_session_cookie, AccessError, AccessMode, Verdict, TOKEN_HEADER,
};
use crate::user::error::RelayError;
use crate::user::forward_auth::Original;
use crate::user::router::{host_backend, route, RouteError};
use crate::State;

/// Relays one user request: routes and admits it, hands the prepared request to `onward`
/// (which finds the agent, here or on another replica) and answers with its response;
/// every failure becomes its status and text body.
pub async fn handle<F, Fut>(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
    onward: F,
) -> Response<RelayBody>
where
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: std::future::Future<Output = Result<Response<RelayBody>, RelayError>>,
{
    let retry_after = state.cfg.retry_after_secs;
    let http1 = req.version() < http::Version::HTTP_2;
    // hyper knows at the head whether a body follows (no Content-Length or `0`, no
    // Transfer-Encoding: RFC 9112 §6.3).
    let bodiless = hyper::body::Body::is_end_stream(req.body());
    let method = req.method().clone();
    let mut name = None;
    let span = tracing::info_span!(
        "request",
        method = %method,
        id = tracing::field::Empty,
        backend = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(trace) = trace_id(req.headers()) {
        span.record("trace_id", trace);
    }
    let started = std::time::Instant::now();
    let result = relay(state.clone(), req, peer, https, &mut name, onward)
        .instrument(span.clone())
        .await;
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    span.in_scope(|| {
        tracing::debug!(
            target: "relay_server::user::access",
            status,
            ms = started.elapsed().as_millis() as u64,
            "answered"
        )
    });
    // Only names with agents become label values (bounded cardinality).
    let label = name.filter(|n| state.broker.is_connected(n));
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            state.metrics.request(label.as_deref(), &method, status);
            state.metrics.history.record(label.as_deref(), status, None);
            resp
        }
        Err(e) => {
            tracing::debug!(error = %e, "user request failed");
            let m = &state.metrics;
            let status = e.status().as_u16();
            m.request(label.as_deref(), &method, status);
            m.history
                .record(label.as_deref(), status, Some(&e.to_string()));
            match &e {
                RelayError::Access(AccessError::AuthService(_)) => {}
                RelayError::Access(_) => m.auth_failure("user"),
                RelayError::Overloaded(_) => m.rejected("parked_requests"),
                RelayError::PayloadTooLarge(_) => m.rejected("request_body"),
                RelayError::UploadStalled(_) => m.rejected("upload_inactivity"),
                RelayError::UriTooLong(_) => m.rejected("uri_length"),
                _ => {}
            }
            let malformed = status == StatusCode::BAD_REQUEST.as_u16();
            let mut resp = e.into_response(retry_after);
            if http1 && (malformed || !bodiless) {
                // A request body may be unread, and closing is the only way to never parse
                // its bytes as a next request (RFC 9112 §9.6); a malformed head says the
                // client and the relay may not agree on where this request ends. Any other
                // refusal of a bodiless request (no agent, no access, a timeout) keeps the
                // connection, so a client retrying after a 503 does not reconnect.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    }
}

async fn relay<F, Fut>(
    state: Arc<State>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
    routed: &mut Option<String>,
    onward: F,
) -> Result<Response<RelayBody>, RelayError>
where
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: std::future::Future<Output = Result<Response<RelayBody>, RelayError>>,
{
    let arrival = tokio::time::Instant::now();
    // RFC 9113 §3.1 / RFC 7540 §3.2: h2c upgrades from users would open an HTTP/2
    // connection that bypasses the relay's routing; only prior knowledge is served.
    if has_token(req.headers(), header::UPGRADE, "h2c") {
        return Err(RelayError::BadRequest(
            "Upgrade: h2c is not supported; use HTTP/2 with prior knowledge".into(),
        ));
    }
    check_framing(&req)?;
    if state.draining() {
        return Err(RelayError::Draining);
    }
    // RFC 9110 §15.5.15: a target longer than the server will interpret is 414.
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > state.cfg.max_uri_bytes {
        return Err(RelayError::UriTooLong(state.cfg.max_uri_bytes));
    }
    let uri = req.uri().clone();
    let server_name = req
        .headers()
        .get("x-server-name")
        .map(|v| v.as_bytes().to_vec());
    // DNS names are case-insensitive (RFC 4343): `A.relay` and `a.relay` are one backend.
    let host = request_host(&req).map(str::to_ascii_lowercase);
    let host_label = state
        .cfg
        .public_domain
        .as_deref()
        .zip(host.as_deref())
        .and_then(|(domain, host)| host_backend(host, domain));
    let route = route(uri.path(), uri.query(), server_name.as_deref(), host_label).map_err(
        |e| match e {
            RouteError::Bad(m) => RelayError::BadRequest(m),
            RouteError::NoRoute(m) => RelayError::NotFound(m),
        },
    )?;
    let name = route.name.to_owned();
    *routed = Some(name.clone());
    tracing::Span::current().record("backend", name.as_str());
    // Access first: before it, nothing tells whether the name has an agent.
    if let Verdict::Respond(resp) = admit(&state, &route, &mut req, peer, https).await? {
        return Ok(resp);
    }
    let prepared = prepare(&state, req, route, peer, https, arrival)?;
    onward(state, prepared).await
}

/// A user request routed, admitted and ready for an agent: what a replica hands to the
/// replica that holds the agent, or to its own broker.
pub struct Prepared {
    /// Backend name.
    pub name: String,
    /// Method.
    pub method: Method,
    /// Backend request target.
    pub target: String,
    /// Headers the backend gets (hop-by-hop removed, `X-Forwarded-*` set).
    pub headers: HeaderMap,
    /// Declared body length.
    pub content_length: Option<u64>,
    /// The protocol of a genuine upgrade request.
    pub upgrade: Option<String>,
    /// The user connection's switch, for upgrade requests.
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The request body, when it has one.
    pub body: Option<UserBody>,
    /// When the request arrived (timeouts count from here).
    pub arrival: tokio::time::Instant,
}

/// Everything between admission and the broker: upgrade detection, the backend's headers,
/// body limits.
fn prepare(
    state: &State,
    mut req: Request<Incoming>,
    route: crate::user::router::Route<'_>,
    peer: SocketAddr,
    https: bool,
    arrival: tokio::time::Instant,
) -> Result<Prepared, RelayError> {
    // A genuine upgrade (HTTP/1.1, `Connection: upgrade`, no body) is relayed as such; the
    // switch happens only if the backend answers 101. Anything else loses its Upgrade
    // header with the other hop-by-hop headers and is an ordinary request.
    let upgrade = (req.version() == http::Version::HTTP_11 && req.body().is_end_stream())
        .then(|| upgrade_request(req.headers()))
        .flatten();
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let trusted = state
        .cfg
        .trusted_proxies
        .iter()
        .any(|c| c.contains(peer.ip()));
    let mut headers = forward_headers(&parts, peer, https, route.prefix, trusted)?;
    if let Some(proto) = &upgrade {
        set_upgrade_headers(&mut headers, proto);
    }
    let content_length = body.size_hint().exact();
    // RFC 9110 §15.5.14: refuse a declared oversize body before anything is relayed.
    if let (Some(n), Some(max)) = (content_length, state.cfg.max_request_body) {
        if n > max {
            return Err(RelayError::PayloadTooLarge(max));
        }
    }
    let body = if body.is_end_stream() {
        None
    } else {
        Some(prefetch(body)?)
    };
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
    })
}

/// The user's body with its first frame read (see [`UserBody::prefetch`]).
pub fn prefetch(body: Incoming) -> Result<UserBody, RelayError> {
    UserBody::prefetch(body).map_err(|e| {
        RelayError::BadRequest(format!("the request body's framing is malformed: {e}"))
    })
}

/// Queues a prepared request for `backend`'s agents and turns their answer into the
/// response.
pub async fn dispatch(
    state: &Arc<State>,
    backend: &Arc<crate::agent::broker::Backend>,
    p: Prepared,
) -> Result<Response<RelayBody>, RelayError> {
    let Prepared {
        name,
        method,
        target,
        headers,
        content_length,
        upgrade,
        on_upgrade,
        body,
        arrival,
    } = p;
    let is_head = method == Method::HEAD;
    let body_kind = match body {
        Some(_) => BodyKind::Stream,
        None => BodyKind::Empty,
    };
    let id = match &state.cluster {
        Some(c) => RequestId::tagged(c.tag()),
        None => RequestId::random(),
    };
    tracing::Span::current().record("id", tracing::field::display(id));
    let head = RequestHead {
        id: id.to_string(),
        method: method.as_str().to_owned(),
        target,
        headers: encode_headers(&headers),
        body: body_kind,
        content_length: content_length.filter(|_| body_kind == BodyKind::Stream),
        upgrade: upgrade.clone(),
    };
    let upload = match body {
        Some(body) => UploadSide::body(body),
        None if upgrade.is_some() => UploadSide::awaiting_upgrade(),
        None => UploadSide::none(),
    };
    let response_timeout = match upgrade {
        Some(_) => state.cfg.upgrade_response_timeout,
        None => state.cfg.response_timeout,
    };
    let (head_tx, head_rx) = oneshot::channel();
    let pending = Pending::new(id, name.clone(), head, upload, head_tx);
    let (guard, claimed) = state.broker.enqueue(backend, pending)?;
    let pending = guard.pending().clone();

    let agent = tokio::select! {
        a = claimed => a.map_err(|_| RelayError::PickupTimeout(name.clone()))?,
        _ = tokio::time::sleep(state.cfg.pickup_timeout) => {
            return Err(RelayError::PickupTimeout(name));
        }
        _ = state.stop.cancelled() => return Err(RelayError::Draining),
    };
    state.metrics.pickup(arrival.elapsed());

    let start = tokio::select! {
        r = head_rx => r.map_err(|_| RelayError::BadGateway(
            "the relay-client failed before sending a response head".into()))?,
        _ = tokio::time::sleep_until(arrival + response_timeout) => {
            return Err(RelayError::ResponseTimeout(response_timeout));
        }
        _ = agent.gone.cancelled() => {
            return Err(RelayError::BadGateway("the relay-client disconnected".into()));
        }
        why = pending.upload.failed() => {
            return Err(match why {
                UploadFailure::TooLarge(n) => RelayError::PayloadTooLarge(n),
                UploadFailure::Stalled(d) => RelayError::UploadStalled(d),
                UploadFailure::Malformed => RelayError::BadRequest(
                    "the request body's framing is malformed".into(),
                ),
            });
        }
    };
    let (head, body_rx) = match start {
        ResponseStart::Head(head, rx) => {
            state.metrics.head(arrival.elapsed());
            (head, rx)
        }
        ResponseStart::Abort(why) => {
            return Err(RelayError::BadGateway(format!(
                "the relay-client failed: {why}"
            )))
        }
    };

    let mut resp_headers = decode_headers(&head.headers)
        .map_err(|e| RelayError::BadGateway(format!("the relay-client sent an {e}")))?;
    if head.status == 101 {
        return switch(
            state,
            resp_headers,
            upgrade,
            on_upgrade,
            body_rx,
            guard,
            agent,
        );
    }
    strip_hop_by_hop(&mut resp_headers, false);
    let status = StatusCode::from_u16(head.status)
        .ok()
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| {
            RelayError::BadGateway(format!(
                "the backend answered status {} to a request that did not ask to upgrade",
                head.status
            ))
        })?;
    // RFC 9110 §8.6: a HEAD or 304 response may carry the length the body would have had.
    if let Some(n) = head.content_length {
        if head.body == BodyKind::Stream || is_head || status == StatusCode::NOT_MODIFIED {
            resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    let body = match body_rx {
        Some(rx) => {
            RelayedBody::new(rx, head.content_length, agent.gone.clone(), guard).boxed_unsync()
        }
        None => {
            drop(guard);
            empty()
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    Ok(resp)
}

/// Answers 101 and hands the connection to a tunnel, if the user asked for exactly this
/// switch (RFC 9110 §15.2.2: the server switches to one of the protocols in `Upgrade`).
/// Otherwise the 101 is a protocol violation of the backend: 502, no tunnel.
#[allow(clippy::too_many_arguments)]
fn switch(
    state: &Arc<State>,
    mut headers: HeaderMap,
    requested: Option<String>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    body_rx: Option<tokio::sync::mpsc::Receiver<crate::base::body::Delivery>>,
    guard: crate::agent::pending::PendingGuard,
    agent: Arc<crate::agent::broker::Agent>,
) -> Result<Response<RelayBody>, RelayError> {
    let answered = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (Some(requested), Some(on_upgrade)) = (requested, on_upgrade) else {
        return Err(RelayError::BadGateway(
            "the backend answered 101 to a request that did not ask to upgrade".into(),
        ));
    };
    if !upgrade_matches(&requested, &answered) {
        return Err(RelayError::BadGateway(format!(
            "the backend switched to {answered:?}, which the user did not ask for"
        )));
    }
    strip_hop_by_hop(&mut headers, false);
    set_upgrade_headers(&mut headers, &answered);
    state.tunnels.spawn(crate::user::tunnel::bridge(
        on_upgrade,
        body_rx,
        guard,
        agent.gone.clone(),
        state.cfg.tunnel_idle_timeout,
        state.stop.clone(),
    ));
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// The trace id of a W3C `traceparent` header (Trace Context §3.2), for log correlation.
/// The header itself passes to the backend untouched.
fn trace_id(h: &HeaderMap) -> Option<&str> {
    let v = h.get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Refuses HTTP/1.1 framing that hyper accepts but the relay cannot pass on faithfully.
/// RFC 9112 §6.1: a transfer coding other than the final `chunked` is not understood here
/// (501), since the backend would get undecoded bytes without knowing. (Both
/// Transfer-Encoding and Content-Length: hyper frames by Transfer-Encoding, drops
/// Content-Length and closes the connection after the answer, RFC 9112 §6.3.)
fn check_framing<B>(req: &Request<B>) -> Result<(), RelayError> {
    if req.version() >= http::Version::HTTP_2 {
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

/// Applies the access mode of the route's name to the request.
async fn admit(
    state: &State,
    route: &crate::user::router::Route<'_>,
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    https: bool,
) -> Result<Verdict, RelayError> {
    let name = route.name;
    let path = route.target.split('?').next().unwrap_or("/");
    let auth = state.auth();
    Ok(match auth.access.mode(name) {
        AccessMode::Open => Verdict::Admit,
        AccessMode::Token => {
            check_token(&auth.user_tokens, name, req.headers_mut())?;
            Verdict::Admit
        }
        AccessMode::SignedLink => {
            let cookie_path = match route.prefix {
                Some(p) => format!("{p}/"),
                None => "/".to_owned(),
            };
            check_link(
                &state.sessions,
                name,
                path,
                req.uri().query(),
                req.headers(),
                &cookie_path,
                https,
            )
            .await?
        }
        AccessMode::ForwardAuth => {
            let fa = state.forward_auth.as_ref().ok_or_else(|| {
                RelayError::from(AccessError::AuthService(
                    "forward-auth is not configured".into(),
                ))
            })?;
            let uri = req.uri().clone();
            let host = req.headers().get(header::HOST).cloned();
            let method = req.method().clone();
            let orig = Original {
                method: &method,
                uri: uri.path_and_query().map_or("/", |pq| pq.as_str()),
                host: host.as_ref(),
                peer,
                https,
            };
            fa.check(&orig, req.headers_mut()).await?
        }
    })
}

/// The request headers the backend sees: hop-by-hop and framing removed (RFC 9110 §7.6.1),
/// then the relay's own `X-Forwarded-*` (added after stripping, so `Connection` cannot
/// remove them).
fn forward_headers(
    req: &http::request::Parts,
    peer: SocketAddr,
    https: bool,
    prefix: Option<&str>,
    trusted: bool,
) -> Result<HeaderMap, RelayError> {
    let mut h = req.headers.clone();
    if h.get_all(header::HOST).iter().count() > 1 {
        return Err(RelayError::BadRequest("more than one Host header".into()));
    }
    strip_hop_by_hop(&mut h, true);
    if !trusted {
        // Only a trusted proxy may speak for the client (RFC 7239 §8.1).
        for name in FORWARDING_HEADERS {
            h.remove(*name);
        }
    }
    // The relay's own credentials never reach the backend, whatever the access mode.
    h.remove(TOKEN_HEADER);
    strip_session_cookie(&mut h);
    // HTTP/2 carries the host in :authority (RFC 9113 §8.3.1); give the backend a Host.
    if !h.contains_key(header::HOST) {
        if let Some(auth) = req.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                h.insert(header::HOST, v);
            }
        }
    }
    append(&mut h, "x-forwarded-for", &peer.ip().to_string());
    if !h.contains_key("x-forwarded-proto") {
        let proto = if https { "https" } else { "http" };
        h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    if !h.contains_key("x-forwarded-host") {
        if let Some(host) = h.get(header::HOST).cloned() {
            h.insert("x-forwarded-host", host);
        }
    }
    if let Some(prefix) = prefix {
        h.insert(
            "x-forwarded-prefix",
            HeaderValue::from_str(prefix).expect("bug: a valid name makes a valid prefix"),
        );
    }
    Ok(h)
}

/// Headers that describe the client to the backend; dropped from untrusted peers.
const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
];

/// Appends to a comma-separated list header (RFC 9110 §5.3), keeping one field line.
fn append(h: &mut HeaderMap, name: &'static str, value: &str) {
    let joined = match h.get(name).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {value}"),
        None => value.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        h.insert(name, v);
    }
}

//! The entry of a user request: route it to a backend name, apply the name's access mode,
//! prepare it and hand it on; count and log how it was answered.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use relay_common::headers::has_token;
use tracing::Instrument;

use crate::base::body::{RelayBody, Revocable};
use crate::base::revocation::Credential;
use crate::user::access::{check_link, check_token, AccessError, AccessMode, Verdict};
use crate::user::error::RelayError;
use crate::user::forward_auth::Original;
use crate::user::prepare::{check_framing, prepare, request_host, Prepared, RequestBody};
use crate::user::router::{host_backend, route_in, RouteError};
use crate::State;
use http_body_util::BodyExt;

/// Relays one user request: routes and admits it, hands the prepared request to `onward`
/// (which finds the agent, here or on another replica) and answers with its response;
/// every failure becomes its status and text body.
///
/// Not an `async fn`, nor is `relay`: one keeps each argument twice in its future (the
/// argument and the local it is moved into), and the request is 240 bytes.
#[allow(clippy::manual_async_fn)] // the arguments once, not twice (see above)
pub fn handle<B, F, Fut>(
    state: Arc<State>,
    req: Request<B>,
    peer: SocketAddr,
    https: bool,
    onward: F,
) -> impl std::future::Future<Output = Response<RelayBody>>
where
    B: RequestBody,
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: std::future::Future<Output = Result<Response<RelayBody>, RelayError>>,
{
    async move {
        let retry_after = state.cfg.retry_after_secs;
        let http1 = req.version() < http::Version::HTTP_2;
        // hyper knows at the head whether a body follows (no Content-Length or `0`, no
        // Transfer-Encoding: RFC 9112 §6.3).
        let bodiless = hyper::body::Body::is_end_stream(req.body());
        let method = req.method().clone();
        let mut name = None;
        let spanned = spanned();
        let span = match spanned {
            true => tracing::info_span!(
                "request",
                otel.kind = "server",
                method = %method,
                path = %req.uri().path(),
                id = tracing::field::Empty,
                backend = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                status = tracing::field::Empty,
            ),
            false => tracing::Span::none(),
        };
        // Only a span records it: without one the lookup is work for nothing.
        if let Some(trace) = spanned.then(|| trace_id(req.headers())).flatten() {
            span.record("trace_id", trace);
        }
        // Traces on: the span continues the user's trace (or starts one).
        relay_config_file::telemetry::continue_trace(&span, req.headers());
        // Read only for the access line (a clock read per request otherwise).
        let started = spanned.then(std::time::Instant::now);
        // Without a span, not wrapped: `Instrumented` takes the request's future by value (a
        // copy of its 4.8 KB) and enters the empty span at every poll. (Built in each arm: a
        // named future would keep a second 4.8 KB slot in this one.)
        let result = match spanned {
            true => {
                relay(state.clone(), req, peer, https, spanned, &mut name, onward)
                    .instrument(span.clone())
                    .await
            }
            false => relay(state.clone(), req, peer, https, spanned, &mut name, onward).await,
        };
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().as_u16(),
        };
        span.record("status", status);
        span.in_scope(|| {
            tracing::debug!(
                target: "relay_server::user::access",
                status,
                ms = started.map_or(0, |s| s.elapsed().as_millis() as u64),
                "answered"
            )
        });
        // Only names with agents become label values (bounded cardinality).
        let backend = name.as_deref().and_then(|n| state.broker.connected(n));
        let label = backend.as_deref().and_then(|b| b.label());
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                state.metrics.request(label, &method, status);
                state.metrics.record(label, status, None);
                resp
            }
            Err(e) => {
                tracing::debug!(error = %e, "user request failed");
                let m = &state.metrics;
                let status = e.status().as_u16();
                m.request(label, &method, status);
                m.record(label, status, Some(&e.to_string()));
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
}

#[allow(clippy::manual_async_fn)] // the arguments once, not twice (see above)
fn relay<'a, B, F, Fut>(
    state: Arc<State>,
    mut req: Request<B>,
    peer: SocketAddr,
    https: bool,
    spanned: bool,
    routed: &'a mut Option<String>,
    onward: F,
) -> impl std::future::Future<Output = Result<Response<RelayBody>, RelayError>> + 'a
where
    B: RequestBody,
    F: FnOnce(Arc<State>, Prepared) -> Fut + 'a,
    Fut: std::future::Future<Output = Result<Response<RelayBody>, RelayError>> + 'a,
{
    async move {
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
            .get(X_SERVER_NAME)
            .map(|v| v.as_bytes().to_vec());
        // DNS names are case-insensitive (RFC 4343): `A.relay` and `a.relay` are one backend.
        let host = request_host(&req).map(str::to_ascii_lowercase);
        let host_label = state
            .cfg
            .public_domain
            .as_deref()
            .zip(host.as_deref())
            .and_then(|(domain, host)| host_backend(host, domain));
        let mount = state.cfg.base_path.as_deref().unwrap_or("");
        let route = route_in(
            mount,
            uri.path(),
            uri.query(),
            server_name.as_deref(),
            host_label,
        )
        .map_err(|e| match e {
            RouteError::Bad(m) => RelayError::BadRequest(m),
            RouteError::NoRoute(m) => RelayError::NotFound(m),
        })?;
        let name = route.name.to_owned();
        *routed = Some(name.clone());
        // Looked up only when there is one: the lookup costs a thread-local registry walk.
        if spanned {
            tracing::Span::current().record("backend", name.as_str());
        }
        // Access first: before it, nothing tells whether the name has an agent.
        let credential = match admit(&state, &route, &mut req, peer, https).await? {
            (Verdict::Respond(resp), _) => return Ok(resp),
            (Verdict::Admit, credential) => credential,
        };
        // A request admitted by a credential stays registered while it runs, so a reload that
        // revokes the credential ends it (its body aborts, its tunnel closes).
        let admission = credential.map(|c| state.revocations.admit(c, &name));
        let mut prepared = prepare(&state, req, route, peer, https, arrival, spanned)?;
        prepared.admission = admission.clone();
        let resp = onward(state, prepared).await?;
        Ok(match admission {
            Some(a) if resp.status() != StatusCode::SWITCHING_PROTOCOLS => {
                resp.map(|b| Revocable::new(b, a).boxed_unsync())
            }
            _ => resp,
        })
    }
}

/// Names, not `&str`s: looking a `&str` up parses it into a name first, per request.
const X_SERVER_NAME: http::HeaderName = http::HeaderName::from_static("x-server-name");
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The trace id of a W3C `traceparent` header (Trace Context §3.2), for log correlation.
/// The header itself passes to the backend untouched.
fn trace_id(h: &HeaderMap) -> Option<&str> {
    let v = h.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Applies the access mode of the route's name to the request; says which of the relay's
/// credentials admitted it, if one did.
async fn admit<B>(
    state: &State,
    route: &crate::user::router::Route<'_>,
    req: &mut Request<B>,
    peer: SocketAddr,
    https: bool,
) -> Result<(Verdict, Option<Credential>), RelayError> {
    let name = route.name;
    let path = route.target.split('?').next().unwrap_or("/");
    let auth = state.auth();
    Ok(match auth.access.mode(name) {
        AccessMode::Open => (Verdict::Admit, None),
        AccessMode::Token => {
            let digest = check_token(&auth.user_tokens, name, req.headers_mut())?;
            (Verdict::Admit, Some(Credential::UserToken(digest)))
        }
        AccessMode::SignedLink => {
            let cookie_path = match route.prefix {
                Some(p) => format!("{p}/"),
                None => "/".to_owned(),
            };
            // Read before the check: a key replaced meanwhile revokes the request at once.
            let key = Credential::LinkKey(state.sessions.key_tag());
            let verdict = check_link(
                &state.sessions,
                name,
                path,
                req.uri().query(),
                req.headers(),
                &cookie_path,
                https,
            )
            .await?;
            (verdict, Some(key))
        }
        AccessMode::ForwardAuth => {
            let auth = state.auth();
            let fa = auth.forward_auth.as_ref().ok_or_else(|| {
                RelayError::from(AccessError::AuthService(
                    "forward-auth is not configured".into(),
                ))
            })?;
            let uri = req.uri().clone();
            // The host the request was routed by (RFC 9112 §3.2.2: an absolute-form target's
            // authority wins over Host), so the service judges what will be served.
            let host = request_host(req).map(str::to_owned);
            let method = req.method().clone();
            let trusted = auth.trusts(peer.ip());
            let orig = Original {
                method: &method,
                uri: uri.path_and_query().map_or("/", |pq| pq.as_str()),
                host: host.as_deref(),
                peer,
                https,
                trusted,
            };
            (fa.check(&orig, req.headers_mut()).await?, None)
        }
    })
}

/// Whether a request gets a span: when something reads it (exported traces, the access
/// lines or debug lines). At the default level no line inside a request needs it (the few
/// warnings name the request themselves), and the fmt layer formats a span's fields at
/// every record: ≈ 9 000 instructions of a small request's ≈ 147 000.
pub(crate) fn spanned() -> bool {
    relay_config_file::telemetry::enabled()
        || tracing::enabled!(target: "relay_server::user::access", tracing::Level::DEBUG)
        || tracing::enabled!(tracing::Level::DEBUG)
}

//! The entry of a user request: route it to a backend name, apply the name's access mode,
//! prepare it and hand it on; count and log how it was answered.

use std::future::{Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::{Either, Map};
use futures_util::FutureExt;

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use tracing::Instrument;

use crate::base::body::{RelayBody, Revocable};
use crate::base::revocation::Credential;
use crate::user::access::{check_link, check_token, AccessError, AccessMode, Verdict};
use crate::user::error::RelayError;
use crate::user::forward_auth::Original;
use crate::user::prepare::{prepare, request_host, Prepared, RequestBody, Routing};
use crate::user::router::Route;
use crate::State;
use http_body_util::BodyExt;

/// Relays one user request: routes and admits it, hands the prepared request to `onward`
/// (which finds the agent, here or on another replica) and answers with its response;
/// every failure becomes its status and text body.
///
/// Built from combinators, not `async` blocks: the request is routed, admitted (when its
/// name's access mode needs no wait) and handed on when the future is made, so the future
/// keeps only `onward`'s future and what the answer needs. An `async` block keeps every
/// value it took (the request, 264 bytes; the prepared request, 440) and every local with a
/// destructor for its whole life, moved on or not: it was 3.2 KB per request in flight,
/// half of a burst's memory (`docs/PERFORMANCE.md`).
///
/// That work starts when the future is first polled, not when it is made: hyper reads what
/// follows the head (a body's first chunk) before it polls the request, and a body whose
/// framing is malformed must fail the request before any agent sees it. The future is one
/// of two states, the request or what it became, so the two share their bytes.
///
/// The functions that build the future are inlined into one another: each one's return of
/// it by value was a copy of its 960 bytes (callgrind: 1 000 of a small request's 42 000
/// instructions).
pub fn handle<B, F, Fut>(
    state: Arc<State>,
    req: Request<B>,
    peer: SocketAddr,
    https: bool,
    onward: F,
) -> impl Future<Output = Response<RelayBody>>
where
    B: RequestBody,
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: Future<Output = Answer>,
{
    // The closure is the request's first poll, inlined as the functions below are.
    futures_util::future::lazy(
        #[inline(always)]
        move |_| {
            let retry_after = state.cfg.retry_after_secs;
            let http1 = req.version() < http::Version::HTTP_2;
            // hyper knows at the head whether a body follows (no Content-Length or `0`, no
            // Transfer-Encoding: RFC 9112 §6.3).
            let bodiless = hyper::body::Body::is_end_stream(req.body());
            let method = req.method().clone();
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
            let (name, relayed) = match spanned {
                true => span.in_scope(|| relay(state.clone(), req, peer, https, spanned, onward)),
                false => relay(state.clone(), req, peer, https, spanned, onward),
            };
            let answer = {
                let span = span.clone();
                move |result: Answer| {
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
                    answered(
                        &state,
                        &method,
                        name.as_deref(),
                        result,
                        http1,
                        bodiless,
                        retry_after,
                    )
                }
            };
            // Without a span, not wrapped: `Instrumented` enters the empty span at every poll.
            match spanned {
                true => Either::Left(relayed.instrument(span).map(answer)),
                false => Either::Right(relayed.map(answer)),
            }
        },
    )
    .flatten()
}

/// The user's response to a relayed request's result, counted in the metrics.
fn answered(
    state: &State,
    method: &http::Method,
    name: Option<&str>,
    result: Answer,
    http1: bool,
    bodiless: bool,
    retry_after: u64,
) -> Response<RelayBody> {
    // Only names with agents become label values (bounded cardinality).
    let backend = name.and_then(|n| state.broker.connected(n));
    let label = backend.as_deref().and_then(|b| b.label());
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            state.metrics.request(label, method, status);
            state.metrics.record(label, status, None);
            resp
        }
        Err(e) => {
            tracing::debug!(error = %e, "user request failed");
            let m = &state.metrics;
            let status = e.status().as_u16();
            m.request(label, method, status);
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

/// A relayed request's result.
type Answer = Result<Response<RelayBody>, RelayError>;

/// A relayed request's future: answered at once (refused, or answered by the access check),
/// the onward future of a request admitted at once, or the whole of it boxed when its
/// name's access mode waits for a service or a key (signed links, forward-auth).
type Relayed<Fut, G, S> = Either<Ready<Answer>, Either<Map<Fut, G>, Pin<Box<S>>>>;

/// Routes, admits and prepares a user request and hands it to `onward`; the backend name
/// it was routed to, if it was, and the future of its result. See [`handle`] for why the
/// work is done here and not in the future.
#[inline(always)] // the future it returns built in place, not copied out (see `handle`)
fn relay<B, F, Fut>(
    state: Arc<State>,
    mut req: Request<B>,
    peer: SocketAddr,
    https: bool,
    spanned: bool,
    onward: F,
) -> (
    Option<String>,
    Relayed<Fut, impl FnOnce(Answer) -> Answer, impl Future<Output = Answer>>,
)
where
    B: RequestBody,
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: Future<Output = Answer>,
{
    let arrival = tokio::time::Instant::now();
    let done = |r| Either::Left(std::future::ready(r));
    let routing = match Routing::of(&state, &req) {
        Ok(r) => r,
        Err(e) => return (None, done(Err(e))),
    };
    let route = match routing.route(&state) {
        Ok(r) => r,
        Err(e) => return (None, done(Err(e))),
    };
    let name = route.name.to_owned();
    // Looked up only when there is one: the lookup costs a thread-local registry walk.
    if spanned {
        tracing::Span::current().record("backend", name.as_str());
    }
    // Access first: before it, nothing tells whether the name has an agent.
    let admitted = match admit_now(&state, &route, &mut req) {
        Ok(admitted) => admitted,
        Err(waiting) => {
            drop(route);
            let admitting = async move {
                let route = routing.route(&state)?;
                match admit(waiting, &state, &route, &mut req, peer, https).await? {
                    (Verdict::Respond(resp), _) => Ok(resp),
                    (Verdict::Admit, credential) => {
                        let hand_on = (state.clone(), req, route, credential);
                        onward_admitted(hand_on, peer, https, arrival, spanned, onward)?.await
                    }
                }
            };
            return (
                Some(name),
                Either::Right(Either::Right(Box::pin(admitting))),
            );
        }
    };
    let relayed = match admitted {
        Ok((Verdict::Respond(resp), _)) => done(Ok(resp)),
        Ok((Verdict::Admit, credential)) => {
            let hand_on = (state, req, route, credential);
            match onward_admitted(hand_on, peer, https, arrival, spanned, onward) {
                Ok(fut) => Either::Right(Either::Left(fut)),
                Err(e) => done(Err(e)),
            }
        }
        Err(e) => done(Err(e)),
    };
    (Some(name), relayed)
}

/// An admitted request prepared and handed to `onward`: the future of its response. A
/// request admitted by a credential stays registered while it runs, so a reload that
/// revokes the credential ends it (its body aborts, its tunnel closes).
#[inline(always)] // the future it returns built in place, not copied out (see `handle`)
fn onward_admitted<B, F, Fut>(
    (state, req, route, credential): (Arc<State>, Request<B>, Route<'_>, Option<Credential>),
    peer: SocketAddr,
    https: bool,
    arrival: tokio::time::Instant,
    spanned: bool,
    onward: F,
) -> Result<Map<Fut, impl FnOnce(Answer) -> Answer>, RelayError>
where
    B: RequestBody,
    F: FnOnce(Arc<State>, Prepared) -> Fut,
    Fut: Future<Output = Answer>,
{
    let admission = credential.map(|c| state.revocations.admit(c, route.name));
    let mut prepared = prepare(&state, req, route, peer, https, arrival, spanned)?;
    prepared.admission = admission.clone();
    Ok(onward(state, prepared).map(move |r| {
        r.map(|resp| match admission {
            Some(a) if resp.status() != StatusCode::SWITCHING_PROTOCOLS => {
                resp.map(|b| Revocable::new(b, a).boxed_unsync())
            }
            _ => resp,
        })
    }))
}

/// A name, not a `&str`: looking a `&str` up parses it into a name first, per request.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The trace id of a W3C `traceparent` header (Trace Context §3.2), for log correlation.
/// The header itself passes to the backend untouched.
fn trace_id(h: &HeaderMap) -> Option<&str> {
    let v = h.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// An access check that waits: for the link's session check (signed links) or for the
/// authorization service (forward-auth).
#[derive(Clone, Copy, Debug)]
enum Waiting {
    Link,
    ForwardAuth,
}

/// The verdict of an access check, and which of the relay's credentials admitted the
/// request, if one did.
type Admitted = Result<(Verdict, Option<Credential>), RelayError>;

/// Applies the access mode of the route's name to the request when the check needs no wait
/// (open names, tokens); which wait it needs otherwise ([`admit`]).
fn admit_now<B>(
    state: &State,
    route: &Route<'_>,
    req: &mut Request<B>,
) -> Result<Admitted, Waiting> {
    let auth = state.auth();
    match auth.access.mode(route.name) {
        AccessMode::Open => Ok(Ok((Verdict::Admit, None))),
        AccessMode::Token => Ok(
            check_token(&auth.user_tokens, route.name, req.headers_mut())
                .map(|digest| (Verdict::Admit, Some(Credential::UserToken(digest))))
                .map_err(RelayError::from),
        ),
        AccessMode::SignedLink => Err(Waiting::Link),
        AccessMode::ForwardAuth => Err(Waiting::ForwardAuth),
    }
}

/// Applies the access mode of the route's name to the request when the check waits.
async fn admit<B>(
    waiting: Waiting,
    state: &State,
    route: &Route<'_>,
    req: &mut Request<B>,
    peer: SocketAddr,
    https: bool,
) -> Admitted {
    let name = route.name;
    let path = route.target.split('?').next().unwrap_or("/");
    Ok(match waiting {
        Waiting::Link => {
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
        Waiting::ForwardAuth => {
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

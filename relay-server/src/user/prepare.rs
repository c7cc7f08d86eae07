//! A routed, admitted user request made ready for an agent: upgrade detection, the headers
//! the backend sees, framing checks, body limits and the prefetched body.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use hyper::body::{Body, Incoming};
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop, upgrade_request};

use crate::base::body::UserBody;
use crate::base::revocation::Admission;
use crate::user::access::{strip_session_cookie, TOKEN_HEADER};
use crate::user::error::RelayError;
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
    /// The user's address: the peer's, or behind a trusted proxy the client it names
    /// (whose share of the memory budget the response uses).
    pub client: std::net::IpAddr,
    /// The registration of a request admitted by a revocable credential: a tunnel keeps
    /// it and closes when it is cut.
    pub admission: Option<Arc<Admission>>,
}

/// Everything between admission and the broker: upgrade detection, the backend's headers,
/// body limits.
pub fn prepare(
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
    let trusted = state.auth().trusts(peer.ip());
    let mut headers = forward_headers(&parts, peer, https, route.prefix, trusted)?;
    let client = client_address(&headers, peer, trusted);
    if let Some(proto) = &upgrade {
        set_upgrade_headers(&mut headers, proto);
    }
    // Traces on: the agent and the backend see the relay's request span as their parent
    // (W3C Trace Context §3.2: a proxy that takes part in the trace replaces traceparent).
    relay_config_file::telemetry::hand_on(&tracing::Span::current(), &mut headers);
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
        client,
        admission: None,
    })
}

/// The user's address: behind a trusted proxy, the last address before it in
/// `X-Forwarded-For` (the one the proxy saw; RFC 7239 §5.2 for the list's order), else the
/// peer.
fn client_address(h: &HeaderMap, peer: SocketAddr, trusted: bool) -> std::net::IpAddr {
    let named = || {
        let list = h.get(X_FORWARDED_FOR)?.to_str().ok()?;
        // The relay appended the peer itself last; the entry before it is the client.
        list.rsplit(',').nth(1)?.trim().parse().ok()
    };
    trusted.then(named).flatten().unwrap_or(peer.ip())
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
pub fn check_framing<B>(req: &Request<B>) -> Result<(), RelayError> {
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
    let mut h = detached(&req.headers);
    if h.get_all(header::HOST).iter().count() > 1 {
        return Err(RelayError::BadRequest("more than one Host header".into()));
    }
    strip_hop_by_hop(&mut h, true);
    // Only a trusted proxy may speak for the client (RFC 7239 §8.1); the relay's own
    // credentials never reach the backend, whatever the access mode. One pass over the
    // names first: most requests carry none of these (hashed removals by string were 4 %
    // of a relayed request's instructions).
    let drop =
        |n: &HeaderName| (!trusted && FORWARDING_HEADERS.contains(n)) || n.as_str() == TOKEN_HEADER;
    if h.keys().any(drop) {
        let names: Vec<HeaderName> = h.keys().filter(|n| drop(n)).cloned().collect();
        for name in names {
            h.remove(name);
        }
    }
    strip_session_cookie(&mut h);
    // HTTP/2 carries the host in :authority (RFC 9113 §8.3.1); give the backend a Host.
    if !h.contains_key(header::HOST) {
        if let Some(auth) = req.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                h.insert(header::HOST, v);
            }
        }
    }
    append(&mut h, X_FORWARDED_FOR, ip_text(peer.ip()));
    if !h.contains_key(X_FORWARDED_PROTO) {
        let proto = if https { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !h.contains_key(X_FORWARDED_HOST) {
        if let Some(host) = h.get(header::HOST).cloned() {
            h.insert(X_FORWARDED_HOST, host);
        }
    }
    if let Some(prefix) = prefix {
        h.insert(
            X_FORWARDED_PREFIX,
            HeaderValue::from_str(prefix).expect("bug: a valid name makes a valid prefix"),
        );
    }
    Ok(h)
}

/// A copy of `src` whose values own their bytes, all in one buffer, with room for the five
/// headers [`forward_headers`] may add (growing the map per insert rehashes it). hyper's
/// values are slices of the user connection's read buffer, and a request's head lives until
/// the agent has acknowledged it: values that pinned that buffer would make the connection
/// allocate a new one (8 KiB) for the next request, and a parked request would hold it.
fn detached(src: &HeaderMap) -> HeaderMap {
    let mut all = BytesMut::with_capacity(src.values().map(|v| v.len()).sum());
    for v in src.values() {
        all.extend_from_slice(v.as_bytes());
    }
    let mut all = all.freeze();
    let mut h = HeaderMap::with_capacity(src.len() + 5);
    for (name, v) in src {
        let bytes = all.split_to(v.len());
        // The bytes were a valid value a moment ago: this check cannot fail.
        if let Ok(mut value) = HeaderValue::from_maybe_shared(bytes) {
            value.set_sensitive(v.is_sensitive());
            h.append(name, value);
        }
    }
    h
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Headers that describe the client to the backend; dropped from untrusted peers.
const FORWARDING_HEADERS: [HeaderName; 7] = [
    header::FORWARDED,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    HeaderName::from_static("x-forwarded-port"),
    X_FORWARDED_PREFIX,
    HeaderName::from_static("x-real-ip"),
];

/// Appends to a comma-separated list header (RFC 9110 §5.3), keeping one field line.
fn append(h: &mut HeaderMap, name: HeaderName, value: String) {
    let joined = match h.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {value}"),
        None => value,
    };
    if let Ok(v) = HeaderValue::try_from(joined) {
        h.insert(name, v);
    }
}

/// An address as text; IPv4 digit by digit (the formatting machinery of `Display` was 1 %
/// of a relayed request's instructions).
fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{detached, ip_text};
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue};

    /// The copy holds the same fields in the same order, and nothing of the buffer the
    /// originals were sliced from (as hyper slices them from its read buffer).
    #[test]
    fn detached_headers_let_go_of_the_read_buffer() {
        let buf = Bytes::from(b"text/plain secret two".to_vec());
        let mut src = HeaderMap::new();
        let value = |r: std::ops::Range<usize>| HeaderValue::from_maybe_shared(buf.slice(r));
        src.append("content-type", value(0..10).unwrap());
        let mut secret = value(11..17).unwrap();
        secret.set_sensitive(true);
        src.append("authorization", secret);
        src.append("x-a", value(18..21).unwrap());
        src.append("x-a", HeaderValue::from_static("one"));
        let copy = detached(&src);
        assert_eq!(copy, src);
        assert!(copy["authorization"].is_sensitive());
        assert!(
            copy.capacity() - copy.len() >= 5,
            "room for the added headers"
        );
        drop(src);
        assert!(
            buf.try_into_mut().is_ok(),
            "the copy still refers to the buffer"
        );
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.3.199",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}

//! The request headers the backend sees: the user's, less hop-by-hop and framing fields and
//! the relay's own credentials, plus the relay's `X-Forwarded-*`.
//!
//! Two forms of one rule. Most heads are plain (no hop-by-hop or forwarding fields, no
//! relay token or session cookie, no upgrade, traces off): for those the rule is "every
//! field, then the relay's", written straight into a session's binary layout
//! ([`FieldBlock`]), one copy of each byte. Any other head goes through a map, where each
//! removal and each header list is handled ([`forward_headers`]); a test holds the two to
//! the same result for plain heads.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use relay_common::headers::{is_framing, set_upgrade_headers, strip_hop_by_hop};
use relay_common::heads::FieldBlock;
use relay_common::message::Fields;

use crate::user::access::{may_hold_session_cookie, strip_session_cookie, TOKEN_HEADER};
use crate::user::error::RelayError;

/// How the request reached the relay: what the relay's own headers say.
pub struct Via<'a> {
    /// The peer that sent the request.
    pub peer: SocketAddr,
    /// Whether it came over TLS.
    pub https: bool,
    /// The path prefix the relay removed (`/client/<name>`), if any.
    pub prefix: Option<&'a str>,
    /// Whether the peer is a trusted proxy (may speak for the client, RFC 7239 §8.1).
    pub trusted: bool,
}

/// The headers the backend gets for a request with the head `req` (with `upgrade`, the
/// protocol of a genuine upgrade request), and the user's address.
pub fn backend_headers(
    req: &Parts,
    via: &Via<'_>,
    upgrade: Option<&str>,
) -> Result<(Fields, IpAddr), RelayError> {
    if upgrade.is_none() && !relay_config_file::telemetry::enabled() {
        if let Some(fields) = plain_fields(req, via) {
            // No forwarding fields came: the user is the peer.
            return Ok((fields, via.peer.ip()));
        }
    }
    let mut headers = forward_headers(req, via)?;
    let client = client_address(&headers, via);
    if let Some(proto) = upgrade {
        set_upgrade_headers(&mut headers, proto);
    }
    // Traces on: the agent and the backend see the relay's request span as their parent
    // (W3C Trace Context §3.2: a proxy that takes part in the trace replaces traceparent).
    relay_config_file::telemetry::hand_on(&tracing::Span::current(), &mut headers);
    Ok((Fields::Map(headers), client))
}

/// A plain head's fields as [`forward_headers`] would make them, already encoded; `None`
/// when the head is not plain (a field that would be removed or changed, or two `Host`s).
/// The order differs only between names (each name's values keep theirs, RFC 9110 §5.3).
fn plain_fields(req: &Parts, via: &Via<'_>) -> Option<Fields> {
    let mut bytes = 0;
    let mut host = None;
    for (name, value) in &req.headers {
        let n = name.as_str();
        if is_framing(name)
            || is_forwarding(n)
            || n == TOKEN_HEADER
            || (name == header::COOKIE && may_hold_session_cookie(value))
        {
            return None;
        }
        if name == header::HOST {
            if host.is_some() {
                return None;
            }
            host = Some(value.as_bytes());
        }
        bytes += n.len() + value.len();
    }
    // HTTP/2 carries the host in :authority (RFC 9113 §8.3.1); give the backend a Host.
    let authority = match host {
        Some(_) => None,
        None => req
            .uri
            .authority()
            .map(|a| a.as_str().as_bytes())
            // What `HeaderValue::from_str` accepts, without its copy.
            .filter(|a| a.iter().all(|&b| (b' '..=b'~').contains(&b))),
    };
    let host = host.or(authority);
    let client = ip_text(via.peer.ip());
    let prefix = via.prefix.unwrap_or("");
    let added = 80 + client.len() + 2 * host.map_or(0, <[u8]>::len) + prefix.len();
    let mut block = FieldBlock::with_capacity(req.headers.len() + 5, bytes + added);
    for (name, value) in &req.headers {
        block.push(name.as_str(), value.as_bytes());
    }
    if let Some(a) = authority {
        block.push(header::HOST.as_str(), a);
    }
    block.push(X_FORWARDED_FOR.as_str(), client.as_bytes());
    let proto = if via.https { "https" } else { "http" };
    block.push(X_FORWARDED_PROTO.as_str(), proto.as_bytes());
    if let Some(host) = host {
        block.push(X_FORWARDED_HOST.as_str(), host);
    }
    if let Some(prefix) = via.prefix {
        block.push(X_FORWARDED_PREFIX.as_str(), prefix.as_bytes());
    }
    Some(block.finish())
}

/// The user's address: behind a trusted proxy, the last address before it in
/// `X-Forwarded-For` (the one the proxy saw; RFC 7239 §5.2 for the list's order), else the
/// peer.
fn client_address(h: &HeaderMap, via: &Via<'_>) -> IpAddr {
    let named = || {
        let list = h.get(X_FORWARDED_FOR)?.to_str().ok()?;
        // The relay appended the peer itself last; the entry before it is the client.
        list.rsplit(',').nth(1)?.trim().parse().ok()
    };
    via.trusted.then(named).flatten().unwrap_or(via.peer.ip())
}

/// Any head's backend headers as a map: hop-by-hop and framing removed (RFC 9110 §7.6.1),
/// then the relay's own `X-Forwarded-*` (added after stripping, so `Connection` cannot
/// remove them).
fn forward_headers(req: &Parts, via: &Via<'_>) -> Result<HeaderMap, RelayError> {
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
        |n: &HeaderName| (!via.trusted && is_forwarding(n.as_str())) || n.as_str() == TOKEN_HEADER;
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
    append(&mut h, X_FORWARDED_FOR, ip_text(via.peer.ip()));
    if !h.contains_key(X_FORWARDED_PROTO) {
        let proto = if via.https { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !h.contains_key(X_FORWARDED_HOST) {
        if let Some(host) = h.get(header::HOST).cloned() {
            h.insert(X_FORWARDED_HOST, host);
        }
    }
    if let Some(prefix) = via.prefix {
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

/// Whether a header describes the client to the backend: dropped from untrusted peers. A
/// match on the name (one comparison after a dispatch on the length).
fn is_forwarding(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-real-ip"
    )
}

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
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
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
    use super::*;
    use bytes::Bytes;
    use http::Request;

    fn parts(version: http::Version, uri: &str, fields: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder().version(version).uri(uri);
        for (k, v) in fields {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    /// For plain heads, the encoded fields are the map's (as maps: only the order between
    /// names may differ); anything the map path changes or refuses is not plain.
    #[test]
    fn plain_heads_encode_what_the_map_path_makes() {
        const HTTP_11: http::Version = http::Version::HTTP_11;
        const HTTP_2: http::Version = http::Version::HTTP_2;
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let plain = [
            parts(HTTP_11, "/a", &[("host", "relay:8080"), ("accept", "*/*")]),
            parts(
                HTTP_11,
                "/a",
                &[("host", "h"), ("x-a", "1"), ("b", "2"), ("x-a", "3")],
            ),
            parts(HTTP_11, "/a", &[("host", "h"), ("cookie", "a=1; b=2")]),
            parts(HTTP_2, "https://relay.example:443/a", &[("accept", "*/*")]),
            parts(HTTP_2, "https://relay.example/a", &[("host", "other")]),
            parts(HTTP_11, "/a", &[]),
        ];
        for (i, req) in plain.iter().enumerate() {
            for (https, prefix) in [(false, None), (true, Some("/client/x"))] {
                for trusted in [false, true] {
                    let via = Via {
                        peer,
                        https,
                        prefix,
                        trusted,
                    };
                    let encoded = plain_fields(req, &via).unwrap_or_else(|| panic!("head {i}"));
                    assert!(matches!(encoded, Fields::Encoded(_)));
                    let (fields, client) = backend_headers(req, &via, None).unwrap();
                    assert!(matches!(fields, Fields::Encoded(_)), "head {i}");
                    assert_eq!(client, peer.ip());
                    let map = forward_headers(req, &via).unwrap();
                    assert_eq!(encoded.to_map().unwrap(), map, "head {i}");
                }
            }
        }
        let not_plain = [
            parts(
                HTTP_11,
                "/a",
                &[("host", "h"), ("connection", "x-a"), ("x-a", "1")],
            ),
            parts(HTTP_11, "/a", &[("host", "h"), ("content-length", "0")]),
            parts(
                HTTP_11,
                "/a",
                &[("host", "h"), ("x-forwarded-for", "1.1.1.1")],
            ),
            parts(
                HTTP_11,
                "/a",
                &[("host", "h"), ("forwarded", "for=1.1.1.1")],
            ),
            parts(HTTP_11, "/a", &[("host", "h"), ("x-real-ip", "1.1.1.1")]),
            parts(HTTP_11, "/a", &[("host", "h"), (TOKEN_HEADER, "secret")]),
            parts(HTTP_11, "/a", &[("cookie", "a=1; relay_session=abc")]),
            parts(HTTP_11, "/a", &[("host", "a"), ("host", "b")]),
            parts(HTTP_11, "/a", &[("host", "h"), ("te", "trailers")]),
        ];
        let via = Via {
            peer,
            https: false,
            prefix: None,
            trusted: false,
        };
        for (i, req) in not_plain.iter().enumerate() {
            assert!(plain_fields(req, &via).is_none(), "head {i}");
        }
        // The map path still does their work: the token, the session cookie and a
        // forged address do not reach the backend.
        let (fields, _) = backend_headers(&not_plain[5], &via, None).unwrap();
        assert!(!fields.to_map().unwrap().contains_key(TOKEN_HEADER));
        let (fields, _) = backend_headers(&not_plain[6], &via, None).unwrap();
        assert_eq!(fields.to_map().unwrap()[header::COOKIE], "a=1");
        let (fields, client) = backend_headers(&not_plain[2], &via, None).unwrap();
        assert_eq!(fields.to_map().unwrap()[X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(client, peer.ip());
        assert!(backend_headers(&not_plain[7], &via, None).is_err());
        // An upgrade always takes the map path (its two headers are added back).
        let ws = parts(HTTP_11, "/a", &[("host", "h")]);
        let (fields, _) = backend_headers(&ws, &via, Some("websocket")).unwrap();
        let Fields::Map(map) = fields else {
            panic!("an upgrade's head is a map")
        };
        assert_eq!(map[header::UPGRADE], "websocket");
    }

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

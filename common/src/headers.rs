//! Hop-by-hop header rules, applied on both sides of the relay.
//!
//! RFC 9110 §7.6.1: `Connection` and every header it lists, plus the fixed set `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Transfer-Encoding` and `Upgrade`, describe one hop and must not
//! be forwarded. `Proxy-Authenticate`/`Proxy-Authorization` are credentials for the hop
//! (RFC 9110 §11.7) and go too. `Trailer` announces trailers of this hop's framing.
//!
//! `Content-Length` is framing as well (RFC 9112 §6): the relay never copies it from one hop to
//! the next as a header; each side derives it from the body it actually sends (see the
//! `content_length` field of the wire messages).

use http::header::{self, HeaderMap, HeaderName};

/// The fixed hop-by-hop set (RFC 9110 §7.6.1, §11.7; RFC 9112 §6, §7): what
/// [`is_framing`] matches besides `Content-Length` (a test holds the two together).
#[cfg(test)]
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Names outside `http`'s table of standard headers that nearly every relayed head
/// carries: the forwarding headers the relay-server adds (RFC 7239's de-facto `X-` forms)
/// and gRPC's (grpc/PROTOCOL-HTTP2.md). [`common_name`] hands out these instead of a
/// copy: `HeaderName::from_bytes` allocates for every name it does not know. A `static`:
/// indexing a `const` array builds all twelve names and drops them again on every call
/// (720 instructions per relayed request on the agent).
static COMMON: [HeaderName; 12] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("grpc-status"),
    HeaderName::from_static("grpc-message"),
    HeaderName::from_static("grpc-timeout"),
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
];

/// The name `name` (lowercase, as heads carry them) without allocating when it is one of
/// the common non-standard names; `None` for any other (decode it with `from_bytes`).
pub fn common_name(name: &[u8]) -> Option<HeaderName> {
    // A match on the bytes compiles to a dispatch on the length and one comparison; a
    // scan of the table cost 180 instructions per name (2 % of the agent's per request).
    let i = match name {
        b"x-forwarded-for" => 0,
        b"x-forwarded-proto" => 1,
        b"x-forwarded-host" => 2,
        b"x-forwarded-prefix" => 3,
        b"x-forwarded-port" => 4,
        b"x-real-ip" => 5,
        b"x-request-id" => 6,
        b"grpc-status" => 7,
        b"grpc-message" => 8,
        b"grpc-timeout" => 9,
        b"grpc-encoding" => 10,
        b"grpc-accept-encoding" => 11,
        _ => return None,
    };
    Some(COMMON[i].clone())
}

/// Whether `b` may appear in a field name (a `tchar`, RFC 9110 §5.6.2): one table lookup.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// Whether `b` may appear in a field value as `http` takes it (RFC 9110 §5.5: visible
/// characters, obs-text, space and tab; no other control character).
pub fn is_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
}

const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// Whether `name` is framing or hop-by-hop ([`HOP_BY_HOP`] or `Content-Length`). A
/// standard name's `as_str` is a table lookup and the match one comparison after a
/// dispatch on the length, where `HOP_BY_HOP.contains` compared every entry (1 400
/// instructions for a 7-field head).
pub fn is_framing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// Removes hop-by-hop headers and the framing header `Content-Length`.
///
/// `TE: trailers` survives when `keep_te_trailers` is set: gRPC needs it end to end over
/// HTTP/2 (RFC 9113 §8.2.2 allows exactly this value of `TE`).
///
/// Call this *before* adding the relay's own headers: a user listing `X-Forwarded-For` in
/// `Connection` must not be able to remove what the relay adds (Traefik CVE-2021-32813).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the names finds the framing ones present; only those are removed.
    // Most heads have none, and most responses only `Content-Length`: ten hashed
    // removals cost 4 % of a relayed request's instructions (docs/PERFORMANCE.md).
    let present: Vec<HeaderName> = headers.keys().filter(|n| is_framing(n)).cloned().collect();
    if present.is_empty() {
        return;
    }
    if present.contains(&header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| connection_has_token(v.as_bytes(), "trailers"));
    for name in present {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The protocol a request asks to upgrade to, if it is a genuine upgrade request: an
/// `Upgrade` header and the `upgrade` token in `Connection` (RFC 9110 §7.8, token lists
/// compared case-insensitively). `h2c` is never an upgrade the relay performs.
pub fn upgrade_request(headers: &HeaderMap) -> Option<String> {
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return None;
    }
    let value = headers.get(header::UPGRADE)?.to_str().ok()?.trim();
    if value.is_empty() || connection_has_token(value.as_bytes(), "h2c") {
        return None;
    }
    Some(value.to_owned())
}

/// Whether a 101 answer's `Upgrade` value switches to (one of) the protocols requested.
pub fn upgrade_matches(requested: &str, answered: &str) -> bool {
    let first = |s: &str| {
        s.split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    let answered = first(answered);
    !answered.is_empty()
        && requested
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(&answered))
}

/// Adds back the two headers of a confirmed upgrade after hop-by-hop stripping
/// (RFC 9110 §7.6.1 allows them exactly for the hop that switches).
pub fn set_upgrade_headers(headers: &mut HeaderMap, protocol: &str) {
    if let Ok(v) = http::HeaderValue::from_str(protocol) {
        headers.insert(header::UPGRADE, v);
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
}

/// Whether a comma-separated token list contains `token` (case-insensitive, RFC 9110 §5.6.1).
pub fn connection_has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether any value of `name` lists `token`.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| connection_has_token(v.as_bytes(), token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framing_check_knows_exactly_the_hop_by_hop_names_and_content_length() {
        for n in HOP_BY_HOP.iter().chain([&header::CONTENT_LENGTH]) {
            assert!(is_framing(n), "{n}");
        }
        for n in [header::HOST, header::CONTENT_TYPE, header::TRAILER.clone()] {
            assert_eq!(is_framing(&n), n == header::TRAILER, "{n}");
        }
        let custom = HeaderName::from_static("x-connection");
        assert!(!is_framing(&custom));
    }

    #[test]
    fn common_names_are_shared_not_copied() {
        for n in &COMMON {
            let a = common_name(n.as_str().as_bytes()).expect("a common name");
            let b = common_name(n.as_str().as_bytes()).expect("a common name");
            assert_eq!(&a, n);
            // The same static bytes each time: no copy was made.
            assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        }
        for other in [
            &b"x-custom"[..],
            b"X-Forwarded-For",
            b"host",
            b"x-forwarded-fo",
        ] {
            assert_eq!(common_name(other), None, "{other:?}");
        }
    }

    #[test]
    fn strips_listed_and_fixed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, X-Secret, keep-alive".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
        h.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("te").is_none());
        // Only what is present goes, every value of it; nothing else is touched.
        let mut h = HeaderMap::new();
        h.append("content-length", "5".parse().unwrap());
        h.append("proxy-authorization", "a".parse().unwrap());
        h.append("proxy-authorization", "b".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get_all("x-a").iter().count(), 2);
    }

    #[test]
    fn upgrades() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        assert_eq!(upgrade_request(&h), None, "no Connection: upgrade");
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(upgrade_request(&h).as_deref(), Some("websocket"));
        h.insert("upgrade", "h2c".parse().unwrap());
        assert_eq!(upgrade_request(&h), None);
        assert!(upgrade_matches("websocket", "WebSocket"));
        assert!(upgrade_matches("SPDY/3.1, websocket", "websocket"));
        assert!(!upgrade_matches("websocket", "h2c"));
        assert!(!upgrade_matches("websocket", ""));
    }

    #[test]
    fn token_lists() {
        assert!(connection_has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!connection_has_token(b"keep-alive, Upgraded", "upgrade"));
    }
}

//! Which backend a user request goes to, and with which target.
//!
//! The name is read once from the raw (undecoded) path and checked against the name grammar
//! before anything else; the rest of the path and the query go to the backend byte for byte.
//! Nothing is decoded or normalised, so routing cannot change after a later normalisation
//! step: a path that *could* normalise differently (a dot-segment, plain or percent-encoded)
//! is refused outright.

use relay_common::name::is_valid_name;

/// Path prefix of name-in-path routing.
pub const CLIENT_PREFIX: &str = "/client/";

/// A routed user request.
#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// Backend name.
    pub name: &'a str,
    /// Request target for the backend: raw path (and `?query` when present).
    pub target: String,
    /// `X-Forwarded-Prefix` value when the name came from the path.
    pub prefix: Option<&'a str>,
}

/// Why a request cannot be routed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// 400: bad or missing name, dot-segment.
    #[error("{0}")]
    Bad(String),
    /// 404: not a relay path and no `X-Server-Name`.
    #[error("{0}")]
    NoRoute(String),
}

/// The backend label of `host` (a `Host` value or `:authority`, port allowed) when it is
/// `<label>.<domain>`. DNS names compare case-insensitively (RFC 4343), so the label is
/// returned as sent and the caller checks it against the name grammar.
pub fn host_backend<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let cut = host.len().checked_sub(domain.len() + 1)?;
    if !host.is_char_boundary(cut) {
        return None;
    }
    let (label, rest) = host.split_at(cut);
    (rest.as_bytes()[0] == b'.' && rest[1..].eq_ignore_ascii_case(domain) && !label.is_empty())
        .then_some(label)
}

/// Routes a request from its raw path, raw query, `X-Server-Name` value and the backend
/// label of its host (see [`host_backend`]), which wins over everything else.
pub fn route<'a>(
    path: &'a str,
    query: Option<&str>,
    server_name: Option<&'a [u8]>,
    host_label: Option<&'a str>,
) -> Result<Route<'a>, RouteError> {
    route_in("", path, query, server_name, host_label)
}

/// [`route`] for a relay served under the path prefix `mount` (`--base-path`; empty for
/// none): `/client/` routes only below it, and the prefix the backend is told of
/// (`X-Forwarded-Prefix`) includes it. `X-Server-Name` routing works on any path (gRPC
/// method paths cannot carry a prefix), minus the mount when the path is below it.
pub fn route_in<'a>(
    mount: &str,
    path: &'a str,
    query: Option<&str>,
    server_name: Option<&'a [u8]>,
    host_label: Option<&'a str>,
) -> Result<Route<'a>, RouteError> {
    if has_dot_segment(path) {
        return Err(RouteError::Bad(format!(
            "path {path:?} contains a dot-segment; send a normalised path"
        )));
    }
    let with_query = |p: &str| match query {
        Some(q) => format!("{p}?{q}"),
        None => p.to_owned(),
    };
    if let Some(label) = host_label {
        // One DNS label: a name with dots would span several labels of the domain.
        if !is_valid_name(label) || label.contains('.') {
            return Err(RouteError::Bad(format!(
                "host label {label:?} is not a backend name reachable by host"
            )));
        }
        return Ok(Route {
            name: label,
            target: with_query(path),
            prefix: None,
        });
    }
    let below = if mount.is_empty() {
        Some(path)
    } else {
        path.strip_prefix(mount)
            .filter(|r| r.is_empty() || r.starts_with('/'))
    };
    let inner = below.unwrap_or("");
    if below.is_some() && (inner == "/client" || inner.starts_with(CLIENT_PREFIX)) {
        let rest = inner.get(CLIENT_PREFIX.len()..).unwrap_or("");
        let (name, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if name.is_empty() {
            return Err(RouteError::Bad(format!(
                "path {path:?} has no backend name after \"/client/\""
            )));
        }
        if !is_valid_name(name) {
            return Err(RouteError::Bad(format!(
                "invalid backend name {name:?}: names match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}"
            )));
        }
        let prefix_len = mount.len() + CLIENT_PREFIX.len() + name.len();
        return Ok(Route {
            name,
            target: with_query(tail),
            prefix: Some(&path[..prefix_len]),
        });
    }
    match server_name {
        None => Err(RouteError::NoRoute(format!(
            "no route for {path:?}: use {mount}/client/<name>/... or an X-Server-Name header"
        ))),
        Some(raw) => {
            let name = std::str::from_utf8(raw)
                .ok()
                .filter(|n| is_valid_name(n))
                .ok_or_else(|| {
                    RouteError::Bad(format!(
                        "invalid X-Server-Name {:?}: names match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}",
                        String::from_utf8_lossy(raw)
                    ))
                })?;
            Ok(Route {
                name,
                target: with_query(match below {
                    Some("") if !mount.is_empty() => "/",
                    Some(b) => b,
                    None => path,
                }),
                prefix: None,
            })
        }
    }
}

/// Whether any segment is `.` or `..` once `%2e` is read as a dot (RFC 3986 §5.2.4 would
/// remove it), or is `..;params` (which some servers treat as `..`). Backslashes and the
/// percent-encoded separators `%2F` and `%5C` count as separators too, because some backends
/// and proxies decode or treat them so (`/lab/..%2Fadmin` is `/admin` to them).
fn has_dot_segment(path: &str) -> bool {
    // Without a dot or a percent sign there is no dot-segment: one scan, where splitting
    // into segments cost 670 instructions for a short path (1 % of a relayed request).
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    segments(path).any(|seg| {
        let seg = seg.split(';').next().unwrap_or("");
        let mut dots = 0;
        let mut rest = seg.as_bytes();
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && (rest[2] | 0x20) == b'e'
            {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// The segments of `path`, split at `/`, `\`, `%2F` and `%5C` (any case).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let b = path.as_bytes();
    let mut start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        while i <= b.len() {
            let sep = match b.get(i) {
                None => Some(0),
                Some(b'/' | b'\\') => Some(1),
                Some(b'%')
                    if b.len() >= i + 3
                        && (b[i + 1] == b'2' && (b[i + 2] | 0x20) == b'f'
                            || b[i + 1] == b'5' && (b[i + 2] | 0x20) == b'c') =>
                {
                    Some(3)
                }
                _ => None,
            };
            match sep {
                None => i += 1,
                Some(n) => {
                    let seg = &path[start..i];
                    i += n.max(1);
                    start = i;
                    return Some(seg);
                }
            }
        }
        None
    })
}

/// The property the `router` fuzz target checks (also replayed from its corpus by the
/// tests): `data` is a path, an `X-Server-Name` value and a host, separated by `\n`.
/// Routing never panics; a routed request has a valid name, a target that starts with `/`
/// and holds no dot-segment, and with name-in-path routing the prefix and the target put
/// back together are exactly the path.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let path = parts.next().unwrap_or_default();
    let server_name = parts.next();
    let host = parts.next().and_then(|h| std::str::from_utf8(h).ok());
    // hyper hands over paths of visible ASCII only.
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    // hyper's paths start with `/` (origin-form; absolute-form is normalised to it) or are
    // the `*` of OPTIONS (RFC 9112 §3.2.4), which only header routing passes on as it is.
    if !path.starts_with('/') {
        if let Ok(r) = route(path, query, server_name, None) {
            assert_eq!(r.target.split('?').next(), Some(path));
        }
        return;
    }
    let label = host.and_then(|h| host_backend(h, "relay.test"));
    if let (Some(h), Some(l)) = (host, label) {
        assert!(h
            .to_ascii_lowercase()
            .contains(&format!("{}.relay.test", l.to_ascii_lowercase())));
    }
    let Ok(r) = route(path, query, server_name, label) else {
        return;
    };
    assert!(is_valid_name(r.name), "routed to invalid name {:?}", r.name);
    assert!(r.target.starts_with('/'), "target {:?}", r.target);
    let target_path = r.target.split('?').next().unwrap_or("");
    assert!(
        !has_dot_segment(target_path),
        "dot-segment in {:?}",
        r.target
    );
    match r.prefix {
        Some(prefix) => {
            assert_eq!(prefix, format!("{CLIENT_PREFIX}{}", r.name));
            let rebuilt = if path.len() == prefix.len() {
                prefix.to_owned()
            } else {
                format!("{prefix}{target_path}")
            };
            assert_eq!(rebuilt, path);
        }
        None => assert_eq!(target_path, path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str, query: Option<&str>) -> (String, String, Option<String>) {
        let r = route(path, query, None, None).unwrap();
        (r.name.into(), r.target, r.prefix.map(Into::into))
    }

    #[test]
    fn a_mount_prefixes_client_routes_and_their_forwarded_prefix() {
        let m = "/apis/relay";
        let r = route_in(m, "/apis/relay/client/a/x", Some("q"), None, None).unwrap();
        assert_eq!(
            (r.name, r.target.as_str(), r.prefix),
            ("a", "/x?q", Some("/apis/relay/client/a"))
        );
        assert!(matches!(
            route_in(m, "/client/a/x", None, None, None),
            Err(RouteError::NoRoute(_))
        ));
        assert!(matches!(
            route_in(m, "/apis/relayx/client/a", None, None, None),
            Err(RouteError::NoRoute(_))
        ));
        // gRPC: any path with X-Server-Name, the mount taken off when it is there.
        let r = route_in(m, "/pkg.Svc/Call", None, Some(b"a"), None).unwrap();
        assert_eq!(r.target, "/pkg.Svc/Call");
        let r = route_in(m, "/apis/relay/pkg.Svc/Call", None, Some(b"a"), None).unwrap();
        assert_eq!(r.target, "/pkg.Svc/Call");
    }

    #[test]
    fn client_prefix() {
        assert_eq!(
            ok("/client/a", None),
            ("a".into(), "/".into(), Some("/client/a".into()))
        );
        assert_eq!(ok("/client/a/", None).1, "/");
        assert_eq!(
            ok("/client/a/x%2Fy/z", Some("b=2&a=1&c=%20")).1,
            "/x%2Fy/z?b=2&a=1&c=%20"
        );
        assert_eq!(ok("/client/a/x", Some("")).1, "/x?");
        assert_eq!(ok("/client/a//x", None).1, "//x");
    }

    #[test]
    fn header_routing() {
        let r = route("/pkg.Svc/Call", None, Some(b"robot-1"), None).unwrap();
        assert_eq!(
            (r.name, r.target.as_str(), r.prefix),
            ("robot-1", "/pkg.Svc/Call", None)
        );
        // The path wins over the header.
        assert_eq!(
            route("/client/a/x", None, Some(b"b"), None).unwrap().name,
            "a"
        );
        assert!(matches!(
            route("/x", None, None, None),
            Err(RouteError::NoRoute(_))
        ));
        assert!(matches!(
            route("/x", None, Some(b"a/b"), None),
            Err(RouteError::Bad(_))
        ));
        assert!(matches!(
            route("/x", None, Some(b""), None),
            Err(RouteError::Bad(_))
        ));
    }

    #[test]
    fn host_routing() {
        let d = "relay.example.com";
        assert_eq!(host_backend("robot.relay.example.com", d), Some("robot"));
        assert_eq!(
            host_backend("Robot.RELAY.example.com:8443", d),
            Some("Robot")
        );
        assert_eq!(host_backend("robot.relay.example.com.", d), Some("robot"));
        assert_eq!(host_backend("relay.example.com", d), None);
        assert_eq!(host_backend(".relay.example.com", d), None);
        assert_eq!(host_backend("robotrelay.example.com", d), None);
        assert_eq!(host_backend("robot.relay.example.com.evil", d), None);
        let r = route("/client/x/y", Some("q"), Some(b"z"), Some("robot")).unwrap();
        assert_eq!(
            (r.name, r.target.as_str(), r.prefix),
            ("robot", "/client/x/y?q", None)
        );
        assert!(route("/", None, None, Some("a.b")).is_err());
        assert!(route("/", None, None, Some("a%2fb")).is_err());
        assert!(route("/a/../b", None, None, Some("a")).is_err());
    }

    #[test]
    fn refuses_confusion() {
        for p in [
            "/client",
            "/client/",
            "/client//a",
            "/client/a/../b/x",
            "/client/a/%2e%2e/b",
            "/client/a/%2E./b",
            "/client/a%2F..%2Fb/x",
            "/client/a%2fb",
            "/client/%2e%2e/b",
            "/client/a/..;x=y/../b",
            "/client/a\\..\\b",
            "/client/a/..%2fb/echo",
            "/client/a/lab/..%2Fadmin",
            "/client/a/x%5C..%5Cadmin",
            "/client/a/./b",
            "/client/a%00",
            "/x/../client/a",
        ] {
            assert!(
                matches!(route(p, None, None, None), Err(RouteError::Bad(_))),
                "{p} was accepted"
            );
        }
        // Not dot-segments: stay raw.
        assert_eq!(ok("/client/a/...", None).1, "/...");
        assert_eq!(ok("/client/a/.well-known/x", None).1, "/.well-known/x");
        assert_eq!(ok("/client/a/%252e%252e/b", None).1, "/%252e%252e/b");
    }
}

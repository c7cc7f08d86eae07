//! Request heads the front serves itself: an HTTP/1.1 `GET` without a body, an upgrade or
//! an expectation, parsed with httparse into the `http` types the user side takes, the
//! field values sharing the read buffer. Any other head is left to hyper, which the
//! connection then keeps for good (see the module above).

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body_util::Empty;

/// Fields of a head the front takes; a head with more goes to hyper (which takes up to
/// `--max-headers`).
const MAX_FIELDS: usize = 32;

/// What the bytes read so far hold.
// The request is moved on once per request: boxed, it would cost an allocation instead.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A whole head the front serves: the request, and whether the user asked to close the
    /// connection after it (`Connection: close`, RFC 9112 §9.6). Its bytes are taken off
    /// the buffer, and come with it (for hyper, should the request not be the front's
    /// after all).
    Plain(Request<Empty<Bytes>>, bool, Bytes),
    /// Not a whole head yet.
    Partial,
    /// A head for hyper (or bytes that are not one): nothing was taken off the buffer.
    Other,
}

/// Where a parsed part lies in the buffer.
type Span = (usize, usize);

/// Parses the head at the start of `buf`; a head with more than `max_fields` fields
/// (`--max-headers`) is hyper's, which refuses it.
pub fn parse(buf: &mut BytesMut, max_fields: usize) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields[..max_fields.min(MAX_FIELDS)]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    // HTTP/1.0 (keep-alive by request only), HEAD (a body's length without the body) and
    // methods with bodies are hyper's.
    if req.version != Some(1) || req.method != Some("GET") {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return Parsed::Other;
    };
    let path = at(path.as_bytes());
    let mut spans: [(Span, Span); MAX_FIELDS] = [((0, 0), (0, 0)); MAX_FIELDS];
    let n = req.headers.len();
    for (slot, f) in spans.iter_mut().zip(req.headers.iter()) {
        *slot = (at(f.name.as_bytes()), at(f.value));
    }
    let head = buf.split_to(len).freeze();
    match build(&head, path, &spans[..n]) {
        Some((req, close)) => Parsed::Plain(req, close, head),
        None => {
            // Back as it was, for hyper. (The buffer is unsplit from a view of its own
            // storage: no copy unless it grew meanwhile.)
            let mut whole = BytesMut::from(head);
            whole.unsplit(std::mem::take(buf));
            *buf = whole;
            Parsed::Other
        }
    }
}

/// The request of a complete head, if the front takes it.
fn build(
    head: &Bytes,
    path: Span,
    spans: &[(Span, Span)],
) -> Option<(Request<Empty<Bytes>>, bool)> {
    let slice = |(at, len): Span| head.slice(at..at + len);
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut close = false;
    let mut host = false;
    for &(name, value) in spans {
        let name = HeaderName::from_bytes(&head[name.0..name.0 + name.1]).ok()?;
        let value = HeaderValue::from_maybe_shared(slice(value)).ok()?;
        match name {
            // Framing, upgrades, expectations and trailers asked for: hyper's.
            header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::UPGRADE
            | header::EXPECT
            | header::TE => return None,
            // Two Hosts make the request invalid (RFC 9112 §3.2); hyper's answer stands.
            header::HOST if host => return None,
            header::HOST => host = true,
            header::CONNECTION => {
                for token in value.to_str().ok()?.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case("keep-alive") {
                        // Other options name hop-by-hop fields or ask for an upgrade.
                        return None;
                    }
                }
            }
            _ => {}
        }
        headers.append(name, value);
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused; hyper's answer stands.
    if !host {
        return None;
    }
    let uri = Uri::from_maybe_shared(slice(path)).ok()?;
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some((req, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        (parse(&mut buf, 100), buf)
    }

    #[test]
    fn a_plain_get_is_taken_and_its_bytes_leave_the_buffer() {
        let (p, rest) = parsed(
            b"GET /client/a/x?y=1 HTTP/1.1\r\nHost: relay\r\nAccept: */*\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        );
        let Parsed::Plain(req, close, _) = p else {
            panic!("not taken")
        };
        assert!(!close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri().path(), "/client/a/x");
        assert_eq!(req.uri().query(), Some("y=1"));
        assert_eq!(req.headers()["host"], "relay");
        let two: Vec<_> = req.headers().get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn connection_close_is_reported_and_keep_alive_accepted() {
        let (p, _) = parsed(b"GET / HTTP/1.1\r\nHost: r\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(p, Parsed::Plain(_, true, _)));
    }

    #[test]
    fn an_unfinished_head_waits_for_more() {
        let (p, rest) = parsed(b"GET / HTTP/1.1\r\nHost: r\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(rest.len(), 25);
    }

    /// Everything the front leaves to hyper comes back whole, byte for byte.
    #[test]
    fn other_heads_are_left_untouched() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\nhi"[..],
            b"HEAD / HTTP/1.1\r\nHost: r\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: r\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nHost: s\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: r\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nConnection: x-secret\r\n\r\n",
            b"GET http://r/ HTTP/1.1\r\nHost: r\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: r\r\nBad\x01Name: v\r\n\r\n",
        ] {
            let (p, rest) = parsed(head);
            assert!(
                matches!(p, Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(head)
            );
            assert_eq!(&rest[..], head);
        }
        let mut many = b"GET / HTTP/1.1\r\nHost: r\r\n".to_vec();
        for i in 0..MAX_FIELDS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (p, rest) = parsed(&many);
        assert!(matches!(p, Parsed::Other));
        assert_eq!(&rest[..], &many[..]);
        // Past `--max-headers`: hyper's (and its 431).
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: r\r\nA: 1\r\nB: 2\r\n\r\n"[..]);
        assert!(matches!(parse(&mut buf, 2), Parsed::Other));
        assert!(matches!(parse(&mut buf, 3), Parsed::Plain(..)));
    }
}

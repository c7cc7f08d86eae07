//! HTTP/1.1 framing for the agent's own connections to a plain-HTTP backend (RFC 9112):
//! request heads written straight from the request, response heads parsed with `httparse`,
//! response bodies decoded by length, chunks or close. Only what an exchange on a pooled
//! connection needs (`pool`); upgrades, TLS and HTTP/2 backends keep hyper's client.
//!
//! Why not hyper's `client::conn::http1`: its dispatcher (a request channel, a state
//! machine per connection, a body channel) cost about a third of the agent's instructions
//! per small request, more than the framing itself (`docs/PERFORMANCE.md`).

use std::fmt::Write as _;

use bytes::{BufMut, BytesMut};
use http::{header, HeaderValue, Request};
pub use relay_common::h1::{chunk_line, last_chunk, poll_write_queued, put_field};

/// Most fields in a response head or a trailer section (hyper's default).
pub(super) const MAX_FIELDS: usize = 100;
/// Longest response head, and longest trailer section.
pub const MAX_HEAD: usize = 64 * 1024;

/// Why an exchange on a backend connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The response head is not HTTP/1.x.
    #[error("the backend's response head is malformed: {0}")]
    Head(&'static str),
    /// The response head or a trailer section is longer than [`MAX_HEAD`].
    #[error("the backend's response head is longer than 64 KiB")]
    HeadTooLarge,
    /// The chunked body is malformed.
    #[error("the backend's chunked body is malformed: {0}")]
    Chunk(&'static str),
    /// The backend closed the connection mid-message.
    #[error("the backend closed the connection before the response was complete")]
    Closed,
    /// The task reading a streamed body ended without finishing it.
    #[error("the agent stopped reading the backend's body")]
    ReaderGone,
    /// The request body gave more or fewer bytes than its announced length, or failed.
    #[error("the request body failed: {0}")]
    RequestBody(String),
    /// Reading or writing the connection failed.
    #[error("the backend connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (no framing field; RFC 9112 §6.3 rule 6: a request without one has none).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Framing {
    /// The framing for `body`: none when it is empty, its length when it knows it exactly.
    pub fn of<B: hyper::body::Body>(body: &B) -> Framing {
        match (body.is_end_stream(), body.size_hint().exact()) {
            (true, _) => Framing::None,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Chunked,
        }
    }
}

/// Writes the head of `req` (origin-form target, RFC 9112 §3.2.1) with the framing field
/// for `framing`. Framing fields the request carries are dropped: only the body knows its
/// length, and two disagreeing ones would be a request-smuggling vector (RFC 9112 §6.3).
pub fn put_request_head<B>(buf: &mut BytesMut, req: &Request<B>, framing: Framing) {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = 32 + target.len() + req.headers().len() * 32;
    buf.reserve(size);
    buf.put_slice(req.method().as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    put_framing(buf, framing);
}

/// Writes a request head straight from a relayed head whose fields are still in the
/// binary layout (`Fields::Encoded`, checked when it was decoded): no map is built. The
/// target is `base` then `target`; `host` replaces the user's `Host` (`--rewrite-host`),
/// `authority` is sent when there is none. Hop-by-hop and framing fields are dropped (RFC
/// 9110 §7.6.1; the relay-server already did). Returns false, with `buf` as it was, when
/// the head needs the general path instead: a method or target byte that must not go on
/// the wire as is, or a `Connection` or `TE` field (which name fields to keep or drop).
pub fn put_relayed_head(
    buf: &mut BytesMut,
    head: (&str, &str, &str),
    block: &[u8],
    host: (Option<&HeaderValue>, &HeaderValue),
    framing: Framing,
) -> bool {
    let (method, base, target) = head;
    let (rewrite, authority) = host;
    let visible = |t: &str| {
        t.bytes()
            .fold(true, |ok, b| ok & (0x21..=0x7e).contains(&b))
    };
    if method.is_empty()
        || !method.bytes().all(relay_common::headers::is_tchar)
        || !target.starts_with('/')
        || !visible(base)
        || !visible(target)
    {
        return false;
    }
    let start = buf.len();
    buf.reserve(64 + base.len() + target.len() + block.len());
    buf.put_slice(method.as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(base.as_bytes());
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let whole = relay_common::heads::each_encoded(block, |name, value| {
        match Dropped::of(name) {
            Dropped::Never => {}
            Dropped::Always => return true,
            Dropped::Refer => return false,
            Dropped::Host if rewrite.is_some() => return true,
            Dropped::Host => has_host = true,
        }
        put_field(buf, name, value);
        true
    });
    if !whole {
        buf.truncate(start);
        return false;
    }
    if !has_host {
        buf.put_slice(b"host: ");
        buf.put_slice(rewrite.unwrap_or(authority).as_bytes());
        buf.put_slice(b"\r\n");
    }
    put_framing(buf, framing);
    true
}

/// Whether a field is hop-by-hop or framing (RFC 9110 §7.6.1, RFC 9112 §6): what
/// `headers::is_framing` says of a name, on a head's bytes in any case. A backend's
/// response head drops these as a relayed request head does.
pub(super) fn hop_by_hop(name: &[u8]) -> bool {
    matches!(Dropped::of(name), Dropped::Always | Dropped::Refer)
}

/// What [`put_relayed_head`] does with a field.
enum Dropped {
    Never,
    Always,
    /// Handled by the general path (`strip_hop_by_hop`).
    Refer,
    Host,
}

impl Dropped {
    fn of(name: &[u8]) -> Dropped {
        // Hop-by-hop names (RFC 9110 §7.6.1) and the framing ones (RFC 9112 §6), compared
        // without case (the block's names are tokens, not necessarily lower case), after a
        // dispatch on the length: most fields are compared with none.
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            2 if is(b"te") => Dropped::Refer,
            4 if is(b"host") => Dropped::Host,
            7 if is(b"upgrade") || is(b"trailer") => Dropped::Always,
            10 if is(b"connection") => Dropped::Refer,
            10 if is(b"keep-alive") => Dropped::Always,
            14 if is(b"content-length") => Dropped::Always,
            16 if is(b"proxy-connection") => Dropped::Always,
            17 if is(b"transfer-encoding") => Dropped::Always,
            18 if is(b"proxy-authenticate") => Dropped::Always,
            19 if is(b"proxy-authorization") => Dropped::Always,
            _ => Dropped::Never,
        }
    }
}

/// The framing field for `framing` and the end of the head.
fn put_framing(buf: &mut BytesMut, framing: Framing) {
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let _ = write!(Writer(buf), "content-length: {n}\r\n");
        }
        Framing::Chunked => buf.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.put_slice(b"\r\n");
}

struct Writer<'a>(&'a mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

pub use super::response::{parse_head, Decoder, Step};
#[cfg(test)]
use super::response::{Chunk, Head, HeadFields, MAX_CHUNK_LINE};
#[cfg(test)]
use http::Method;

#[cfg(test)]
#[path = "h1_tests.rs"]
mod tests;

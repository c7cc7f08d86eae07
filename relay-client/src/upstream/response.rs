//! Response side of the agent's HTTP/1.1 client framing (RFC 9112): the head, parsed with
//! `httparse`, and the body's decoder (length, chunks or close).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use relay_common::headers::{is_tchar, is_value_byte};
use relay_common::heads::FieldBlock;
use relay_common::message::Fields;

use super::h1::{hop_by_hop, H1Error, MAX_FIELDS, MAX_HEAD};

/// Longest chunk-size line, extensions included.
pub(super) const MAX_CHUNK_LINE: usize = 4096;

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// The final status (never 1xx but 101).
    pub status: StatusCode,
    /// Its fields.
    pub fields: HeadFields,
    /// How its body is delimited.
    pub body: Decoder,
    /// Whether the connection can carry another exchange after this one.
    pub keep_alive: bool,
}

/// A response head's fields.
#[derive(Debug)]
pub enum HeadFields {
    /// Already in the session's binary layout (a [`FieldBlock`]'s `Fields::Encoded`), the
    /// hop-by-hop and framing fields dropped (RFC 9110 §7.6.1) and `Content-Length` apart:
    /// what the agent sends on, so no map is built (most responses).
    Encoded {
        /// The block.
        block: Fields,
        /// The first `Content-Length` value, if it is a number.
        content_length: Option<u64>,
    },
    /// Every field, as a map: for a 101 (the switch reads its fields) and for a
    /// `Connection` field that names other fields (they are hop-by-hop too, and go where
    /// the map's fields are stripped).
    Map(HeaderMap),
}

/// Parses the final response head at the start of `buf` (interim 1xx heads are consumed
/// and skipped, RFC 9110 §15.2), or `None` when more bytes are needed. `method` is the
/// request's: a response to HEAD has no body whatever its fields say (RFC 9112 §6.3).
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, H1Error> {
    loop {
        // Uninitialised: zeroing 100 fields (and a span table as big) cost more than the
        // parse itself.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(H1Error::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Head("too many fields")),
            Err(_) => return Err(H1Error::Head("not an HTTP/1.x status line and fields")),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Head("bad status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let raw = parsed.headers.iter().map(|f| (f.name.as_bytes(), f.value));
        let d = Delimiters::of(raw.clone());
        let (body, framed) = delimit(&d, status, method, version)?;
        let keep_alive = framed && persistent(&d, version);
        // httparse's default configuration takes only token names and values of visible
        // characters, obs-text, space and tab (its `TOKEN_MAP` and `HEADER_VALUE_MAP`):
        // what `http` accepts, so the block needs no check of its own.
        debug_assert!(raw
            .clone()
            .all(|(n, v)| n.iter().all(|b| is_tchar(*b)) && v.iter().all(|b| is_value_byte(*b))));
        if !d.refers && status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = raw.clone().map(|(n, v)| n.len() + v.len()).sum();
            let mut block = FieldBlock::with_capacity(parsed.headers.len(), bytes);
            for (n, v) in raw.filter(|(n, _)| !hop_by_hop(n)) {
                block.push_token(n, v);
            }
            let fields = HeadFields::Encoded {
                block: block.finish(),
                content_length: d.first_length,
            };
            buf.advance(len);
            return Ok(Some(Head {
                status,
                fields,
                body,
                keep_alive,
            }));
        }
        // Where each field lies in the head, so the values can be slices of it (no copy).
        let base = buf.as_ptr() as usize;
        let spans: Vec<_> = raw
            .map(|(n, v)| {
                let n0 = n.as_ptr() as usize - base;
                let v0 = v.as_ptr() as usize - base;
                (n0, n0 + n.len(), v0, v0 + v.len())
            })
            .collect();
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for &(n0, n1, v0, v1) in &spans {
            let name = HeaderName::from_bytes(&head[n0..n1])
                .map_err(|_| H1Error::Head("bad field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
                .map_err(|_| H1Error::Head("bad field value"))?;
            headers.append(name, value);
        }
        return Ok(Some(Head {
            status,
            fields: HeadFields::Map(headers),
            body,
            keep_alive,
        }));
    }
}

/// What a head's framing fields say, read in one pass over its fields.
struct Delimiters {
    /// A `Transfer-Encoding` field is present.
    te: bool,
    /// The last coding of the last `Transfer-Encoding` field is `chunked`.
    chunked: bool,
    /// A `Content-Length` field is present.
    has_length: bool,
    /// Every `Content-Length` value, when they agree; `Err` when one is not a number or two
    /// differ.
    length: Result<Option<u64>, &'static str>,
    /// The first `Content-Length` value, if it is a number: the length the response
    /// announces (a HEAD or 304 response carries it on, RFC 9110 §8.6).
    first_length: Option<u64>,
    /// `Connection` tokens (RFC 9112 §9.3).
    close: bool,
    keep_alive: bool,
    /// `Connection` names a field, which is then hop-by-hop too.
    refers: bool,
}

impl Delimiters {
    fn of<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut d = Delimiters {
            te: false,
            chunked: false,
            has_length: false,
            length: Ok(None),
            first_length: None,
            close: false,
            keep_alive: false,
            refers: false,
        };
        for (name, value) in fields {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                d.te = true;
                let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                d.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case(b"content-length") {
                if !d.has_length {
                    d.first_length = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok());
                }
                d.has_length = true;
                for part in value.split(|b| *b == b',') {
                    let n = parse_length(part.trim_ascii());
                    d.length = match (d.length, n) {
                        (Err(e), _) => Err(e),
                        (_, None) => Err("bad Content-Length"),
                        (Ok(Some(l)), Some(n)) if l != n => {
                            Err("conflicting Content-Length values")
                        }
                        (Ok(_), Some(n)) => Ok(Some(n)),
                    };
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        d.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        d.keep_alive = true;
                    } else if !token.is_empty() {
                        d.refers = true;
                    }
                }
            }
        }
        d
    }
}

/// The body's delimitation (RFC 9112 §6.3), and whether it leaves the connection usable.
fn delimit(
    d: &Delimiters,
    status: StatusCode,
    method: &Method,
    version: Version,
) -> Result<(Decoder, bool), H1Error> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Decoder::Length(0), true));
    }
    if d.te && version == Version::HTTP_10 {
        // RFC 9112 §6.1: faulty framing in HTTP/1.0; read to the close and close.
        return Ok((Decoder::Close, false));
    }
    if d.te {
        // Chunked only when it is the final coding; otherwise the body runs to the close.
        // A Content-Length beside it is a smuggling sign: this exchange is the last.
        let alone = !d.has_length;
        return Ok(match d.chunked {
            true => (Decoder::Chunked(Chunk::Size), alone),
            false => (Decoder::Close, false),
        });
    }
    Ok(match d.length.map_err(H1Error::Head)? {
        Some(n) => (Decoder::Length(n), true),
        None => (Decoder::Close, false),
    })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether the backend keeps the connection open after this response (RFC 9112 §9.3).
fn persistent(d: &Delimiters, version: Version) -> bool {
    match version {
        Version::HTTP_10 => d.keep_alive,
        _ => !d.close,
    }
}

/// Where a chunked body's decoding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// A response body's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes left.
    Length(u64),
    /// Chunked (RFC 9112 §7.1).
    Chunked(Chunk),
    /// Everything until the backend closes the connection.
    Close,
    /// Complete.
    Done,
}

/// What the decoder took from the buffer.
#[derive(Debug)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (the body is then complete).
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    /// The next step from `buf`; `eof` says the backend closed the connection.
    pub fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, H1Error> {
        loop {
            match *self {
                Decoder::Done | Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Step::End);
                }
                Decoder::Length(left) => {
                    let Some(data) = take(buf, left, eof)? else {
                        return Ok(Step::More);
                    };
                    *self = Decoder::Length(left - data.len() as u64);
                    return Ok(Step::Data(data));
                }
                Decoder::Close if !buf.is_empty() => {
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Decoder::Close if eof => {
                    *self = Decoder::Done;
                    return Ok(Step::End);
                }
                Decoder::Close => return Ok(Step::More),
                Decoder::Chunked(Chunk::Data(left)) => {
                    let Some(data) = take(buf, left, eof)? else {
                        return Ok(Step::More);
                    };
                    let left = left - data.len() as u64;
                    *self = Decoder::Chunked(match left {
                        0 => Chunk::DataEnd,
                        n => Chunk::Data(n),
                    });
                    return Ok(Step::Data(data));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(line) = line(buf, MAX_CHUNK_LINE, eof)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&line)?;
                    *self = Decoder::Chunked(match size {
                        0 => Chunk::Trailers,
                        n => Chunk::Data(n),
                    });
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    // CRLF, or a bare LF (RFC 9112 §2.2).
                    let end = match (buf.first(), buf.get(1)) {
                        (Some(b'\n'), _) => 1,
                        (Some(b'\r'), Some(b'\n')) => 2,
                        (None | Some(b'\r'), None) if eof => return Err(H1Error::Closed),
                        (None | Some(b'\r'), None) => return Ok(Step::More),
                        _ => return Err(H1Error::Chunk("no CRLF after the chunk's data")),
                    };
                    buf.advance(end);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => return self.trailers(buf, eof),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, H1Error> {
        if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
            buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
            *self = Decoder::Done;
            return Ok(Step::End);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete((len, fields))) => {
                let mut map = HeaderMap::with_capacity(fields.len());
                for f in fields.iter() {
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| H1Error::Chunk("bad trailer name"))?;
                    let value = HeaderValue::from_bytes(f.value)
                        .map_err(|_| H1Error::Chunk("bad trailer value"))?;
                    map.append(name, value);
                }
                buf.advance(len);
                *self = Decoder::Done;
                Ok(Step::Trailers(map))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(H1Error::HeadTooLarge),
            Ok(httparse::Status::Partial) if eof => Err(H1Error::Closed),
            Ok(httparse::Status::Partial) => Ok(Step::More),
            Err(_) => Err(H1Error::Chunk("malformed trailer section")),
        }
    }
}

/// Up to `left` bytes from `buf`, or `None` when it is empty (an error at the close).
fn take(buf: &mut BytesMut, left: u64, eof: bool) -> Result<Option<Bytes>, H1Error> {
    if buf.is_empty() {
        return if eof { Err(H1Error::Closed) } else { Ok(None) };
    }
    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
    Ok(Some(buf.split_to(n).freeze()))
}

/// The line at the start of `buf` without its end (CRLF, or a bare LF: RFC 9112 §2.2), or
/// `None` when it is not complete yet.
fn line(buf: &mut BytesMut, max: usize, eof: bool) -> Result<Option<BytesMut>, H1Error> {
    match buf.iter().take(max + 1).position(|b| *b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > max => Err(H1Error::Chunk("chunk line too long")),
        None if eof => Err(H1Error::Closed),
        None => Ok(None),
    }
}

/// The size of a chunk-size line (hex digits, then optional whitespace and extensions,
/// which are ignored: RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(H1Error::Chunk("bad chunk size"));
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(H1Error::Chunk("bad chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| H1Error::Chunk("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| H1Error::Chunk("bad chunk size"))
}

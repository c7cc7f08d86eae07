//! A response head in HTTP/1.1 bytes (RFC 9112 §4 and §6), with the framing its body
//! gets: what hyper's server writes for the same response.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use http::{header, Response, StatusCode};
use hyper::body::SizeHint;
use relay_common::h1::put_field;

/// How the body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304: RFC 9112 §6.3 rule 1).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked (RFC 9112 §7.1): the length is not known when the head goes.
    Chunked,
}

/// Writes the head of `resp` to `out` and says how its body is framed and whether the
/// connection stays open after it. `close` says the request asked to close. One pass over
/// the fields: each lookup in the map costs about as much as writing all of them.
pub fn encode<B>(
    resp: &Response<B>,
    hint: &SizeHint,
    close: bool,
    out: &mut BytesMut,
) -> (Framing, bool) {
    let status = resp.status();
    let h = resp.headers();
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let size: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    out.reserve(size + 128);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    // What hyper writes for a code without a reason phrase.
    out.put_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.put_slice(b"\r\n");
    let mut length = None;
    let (mut says_close, mut dated) = (false, false);
    for (name, value) in h.iter() {
        match *name {
            // The relay frames the body itself; a field naming another framing would
            // contradict it.
            header::TRANSFER_ENCODING => continue,
            // RFC 9110 §8.6: no Content-Length in a 204 (a 304's describes the selected
            // representation and stays). One that is not a number is dropped.
            header::CONTENT_LENGTH => {
                let n = std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.parse().ok());
                if status == StatusCode::NO_CONTENT || n.is_none() || length.is_some() {
                    continue;
                }
                length = n;
            }
            header::CONNECTION => {
                says_close |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
            header::DATE => dated = true,
            _ => {}
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = match (bodiless, length, hint.exact()) {
        (true, _, _) => Framing::None,
        (false, Some(n), _) => Framing::Length(n),
        (false, None, Some(n)) => {
            out.put_slice(b"content-length: ");
            put_decimal(out, n);
            out.put_slice(b"\r\n");
            Framing::Length(n)
        }
        (false, None, None) => {
            out.put_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    // RFC 9112 §9.6: a server that closes after the response says so.
    if close && !says_close {
        out.put_slice(b"connection: close\r\n");
    }
    // RFC 9110 §6.6.1: an origin server with a clock sends Date.
    if !dated {
        out.put_slice(b"date: ");
        DATE.with(|d| out.put_slice(&d.borrow_mut().now()));
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    (framing, !close && !says_close)
}

/// `n` in decimal digits.
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// An IMF-fixdate's length (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7).
const DATE_LEN: usize = 29;

/// The current second's Date value, formatted once per second per thread.
struct CachedDate {
    second: u64,
    text: [u8; DATE_LEN],
}

impl CachedDate {
    fn now(&mut self) -> [u8; DATE_LEN] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LEN {
                self.text.copy_from_slice(text.as_bytes());
                self.second = second;
            }
        }
        self.text
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: u64::MAX, text: [b' '; DATE_LEN] })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head<B>(resp: Response<B>, hint: SizeHint, close: bool) -> (String, Framing, bool) {
        let mut out = BytesMut::new();
        let (f, keep) = encode(&resp, &hint, close, &mut out);
        (String::from_utf8(out.to_vec()).unwrap(), f, keep)
    }

    #[test]
    fn a_known_length_becomes_content_length_and_the_head_ends_with_a_date() {
        let resp = Response::builder().header("x-a", "1").body(()).unwrap();
        let (text, f, keep) = head(resp, SizeHint::with_exact(5), false);
        assert_eq!(f, Framing::Length(5));
        assert!(keep);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        let date = &text[text.find("date: ").unwrap() + 6..text.len() - 4];
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    }

    #[test]
    fn an_unknown_length_is_chunked_and_a_stated_one_is_kept() {
        let (text, f, _) = head(Response::new(()), SizeHint::default(), false);
        assert_eq!(f, Framing::Chunked);
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        let resp = Response::builder()
            .header("content-length", "7")
            .header("transfer-encoding", "gzip")
            .body(())
            .unwrap();
        let (text, f, _) = head(resp, SizeHint::default(), false);
        assert_eq!(f, Framing::Length(7));
        assert!(!text.contains("transfer-encoding"));
        let (text, f, _) = head(Response::new(()), SizeHint::with_exact(1234567890), false);
        assert_eq!(f, Framing::Length(1234567890));
        assert!(
            text.contains("\r\ncontent-length: 1234567890\r\n"),
            "{text}"
        );
    }

    #[test]
    fn no_content_and_not_modified_have_no_body() {
        let resp = Response::builder()
            .status(204)
            .header("content-length", "0")
            .body(())
            .unwrap();
        let (text, f, _) = head(resp, SizeHint::with_exact(0), false);
        assert_eq!(f, Framing::None);
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!text.contains("content-length"));
        let resp = Response::builder()
            .status(304)
            .header("content-length", "9")
            .body(())
            .unwrap();
        let (text, f, _) = head(resp, SizeHint::with_exact(0), false);
        assert_eq!(f, Framing::None);
        assert!(text.contains("content-length: 9\r\n"));
    }

    #[test]
    fn closing_is_said_once_whoever_asked() {
        let (text, _, keep) = head(Response::new(()), SizeHint::with_exact(0), true);
        assert!(!keep);
        assert_eq!(text.matches("connection: close").count(), 1);
        let resp = Response::builder()
            .header("connection", "close")
            .body(())
            .unwrap();
        let (text, _, keep) = head(resp, SizeHint::with_exact(0), false);
        assert!(!keep);
        assert_eq!(text.matches("connection: close").count(), 1);
        let resp = Response::builder().status(599).body(()).unwrap();
        assert!(head(resp, SizeHint::with_exact(0), false)
            .0
            .starts_with("HTTP/1.1 599 <none>\r\n"));
    }
}

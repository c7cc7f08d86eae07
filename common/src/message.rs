//! JSON messages of the agent protocol.
//!
//! Header values are arbitrary bytes (RFC 9110 §5.5 allows obs-text), JSON strings are UTF-8.
//! Each value byte is carried as the Unicode code point of the same number (U+0000..U+00FF,
//! i.e. ISO-8859-1), which is lossless and leaves ASCII values readable. Names are lowercase
//! ASCII. Order and repetition of headers are kept: `headers` is a list of pairs.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// Whether a message has a body that follows in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyKind {
    /// No body at all (the message ends with its head; HTTP/2 END_STREAM on HEADERS).
    Empty,
    /// Body bytes follow (requeststream for requests, DATA frames for responses).
    Stream,
}

/// A user request handed to an agent in a poll answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestHead {
    /// Request id (32 hex digits); names the request in `/server/response` and
    /// `/server/requeststream`.
    pub id: String,
    /// Method, as sent by the user.
    pub method: String,
    /// Backend request target: raw path and query, byte for byte as the user sent them
    /// (minus the `/client/<name>` prefix).
    pub target: String,
    /// Headers, hop-by-hop and framing removed, relay headers added.
    pub headers: Vec<(String, String)>,
    /// Whether the agent must fetch a body through `/server/requeststream`.
    pub body: BodyKind,
    /// Exact body length when the user declared one; `None` means "until END".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    /// The protocol the user asked to switch to (`Upgrade` header, RFC 9110 §7.8) when the
    /// request is a genuine upgrade request. Only then may the backend answer 101, after
    /// which the request's upload and response bodies carry the raw tunnel bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The headers already as a map, when the decoder of binary heads could build one
    /// (`headers` is then empty): the agent skips the round trip through strings. Never on
    /// the wire; read the headers through [`RequestHead::header_map`].
    #[serde(skip)]
    pub decoded: Option<HeaderMap>,
}

impl RequestHead {
    /// The headers as a map (refused as [`decode_headers`] refuses them).
    pub fn header_map(&self) -> Result<HeaderMap, HeaderError> {
        match &self.decoded {
            Some(m) => Ok(m.clone()),
            None => decode_headers(&self.headers),
        }
    }

    /// Like [`RequestHead::header_map`], taking the decoded map instead of copying it.
    pub fn take_header_map(&mut self) -> Result<HeaderMap, HeaderError> {
        match self.decoded.take() {
            Some(m) => Ok(m),
            None => decode_headers(&self.headers),
        }
    }
}

/// What a poll returns: new requests for this agent, and ids the server gave up on (the user
/// left), so the agent can cancel their backend requests at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PollAnswer {
    /// New requests, oldest first.
    #[serde(default)]
    pub requests: Vec<RequestHead>,
    /// Ids whose user went away.
    #[serde(default)]
    pub cancel: Vec<String>,
}

/// The HEAD frame of a response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseHead {
    /// Status code from the backend (100..=599; 1xx other than 101 are not relayed).
    pub status: u16,
    /// Headers, hop-by-hop and framing removed.
    pub headers: Vec<(String, String)>,
    /// Whether DATA/TRAILERS frames follow.
    pub body: BodyKind,
    /// Exact body length when the backend declared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
}

/// Trailer fields (TRAILERS frame).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trailers {
    /// Trailer fields in order.
    pub headers: Vec<(String, String)>,
}

/// A header list that could not be turned back into HTTP headers.
#[derive(Debug, thiserror::Error)]
#[error("invalid header {name:?}: {reason}")]
pub struct HeaderError {
    /// The offending name.
    pub name: String,
    /// What was wrong.
    pub reason: &'static str,
}

/// Encodes a header map as the wire's list of pairs.
pub fn encode_headers(map: &HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| (k.as_str().to_owned(), latin1(v.as_bytes())))
        .collect()
}

/// Each byte as the code point of the same number; an ASCII value (nearly all of them) is
/// one copy, not a character at a time.
pub fn latin1(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.is_ascii() => s.to_owned(),
        _ => b.iter().map(|&b| b as char).collect(),
    }
}

/// Decodes the wire's header pairs. Values with CR, LF or NUL, or code points above U+00FF,
/// are refused (never split into two headers).
pub fn decode_headers(list: &[(String, String)]) -> Result<HeaderMap, HeaderError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for (k, v) in list {
        let err = |reason| HeaderError {
            name: k.clone(),
            reason,
        };
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| err("bad name"))?;
        let value = if v.is_ascii() {
            // Code points below 0x80 are their own bytes.
            HeaderValue::from_str(v).map_err(|_| err("bad value"))?
        } else {
            let mut bytes = Vec::with_capacity(v.len());
            for c in v.chars() {
                let c = u32::from(c);
                if c > 0xff {
                    return Err(err("value byte above 0xFF"));
                }
                bytes.push(c as u8);
            }
            HeaderValue::from_bytes(&bytes).map_err(|_| err("bad value"))?
        };
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_bytes() {
        let mut m = HeaderMap::new();
        m.append("x-a", HeaderValue::from_bytes(b"caf\xe9 \t x").unwrap());
        m.append("x-a", HeaderValue::from_static("two"));
        m.append("set-cookie", HeaderValue::from_static("a=b"));
        let enc = encode_headers(&m);
        let json = serde_json::to_string(&enc).unwrap();
        let back: Vec<(String, String)> = serde_json::from_str(&json).unwrap();
        assert_eq!(decode_headers(&back).unwrap(), m);
    }

    #[test]
    fn refuses_splitting() {
        let list = vec![("x-a".to_owned(), "a\r\nx-b: c".to_owned())];
        assert!(decode_headers(&list).is_err());
        let list = vec![("x-a".to_owned(), "\u{100}".to_owned())];
        assert!(decode_headers(&list).is_err());
        let list = vec![("bad name".to_owned(), "v".to_owned())];
        assert!(decode_headers(&list).is_err());
    }
}

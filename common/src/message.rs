//! JSON messages of the agent protocol.
//!
//! Header values are arbitrary bytes (RFC 9110 §5.5 allows obs-text), JSON strings are UTF-8.
//! Each value byte is carried as the Unicode code point of the same number (U+0000..U+00FF,
//! i.e. ISO-8859-1), which is lossless and leaves ASCII values readable. Names are lowercase
//! ASCII. Order and repetition of headers are kept: `headers` is a list of pairs.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

/// Whether a message has a body that follows in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyKind {
    /// No body at all (the message ends with its head; HTTP/2 END_STREAM on HEADERS).
    Empty,
    /// Body bytes follow (requeststream for requests, DATA frames for responses).
    Stream,
}

/// A head's header fields, in the form the side that made the head had them: the wire's
/// list of pairs (JSON heads, Go agents, fields `http` refuses) or a map (the server from
/// the user's request, the agent from the backend's response, either side from a binary
/// head), so that a head crossing a session never goes through strings. The JSON always
/// carries the list: a map's fields are written as the list would hold them.
#[derive(Debug, Clone)]
pub enum Fields {
    /// The wire's pairs, in order.
    List(Vec<(String, String)>),
    /// A map (order of each name's values kept).
    Map(HeaderMap),
    /// Fields already in the binary heads' layout ([`crate::heads::FieldBlock`]): what the
    /// server makes from a user's plain request head, so that a head written to a session
    /// is copied once instead of built as a map and encoded from it. Made only from names
    /// and values `http` accepted.
    Encoded(bytes::Bytes),
}

impl Default for Fields {
    fn default() -> Self {
        Fields::List(Vec::new())
    }
}

impl From<Vec<(String, String)>> for Fields {
    fn from(list: Vec<(String, String)>) -> Self {
        Fields::List(list)
    }
}

impl From<HeaderMap> for Fields {
    fn from(map: HeaderMap) -> Self {
        Fields::Map(map)
    }
}

impl Fields {
    /// The fields as a map (a list refused as [`decode_headers`] refuses it).
    pub fn to_map(&self) -> Result<HeaderMap, HeaderError> {
        match self {
            Fields::List(list) => decode_headers(list),
            Fields::Map(map) => Ok(map.clone()),
            Fields::Encoded(block) => crate::heads::block_map(block),
        }
    }

    /// Like [`Fields::to_map`], taking a map out instead of copying it (empty afterwards).
    pub fn take_map(&mut self) -> Result<HeaderMap, HeaderError> {
        match std::mem::take(self) {
            Fields::List(list) => decode_headers(&list),
            Fields::Map(map) => Ok(map),
            Fields::Encoded(block) => crate::heads::block_map(&block),
        }
    }

    /// The fields as the wire's list.
    pub fn to_list(&self) -> Vec<(String, String)> {
        match self {
            Fields::List(list) => list.clone(),
            Fields::Map(map) => encode_headers(map),
            Fields::Encoded(block) => crate::heads::block_list(block),
        }
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Fields::List(list) => list.serialize(s),
            Fields::Map(map) => {
                let mut seq = s.serialize_seq(Some(map.len()))?;
                for (k, v) in map {
                    seq.serialize_element(&(k.as_str(), latin1(v.as_bytes())))?;
                }
                seq.end()
            }
            Fields::Encoded(block) => crate::heads::block_list(block).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(Fields::List)
    }
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
    pub headers: Fields,
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
    pub headers: Fields,
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

    /// A head holding a map writes the same JSON as the same head holding the list, and
    /// comes back as the list.
    #[test]
    fn map_form_serializes_as_the_list() {
        let mut m = HeaderMap::new();
        m.append("x-a", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        m.append("x-a", HeaderValue::from_static("two"));
        let listed = RequestHead {
            id: "1".into(),
            method: "GET".into(),
            target: "/".into(),
            headers: encode_headers(&m).into(),
            body: BodyKind::Empty,
            content_length: None,
            upgrade: Some("websocket".into()),
        };
        let mapped = RequestHead {
            headers: m.clone().into(),
            ..listed.clone()
        };
        let json = serde_json::to_string(&mapped).unwrap();
        assert_eq!(json, serde_json::to_string(&listed).unwrap());
        assert!(
            json.contains(r#""headers":[["x-a","café"],["x-a","two"]]"#),
            "{json}"
        );
        let back: RequestHead = serde_json::from_str(&json).unwrap();
        assert!(matches!(back.headers, Fields::List(_)));
        assert_eq!(back.headers.to_map().unwrap(), m);
        assert_eq!(mapped.headers.to_map().unwrap(), m);

        let resp = ResponseHead {
            status: 200,
            headers: m.clone().into(),
            body: BodyKind::Stream,
            content_length: Some(3),
        };
        let json = serde_json::to_string(&resp).unwrap();
        assert_eq!(
            json,
            r#"{"status":200,"headers":[["x-a","café"],["x-a","two"]],"body":"stream","content_length":3}"#
        );
        let mut back: ResponseHead = serde_json::from_str(&json).unwrap();
        assert_eq!(back.headers.take_map().unwrap(), m);
        assert!(back.headers.to_list().is_empty(), "taken");
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

//! JSON messages of the agent protocol.
//!
//! Header values are arbitrary bytes (RFC 9110 §5.5 allows obs-text), JSON strings are UTF-8.
//! Each value byte is carried as the Unicode code point of the same number (U+0000..U+00FF,
//! i.e. ISO-8859-1), which is lossless and leaves ASCII values readable. Names are lowercase
//! ASCII. Order and repetition of headers are kept: `headers` is a list of pairs.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::ser::{SerializeSeq, SerializeStruct};
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

/// A user request handed to an agent in a poll answer.
///
/// Its headers are in one of two forms: the wire's list (`headers`), or a map (`decoded`,
/// with `headers` empty) where a side already had one (the server from the user's request,
/// the agent from a binary head), so that a head crossing a session never goes through
/// strings. Read them through [`RequestHead::header_map`]; the JSON always carries the list
/// (`Serialize` writes the map's fields as the list would hold them).
#[derive(Debug, Clone, Deserialize)]
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
    /// The headers as a map (`headers` is then empty). Never on the wire as such; read the
    /// headers through [`RequestHead::header_map`].
    #[serde(skip)]
    pub decoded: Option<HeaderMap>,
}

impl RequestHead {
    /// The headers as a map (refused as [`decode_headers`] refuses them).
    pub fn header_map(&self) -> Result<HeaderMap, HeaderError> {
        either_form(self.decoded.clone(), &self.headers)
    }

    /// Like [`RequestHead::header_map`], taking the decoded map instead of copying it.
    pub fn take_header_map(&mut self) -> Result<HeaderMap, HeaderError> {
        either_form(self.decoded.take(), &self.headers)
    }
}

impl Serialize for RequestHead {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let optional =
            usize::from(self.content_length.is_some()) + usize::from(self.upgrade.is_some());
        let mut st = s.serialize_struct("RequestHead", 5 + optional)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("method", &self.method)?;
        st.serialize_field("target", &self.target)?;
        st.serialize_field("headers", &Listed(&self.headers, self.decoded.as_ref()))?;
        st.serialize_field("body", &self.body)?;
        if let Some(n) = &self.content_length {
            st.serialize_field("content_length", n)?;
        }
        if let Some(u) = &self.upgrade {
            st.serialize_field("upgrade", u)?;
        }
        st.end()
    }
}

/// A head's headers as a map, from whichever form the head holds.
fn either_form(
    decoded: Option<HeaderMap>,
    list: &[(String, String)],
) -> Result<HeaderMap, HeaderError> {
    decoded.map_or_else(|| decode_headers(list), Ok)
}

/// A head's headers as the wire's list of pairs, from whichever form the head holds.
struct Listed<'a>(&'a [(String, String)], Option<&'a HeaderMap>);

impl Serialize for Listed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.1 {
            Some(map) => {
                let mut seq = s.serialize_seq(Some(map.len()))?;
                for (k, v) in map {
                    seq.serialize_element(&(k.as_str(), latin1(v.as_bytes())))?;
                }
                seq.end()
            }
            None => self.0.serialize(s),
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

/// The HEAD frame of a response. Its headers are in one of two forms, as a
/// [`RequestHead`]'s are: read them through [`ResponseHead::header_map`].
#[derive(Debug, Clone, Deserialize)]
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
    /// The headers as a map (`headers` is then empty): the agent's from the backend's
    /// response, the server's from a binary head. Never on the wire as such.
    #[serde(skip)]
    pub decoded: Option<HeaderMap>,
}

impl ResponseHead {
    /// The headers as a map (refused as [`decode_headers`] refuses them).
    pub fn header_map(&self) -> Result<HeaderMap, HeaderError> {
        either_form(self.decoded.clone(), &self.headers)
    }

    /// Like [`ResponseHead::header_map`], taking the decoded map instead of copying it.
    pub fn take_header_map(&mut self) -> Result<HeaderMap, HeaderError> {
        either_form(self.decoded.take(), &self.headers)
    }
}

impl Serialize for ResponseHead {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let optional = usize::from(self.content_length.is_some());
        let mut st = s.serialize_struct("ResponseHead", 3 + optional)?;
        st.serialize_field("status", &self.status)?;
        st.serialize_field("headers", &Listed(&self.headers, self.decoded.as_ref()))?;
        st.serialize_field("body", &self.body)?;
        if let Some(n) = &self.content_length {
            st.serialize_field("content_length", n)?;
        }
        st.end()
    }
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
            headers: encode_headers(&m),
            body: BodyKind::Empty,
            content_length: None,
            upgrade: Some("websocket".into()),
            decoded: None,
        };
        let mapped = RequestHead {
            headers: Vec::new(),
            decoded: Some(m.clone()),
            ..listed.clone()
        };
        let json = serde_json::to_string(&mapped).unwrap();
        assert_eq!(json, serde_json::to_string(&listed).unwrap());
        assert!(
            json.contains(r#""headers":[["x-a","café"],["x-a","two"]]"#),
            "{json}"
        );
        let back: RequestHead = serde_json::from_str(&json).unwrap();
        assert_eq!(back.header_map().unwrap(), m);
        assert_eq!(mapped.header_map().unwrap(), m);

        let resp = ResponseHead {
            status: 200,
            headers: Vec::new(),
            body: BodyKind::Stream,
            content_length: Some(3),
            decoded: Some(m.clone()),
        };
        let json = serde_json::to_string(&resp).unwrap();
        assert_eq!(
            json,
            r#"{"status":200,"headers":[["x-a","café"],["x-a","two"]],"body":"stream","content_length":3}"#
        );
        let mut back: ResponseHead = serde_json::from_str(&json).unwrap();
        assert_eq!(back.take_header_map().unwrap(), m);
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

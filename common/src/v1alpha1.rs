//! The wire messages of Google Cloud Robotics' Go `http-relay` (package
//! `cloudrobotics.http_relay.v1alpha1`, `http_over_rpc.proto`), which the server also
//! speaks so that fleets running the Go `http-relay-client` connect unchanged.
//!
//! The schema is proto2: `status_code` and `eof` have *presence* (the first response
//! message is the one that carries a status code), hence the `Option`s. Header names and
//! values are `string` in the schema; they are declared `bytes` here, which is the same wire
//! type (length-delimited), so a header value that is not valid UTF-8 (RFC 9110 §5.5 allows
//! obs-text) is carried as it is instead of failing the whole message.
//!
//! One message is one HTTP exchange: a poll answer carries one [`HttpRequest`], a
//! `/server/response` POST one [`HttpResponse`]. There is no length prefix.

use bytes::Bytes;
use prost::Message;

/// `Content-Type` of a poll answer.
pub const REQUEST_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest";

/// `Content-Type` of a response POST (the Go client sets it; the Go server ignores it).
pub const RESPONSE_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse";

/// The `url` of a relayed request is this origin followed by the raw target.
pub const URL_ORIGIN: &str = "http://invalid";

/// One header field value (`HttpHeader`): one entry per value, names may repeat.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct HttpHeader {
    /// Field name (Go sends canonical case, `X-Foo`).
    #[prost(bytes = "vec", optional, tag = "1")]
    pub name: Option<Vec<u8>>,
    /// One value.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
}

/// A user request handed to a Go relay-client (`HttpRequest`).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct HttpRequest {
    /// Request id; the Go client treats it as opaque and echoes it in every call.
    #[prost(string, optional, tag = "1")]
    pub id: Option<String>,
    /// Method.
    #[prost(string, optional, tag = "2")]
    pub method: Option<String>,
    /// [`URL_ORIGIN`] + backend path and query.
    #[prost(string, optional, tag = "3")]
    pub url: Option<String>,
    /// Request headers (no `Host`).
    #[prost(message, repeated, tag = "4")]
    pub header: Vec<HttpHeader>,
    /// The whole request body.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
    /// The user's `Host`.
    #[prost(string, optional, tag = "6")]
    pub host: Option<String>,
}

/// One piece of a backend's response (`HttpResponse`).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct HttpResponse {
    /// Present only in the first message of a response: its presence marks that message.
    #[prost(int32, optional, tag = "1")]
    pub status_code: Option<i32>,
    /// Response headers (used from the first message only).
    #[prost(message, repeated, tag = "2")]
    pub header: Vec<HttpHeader>,
    /// The next body bytes (a slice of the message when decoded from [`Bytes`]: no copy).
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub body: Option<Bytes>,
    /// The request id.
    #[prost(string, optional, tag = "4")]
    pub id: Option<String>,
    /// True only on the last message.
    #[prost(bool, optional, tag = "5")]
    pub eof: Option<bool>,
    /// Trailer fields (the Go client sends them on the last message).
    #[prost(message, repeated, tag = "6")]
    pub trailer: Vec<HttpHeader>,
    /// On the last message: milliseconds the backend took (metrics only).
    #[prost(int64, optional, tag = "7")]
    pub backend_duration_ms: Option<i64>,
}

impl HttpHeader {
    /// A header entry.
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        HttpHeader {
            name: Some(name.into()),
            value: Some(value.into()),
        }
    }
}

/// Go's canonical form of a header name (`content-type` → `Content-Type`), as
/// `net/http.CanonicalHeaderKey` writes it: the Go client hands names to `Header.Add`,
/// which canonicalises anyway, but logs and captures then read as the Go server's do.
pub fn canonical_name(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// Encodes a message.
pub fn encode(msg: &impl Message) -> Vec<u8> {
    msg.encode_to_vec()
}

/// Decodes a message from `bytes`; `bytes` fields share its buffer instead of copying.
pub fn decode_bytes<M: Message + Default>(bytes: Bytes) -> Result<M, prost::DecodeError> {
    M::decode(bytes)
}

/// Decodes a message, or says why it is not one.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, prost::DecodeError> {
    M::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden bytes, written out by hand from the proto2 encoding rules (tag = field << 3 |
    /// wire type) so a change of a field number or of presence shows here.
    #[test]
    fn http_request_encoding_is_pinned() {
        let req = HttpRequest {
            id: Some("n:ab".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/x?y".into()),
            header: vec![HttpHeader::new("A", "b")],
            body: Some(b"hi".to_vec()),
            host: Some("h".into()),
        };
        let mut want = vec![0x0a, 4];
        want.extend_from_slice(b"n:ab");
        want.extend_from_slice(&[0x12, 3]);
        want.extend_from_slice(b"GET");
        want.extend_from_slice(&[0x1a, 18]);
        want.extend_from_slice(b"http://invalid/x?y");
        want.extend_from_slice(&[0x22, 6, 0x0a, 1, b'A', 0x12, 1, b'b']);
        want.extend_from_slice(&[0x2a, 2, b'h', b'i']);
        want.extend_from_slice(&[0x32, 1, b'h']);
        assert_eq!(req.encode_to_vec(), want);
        assert_eq!(decode::<HttpRequest>(&want).unwrap(), req);
    }

    #[test]
    fn http_response_presence_is_kept() {
        // A first message: status 200 present, eof present and false.
        let first = HttpResponse {
            status_code: Some(200),
            id: Some("i".into()),
            eof: Some(false),
            ..Default::default()
        };
        assert_eq!(
            first.encode_to_vec(),
            [0x08, 200, 1, 0x22, 1, b'i', 0x28, 0]
        );
        // A later message: no status at all (absent, not 0), the last one with eof and
        // trailers and the backend's duration.
        let last = HttpResponse {
            body: Some(Bytes::from_static(b"z")),
            id: Some("i".into()),
            eof: Some(true),
            trailer: vec![HttpHeader::new("Grpc-Status", "0")],
            backend_duration_ms: Some(300),
            ..Default::default()
        };
        let bytes = last.encode_to_vec();
        let mut want = vec![0x1a, 1, b'z', 0x22, 1, b'i', 0x28, 1, 0x32, 16, 0x0a, 11];
        want.extend_from_slice(b"Grpc-Status");
        want.extend_from_slice(&[0x12, 1, b'0', 0x38, 0xac, 0x02]);
        assert_eq!(bytes, want);
        let back: HttpResponse = decode(&bytes).unwrap();
        assert_eq!(back.status_code, None);
        assert_eq!(back.eof, Some(true));
        // Status 0 present is not status absent.
        let zero = HttpResponse {
            status_code: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.encode_to_vec(), [0x08, 0]);
        assert_eq!(decode::<HttpResponse>(&[]).unwrap().status_code, None);
    }

    #[test]
    fn header_values_need_not_be_utf8() {
        let bytes = [0x12, 6, 0x0a, 1, b'X', 0x12, 1, 0xe9];
        let r: HttpResponse = decode(&bytes).unwrap();
        assert_eq!(r.header[0].value.as_deref(), Some(&[0xe9][..]));
        assert!(decode::<HttpResponse>(&[0x12, 9, 0x0a]).is_err());
    }

    #[test]
    fn canonical_names_follow_go() {
        assert_eq!(canonical_name("content-type"), "Content-Type");
        assert_eq!(canonical_name("x-b3-traceid"), "X-B3-Traceid");
        assert_eq!(canonical_name("te"), "Te");
    }
}

//! Agent sessions (protocol version 2): many requests over one long-lived agent connection.
//!
//! A session is a WebSocket (RFC 6455) opened by the agent on `/server/session`. Each
//! binary WebSocket message carries one or more whole frames; a writer puts every frame
//! that is ready into one message (coalescing), so a busy session costs one write for many
//! requests and an idle one adds no delay.
//!
//! ```text
//! frame = kind:u8 length:u32be payload[length]
//! ```
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | OPEN | server → agent | JSON [`RequestHead`] (the request's id is inside) |
//! | 2 | CANCEL | server → agent | the request id (ASCII): the user left |
//! | 3 | RESPONSE | agent → server | a whole response: see [`Response`] |
//! | 4 | CREDIT | agent → server | u32be: more free slots (requests the agent will take) |
//! | 5 | PING | both | 8 opaque bytes; answered by PONG with the same bytes |
//! | 6 | PONG | both | the 8 bytes of the PING |
//! | 7 | GOAWAY | both | UTF-8 reason: the sender ends the session after this frame |
//! | 8 | ACK | both | u64be: frames received on this session so far of the kind the other side sends work in: RESPONSE frames (server → agent), OPEN frames (agent → server) |
//!
//! A RESPONSE payload is `id_len:u8 id head_len:u32be head body_len:u32be body trailers`,
//! where `head` is a JSON [`ResponseHead`], `body` the whole body and `trailers` (may be
//! empty) a JSON [`Trailers`]. Only whole responses of at most [`INLINE_BODY_MAX`] body
//! bytes travel on the session; streaming bodies, bigger bodies, request bodies and
//! tunnels use the exchanges of protocol 1 with the same request id, so bulk transfer
//! keeps its dedicated connections and never delays the small requests on the session.
//!
//! The agent keeps each RESPONSE until an ACK covers it; when a session is lost, the
//! responses not acknowledged go again through `/server/response` exchanges (a duplicate
//! of one that did arrive is refused there, so nothing is delivered twice). The server
//! keeps each OPEN until the agent's ACK covers it; an agent that gives a session up says
//! on its next one (`session=<n>&resume=<earlier>.<opens>`) how many OPENs it received on
//! the earlier one, and the server puts the others back in the queue: they never arrived
//! and never will, so this is no replay.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::{RequestHead, ResponseHead, Trailers};

/// The protocol version an agent asks for on `/server/session` (`X-Relay-Protocol`).
pub const SESSION_PROTOCOL_VERSION: &str = "2";

/// The path of the session endpoint (under the server's base path).
pub const SESSION_PATH: &str = "/server/session";

/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`, RFC 6455 §1.9) of a session.
pub const SESSION_SUBPROTOCOL: &str = "relay-session.v2";

/// Largest response body that travels whole on the session.
pub const INLINE_BODY_MAX: usize = 64 * 1024;

/// Largest WebSocket message either side accepts on a session: a writer puts at most
/// [`COALESCE_MAX`] bytes of frames into one message, and one frame alone is smaller
/// than this.
pub const MAX_MESSAGE: usize = 4 << 20;

/// A writer stops adding frames to a message at this size.
pub const COALESCE_MAX: usize = 256 * 1024;

/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 5;

/// A session frame, decoded.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A request for the agent.
    Open(RequestHead),
    /// The user of this request left.
    Cancel(String),
    /// A whole response.
    Response(Response),
    /// More free slots.
    Credit(u32),
    /// Liveness probe.
    Ping([u8; 8]),
    /// Its answer.
    Pong([u8; 8]),
    /// The sender ends the session.
    GoAway(String),
    /// Frames received so far (RESPONSEs by the server, OPENs by the agent).
    Ack(u64),
}

/// A whole response as one RESPONSE frame carries it.
#[derive(Debug, Clone)]
pub struct Response {
    /// The request it answers.
    pub id: String,
    /// Status and headers.
    pub head: ResponseHead,
    /// The whole body (a slice of the received message: not copied).
    pub body: Bytes,
    /// Trailer fields, if any.
    pub trailers: Option<Trailers>,
}

/// A message that is not a valid sequence of frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Ends inside a frame.
    #[error("session frame truncated")]
    Truncated,
    /// Unknown kind byte.
    #[error("unknown session frame kind {0}")]
    UnknownKind(u8),
    /// A payload that does not parse.
    #[error("bad {kind} frame: {why}")]
    Bad {
        /// The frame's name.
        kind: &'static str,
        /// What was wrong.
        why: String,
    },
}

const OPEN: u8 = 1;
const CANCEL: u8 = 2;
const RESPONSE: u8 = 3;
const CREDIT: u8 = 4;
const PING: u8 = 5;
const PONG: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 8;

fn put_header(b: &mut BytesMut, kind: u8, len: usize) {
    b.put_u8(kind);
    b.put_u32(u32::try_from(len).expect("bug: session frame over 4 GiB"));
}

/// Appends an OPEN frame for `head`.
pub fn put_open(b: &mut BytesMut, head: &RequestHead) {
    let json = serde_json::to_vec(head).expect("bug: request heads always serialise");
    put_header(b, OPEN, json.len());
    b.put_slice(&json);
}

/// Appends a CANCEL frame for request `id`.
pub fn put_cancel(b: &mut BytesMut, id: &str) {
    put_header(b, CANCEL, id.len());
    b.put_slice(id.as_bytes());
}

/// Appends a CREDIT frame of `n` more slots.
pub fn put_credit(b: &mut BytesMut, n: u32) {
    put_header(b, CREDIT, 4);
    b.put_u32(n);
}

/// Appends a PING (`pong == false`) or PONG frame.
pub fn put_ping(b: &mut BytesMut, data: [u8; 8], pong: bool) {
    put_header(b, if pong { PONG } else { PING }, 8);
    b.put_slice(&data);
}

/// Appends an ACK frame: `n` frames received so far (RESPONSEs, or OPENs by the agent).
pub fn put_ack(b: &mut BytesMut, n: u64) {
    put_header(b, ACK, 8);
    b.put_u64(n);
}

/// Appends a GOAWAY frame.
pub fn put_goaway(b: &mut BytesMut, reason: &str) {
    put_header(b, GOAWAY, reason.len());
    b.put_slice(reason.as_bytes());
}

/// Appends a RESPONSE frame. The body is copied once, into the frame (it is at most
/// [`INLINE_BODY_MAX`] bytes, and the frame is the message the carrier sends).
pub fn put_response(
    b: &mut BytesMut,
    id: &str,
    head: &ResponseHead,
    body: &[u8],
    trailers: Option<&Trailers>,
) {
    let id_len = u8::try_from(id.len()).expect("bug: request ids are short");
    let head = serde_json::to_vec(head).expect("bug: response heads always serialise");
    let trailers = trailers.map(|t| serde_json::to_vec(t).expect("bug: trailers serialise"));
    let tlen = trailers.as_ref().map_or(0, Vec::len);
    let len = 1 + id.len() + 4 + head.len() + 4 + body.len() + tlen;
    b.reserve(FRAME_HEADER_LEN + len);
    put_header(b, RESPONSE, len);
    b.put_u8(id_len);
    b.put_slice(id.as_bytes());
    b.put_u32(head.len() as u32);
    b.put_slice(&head);
    b.put_u32(u32::try_from(body.len()).expect("bug: inline bodies are small"));
    b.put_slice(body);
    if let Some(t) = trailers {
        b.put_slice(&t);
    }
}

/// Decodes every frame of one message. Nothing is copied out of `msg` except JSON heads.
pub fn decode(mut msg: Bytes) -> Result<Vec<Frame>, SessionError> {
    let mut out = Vec::new();
    while msg.has_remaining() {
        if msg.len() < FRAME_HEADER_LEN {
            return Err(SessionError::Truncated);
        }
        let kind = msg.get_u8();
        let len = msg.get_u32() as usize;
        if msg.len() < len {
            return Err(SessionError::Truncated);
        }
        let payload = msg.split_to(len);
        out.push(decode_one(kind, payload)?);
    }
    Ok(out)
}

fn bad(kind: &'static str, why: impl ToString) -> SessionError {
    SessionError::Bad {
        kind,
        why: why.to_string(),
    }
}

fn ascii(kind: &'static str, p: &[u8]) -> Result<String, SessionError> {
    std::str::from_utf8(p)
        .map(str::to_owned)
        .map_err(|_| bad(kind, "not UTF-8"))
}

fn eight(kind: &'static str, p: &[u8]) -> Result<[u8; 8], SessionError> {
    p.try_into()
        .map_err(|_| bad(kind, "payload is not 8 bytes"))
}

fn decode_one(kind: u8, p: Bytes) -> Result<Frame, SessionError> {
    Ok(match kind {
        OPEN => Frame::Open(serde_json::from_slice(&p).map_err(|e| bad("OPEN", e))?),
        CANCEL => Frame::Cancel(ascii("CANCEL", &p)?),
        RESPONSE => Frame::Response(decode_response(p)?),
        CREDIT => {
            let n: [u8; 4] = p[..].try_into().map_err(|_| bad("CREDIT", "not 4 bytes"))?;
            Frame::Credit(u32::from_be_bytes(n))
        }
        PING => Frame::Ping(eight("PING", &p)?),
        PONG => Frame::Pong(eight("PONG", &p)?),
        GOAWAY => Frame::GoAway(String::from_utf8_lossy(&p).into_owned()),
        ACK => Frame::Ack(u64::from_be_bytes(eight("ACK", &p)?)),
        k => return Err(SessionError::UnknownKind(k)),
    })
}

fn decode_response(mut p: Bytes) -> Result<Response, SessionError> {
    let short = || bad("RESPONSE", "truncated");
    let take = |n: usize, p: &mut Bytes| {
        if p.len() < n {
            Err(short())
        } else {
            Ok(p.split_to(n))
        }
    };
    let id_len = take(1, &mut p)?[0] as usize;
    let id = ascii("RESPONSE", &take(id_len, &mut p)?)?;
    let head_len = u32::from_be_bytes(take(4, &mut p)?[..].try_into().expect("4 bytes")) as usize;
    let head: ResponseHead =
        serde_json::from_slice(&take(head_len, &mut p)?).map_err(|e| bad("RESPONSE", e))?;
    let body_len = u32::from_be_bytes(take(4, &mut p)?[..].try_into().expect("4 bytes")) as usize;
    if body_len > INLINE_BODY_MAX {
        return Err(bad("RESPONSE", "inline body over 64 KiB"));
    }
    let body = take(body_len, &mut p)?;
    let trailers = if p.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&p).map_err(|e| bad("RESPONSE", e))?)
    };
    Ok(Response {
        id,
        head,
        body,
        trailers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::BodyKind;

    fn head(id: &str) -> RequestHead {
        RequestHead {
            id: id.into(),
            method: "GET".into(),
            target: "/a?b=%2F".into(),
            headers: vec![("x-a".into(), "caf\u{e9}".into())],
            body: BodyKind::Empty,
            content_length: None,
            upgrade: None,
        }
    }

    #[test]
    fn frames_round_trip_in_one_message() {
        let mut b = BytesMut::new();
        put_open(&mut b, &head("00ff"));
        put_cancel(&mut b, "00fe");
        put_credit(&mut b, 7);
        put_ping(&mut b, *b"12345678", false);
        put_ping(&mut b, *b"abcdefgh", true);
        let rh = ResponseHead {
            status: 201,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: BodyKind::Stream,
            content_length: Some(5),
        };
        let t = Trailers {
            headers: vec![("grpc-status".into(), "0".into())],
        };
        put_response(&mut b, "00fd", &rh, b"hello", Some(&t));
        put_response(&mut b, "00fc", &rh, b"", None);
        put_goaway(&mut b, "draining");
        put_ack(&mut b, 1 << 40);
        let frames = decode(b.freeze()).unwrap();
        assert_eq!(frames.len(), 9);
        assert!(
            matches!(&frames[0], Frame::Open(h) if h.id == "00ff" && h.target == "/a?b=%2F"
            && h.headers[0].1 == "caf\u{e9}")
        );
        assert!(matches!(&frames[1], Frame::Cancel(id) if id == "00fe"));
        assert!(matches!(frames[2], Frame::Credit(7)));
        assert!(matches!(frames[3], Frame::Ping(d) if &d == b"12345678"));
        assert!(matches!(frames[4], Frame::Pong(d) if &d == b"abcdefgh"));
        match &frames[5] {
            Frame::Response(r) => {
                assert_eq!(r.id, "00fd");
                assert_eq!(r.head.status, 201);
                assert_eq!(&r.body[..], b"hello");
                assert_eq!(r.trailers.as_ref().unwrap().headers[0].0, "grpc-status");
            }
            f => panic!("{f:?}"),
        }
        assert!(
            matches!(&frames[6], Frame::Response(r) if r.body.is_empty() && r.trailers.is_none())
        );
        assert!(matches!(&frames[7], Frame::GoAway(r) if r == "draining"));
        assert!(matches!(frames[8], Frame::Ack(n) if n == 1 << 40));
    }

    #[test]
    fn golden_bytes_pin_the_layout() {
        let mut b = BytesMut::new();
        put_credit(&mut b, 3);
        put_cancel(&mut b, "ab");
        assert_eq!(&b[..], b"\x04\0\0\0\x04\0\0\0\x03\x02\0\0\0\x02ab");
        let rh = ResponseHead {
            status: 200,
            headers: vec![],
            body: BodyKind::Stream,
            content_length: Some(2),
        };
        let mut b = BytesMut::new();
        put_response(&mut b, "i", &rh, b"ok", None);
        let json = br#"{"status":200,"headers":[],"body":"stream","content_length":2}"#;
        let mut want = vec![3u8];
        want.extend_from_slice(&((1 + 1 + 4 + json.len() + 4 + 2) as u32).to_be_bytes());
        want.extend_from_slice(b"\x01i");
        want.extend_from_slice(&(json.len() as u32).to_be_bytes());
        want.extend_from_slice(json);
        want.extend_from_slice(b"\0\0\0\x02ok");
        assert_eq!(&b[..], &want[..]);
    }

    #[test]
    fn bad_messages_are_refused() {
        assert_eq!(
            decode(Bytes::from_static(b"\x04\0\0")).unwrap_err(),
            SessionError::Truncated
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x04\0\0\0\x09\0")).unwrap_err(),
            SessionError::Truncated
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x63\0\0\0\0")).unwrap_err(),
            SessionError::UnknownKind(0x63)
        );
        assert!(matches!(
            decode(Bytes::from_static(b"\x04\0\0\0\x02\0\0")).unwrap_err(),
            SessionError::Bad { kind: "CREDIT", .. }
        ));
        assert!(matches!(
            decode(Bytes::from_static(b"\x01\0\0\0\x01{")).unwrap_err(),
            SessionError::Bad { kind: "OPEN", .. }
        ));
        // A RESPONSE whose body length runs past the frame.
        let json = br#"{"status":200,"headers":[],"body":"empty"}"#;
        let mut p = vec![1u8, b'i'];
        p.extend_from_slice(&(json.len() as u32).to_be_bytes());
        p.extend_from_slice(json);
        p.extend_from_slice(b"\0\0\0\x09x");
        let mut m = vec![3u8];
        m.extend_from_slice(&(p.len() as u32).to_be_bytes());
        m.extend_from_slice(&p);
        assert!(matches!(
            decode(Bytes::from(m)).unwrap_err(),
            SessionError::Bad {
                kind: "RESPONSE",
                ..
            }
        ));
        // An empty message is no frames, not an error.
        assert!(decode(Bytes::new()).unwrap().is_empty());
    }
}

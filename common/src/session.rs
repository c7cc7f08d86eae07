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
//! | 1 | OPEN | server → agent | the [`RequestHead`] (the request's id is inside) |
//! | 2 | CANCEL | server → agent | the request id (ASCII): the user left |
//! | 3 | RESPONSE | agent → server | a whole response: see [`Response`] |
//! | 4 | CREDIT | agent → server | u32be: more free slots (requests the agent will take) |
//! | 5 | PING | both | 8 opaque bytes; answered by PONG with the same bytes |
//! | 6 | PONG | both | the 8 bytes of the PING |
//! | 7 | GOAWAY | both | UTF-8 reason: the sender ends the session after this frame |
//! | 8 | ACK | both | u64be: frames received on this session so far of the kind the other side sends work in: RESPONSE frames (server → agent), OPEN frames (agent → server) |
//!
//! A RESPONSE payload is `id_len:u8 id head_len:u32be head body_len:u32be body trailers`,
//! where `head` is the [`ResponseHead`], `body` the whole body and `trailers` (may be
//! empty) the [`Trailers`]. Heads and trailers are JSON on a `relay-session.v2` session and
//! length-prefixed fields ([`crate::heads`]) on a `relay-session.v3` one ([`Heads`]). Only whole responses of at most [`INLINE_BODY_MAX`] body
//! bytes travel on the session; streaming bodies, bigger bodies and request bodies use the
//! exchanges of protocol 1 with the same request id, and tunnels a tunnel exchange
//! ([`crate::tunnel`]), so bulk transfer keeps its dedicated connections and never delays
//! the small requests on the session.
//!
//! The agent keeps each RESPONSE until an ACK covers it; when a session is lost, the
//! responses not acknowledged go again through `/server/response` exchanges (a duplicate
//! of one that did arrive is refused there, so nothing is delivered twice). The server
//! keeps each OPEN until the agent's ACK covers it; an agent that gives a session up says
//! on its next one (`session=<n>&resume=<earlier>.<opens>`) how many OPENs it received on
//! the earlier one, and the server puts the others back in the queue: they never arrived
//! and never will, so this is no replay.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::heads;
use crate::message::{RequestHead, ResponseHead, Trailers};

/// The protocol version an agent asks for on `/server/session` (`X-Relay-Protocol`).
pub const SESSION_PROTOCOL_VERSION: &str = "2";

/// The path of the session endpoint (under the server's base path).
pub const SESSION_PATH: &str = "/server/session";

/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`, RFC 6455 §1.9) of a session whose
/// heads are JSON.
pub const SESSION_SUBPROTOCOL: &str = "relay-session.v2";

/// The subprotocol of a session whose heads are binary ([`crate::heads`]); agents that
/// have it offer it first, and a server that has it chooses it.
pub const SESSION_SUBPROTOCOL_BINARY: &str = "relay-session.v3";

/// How the heads in OPEN and RESPONSE frames are encoded on one session: chosen once, by
/// the subprotocol of its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// JSON ([`crate::message`]): `relay-session.v2`, or no subprotocol at all.
    Json,
    /// Length-prefixed fields ([`crate::heads`]): `relay-session.v3`.
    Binary,
}

impl Heads {
    /// The server's choice among the subprotocols a client offered (each header value a
    /// comma-separated list): binary heads when offered, else JSON (named or not).
    pub fn choose<'a>(offered: impl IntoIterator<Item = &'a str>) -> (Heads, Option<&'static str>) {
        let mut json = false;
        for p in offered
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if p == SESSION_SUBPROTOCOL_BINARY {
                return (Heads::Binary, Some(SESSION_SUBPROTOCOL_BINARY));
            }
            json |= p == SESSION_SUBPROTOCOL;
        }
        (Heads::Json, json.then_some(SESSION_SUBPROTOCOL))
    }

    /// What the server's answer (its `Sec-WebSocket-Protocol`, if any) chose.
    pub fn chosen(answer: Option<&str>) -> Heads {
        match answer.map(str::trim) {
            Some(SESSION_SUBPROTOCOL_BINARY) => Heads::Binary,
            _ => Heads::Json,
        }
    }
}

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
pub fn put_open(b: &mut BytesMut, heads: Heads, head: &RequestHead) {
    match heads {
        Heads::Json => {
            let json = serde_json::to_vec(head).expect("bug: request heads always serialise");
            put_header(b, OPEN, json.len());
            b.put_slice(&json);
        }
        Heads::Binary => {
            // The length is filled in once the head is written.
            let at = b.len();
            put_header(b, OPEN, 0);
            heads::put_request(b, head);
            set_len(b, at);
        }
    }
}

/// Writes the payload length of the frame whose header starts at `at` (it runs to the end).
fn set_len(b: &mut BytesMut, at: usize) {
    let len = b.len() - at - FRAME_HEADER_LEN;
    let len = u32::try_from(len).expect("bug: session frame over 4 GiB");
    b[at + 1..at + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
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
    heads: Heads,
    id: &str,
    head: &ResponseHead,
    body: &[u8],
    trailers: Option<&Trailers>,
) {
    let id_len = u8::try_from(id.len()).expect("bug: request ids are short");
    if heads == Heads::Binary {
        b.reserve(FRAME_HEADER_LEN + 64 + body.len());
        let at = b.len();
        // The frame header (its length filled in last), the id's length, the id, and room
        // for the head's length, in two copies instead of five `put`s.
        let mut start = [0u8; FRAME_HEADER_LEN + 1];
        start[0] = RESPONSE;
        start[FRAME_HEADER_LEN] = id_len;
        b.extend_from_slice(&start);
        b.extend_from_slice(id.as_bytes());
        let head_at = b.len();
        b.extend_from_slice(&[0; 4]);
        heads::put_response(b, head);
        let head_len = (b.len() - head_at - 4) as u32;
        b[head_at..head_at + 4].copy_from_slice(&head_len.to_be_bytes());
        b.put_u32(u32::try_from(body.len()).expect("bug: inline bodies are small"));
        b.put_slice(body);
        if let Some(t) = trailers {
            heads::put_trailers(b, t);
        }
        set_len(b, at);
        return;
    }
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

/// Decodes every frame of one message. Nothing is copied out of `msg` except heads.
pub fn decode(mut msg: Bytes, heads: Heads) -> Result<Vec<Frame>, SessionError> {
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
        out.push(decode_one(kind, payload, heads)?);
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

fn decode_one(kind: u8, p: Bytes, heads: Heads) -> Result<Frame, SessionError> {
    Ok(match kind {
        OPEN => Frame::Open(match heads {
            Heads::Json => serde_json::from_slice(&p).map_err(|e| bad("OPEN", e))?,
            Heads::Binary => heads::request(&p).map_err(|e| bad("OPEN", e))?,
        }),
        CANCEL => Frame::Cancel(ascii("CANCEL", &p)?),
        RESPONSE => Frame::Response(decode_response(p, heads)?),
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

fn decode_response(p: Bytes, heads: Heads) -> Result<Response, SessionError> {
    // Read from a slice; only the body is cut from `p` (shared, not copied).
    let all = &p[..];
    let mut rest = all;
    fn take<'a>(n: usize, r: &mut &'a [u8]) -> Result<&'a [u8], SessionError> {
        if r.len() < n {
            return Err(bad("RESPONSE", "truncated"));
        }
        let (head, tail) = r.split_at(n);
        *r = tail;
        Ok(head)
    }
    let id_len = take(1, &mut rest)?[0] as usize;
    let id = ascii("RESPONSE", take(id_len, &mut rest)?)?;
    let head_len = u32::from_be_bytes(take(4, &mut rest)?.try_into().expect("4 bytes")) as usize;
    let head = take(head_len, &mut rest)?;
    let head: ResponseHead = match heads {
        Heads::Json => serde_json::from_slice(head).map_err(|e| bad("RESPONSE", e))?,
        Heads::Binary => heads::response(&p, head).map_err(|e| bad("RESPONSE", e))?,
    };
    let body_len = u32::from_be_bytes(take(4, &mut rest)?.try_into().expect("4 bytes")) as usize;
    if body_len > INLINE_BODY_MAX {
        return Err(bad("RESPONSE", "inline body over 64 KiB"));
    }
    let at = all.len() - rest.len();
    take(body_len, &mut rest)?;
    let body = p.slice(at..at + body_len);
    let trailers = match (rest.is_empty(), heads) {
        (true, _) => None,
        (false, Heads::Json) => Some(serde_json::from_slice(rest).map_err(|e| bad("RESPONSE", e))?),
        (false, Heads::Binary) => Some(Trailers {
            headers: heads::fields(rest).map_err(|e| bad("RESPONSE", e))?,
        }),
    };
    Ok(Response {
        id,
        head,
        body,
        trailers,
    })
}

#[cfg(test)]
mod tests;

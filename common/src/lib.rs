//! Shared pieces of the relay: the agent wire protocol and the HTTP rules both sides apply.
//!
//! # Layout
//! - [`frame`]: the binary frame codec carried in `/server/response` request bodies and
//!   `/server/requeststream` response bodies (HEAD, DATA, TRAILERS, END, ABORT, CONTINUE).
//! - [`codec`]: typed encoding and decoding of those bodies ([`codec::BodyMsg`] in, frames
//!   out; an HTTP body of frames in, [`codec::Message`]s out), used by both binaries.
//! - [`source`]: where a framed body's bytes come from (an HTTP body or a tunnel).
//! - [`message`]: the JSON messages (request heads in poll answers, response heads in HEAD
//!   frames) and the lossless header encoding they use.
//! - [`headers`]: hop-by-hop header rules (RFC 9110 §7.6.1) applied on both sides.
//! - [`name`]: backend-name validation, shared so both sides agree on what a name is.
//! - [`id`]: unguessable request ids.
//! - [`session`]: agent sessions (protocol 2): many requests as frames over one WebSocket.
//! - [`carrier`]: the WebSocket carrier of a session: coalescing writer, frame reader.
//! - [`readbuf`]: the adaptive read buffer of tunnels and service ports.
//! - [`signal`]: Ctrl-C / SIGTERM into a cancellation token.
//! - [`gate`]: futures polled again only after their own wake-up (the rare-event branches
//!   of busy `select!` loops).
//! - [`v1alpha1`]: the messages of the Go `http-relay` protocol, which the server also speaks
//!   so existing Go relay-clients connect unchanged.
//!
//! `docs/PROTOCOL.md` in the repository describes the same protocol in prose.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rust_2018_idioms)]

pub mod carrier;
pub mod codec;
pub mod fair;
pub mod fasthash;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod h1;
pub mod headers;
pub mod heads;
pub mod id;
pub mod message;
pub mod name;
pub mod readbuf;
pub mod session;
pub mod signal;
pub mod source;
pub mod tunnel;
pub mod v1alpha1;
pub mod websocket;

/// Protocol version announced by agents (`X-Relay-Protocol`) and checked by the server.
pub const PROTOCOL_VERSION: &str = "1";

/// Header on agent calls that names the agent process (a random id chosen at start), so the
/// server can tell which in-flight requests die with it.
pub const AGENT_ID_HEADER: &str = "x-relay-agent-id";

/// Header on agent calls that carries [`PROTOCOL_VERSION`].
pub const PROTOCOL_HEADER: &str = "x-relay-protocol";

/// Most requests one poll answer carries (the agent asks for at most this many).
pub const MAX_POLL_BATCH: usize = 64;

/// Largest read of tunnel bytes (one DATA frame at most this long).
pub const TUNNEL_READ: usize = 64 * 1024;

/// Depth of the channel between exchanges and the body they feed, on both sides. Small:
/// backpressure from a slow reader reaches the sending exchange after this many chunks.
pub const BODY_CHANNEL_DEPTH: usize = 8;

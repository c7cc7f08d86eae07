//! Shards (`--shards`): threads with a single-threaded runtime each, serving the agent
//! sessions placed on them and the user connections of those sessions' names.
//!
//! Why: a relayed request crosses three tasks on the relay-server (the user's connection,
//! the session's writer, the session's reader). On tokio's multi-thread runtime a worker
//! that makes two tasks ready wakes another, and with two workers the pair then sleeps
//! and wakes for every small request: 3.5–4.5 µs of its 16 on the benchmark machine
//! (docs/PERFORMANCE.md, thirteenth round). With a request's tasks on one thread, none wakes
//! another. A thread per core alone does not give that (tried, 2026-12-04): the user's half
//! and the session's half then run on different threads. So connections are placed:
//! - a session (`/server/session?server=<name>`) on the shard that holds its name, else on
//!   the one with the fewest sessions;
//! - a user connection on the shard of the name its first request goes to, when that name
//!   has a session on a shard: HTTP/1.1 by its head, HTTP/2 (prior knowledge, or ALPN over
//!   TLS) by its first HEADERS frame (`base/first_headers.rs` decodes its HPACK);
//! - an agent's exchange connection (a body or tunnel that does not travel in the
//!   session: `/server/response`, `/server/requeststream`, `/server/tunnel`) on the shard
//!   of its request's name, beside the user's connection it feeds: across threads, every
//!   chunk of a 100 MB upload woke the other thread (a quarter of its rate).
//!
//! The accept path reads the first request's head itself (within the header read timeout,
//! as hyper would have to; through TLS after the handshake, which stays on the accept
//! path), picks the shard, and hands the socket over with the bytes it read, and a TLS
//! connection's session with what its client certificate grants (`base/movable.rs`); the
//! shard serves it exactly as the main runtime would have. Everything else stays on the
//! main runtime as before: requests for names without a session, heads this cannot read,
//! the operator and cluster listeners. A keep-alive connection that moves on to another
//! name keeps its shard.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::auth::Grant;
use crate::base::first_headers::{self, Scan, PREFACE};
use crate::base::limits::ConnPermit;
use crate::base::movable::Movable;
use crate::base::placement::Placement;
use crate::listener::Face;
use crate::State;

/// A connection on its way to a shard: the socket, the bytes already read from it, and
/// what the accept path knows of it.
pub struct Handoff {
    /// The socket, taken off the accepting runtime.
    pub stream: std::net::TcpStream,
    /// A TLS connection's session (the handshake was done on the accept path; its socket is
    /// `stream`).
    pub tls: Option<Box<HandedTls>>,
    /// What was read of it (the first request's head, maybe more).
    pub head: Bytes,
    /// The peer.
    pub peer: SocketAddr,
    /// The listener it came in on.
    pub face: Face,
    /// Its place under the connection limits.
    pub permit: Arc<ConnPermit>,
}

/// A TLS connection on its way to a shard: its session, around an empty socket, and what
/// its client certificate grants.
pub struct HandedTls {
    /// The session (boxed: a TLS session is a few KiB).
    pub stream: Box<TlsStream<Movable>>,
    /// What the client certificate grants, if it grants anything.
    pub cert: Option<Grant>,
}

/// The shards' mailboxes.
pub struct Shards {
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
    placement: Arc<Placement>,
}

/// The first bytes of a connection, read before any HTTP server sees it.
pub enum Peeked {
    /// The bytes; the head is complete unless the connection is HTTP/2 or the head was
    /// longer than the limit (hyper answers it).
    Bytes(BytesMut),
    /// The peer closed, failed or sent no complete head in time: the connection ends.
    Closed,
}

impl Shards {
    /// Starts `placement.shards()` shard threads serving what is handed to them with
    /// `state`'s settings until the stop, then until `tracker`'s connections ended or
    /// `gone` is cancelled (the listener returned).
    pub fn start(
        state: &Arc<State>,
        placement: &Arc<Placement>,
        tracker: &TaskTracker,
        gone: &CancellationToken,
    ) -> std::io::Result<Arc<Shards>> {
        let mut inboxes = Vec::new();
        for i in 0..placement.shards() {
            let (tx, rx) = mpsc::unbounded_channel();
            inboxes.push(tx);
            let (state, tracker, gone) = (state.clone(), tracker.clone(), gone.clone());
            let rt = relay_config_file::runtime::single(state.cfg.spin)?;
            std::thread::Builder::new()
                .name(format!("relay-shard-{i}"))
                .spawn(move || {
                    crate::base::placement::enter(i);
                    rt.block_on(serve(rx, state, tracker, gone));
                })?;
        }
        Ok(Arc::new(Shards {
            inboxes,
            placement: placement.clone(),
        }))
    }

    /// The shard a connection whose first head is `head` belongs on, if not the main
    /// runtime (or `None` when it is already there).
    pub fn shard_for(&self, state: &State, face: Face, head: &[u8]) -> Option<usize> {
        let shard = if head.starts_with(PREFACE) {
            // HTTP/2 with prior knowledge: its first request, HPACK-decoded.
            let Scan::Done(Some(h)) = first_headers::scan(head, &mut 0) else {
                return None;
            };
            let users = matches!(face, Face::Shared | Face::Public);
            let path = h.path.as_deref().filter(|_| users)?;
            let host = h.authority.as_deref();
            self.placement
                .home(user_name(state, path, host, h.server_name.as_deref())?)?
        } else {
            self.shard_of(state, first_request(state, face, head)?)?
        };
        (crate::base::placement::current() != Some(shard)).then_some(shard)
    }

    /// The shard of an HTTP/1.1 connection's first request.
    fn shard_of(&self, state: &State, target: Target<'_>) -> Option<usize> {
        Some(match target {
            Target::Session(name) => self.placement.for_session(name),
            Target::User(name) => self.placement.home(name)?,
            Target::Exchange(id) => {
                // Placement only: the call is authenticated where it is served.
                let pending = state.broker.lookup(id, |_| true)?;
                self.placement.home(&pending.name)?
            }
        })
    }

    /// Hands `h` to shard `i`; it comes back when that shard has stopped.
    pub fn hand_off(&self, i: usize, h: Handoff) -> Result<(), Handoff> {
        self.inboxes[i].send(h).map_err(|e| e.0)
    }
}

/// Serves the connections handed to this shard.
async fn serve(
    mut inbox: mpsc::UnboundedReceiver<Handoff>,
    state: Arc<State>,
    tracker: TaskTracker,
    gone: CancellationToken,
) {
    let user_http = |exec| crate::listener::http_builder(&state.cfg, exec);
    let conns = crate::connection::Conns {
        state: &state,
        builder: &user_http,
        limits: &state.conns,
        tracker: &tracker,
        tls: None,
        shards: None,
    };
    loop {
        tokio::select! {
            h = inbox.recv() => match h {
                Some(h) => conns.serve_handed(h),
                None => break,
            },
            _ = state.stop.cancelled() => break,
        }
    }
    // Connections handed over from now on are served where they were accepted.
    inbox.close();
    while let Ok(h) = inbox.try_recv() {
        conns.serve_handed(h);
    }
    // Its connections run on this thread: it stays until they end or the listener has
    // returned (which waits for them, up to its own limit).
    tokio::select! {
        _ = tracker.wait() => {}
        _ = gone.cancelled() => {}
    }
}

/// How long an HTTP/2 client's first HEADERS frame is waited for after its preface. A
/// client sends it at once (RFC 9113 §3.4 lets it send frames without waiting for the
/// server's SETTINGS); one that waits anyway is served where it was accepted.
const FIRST_HEADERS_WAIT: Duration = Duration::from_millis(50);

/// Reads the first request's head of a connection (plain, or TLS after the handshake; up
/// to `max` bytes, within `within`): the bytes, for [`Shards::shard_for`] and for the HTTP
/// server after it. An HTTP/2 connection's first HEADERS frame is read too, for a short
/// while.
pub async fn peek<S: AsyncRead + Unpin>(stream: &mut S, max: usize, within: Duration) -> Peeked {
    let deadline = tokio::time::Instant::now() + within;
    let mut http2_until = None;
    let mut buf = BytesMut::with_capacity(1024);
    // Where the search for the head's end resumes (an HTTP/1.1 head's last bytes, an HTTP/2
    // connection's next frame): a head sent a byte at a time is not searched again from
    // its start for every byte.
    let (mut searched, mut frames_from) = (0, 0);
    loop {
        let until = http2_until.map_or(deadline, |t: tokio::time::Instant| t.min(deadline));
        match tokio::time::timeout_at(until, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Err(_) if http2_until.is_some() => return Peeked::Bytes(buf),
            _ => return Peeked::Closed,
        }
        let http2 = PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]);
        let done = if http2 {
            if buf.len() >= PREFACE.len() && http2_until.is_none() {
                http2_until = Some(tokio::time::Instant::now() + FIRST_HEADERS_WAIT);
            }
            first_headers::scan(&buf, &mut frames_from) != Scan::Incomplete
        } else {
            let found = buf[searched..].windows(4).any(|w| w == b"\r\n\r\n");
            searched = buf.len().saturating_sub(3);
            found
        };
        if done || buf.len() >= max {
            return Peeked::Bytes(buf);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(max - buf.len()));
        }
    }
}

/// Where a connection's first request goes.
enum Target<'a> {
    /// An agent's session for this name.
    Session(&'a str),
    /// A user's request to this name.
    User(&'a str),
    /// An agent's exchange for the request with this id (a body or a tunnel that does not
    /// travel in the session): served beside the user's connection it feeds.
    Exchange(&'a str),
}

/// The target of the first request in `head`, when it has one worth placing: `None` for
/// anything hyper must judge (a malformed or partial head, HTTP/2) and for other paths.
fn first_request<'a>(state: &State, face: Face, head: &'a [u8]) -> Option<Target<'a>> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut fields);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let raw = req.path?;
    let field = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let mount = state.cfg.base_path.as_deref().unwrap_or("");
    let users = matches!(face, Face::Shared | Face::Public);
    let agents = matches!(face, Face::Shared | Face::Agent);
    let q = crate::agent::endpoints::Query::parse(query.unwrap_or(""));
    match path.strip_prefix(mount) {
        Some(relay_common::session::SESSION_PATH) if agents => {
            let name = q.server.filter(|n| relay_common::name::is_valid_name(n))?;
            return Some(Target::Session(name));
        }
        Some("/server/response" | "/server/requeststream" | "/server/tunnel") if agents => {
            return Some(Target::Exchange(q.id?));
        }
        _ => {}
    }
    if !users {
        return None;
    }
    let host = field("host").and_then(|h| std::str::from_utf8(h).ok());
    user_name(state, raw, host, field("x-server-name")).map(Target::User)
}

/// The backend a user's request goes to, from its target (path and query), its host and
/// its `X-Server-Name`, as the router will find it.
fn user_name<'a>(
    state: &State,
    target: &'a str,
    host: Option<&'a str>,
    server_name: Option<&'a [u8]>,
) -> Option<&'a str> {
    if let Some(domain) = state.cfg.public_domain.as_deref() {
        if let Some(label) = host.and_then(|h| crate::user::router::host_backend(h, domain)) {
            return Some(label);
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mount = state.cfg.base_path.as_deref().unwrap_or("");
    let route = crate::user::router::route_in(mount, path, query, server_name, None).ok()?;
    Some(route.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`first_request`] finds in `head` on a listener of kind `face`.
    fn target(state: &State, face: Face, head: &str) -> String {
        match first_request(state, face, head.as_bytes()) {
            Some(Target::User(n)) => format!("user {n}"),
            Some(Target::Session(n)) => format!("session {n}"),
            Some(Target::Exchange(id)) => format!("exchange {id}"),
            None => "none".into(),
        }
    }

    #[test]
    fn first_heads_name_their_targets_as_the_router_and_the_agent_endpoints_would() {
        let state = State::new(crate::Config {
            base_path: Some("/apis/relay".into()),
            public_domain: Some("relay.example.com".into()),
            ..crate::Config::default()
        });
        let t = |face, head: &str| target(&state, face, head);
        let (shared, public, agent) = (Face::Shared, Face::Public, Face::Agent);
        assert_eq!(
            t(
                shared,
                "GET /apis/relay/client/a/x?q HTTP/1.1\r\nHost: h\r\n\r\n"
            ),
            "user a"
        );
        // Outside the mount, /client/ routes nowhere; X-Server-Name and hosts do.
        assert_eq!(
            t(shared, "GET /client/a/x HTTP/1.1\r\nHost: h\r\n\r\n"),
            "none"
        );
        assert_eq!(
            t(shared, "GET /svc/M HTTP/1.1\r\nx-server-name: c\r\n\r\n"),
            "user c"
        );
        assert_eq!(
            t(
                public,
                "GET /x HTTP/1.1\r\nHost: b.relay.example.com:443\r\n\r\n"
            ),
            "user b"
        );
        // Agents' calls, on the listeners that serve them.
        let session = "GET /apis/relay/server/session?slot=1&server=d HTTP/1.1\r\n\r\n";
        assert_eq!(t(agent, session), "session d");
        assert_eq!(t(shared, session), "session d");
        assert_eq!(t(public, session), "none");
        let pull = "GET /apis/relay/server/requeststream?id=ab12&offset=0 HTTP/1.1\r\n\r\n";
        assert_eq!(t(agent, pull), "exchange ab12");
        assert_eq!(
            t(
                agent,
                "GET /apis/relay/server/session?server=a/b HTTP/1.1\r\n\r\n"
            ),
            "none"
        );
        assert_eq!(
            t(agent, "GET /apis/relay/client/a/ HTTP/1.1\r\n\r\n"),
            "none"
        );
        // What hyper must judge: a partial head, a path the router refuses, HTTP/2.
        assert_eq!(t(shared, "GET /apis/relay/client/a/ HTTP/1.1\r\n"), "none");
        assert_eq!(
            t(shared, "GET /apis/relay/client/a/../b HTTP/1.1\r\n\r\n"),
            "none"
        );
        assert_eq!(t(shared, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "none");
    }
}

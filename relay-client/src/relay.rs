//! Calls to the relay-server: the long poll, response exchanges, upload exchanges, and the
//! start-up probe that decides between streaming and bounded exchanges.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use relay_common::message::PollAnswer;
use relay_common::session::{Heads, SESSION_PATH, SESSION_PROTOCOL_VERSION};
use relay_common::websocket::Role;
use relay_common::{AGENT_ID_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::config::{Config, Transport};
use crate::error::{AgentError, RelayCallError};
use crate::tls;

/// Body type of calls to the relay-server.
pub type CallBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// A client of one relay-server, authenticated as one agent process.
#[derive(Clone)]
pub struct RelayClient {
    /// Exchanges and polls; replaced (with its pool) when the path to the server turns
    /// out black-holed, so new calls do not queue on connections that will never answer.
    client: Arc<RwLock<Client<tls::Connector, CallBody>>>,
    connector: tls::Connector,
    /// HTTP/1.1 only: a session is an HTTP/1.1 upgrade (RFC 9110 §7.8).
    pub(crate) upgrader: Client<tls::Connector, CallBody>,
    base: String,
    /// `None` when the client certificate authenticates the agent.
    auth: Option<HeaderValue>,
    agent_id: HeaderValue,
    name: String,
    poll_deadline: Duration,
    /// This relay URL's index among the agent's: a new session supersedes the server's
    /// session of the same agent and slot (one the agent gave up on as dead).
    slot: usize,
    /// Sessions opened through this URL (their numbers).
    sessions: Arc<std::sync::atomic::AtomicU64>,
    /// The last ended session and the OPENs it received, told to the server by the next
    /// session so it can put back the requests that never arrived.
    resume: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
    /// Cleared when a tunnel exchange is refused for good (a server without them, or a
    /// proxy that drops the upgrade): tunnels then use response and upload exchanges.
    pub(crate) tunnel_exchanges: Arc<std::sync::atomic::AtomicBool>,
}

/// An open session's connection.
pub type Session = (
    relay_common::websocket::Reader<tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>>,
    relay_common::websocket::Writer<tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>>,
);

/// The subprotocols an agent offers, best first: binary heads
/// (`relay_common::session::SESSION_SUBPROTOCOL_BINARY`), then JSON (`SESSION_SUBPROTOCOL`).
const OFFERED_SUBPROTOCOLS: &str = "relay-session.v3, relay-session.v2";

/// A session the server accepted: its WebSocket, the agent's number for it, and how its
/// heads are encoded (the subprotocol the server chose).
pub struct OpenSession {
    /// The WebSocket.
    pub ws: Session,
    /// The agent's number for it (resumption).
    pub number: u64,
    /// JSON or binary heads.
    pub heads: Heads,
}

/// What a poll returned.
pub enum Polled {
    /// Work or cancel notices.
    Answer(PollAnswer),
    /// Nothing within the server's hold time.
    Empty,
}

/// How long an idle connection to the relay-server stays in the pool: well under the
/// server's default header read timeout (10 s), after which it closes an idle HTTP/1.1
/// connection. A connection taken from the pool at the moment the server closes it loses
/// the request written on it ("connection closed before message completed": a POST is
/// not retried, RFC 9110 §9.2.2), and a response exchange lost that way leaves its user
/// waiting for the response timeout. (Seen in the bench: the agent's start-up probe left
/// a connection idle for 10 s, and the first response exchange took it.)
pub const POOL_IDLE: Duration = Duration::from_secs(4);

fn pooled(connector: &tls::Connector) -> Client<tls::Connector, CallBody> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(connector.clone())
}

impl RelayClient {
    /// A client for `cfg.relay_url`.
    pub fn new(cfg: &Config, agent_id: &str) -> Result<Self, AgentError> {
        let identity = cfg
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let tls_cfg = tls::client_config(cfg.relay_ca_file.as_deref(), identity)?;
        let connector = tls::connector_with(tls_cfg.clone(), true, cfg.tcp_keepalive)?;
        let client = Arc::new(RwLock::new(pooled(&connector)));
        let upgrader = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(tls::connector_with(tls_cfg, false, cfg.tcp_keepalive)?);
        let mut base = cfg.relay_url.to_string();
        while base.ends_with('/') {
            base.pop();
        }
        let auth = match &cfg.token {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", t.0)).map_err(|_| {
                    AgentError::Config("the token contains invalid characters".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(RelayClient {
            client,
            connector,
            upgrader,
            base,
            auth,
            agent_id: HeaderValue::from_str(agent_id).expect("bug: agent ids are hex"),
            name: cfg.name.clone(),
            poll_deadline: cfg.poll_deadline,
            slot: 0,
            sessions: Arc::default(),
            resume: Arc::default(),
            tunnel_exchanges: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    pub(crate) fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: CallBody,
    ) -> Request<CallBody> {
        let uri: Uri = format!("{}{}", self.base, path_and_query)
            .parse()
            .expect("bug: relay URLs are built from validated parts");
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        if let Some(auth) = &self.auth {
            h.insert(header::AUTHORIZATION, auth.clone());
        }
        h.insert(AGENT_ID_HEADER, self.agent_id.clone());
        h.insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL_VERSION));
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("relay-client/", env!("CARGO_PKG_VERSION"))),
        );
        req
    }

    /// Drops the pooled connections: new calls open fresh ones. Calls still running on the
    /// old ones end with them.
    pub fn fresh_connections(&self) {
        *self.client.write().expect("bug: poisoned") = pooled(&self.connector);
    }

    async fn send(&self, req: Request<CallBody>) -> Result<Response<Incoming>, RelayCallError> {
        let client = self.client.read().expect("bug: poisoned").clone();
        client
            .request(req)
            .await
            .map_err(|e| RelayCallError::Transport(error_chain(&e)))
    }

    /// One long poll taking at most `max` requests (`max == 0`: only cancel notices).
    pub async fn poll(&self, max: usize, draining: bool) -> Result<Polled, RelayCallError> {
        let q = format!(
            "/server/request?server={}&max={max}{}",
            self.name,
            if draining { "&draining=1" } else { "" }
        );
        let req = self.request(Method::GET, &q, empty());
        let resp = tokio::time::timeout(self.poll_deadline, async {
            let resp = self.send(req).await?;
            let status = resp.status();
            let body = read_text_limited(resp.into_body(), 64 << 20).await?;
            Ok::<_, RelayCallError>((status, body))
        })
        .await
        .map_err(|_| RelayCallError::Transport("long poll passed its deadline".into()))??;
        match resp.0 {
            StatusCode::OK => serde_json::from_slice(&resp.1)
                .map(Polled::Answer)
                .map_err(|e| RelayCallError::Transport(format!("bad poll answer: {e}"))),
            StatusCode::NO_CONTENT => Ok(Polled::Empty),
            s => Err(status_error(s, &resp.1)),
        }
    }

    /// Posts one response exchange starting at body offset `offset`.
    pub async fn post_response(
        &self,
        id: &str,
        offset: u64,
        body: CallBody,
    ) -> Result<(StatusCode, Bytes), RelayCallError> {
        let q = format!("/server/response?id={id}&offset={offset}");
        let mut req = self.request(Method::POST, &q, body);
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-relay-frames"),
        );
        let resp = self.send(req).await?;
        let status = resp.status();
        let text = read_text_limited(resp.into_body(), 64 * 1024).await?;
        Ok((status, text))
    }

    /// Opens one upload exchange at `offset`; the answer body carries frames.
    pub async fn request_stream(
        &self,
        id: &str,
        offset: u64,
        max: Option<u64>,
    ) -> Result<Incoming, RelayCallError> {
        let mut q = format!("/server/requeststream?id={id}&offset={offset}");
        if let Some(max) = max {
            q.push_str(&format!("&max={max}"));
        }
        let resp = self.send(self.request(Method::GET, &q, empty())).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let text = read_text_limited(resp.into_body(), 64 * 1024).await?;
            return Err(status_error(status, &text));
        }
        Ok(resp.into_body())
    }

    /// Opens a session (`/server/session`, a WebSocket upgrade). A non-101 answer is a
    /// [`RelayCallError::Status`]: 426 or 404 mean something in between (or an older
    /// server) does not carry sessions.
    pub async fn open_session(&self) -> Result<OpenSession, RelayCallError> {
        let key = generate_key();
        let number = 1 + self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resume = *self.resume.lock().expect("bug: poisoned");
        let mut q = format!(
            "{}?server={}&slot={}&session={number}",
            SESSION_PATH, self.name, self.slot
        );
        if let Some((earlier, opens)) = resume {
            q += &format!("&resume={earlier}.{opens}");
        }
        let mut req = self.request(Method::GET, &q, empty());
        let h = req.headers_mut();
        h.insert(
            PROTOCOL_HEADER,
            HeaderValue::from_static(SESSION_PROTOCOL_VERSION),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            // Binary heads first; a server without them chooses JSON (RFC 6455 §4.1: the
            // client lists what it speaks, in order of preference).
            HeaderValue::from_static(OFFERED_SUBPROTOCOLS),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).expect("bug: keys are base64"),
        );
        let connect = async {
            let mut resp = self
                .upgrader
                .request(req)
                .await
                .map_err(|e| RelayCallError::Transport(error_chain(&e)))?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = resp.status();
                let text = read_text_limited(resp.into_body(), 64 * 1024).await?;
                return Err(status_error(status, &text));
            }
            let accept = derive_accept_key(key.as_bytes());
            if resp
                .headers()
                .get(header::SEC_WEBSOCKET_ACCEPT)
                .map(|v| v.as_bytes())
                != Some(accept.as_bytes())
            {
                return Err(RelayCallError::Status {
                    status: 101,
                    message: "the upgrade was answered without the right Sec-WebSocket-Accept"
                        .into(),
                });
            }
            let chosen = resp
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let upgraded = hyper::upgrade::on(&mut resp)
                .await
                .map_err(|e| RelayCallError::Transport(error_chain(&e)))?;
            let ws = relay_common::carrier::halves(TokioIo::new(upgraded), Role::Client);
            Ok((ws, Heads::chosen(chosen.as_deref())))
        };
        let (ws, heads) = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| RelayCallError::Transport("opening the session timed out".into()))??;
        // The server has the resume now.
        *self.resume.lock().expect("bug: poisoned") = None;
        Ok(OpenSession { ws, number, heads })
    }

    /// Session `number` ended having received `opens` OPENs: the next session says so.
    pub fn session_ended(&self, number: u64, opens: u64) {
        *self.resume.lock().expect("bug: poisoned") = Some((number, opens));
    }

    /// The same client, for the agent's relay URL number `slot`.
    pub fn with_slot(mut self, slot: usize) -> Self {
        self.slot = slot;
        self
    }

    /// Longest silence on a live session (pings go every third of it).
    pub fn poll_deadline(&self) -> Duration {
        self.poll_deadline
    }

    /// Decides the transport: a streaming POST whose answer arrives before its body ends
    /// means nothing in between buffers request bodies.
    pub async fn probe(&self, wanted: Transport) -> Result<Transport, RelayCallError> {
        if matches!(wanted, Transport::Stream | Transport::Bounded) {
            return Ok(wanted);
        }
        let req = self.request(
            Method::POST,
            "/server/probe",
            ProbeBody(false).boxed_unsync(),
        );
        match tokio::time::timeout(Duration::from_secs(3), self.send(req)).await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => Ok(Transport::Stream),
            Ok(Ok(resp)) => {
                let status = resp.status();
                let text = read_text_limited(resp.into_body(), 64 * 1024).await?;
                Err(status_error(status, &text))
            }
            Ok(Err(e)) => Err(e),
            // The answer waits for the whole body: something buffers in between.
            Err(_) => Ok(Transport::Bounded),
        }
    }
}

/// A body that sends a few bytes and then never ends (until dropped): only a path that
/// forwards bodies as they stream lets the server answer it.
struct ProbeBody(bool);

impl hyper::body::Body for ProbeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            // Dropped when the probe ends; nothing to wake.
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"probe",
        )))))
    }
}

/// An empty call body.
pub fn empty() -> CallBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A call body of known bytes.
pub fn full(b: Bytes) -> CallBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn status_error(status: StatusCode, body: &[u8]) -> RelayCallError {
    RelayCallError::Status {
        status: status.as_u16(),
        message: String::from_utf8_lossy(body).trim().to_owned(),
    }
}

pub(crate) async fn read_text_limited(
    body: Incoming,
    limit: usize,
) -> Result<Bytes, RelayCallError> {
    let limited = http_body_util::Limited::new(body, limit);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| RelayCallError::Transport(format!("reading the answer: {e}")))
}

/// An error with its causes, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::session::{SESSION_SUBPROTOCOL, SESSION_SUBPROTOCOL_BINARY};

    #[test]
    fn the_offer_names_binary_heads_first_and_the_server_would_choose_them() {
        assert_eq!(
            OFFERED_SUBPROTOCOLS,
            format!("{SESSION_SUBPROTOCOL_BINARY}, {SESSION_SUBPROTOCOL}")
        );
        assert_eq!(Heads::choose([OFFERED_SUBPROTOCOLS]).0, Heads::Binary);
    }
}

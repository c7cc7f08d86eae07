//! Test harness: real relay-servers, relay-clients, backends and user clients on loopback.
//!
//! Everything binds `127.0.0.1:0`; readiness is waited for by observing state (a connected
//! agent in the broker, a listening port), never by sleeping.

pub mod cluster;
pub mod pki;
pub mod procs;
pub mod sockets;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use relay_client::Transport;
pub use relay_server::State;

/// Body type of test backends and user requests.
pub type TestBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// A token long enough for the server's rules.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Installs a log subscriber once (RUST_LOG controls it).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> TestBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A running in-process relay-server.
pub struct Server {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state (broker gauges for readiness and leak checks).
    pub state: Arc<State>,
    /// Cancel to begin the drain.
    pub shutdown: CancellationToken,
    /// The serve task.
    pub join: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Server settings used by tests: the default limits with a token for any name, and
/// `RELAY_TEST_SHARDS` shards (`--shards`; none when unset).
pub fn server_config() -> relay_server::Config {
    let defaults = relay_server::Config::default();
    relay_server::Config {
        agent_tokens: vec![(
            relay_server::TokenScope::Any,
            relay_server::Secret(TOKEN.into()),
        )],
        shards: match std::env::var("RELAY_TEST_SHARDS") {
            Ok(n) => n.parse().expect("RELAY_TEST_SHARDS is a number"),
            Err(_) => defaults.shards,
        },
        ..defaults
    }
}

impl Server {
    /// Starts a server with `cfg`.
    pub async fn start(cfg: relay_server::Config) -> Server {
        init_logs();
        // The binaries' listen queue (relay_config_file::listen), not tokio's 128.
        let listener = relay_config_file::listen::bind(local()).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::new(cfg));
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(relay_server::serve(
            listener,
            state.clone(),
            shutdown.clone(),
        ));
        Server {
            addr,
            state,
            shutdown,
            join,
        }
    }

    /// Starts a server with [`server_config`].
    pub async fn default() -> Server {
        Server::start(server_config()).await
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until a non-draining agent is connected for `name`.
    pub async fn wait_agent(&self, name: &str) {
        wait_for(|| self.state.broker.live_backend(name).is_some()).await;
    }

    /// Waits until no request is in flight (leak check).
    pub async fn wait_idle(&self) {
        wait_for(|| self.state.broker.in_flight() == 0).await;
    }
}

/// An in-process server on listeners of its own: the public one, and an agent listener
/// and an admin listener when asked for.
pub struct Faces {
    /// Its state.
    pub state: Arc<State>,
    /// The public listener.
    pub public: SocketAddr,
    /// `--agent-listen`, when started with one.
    pub agent: Option<SocketAddr>,
    /// `--admin-listen`, when started with one.
    pub admin: Option<SocketAddr>,
    /// Cancel to begin the drain.
    pub shutdown: CancellationToken,
}

impl Faces {
    /// Starts a server with `cfg` and the listeners asked for.
    pub async fn start(cfg: relay_server::Config, agent: bool, admin: bool) -> Faces {
        init_logs();
        let bind = || relay_config_file::listen::bind(local());
        let public = bind().unwrap();
        let agent = if agent { Some(bind().unwrap()) } else { None };
        let admin = if admin { Some(bind().unwrap()) } else { None };
        let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr().unwrap());
        let faces = Faces {
            state: Arc::new(State::new(cfg)),
            public: public.local_addr().unwrap(),
            agent: addr(&agent),
            admin: addr(&admin),
            shutdown: CancellationToken::new(),
        };
        let listeners = relay_server::Listeners {
            public,
            agent,
            admin,
            cluster: None,
        };
        tokio::spawn(relay_server::serve_faces(
            listeners,
            faces.state.clone(),
            faces.shutdown.clone(),
        ));
        faces
    }
}

/// Polls `cond` every 5 ms for up to 20 s (state observation, not a timed sleep).
pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    eventually(Duration::from_secs(20), "the condition", || {
        std::future::ready(cond().then_some(()))
    })
    .await
}

/// Asks `check` again and again (every 10 ms) until it answers `Some`, and returns that:
/// for state that other processes change (a directory entry, a metric, an exit status).
/// `patience` bounds the wait; past it the test fails naming `what`.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not reached within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A relay-client running on its own runtime thread, so a test can kill it abruptly
/// (all its sockets close at once, as when the process dies).
pub struct Agent {
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
    join: Option<tokio::task::JoinHandle<Result<(), relay_client::AgentError>>>,
}

impl Agent {
    /// A config for `name` in front of `backend` (base URL) through `relay_url`.
    pub fn config(relay_url: &str, name: &str, backend: &str) -> relay_client::Config {
        let mut cfg = relay_client::Config::new(
            relay_url.parse().unwrap(),
            name.into(),
            backend.parse().unwrap(),
            relay_client::Secret(TOKEN.into()),
        );
        cfg.transport = test_transport();
        cfg
    }

    /// Starts an agent with `cfg`.
    pub fn start(cfg: relay_client::Config) -> Agent {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let join = runtime.spawn(relay_client::run(cfg, shutdown.clone()));
        Agent {
            shutdown,
            runtime: Some(runtime),
            join: Some(join),
        }
    }

    /// Kills the agent abruptly: every task and socket is dropped at once.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Begins the agent's drain and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), relay_client::AgentError> {
        self.shutdown.cancel();
        let join = self.join.take().unwrap();
        let r = join.await.expect("agent task panicked");
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        r
    }

    /// Waits for `run` to return by itself (e.g. refused token).
    pub async fn exited(mut self) -> Result<(), relay_client::AgentError> {
        let join = self.join.take().unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), join)
            .await
            .expect("agent did not exit")
            .expect("agent task panicked");
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        r
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts a backend (HTTP/1.1 and h2c prior knowledge) serving `handler`; returns its
/// address. It lives as long as the test's runtime.
pub async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 user client.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 (prior knowledge) user client.
pub fn h2_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Reads a whole body (test sizes only).
pub async fn body_bytes(b: Incoming) -> Result<Bytes, hyper::Error> {
    b.collect().await.map(|c| c.to_bytes())
}

/// Starts a server and one agent for `name` in front of `backend`, waits until connected.
pub async fn relay_to(backend: SocketAddr, name: &str) -> (Server, Agent) {
    relay_with(server_config(), backend, name).await
}

/// [`relay_to`] with the server's settings `cfg`.
pub async fn relay_with(
    cfg: relay_server::Config,
    backend: SocketAddr,
    name: &str,
) -> (Server, Agent) {
    let server = Server::start(cfg).await;
    let agent = Agent::start(Agent::config(
        &server.url(),
        name,
        &format!("http://{backend}"),
    ));
    server.wait_agent(name).await;
    (server, agent)
}

/// Sends raw bytes on a fresh connection and reads until the peer closes (or 10 s pass).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Sends raw bytes on a fresh connection; returns the whole answer as text. The server must
/// close the connection within 10 s (the test fails otherwise).
pub async fn exchange_closed(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server kept the connection open")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response on a keep-alive connection: the head (through the blank line,
/// byte by byte so nothing of a next answer is consumed) and the body by its Content-Length.
/// Fails the test when the peer closes inside it or stays silent for 10 s.
pub async fn read_response(conn: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut byte))
            .await
            .expect("no answer")
            .unwrap_or_else(|e| panic!("{e} inside a head: {:?}", String::from_utf8_lossy(&head)));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim())
        })
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.unwrap();
    (head, body)
}

/// What a recording backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target as received (path and query).
    pub target: String,
    /// Headers as received.
    pub headers: http::HeaderMap,
    /// Whole body.
    pub body: Bytes,
}

/// A backend that records every request and answers 200 with the request body echoed.
pub async fn recording_backend() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Seen>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = backend(move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body_bytes(body).await.unwrap_or_default();
            log.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                target: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
            Response::builder()
                .header("x-echo-method", parts.method.as_str())
                .header("x-echo-target", parts.uri.to_string())
                .body(full(body))
                .unwrap()
        }
    })
    .await;
    (addr, seen)
}

/// A body fed from a channel (for uploads and slow responses under test control).
pub fn channel_body(
    depth: usize,
) -> (
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
    TestBody,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(depth);
    (
        tx,
        http_body_util::StreamBody::new(ReceiverStream(rx)).boxed_unsync(),
    )
}

/// `mpsc::Receiver` as a `Stream`.
pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// Data frame helper.
pub fn data(b: impl Into<Bytes>) -> Result<hyper::body::Frame<Bytes>, std::io::Error> {
    Ok(hyper::body::Frame::data(b.into()))
}

/// An address that refuses connections for as long as the returned socket lives: bound but
/// not listening, so no other test can take the port (a port that was "just free" can be
/// handed to a parallel test's listener, which then accepts).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A TCP service that echoes what it receives; when the client shuts down writing it sends
/// `farewell` and closes. Returns its address.
pub async fn tcp_echo(farewell: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(farewell).await;
            });
        }
    });
    addr
}

/// A WebSocket echo server (tungstenite) that echoes text and binary messages and answers
/// a close with the same close frame. Returns its address.
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Close(frame) = msg {
                        let _ = ws.close(frame).await;
                    } else if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The transport the suite's agents use: `auto` (a session), or what
/// `RELAY_TEST_TRANSPORT` names (`stream`, `bounded`: the long polls of protocol 1). The
/// test command runs the suite once per carrier.
pub fn test_transport() -> relay_client::Transport {
    use relay_client::Transport;
    match std::env::var("RELAY_TEST_TRANSPORT").as_deref() {
        Err(_) | Ok("" | "auto") => Transport::Auto,
        Ok("websocket") => Transport::Websocket,
        Ok("stream") => Transport::Stream,
        Ok("bounded") => Transport::Bounded,
        Ok(v) => panic!("RELAY_TEST_TRANSPORT={v}: auto, websocket, stream or bounded"),
    }
}

/// The protocol label (`/status.json`, `relay_agents`) of the suite's native agents.
pub fn native_protocol() -> &'static str {
    if test_transport().tries_session() {
        "relay/2"
    } else {
        "relay/1"
    }
}

/// A TCP proxy in front of `upstream` whose open connections can all be cut or
/// black-holed at once (new ones go through as before).
pub struct CuttableProxy {
    /// Where to connect.
    pub addr: SocketAddr,
    generation: Arc<std::sync::Mutex<(CancellationToken, CancellationToken)>>,
}

impl CuttableProxy {
    /// Closes every connection open now.
    pub fn cut_all(&self) {
        let mut g = self.generation.lock().unwrap();
        g.0.cancel();
        *g = Default::default();
    }

    /// Black-holes every connection open now: nothing passes either way and nothing
    /// closes (a half-open path: a NAT that forgot the flow, a dead route).
    pub fn stall_all(&self) {
        let mut g = self.generation.lock().unwrap();
        g.1.cancel();
        *g = Default::default();
    }
}

/// Starts a [`CuttableProxy`] to `upstream`.
pub async fn cuttable_proxy(upstream: SocketAddr) -> CuttableProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let generation: Arc<std::sync::Mutex<(CancellationToken, CancellationToken)>> = Arc::default();
    let g = generation.clone();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let (cut, stall) = g.lock().unwrap().clone();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    _ = cut.cancelled() => {}
                    // Both sockets stay open, unread, until the test ends.
                    _ = stall.cancelled() => std::future::pending().await,
                }
            });
        }
    });
    CuttableProxy { addr, generation }
}

/// 127.0.0.1, port 0: a listener's address in these tests.
fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

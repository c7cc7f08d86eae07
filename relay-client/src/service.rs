//! Backend.AI-style service ports served by the agent itself: `GET /stream/{kernel,session}/
//! <id>/{tcpproxy,httpproxy}?app=<name>` upgraded to a WebSocket whose BINARY messages carry
//! one TCP connection to the service, and `GET /stream/{kernel,session}/<id>/apps`.
//!
//! Semantics follow Backend.AI's manager (`TCPProxy`): TEXT messages are dropped, pings are
//! answered, the service closing its side ends the WebSocket with 1001, a refused connection
//! with 1013 and any other connect failure with 1011 (both after the 101); unknown ids or apps
//! are 404 with a JSON problem body before any upgrade. A service declared with a command is
//! started on first use, and the 101 waits until its port accepts connections.
//!
//! When the client offers the subprotocol [`HALF_CLOSE_PROTOCOL`] (both ends are this
//! project's), an empty BINARY message means "no more bytes in this direction": a write
//! shutdown, so a client that half-closes still gets the service's whole reply.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::SinkExt;
use relay_common::message::{Fields, RequestHead};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::error::AgentError;
use crate::splice::{close, splice, ws_config, Ends};

/// The WebSocket subprotocol that adds per-direction end-of-stream (empty BINARY message).
pub const HALF_CLOSE_PROTOCOL: &str = "relay.halfclose.v1";

/// The Backend.AI API version the agent's version document names (that of the 23.09 client
/// and manager; newer clients take the lower of theirs and this one).
pub const BACKEND_AI_API_VERSION: &str = "v7.20230615";

/// Whether a request comes from a Backend.AI client: its SDK's `User-Agent` (the only header
/// of its version probe) or the `X-BackendAI-Version` of its API calls.
fn from_backend_ai(head: &RequestHead) -> bool {
    match &head.headers {
        Fields::Map(map) => {
            let sdk = map
                .get_all(http::header::USER_AGENT)
                .iter()
                .any(|v| v.as_bytes().starts_with(b"Backend.AI Client"));
            sdk || map.contains_key("x-backendai-version")
        }
        Fields::List(list) => listed_backend_ai(list),
        // Only the server makes these; an agent decodes heads as maps or lists.
        Fields::Encoded(_) => listed_backend_ai(&head.headers.to_list()),
    }
}

fn listed_backend_ai(list: &[(String, String)]) -> bool {
    list.iter().any(|(k, v)| {
        (k.eq_ignore_ascii_case("user-agent") && v.starts_with("Backend.AI Client"))
            || k.eq_ignore_ascii_case("x-backendai-version")
    })
}

/// One declared service.
pub struct Service {
    /// `host:port` of the service.
    pub addr: String,
    /// Command that starts it on first use.
    pub command: Option<String>,
    started: Mutex<Option<tokio::process::Child>>,
}

/// The service ports of this agent.
pub struct Services {
    kernel_id: String,
    services: HashMap<String, Service>,
    start_timeout: Duration,
    /// TCP keep-alive of the bridges' connections to the services (`--tcp-keepalive`).
    keepalive: Duration,
}

/// What a request to a service-port path asks for.
pub enum Call<'a> {
    /// `…/apps`.
    Apps,
    /// Backend.AI's API version probe (`GET /`).
    Version,
    /// `…/tcpproxy` or `…/httpproxy` for an app.
    Proxy(&'a str),
}

/// An answer the agent gives itself, before any upgrade.
pub struct LocalAnswer {
    /// Status.
    pub status: u16,
    /// JSON body.
    pub body: String,
    /// Content type.
    pub content_type: &'static str,
}

fn problem(status: u16, title: &str) -> LocalAnswer {
    LocalAnswer {
        status,
        body: serde_json::json!({
            "type": "https://api.backend.ai/probs/generic-error",
            "title": title,
        })
        .to_string(),
        content_type: "application/problem+json",
    }
}

impl Services {
    /// Services from `--service APP=HOST:PORT` and `--service-cmd APP=COMMAND` pairs.
    pub fn new(
        kernel_id: String,
        addrs: &[(String, String)],
        commands: &[(String, String)],
        start_timeout: Duration,
        keepalive: Duration,
    ) -> Result<Self, AgentError> {
        let mut services = HashMap::new();
        for (app, addr) in addrs {
            services.insert(
                app.clone(),
                Service {
                    addr: addr.clone(),
                    command: None,
                    started: Mutex::new(None),
                },
            );
        }
        for (app, cmd) in commands {
            let s = services.get_mut(app).ok_or_else(|| {
                AgentError::Config(format!(
                    "--service-cmd {app}=… needs --service {app}=HOST:PORT"
                ))
            })?;
            s.command = Some(cmd.clone());
        }
        Ok(Services {
            kernel_id,
            services,
            start_timeout,
            keepalive,
        })
    }

    /// TCP keep-alive for the bridges' connections to the services (zero: off).
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// Whether any service is declared.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Recognises `/stream/{kernel,session}/<id>/{apps,tcpproxy,httpproxy}`, and Backend.AI
    /// clients' version probe. `Err` is the answer for a service-port path that names
    /// another id or an unknown app.
    pub fn route<'a>(&self, head: &'a RequestHead) -> Option<Result<Call<'a>, LocalAnswer>> {
        let target = head.target.as_str();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path == "/" && head.method == "GET" && !self.is_empty() && from_backend_ai(head) {
            return Some(Ok(Call::Version));
        }
        let rest = path
            .strip_prefix("/stream/kernel/")
            .or_else(|| path.strip_prefix("/stream/session/"))?;
        let (id, what) = rest.split_once('/')?;
        if !matches!(what, "apps" | "tcpproxy" | "httpproxy") {
            return None;
        }
        if id != self.kernel_id {
            return Some(Err(problem(
                404,
                &format!("no session or kernel {id:?} here"),
            )));
        }
        if what == "apps" {
            return Some(Ok(Call::Apps));
        }
        let app = query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "app" || k == "service").then_some(v)
        });
        match app {
            Some(app) if self.services.contains_key(app) => Some(Ok(Call::Proxy(app))),
            Some(app) => Some(Err(problem(
                404,
                &format!("no app {app:?} in this session"),
            ))),
            None => Some(Err(problem(400, "missing app query parameter"))),
        }
    }

    /// The answer to the version probe: what a Backend.AI manager answers at its root
    /// (`backend.ai app` negotiates the API version with it before anything else, and dies
    /// on any other JSON). The service-port API it then uses is stable across versions.
    pub fn version(&self) -> LocalAnswer {
        LocalAnswer {
            status: 200,
            body: serde_json::json!({
                "version": BACKEND_AI_API_VERSION,
                "manager": concat!("relay-client ", env!("CARGO_PKG_VERSION")),
            })
            .to_string(),
            content_type: "application/json",
        }
    }

    /// The `/apps` answer: Backend.AI service-port objects.
    pub fn apps(&self) -> LocalAnswer {
        let mut names: Vec<_> = self.services.keys().collect();
        names.sort();
        let list: Vec<_> = names
            .into_iter()
            .map(|name| {
                let port = self.services[name]
                    .addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .unwrap_or(0);
                serde_json::json!({
                    "name": name,
                    "protocol": "tcp",
                    "ports": [port],
                    "container_ports": [port],
                    "host_ports": [port],
                    "is_inference": false,
                })
            })
            .collect();
        LocalAnswer {
            status: 200,
            body: serde_json::Value::Array(list).to_string(),
            content_type: "application/json",
        }
    }

    /// Starts the app's command if it has one and it is not running, then waits until its
    /// port accepts connections (bounded by the start timeout).
    pub async fn ensure_started(&self, app: &str) -> Result<(), LocalAnswer> {
        let s = &self.services[app];
        let Some(cmd) = &s.command else { return Ok(()) };
        let mut started = s.started.lock().await;
        let running = match started.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            tracing::info!(app, "starting service");
            let child = tokio::process::Command::new("sh")
                .args(["-c", cmd])
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| problem(500, &format!("Failed to launch the app service: {e}")))?;
            *started = Some(child);
        }
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        loop {
            match TcpStream::connect(&s.addr).await {
                Ok(_) => return Ok(()),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(problem(
                        500,
                        &format!("Failed to launch the app service: port not open in time ({e})"),
                    ))
                }
            }
        }
    }

    /// The service's address.
    pub fn addr(&self, app: &str) -> &str {
        &self.services[app].addr
    }
}

/// The 101 answer headers for a WebSocket upgrade request, or a problem answer when the
/// request is not one. Returns the headers and whether half-close was negotiated.
pub fn accept(head: &RequestHead) -> Result<(http::HeaderMap, bool), LocalAnswer> {
    let headers = head
        .headers
        .to_map()
        .map_err(|e| problem(400, &e.to_string()))?;
    let is_ws = head
        .upgrade
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let key = headers.get("sec-websocket-key").filter(|_| is_ws);
    let Some(key) = key else {
        return Err(problem(400, "a WebSocket upgrade is required"));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let half_close = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == HALF_CLOSE_PROTOCOL);
    let mut out = http::HeaderMap::new();
    out.insert("upgrade", http::HeaderValue::from_static("websocket"));
    out.insert("connection", http::HeaderValue::from_static("upgrade"));
    out.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&accept).expect("bug: base64 is a valid header value"),
    );
    if half_close {
        out.insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static(HALF_CLOSE_PROTOCOL),
        );
    }
    Ok((out, half_close))
}

/// Bridges the agent's end of an accepted WebSocket to the service at `addr`, whose
/// connection gets TCP keep-alive every `keepalive` of silence (`crate::keepalive`; zero:
/// none): a service on another host that vanished fails the tunnel instead of hanging it.
pub async fn bridge<S>(io: S, addr: String, half_close: bool, keepalive: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let connected = TcpStream::connect(&addr).await.and_then(|t| {
        crate::keepalive::apply(&t, keepalive, false)?;
        Ok(t)
    });
    let tcp = match connected {
        Ok(t) => t,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                1013
            } else {
                1011
            };
            let _ = ws
                .send(close(code, &format!("cannot connect to the service: {e}")))
                .await;
            let _ = ws.close(None).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let (rd, wr) = tcp.into_split();
    let ends = if half_close {
        Ends::HalfClose
    } else {
        Ends::Either(1001)
    };
    splice(ws, rd, wr, ends).await;
}

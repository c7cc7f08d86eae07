//! Agent settings as a plain struct; the binary fills it from flags and env vars.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

/// A secret whose `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How requests and their bytes travel between agent and server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// A session over a WebSocket when the server and everything in between allow the
    /// upgrade, else long polls; exchanges for big bodies probed (`stream` or `bounded`).
    Auto,
    /// Only a session over a WebSocket (retried until it opens); exchanges probed.
    Websocket,
    /// Long polls and one streaming POST per response (needs a path that does not buffer).
    Stream,
    /// Long polls and bounded POSTs with Content-Length, each at most `exchange_bytes`
    /// (works through nginx with default settings).
    Bounded,
}

impl Transport {
    /// Whether a session is tried before long polls.
    pub fn tries_session(self) -> bool {
        matches!(self, Transport::Auto | Transport::Websocket)
    }
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Base URL of the relay-server (a path is kept as a prefix of `/server/...`).
    pub relay_url: Uri,
    /// More relay-server URLs (replicas, edges): the agent keeps polls on each and serves
    /// through those that answer.
    pub more_relay_urls: Vec<Uri>,
    /// Backend name this agent serves.
    pub name: String,
    /// Backend base URL; its path is prepended to every backend path.
    pub backend_url: Uri,
    /// Agent token (`None` when a client certificate authenticates the agent).
    pub token: Option<Secret>,
    /// Client certificate chain and key (PEM) presented to an https relay-server (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Concurrent long polls.
    pub pollers: usize,
    /// Backend requests in flight at most; beyond this the agent takes no new work.
    pub max_in_flight: usize,
    /// Agent ↔ server transport.
    pub transport: Transport,
    /// Largest response POST in bounded mode (nginx refuses bodies over 1 MiB by default).
    pub exchange_bytes: usize,
    /// Speak HTTP/2 with prior knowledge to the backend (gRPC backends).
    pub backend_http2: bool,
    /// Idle backend connections kept for reuse at most (the rest close when they come back).
    pub backend_idle_connections: usize,
    /// How long an idle backend connection is kept for reuse.
    pub backend_idle_timeout: Duration,
    /// TCP keep-alive interval on every connection the agent opens (zero: none).
    pub tcp_keepalive: Duration,
    /// Extra CA for an https backend.
    pub backend_ca_file: Option<PathBuf>,
    /// Extra CA for an https relay-server.
    pub relay_ca_file: Option<PathBuf>,
    /// Replace the user's Host with the backend's authority.
    pub rewrite_host: bool,
    /// Deadline of one long poll; past it the server connection is taken for dead.
    pub poll_deadline: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// Service ports: app name → `host:port`.
    pub services: Vec<(String, String)>,
    /// Commands starting services on first use: app name → shell command.
    pub service_cmds: Vec<(String, String)>,
    /// The kernel/session id service-port paths must name (default: the backend name).
    pub kernel_id: Option<String>,
    /// How long a lazily started service may take to open its port.
    pub service_start_timeout: Duration,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (operators; off when `None`).
    pub admin_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// A config with the documented defaults.
    pub fn new(relay_url: Uri, name: String, backend_url: Uri, token: Secret) -> Self {
        Config {
            relay_url,
            more_relay_urls: Vec::new(),
            name,
            backend_url,
            token: Some(token),
            client_cert: None,
            pollers: 4,
            max_in_flight: 1024,
            transport: Transport::Auto,
            exchange_bytes: 512 * 1024,
            backend_http2: false,
            backend_idle_connections: 128,
            backend_idle_timeout: Duration::from_secs(30),
            tcp_keepalive: Duration::from_secs(30),
            backend_ca_file: None,
            relay_ca_file: None,
            rewrite_host: false,
            poll_deadline: Duration::from_secs(45),
            drain_timeout: Duration::from_secs(20),
            services: Vec::new(),
            service_cmds: Vec::new(),
            kernel_id: None,
            service_start_timeout: Duration::from_secs(60),
            admin_listen: None,
        }
    }
}

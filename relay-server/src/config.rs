//! Server settings as a plain struct; the binary fills it from flags and env vars.

use std::fmt;
use std::time::Duration;

/// A secret string whose `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which names an agent token may serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenScope {
    /// Any name (the generated zero-config token, or `*=TOKEN`).
    Any,
    /// Exactly this name.
    Name(String),
}

/// Everything `run` needs. Defaults are the documented limits.
#[derive(Clone, Debug)]
pub struct Config {
    /// Agent tokens and the names each may serve. Empty means "refuse every agent".
    pub agent_tokens: Vec<(TokenScope, Secret)>,
    /// How long a user request waits for a connected agent to pick it up (then 503).
    pub pickup_timeout: Duration,
    /// How long a user request waits for its response head after arrival (then 504).
    pub response_timeout: Duration,
    /// Same for upgrade requests: services behind them often start on first use (Jupyter,
    /// VS Code) and answer 101 only once ready.
    pub upgrade_response_timeout: Duration,
    /// A switched connection without a byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// How long a long poll is held before an empty answer (204). Must stay below the read
    /// timeout of every proxy between agent and server (nginx: 60 s).
    pub poll_timeout: Duration,
    /// How long an agent may go without a parked poll before it is declared gone and its
    /// in-flight requests fail.
    pub agent_grace: Duration,
    /// Longest an upload exchange (`/server/requeststream`) stays open without user bytes
    /// before it ends with CONTINUE, so proxies never see a silent response.
    pub exchange_idle: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Requests waiting for pickup per backend name (then 503).
    pub max_parked_per_name: usize,
    /// Requests waiting for pickup across all names (then 503).
    pub max_parked_total: usize,
    /// Time allowed for a request head to arrive (slowloris guard; hyper's timer).
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request head (hyper's read buffer); larger heads get 431.
    pub max_head_bytes: usize,
    /// Most header fields in a request; more get 431.
    pub max_headers: usize,
    /// Longest request target; longer ones get 414.
    pub max_uri_bytes: usize,
    /// `Retry-After` seconds on 503 answers.
    pub retry_after_secs: u64,
    /// Certificate chain and private key (PEM) to terminate TLS with; reloaded on change.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_tokens: Vec::new(),
            pickup_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            upgrade_response_timeout: Duration::from_secs(120),
            tunnel_idle_timeout: Duration::from_secs(600),
            poll_timeout: Duration::from_secs(25),
            agent_grace: Duration::from_secs(5),
            exchange_idle: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(20),
            max_parked_per_name: 100,
            max_parked_total: 10_000,
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            retry_after_secs: 2,
            tls: None,
        }
    }
}

//! The relay-server's flags (each also a `RELAY_*` environment variable and a key of the
//! `--config` file); [`crate::settings`] turns them into a `Config`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use relay_server::defaults;
use relay_server::user::access::AccessMode;

/// Public side of the HTTP long-polling relay: users reach backends at /client/<name>/...,
/// agents (relay-client) serve them through outbound HTTP calls only.
/// Version and the git commit built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("RELAY_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(version = VERSION, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with the same settings as the flags (keys are the flag names, e.g.
    /// `pickup_timeout = "10s"`); flags and environment variables override it. Tokens,
    /// access rules and certificates are reloaded on SIGHUP and when the file changes.
    /// `sign-link` reads the key file, public URL and public domain from it too.
    #[arg(long, env = "RELAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on (HTTP/1.1 and HTTP/2 prior knowledge).
    #[arg(long, env = "RELAY_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Serve the agent endpoints (/server/*) on this address only; the public listener then
    /// answers 404 for them.
    #[arg(long, env = "RELAY_AGENT_LISTEN")]
    pub agent_listen: Option<SocketAddr>,
    /// Serve /metrics, /status, /status.json, /healthz and /readyz on this address (plain
    /// HTTP, for operators). Without it they are served on --listen only when that is a
    /// loopback address.
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Agent token as NAME=TOKEN (NAME `*` serves any name); repeatable. With no token
    /// configured, a random any-name token is generated and printed once.
    #[arg(
        long = "agent-token",
        env = "RELAY_AGENT_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub agent_tokens: Vec<String>,
    /// File with one NAME=TOKEN per line (# comments allowed).
    #[arg(long, env = "RELAY_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<std::path::PathBuf>,
    /// How long a request waits for a connected agent to pick it up (then 503). The wait
    /// timeouts are checked every twentieth of the shortest of them (10 ms to 1 s).
    #[arg(long, env = "RELAY_PICKUP_TIMEOUT", default_value = defaults::PICKUP_TIMEOUT, value_parser = humantime::parse_duration)]
    pub pickup_timeout: Duration,
    /// How long a request waits for its response head (then 504).
    #[arg(long, env = "RELAY_RESPONSE_TIMEOUT", default_value = defaults::RESPONSE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,
    /// How long an upgrade request (WebSocket, ...) waits for its 101 or other answer.
    #[arg(long, env = "RELAY_UPGRADE_RESPONSE_TIMEOUT", default_value = defaults::UPGRADE_RESPONSE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub upgrade_response_timeout: Duration,
    /// A switched connection without traffic either way for this long is closed.
    #[arg(long, env = "RELAY_TUNNEL_IDLE_TIMEOUT", default_value = defaults::TUNNEL_IDLE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,
    /// How long a long poll is held; keep it below every proxy read timeout in between.
    #[arg(long, env = "RELAY_POLL_TIMEOUT", default_value = defaults::POLL_TIMEOUT, value_parser = humantime::parse_duration)]
    pub poll_timeout: Duration,
    /// How long an agent may be without a parked poll before it is declared gone.
    #[arg(long, env = "RELAY_AGENT_GRACE", default_value = defaults::AGENT_GRACE, value_parser = humantime::parse_duration)]
    pub agent_grace: Duration,
    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "RELAY_DRAIN_TIMEOUT", default_value = defaults::DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Requests waiting for pickup per backend name.
    #[arg(long, env = "RELAY_MAX_PARKED_PER_NAME", default_value_t = defaults::MAX_PARKED_PER_NAME)]
    pub max_parked_per_name: usize,
    /// Requests waiting for pickup in total.
    #[arg(long, env = "RELAY_MAX_PARKED", default_value_t = defaults::MAX_PARKED)]
    pub max_parked: usize,
    /// Largest request head in bytes (larger: 431).
    #[arg(long, env = "RELAY_MAX_HEAD_BYTES", default_value_t = defaults::MAX_HEAD_BYTES)]
    pub max_head_bytes: usize,
    /// Most header fields per request (more: 431).
    #[arg(long, env = "RELAY_MAX_HEADERS", default_value_t = defaults::MAX_HEADERS)]
    pub max_headers: usize,
    /// Longest request target in bytes (longer: 414).
    #[arg(long, env = "RELAY_MAX_URI_BYTES", default_value_t = defaults::MAX_URI_BYTES)]
    pub max_uri_bytes: usize,
    /// Time allowed for a request head, and for a new connection to show its protocol
    /// (slowloris guard); HTTP/1.1 connections idle between requests close after it too
    /// (keep it above 4 s, how long agents keep idle connections for reuse).
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT", default_value = defaults::HEADER_READ_TIMEOUT, value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection without a request in progress for this long is closed.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = defaults::IDLE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Largest request body in bytes (larger: 413); unlimited when unset.
    #[arg(long, env = "RELAY_MAX_REQUEST_BODY")]
    pub max_request_body: Option<u64>,
    /// A request body without a new byte for this long is refused (408).
    #[arg(long, env = "RELAY_UPLOAD_INACTIVITY_TIMEOUT", default_value = defaults::UPLOAD_INACTIVITY_TIMEOUT, value_parser = humantime::parse_duration)]
    pub upload_inactivity_timeout: Duration,
    /// Proxy in front of the relay (IP or CIDR) whose X-Forwarded-* headers are kept;
    /// repeatable. From other peers they are replaced.
    #[arg(
        long = "trusted-proxy",
        env = "RELAY_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<relay_server::config::Cidr>,
    /// Relayed bytes held in memory across all requests; beyond it, agents' response
    /// streams wait (backpressure) until users catch up. One backend name may hold a
    /// quarter of it and one client address an eighth, so users who stop reading cannot
    /// stall everyone.
    #[arg(long, env = "RELAY_MAX_BUFFERED_BYTES", default_value_t = defaults::MAX_BUFFERED_BYTES)]
    pub max_buffered_bytes: usize,
    /// A user who takes none of the waiting response (or tunnel) bytes for this long has
    /// the response or tunnel failed and its buffered bytes freed.
    #[arg(long, env = "RELAY_USER_WRITE_TIMEOUT", default_value = defaults::USER_WRITE_TIMEOUT, value_parser = humantime::parse_duration)]
    pub user_write_timeout: Duration,
    /// Open connections per listener (more are closed at once); each listener has its own
    /// allowance, so a flood on one cannot refuse the other's clients.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Open connections from one IP address, until a request on the connection
    /// authenticates as an agent (trusted proxies are exempt).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = defaults::MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Users' tunnels (WebSockets, service ports, any switched connection) open or being
    /// opened from one client address (behind a --trusted-proxy, the client it names);
    /// more get 503. A switched connection leaves the connection limits, so this bounds
    /// what one address can hold open for hours.
    #[arg(long, env = "RELAY_MAX_TUNNELS_PER_IP", default_value_t = defaults::MAX_TUNNELS_PER_IP)]
    pub max_tunnels_per_ip: usize,
    /// Certificate chain (PEM) to serve HTTPS with (ALPN h2 and http/1.1); reloaded when the
    /// file changes.
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// User access mode of every backend without an --access-for entry: open, token,
    /// signed-link or forward-auth. `open` is refused on non-loopback addresses unless
    /// --allow-open is given.
    #[arg(long, env = "RELAY_ACCESS", default_value = "open")]
    pub access: AccessMode,
    /// Access mode of one backend as NAME=MODE; repeatable.
    #[arg(long = "access-for", env = "RELAY_ACCESS_FOR", value_delimiter = ',')]
    pub access_for: Vec<String>,
    /// Serve `open` backends on a non-loopback address (anyone who reaches it gets in).
    #[arg(long, env = "RELAY_ALLOW_OPEN")]
    pub allow_open: bool,
    /// User token for `token` access as NAME=TOKEN (NAME `*` admits to every backend);
    /// repeatable.
    #[arg(
        long = "user-token",
        env = "RELAY_USER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub user_tokens: Vec<String>,
    /// File with one user NAME=TOKEN per line (# comments allowed).
    #[arg(long, env = "RELAY_USER_TOKEN_FILE")]
    pub user_token_file: Option<PathBuf>,
    /// File holding the HMAC key of signed links (at least 32 characters).
    #[arg(long, env = "RELAY_LINK_SECRET_FILE")]
    pub link_secret_file: Option<PathBuf>,
    /// A signed-link session unused for this long ends.
    #[arg(long, env = "RELAY_SESSION_IDLE", default_value = defaults::SESSION_IDLE, value_parser = humantime::parse_duration)]
    pub session_idle: Duration,
    /// A signed-link session ends this long after its link was used.
    #[arg(long, env = "RELAY_SESSION_MAX_AGE", default_value = defaults::SESSION_MAX_AGE, value_parser = humantime::parse_duration)]
    pub session_max_age: Duration,
    /// Authorization service of `forward-auth` access (nginx auth_request / Traefik
    /// ForwardAuth convention).
    #[arg(long, env = "RELAY_FORWARD_AUTH_URL")]
    pub forward_auth_url: Option<http::Uri>,
    /// Response header of the authorization service copied onto admitted requests;
    /// repeatable.
    #[arg(
        long = "forward-auth-header",
        env = "RELAY_FORWARD_AUTH_HEADER",
        value_delimiter = ','
    )]
    pub forward_auth_headers: Vec<http::HeaderName>,
    /// How long the authorization service (of users or of agents) may take (then 502).
    #[arg(long, env = "RELAY_FORWARD_AUTH_TIMEOUT", default_value = defaults::FORWARD_AUTH_TIMEOUT, value_parser = humantime::parse_duration)]
    pub forward_auth_timeout: Duration,
    /// Authorization service for agents without a configured token (robots with their
    /// own OAuth tokens): asked with the agent's Authorization, Cookie and User-Agent; a
    /// 2xx listing names in --agent-forward-auth-names-header grants them.
    #[arg(long, env = "RELAY_AGENT_FORWARD_AUTH_URL")]
    pub agent_forward_auth_url: Option<http::Uri>,
    /// Answer header of the agents' authorization service that lists the granted names
    /// (comma-separated; `*` grants every name).
    #[arg(
        long,
        env = "RELAY_AGENT_FORWARD_AUTH_NAMES_HEADER",
        default_value = "x-relay-names"
    )]
    pub agent_forward_auth_names_header: http::HeaderName,
    /// How long a verdict of the agents' authorization service is kept per credential
    /// (a credential it stops accepting is refused within this time).
    #[arg(long, env = "RELAY_AGENT_FORWARD_AUTH_CACHE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub agent_forward_auth_cache: Duration,
    /// Also route `Host: <name>.<DOMAIN>` to backend <name>, path untouched (one browser
    /// origin per backend).
    #[arg(long, env = "RELAY_PUBLIC_DOMAIN")]
    pub public_domain: Option<String>,
    /// Serve everything under this path prefix: the agent endpoints
    /// (`PREFIX/server/...`, as Go relay-clients' --relay_prefix calls them) and
    /// `PREFIX/client/<name>/...`. /healthz, /readyz and the operator pages answer at the
    /// root too, and gRPC users with X-Server-Name may use any path.
    #[arg(long, env = "RELAY_BASE_PATH", value_parser = base_path)]
    pub base_path: Option<String>,
    /// The URL users reach the relay at (what `sign-link` builds links on).
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<http::Uri>,
    /// CA certificate (PEM) of agent client certificates (mTLS, an alternative to tokens;
    /// needs --tls-cert). A certificate's DNS names, and its `urn:relay-agent:NAME` URI
    /// names, are the backend names it may serve.
    #[arg(long, env = "RELAY_AGENT_CLIENT_CA", requires = "tls_cert")]
    pub agent_client_ca: Option<PathBuf>,
    /// Cluster mode: the Redis directory all replicas share (redis:// or rediss://). Without
    /// it the server runs alone and never touches Redis.
    #[arg(long, env = "RELAY_CLUSTER_REDIS")]
    pub cluster_redis: Option<String>,
    /// Cluster mode: listen here for other replicas (forwarded requests and agent calls,
    /// each authenticated by a MAC of the cluster secret; plain HTTP unless
    /// --cluster-tls-cert). Keep it on a private network.
    #[arg(long, env = "RELAY_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Cluster mode: the URL other replicas reach --cluster-listen at (default:
    /// http(s)://ADDRESS:PORT of that listener, unless it listens on a wildcard address).
    #[arg(long, env = "RELAY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Cluster mode: file holding the secret all replicas share (at least 32 characters).
    #[arg(long, env = "RELAY_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Cluster mode: how long a directory entry outlives the replica that wrote it.
    #[arg(long, env = "RELAY_CLUSTER_LEASE", default_value = defaults::CLUSTER_LEASE, value_parser = humantime::parse_duration)]
    pub cluster_lease: Duration,
    /// Cluster mode: prefix of every Redis key (several clusters may share one Redis).
    #[arg(long, env = "RELAY_CLUSTER_KEY_PREFIX", default_value = defaults::CLUSTER_KEY_PREFIX)]
    pub cluster_key_prefix: String,
    /// Cluster mode: certificate chain (PEM) for TLS on --cluster-listen; calls between
    /// replicas then use https:// (bodies and headers encrypted, replicas verified).
    #[arg(long, env = "RELAY_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// Cluster mode: private key (PEM) for --cluster-tls-cert.
    #[arg(long, env = "RELAY_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// Cluster mode: roots (PEM) other replicas' certificates must chain to (default: the
    /// --cluster-tls-cert file itself, for a cluster sharing one self-signed certificate).
    #[arg(long, env = "RELAY_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// Export OpenTelemetry traces over OTLP/HTTP to this collector (base URL, e.g.
    /// http://collector:4318; spans go to /v1/traces); default: OTEL_EXPORTER_OTLP_ENDPOINT.
    /// Off when neither is set. OTEL_SERVICE_NAME overrides the service name.
    #[arg(long, env = "RELAY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces exported (0 to 1); a caller's sampled traceparent is always
    /// followed.
    #[arg(long, env = "RELAY_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = relay_config_file::telemetry::parse_ratio)]
    pub otlp_sample_ratio: f64,
    /// Log format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: relay_config_file::logs::LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    pub log: String,
    /// Worker threads (0: one per core). One hands requests between tasks without waking
    /// another thread (less CPU per small request, lower latency on a machine shared with
    /// backends or agents), but bulk transfers then delay the small requests beside them.
    #[arg(long, env = "RELAY_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Shard threads, each with a runtime of its own (default: one per core; 0: none). An
    /// agent's session is placed on one, and the users of its name and the agent's other
    /// connections with it (TLS ones after their handshake), so a relayed request never
    /// wakes a second thread; one name's traffic then uses one core. Everything else stays
    /// on the worker threads. See docs/PERFORMANCE.md.
    #[arg(long, env = "RELAY_SHARDS", default_value_t = relay_server::defaults::shards())]
    pub shards: usize,
    /// At most how long a single-threaded runtime (each shard; the server with
    /// `--worker-threads 1`) keeps polling without blocking after its last work before it
    /// parks ("0s": never); less, down to none, while wake-ups come later than that. On a virtual machine whose idle cores halt, this saves a slow
    /// wake-up per hop of a request under load, for a little CPU. See docs/PERFORMANCE.md.
    #[arg(long, env = "RELAY_SPIN", default_value = defaults::SPIN, value_parser = humantime::parse_duration)]
    pub spin: Duration,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print a single-use signed link to a backend (for `signed-link` access).
    SignLink(SignLink),
    /// Check a config file (keys, values, access rules) without starting the server.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Print the shell completion script (e.g. `relay-server completions bash >
    /// /etc/bash_completion.d/relay-server`).
    Completions {
        /// The shell.
        shell: relay_config_file::manual::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(clap::Args, Debug)]
pub struct SignLink {
    /// Backend name.
    #[arg(long)]
    pub name: String,
    /// How long the link stays valid.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Path on the backend the link (and its session) admits to, and everything below it.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The relay's public URL (default: public_url of --config, RELAY_PUBLIC_URL, or
    /// http://127.0.0.1:8080).
    #[arg(long)]
    pub base_url: Option<http::Uri>,
    /// Make a link to `<name>.<DOMAIN>` (host routing) instead of /client/<name> (default:
    /// public_domain of --config or RELAY_PUBLIC_DOMAIN).
    #[arg(long)]
    pub public_domain: Option<String>,
    /// The server's HMAC key file (default: link_secret_file of --config or
    /// RELAY_LINK_SECRET_FILE).
    #[arg(long)]
    pub link_secret_file: Option<PathBuf>,
}

/// Parses `args` with the `--config` file's values as defaults (flag > env > file >
/// built-in default).
/// `--base-path`, normalised (`/` alone becomes the empty string: no prefix).
fn base_path(s: &str) -> Result<String, String> {
    Ok(relay_server::config::parse_base_path(s)?.unwrap_or_default())
}

pub fn parse(args: &[OsString]) -> Result<Cli, ParseError> {
    let mut cmd = Cli::command();
    if let Some(path) = relay_config_file::config_path(args, "RELAY_CONFIG") {
        let file = relay_config_file::load(&path)?;
        cmd = relay_config_file::apply(cmd, &file, &["config"])?;
    }
    let matches = cmd.try_get_matches_from(args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// Why the command line or the config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The config file.
    #[error(transparent)]
    File(#[from] relay_config_file::FileError),
    /// The flags (clap prints these itself).
    #[error(transparent)]
    Flags(#[from] clap::Error),
}

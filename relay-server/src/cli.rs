//! The relay-server's flags (each also a `RELAY_*` environment variable and a key of the
//! `--config` file) and how they become a [`Config`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use relay_server::cluster::directory::ClusterConfig;
use relay_server::user::access::{AccessMode, AccessPolicy};
use relay_server::user::forward_auth::ForwardAuthConfig;
use relay_server::{Config, Secret, TokenScope};

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
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (HTTP/1.1 and HTTP/2 prior knowledge).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
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
    /// How long a request waits for a connected agent to pick it up (then 503).
    #[arg(long, env = "RELAY_PICKUP_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub pickup_timeout: Duration,
    /// How long a request waits for its response head (then 504).
    #[arg(long, env = "RELAY_RESPONSE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,
    /// How long an upgrade request (WebSocket, ...) waits for its 101 or other answer.
    #[arg(long, env = "RELAY_UPGRADE_RESPONSE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub upgrade_response_timeout: Duration,
    /// A switched connection without traffic either way for this long is closed.
    #[arg(long, env = "RELAY_TUNNEL_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,
    /// How long a long poll is held; keep it below every proxy read timeout in between.
    #[arg(long, env = "RELAY_POLL_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub poll_timeout: Duration,
    /// How long an agent may be without a parked poll before it is declared gone.
    #[arg(long, env = "RELAY_AGENT_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub agent_grace: Duration,
    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "RELAY_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Requests waiting for pickup per backend name.
    #[arg(long, env = "RELAY_MAX_PARKED_PER_NAME", default_value_t = 100)]
    pub max_parked_per_name: usize,
    /// Requests waiting for pickup in total.
    #[arg(long, env = "RELAY_MAX_PARKED", default_value_t = 10_000)]
    pub max_parked: usize,
    /// Largest request head in bytes (larger: 431).
    #[arg(long, env = "RELAY_MAX_HEAD_BYTES", default_value_t = 64 * 1024)]
    pub max_head_bytes: usize,
    /// Most header fields per request (more: 431).
    #[arg(long, env = "RELAY_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Longest request target in bytes (longer: 414).
    #[arg(long, env = "RELAY_MAX_URI_BYTES", default_value_t = 8 * 1024)]
    pub max_uri_bytes: usize,
    /// Time allowed for a request head, and for a new connection to show its protocol
    /// (slowloris guard); HTTP/1.1 connections idle between requests close after it too.
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection without a request in progress for this long is closed.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Largest request body in bytes (larger: 413); unlimited when unset.
    #[arg(long, env = "RELAY_MAX_REQUEST_BODY")]
    pub max_request_body: Option<u64>,
    /// A request body without a new byte for this long is refused (408).
    #[arg(long, env = "RELAY_UPLOAD_INACTIVITY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
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
    /// streams wait (backpressure) until users catch up.
    #[arg(long, env = "RELAY_MAX_BUFFERED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// Open connections in total (more are closed at once).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Open connections from one IP address.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,
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
    #[arg(long, env = "RELAY_SESSION_IDLE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub session_idle: Duration,
    /// A signed-link session ends this long after its link was used.
    #[arg(long, env = "RELAY_SESSION_MAX_AGE", default_value = "12h", value_parser = humantime::parse_duration)]
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
    /// How long the authorization service may take (then 502).
    #[arg(long, env = "RELAY_FORWARD_AUTH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub forward_auth_timeout: Duration,
    /// Also route `Host: <name>.<DOMAIN>` to backend <name>, path untouched (one browser
    /// origin per backend).
    #[arg(long, env = "RELAY_PUBLIC_DOMAIN")]
    pub public_domain: Option<String>,
    /// CA certificate (PEM) of agent client certificates (mTLS, an alternative to tokens;
    /// needs --tls-cert). A certificate's DNS names, and its `urn:relay-agent:NAME` URI
    /// names, are the backend names it may serve.
    #[arg(long, env = "RELAY_AGENT_CLIENT_CA", requires = "tls_cert")]
    pub agent_client_ca: Option<PathBuf>,
    /// Cluster mode: the Redis directory all replicas share (redis:// or rediss://). Without
    /// it the server runs alone and never touches Redis.
    #[arg(long, env = "RELAY_CLUSTER_REDIS")]
    pub cluster_redis: Option<String>,
    /// Cluster mode: listen here for other replicas (forwarded requests and agent calls;
    /// plain HTTP, each call authenticated by the cluster secret). Keep it on a private
    /// network.
    #[arg(long, env = "RELAY_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Cluster mode: the URL other replicas reach --cluster-listen at (default:
    /// http://ADDRESS:PORT of that listener, unless it listens on a wildcard address).
    #[arg(long, env = "RELAY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Cluster mode: file holding the secret all replicas share (at least 32 characters).
    #[arg(long, env = "RELAY_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Cluster mode: how long a directory entry outlives the replica that wrote it.
    #[arg(long, env = "RELAY_CLUSTER_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cluster_lease: Duration,
    /// Cluster mode: prefix of every Redis key (several clusters may share one Redis).
    #[arg(long, env = "RELAY_CLUSTER_KEY_PREFIX", default_value = "relay:")]
    pub cluster_key_prefix: String,
    /// Log format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: relay_config_file::logs::LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    pub log: String,
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
}

#[derive(clap::Args, Debug)]
pub struct SignLink {
    /// Backend name.
    #[arg(long)]
    name: String,
    /// How long the link stays valid.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Path on the backend the link (and its session) admits to, and everything below it.
    #[arg(long, default_value = "/")]
    path: String,
    /// The relay's public URL.
    #[arg(
        long,
        env = "RELAY_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    base_url: http::Uri,
    /// Make a link to `<name>.<DOMAIN>` (host routing) instead of /client/<name>.
    #[arg(long, env = "RELAY_PUBLIC_DOMAIN")]
    public_domain: Option<String>,
    /// The server's HMAC key file.
    #[arg(long, env = "RELAY_LINK_SECRET_FILE")]
    link_secret_file: PathBuf,
}

fn parse_token(kind: &str, s: &str) -> anyhow::Result<(TokenScope, Secret)> {
    let (name, token) = s
        .split_once('=')
        .with_context(|| format!("{kind} token must be NAME=TOKEN"))?;
    let name = name.trim();
    let token = token.trim();
    if token.len() < 16 {
        bail!("{kind} token for {name:?} is shorter than 16 characters");
    }
    let scope = if name == "*" {
        TokenScope::Any
    } else if relay_common::name::is_valid_name(name) {
        TokenScope::Name(name.to_owned())
    } else {
        bail!("invalid backend name {name:?} in {kind} token");
    };
    Ok((scope, Secret(token.to_owned())))
}

/// Tokens from the command line and a token file (one NAME=TOKEN per line).
fn tokens(
    kind: &str,
    args: &[String],
    file: Option<&PathBuf>,
) -> anyhow::Result<Vec<(TokenScope, Secret)>> {
    let mut out = Vec::new();
    for t in args {
        out.push(parse_token(kind, t)?);
    }
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(
                parse_token(kind, line).with_context(|| format!("{}:{}", path.display(), n + 1))?,
            );
        }
    }
    Ok(out)
}

fn read_link_secret(path: &PathBuf) -> anyhow::Result<Secret> {
    read_secret("link", path)
}

/// A secret of at least 32 characters from a file (surrounding whitespace trimmed).
fn read_secret(what: &str, path: &PathBuf) -> anyhow::Result<Secret> {
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned();
    if key.len() < 32 {
        bail!(
            "the {what} secret in {} is shorter than 32 characters",
            path.display()
        );
    }
    Ok(Secret(key))
}

pub fn sign_link(args: SignLink) -> anyhow::Result<()> {
    if !relay_common::name::is_valid_name(&args.name) {
        bail!("invalid backend name {:?}", args.name);
    }
    if !args.path.starts_with('/') || args.path.contains(['?', '#', '\n']) {
        bail!("--path must be a path starting with / (no query)");
    }
    let key = read_link_secret(&args.link_secret_file)?;
    let query = relay_server::user::link::sign(&key, &args.name, &args.path, args.ttl);
    let scheme = args.base_url.scheme_str().unwrap_or("http");
    let authority = args
        .base_url
        .authority()
        .context("--base-url needs a host")?;
    let url = match &args.public_domain {
        Some(domain) => {
            let port = authority
                .port()
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            format!(
                "{scheme}://{}.{domain}{port}{}?{query}",
                args.name, args.path
            )
        }
        None => {
            let base = args.base_url.path().trim_end_matches('/');
            format!(
                "{scheme}://{authority}{base}/client/{}{}?{query}",
                args.name, args.path
            )
        }
    };
    println!("{url}");
    Ok(())
}

pub fn tokens_of_users(cli: &Cli) -> anyhow::Result<Vec<(TokenScope, Secret)>> {
    tokens("user", &cli.user_tokens, cli.user_token_file.as_ref())
}

/// Builds the settings from parsed flags (no token generated, nothing bound).
pub fn build_config(cli: &Cli) -> anyhow::Result<Config> {
    let tokens = tokens("agent", &cli.agent_tokens, cli.agent_token_file.as_ref())?;
    let user_tokens = tokens_of_users(cli)?;
    let mut access = AccessPolicy {
        default: cli.access,
        ..AccessPolicy::default()
    };
    for entry in &cli.access_for {
        let (name, mode) = entry
            .split_once('=')
            .context("--access-for takes NAME=MODE")?;
        if !relay_common::name::is_valid_name(name) {
            bail!("invalid backend name {name:?} in --access-for");
        }
        access
            .per_name
            .insert(name.to_owned(), mode.parse().map_err(anyhow::Error::msg)?);
    }
    let link_secret = cli
        .link_secret_file
        .as_ref()
        .map(read_link_secret)
        .transpose()?;
    let forward_auth = cli.forward_auth_url.clone().map(|url| ForwardAuthConfig {
        url,
        copy_headers: cli.forward_auth_headers.clone(),
        timeout: cli.forward_auth_timeout,
    });
    let public_domain = cli
        .public_domain
        .as_deref()
        .map(|d| d.trim_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    // Checked here, not with clap's `requires`: values from a config file are defaults to
    // clap, and defaults never satisfy `requires`.
    let cluster = match (&cli.cluster_redis, &cli.cluster_secret_file) {
        (Some(_), _) if cli.cluster_listen.is_none() => {
            bail!("--cluster-redis needs --cluster-listen (the listener for the other replicas)")
        }
        (Some(_), None) => bail!("--cluster-redis needs --cluster-secret-file"),
        (None, _)
            if cli.cluster_listen.is_some()
                || cli.cluster_secret_file.is_some()
                || cli.advertise_url.is_some() =>
        {
            bail!(
                "--cluster-listen, --cluster-secret-file and --advertise-url need --cluster-redis"
            )
        }
        (Some(url), Some(secret)) => Some(ClusterConfig {
            redis_url: url.clone(),
            // Empty: derived from the cluster listener's address once it is bound.
            advertise_url: cli.advertise_url.clone().unwrap_or_default(),
            secret: read_secret("cluster", secret)?,
            lease: cli.cluster_lease,
            key_prefix: cli.cluster_key_prefix.clone(),
        }),
        _ => None,
    };
    let cfg = Config {
        agent_tokens: tokens,
        pickup_timeout: cli.pickup_timeout,
        response_timeout: cli.response_timeout,
        upgrade_response_timeout: cli.upgrade_response_timeout,
        tunnel_idle_timeout: cli.tunnel_idle_timeout,
        poll_timeout: cli.poll_timeout,
        agent_grace: cli.agent_grace,
        drain_timeout: cli.drain_timeout,
        max_parked_per_name: cli.max_parked_per_name,
        max_parked_total: cli.max_parked,
        tls: cli.tls_cert.clone().zip(cli.tls_key.clone()),
        agent_client_ca: cli.agent_client_ca.clone(),
        max_head_bytes: cli.max_head_bytes,
        max_headers: cli.max_headers,
        max_uri_bytes: cli.max_uri_bytes,
        header_read_timeout: cli.header_read_timeout,
        idle_timeout: cli.idle_timeout,
        max_request_body: cli.max_request_body,
        upload_inactivity_timeout: cli.upload_inactivity_timeout,
        max_connections: cli.max_connections,
        max_buffered_bytes: cli.max_buffered_bytes,
        trusted_proxies: cli.trusted_proxies.clone(),
        max_connections_per_ip: cli.max_connections_per_ip,
        access,
        user_tokens,
        link_secret,
        session_idle: cli.session_idle,
        session_max_age: cli.session_max_age,
        forward_auth,
        public_domain,
        cluster,
        ..Config::default()
    };
    Ok(cfg)
}

/// Parses `args` with the `--config` file's values as defaults (flag > env > file >
/// built-in default).
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

/// `relay-server check-config FILE`: the file as the server would read it (with the current
/// environment), validated like at start.
pub fn check_config(file: &std::path::Path) -> anyhow::Result<String> {
    let args: Vec<OsString> = vec!["relay-server".into(), "--config".into(), file.into()];
    let cli = parse(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = build_config(&cli)?;
    let warning = cfg.validate(cli.listen, cli.allow_open)?;
    let names = cfg.access.per_name.len();
    let mut out = format!(
        "{}: ok (listen {}, {} agent token(s), {} user token(s), access {} with {names} override(s))",
        file.display(),
        cli.listen,
        cfg.agent_tokens.len(),
        cfg.user_tokens.len(),
        cfg.access.default,
    );
    if let Some(w) = warning {
        out.push_str(&format!("\nwarning: {w}"));
    }
    Ok(out)
}

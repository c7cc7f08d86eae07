use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use relay_server::access::{AccessMode, AccessPolicy};
use relay_server::forward_auth::ForwardAuthConfig;
use relay_server::{Config, Secret, TokenScope};
use tokio_util::sync::CancellationToken;

/// Public side of the HTTP long-polling relay: users reach backends at /client/<name>/...,
/// agents (relay-client) serve them through outbound HTTP calls only.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (HTTP/1.1 and HTTP/2 prior knowledge).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the agent endpoints (/server/*) on this address only; the public listener then
    /// answers 404 for them.
    #[arg(long, env = "RELAY_AGENT_LISTEN")]
    agent_listen: Option<SocketAddr>,
    /// Serve /metrics, /status, /status.json, /healthz and /readyz on this address (plain
    /// HTTP, for operators). Without it they are served on --listen only when that is a
    /// loopback address.
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Agent token as NAME=TOKEN (NAME `*` serves any name); repeatable. With no token
    /// configured, a random any-name token is generated and printed once.
    #[arg(
        long = "agent-token",
        env = "RELAY_AGENT_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    agent_tokens: Vec<String>,
    /// File with one NAME=TOKEN per line (# comments allowed).
    #[arg(long, env = "RELAY_AGENT_TOKEN_FILE")]
    agent_token_file: Option<std::path::PathBuf>,
    /// How long a request waits for a connected agent to pick it up (then 503).
    #[arg(long, env = "RELAY_PICKUP_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pickup_timeout: Duration,
    /// How long a request waits for its response head (then 504).
    #[arg(long, env = "RELAY_RESPONSE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    response_timeout: Duration,
    /// How long an upgrade request (WebSocket, ...) waits for its 101 or other answer.
    #[arg(long, env = "RELAY_UPGRADE_RESPONSE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    upgrade_response_timeout: Duration,
    /// A switched connection without traffic either way for this long is closed.
    #[arg(long, env = "RELAY_TUNNEL_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    tunnel_idle_timeout: Duration,
    /// How long a long poll is held; keep it below every proxy read timeout in between.
    #[arg(long, env = "RELAY_POLL_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    poll_timeout: Duration,
    /// How long an agent may be without a parked poll before it is declared gone.
    #[arg(long, env = "RELAY_AGENT_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    agent_grace: Duration,
    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "RELAY_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Requests waiting for pickup per backend name.
    #[arg(long, env = "RELAY_MAX_PARKED_PER_NAME", default_value_t = 100)]
    max_parked_per_name: usize,
    /// Requests waiting for pickup in total.
    #[arg(long, env = "RELAY_MAX_PARKED", default_value_t = 10_000)]
    max_parked: usize,
    /// Largest request head in bytes (larger: 431).
    #[arg(long, env = "RELAY_MAX_HEAD_BYTES", default_value_t = 64 * 1024)]
    max_head_bytes: usize,
    /// Most header fields per request (more: 431).
    #[arg(long, env = "RELAY_MAX_HEADERS", default_value_t = 100)]
    max_headers: usize,
    /// Longest request target in bytes (longer: 414).
    #[arg(long, env = "RELAY_MAX_URI_BYTES", default_value_t = 8 * 1024)]
    max_uri_bytes: usize,
    /// Time allowed for a request head, and for a new connection to show its protocol
    /// (slowloris guard); HTTP/1.1 connections idle between requests close after it too.
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// An HTTP/2 connection without a request in progress for this long is closed.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Largest request body in bytes (larger: 413); unlimited when unset.
    #[arg(long, env = "RELAY_MAX_REQUEST_BODY")]
    max_request_body: Option<u64>,
    /// A request body without a new byte for this long is refused (408).
    #[arg(long, env = "RELAY_UPLOAD_INACTIVITY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    upload_inactivity_timeout: Duration,
    /// Proxy in front of the relay (IP or CIDR) whose X-Forwarded-* headers are kept;
    /// repeatable. From other peers they are replaced.
    #[arg(
        long = "trusted-proxy",
        env = "RELAY_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<relay_server::config::Cidr>,
    /// Relayed bytes held in memory across all requests; beyond it, agents' response
    /// streams wait (backpressure) until users catch up.
    #[arg(long, env = "RELAY_MAX_BUFFERED_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_buffered_bytes: usize,
    /// Open connections in total (more are closed at once).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Open connections from one IP address.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: usize,
    /// Certificate chain (PEM) to serve HTTPS with (ALPN h2 and http/1.1); reloaded when the
    /// file changes.
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// User access mode of every backend without an --access-for entry: open, token,
    /// signed-link or forward-auth. `open` is refused on non-loopback addresses unless
    /// --allow-open is given.
    #[arg(long, env = "RELAY_ACCESS", default_value = "open")]
    access: AccessMode,
    /// Access mode of one backend as NAME=MODE; repeatable.
    #[arg(long = "access-for", env = "RELAY_ACCESS_FOR", value_delimiter = ',')]
    access_for: Vec<String>,
    /// Serve `open` backends on a non-loopback address (anyone who reaches it gets in).
    #[arg(long, env = "RELAY_ALLOW_OPEN")]
    allow_open: bool,
    /// User token for `token` access as NAME=TOKEN (NAME `*` admits to every backend);
    /// repeatable.
    #[arg(
        long = "user-token",
        env = "RELAY_USER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    user_tokens: Vec<String>,
    /// File with one user NAME=TOKEN per line (# comments allowed).
    #[arg(long, env = "RELAY_USER_TOKEN_FILE")]
    user_token_file: Option<PathBuf>,
    /// File holding the HMAC key of signed links (at least 32 characters).
    #[arg(long, env = "RELAY_LINK_SECRET_FILE")]
    link_secret_file: Option<PathBuf>,
    /// A signed-link session unused for this long ends.
    #[arg(long, env = "RELAY_SESSION_IDLE", default_value = "1h", value_parser = humantime::parse_duration)]
    session_idle: Duration,
    /// A signed-link session ends this long after its link was used.
    #[arg(long, env = "RELAY_SESSION_MAX_AGE", default_value = "12h", value_parser = humantime::parse_duration)]
    session_max_age: Duration,
    /// Authorization service of `forward-auth` access (nginx auth_request / Traefik
    /// ForwardAuth convention).
    #[arg(long, env = "RELAY_FORWARD_AUTH_URL")]
    forward_auth_url: Option<http::Uri>,
    /// Response header of the authorization service copied onto admitted requests;
    /// repeatable.
    #[arg(
        long = "forward-auth-header",
        env = "RELAY_FORWARD_AUTH_HEADER",
        value_delimiter = ','
    )]
    forward_auth_headers: Vec<http::HeaderName>,
    /// How long the authorization service may take (then 502).
    #[arg(long, env = "RELAY_FORWARD_AUTH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    forward_auth_timeout: Duration,
    /// Also route `Host: <name>.<DOMAIN>` to backend <name>, path untouched (one browser
    /// origin per backend).
    #[arg(long, env = "RELAY_PUBLIC_DOMAIN")]
    public_domain: Option<String>,
    /// CA certificate (PEM) of agent client certificates (mTLS, an alternative to tokens;
    /// needs --tls-cert). A certificate's DNS names, and its `urn:relay-agent:NAME` URI
    /// names, are the backend names it may serve.
    #[arg(long, env = "RELAY_AGENT_CLIENT_CA", requires = "tls_cert")]
    agent_client_ca: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print a single-use signed link to a backend (for `signed-link` access).
    SignLink(SignLink),
}

#[derive(clap::Args, Debug)]
struct SignLink {
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
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned();
    if key.len() < 32 {
        bail!(
            "the link secret in {} is shorter than 32 characters",
            path.display()
        );
    }
    Ok(Secret(key))
}

fn sign_link(args: SignLink) -> anyhow::Result<()> {
    if !relay_common::name::is_valid_name(&args.name) {
        bail!("invalid backend name {:?}", args.name);
    }
    if !args.path.starts_with('/') || args.path.contains(['?', '#', '\n']) {
        bail!("--path must be a path starting with / (no query)");
    }
    let key = read_link_secret(&args.link_secret_file)?;
    let query = relay_server::link::sign(&key, &args.name, &args.path, args.ttl);
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

fn tokens_of_users(cli: &Cli) -> anyhow::Result<Vec<(TokenScope, Secret)>> {
    tokens("user", &cli.user_tokens, cli.user_token_file.as_ref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(Command::SignLink(args)) = cli.command {
        return match sign_link(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay-server sign-link: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut tokens = tokens("agent", &cli.agent_tokens, cli.agent_token_file.as_ref())?;
    let user_tokens = tokens_of_users(&cli)?;
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
    let scheme = if cli.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let generated = tokens.is_empty().then(|| relay_common::id::random_hex(24));
    if let Some(token) = &generated {
        tokens.push((TokenScope::Any, Secret(token.clone())));
    }
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
        tls: cli.tls_cert.zip(cli.tls_key),
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
        ..Config::default()
    };
    // Checked before binding: a refused configuration never listens.
    if let Some(warning) = cfg.validate(cli.listen, cli.allow_open)? {
        tracing::warn!("{warning}");
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    let agent_listener = match cli.agent_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?,
        ),
        None => None,
    };
    let agent_addr = match &agent_listener {
        Some(l) => l.local_addr()?,
        None => addr,
    };
    if let Some(token) = generated {
        // Printed once, on stdout, for the operator to copy; never logged.
        println!("relay-server listening on {scheme}://{addr}");
        println!("no agent token configured; generated one for this run (serves any name):");
        println!();
        println!(
            "  relay-client --relay-url {scheme}://{agent_addr} --name NAME --backend-url http://127.0.0.1:8000 --token {token}"
        );
        println!();
        println!("then open {scheme}://{addr}/client/NAME/");
    } else {
        println!("relay-server listening on {scheme}://{addr}");
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(relay_common::signal::cancel_on_signal(shutdown.clone()));
    if agent_listener.is_some() {
        println!("relay-server agent endpoints on {scheme}://{agent_addr}");
    }
    let state = std::sync::Arc::new(relay_server::State::new(cfg));
    let admin_listener = match cli.admin_listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?;
            println!("relay-server admin endpoints on http://{}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let listeners = relay_server::Listeners {
        public: listener,
        agent: agent_listener,
        admin: admin_listener,
    };
    relay_server::serve_faces(listeners, state, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use relay_server::{Config, Secret, TokenScope};
use tokio_util::sync::CancellationToken;

/// Public side of the HTTP long-polling relay: users reach backends at /client/<name>/...,
/// agents (relay-client) serve them through outbound HTTP calls only.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address to listen on (HTTP/1.1 and HTTP/2 prior knowledge).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the agent endpoints (/server/*) on this address only; the public listener then
    /// answers 404 for them.
    #[arg(long, env = "RELAY_AGENT_LISTEN")]
    agent_listen: Option<SocketAddr>,
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
    /// Certificate chain (PEM) to serve HTTPS with (ALPN h2 and http/1.1); reloaded when the
    /// file changes.
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
}

fn parse_token(s: &str) -> anyhow::Result<(TokenScope, Secret)> {
    let (name, token) = s
        .split_once('=')
        .context("agent token must be NAME=TOKEN")?;
    let name = name.trim();
    let token = token.trim();
    if token.len() < 16 {
        bail!("agent token for {name:?} is shorter than 16 characters");
    }
    let scope = if name == "*" {
        TokenScope::Any
    } else if relay_common::name::is_valid_name(name) {
        TokenScope::Name(name.to_owned())
    } else {
        bail!("invalid backend name {name:?} in agent token");
    };
    Ok((scope, Secret(token.to_owned())))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
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
    let mut tokens = Vec::new();
    for t in &cli.agent_tokens {
        tokens.push(parse_token(t)?);
    }
    if let Some(path) = &cli.agent_token_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            tokens
                .push(parse_token(line).with_context(|| format!("{}:{}", path.display(), n + 1))?);
        }
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
    let scheme = if cli.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    if tokens.is_empty() {
        let token = relay_common::id::random_hex(24);
        // Printed once, on stdout, for the operator to copy; never logged.
        println!("relay-server listening on {scheme}://{addr}");
        println!("no agent token configured; generated one for this run (serves any name):");
        println!();
        println!(
            "  relay-client --relay-url {scheme}://{agent_addr} --name NAME --backend-url http://127.0.0.1:8000 --token {token}"
        );
        println!();
        println!("then open {scheme}://{addr}/client/NAME/");
        tokens.push((TokenScope::Any, Secret(token)));
    } else {
        println!("relay-server listening on {scheme}://{addr}");
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
        max_head_bytes: cli.max_head_bytes,
        max_headers: cli.max_headers,
        max_uri_bytes: cli.max_uri_bytes,
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_common::signal::cancel_on_signal(shutdown.clone()));
    if agent_listener.is_some() {
        println!("relay-server agent endpoints on {scheme}://{agent_addr}");
    }
    let state = std::sync::Arc::new(relay_server::State::new(cfg));
    relay_server::serve_faces(listener, agent_listener, state, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

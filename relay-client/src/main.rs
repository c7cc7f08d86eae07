use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http::Uri;
use relay_client::{Config, Secret, Transport};
use tokio_util::sync::CancellationToken;

/// Agent of the HTTP long-polling relay: serves a private backend through a public
/// relay-server using outbound HTTP(S) calls only.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// relay-server base URL, e.g. https://relay.example.com
    #[arg(long, env = "RELAY_URL")]
    relay_url: Uri,
    /// Backend name to serve (users reach it at /client/<name>/).
    #[arg(long, env = "RELAY_NAME")]
    name: String,
    /// Backend base URL; its path is prepended to every backend path.
    #[arg(long, env = "RELAY_BACKEND_URL")]
    backend_url: Uri,
    /// Agent token (see the server's --agent-token).
    #[arg(
        long,
        env = "RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the agent token.
    #[arg(long, env = "RELAY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Concurrent long polls.
    #[arg(long, env = "RELAY_POLLERS", default_value_t = 4)]
    pollers: usize,
    /// Backend requests in flight at most.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// Agent-server transport: auto probes whether a proxy in between buffers bodies.
    #[arg(long, env = "RELAY_TRANSPORT", value_enum, default_value = "auto")]
    transport: Transport,
    /// Largest response POST in bounded mode, in bytes (stay under the proxy's body limit).
    #[arg(long, env = "RELAY_EXCHANGE_BYTES", default_value_t = 512 * 1024)]
    exchange_bytes: usize,
    /// Speak HTTP/2 with prior knowledge (h2c) to the backend, for gRPC.
    #[arg(long, env = "RELAY_BACKEND_HTTP2")]
    backend_http2: bool,
    /// CA certificate (PEM) for an https backend, in addition to the system roots.
    #[arg(long, env = "RELAY_BACKEND_CA_FILE")]
    backend_ca_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https relay-server, in addition to the system roots.
    #[arg(long, env = "RELAY_CA_FILE")]
    relay_ca_file: Option<PathBuf>,
    /// Send the backend's own host as Host instead of the user's.
    #[arg(long, env = "RELAY_REWRITE_HOST")]
    rewrite_host: bool,
    /// Deadline of one long poll; a server silent for longer is taken for dead.
    #[arg(long, env = "RELAY_POLL_DEADLINE", default_value = "45s", value_parser = humantime::parse_duration)]
    poll_deadline: Duration,
    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "RELAY_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
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
            eprintln!("relay-client: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("an agent token is required: --token or --token-file"),
    };
    let mut cfg = Config::new(cli.relay_url, cli.name, cli.backend_url, Secret(token));
    cfg.pollers = cli.pollers;
    cfg.max_in_flight = cli.max_in_flight;
    cfg.transport = cli.transport;
    cfg.exchange_bytes = cli.exchange_bytes;
    cfg.backend_http2 = cli.backend_http2;
    cfg.backend_ca_file = cli.backend_ca_file;
    cfg.relay_ca_file = cli.relay_ca_file;
    cfg.rewrite_host = cli.rewrite_host;
    cfg.poll_deadline = cli.poll_deadline;
    cfg.drain_timeout = cli.drain_timeout;
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_common::signal::cancel_on_signal(shutdown.clone()));
    relay_client::run(cfg, shutdown).await?;
    Ok(())
}

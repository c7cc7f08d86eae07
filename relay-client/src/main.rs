use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use http::Uri;
use relay_client::{Config, Secret, Transport};
use tokio_util::sync::CancellationToken;

/// Agent of the HTTP long-polling relay: serves a private backend through a public
/// relay-server using outbound HTTP(S) calls only. `relay-client connect` is the user side
/// of a service port.
/// Version and the git commit built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("RELAY_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    version = VERSION,
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// TOML file with the same settings as the flags (keys are the flag names, e.g.
    /// `relay_url = "https://relay.example.com"`); flags and environment variables
    /// override it.
    #[arg(long, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// relay-server base URL, e.g. https://relay.example.com; repeatable (or
    /// comma-separated): the agent then keeps polls on every one (replicas, edges) and
    /// serves through those that answer.
    #[arg(long, env = "RELAY_URL", required = true, value_delimiter = ',')]
    relay_url: Vec<Uri>,
    /// Backend name to serve (users reach it at /client/<name>/).
    #[arg(long, env = "RELAY_NAME", required = true)]
    name: Option<String>,
    /// Backend base URL; its path is prepended to every backend path.
    #[arg(long, env = "RELAY_BACKEND_URL", required = true)]
    backend_url: Option<Uri>,
    /// A service port answered by the agent: APP=HOST:PORT (repeatable). Users reach it at
    /// /client/<name>/stream/kernel/<kernel-id>/tcpproxy?app=APP (one WebSocket per TCP
    /// connection, as Backend.AI does).
    #[arg(long = "service", env = "RELAY_SERVICE", value_delimiter = ',', value_parser = pair)]
    services: Vec<(String, String)>,
    /// Start a service on its first connection: APP=COMMAND (run with sh -c; repeatable).
    /// The command is stopped when the agent stops.
    #[arg(long = "service-cmd", value_parser = pair)]
    service_cmds: Vec<(String, String)>,
    /// The kernel/session id service-port paths must name (default: --name).
    #[arg(long, env = "RELAY_KERNEL_ID")]
    kernel_id: Option<String>,
    /// How long a lazily started service may take to open its port.
    #[arg(long, env = "RELAY_SERVICE_START_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    service_start_timeout: Duration,
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
    /// Client certificate chain (PEM) for an https relay-server that authenticates agents by
    /// certificate (the server's --agent-client-ca); replaces the token.
    #[arg(long, env = "RELAY_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "RELAY_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Concurrent long polls.
    #[arg(long, env = "RELAY_POLLERS", default_value_t = 4)]
    pollers: usize,
    /// Backend requests in flight at most.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// Agent-server transport: auto opens a session over a WebSocket when the way allows
    /// the upgrade and falls back to long polls otherwise; bodies above 64 KiB take
    /// exchanges, streaming or bounded as the probe finds; websocket insists on a session;
    /// stream and bounded force long polls.
    #[arg(long, env = "RELAY_TRANSPORT", value_enum, default_value = "auto")]
    transport: Transport,
    /// Largest response POST in bounded mode, in bytes (stay under the proxy's body limit).
    #[arg(long, env = "RELAY_EXCHANGE_BYTES", default_value_t = 512 * 1024)]
    exchange_bytes: usize,
    /// Speak HTTP/2 with prior knowledge (h2c) to the backend, for gRPC.
    #[arg(long, env = "RELAY_BACKEND_HTTP2")]
    backend_http2: bool,
    /// Idle connections to the backend kept for reuse at most; a burst opens more (16 at
    /// once at most, its requests taking connections others give back first), and those
    /// beyond this close once idle for a second instead of idling for 30 s.
    #[arg(long, env = "RELAY_BACKEND_IDLE_CONNECTIONS", default_value_t = 128)]
    backend_idle_connections: usize,
    /// How long an idle backend connection is kept for reuse; keep it below the backend's
    /// own keep-alive timeout, so the agent never reuses one the backend is closing (0s:
    /// none is reused).
    #[arg(long, env = "RELAY_BACKEND_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    backend_idle_timeout: Duration,
    /// How long a connection the agent opened (to the backend, a service port or the
    /// relay-server) may be silent before the kernel checks that its peer is still there:
    /// TCP keep-alive probes then, three a third of this apart, and the connection fails
    /// when none is answered. A backend whose host or network vanished without closing is
    /// noticed within twice this, instead of requests hanging on its connections for the
    /// kernel's 15 minutes (the one HTTP/2 connection of --backend-http2 also fails when
    /// what it sent stays unacknowledged that long). 0s: off.
    #[arg(long, env = "RELAY_TCP_KEEPALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    tcp_keepalive: Duration,
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
    /// Serve /healthz, /readyz and /metrics on this address (operators).
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Export OpenTelemetry traces over OTLP/HTTP to this collector (base URL, e.g.
    /// http://collector:4318; spans go to /v1/traces); default: OTEL_EXPORTER_OTLP_ENDPOINT.
    /// Off when neither is set. OTEL_SERVICE_NAME overrides the service name.
    #[arg(long, env = "RELAY_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces exported (0 to 1); a caller's sampled traceparent is always
    /// followed.
    #[arg(long, env = "RELAY_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = relay_config_file::telemetry::parse_ratio)]
    otlp_sample_ratio: f64,
    /// Log format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: relay_config_file::logs::LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
    /// Worker threads (0: one per core). The default, one, runs everything on the main thread
    /// and suits an agent that shares its machine with its backend: it hands requests
    /// between tasks without waking another
    /// thread (a quarter less CPU per small request), and small requests beside a bulk
    /// transfer still answer within a few milliseconds. More threads (or 0) spread bulk
    /// transfers over the cores, for an agent that serves several at once.
    #[arg(long, env = "RELAY_WORKER_THREADS", default_value_t = 1, global = true)]
    worker_threads: usize,
    /// At most how long the single-threaded runtime (the default, one worker thread) keeps
    /// polling without blocking after its last work before it parks ("0s": never); less,
    /// down to none, while wake-ups come later than that. On a virtual
    /// machine whose idle cores halt, this saves a slow wake-up per hop of a request under
    /// load, for a little CPU. See docs/PERFORMANCE.md.
    #[arg(long, env = "RELAY_SPIN", default_value = relay_config_file::spin::DEFAULT, value_parser = humantime::parse_duration, global = true)]
    spin: std::time::Duration,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Accept local TCP connections and carry each as one WebSocket to a service port of a
    /// backend (like `backend.ai app`), e.g. for ssh.
    Connect(Box<ConnectArgs>),
    /// Print the shell completion script (e.g. `relay-client completions bash >
    /// /etc/bash_completion.d/relay-client`).
    Completions {
        /// The shell.
        shell: relay_config_file::manual::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(clap::Args, Debug)]
struct ConnectArgs {
    /// relay-server base URL.
    #[arg(long, env = "RELAY_URL")]
    relay_url: Uri,
    /// Backend name.
    #[arg(long, env = "RELAY_NAME")]
    name: String,
    /// Service (app) name on the agent.
    #[arg(long)]
    app: String,
    /// Kernel/session id (default: --name).
    #[arg(long)]
    kernel_id: Option<String>,
    /// Local address to listen on; port 0 picks one and prints it.
    #[arg(long, default_value = "127.0.0.1:0", conflicts_with = "stdio")]
    listen: std::net::SocketAddr,
    /// Carry stdin and stdout as the one connection instead of listening (for ssh:
    /// -o ProxyCommand='relay-client connect --stdio --relay-url URL --name NAME --app ssh').
    /// Logs go to stderr.
    #[arg(long)]
    stdio: bool,
    /// User credential for the relay, sent as Authorization: Bearer.
    #[arg(long, env = "RELAY_USER_TOKEN", hide_env_values = true)]
    user_token: Option<String>,
    /// CA certificate (PEM) for an https relay-server, in addition to the system roots.
    #[arg(long, env = "RELAY_CA_FILE")]
    relay_ca_file: Option<PathBuf>,
    /// How long a tunnel's connection to the relay-server may be silent before the kernel
    /// checks that the relay is still there (TCP keep-alive probes, three a third of this
    /// apart): a tunnel whose network path died fails within twice this instead of hanging.
    /// 0s: off.
    #[arg(long, env = "RELAY_TCP_KEEPALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    tcp_keepalive: Duration,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
}

fn pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    if k.is_empty() || v.is_empty() {
        return Err(format!("expected NAME=VALUE, got {s:?}"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(path) = relay_config_file::config_path(&args, "RELAY_CONFIG") {
        match relay_config_file::load(&path)
            .and_then(|f| relay_config_file::apply(cmd, &f, &["config"]))
        {
            Ok(c) => cmd = c,
            Err(e) => {
                eprintln!("relay-client: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let cli = match cmd
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let log = match &cli.command {
        Some(Cmd::Connect(c)) => c.log.clone(),
        Some(Cmd::Completions { shell }) => {
            relay_config_file::manual::completions(Cli::command(), *shell);
            return ExitCode::SUCCESS;
        }
        Some(Cmd::Man) => {
            return match relay_config_file::manual::man(Cli::command()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            };
        }
        None => cli.log.clone(),
    };
    let otlp = relay_config_file::telemetry::Otlp::from_flags(
        cli.otlp_endpoint.as_deref(),
        "relay-client",
        cli.otlp_sample_ratio,
    );
    let _traces = match relay_config_file::logs::init(&log, cli.log_format, otlp.as_ref()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("relay-client: {e}");
            return ExitCode::from(2);
        }
    };
    let say = relay_config_file::logs::Say::new(cli.log_format);
    // Before the runtime's threads allocate their heaps (see the function's doc).
    relay_config_file::allocator::no_huge_pages();
    let rt = match relay_config_file::runtime::build(cli.worker_threads, "relay-client", cli.spin) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay-client: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let error = format!("{e:#}");
            say.error(
                &format!("relay-client: {error}"),
                "relay-client stopped",
                &[("error", error)],
            );
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_common::signal::cancel_on_signal(shutdown.clone()));
    if let Some(Cmd::Connect(c)) = cli.command {
        let cfg = relay_client::connect::ConnectConfig {
            relay_url: c.relay_url,
            name: c.name,
            app: c.app,
            kernel_id: c.kernel_id,
            user_token: c.user_token.map(Secret),
            relay_ca_file: c.relay_ca_file,
            tcp_keepalive: c.tcp_keepalive,
        };
        if c.stdio {
            relay_client::connect::stdio(cfg, shutdown).await?;
            return Ok(());
        }
        let listener = relay_client::connect::bind(c.listen).await?;
        // Printed for scripts and users that passed port 0.
        let addr = listener.local_addr()?.to_string();
        relay_config_file::logs::Say::new(cli.log_format).info(
            &format!("relay-client connect listening on {addr}"),
            "relay-client connect listening",
            &[("address", addr)],
        );
        relay_client::connect::run(cfg, listener, shutdown).await?;
        return Ok(());
    }
    let mut urls = cli.relay_url.into_iter();
    let (Some(relay_url), Some(name), Some(backend_url)) = (urls.next(), cli.name, cli.backend_url)
    else {
        anyhow::bail!("--relay-url, --name and --backend-url are required");
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) if cli.client_cert.is_some() => None,
        (None, None) => {
            anyhow::bail!("an agent token is required: --token or --token-file (or --client-cert)")
        }
    };
    let mut cfg = Config::new(relay_url, name, backend_url, Secret(String::new()));
    cfg.more_relay_urls = urls.collect();
    cfg.token = token.map(Secret);
    cfg.client_cert = cli.client_cert.zip(cli.client_key);
    cfg.services = cli.services;
    cfg.service_cmds = cli.service_cmds;
    cfg.kernel_id = cli.kernel_id;
    cfg.service_start_timeout = cli.service_start_timeout;
    cfg.pollers = cli.pollers;
    cfg.max_in_flight = cli.max_in_flight;
    cfg.transport = cli.transport;
    cfg.exchange_bytes = cli.exchange_bytes;
    cfg.backend_http2 = cli.backend_http2;
    cfg.backend_idle_connections = cli.backend_idle_connections;
    cfg.backend_idle_timeout = cli.backend_idle_timeout;
    cfg.tcp_keepalive = cli.tcp_keepalive;
    cfg.backend_ca_file = cli.backend_ca_file;
    cfg.relay_ca_file = cli.relay_ca_file;
    cfg.rewrite_host = cli.rewrite_host;
    cfg.poll_deadline = cli.poll_deadline;
    cfg.drain_timeout = cli.drain_timeout;
    cfg.admin_listen = cli.admin_listen;
    relay_client::run(cfg, shutdown).await?;
    Ok(())
}

/// mimalloc: fewer instructions per request and less memory per idle tunnel than glibc's
/// allocator (`relay_config_file::allocator`).
#[global_allocator]
static GLOBAL: relay_config_file::allocator::Allocator = relay_config_file::allocator::Allocator;

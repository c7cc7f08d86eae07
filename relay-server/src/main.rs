use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use relay_server::{Secret, State, TokenScope};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod cli;
mod settings;

use cli::{Cli, Command, ParseError};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cli = match cli::parse(&args) {
        Ok(c) => c,
        Err(ParseError::Flags(e)) => e.exit(),
        Err(ParseError::File(e)) => {
            eprintln!("relay-server: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.take() {
        Some(Command::SignLink(link)) => {
            return match settings::sign_link(link, &cli) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("relay-server sign-link: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Completions { shell }) => {
            relay_config_file::manual::completions(
                <cli::Cli as clap::CommandFactory>::command(),
                shell,
            );
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            return match relay_config_file::manual::man(
                <cli::Cli as clap::CommandFactory>::command(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            };
        }
        Some(Command::CheckConfig { file }) => {
            return match settings::check_config(&file) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("relay-server check-config: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        None => {}
    }
    let otlp = relay_config_file::telemetry::Otlp::from_flags(
        cli.otlp_endpoint.as_deref(),
        "relay-server",
        cli.otlp_sample_ratio,
    );
    // Dropped after the runtime: the last spans are flushed on the way out.
    let _traces = match relay_config_file::logs::init(&cli.log, cli.log_format, otlp.as_ref()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("relay-server: {e}");
            return ExitCode::from(2);
        }
    };
    let say = relay_config_file::logs::Say::new(cli.log_format);
    // Before the runtime's threads allocate their heaps (see the function's doc).
    relay_config_file::allocator::no_huge_pages();
    let rt = match relay_config_file::runtime::build(cli.worker_threads, "relay-server", cli.spin) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay-server: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let error = format!("{e:#}");
            say.error(
                &format!("relay-server: {error}"),
                "relay-server stopped",
                &[("error", error)],
            );
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli, args: Vec<OsString>) -> anyhow::Result<()> {
    // Watch state taken before anything is announced, so no change or SIGHUP after the
    // "listening" line is missed.
    let reload = match relay_config_file::config_path(&args, "RELAY_CONFIG") {
        Some(path) => {
            let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("installing the SIGHUP handler")?;
            let seen = mtime(&path);
            Some(Watch {
                path,
                hup,
                seen,
                generated: None,
            })
        }
        None => None,
    };
    let say = relay_config_file::logs::Say::new(cli.log_format);
    let mut cfg = settings::build_config(&cli)?;
    let scheme = if cli.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let generated = cfg
        .agent_tokens
        .is_empty()
        .then(|| relay_common::id::random_hex(24));
    if let Some(token) = &generated {
        cfg.agent_tokens
            .push((TokenScope::Any, Secret(token.clone())));
    }
    // Checked before binding: a refused configuration never listens.
    if let Some(warning) = cfg.validate(cli.listen, cli.allow_open)? {
        tracing::warn!("{warning}");
    }
    let listener = bind(cli.listen).await?;
    let addr = listener.local_addr()?;
    let agent_listener = bind_optional(cli.agent_listen).await?;
    let agent_addr = match &agent_listener {
        Some(l) => l.local_addr()?,
        None => addr,
    };
    announce(&say, scheme, addr, agent_addr, generated.as_deref());

    let shutdown = CancellationToken::new();
    tokio::spawn(relay_common::signal::cancel_on_signal(shutdown.clone()));
    if agent_listener.is_some() {
        let url = format!("{scheme}://{agent_addr}");
        say.info(
            &format!("relay-server agent endpoints on {url}"),
            "relay-server agent endpoints",
            &[("address", url)],
        );
    }
    let cluster_listener = bind_cluster(&say, cli.cluster_listen, &mut cfg).await?;
    let state = Arc::new(State::new(cfg));
    if let Some(c) = &state.cluster {
        let tag = format!("{:08x}", c.tag());
        say.info(
            &format!(
                "relay-server cluster replica {tag} advertised as {}",
                c.advertise_url()
            ),
            "relay-server cluster replica",
            &[
                ("replica", tag),
                ("advertised", c.advertise_url().to_owned()),
            ],
        );
    }
    if let Some(mut watch) = reload {
        watch.generated = generated;
        tokio::spawn(reload_loop(state.clone(), args, watch, shutdown.clone()));
    }
    let admin_listener = bind_optional(cli.admin_listen).await?;
    if let Some(l) = &admin_listener {
        let url = format!("http://{}", l.local_addr()?);
        say.info(
            &format!("relay-server admin endpoints on {url}"),
            "relay-server admin endpoints",
            &[("address", url)],
        );
    }
    let listeners = relay_server::Listeners {
        public: listener,
        agent: agent_listener,
        admin: admin_listener,
        cluster: cluster_listener,
    };
    relay_server::serve_faces(listeners, state, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    // A queue of 1 024 connections not yet accepted, not tokio's 128 (relay_config_file::listen).
    relay_config_file::listen::bind(addr).with_context(|| format!("binding {addr}"))
}

async fn bind_optional(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(bind(a).await?)),
        None => Ok(None),
    }
}

/// The listening line and, with a generated token, the agent command to paste. The token
/// is printed once, on stdout, for the operator to copy; never logged.
fn announce(
    say: &relay_config_file::logs::Say,
    scheme: &str,
    addr: SocketAddr,
    agent_addr: SocketAddr,
    generated: Option<&str>,
) {
    let url = format!("{scheme}://{addr}");
    say.info(
        &format!("relay-server listening on {url}"),
        "relay-server listening",
        &[("address", url.clone())],
    );
    if let Some(token) = generated {
        let command = format!(
            "relay-client --relay-url {scheme}://{agent_addr} --name NAME --backend-url http://127.0.0.1:8000 --token {token}"
        );
        let open = format!("{url}/client/NAME/");
        say.info(
            &format!(
                "no agent token configured; generated one for this run (serves any name):\n\n  {command}\n\nthen open {open}"
            ),
            "no agent token configured; generated one for this run (serves any name)",
            &[("agent_command", command), ("open", open)],
        );
    }
}

/// The cluster listener (cluster mode), and the advertised URL derived from it when none
/// was given.
async fn bind_cluster(
    say: &relay_config_file::logs::Say,
    addr: Option<SocketAddr>,
    cfg: &mut relay_server::Config,
) -> anyhow::Result<Option<TcpListener>> {
    let (Some(a), Some(c)) = (addr, cfg.cluster.as_mut()) else {
        return Ok(None);
    };
    let l = bind(a).await?;
    let bound = l.local_addr()?;
    if c.advertise_url.is_empty() {
        if bound.ip().is_unspecified() {
            anyhow::bail!(
                "--cluster-listen {a} is a wildcard address: set --advertise-url to \
                 the URL other replicas reach this one at"
            );
        }
        let scheme = if c.tls.is_some() { "https" } else { "http" };
        c.advertise_url = format!("{scheme}://{bound}");
    }
    let scheme = if c.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{bound}");
    say.info(
        &format!("relay-server cluster endpoints on {url}"),
        "relay-server cluster endpoints",
        &[("address", url)],
    );
    Ok(Some(l))
}

fn mtime(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// What the reload loop watches.
struct Watch {
    path: std::path::PathBuf,
    hup: tokio::signal::unix::Signal,
    seen: Option<std::time::SystemTime>,
    /// The agent token generated at start (no token configured then). It is the only token
    /// a reload keeps when the new configuration has none: a token that left the file is
    /// revoked.
    generated: Option<String>,
}

/// Reloads tokens, access rules and certificates on SIGHUP and when the config file
/// changes; a file that does not parse or validate is refused and the running settings stay.
async fn reload_loop(
    state: Arc<State>,
    args: Vec<OsString>,
    mut w: Watch,
    stop: CancellationToken,
) {
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = w.hup.recv() => "SIGHUP",
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = mtime(&w.path);
                if now == w.seen {
                    continue;
                }
                w.seen = now;
                "file changed"
            }
        };
        match reloaded(&state, &args, w.generated.as_deref()) {
            Ok(()) => {
                tracing::info!(reason = why, file = %w.path.display(), "configuration reloaded")
            }
            Err(e) => tracing::error!(
                reason = why,
                error = %format!("{e:#}"),
                "configuration reload refused; the running configuration stays"
            ),
        }
    }
}

fn reloaded(state: &State, args: &[OsString], generated: Option<&str>) -> anyhow::Result<()> {
    let cli = cli::parse(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = settings::build_config(&cli)?;
    if let (true, Some(token)) = (cfg.agent_tokens.is_empty(), generated) {
        cfg.agent_tokens
            .push((TokenScope::Any, Secret(token.to_owned())));
    }
    cfg.validate(cli.listen, cli.allow_open)?;
    let fixed = state.reload(&cfg).context("applying")?;
    if !fixed.is_empty() {
        tracing::warn!(
            settings = fixed.join(", "),
            "these settings changed but take effect only after a restart"
        );
    }
    Ok(())
}

/// mimalloc: fewer instructions per request and less memory per idle tunnel than glibc's
/// allocator (`relay_config_file::allocator`).
#[global_allocator]
static GLOBAL: relay_config_file::allocator::Allocator = relay_config_file::allocator::Allocator;

//! What the load is sent through: the backend directly, this relay (the real binaries), and
//! the established tunnels rathole and bore, installed into a local folder when missing
//! (`peers`), and nginx and HAProxy as reverse proxies (`proxies`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use relay_tests::procs::{Proc, TempDir};

use crate::load::Target;

mod peers;
mod proxies;
mod relay;

pub use peers::{bore, rathole};
pub use proxies::{haproxy, nginx};
pub use relay::{cluster, relay, TOKEN};

/// A release binary of the workspace, next to this one (the bench builds them first).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let path = exe.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build --release --workspace first",
        path.display()
    );
    path
}

/// The relay processes' log filter: `warn`, or `RELAY_BENCH_LOG` (e.g. `debug` to see what
/// happened to a request that failed; the output is printed when a scenario fails).
fn log_level() -> String {
    std::env::var("RELAY_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// A target ready for load: where HTTP goes, where the TCP service is, what keeps it up.
pub struct Running {
    /// Name in the table.
    pub name: &'static str,
    /// HTTP entry.
    pub http: Target,
    /// TCP service entry (sink/source).
    pub tcp: SocketAddr,
    /// HTTP/2 entry and the `X-Server-Name` it needs.
    pub h2: Option<(SocketAddr, Option<String>)>,
    /// The relay-server's process id (memory and CPU figures).
    pub server_pid: Option<u32>,
    /// The processes a request passes through between the user and the backend (the
    /// relay-server and the agent; a tunnel's server and client): their CPU time per
    /// request is reported beside the rates, the steadier measure on a machine whose rates
    /// move by tens of percent from day to day.
    pub relaying: Vec<u32>,
    /// A ruler measured only in the scenarios compared in turns (1, 2 and 7), not a target
    /// of its own: rathole without its Nagle stalls, nginx and HAProxy as reverse proxies.
    pub reference: bool,
    procs: Vec<Proc>,
    nginx: Option<proxies::NginxMaster>,
    _dir: Option<TempDir>,
    _secret: Option<relay_tests::cluster::Secret>,
}

impl Running {
    /// Prints the output of the target's processes to stderr: the last 200 lines of each,
    /// or all of it when `RELAY_BENCH_LOG` chose the log filter.
    pub fn dump_output(&mut self) {
        let keep = match std::env::var_os("RELAY_BENCH_LOG") {
            Some(_) => usize::MAX,
            None => 200,
        };
        for p in &mut self.procs {
            let lines = p.drain_output();
            eprintln!(
                "--- output of process {} ({} lines)",
                p.child.id(),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(keep)..] {
                eprintln!("| {l}");
            }
        }
        // nginx writes its log to a file, not to its output.
        if let Some(n) = &self.nginx {
            let log = n.error_log();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} ({} lines)", log.display(), lines.len());
            for l in &lines[lines.len().saturating_sub(keep)..] {
                eprintln!("| {l}");
            }
        }
    }
}

/// The backend process: its HTTP and TCP addresses.
pub struct Backend {
    /// HTTP (h1 and h2c).
    pub http: SocketAddr,
    /// TCP sink/source.
    pub tcp: SocketAddr,
    _proc: Proc,
}

/// Where a [`Backend`] listens (what the targets need of it, free to share between threads).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// HTTP (h1 and h2c).
    pub http: SocketAddr,
    /// TCP sink/source.
    pub tcp: SocketAddr,
}

impl Backend {
    /// Where it listens.
    pub fn addrs(&self) -> Addrs {
        Addrs {
            http: self.http,
            tcp: self.tcp,
        }
    }
}

fn addr_after(p: &mut Proc, prefix: &str) -> anyhow::Result<SocketAddr> {
    let line = p.wait_line(prefix);
    line.rsplit([' ', '/'])
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .with_context(|| format!("no address in {line:?}"))
}

/// Starts the backend (this executable, `backend` subcommand) in its own process.
pub fn backend() -> anyhow::Result<Backend> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("backend");
    let mut p = Proc::spawn(cmd);
    let http = addr_after(&mut p, "http ")?;
    let tcp = addr_after(&mut p, "tcp ")?;
    Ok(Backend {
        http,
        tcp,
        _proc: p,
    })
}

/// The backend itself.
pub fn direct(b: &Backend) -> Running {
    Running {
        name: "direct",
        http: Target {
            addr: b.http,
            prefix: String::new(),
            tls: None,
        },
        tcp: b.tcp,
        h2: Some((b.http, None)),
        server_pid: None,
        relaying: Vec::new(),
        reference: false,
        procs: Vec::new(),
        nginx: None,
        _dir: None,
        _secret: None,
    }
}

/// Waits until a GET through `t` succeeds (agents and tunnels connect in the background).
fn wait_http(t: &Target) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    rt.block_on(async {
        loop {
            if crate::load::download(t, 2, Duration::ZERO).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}{} never answered", t.addr, t.prefix);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

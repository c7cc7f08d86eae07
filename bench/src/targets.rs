//! What the load is sent through: the backend directly, this relay (the real binaries), and
//! the established tunnels rathole and bore, installed into a local folder when missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use relay_tests::procs::{Proc, TempDir};

use crate::load::Target;

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
    procs: Vec<Proc>,
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
        procs: Vec::new(),
        _dir: None,
        _secret: None,
    }
}

/// The agent token of the benchmark relay.
pub const TOKEN: &str = "bench-token-0123456789abcdef";

/// relay-server and relay-client (the release binaries next to this one), with the TCP
/// service as a service port reached through `relay-client connect`.
pub fn relay(b: Addrs) -> anyhow::Result<Running> {
    let mut server = Proc::spawn({
        let mut c = Command::new(binary("relay-server"));
        c.args(["--listen", "127.0.0.1:0", "--agent-token"])
            .arg(format!("*={TOKEN}"))
            // The load (and the idle scenario's thousands of tunnels) comes from one address,
            // and the burst scenario parks 10 000 requests for one name at once (the
            // defaults refuse more than 1 000 per name with 503).
            .args(["--max-connections-per-ip", "1000000", "--log", &log_level()])
            .args(["--max-tunnels-per-ip", "1000000"])
            .args(["--max-parked-per-name", "20000", "--max-parked", "20000"]);
        c
    });
    let addr = addr_after(&mut server, "relay-server listening on http://")?;
    let url = format!("http://{addr}");
    let (agent, connect, tcp) = agent_and_entry(b, &url, TOKEN, &url)?;
    let http = Target {
        addr,
        prefix: "/client/bench".into(),
        tls: None,
    };
    wait_http(&http)?;
    Ok(Running {
        name: "relay",
        http,
        tcp,
        h2: Some((addr, Some("bench".into()))),
        server_pid: Some(server.child.id()),
        relaying: vec![server.child.id(), agent.child.id()],
        procs: vec![server, agent, connect],
        _dir: None,
        _secret: None,
    })
}

/// The agent `bench` on `agent_relay` (the backend, and the TCP service as service port
/// `sink`) and a `relay-client connect` entry for that service through `entry_relay`; the
/// entry's TCP address.
fn agent_and_entry(
    b: Addrs,
    agent_relay: &str,
    token: &str,
    entry_relay: &str,
) -> anyhow::Result<(Proc, Proc, SocketAddr)> {
    let agent = Proc::spawn({
        let mut c = Command::new(binary("relay-client"));
        c.args([
            "--relay-url",
            agent_relay,
            "--name",
            "bench",
            "--token",
            token,
        ])
        .arg("--backend-url")
        .arg(format!("http://{}", b.http))
        .arg("--service")
        .arg(format!("sink={}", b.tcp))
        // Every idle tunnel of scenario 5 is an exchange in flight.
        .args(["--max-in-flight", "20000", "--log", &log_level()]);
        c
    });
    let mut connect = Proc::spawn({
        let mut c = Command::new(binary("relay-client"));
        c.args(["connect", "--relay-url", entry_relay]).args([
            "--name",
            "bench",
            "--app",
            "sink",
            "--listen",
            "127.0.0.1:0",
        ]);
        c
    });
    let tcp = addr_after(&mut connect, "relay-client connect listening on")?;
    Ok((agent, connect, tcp))
}

/// Three relay-server replicas in cluster mode on a real redis-server; the agent serves from
/// replica 0 and every request (HTTP, HTTP/2, the tunnel) enters at replica 1, so each one
/// takes the internal hop: the worst case of a balancer that ignores where agents are.
pub fn cluster(b: &Backend) -> anyhow::Result<Running> {
    use relay_tests::cluster::{replica, Redis, Secret};
    let mut redis = Redis::start();
    let secret = Secret::new();
    let flags = [
        "--max-connections-per-ip",
        "1000000",
        "--max-tunnels-per-ip",
        "1000000",
        "--max-parked-per-name",
        "20000",
        "--max-parked",
        "20000",
    ];
    let mut r: Vec<_> = (0..3).map(|_| replica(&redis, &secret, &flags)).collect();
    let home = r[0].url();
    let entry = r[1].public;
    // The replicas take the test harness's agent token.
    let (agent, connect, tcp) = agent_and_entry(
        b.addrs(),
        &home,
        relay_tests::TOKEN,
        &format!("http://{entry}"),
    )?;
    let http = Target {
        addr: entry,
        prefix: "/client/bench".into(),
        tls: None,
    };
    wait_http(&http)?;
    // The agent and the replicas (a request may pass two of them); not redis.
    let mut relaying = vec![agent.child.id()];
    relaying.extend(r.iter().map(|x| x.proc.child.id()));
    let mut procs = vec![agent, connect];
    procs.extend(redis.proc.take());
    procs.extend(r.drain(..).map(|x| x.proc));
    Ok(Running {
        name: "cluster",
        http,
        tcp,
        h2: Some((entry, Some("bench".into()))),
        server_pid: None,
        relaying,
        procs,
        _dir: None,
        _secret: Some(secret),
    })
}

/// A free loopback port (bound and released; fine for a benchmark, not for tests).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// rathole: one server, one client, two services (HTTP backend and TCP service); with
/// `nodelay` (the [`crate::tools::nodelay_shim`]) preloaded into both, named `rathole-nodelay`.
pub fn rathole(b: &Backend, exe: &Path, nodelay: Option<&Path>) -> anyhow::Result<Running> {
    let dir = TempDir::new("bench-rathole");
    let (control, http_port, tcp_port) = (free_port()?, free_port()?, free_port()?);
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"{TOKEN}\"\n\
         [server.services.http]\nbind_addr = \"127.0.0.1:{http_port}\"\n\
         [server.services.tcp]\nbind_addr = \"127.0.0.1:{tcp_port}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"{TOKEN}\"\n\
         [client.services.http]\nlocal_addr = \"{}\"\n[client.services.tcp]\nlocal_addr = \"{}\"\n",
        b.http, b.tcp
    );
    std::fs::write(dir.0.join("server.toml"), server)?;
    std::fs::write(dir.0.join("client.toml"), client)?;
    let spawn = |mode: &str, file: &str| {
        let mut c = Command::new(exe);
        c.arg(mode).arg(dir.0.join(file)).env("RUST_LOG", "warn");
        if let Some(lib) = nodelay {
            c.env("LD_PRELOAD", lib);
        }
        Proc::spawn(c)
    };
    let s = spawn("--server", "server.toml");
    let c = spawn("--client", "client.toml");
    let http = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
        prefix: String::new(),
        tls: None,
    };
    wait_http(&http)?;
    Ok(Running {
        name: if nodelay.is_some() {
            "rathole-nodelay"
        } else {
            "rathole"
        },
        http: http.clone(),
        tcp: SocketAddr::from(([127, 0, 0, 1], tcp_port)),
        h2: Some((http.addr, None)),
        server_pid: None,
        relaying: vec![s.child.id(), c.child.id()],
        procs: vec![s, c],
        _dir: Some(dir),
        _secret: None,
    })
}

/// bore: one server (control port 7835 on loopback) and one `bore local` per service.
pub fn bore(b: &Backend, exe: &Path) -> anyhow::Result<Running> {
    let mut server = Proc::spawn({
        let mut c = Command::new(exe);
        c.args(["server", "--min-port", "40000", "--max-port", "40999"])
            .args(["--bind-addr", "127.0.0.1"]);
        c
    });
    server.wait_line("server listening");
    let local = |port: u16| -> anyhow::Result<(Proc, SocketAddr)> {
        let mut p = Proc::spawn({
            let mut c = Command::new(exe);
            c.args(["local", &port.to_string(), "--to", "127.0.0.1"])
                .args(["--local-host", "127.0.0.1"]);
            c
        });
        let line = p.wait_line("listening at");
        let port: u16 = line
            .rsplit(':')
            .next()
            .and_then(|p| {
                p.trim()
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no port in {line:?}"))?;
        Ok((p, SocketAddr::from(([127, 0, 0, 1], port))))
    };
    let (h, http_addr) = local(b.http.port())?;
    let (t, tcp) = local(b.tcp.port())?;
    let http = Target {
        addr: http_addr,
        prefix: String::new(),
        tls: None,
    };
    wait_http(&http)?;
    Ok(Running {
        name: "bore",
        http,
        tcp,
        h2: Some((http_addr, None)),
        server_pid: None,
        // The server and the `bore local` of the HTTP service.
        relaying: vec![server.child.id(), h.child.id()],
        procs: vec![server, h, t],
        _dir: None,
        _secret: None,
    })
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

//! The parties of a soak run: the relay-server (or two replicas sharing a Redis in cluster
//! mode) and the relay-client binaries (so they can be killed and restarted), the backends,
//! and the fault proxies on the agent and user links.

use std::net::SocketAddr;
use std::process::Command;

use relay_tests::cluster::{Redis, Secret};
use relay_tests::procs::{binary, Proc};

use crate::backend::Backend;
use crate::proxy::FaultProxy;

/// The backend names agents serve: HTTP (with a TCP echo as a service port) and a
/// WebSocket echo.
pub const HTTP_NAME: &str = "soak";
/// The WebSocket echo's name.
pub const WS_NAME: &str = "soak-ws";
/// The service port of the HTTP agent: a TCP echo.
pub const ECHO_APP: &str = "echo";

/// One agent process and how to start it again.
pub struct AgentProc {
    args: Vec<String>,
    /// The process.
    pub proc: Proc,
}

/// Cluster mode's shared parts.
pub struct Cluster {
    /// The replicas' directory.
    pub redis: Redis,
    secret: Secret,
}

/// Everything a soak run drives.
pub struct World {
    /// The relay-server replicas (one outside cluster mode).
    pub servers: Vec<Proc>,
    /// Their public addresses (fixed across restarts).
    pub server_addrs: Vec<SocketAddr>,
    /// Redis and the cluster secret, in cluster mode.
    pub cluster: Option<Cluster>,
    /// The agents.
    pub agents: Vec<AgentProc>,
    /// The proxies agents reach each server through.
    pub agent_links: Vec<FaultProxy>,
    /// The proxy users reach the servers through (round-robin over the replicas).
    pub user_link: FaultProxy,
    /// The HTTP backend (checks uploads itself).
    pub backend: Backend,
}

impl World {
    /// Starts the server(s), the backends, the proxies and the agents: the HTTP agent
    /// reaches every replica, the WebSocket one only the first (so requests for it that
    /// land on another replica are forwarded between replicas).
    pub async fn start(replicas: usize) -> World {
        let cluster = (replicas > 1).then(|| Cluster {
            redis: Redis::start(),
            secret: Secret::new(),
        });
        let server_addrs: Vec<SocketAddr> = (0..replicas)
            .map(|_| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                SocketAddr::from(([127, 0, 0, 1], port))
            })
            .collect();
        let servers = server_addrs
            .iter()
            .map(|a| start_server(*a, cluster.as_ref()))
            .collect();
        let backend = Backend::start().await;
        let ws = relay_tests::websocket_echo().await;
        let echo = relay_tests::tcp_echo(b"").await;
        let mut agent_links = Vec::new();
        for a in &server_addrs {
            agent_links.push(FaultProxy::start(*a).await);
        }
        let user_link = FaultProxy::start_to(server_addrs.clone()).await;
        let urls: Vec<String> = agent_links
            .iter()
            .map(|l| format!("http://{}", l.addr))
            .collect();
        let mut http = agent_args(HTTP_NAME, &format!("http://{}", backend.addr), &urls);
        http.extend(["--service".into(), format!("{ECHO_APP}={echo}")]);
        let ws = agent_args(WS_NAME, &format!("http://{ws}"), &urls[..1]);
        let agents = [http, ws]
            .into_iter()
            .map(|args| AgentProc {
                proc: start_agent(&args),
                args,
            })
            .collect();
        World {
            servers,
            server_addrs,
            cluster,
            agents,
            agent_links,
            user_link,
            backend,
        }
    }

    /// SIGKILLs agent `i` and starts it again.
    pub fn restart_agent(&mut self, i: usize) {
        let a = &mut self.agents[i];
        let _ = a.proc.child.kill();
        let _ = a.proc.child.wait();
        a.proc = start_agent(&a.args);
    }

    /// SIGKILLs server `i` and starts it again on the same address.
    pub fn restart_server(&mut self, i: usize) {
        let s = &mut self.servers[i];
        let _ = s.child.kill();
        let _ = s.child.wait();
        *s = start_server(self.server_addrs[i], self.cluster.as_ref());
    }

    /// Kills Redis and starts it again, empty (cluster mode).
    pub fn restart_redis(&mut self) {
        if let Some(c) = &mut self.cluster {
            c.redis.stop();
            c.redis.restart();
        }
    }

    /// The process ids measured: the servers and every agent.
    pub fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        (
            self.servers.iter().map(|p| p.child.id()).collect(),
            self.agents.iter().map(|a| a.proc.child.id()).collect(),
        )
    }
}

fn start_server(addr: SocketAddr, cluster: Option<&Cluster>) -> Proc {
    let mut cmd = Command::new(binary("relay-server"));
    cmd.args(["--listen", &addr.to_string()])
        .args(["--agent-token", &format!("*={}", relay_tests::TOKEN)])
        // Waiting chunks of users who stop reading are cut sooner than in production, so
        // a run sees the cut-off work.
        .args(["--user-write-timeout", "20s"])
        // Every user of the run comes from 127.0.0.1 (through the user link), where real
        // users would come from many addresses.
        .args(["--max-connections-per-ip", "100000"])
        .args(["--max-tunnels-per-ip", "100000"])
        .env("RELAY_LOG", log_level());
    if let Some(c) = cluster {
        cmd.args(["--cluster-redis", &c.redis.url()])
            .args(["--cluster-listen", "127.0.0.1:0"])
            .arg("--cluster-secret-file")
            .arg(&c.secret.path);
    }
    let mut p = Proc::spawn(cmd);
    p.wait_line("relay-server listening on");
    p
}

fn agent_args(name: &str, backend: &str, relays: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    for r in relays {
        args.extend(["--relay-url".into(), r.clone()]);
    }
    args.extend(
        [
            "--name",
            name,
            "--backend-url",
            backend,
            "--token",
            relay_tests::TOKEN,
            // A black-holed link is noticed within this (the default is 45 s).
            "--poll-deadline",
            "8s",
        ]
        .map(String::from),
    );
    args
}

fn start_agent(args: &[String]) -> Proc {
    let mut cmd = Command::new(binary("relay-client"));
    cmd.args(args).env("RELAY_LOG", log_level());
    Proc::spawn(cmd)
}

/// The processes' log level: `RELAY_SOAK_LOG`, or warnings only.
fn log_level() -> String {
    std::env::var("RELAY_SOAK_LOG").unwrap_or_else(|_| "warn".into())
}

/// Open descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

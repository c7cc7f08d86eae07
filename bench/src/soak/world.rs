//! The parties of a soak run: the relay-server and relay-client binaries (so they can be
//! killed and restarted), the backends, and the fault proxies on the agent and user links.

use std::net::SocketAddr;
use std::process::Command;

use relay_tests::procs::{binary, Proc};

use crate::backend::Backend;
use crate::proxy::FaultProxy;

/// The backend names agents serve: HTTP and a WebSocket echo.
pub const HTTP_NAME: &str = "soak";
/// The WebSocket echo's name.
pub const WS_NAME: &str = "soak-ws";

/// Everything a soak run drives.
pub struct World {
    /// The relay-server.
    pub server: Proc,
    /// Its public address (fixed across restarts).
    pub server_addr: SocketAddr,
    /// Agents: (name, backend URL, process).
    pub agents: Vec<(String, String, Proc)>,
    /// The proxy agents reach the server through.
    pub agent_link: FaultProxy,
    /// The proxy users reach the server through.
    pub user_link: FaultProxy,
    /// The HTTP backend (checks uploads itself).
    pub backend: Backend,
}

impl World {
    /// Starts the server, the backends, the proxies and one agent per name.
    pub async fn start() -> World {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = start_server(server_addr);
        let backend = Backend::start().await;
        let ws = relay_tests::websocket_echo().await;
        let agent_link = FaultProxy::start(server_addr).await;
        let user_link = FaultProxy::start(server_addr).await;
        let mut world = World {
            server,
            server_addr,
            agents: Vec::new(),
            agent_link,
            user_link,
            backend,
        };
        for (name, url) in [
            (HTTP_NAME, format!("http://{}", world.backend.addr)),
            (WS_NAME, format!("http://{ws}")),
        ] {
            let p = start_agent(world.agent_link.addr, name, &url);
            world.agents.push((name.to_owned(), url, p));
        }
        world
    }

    /// SIGKILLs agent `i` and starts it again.
    pub fn restart_agent(&mut self, i: usize) {
        let (name, url, old) = &mut self.agents[i];
        let _ = old.child.kill();
        let _ = old.child.wait();
        *old = start_agent(self.agent_link.addr, name, url);
    }

    /// SIGKILLs the server and starts it again on the same address.
    pub fn restart_server(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        self.server = start_server(self.server_addr);
    }

    /// The process ids measured: the server and every agent.
    pub fn pids(&self) -> (u32, Vec<u32>) {
        (
            self.server.child.id(),
            self.agents.iter().map(|(_, _, p)| p.child.id()).collect(),
        )
    }
}

fn start_server(addr: SocketAddr) -> Proc {
    let mut cmd = Command::new(binary("relay-server"));
    cmd.args(["--listen", &addr.to_string()])
        .args(["--agent-token", &format!("*={}", relay_tests::TOKEN)])
        // Waiting chunks of users who stop reading are cut sooner than in production, so
        // a run sees the cut-off work.
        .args(["--user-write-timeout", "20s"])
        .env("RELAY_LOG", "warn");
    let mut p = Proc::spawn(cmd);
    p.wait_line("relay-server listening on");
    p
}

fn start_agent(relay: SocketAddr, name: &str, backend: &str) -> Proc {
    let mut cmd = Command::new(binary("relay-client"));
    cmd.args(["--relay-url", &format!("http://{relay}")])
        .args(["--name", name, "--backend-url", backend])
        .args(["--token", relay_tests::TOKEN])
        // A black-holed link is noticed within this (the default is 45 s).
        .args(["--poll-deadline", "8s"])
        .env("RELAY_LOG", "warn");
    Proc::spawn(cmd)
}

/// Open descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

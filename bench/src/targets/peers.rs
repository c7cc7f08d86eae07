//! The established tunnels the relay is compared with (rathole, bore), installed by
//! [`crate::tools`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use relay_tests::procs::{Proc, TempDir};

use super::{wait_http, Backend, Running};
use crate::load::Target;
use crate::targets::relay::TOKEN;

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
        reference: nodelay.is_some(),
        nginx: None,
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
        reference: false,
        nginx: None,
        procs: vec![server, h, t],
        _dir: None,
        _secret: None,
    })
}

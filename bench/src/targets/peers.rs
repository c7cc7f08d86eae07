//! The established tunnels the relay is compared with (rathole, bore), installed by
//! [`crate::tools`], and nginx as an HTTP reverse proxy: the rulers of the benchmark.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// nginx as an HTTP reverse proxy in front of the backend: what a proxy that ends each
/// request and makes its own to the backend does on the same machine, the kind of work the
/// relay does (it reads every request to route and authorize it), where rathole and bore
/// pass bytes. HTTP/1.1 on one port and HTTP/2 with prior knowledge on another (nginx 1.22
/// serves only HTTP/2 on a port marked `http2` without TLS); HTTP/1.1 keep-alive
/// connections to the backend, as nginx's documentation sets them up (`keepalive`,
/// `proxy_http_version 1.1`, an empty `Connection`). Its workers are `auto`, one per core,
/// as deployed. Run as a reference (`Running::reference`); needs Debian's `nginx`.
pub fn nginx(b: &Backend) -> anyhow::Result<Running> {
    let exe = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context(
            "nginx is not installed (Debian's package `nginx`; --no-peers leaves the peers out)",
        )?;
    let dir = TempDir::new("bench-nginx");
    // Sockets bound here and handed over (nginx's `NGINX` inherited sockets, as the tests'
    // nginx gets its one), not ports guessed free: the smoke run shares the machine with
    // the other tests, and a port released for nginx to bind could be taken in between.
    let listeners = [
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
    ];
    // Non-blocking, as nginx's own listening sockets are (the flag belongs to the socket and
    // passes to nginx): every worker waits on both sockets, all of them wake for a new
    // connection, and a worker that lost the race to a blocking `accept` would wait there
    // for the next connection, with the requests of the connections it holds unanswered.
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let (h1, h2) = (listeners[0].local_addr()?, listeners[1].local_addr()?);
    let d = dir.0.display();
    // `auto` spelled out: the workers are counted below.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // nginx closes a user's connection after 1 000 requests and a kept backend connection
    // after 1 000 by default (`keepalive_requests`), which the other targets do not do.
    let conf = format!(
        "daemon off;\nworker_processes {workers};\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000000;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream backend {{ server {}; keepalive 256; keepalive_requests 1000000000; }}\n\
           server {{\n    listen {h1};\n    listen {h2} http2;\n\
             location / {{ proxy_pass http://backend; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        b.http
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut c = Command::new(exe);
    c.arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.0.join("error.log")); // NginxMaster::error_log
    let fds = listeners.each_ref().map(|l| l.as_raw_fd());
    c.env("NGINX", format!("{};{};", fds[0], fds[1]));
    // SAFETY: between fork and exec the child only calls fcntl (async-signal-safe) on two
    // descriptors it inherited, so that they survive the exec (std opens them close-on-exec).
    unsafe {
        c.pre_exec(move || {
            for fd in fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let master = NginxMaster {
        proc: Proc::spawn(c),
        exe,
        conf: conf_path,
    };
    // nginx holds the sockets now; connections wait in their backlog until it serves.
    drop(listeners);
    let http = Target {
        addr: h1,
        prefix: String::new(),
        tls: None,
    };
    wait_http(&http)
        .with_context(|| std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default())?;
    // The workers relay (the master only starts them); the first one answering does not
    // mean the master has forked the last.
    let pid = master.proc.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut relaying = crate::procfs::children(pid);
    while relaying.len() < workers {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nginx started {relaying:?} of {workers} workers"
        );
        std::thread::sleep(Duration::from_millis(20));
        relaying = crate::procfs::children(pid);
    }
    relaying.push(pid);
    Ok(Running {
        name: "nginx",
        http,
        // Never measured: nginx is a ruler for the HTTP rates only (scenarios 1, 2 and 7).
        tcp: b.tcp,
        h2: Some((h2, None)),
        server_pid: None,
        relaying,
        reference: true,
        nginx: Some(master),
        procs: Vec::new(),
        _dir: Some(dir),
        _secret: None,
    })
}

/// nginx's master process, stopped the nginx way when dropped: a SIGKILL to the master
/// would leave its workers running.
pub struct NginxMaster {
    proc: Proc,
    exe: &'static str,
    conf: std::path::PathBuf,
}

impl NginxMaster {
    /// Where nginx writes its log (`-e`, beside its configuration).
    pub fn error_log(&self) -> std::path::PathBuf {
        self.conf.with_file_name("error.log")
    }
}

impl Drop for NginxMaster {
    fn drop(&mut self) {
        let _ = Command::new(self.exe)
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.proc.child.wait();
    }
}

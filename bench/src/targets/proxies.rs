//! HTTP reverse proxies in front of the backend, the benchmark's rulers for the relay's
//! kind of work (`Running::reference`): nginx and HAProxy, each as Debian ships it.
//!
//! A proxy ends each request and makes its own to the backend, as the relay does (it
//! reads every request to route and authorize it), where rathole and bore pass bytes. Two
//! of them, because one proxy's figure says what that proxy costs, not what the work
//! costs: nginx serves HTTP/2 no faster than the relay, HAProxy much faster
//! (`docs/PERFORMANCE.md`, the thirty-second round).

use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use relay_tests::procs::{Proc, TempDir};

use super::{wait_http, Backend, Running};
use crate::load::Target;

/// The Debian binary `name` in /usr/sbin or /usr/bin.
fn installed(name: &str) -> anyhow::Result<&'static str> {
    let found = match name {
        "nginx" => ["/usr/sbin/nginx", "/usr/bin/nginx"],
        _ => ["/usr/sbin/haproxy", "/usr/bin/haproxy"],
    }
    .into_iter()
    .find(|p| Path::new(p).exists());
    found.with_context(|| {
        format!(
            "{name} is not installed (Debian's package `{name}`; --no-peers leaves the peers out)"
        )
    })
}

/// Two loopback listening sockets (HTTP/1.1, HTTP/2) bound here to be handed over to the
/// proxy, not ports guessed free: the smoke run shares the machine with the other tests,
/// and a port released for the proxy to bind could be taken in between.
fn listeners() -> anyhow::Result<[TcpListener; 2]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    // Non-blocking, as a proxy's own listening sockets are (the flag belongs to the socket
    // and passes to the proxy): every nginx worker waits on both sockets, all of them wake
    // for a new connection, and a worker that lost the race to a blocking `accept` would
    // wait there for the next connection, with the requests of the connections it holds
    // unanswered.
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    Ok(listeners)
}

/// Makes `listeners` survive the exec of `c` (std opens them close-on-exec); returns their
/// descriptors, which the child gets as they are.
fn inherit(c: &mut Command, listeners: &[TcpListener; 2]) -> [RawFd; 2] {
    let fds = listeners.each_ref().map(|l| l.as_raw_fd());
    // SAFETY: between fork and exec the child only calls fcntl (async-signal-safe) on two
    // descriptors it inherited.
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
    fds
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
    let exe = installed("nginx")?;
    let dir = TempDir::new("bench-nginx");
    let listeners = listeners()?;
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
    let fds = inherit(&mut c, &listeners);
    c.env("NGINX", format!("{};{};", fds[0], fds[1]));
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

/// HAProxy as an HTTP reverse proxy in front of the backend (the second ruler): HTTP/1.1 on
/// one socket and HTTP/2 with prior knowledge (`proto h2`) on another, both handed over
/// (`fd@`); one process with a thread per core (`nbthread`, its default), HTTP/1.1
/// keep-alive connections to the backend reused as it does by default (`http-reuse safe`).
/// Needs Debian's `haproxy`.
pub fn haproxy(b: &Backend) -> anyhow::Result<Running> {
    let exe = installed("haproxy")?;
    let dir = TempDir::new("bench-haproxy");
    let listeners = listeners()?;
    let (h1, h2) = (listeners[0].local_addr()?, listeners[1].local_addr()?);
    let mut c = Command::new(exe);
    let fds = inherit(&mut c, &listeners);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // HAProxy wants about two descriptors per connection it may hold and does not start
    // when that is past the open-file limit, so `maxconn` follows this process's limit (its
    // children's); the rates compared in turns use at most 64 connections.
    let maxconn = (crate::procfs::open_file_limit() / 2)
        .saturating_sub(64)
        .clamp(256, 4096);
    let conf = format!(
        "global\n  nbthread {threads}\n  maxconn {maxconn}\n\
         defaults\n  mode http\n  timeout connect 10s\n  timeout client 60s\n  timeout server 60s\n\
         frontend h1\n  bind fd@{}\n  default_backend b\n\
         frontend h2\n  bind fd@{} proto h2\n  default_backend b\n\
         backend b\n  server backend {}\n",
        fds[0], fds[1], b.http
    );
    let conf_path = dir.0.join("haproxy.cfg");
    std::fs::write(&conf_path, conf)?;
    // `-db`: in the foreground, one process, its messages on its output.
    c.arg("-db").arg("-f").arg(&conf_path);
    let mut proc = Proc::spawn(c);
    drop(listeners);
    let http = Target {
        addr: h1,
        prefix: String::new(),
        tls: None,
    };
    if let Err(e) = wait_http(&http) {
        return Err(e.context(proc.drain_output().join("\n")));
    }
    Ok(Running {
        name: "haproxy",
        http,
        // Never measured: HAProxy is a ruler for the HTTP rates only (scenarios 1, 2 and 7).
        tcp: b.tcp,
        h2: Some((h2, None)),
        server_pid: None,
        relaying: vec![proc.child.id()],
        reference: true,
        nginx: None,
        procs: vec![proc],
        _dir: Some(dir),
        _secret: None,
    })
}

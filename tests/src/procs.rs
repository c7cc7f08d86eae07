//! Out-of-process parties: the real relay binaries and nginx, with readiness read from their
//! output (never a sleep).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a workspace binary built next to the running test (`cargo build --release` or
/// the debug equivalent must have run; the test command does it).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Test binaries live in target/<profile>/deps, other executables (relay-bench) next to
    // the binaries.
    let here = exe.parent().unwrap();
    let path = if here.ends_with("deps") {
        here.parent().unwrap().join(name)
    } else {
        here.join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins, same profile as the tests)",
        path.display()
    );
    path
}

/// A child process whose output lines are collected; killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for r in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if std::env::var_os("RELAY_TEST_ECHO").is_some() {
                        eprintln!("| {line}");
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 60 s) for a line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        self.next_line(needle)
    }

    /// Waits (up to 60 s) for a line containing `needle` among lines not yet seen.
    pub fn next_line(&mut self, needle: &str) -> String {
        self.wait_any(&[needle])
    }

    /// Waits (up to 60 s) for a line, not yet seen, containing any of `needles`.
    pub fn wait_any(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().any(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needles:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a line containing `prefix` (ending in `http://` or `https://`) and parses
    /// the address that follows it.
    pub fn wait_addr(&mut self, prefix: &str) -> SocketAddr {
        let line = self.wait_line(prefix);
        line.rsplit("://")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no address in {line:?}"))
    }

    /// Every line seen so far plus whatever is still buffered (after the process ended,
    /// that is all of its output).
    pub fn drain_output(&mut self) -> Vec<String> {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        self.seen.clone()
    }

    /// Peak resident set size in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// The process's resident memory now (KiB).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the relay-server binary on 127.0.0.1:0 with `args`; returns it and its address.
pub fn relay_server(args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(binary("relay-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--agent-token",
        &format!("*={}", crate::TOKEN),
    ])
    .args(args)
    // RELAY_TEST_LOG=debug shows a failing test's server side (with RELAY_TEST_ECHO=1).
    .env(
        "RELAY_LOG",
        std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let mut p = Proc::spawn(cmd);
    let addr = p.wait_addr("relay-server listening on http://");
    (p, addr)
}

/// Starts the stand-in of the Go `http-relay-client` (`tests/stand-ins/`) for `name`,
/// presenting `token`, in front of `backend` (if any), polling `relay`.
pub fn go_relay_client(
    relay: SocketAddr,
    name: &str,
    token: &str,
    backend: Option<SocketAddr>,
    extra: &[&str],
) -> Proc {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("stand-ins/go_http_relay_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--relay_scheme", "http", "--backend_scheme", "http"])
        .args(["--relay_address", &relay.to_string()])
        .args(["--server_name", name, "--relay_token", token])
        .args(extra);
    if let Some(b) = backend {
        cmd.args(["--backend_address", &b.to_string()]);
    }
    Proc::spawn(cmd)
}

/// Starts the relay-client binary for `name`.
pub fn relay_client(relay: &str, name: &str, backend: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(binary("relay-client"));
    cmd.args([
        "--relay-url",
        relay,
        "--name",
        name,
        "--backend-url",
        backend,
        "--token",
        crate::TOKEN,
    ])
    .args(args)
    .env("RELAY_LOG", "info");
    Proc::spawn(cmd)
}

/// An nginx with Debian's defaults and only `proxy_pass` set, listening on a socket the
/// test bound itself (handed over through nginx's `NGINX` inherited-sockets variable, so
/// no port is guessed).
pub struct Nginx {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    conf: PathBuf,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "relay-test-{tag}-{}-{}",
            std::process::id(),
            relay_common::id::random_hex(4)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `text` to the file `name` in the directory; its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path of the nginx binary (the test command installs Debian's package).
pub fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nginx is not installed: run the README's test command, which installs it");
}

impl Nginx {
    /// nginx proxying everything to `upstream`.
    pub fn start(upstream: SocketAddr) -> Nginx {
        Nginx::start_with(upstream, "", "")
    }

    /// nginx configured for WebSocket as its documentation shows (HTTP/1.1 upstream,
    /// `Upgrade` and `Connection` passed on), defaults otherwise.
    pub fn start_websocket(upstream: SocketAddr) -> Nginx {
        Nginx::start_with(
            upstream,
            "map $http_upgrade $connection_upgrade { default upgrade; '' close; }\n",
            "proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
             proxy_set_header Connection $connection_upgrade;",
        )
    }

    /// nginx with `http_extra` in its `http` block and `location_extra` in its one location.
    pub fn start_with(upstream: SocketAddr, http_extra: &str, location_extra: &str) -> Nginx {
        let dir = TempDir::new("nginx");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let d = dir.0.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               {http_extra}\n\
               server {{\n    listen {addr};\n    location / {{ proxy_pass http://{upstream}; {location_extra} }}\n  }}\n}}\n"
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(nginx_binary());
        cmd.args([
            "-c",
            conf_path.to_str().unwrap(),
            "-e",
            &format!("{d}/error.log"),
        ])
        // The listening socket becomes the child's stdin (fd 0); nginx adopts it.
        .env("NGINX", "0;")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)));
        let mut proc = Proc::spawn(cmd);
        // The socket already listens (connections wait in its backlog); wait until nginx
        // has adopted it, which it logs to its error log.
        let log = dir.0.join("error.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("start worker process") {
                break;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("nginx exited with {status}: {text}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            proc,
            addr,
            conf: conf_path,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL on the master would orphan its worker; stop it the nginx way.
        let _ = Command::new(nginx_binary())
            .args(["-c", self.conf.to_str().unwrap(), "-s", "stop"])
            .stderr(Stdio::null())
            .status();
        let _ = self.proc.child.wait();
    }
}

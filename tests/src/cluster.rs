//! Cluster-mode parties: a real `redis-server` on a loopback port, relay-server replicas
//! (the binary) sharing it, and a round-robin TCP balancer in front of them.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::procs::{relay_server, Proc, TempDir};

/// A `redis-server` without persistence, on a port of its own.
pub struct Redis {
    /// The process (`None` while stopped).
    pub proc: Option<Proc>,
    /// Its port.
    pub port: u16,
}

impl Redis {
    /// Starts one on a free loopback port (another is tried if the port was taken between
    /// choosing and binding).
    pub fn start() -> Redis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(p) = Redis::spawn(port) {
                return Redis {
                    proc: Some(p),
                    port,
                };
            }
        }
        panic!("redis-server did not start on any of five ports");
    }

    fn spawn(port: u16) -> Option<Proc> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
        let mut p = Proc::spawn(cmd);
        let line = p.wait_any(&[
            "Ready to accept connections",
            "Could not create",
            "Address already in use",
        ]);
        line.contains("Ready").then_some(p)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (its data is gone, as after a crash without persistence).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.proc = Some(Redis::spawn(self.port).expect("redis-server restarts on its port"));
    }
}

/// One relay-server replica in cluster mode.
pub struct Replica {
    /// The process.
    pub proc: Proc,
    /// Users and agents.
    pub public: SocketAddr,
    /// Other replicas.
    pub cluster: SocketAddr,
    /// Its tag in the directory (8 hex digits).
    pub tag: String,
}

impl Replica {
    /// `http://public`.
    pub fn url(&self) -> String {
        format!("http://{}", self.public)
    }
}

/// The cluster secret file of a test (shared by its replicas).
pub struct Secret {
    /// The file.
    pub path: std::path::PathBuf,
    _dir: TempDir,
}

impl Secret {
    /// A fresh random secret in a file.
    pub fn new() -> Secret {
        let dir = TempDir::new("cluster");
        let path = dir.0.join("cluster-secret");
        std::fs::write(&path, relay_common::id::random_hex(32)).unwrap();
        Secret { path, _dir: dir }
    }
}

impl Default for Secret {
    fn default() -> Self {
        Secret::new()
    }
}

/// Starts a replica on `redis` with `extra` flags and waits until it is registered.
pub fn replica(redis: &Redis, secret: &Secret, extra: &[&str]) -> Replica {
    let mut args = vec![
        "--cluster-redis".to_owned(),
        redis.url(),
        "--cluster-listen".into(),
        "127.0.0.1:0".into(),
        "--cluster-secret-file".into(),
        secret.path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut proc, public) = relay_server(&args);
    let scheme = if extra.contains(&"--cluster-tls-cert") {
        "https"
    } else {
        "http"
    };
    let cluster = proc.wait_addr(&format!("relay-server cluster endpoints on {scheme}://"));
    let line = proc.wait_line("relay-server cluster replica ");
    let tag = line.split_whitespace().nth(3).unwrap().to_owned();
    proc.wait_line("cluster directory (Redis) reachable");
    Replica {
        proc,
        public,
        cluster,
        tag,
    }
}

/// A round-robin TCP balancer in front of `backends`: each connection goes to the next one
/// that accepts (a dead one is skipped, like a load balancer's health check would).
pub async fn balancer(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut user, _)) = listener.accept().await else {
                return;
            };
            let backends = backends.clone();
            let start = next.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                for i in 0..backends.len() {
                    let target = backends[(start + i) % backends.len()];
                    if let Ok(mut up) = TcpStream::connect(target).await {
                        let _ = up.set_nodelay(true);
                        let _ = user.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut user, &mut up).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

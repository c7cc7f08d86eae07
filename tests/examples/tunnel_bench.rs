//! Tunnel throughput and time to first byte, beside a direct TCP copy on the same machine.
//!
//! ```sh
//! cargo run --release -p relay-tests --example tunnel_bench            # 1 GiB each way
//! BENCH_MIB=64 cargo run --release -p relay-tests --example tunnel_bench
//! ```
//!
//! Everything runs in one process on loopback (relay-server, agent, `connect`), so the figures
//! include all hops sharing the machine's cores. The raw-upgrade row also pays for two plain
//! TCP forwarders of the harness itself (user side and backend side). Not part of the test
//! command.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const BLOCK: usize = 256 * 1024;

/// A TCP server: "sink" counts what it receives and reports it; "source" sends `bytes` and
/// closes.
async fn service(kind: &'static str, bytes: u64, done: mpsc::Sender<u64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let done = done.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; BLOCK];
                match kind {
                    "sink" => {
                        let mut n = 0u64;
                        while let Ok(k) = s.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                            if n >= bytes {
                                let _ = done.send(n).await;
                                n = 0;
                            }
                        }
                    }
                    "source" => {
                        let mut left = bytes;
                        while left > 0 {
                            let k = left.min(BLOCK as u64) as usize;
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            left -= k as u64;
                        }
                    }
                    _ => unreachable!("bug: unknown bench service {kind}"),
                }
            });
        }
    });
    addr
}

async fn upload(to: SocketAddr, bytes: u64, done: &mut mpsc::Receiver<u64>) -> f64 {
    let buf = vec![7u8; BLOCK];
    let start = Instant::now();
    let mut s = TcpStream::connect(to).await.unwrap();
    let _ = s.set_nodelay(true);
    let mut left = bytes;
    while left > 0 {
        let k = left.min(BLOCK as u64) as usize;
        s.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
    done.recv().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    drop(s);
    bytes as f64 / secs / 1e6
}

async fn download(from: SocketAddr, bytes: u64) -> f64 {
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    let mut s = TcpStream::connect(from).await.unwrap();
    let mut n = 0u64;
    while n < bytes {
        let k = s.read(&mut buf).await.unwrap();
        assert!(k > 0, "stream ended after {n} bytes");
        n += k as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// A backend that answers `Upgrade: bench` with 101 and then forwards to `service`; users
/// reach it with a raw upgrade through the relay (a generic 101 tunnel, no WebSocket).
async fn upgrading_backend(service: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                read_head(&mut s).await;
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: bench\r\n\r\n")
                    .await
                    .unwrap();
                let mut to = TcpStream::connect(service).await.unwrap();
                let _ = to.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut s, &mut to).await;
            });
        }
    });
    addr
}

async fn read_head(s: &mut TcpStream) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
}

/// A local listener whose connections become raw upgrades to `path` through the relay.
async fn upgrade_listener(relay: SocketAddr, path: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut local, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut up = TcpStream::connect(relay).await.unwrap();
                let _ = up.set_nodelay(true);
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bench\r\n\r\n");
                up.write_all(req.as_bytes()).await.unwrap();
                read_head(&mut up).await;
                let _ = tokio::io::copy_bidirectional(&mut local, &mut up).await;
            });
        }
    });
    addr
}

async fn connect_listener(server: &Server, app: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = relay_client::connect::ConnectConfig {
        relay_url: server.url().parse().unwrap(),
        name: "bench".into(),
        app: app.into(),
        kernel_id: None,
        user_token: None,
        relay_ca_file: None,
        tcp_keepalive: std::time::Duration::from_secs(30),
    };
    tokio::spawn(relay_client::connect::run(
        cfg,
        listener,
        CancellationToken::new(),
    ));
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib << 20;
    let (done_tx, mut done) = mpsc::channel(4);
    let sink = service("sink", bytes, done_tx.clone()).await;
    let source = service("source", bytes, done_tx.clone()).await;
    drop(done_tx);
    let echo = tcp_echo(b"").await;

    let server = Server::default().await;
    let mut cfg = Agent::config(&server.url(), "bench", "http://127.0.0.1:9");
    cfg.services = vec![
        ("sink".into(), sink.to_string()),
        ("source".into(), source.to_string()),
        ("echo".into(), echo.to_string()),
    ];
    let _agent = Agent::start(cfg);
    server.wait_agent("bench").await;
    let up_sink = upgrading_backend(sink).await;
    let up_source = upgrading_backend(source).await;
    let mut upgrade_agents = Vec::new();
    for (name, addr) in [("usink", up_sink), ("usource", up_source)] {
        upgrade_agents.push(Agent::start(Agent::config(
            &server.url(),
            name,
            &format!("http://{addr}"),
        )));
        server.wait_agent(name).await;
    }
    let raw_sink = upgrade_listener(server.addr, "/client/usink/").await;
    let raw_source = upgrade_listener(server.addr, "/client/usource/").await;
    let via_sink = connect_listener(&server, "sink").await;
    let via_source = connect_listener(&server, "source").await;
    let via_echo = connect_listener(&server, "echo").await;

    println!("{mib} MiB each way, MB/s (10^6 bytes per second)");
    let d_up = upload(sink, bytes, &mut done).await;
    let d_down = download(source, bytes).await;
    println!("direct TCP                    up {d_up:9.1}  down {d_down:9.1}");
    let r_up = upload(via_sink, bytes, &mut done).await;
    let r_down = download(via_source, bytes).await;
    println!(
        "connect → relay → agent       up {r_up:9.1}  down {r_down:9.1}   ({:.2}× / {:.2}× direct)",
        r_up / d_up,
        r_down / d_down
    );

    let u_up = upload(raw_sink, bytes, &mut done).await;
    let u_down = download(raw_source, bytes).await;
    println!(
        "raw 101 upgrade → relay       up {u_up:9.1}  down {u_down:9.1}   ({:.2}× / {:.2}× direct)",
        u_up / d_up,
        u_down / d_down
    );

    // Time to the first echoed byte of a new tunnel on a warm agent.
    let mut ttfb = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let mut s = TcpStream::connect(via_echo).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        ttfb.push(start.elapsed());
    }
    ttfb.sort();
    println!(
        "new tunnel, first byte back   p50 {:?}  p99 {:?}",
        percentile(&ttfb, 0.5),
        percentile(&ttfb, 0.99)
    );
}

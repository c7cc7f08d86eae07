//! What the relay holds while nothing happens: idle agents (long polls, sessions) and idle
//! tunnels parked on it for scenario 5, and the relay's own counters read from `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use crate::load::connect;

/// The relay's `/metrics` text (served on its loopback listener).
async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut send = connect(addr).await?;
    let req = Request::get("/metrics")
        .header("host", "bench")
        .body(Full::new(Bytes::new()))?;
    send.ready().await?;
    let body = send
        .send_request(req)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}

/// Connected agent names the relay at `addr` reports.
pub async fn agents_connected(addr: SocketAddr) -> anyhow::Result<usize> {
    Ok(metrics(addr)
        .await?
        .lines()
        .filter(|l| l.starts_with("relay_agents{"))
        .count())
}

/// Upgraded tunnels the relay at `addr` holds open.
pub async fn tunnels_open(addr: SocketAddr) -> anyhow::Result<usize> {
    Ok(metrics(addr)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("relay_open_tunnels "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// `n` idle TCP connections through a tunnel entry point (`relay-client connect`), held
/// until this is dropped.
pub struct IdleTunnels {
    _conns: Vec<TcpStream>,
}

impl IdleTunnels {
    /// Opens them and waits until the relay at `relay` reports all `n` tunnels open.
    pub async fn start(entry: SocketAddr, relay: SocketAddr, n: usize) -> anyhow::Result<Self> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(TcpStream::connect(entry).await?);
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let open = tunnels_open(relay).await?;
            if open >= n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {open} of {n} idle tunnels opened"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(IdleTunnels { _conns: conns })
    }
}

/// `n` idle agents (one long poll each, names `idle-<i>`) parked on a relay, re-polling
/// whenever a poll ends; they stop when this is dropped.
pub struct IdleAgents {
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    set: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl IdleAgents {
    /// Starts them and waits until the relay reports all `n` connected.
    pub async fn start(addr: SocketAddr, token: &str, n: usize) -> anyhow::Result<Self> {
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let token = token.to_owned();
            let answered = answered.clone();
            set.spawn(async move {
                let mut send = connect(addr).await?;
                loop {
                    let req = Request::get(format!("/server/request?server=idle-{i}&max=1"))
                        .header("host", "bench")
                        .header("authorization", format!("Bearer {token}"))
                        .header("x-relay-agent-id", format!("idle{i}"))
                        .body(Full::new(Bytes::new()))?;
                    send.ready().await?;
                    let resp = send.send_request(req).await?;
                    resp.into_body().collect().await?;
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while agents_connected(addr).await? < n {
            anyhow::ensure!(Instant::now() < deadline, "idle agents never all connected");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(IdleAgents { answered, set })
    }
}

/// Idle things held open for a while; what they counted meanwhile.
pub trait Idle {
    /// Holds them for `dur`; the idle agents count polls answered (re-poll traffic).
    fn hold(&self, dur: Duration) -> impl std::future::Future<Output = usize>;
}

impl Idle for IdleAgents {
    async fn hold(&self, dur: Duration) -> usize {
        let before = self.answered.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(dur).await;
        self.answered.load(std::sync::atomic::Ordering::Relaxed) - before
    }
}

impl Idle for IdleSessions {
    async fn hold(&self, dur: Duration) -> usize {
        tokio::time::sleep(dur).await;
        0
    }
}

impl Idle for IdleTunnels {
    async fn hold(&self, dur: Duration) -> usize {
        tokio::time::sleep(dur).await;
        0
    }
}

impl Drop for IdleAgents {
    fn drop(&mut self) {
        self.set.abort_all();
    }
}

/// `n` idle agents on sessions (protocol 2: one WebSocket each on `/server/session`, names
/// `idle-s<i>`) answering the server's pings; they stop when this is dropped.
pub struct IdleSessions {
    set: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl IdleSessions {
    /// Opens them and waits until the relay reports all `n` on sessions.
    pub async fn start(addr: SocketAddr, token: &str, n: usize) -> anyhow::Result<Self> {
        use futures_util::{SinkExt, StreamExt};
        use relay_common::session::{self, Frame as SessionFrame};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let token = token.to_owned();
            set.spawn(async move {
                let tcp = TcpStream::connect(addr).await?;
                let url = format!(
                    "ws://{addr}{}?server=idle-s{i}&slot=0&session=1",
                    session::SESSION_PATH
                );
                let mut req = url.into_client_request()?;
                let h = req.headers_mut();
                h.insert("authorization", format!("Bearer {token}").parse()?);
                h.insert("x-relay-agent-id", format!("idles{i}").parse()?);
                h.insert(
                    relay_common::PROTOCOL_HEADER,
                    session::SESSION_PROTOCOL_VERSION.parse()?,
                );
                h.insert(
                    "sec-websocket-protocol",
                    session::SESSION_SUBPROTOCOL.parse()?,
                );
                let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
                while let Some(msg) = ws.next().await {
                    let Message::Binary(b) = msg? else { continue };
                    for f in session::decode(b, session::Heads::Json)? {
                        if let SessionFrame::Ping(data) = f {
                            let mut out = bytes::BytesMut::new();
                            session::put_ping(&mut out, data, true);
                            ws.send(Message::Binary(out.freeze())).await?;
                        }
                    }
                }
                Ok(())
            });
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let on_sessions = metrics(addr)
                .await?
                .lines()
                .filter(|l| l.starts_with("relay_agents{name=\"idle-s") && l.contains("relay/2"))
                .count();
            if on_sessions >= n {
                break;
            }
            if let Some(r) = set.try_join_next() {
                r??;
                anyhow::bail!("an idle session ended before all were open");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {on_sessions} of {n} idle sessions opened"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(IdleSessions { set })
    }
}

impl Drop for IdleSessions {
    fn drop(&mut self) {
        self.set.abort_all();
    }
}

/// Waits until the relay at `addr` has fewer than `n` open client connections.
pub async fn wait_connections_below(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: usize = metrics(addr)
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("relay_open_connections "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if open < n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{open} connections still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

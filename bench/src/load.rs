//! The load generator: hyper clients on their own connections, latencies in microseconds.
//!
//! One generator drives every target (direct, relay, rathole, bore) the same way, so the
//! ratios between targets measure the targets, not the tools.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a target answers HTTP: its address, a path prefix, and headers to add.
#[derive(Clone)]
pub struct Target {
    /// TCP address.
    pub addr: SocketAddr,
    /// Prefix of every path (`/client/bench` through the relay).
    pub prefix: String,
    /// TLS towards the target (`relay-bench load https://…`; the small GETs only).
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// Requests per second and latency percentiles.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    /// Completed requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
    /// CPU time of the target's relaying processes per request, µs (0 where not measured:
    /// see `scenarios::with_cpu`).
    pub cpu_us: f64,
}

pub(crate) fn percentiles(mut lat: Vec<u32>, secs: f64) -> Rate {
    if lat.is_empty() {
        return Rate::default();
    }
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    Rate {
        rps: lat.len() as f64 / secs,
        p50: at(0.50),
        p99: at(0.99),
        cpu_us: 0.0,
    }
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A keep-alive connection to `t`, over TLS when it has TLS.
async fn open(t: &Target) -> anyhow::Result<Sender> {
    let Some(tls) = &t.tls else {
        return connect(t.addr).await;
    };
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(t.addr.ip().into());
    http1(tls.connect(name, tcp).await?).await
}

pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    http1(tcp).await
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn http1<I>(io: I) -> anyhow::Result<Sender>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(send: &mut Sender, t: &Target, path: &str, close: bool) -> anyhow::Result<usize> {
    let mut req = Request::get(format!("{}{path}", t.prefix)).header("host", "bench");
    if close {
        req = req.header("connection", "close");
    }
    send.ready().await?;
    let resp = send
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    anyhow::ensure!(
        resp.status() == StatusCode::OK,
        "status {} for GET {path}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f?.into_data() {
            n += d.len();
        }
    }
    Ok(n)
}

/// `conns` clients sending small GETs back to back for `dur`, on one keep-alive connection
/// each, or with `new_conn` on a new connection per request (`Connection: close`).
pub async fn small_gets(
    t: &Target,
    conns: usize,
    new_conn: bool,
    dur: Duration,
) -> anyhow::Result<Rate> {
    let deadline = Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let t = t.clone();
        set.spawn(async move {
            let mut kept = if new_conn {
                None
            } else {
                Some(open(&t).await?)
            };
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                let mut fresh = None;
                let send = match kept.as_mut() {
                    Some(s) => s,
                    None => fresh.insert(open(&t).await?),
                };
                get(send, &t, "/small", new_conn).await?;
                lat.push(start.elapsed().as_micros() as u32);
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(percentiles(all, dur.as_secs_f64()))
}

/// Downloads `size` bytes repeatedly for at least `dur` (at least once); MB/s.
pub async fn download(t: &Target, size: usize, dur: Duration) -> anyhow::Result<f64> {
    let mut send = connect(t.addr).await?;
    let start = Instant::now();
    let mut total = 0;
    loop {
        let n = get(&mut send, t, &format!("/bytes/{size}"), false).await?;
        anyhow::ensure!(n == size, "got {n} of {size} bytes");
        total += n;
        if start.elapsed() >= dur {
            break;
        }
    }
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Uploads `size` bytes (streamed in 64 KiB chunks) repeatedly for at least `dur`; MB/s.
pub async fn upload(t: &Target, size: usize, dur: Duration) -> anyhow::Result<f64> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    type Up = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Up>(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let start = Instant::now();
    let mut total = 0;
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let c = chunk.clone();
        tokio::spawn(async move {
            let mut left = size;
            while left > 0 {
                let n = left.min(c.len());
                if tx.send(Ok(Frame::data(c.slice(..n)))).await.is_err() {
                    return;
                }
                left -= n;
            }
        });
        let stream = futures_stream(rx);
        let body: Up = BodyExt::boxed(StreamBody::new(stream));
        let req = Request::post(format!("{}/upload", t.prefix))
            .header("host", "bench")
            .header("content-length", size)
            .body(body)?;
        send.ready().await?;
        let resp = send.send_request(req).await?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
        let got = resp.into_body().collect().await?.to_bytes();
        let n: usize = std::str::from_utf8(&got)?
            .trim()
            .parse()
            .context("upload count")?;
        anyhow::ensure!(n == size, "backend counted {n} of {size} bytes");
        total += size;
        if start.elapsed() >= dur {
            break;
        }
    }
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
}

fn futures_stream(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> relay_tests::ReceiverStream<Result<Frame<Bytes>, std::io::Error>> {
    relay_tests::ReceiverStream(rx)
}

/// HTTP/2 (prior knowledge) over one connection with `streams` concurrent request loops,
/// naming the backend with `X-Server-Name` when `server_name` is set; requests per second.
pub async fn h2(
    addr: SocketAddr,
    server_name: Option<&str>,
    streams: usize,
    dur: Duration,
) -> anyhow::Result<Rate> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    let deadline = Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut send = send.clone();
        let name = server_name.map(str::to_owned);
        set.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let mut req = Request::get(format!("http://{addr}/small"));
                if let Some(n) = &name {
                    req = req.header("x-server-name", n.as_str());
                }
                let start = Instant::now();
                send.ready().await?;
                let resp = send.send_request(req.body(Empty::new())?).await?;
                anyhow::ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
                resp.into_body().collect().await?;
                lat.push(start.elapsed().as_micros() as u32);
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(percentiles(all, dur.as_secs_f64()))
}

/// Pushes `bytes` through a TCP connection to a sink service and back from a source
/// service (the first byte says which); MB/s up and down.
pub async fn tcp_copy(addr: SocketAddr, bytes: u64) -> anyhow::Result<(f64, f64)> {
    let chunk = vec![b't'; 256 * 1024];
    // Up: write everything, half-close, wait for the sink's count.
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"U").await?;
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = String::new();
    s.read_to_string(&mut count).await?;
    let up = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    anyhow::ensure!(count.trim() == bytes.to_string(), "sink counted {count:?}");
    // Down: ask for `bytes`, read to the end.
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("D{bytes}\n").as_bytes()).await?;
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    anyhow::ensure!(got == bytes, "source sent {got} of {bytes}");
    let down = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    Ok((up, down))
}

/// `total` requests at once over HTTP/2 connections of 100 streams each; seconds until the
/// last answer, and how many were answered 200.
pub async fn burst(
    addr: SocketAddr,
    server_name: Option<&str>,
    total: usize,
) -> anyhow::Result<(f64, usize)> {
    let conns = total.div_ceil(100);
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(conn);
        senders.push(send);
    }
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..total {
        let mut send = senders[i % conns].clone();
        let name = server_name.map(str::to_owned);
        set.spawn(async move {
            let mut req = Request::get(format!("http://{addr}/small"));
            if let Some(n) = &name {
                req = req.header("x-server-name", n.as_str());
            }
            send.ready().await?;
            let resp = send.send_request(req.body(Empty::new())?).await?;
            let ok = resp.status() == StatusCode::OK;
            resp.into_body().collect().await?;
            anyhow::Ok(ok)
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(Ok(true))) {
            ok += 1;
        }
    }
    Ok((start.elapsed().as_secs_f64(), ok))
}

/// Small GETs on one keep-alive connection, back to back, while one `size`-byte download
/// runs through the same target on another connection (issue 13: one big body must not
/// hold back the small requests of the same agent). The small GETs' latency, and the
/// download's MB/s.
pub async fn small_during_download(t: &Target, size: usize) -> anyhow::Result<(Rate, f64)> {
    let started = Instant::now();
    let big = {
        let t = t.clone();
        tokio::spawn(async move {
            let mut send = connect(t.addr).await?;
            let n = get(&mut send, &t, &format!("/bytes/{size}"), false).await?;
            anyhow::ensure!(n == size, "got {n} of {size} bytes");
            anyhow::Ok(started.elapsed())
        })
    };
    let mut send = connect(t.addr).await?;
    let mut lat = Vec::new();
    // At least one, however fast the download.
    loop {
        let start = Instant::now();
        get(&mut send, t, "/small", false).await?;
        lat.push(start.elapsed().as_micros() as u32);
        if big.is_finished() {
            break;
        }
    }
    let took = big.await??;
    let rate = percentiles(lat, took.as_secs_f64());
    Ok((rate, size as f64 / took.as_secs_f64() / 1e6))
}

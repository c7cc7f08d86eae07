//! The benchmark's backend process (`relay-bench backend`): a minimal hyper server (HTTP/1.1
//! and h2c) and a TCP sink/source, each printed as `http ADDR` / `tcp ADDR` on stdout.
//!
//! HTTP: `/small` answers `ok`, `/bytes/N` sends N bytes, `POST /upload` answers the number
//! of bytes it read; a `/client/<name>` prefix is ignored, so the same paths work directly
//! and through every tunnel. TCP: `U` then bytes until EOF → the count; `D<N>\n` → N bytes.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

type Out = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn path_of(req: &Request<Incoming>) -> &str {
    let p = req.uri().path();
    match p.strip_prefix("/client/") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => p,
    }
}

async fn answer(req: Request<Incoming>) -> Response<Out> {
    let path = path_of(&req).to_owned();
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'd'; 64 * 1024]);
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if tx.send(Ok(Frame::data(chunk.slice(..k)))).await.is_err() {
                    return;
                }
                left -= k;
            }
        });
        return Response::builder()
            .header("content-length", n)
            .body(BodyExt::boxed(StreamBody::new(
                relay_tests::ReceiverStream(rx),
            )))
            .expect("valid response");
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                n += d.len();
            }
        }
        return Response::new(full(Bytes::from(n.to_string())));
    }
    Response::new(full(Bytes::from_static(b"ok")))
}

fn full(b: Bytes) -> Out {
    BodyExt::boxed(Full::new(b).map_err(|never| match never {}))
}

async fn tcp_service(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (rd, mut wr) = s.split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut first = [0u8; 1];
    rd.read_exact(&mut first).await?;
    if first[0] == b'U' {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let k = rd.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        wr.write_all(n.to_string().as_bytes()).await?;
        return wr.shutdown().await;
    }
    let mut line = String::new();
    rd.read_line(&mut line).await?;
    let mut left: u64 = line.trim().parse().unwrap_or(0);
    let chunk = vec![b's'; 256 * 1024];
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        wr.write_all(&chunk[..k]).await?;
        left -= k as u64;
    }
    wr.shutdown().await
}

/// Runs the backend until killed.
pub async fn run() -> anyhow::Result<()> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    println!("http {}", http.local_addr()?);
    println!("tcp {}", tcp.local_addr()?);
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            tokio::spawn(tcp_service(s));
        }
    });
    loop {
        let (s, _) = http.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(answer(req).await) },
                );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

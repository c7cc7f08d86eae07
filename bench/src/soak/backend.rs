//! The soak backend: deterministic bodies the users can check byte for byte, and an upload
//! endpoint that checks what it received against what the user says it sent, so a
//! truncated upload delivered as if complete is caught where it lands.
//!
//! `/small` → `ok`; `/bytes/N/SEED` → N bytes of [`Pattern`] SEED (`Content-Length` for even
//! seeds, chunked for odd ones);
//! `POST /upload` with `x-expect-len` and `x-expect-sha256` → `LEN HEX`; `/sse/N` → N
//! events 20 ms apart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

type Out = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A deterministic byte stream (xorshift64), the same on both ends.
pub struct Pattern(u64);

impl Pattern {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            out.extend_from_slice(&x.to_le_bytes());
        }
        // Whole words only: a chunk boundary never splits the stream differently.
        debug_assert!(n.is_multiple_of(8) || out.len() >= n);
        out.truncate(n);
        out
    }
}

/// The running backend.
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    /// Uploads that ended cleanly with other bytes than the user sent: SILENT.
    pub silent_uploads: Arc<AtomicU64>,
}

impl Backend {
    /// Starts it on a loopback port.
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let silent_uploads = Arc::new(AtomicU64::new(0));
        let silent = silent_uploads.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let silent = silent.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let silent = silent.clone();
                        async move { Ok::<_, Infallible>(answer(req, silent).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            silent_uploads,
        }
    }
}

fn full(b: impl Into<Bytes>) -> Out {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn streamed(rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>) -> Out {
    BodyExt::boxed(StreamBody::new(relay_tests::ReceiverStream(rx)))
}

async fn answer(req: Request<Incoming>, silent: Arc<AtomicU64>) -> Response<Out> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["small"] => Response::new(full("ok")),
        ["bytes", n, seed] => {
            let (Ok(n), Ok(seed)) = (n.parse::<usize>(), seed.parse::<u64>()) else {
                return Response::builder()
                    .status(400)
                    .body(full("bad"))
                    .expect("static");
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let mut p = Pattern::new(seed);
                let mut left = n;
                while left > 0 {
                    let k = left.min(64 * 1024);
                    if tx
                        .send(Ok(Frame::data(Bytes::from(p.take(k)))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    left -= k;
                }
            });
            // Every other body without a length (chunked): cut short and ended cleanly,
            // such a body would look complete, which only the user's check can catch.
            let mut r = Response::builder();
            if seed.is_multiple_of(2) {
                r = r.header("content-length", n);
            }
            r.body(streamed(rx)).expect("static")
        }
        ["sse", n] => {
            let n: usize = n.parse().unwrap_or(1);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for i in 0..n {
                    let event = format!("data: {i}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(streamed(rx))
                .expect("static")
        }
        ["upload"] => {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (want_len, want_sha) = (header("x-expect-len"), header("x-expect-sha256"));
            let mut body = req.into_body();
            let mut hash = Sha256::new();
            let mut len = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            len += d.len();
                            hash.update(&d);
                        }
                    }
                    // A broken upload is visible: the backend saw the error.
                    Err(_) => {
                        return Response::builder()
                            .status(400)
                            .body(full("broken"))
                            .expect("static")
                    }
                }
            }
            let sha = hex(&hash.finalize());
            if want_len.as_deref() != Some(len.to_string().as_str())
                || want_sha.as_deref() != Some(sha.as_str())
            {
                silent.fetch_add(1, Ordering::SeqCst);
            }
            Response::new(full(format!("{len} {sha}")))
        }
        _ => Response::builder()
            .status(404)
            .body(full("no such path"))
            .expect("static"),
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

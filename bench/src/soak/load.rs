//! The user load: a mix of small GETs, downloads and uploads of 1 KB to a few MB checked
//! byte for byte, server-sent events, WebSocket echoes and service-port tunnels (a TCP echo
//! through the agent), each classified by outcome.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::{hex, Pattern};
use crate::world::{ECHO_APP, HTTP_NAME, WS_NAME};

/// What happened to one user operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exactly the right bytes.
    Ok,
    /// A failure the user could see (its cause).
    Visible(&'static str),
    /// A response that looked complete and was wrong (what).
    Silent(&'static str),
}

/// The kinds of operations.
pub const KINDS: [&str; 6] = ["small", "download", "upload", "sse", "websocket", "tunnel"];

/// One finished operation.
pub struct Done {
    /// Its kind (index into [`KINDS`]).
    pub kind: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// When it started.
    pub started: Instant,
    /// How long it took.
    pub took: Duration,
}

/// Longest any operation may take before it counts as stuck: past the relay's longest
/// timeout (120 s for an upgrade's 101).
const PATIENCE: Duration = Duration::from_secs(150);

/// Runs one operation chosen by `pick` (0..100) through `relay` with size seed `seed`.
pub async fn one(relay: SocketAddr, pick: u64, seed: u64, max_size: usize) -> Done {
    let started = Instant::now();
    let kind = match pick {
        0..=44 => 0,
        45..=59 => 1,
        60..=74 => 2,
        75..=84 => 3,
        85..=92 => 4,
        _ => 5,
    };
    // Sizes log-uniform from 1 KB up to `max_size`.
    let size = {
        let span = (max_size as f64 / 1000.0).ln();
        (1000.0 * ((seed % 1000) as f64 / 1000.0 * span).exp()) as usize
    };
    let run = async {
        match kind {
            0 => small(relay).await,
            1 => download(relay, size, seed).await,
            2 => upload(relay, size, seed).await,
            3 => sse(relay).await,
            4 => websocket(relay, seed).await,
            _ => tunnel(relay, seed).await,
        }
    };
    let outcome = tokio::time::timeout(PATIENCE, run)
        .await
        .unwrap_or(Outcome::Visible("stuck past the patience"));
    Done {
        kind,
        outcome,
        started,
        took: started.elapsed(),
    }
}

fn url(relay: SocketAddr, path: &str) -> String {
    format!("http://{relay}/client/{HTTP_NAME}{path}")
}

/// Classifies a status: 200 goes on, anything else is visible.
fn status_outcome(status: http::StatusCode) -> Option<Outcome> {
    match status.as_u16() {
        200 => None,
        502 => Some(Outcome::Visible("502")),
        503 => Some(Outcome::Visible("503")),
        504 => Some(Outcome::Visible("504")),
        _ => Some(Outcome::Visible("other status")),
    }
}

async fn fetch(req: Request<relay_tests::TestBody>) -> Result<(http::StatusCode, Bytes), Outcome> {
    // A fresh client per operation: a connection a fault cut is not reused.
    let resp = relay_tests::client()
        .request(req)
        .await
        .map_err(|_| Outcome::Visible("connection failed"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| Outcome::Visible("body aborted"))?
        .to_bytes();
    Ok((status, body))
}

async fn small(relay: SocketAddr) -> Outcome {
    let req = Request::get(url(relay, "/small"))
        .body(relay_tests::empty())
        .expect("valid request");
    match fetch(req).await {
        Err(o) => o,
        Ok((s, body)) => status_outcome(s).unwrap_or(if body == "ok" {
            Outcome::Ok
        } else {
            Outcome::Silent("small body differs")
        }),
    }
}

fn expected_sha(size: usize, seed: u64) -> String {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut left = size;
    while left > 0 {
        let k = left.min(64 * 1024);
        h.update(p.take(k));
        left -= k;
    }
    hex(&h.finalize())
}

async fn download(relay: SocketAddr, size: usize, seed: u64) -> Outcome {
    let req = Request::get(url(relay, &format!("/bytes/{size}/{seed}")))
        .body(relay_tests::empty())
        .expect("valid request");
    match fetch(req).await {
        Err(o) => o,
        Ok((s, body)) => status_outcome(s).unwrap_or_else(|| {
            if body.len() != size {
                Outcome::Silent("download length differs")
            } else if hex(&Sha256::digest(&body)) != expected_sha(size, seed) {
                Outcome::Silent("download bytes differ")
            } else {
                Outcome::Ok
            }
        }),
    }
}

async fn upload(relay: SocketAddr, size: usize, seed: u64) -> Outcome {
    let mut p = Pattern::new(seed ^ 0xabcd);
    let mut body = Vec::with_capacity(size);
    while body.len() < size {
        let k = (size - body.len()).min(64 * 1024);
        body.extend_from_slice(&p.take(k));
    }
    let sha = hex(&Sha256::digest(&body));
    // Chunked (no Content-Length) half of the time: a truncated chunked body ended cleanly
    // would be the silent failure the backend looks for.
    let (tx, stream) = relay_tests::channel_body(2);
    let chunked = seed.is_multiple_of(2);
    let req_body = if chunked {
        let data = Bytes::from(body);
        tokio::spawn(async move {
            for c in data.chunks(64 * 1024) {
                if tx
                    .send(relay_tests::data(Bytes::copy_from_slice(c)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        stream
    } else {
        relay_tests::full(body)
    };
    let req = Request::post(url(relay, "/upload"))
        .header("x-expect-len", size.to_string())
        .header("x-expect-sha256", &sha)
        .body(req_body)
        .expect("valid request");
    match fetch(req).await {
        Err(o) => o,
        Ok((s, answer)) => status_outcome(s).unwrap_or_else(|| {
            if answer == format!("{size} {sha}") {
                Outcome::Ok
            } else {
                Outcome::Silent("the backend got other upload bytes")
            }
        }),
    }
}

async fn sse(relay: SocketAddr) -> Outcome {
    const EVENTS: usize = 5;
    let req = Request::get(url(relay, &format!("/sse/{EVENTS}")))
        .body(relay_tests::empty())
        .expect("valid request");
    match fetch(req).await {
        Err(o) => o,
        Ok((s, body)) => status_outcome(s).unwrap_or_else(|| {
            let want: String = (0..EVENTS).map(|i| format!("data: {i}\n\n")).collect();
            if body == want.as_bytes() {
                Outcome::Ok
            } else {
                Outcome::Silent("events differ")
            }
        }),
    }
}

async fn websocket(relay: SocketAddr, seed: u64) -> Outcome {
    let Ok(tcp) = tokio::net::TcpStream::connect(relay).await else {
        return Outcome::Visible("connection failed");
    };
    let url = format!("ws://{relay}/client/{WS_NAME}/echo");
    let mut ws = match tokio_tungstenite::client_async(url, tcp).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            return status_outcome(r.status()).unwrap_or(Outcome::Visible("no switch"))
        }
        Err(_) => return Outcome::Visible("handshake failed"),
    };
    let mut p = Pattern::new(seed);
    for i in 0..10 {
        let msg = Message::binary(p.take(100 + (i * 997) % 20_000));
        if ws.send(msg.clone()).await.is_err() {
            return Outcome::Visible("tunnel closed");
        }
        match ws.next().await {
            Some(Ok(m)) if m == msg => {}
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                return Outcome::Visible("tunnel closed")
            }
            Some(Ok(_)) => return Outcome::Silent("echo differs"),
        }
    }
    let _ = ws.close(None).await;
    Outcome::Ok
}

/// A TCP connection to the HTTP agent's echo service port, carried as a WebSocket
/// (Backend.AI's `tcpproxy`): 64 KiB–1 MiB of the pattern in binary messages, read back
/// whole (the echo's chunks need not match the messages), then the end of stream.
async fn tunnel(relay: SocketAddr, seed: u64) -> Outcome {
    let Ok(tcp) = tokio::net::TcpStream::connect(relay).await else {
        return Outcome::Visible("connection failed");
    };
    let url = format!(
        "ws://{relay}/client/{HTTP_NAME}/stream/kernel/{HTTP_NAME}/tcpproxy?app={ECHO_APP}"
    );
    let ws = match tokio_tungstenite::client_async(url, tcp).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            return status_outcome(r.status()).unwrap_or(Outcome::Visible("no switch"))
        }
        Err(_) => return Outcome::Visible("handshake failed"),
    };
    let (mut tx, mut rx) = ws.split();
    // Whole pattern words (8 bytes), so the stream does not depend on the chunking.
    let total = (64 * 1024 + (seed % (960 * 1024)) as usize) & !7;
    let expected = Pattern::new(seed).take(total);
    let send = async move {
        let mut p = Pattern::new(seed);
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(16 * 1024);
            tx.send(Message::binary(p.take(n))).await?;
            sent += n;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(tx)
    };
    let receive = async {
        let mut got = 0;
        while got < total {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if b.len() > total - got || expected[got..got + b.len()] != b[..] {
                        return Outcome::Silent("tunnel bytes differ");
                    }
                    got += b.len();
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return Outcome::Visible("tunnel closed"),
            }
        }
        Outcome::Ok
    };
    let (sent, outcome) = tokio::join!(send, receive);
    if let Ok(mut tx) = sent {
        let _ = tx.close().await;
    } else if outcome == Outcome::Ok {
        return Outcome::Visible("tunnel closed");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    /// A "relay" that answers downloads from the pattern, cut to `keep` of every body and
    /// ended cleanly (chunked), and answers uploads with what it was told to.
    async fn lying_relay(keep: f64) -> SocketAddr {
        relay_tests::backend(move |req: Request<hyper::body::Incoming>| async move {
            let path = req.uri().path().to_owned();
            let parts: Vec<&str> = path.split('/').collect();
            if let ["", "client", _, "bytes", n, seed] = parts.as_slice() {
                let (n, seed): (usize, u64) = (n.parse().unwrap(), seed.parse().unwrap());
                let mut p = Pattern::new(seed);
                let mut body = Vec::new();
                while body.len() < n {
                    body.extend(p.take((n - body.len()).min(64 * 1024)));
                }
                body.truncate((n as f64 * keep) as usize);
                let (tx, rx) = relay_tests::channel_body(1);
                tokio::spawn(async move { tx.send(relay_tests::data(body)).await });
                return Response::new(rx);
            }
            Response::new(relay_tests::full("0 wrong"))
        })
        .await
    }

    #[tokio::test]
    async fn a_clean_but_short_body_is_silent_and_a_whole_one_ok() {
        let honest = lying_relay(1.0).await;
        assert_eq!(download(honest, 200_000, 3).await, Outcome::Ok);
        let liar = lying_relay(0.5).await;
        assert_eq!(
            download(liar, 200_000, 3).await,
            Outcome::Silent("download length differs")
        );
        assert_eq!(
            upload(liar, 5000, 2).await,
            Outcome::Silent("the backend got other upload bytes")
        );
    }

    #[test]
    fn the_pattern_does_not_depend_on_chunking() {
        let mut a = Pattern::new(9);
        let whole = a.take(64 * 1024 * 2);
        let mut b = Pattern::new(9);
        let mut parts = b.take(64 * 1024);
        parts.extend(b.take(64 * 1024));
        assert_eq!(whole, parts);
        assert_ne!(Pattern::new(1).take(64), Pattern::new(2).take(64));
    }
}

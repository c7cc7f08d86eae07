//! The front's exchange over an in-memory connection with a small buffer, so writes wait
//! for the reader as they do on a slow socket.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::exchange::{run, Conn};
use crate::base::activity::Activity;
use crate::base::body::{BodyError, RelayBody};
use crate::dispatch::Routed;

/// A body whose frames come from a channel, as a relayed download's do.
struct Channel(mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = BodyError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0.poll_recv(cx).map(|f| f.map(|b| Ok(Frame::data(b))))
    }
}

fn answer(resp: Response<RelayBody>) -> Routed {
    Routed::Later(Box::pin(async move { resp }))
}

/// Runs one exchange on the server end of a 4 KiB in-memory connection.
async fn exchange(
    server: &mut DuplexStream,
    buf: &mut BytesMut,
    routed: Routed,
) -> std::io::Result<bool> {
    let activity = Arc::new(Activity::default());
    let mut scratch = BytesMut::new();
    let conn = Conn {
        io: server,
        buf,
        max: 64 * 1024,
        scratch: &mut scratch,
    };
    run(conn, routed, activity.begin(), false).await
}

async fn read_n(client: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    client.read_exact(&mut b).await.unwrap();
    b
}

/// Reads a response: its head, and its body by `Content-Length` or chunk by chunk.
async fn read_response(client: &mut DuplexStream) -> (String, Vec<u8>) {
    let mut raw = Vec::new();
    let end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut b = [0u8; 1024];
        let n = client.read(&mut b).await.unwrap();
        assert!(n > 0, "the head ends");
        raw.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut rest = raw[end..].to_vec();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.parse::<usize>().unwrap());
    let body = match length {
        Some(n) => {
            let b = read_n(client, n.saturating_sub(rest.len())).await;
            rest.extend_from_slice(&b);
            rest
        }
        None => {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let mut body = Vec::new();
            loop {
                while !rest.windows(2).any(|w| w == b"\r\n") {
                    let b = read_n(client, 1).await;
                    rest.extend_from_slice(&b);
                }
                let i = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                let size =
                    usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap(), 16).unwrap();
                rest.drain(..i + 2);
                let b = read_n(client, (size + 2).saturating_sub(rest.len())).await;
                rest.extend_from_slice(&b);
                assert_eq!(&rest[size..size + 2], b"\r\n");
                body.extend_from_slice(&rest[..size]);
                rest.drain(..size + 2);
                if size == 0 {
                    break body;
                }
            }
        }
    };
    (head, body)
}

/// Frames ready at once beyond what one gathering takes, then frames that come later: all
/// of them arrive, in order, with either framing. (A front that stopped gathering at its
/// limit and then waited on nothing stalled downloads after about 200 KB.)
#[tokio::test]
async fn a_download_larger_than_one_gathering_arrives_whole_with_either_framing() {
    for declared in [true, false] {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let (tx, rx) = mpsc::channel(16);
        let frames: Vec<Bytes> = (0..12u8).map(|i| Bytes::from(vec![i; 50_000])).collect();
        let total: usize = frames.iter().map(Bytes::len).sum();
        let mut resp = Response::new(Channel(rx).boxed_unsync());
        if declared {
            resp.headers_mut().insert("content-length", total.into());
        }
        for f in &frames[..8] {
            tx.send(f.clone()).await.unwrap();
        }
        let later = frames[8..].to_vec();
        let feed = tokio::spawn(async move {
            for f in later {
                tokio::task::yield_now().await;
                tx.send(f).await.unwrap();
            }
        });
        let mut buf = BytesMut::new();
        // The timeout turns a stall into a failure.
        let both = async {
            tokio::join!(
                exchange(&mut server, &mut buf, answer(resp)),
                read_response(&mut client)
            )
        };
        let (served, (head, body)) = tokio::time::timeout(std::time::Duration::from_secs(30), both)
            .await
            .expect("the download does not stall");
        feed.await.unwrap();
        assert!(served.unwrap(), "the connection stays open");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, frames.concat(), "declared length: {declared}");
    }
}

/// The user closes while the answer is awaited: the exchange ends (and drops the request,
/// which cancels it at the agent) instead of waiting for an answer nobody reads.
#[tokio::test]
async fn the_user_leaving_ends_the_exchange_before_the_answer() {
    let (client, mut server) = tokio::io::duplex(4096);
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let never = Routed::Later(Box::pin(async move {
        let _told = dropped_tx;
        std::future::pending::<Response<RelayBody>>().await
    }));
    drop(client);
    let mut buf = BytesMut::new();
    let err = exchange(&mut server, &mut buf, never).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    assert!(
        dropped_rx.await.is_err(),
        "the request's future was dropped"
    );
}

/// A next request sent before the answer (pipelining, RFC 9112 §9.3.2) is kept for the
/// next exchange, byte for byte.
#[tokio::test]
async fn a_request_sent_during_the_answer_is_kept_for_the_next() {
    let (mut client, mut server) = tokio::io::duplex(4096);
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let routed = Routed::Later(Box::pin(async move {
        let _ = wait.await;
        Response::new(
            http_body_util::Full::new(Bytes::from_static(b"hi"))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
    }));
    let next = b"GET /next HTTP/1.1\r\nHost: r\r\n\r\n";
    let mut buf = BytesMut::new();
    let client_side = async {
        client.write_all(next).await.unwrap();
        // Two turns of the joined futures: in the first, whichever order they run in, the
        // exchange waits for its answer and reads what arrived.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        read_response(&mut client).await
    };
    let (served, (_, body)) = tokio::join!(exchange(&mut server, &mut buf, routed), client_side);
    assert!(served.unwrap());
    assert_eq!(body, b"hi");
    assert_eq!(&buf[..], next);
}

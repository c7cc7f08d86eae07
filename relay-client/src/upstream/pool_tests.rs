//! The pool against scripted backends on loopback: what goes on the wire, reuse, and what
//! happens when the backend closes, answers early or sends a broken body.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::upstream::boxed;

async fn backend() -> (TcpListener, Arc<Pool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pool = Pool::new(
        l.local_addr().unwrap().to_string(),
        4,
        Duration::from_secs(30),
        Duration::from_secs(30),
    );
    (l, pool)
}

/// Reads from `s` until `buf` ends with `end`.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) {
    while !buf.ends_with(end) {
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).await.unwrap();
        assert!(
            n > 0,
            "closed before {:?}: {:?}",
            String::from_utf8_lossy(end),
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&b[..n]);
    }
}

fn get(path: &str) -> Request<BackendBody> {
    let empty = http_body_util::Empty::new().map_err(|never| match never {});
    Request::get(path)
        .header("host", "b")
        .body(boxed(empty))
        .unwrap()
}

async fn text(resp: super::Answered) -> String {
    let body = resp.body.collect().await.expect("a whole body").to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn an_idle_timeout_of_zero_sweeps_without_a_panic() {
    let pool = Pool::new("127.0.0.1:9".into(), 4, Duration::ZERO, Duration::ZERO);
    // A zero period would panic on the first poll; a sweep waits between turns.
    let swept = tokio::time::timeout(Duration::from_millis(100), pool.sweep()).await;
    assert!(swept.is_err(), "the sweep runs until dropped");
}

#[tokio::test]
async fn requests_reuse_a_connection_and_go_again_when_the_backend_closed_it() {
    let (l, pool) = backend().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        assert_eq!(got, b"GET /a HTTP/1.1\r\nhost: b\r\n\r\n");
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            .await
            .unwrap();
        got.clear();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n")
            .await
            .unwrap();
        // The backend's idle timeout: it closes the kept connection.
        drop(s);
        let (mut s, _) = l.accept().await.unwrap();
        got.clear();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        assert_eq!(got, b"GET /c HTTP/1.1\r\nhost: b\r\n\r\n");
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc")
            .await
            .unwrap();
    });
    assert_eq!(text(pool.send(get("/a")).await.unwrap()).await, "a");
    assert_eq!(text(pool.send(get("/b")).await.unwrap()).await, "b");
    // The close may or may not have been seen yet: either way /c succeeds.
    assert_eq!(text(pool.send(get("/c")).await.unwrap()).await, "c");
    server.await.unwrap();
}

#[tokio::test]
async fn an_upload_of_unknown_length_goes_chunked_with_its_trailers() {
    let (l, pool) = backend().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"0\r\nx-sum: 6\r\n\r\n").await;
        let want = "POST /up HTTP/1.1\r\nhost: b\r\ntransfer-encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n3\r\ndef\r\n0\r\nx-sum: 6\r\n\r\n";
        assert_eq!(String::from_utf8_lossy(&got), want);
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", "6".parse().unwrap());
    let frames = [
        Frame::data(Bytes::from("abc")),
        Frame::data(Bytes::from("def")),
        Frame::trailers(trailers),
    ];
    let body = StreamBody::new(futures_util::stream::iter(
        frames.map(Ok::<_, std::io::Error>),
    ));
    let req = Request::post("/up")
        .header("host", "b")
        .body(boxed(body))
        .unwrap();
    let resp = pool.send(req).await.unwrap();
    let whole = resp.body.collect().await.unwrap();
    assert_eq!(whole.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(&whole.to_bytes()[..], b"ok");
    server.await.unwrap();
}

#[tokio::test]
async fn an_early_answer_is_read_while_the_upload_waits_and_the_connection_closes() {
    let (l, pool) = backend().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        assert!(got.ends_with(b"content-length: 100\r\n\r\n"), "{got:?}");
        // Answered before any of the body (RFC 9110 §15.5.14).
        s.write_all(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
            .await
            .unwrap();
        // The pool opens a new connection for the next request.
        let (mut s2, _) = l.accept().await.unwrap();
        got.clear();
        read_until(&mut s2, &mut got, b"\r\n\r\n").await;
        s2.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
    });
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let body = http_body_util::combinators::UnsyncBoxBody::new(WithLength(body, 100));
    let req = Request::put("/up").header("host", "b").body(body).unwrap();
    let resp = pool.send(req).await.unwrap();
    assert_eq!(resp.status, 413);
    assert_eq!(text(resp).await, "big");
    drop(tx);
    let resp = pool.send(get("/next")).await.unwrap();
    assert_eq!(resp.status, 204);
    assert!(resp.body.is_end_stream());
    server.await.unwrap();
}

#[tokio::test]
async fn a_body_longer_than_its_length_is_refused_and_never_written_past_it() {
    let (l, pool) = backend().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.ends_with("content-length: 2\r\n\r\n"), "{text}");
    });
    let body = WithLength(
        Full::new(Bytes::from("abc")).map_err(|never| match never {}),
        2,
    );
    let req = Request::post("/x")
        .header("host", "b")
        .body(boxed(body))
        .unwrap();
    let Err(err) = pool.send(req).await else {
        panic!("a body longer than its length was sent")
    };
    assert!(
        err.to_string().contains("backend connection failed"),
        "{err}"
    );
    assert!(
        format!("{:?}", err).contains("longer than its length"),
        "{err:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_cut_body_is_an_error_and_an_abandoned_body_closes_its_connection() {
    let (l, pool) = backend().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        drop(s);
        let (mut s, _) = l.accept().await.unwrap();
        got.clear();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        // The reader drops the body after 3 bytes: the connection closes, not reused.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (mut s, _) = l.accept().await.unwrap();
        got.clear();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
    });
    let err = pool
        .send(get("/cut"))
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap_err();
    assert!(matches!(err, H1Error::Closed), "{err}");
    let mut body = pool.send(get("/left")).await.unwrap().body;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"abc");
    drop(body);
    assert_eq!(text(pool.send(get("/after")).await.unwrap()).await, "ok");
    server.await.unwrap();
}

/// A body that announces an exact length, whatever it then yields.
struct WithLength<B>(B, u64);

impl<B: Body<Data = Bytes> + Unpin> Body for WithLength<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.1)
    }
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Unpin {
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

#[tokio::test]
async fn a_streamed_body_whose_reader_task_is_dropped_fails_instead_of_ending() {
    let (l, pool) = backend().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        // Then nothing: the body stalls with the connection open.
        let _ = s.read_to_end(&mut got).await;
    });
    // The reader task lives in a runtime of its own, shut down under it (as an agent's is
    // when it is killed).
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let detached = other
        .spawn(async move { pool.send(get("/s")).await.unwrap().body.detach() })
        .await
        .unwrap();
    let mut body = detached;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    other.shutdown_background();
    let rest = body.frame().await.expect("an error, not the end");
    assert!(matches!(rest, Err(H1Error::ReaderGone)), "{rest:?}");
    assert!(body.frame().await.is_none(), "nothing after the error");
}

/// Requests that hold their connections (an event stream, a long poll) do not keep others
/// from opening new ones: a turn to connect ends with the connect, not with the request.
#[tokio::test]
async fn requests_that_hold_their_connections_still_get_new_ones_past_the_connect_limit() {
    let (l, pool) = backend().await;
    let n = MAX_CONNECTING * 3;
    let server = tokio::spawn(async move {
        // Every request waits for its answer until all n are in, each on a connection of
        // its own.
        let mut held = Vec::new();
        while held.len() < n {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            read_until(&mut s, &mut got, b"\r\n\r\n").await;
            held.push(s);
        }
        for s in &mut held {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        }
        held
    });
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { text(pool.send(get("/held")).await.unwrap()).await })
        })
        .collect();
    let all = async {
        for r in requests {
            assert_eq!(r.await.unwrap(), "ok");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("every request got a connection");
    assert_eq!(server.await.unwrap().len(), n);
}

/// Connections of this process to `port` in `SYN_SENT` (connecting), from /proc/net/tcp.
///
/// Only this process's sockets count (matched by inode with `/proc/self/fd`): the table is
/// the whole machine's, and another test's process retrying a closed port that this
/// test's listener was given next would count too (one CI run saw 34).
fn connecting_to(port: u16) -> usize {
    let own: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            let t = t.to_str()?;
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!(":{port:04X}");
    // Distinct sockets, not rows: the kernel prints the table over several reads, and a
    // socket hashed into a bucket while the read goes on can bring a row into view twice
    // (one local run failed after 0.8 s, which only a count above the limit does).
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.len() > 9 && f[2].ends_with(&remote) && f[3] == "02" && own.contains(f[9]))
                .then(|| f[9].to_owned())
        })
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// A burst of requests to a backend whose connects hang (its accept queue is full: the
/// kernel drops the SYNs) opens at most `MAX_CONNECTING` connections at once; the rest
/// wait their turn instead of each starting a connect of its own.
#[tokio::test]
async fn at_most_the_limit_of_connections_open_at_once() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Backlog 1, never accepted: the first connects complete into the queue, later SYNs
    // are dropped and their connects wait (retransmitting).
    let l = socket.listen(1).unwrap();
    let port = l.local_addr().unwrap().port();
    let pool = Pool::new(
        format!("127.0.0.1:{port}"),
        4,
        Duration::from_secs(30),
        Duration::ZERO,
    );
    let requests: Vec<_> = (0..MAX_CONNECTING * 3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send(get("/x")).await.map(|_| ()) })
        })
        .collect();
    let mut most = 0;
    let mut stable = 0;
    // Until the count has held at the limit for 20 looks (10 s at most).
    for _ in 0..1000 {
        let now = connecting_to(port);
        most = most.max(now);
        stable = if now == MAX_CONNECTING { stable + 1 } else { 0 };
        if stable == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(most, MAX_CONNECTING, "connecting at once, at most");
    assert_eq!(stable, 20, "the limit is reached and held");
    for r in requests {
        r.abort();
    }
    drop(l);
}

#[tokio::test]
async fn a_download_s_read_buffer_and_size_are_not_kept_for_the_next_answer() {
    let (l, pool) = backend().await;
    const BIG: usize = 1 << 20;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'x'; BIG]).await.unwrap();
        got.clear();
        read_until(&mut s, &mut got, b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            .await
            .unwrap();
    });
    assert_eq!(text(pool.send(get("/big")).await.unwrap()).await.len(), BIG);
    let kept = |pool: &Pool| {
        let idle = pool.idle.lock().unwrap();
        assert_eq!(idle.len(), 1, "the connection is kept");
        (idle[0].0.want, idle[0].0.rd.capacity())
    };
    // The megabyte came in reads that grew past the first size; none of that stays.
    let (want, room) = kept(&pool);
    assert_eq!(want, FIRST_READ);
    assert!(room <= FIRST_READ, "{room} bytes of buffer kept");
    // The next small answer reads with the first size again, on the same connection.
    assert_eq!(text(pool.send(get("/a")).await.unwrap()).await, "a");
    let (want, room) = kept(&pool);
    assert_eq!(want, FIRST_READ);
    assert!(room <= FIRST_READ, "{room} bytes of buffer kept");
    server.await.unwrap();
}

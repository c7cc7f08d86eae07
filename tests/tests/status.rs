//! The status table: what the user sees when agents or backends fail.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use relay_tests::*;
use tokio::sync::Notify;

async fn get(url: String) -> Response<hyper::body::Incoming> {
    client()
        .request(Request::get(url).body(empty()).unwrap())
        .await
        .unwrap()
}

async fn text(resp: Response<hyper::body::Incoming>) -> String {
    String::from_utf8(body_bytes(resp.into_body()).await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn no_agent_is_503_at_once_with_retry_after() {
    let server = Server::default().await;
    let started = std::time::Instant::now();
    let resp = get(format!("{}/client/nobody/x", server.url())).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(text(resp).await.contains("no relay-client is connected"));
    // "At once": well below the pickup timeout (10 s), which is the other 503.
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Refusals of bodiless requests keep an HTTP/1.1 connection; refusals of requests with a
/// body (which may be unread) and of malformed requests close it (RFC 9112 §9.6).
#[tokio::test]
async fn refusals_keep_the_connection_only_when_nothing_is_left_unread() {
    use tokio::io::AsyncWriteExt;
    let server = Server::default().await;
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let ghost = "GET /client/nobody/x HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two refusals on one connection, the second sent after the first answer arrived.
    for _ in 0..2 {
        conn.write_all(ghost.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert!(String::from_utf8_lossy(&body).contains("no relay-client is connected"));
    }
    // With a body that nobody read: answered once, then closed, even with a second request
    // pipelined behind it.
    for raw in [
        format!(
            "POST /client/nobody/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello{ghost}"
        ),
        format!("GET /client/nobody/x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n{ghost}"),
    ] {
        let out = exchange_closed(server.addr, raw.as_bytes()).await;
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
    }
}

#[tokio::test]
async fn connected_agent_that_never_picks_up_is_503_after_the_pickup_timeout() {
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let addr = backend(move |_req| {
        let r = r.clone();
        async move {
            r.notified().await;
            Response::new(full("late"))
        }
    })
    .await;
    let mut cfg = server_config();
    cfg.pickup_timeout = Duration::from_millis(300);
    cfg.response_timeout = Duration::from_secs(5);
    let server = Server::start(cfg).await;
    let mut acfg = Agent::config(&server.url(), "busy", &format!("http://{addr}"));
    acfg.max_in_flight = 1;
    let _agent = Agent::start(acfg);
    server.wait_agent("busy").await;
    // The first request occupies the agent's only slot.
    let first = tokio::spawn(get(format!("{}/client/busy/1", server.url())));
    wait_for(|| server.state.broker.in_flight() == 1).await;
    let resp = get(format!("{}/client/busy/2", server.url())).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(text(resp).await.contains("picked up"));
    release.notify_one();
    let first = first.await.unwrap();
    let status = first.status();
    assert_eq!(
        (status, text(first).await.as_str()),
        (StatusCode::OK, "late")
    );
    server.wait_idle().await;
}

#[tokio::test]
async fn unreachable_backend_is_502() {
    let (_held, dead) = refusing_addr();
    let (server, _agent) = relay_to(dead, "down").await;
    let resp = get(format!("{}/client/down/", server.url())).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(text(resp).await.contains("could not reach the backend"));
    server.wait_idle().await;
}

#[tokio::test]
async fn no_response_head_in_time_is_504() {
    let addr = backend(|_req| async {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let mut cfg = server_config();
    cfg.response_timeout = Duration::from_millis(500);
    let server = Server::start(cfg).await;
    let _agent = Agent::start(Agent::config(
        &server.url(),
        "slow",
        &format!("http://{addr}"),
    ));
    server.wait_agent("slow").await;
    let resp = get(format!("{}/client/slow/", server.url())).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(text(resp).await.contains("did not answer"));
    server.wait_idle().await;
}

#[tokio::test]
async fn backend_statuses_headers_and_bodies_pass_through() {
    let addr = backend(|req: Request<hyper::body::Incoming>| async move {
        let code: u16 = req.uri().path()[1..].parse().unwrap();
        Response::builder()
            .status(code)
            .header("x-from-backend", code.to_string())
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(full(format!("status {code}")))
            .unwrap()
    })
    .await;
    let (server, _agent) = relay_to(addr, "s").await;
    for code in [
        200u16, 201, 204, 301, 304, 400, 404, 418, 500, 502, 503, 504,
    ] {
        let resp = get(format!("{}/client/s/{code}", server.url())).await;
        assert_eq!(resp.status().as_u16(), code);
        assert_eq!(resp.headers()["x-from-backend"], code.to_string().as_str());
        let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        let body = text(resp).await;
        if code != 204 && code != 304 {
            assert_eq!(body, format!("status {code}"));
        }
    }
    server.wait_idle().await;
}

/// A backend that sends one chunk and then stalls forever.
async fn half_then_stall() -> std::net::SocketAddr {
    backend(|_req| async {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
        tokio::spawn(async move {
            tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
                b"first part",
            ))))
            .await
            .unwrap();
            tx.closed().await;
        });
        Response::new(http_body_util::StreamBody::new(ReceiverStream(rx)).boxed_unsync())
    })
    .await
}

#[tokio::test]
async fn agent_killed_mid_body_aborts_the_response_http1_and_http2() {
    for h2 in [false, true] {
        let addr = half_then_stall().await;
        let server = Server::default().await;
        let agent = Agent::start(Agent::config(&server.url(), "k", &format!("http://{addr}")));
        server.wait_agent("k").await;
        let c = if h2 { h2_client() } else { client() };
        let resp = c
            .request(
                Request::get(format!("{}/client/k/", server.url()))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first part");
        agent.kill();
        // The rest of the body is an error, never a clean end.
        let mut outcome = Ok(());
        while let Some(f) = body.frame().await {
            if let Err(e) = f {
                outcome = Err(e);
                break;
            }
        }
        assert!(outcome.is_err(), "h2={h2}: the cut response ended cleanly");
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn backend_breaking_mid_body_aborts_the_response() {
    // Declares 100 bytes, sends 10, closes: hyper's client reports the body error, the
    // agent sends ABORT, the user's response is cut.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
        }
    });
    let (server, _agent) = relay_to(addr, "broken").await;
    let resp = get(format!("{}/client/broken/", server.url())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "100");
    assert!(body_bytes(resp.into_body()).await.is_err());
    server.wait_idle().await;
}

//! Go `http-relay-client` agents (protocol v1alpha1) served by the relay-server, through a
//! faithful stand-in of the Go client (`tests/stand-ins/go_http_relay_client.py`: the Go
//! toolchain it needs cannot be installed here) and, for the protocol's edges, calls made
//! by hand with the protobuf messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use relay_common::v1alpha1::{self, HttpHeader, HttpRequest, HttpResponse};
use relay_tests::procs::{go_relay_client, Proc};
use relay_tests::*;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The stand-in Go client for `name` in front of `backend`, polling `relay`.
fn go_agent(relay: SocketAddr, name: &str, backend: SocketAddr, extra: &[&str]) -> Proc {
    go_relay_client(relay, name, TOKEN, Some(backend), extra)
}

/// A server with one Go agent for `robot` in front of `backend`, connected.
async fn serve_through_go_agent(backend: SocketAddr) -> (Server, Proc) {
    let server = Server::default().await;
    let go = go_agent(server.addr, "robot", backend, &[]);
    server.wait_agent("robot").await;
    (server, go)
}

/// A GET of `url`, its response as it arrives.
async fn open(url: String) -> Response<Incoming> {
    client()
        .request(Request::get(url).body(empty()).unwrap())
        .await
        .unwrap()
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client().request(b.body(empty()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body_bytes(body).await.unwrap())
}

#[tokio::test]
async fn a_go_agent_relays_exact_targets_statuses_and_x_server_name() {
    let backend_addr = backend(|req: Request<Incoming>| async move {
        let target = req.uri().to_string();
        let status = target
            .strip_prefix("/status/")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(200);
        let host = req
            .headers()
            .get("host")
            .map(|h| h.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let custom = req
            .headers()
            .get_all("x-custom")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("|");
        Response::builder()
            .status(status)
            .header("x-target", target)
            .header("x-host", host)
            .header("x-custom", custom)
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(full(format!("status {status}")))
            .unwrap()
    })
    .await;
    let (server, _go) = serve_through_go_agent(backend_addr).await;
    let base = server.url();
    for target in [
        "/",
        "/a/b?x=1&y=%2F",
        "/a%2Fb/c%20d?q=%E2%82%AC&empty=",
        "/path;matrix=1/x",
    ] {
        let (status, h, _) = get(&format!("{base}/client/robot{target}"), &[]).await;
        assert_eq!(status, 200, "{target}");
        assert_eq!(
            h["x-target"], target,
            "the target reaches the backend byte for byte"
        );
    }
    // Multi-value headers both ways, Host preserved.
    let (_, h, _) = get(
        &format!("{base}/client/robot/h"),
        &[("x-custom", "one"), ("x-custom", "two")],
    )
    .await;
    assert_eq!(h["x-custom"], "one|two");
    assert_eq!(h["x-host"], server.addr.to_string());
    assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    // Statuses pass unchanged (the Go relay's own e2e list).
    for status in [
        201u16, 204, 301, 400, 401, 402, 403, 404, 405, 500, 501, 502, 503, 504, 505,
    ] {
        let (got, _, body) = get(&format!("{base}/client/robot/status/{status}"), &[]).await;
        assert_eq!(got.as_u16(), status);
        if status != 204 {
            assert_eq!(body, format!("status {status}"));
        }
    }
    // gRPC mode: any path with X-Server-Name.
    let (status, h, _) = get(
        &format!("{base}/pkg.Service/Method"),
        &[("x-server-name", "robot")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["x-target"], "/pkg.Service/Method");
    server.wait_idle().await;
}

#[tokio::test]
async fn a_go_agent_carries_a_2_mib_upload_and_a_50_mib_download_intact() {
    const DOWN: usize = 50 * 1024 * 1024;
    let backend_addr = backend(|req: Request<Incoming>| async move {
        if req.uri().path() == "/upload" {
            let body = body_bytes(req.into_body()).await.unwrap();
            let digest = format!("{:x}", Sha256::digest(&body));
            return Response::new(full(format!("{} {digest}", body.len())));
        }
        let (tx, body) = channel_body(4);
        tokio::spawn(async move {
            let block: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
            for _ in 0..DOWN / block.len() {
                if tx.send(data(block.clone())).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-length", DOWN.to_string())
            .body(body)
            .unwrap()
    })
    .await;
    let (server, _go) = serve_through_go_agent(backend_addr).await;
    let up: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let resp = client()
        .request(
            Request::post(format!("{}/client/robot/upload", server.url()))
                .body(full(up.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = body_bytes(resp.into_body()).await.unwrap();
    assert_eq!(
        text,
        format!("{} {:x}", up.len(), Sha256::digest(&up)).as_bytes()
    );
    let resp = open(format!("{}/client/robot/download", server.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], DOWN.to_string());
    let mut body = resp.into_body();
    let mut hash = Sha256::new();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len();
            hash.update(&d);
        }
    }
    let block: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut want = Sha256::new();
    for _ in 0..50 {
        want.update(&block);
    }
    assert_eq!(n, DOWN);
    assert_eq!(hash.finalize(), want.finalize());
    server.wait_idle().await;
}

#[tokio::test]
async fn server_sent_events_stream_through_a_go_agent() {
    // Each event is sent only once the user has the previous one: a relay that held the
    // body back would never finish.
    let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<()>(1);
    let ack_rx = Arc::new(tokio::sync::Mutex::new(ack_rx));
    let backend_addr = backend(move |_req: Request<Incoming>| {
        let ack_rx = ack_rx.clone();
        async move {
            let (tx, body) = channel_body(1);
            tokio::spawn(async move {
                let mut acks = ack_rx.lock().await;
                for i in 0..3 {
                    if tx.send(data(format!("data: event {i}\n\n"))).await.is_err() {
                        return;
                    }
                    if acks.recv().await.is_none() {
                        return;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let (server, _go) = serve_through_go_agent(backend_addr).await;
    let resp = open(format!("{}/client/robot/events", server.url())).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut got = String::new();
    for i in 0..3 {
        let want = format!("data: event {i}\n\n");
        while !got.contains(&want) {
            let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
                .await
                .unwrap_or_else(|_| panic!("event {i} did not arrive while the stream was open"))
                .unwrap()
                .unwrap();
            if let Ok(d) = frame.into_data() {
                got.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
        ack_tx.send(()).await.unwrap();
    }
    assert!(body_bytes(body).await.is_ok(), "the stream ends cleanly");
}

#[tokio::test]
async fn a_websocket_echo_switches_through_a_go_agent() {
    let echo = websocket_echo().await;
    let server = Server::default().await;
    let _go = go_agent(server.addr, "ws", echo, &[]);
    server.wait_agent("ws").await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let url = format!("ws://{}/client/ws/socket", server.addr);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        let text = format!("ping {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    // Larger than one requeststream chunk and one response message tick.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    server.wait_idle().await;
    assert_eq!(server.state.tunnels.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_and_foreign_names_are_refused_and_403_makes_the_go_client_exit() {
    let mut cfg = server_config();
    cfg.agent_tokens = vec![(
        relay_server::TokenScope::Name("robot-a".into()),
        relay_server::Secret(TOKEN.into()),
    )];
    let server = Server::start(cfg).await;
    let backend_addr = recording_backend().await.0;
    // A foreign name: 403, and the Go client exits with status 1.
    let mut go = go_agent(server.addr, "robot-b", backend_addr, &[]);
    let status = tokio::task::spawn_blocking(move || {
        go.wait_line("403");
        go.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(1));
    // A wrong token: 401, retried with backoff, never connected.
    let mut wrong = go_relay_client(server.addr, "robot-a", "not-the-token", None, &[]);
    let line = tokio::task::spawn_blocking(move || {
        let first = wrong.wait_line("poll failed: 401");
        // Backoff: it tries again.
        wrong.next_line("poll failed: 401");
        first
    })
    .await
    .unwrap();
    assert!(line.contains("invalid agent token"), "{line}");
    assert!(server.state.broker.live_backend("robot-a").is_none());
}

#[tokio::test]
async fn a_user_leaving_mid_download_stops_the_go_agent_s_backend_request() {
    let stopped = Arc::new(AtomicBool::new(false));
    let seen = stopped.clone();
    let backend_addr = backend(move |_req: Request<Incoming>| {
        let stopped = seen.clone();
        async move {
            let (tx, body) = channel_body(1);
            tokio::spawn(async move {
                // Endless: only the relay's 400 to the agent ends it.
                loop {
                    if tx.send(data(vec![b'x'; 64 * 1024])).await.is_err() {
                        stopped.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            });
            Response::new(body)
        }
    })
    .await;
    let server = Server::default().await;
    let mut go = go_agent(server.addr, "robot", backend_addr, &[]);
    server.wait_agent("robot").await;
    let resp = open(format!("{}/client/robot/endless", server.url())).await;
    let mut body = resp.into_body();
    let mut n = 0;
    while n < 4 * 1024 * 1024 {
        n += body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
    }
    drop(body);
    eventually(
        Duration::from_secs(30),
        "the backend sees its stream stopped",
        || {
            let stopped = stopped.clone();
            async move { stopped.load(Ordering::SeqCst).then_some(()) }
        },
    )
    .await;
    server.wait_idle().await;
    let line = tokio::task::spawn_blocking(move || go.wait_line("response POST got 400"))
        .await
        .unwrap();
    assert!(line.contains("duplicate or invalid request ID"), "{line}");
}

#[tokio::test]
async fn a_go_agent_and_a_native_agent_serve_side_by_side_and_show_their_protocols() {
    // The Go client reports whole milliseconds and, as Go's server does, the relay ignores
    // a 0: the echo waits 2 ms so that each of the Go agent's answers is counted.
    let backend_addr = backend(|req: Request<Incoming>| async move {
        let target = req.uri().to_string();
        let body = body_bytes(req.into_body()).await.unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(2)).await;
        Response::builder()
            .header("x-echo-target", target)
            .body(full(body))
            .unwrap()
    })
    .await;
    let server = Server::default().await;
    let _go = go_agent(
        server.addr,
        "go-robot",
        backend_addr,
        &["--num_pending_requests", "3"],
    );
    let _native = Agent::start(Agent::config(
        &server.url(),
        "native-robot",
        &format!("http://{backend_addr}"),
    ));
    server.wait_agent("go-robot").await;
    server.wait_agent("native-robot").await;
    // Concurrent requests to both.
    let mut calls = Vec::new();
    for i in 0..20 {
        let name = if i % 2 == 0 {
            "go-robot"
        } else {
            "native-robot"
        };
        let url = format!("{}/client/{name}/item/{i}", server.url());
        calls.push(tokio::spawn(async move {
            let resp = client()
                .request(Request::post(url).body(full(format!("body {i}"))).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-echo-target"], format!("/item/{i}"));
            assert_eq!(
                body_bytes(resp.into_body()).await.unwrap(),
                format!("body {i}")
            );
        }));
    }
    for c in calls {
        c.await.unwrap();
    }
    let status: serde_json::Value =
        serde_json::from_slice(&get(&format!("{}/status.json", server.url()), &[]).await.2)
            .unwrap();
    let protocol_of = |name: &str| {
        status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()["agents"][0]["protocol"]
            .clone()
    };
    assert_eq!(protocol_of("go-robot"), "v1alpha1");
    assert_eq!(protocol_of("native-robot"), native_protocol());
    let metrics = get(&format!("{}/metrics", server.url()), &[]).await.2;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains(r#"relay_agents{name="go-robot",protocol="v1alpha1"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        r#"relay_agents{{name="native-robot",protocol="{}"}} 1"#,
        native_protocol()
    )));
    assert!(
        metrics.contains("relay_backend_duration_seconds_count 10"),
        "{metrics}"
    );
}

#[tokio::test]
async fn under_a_base_path_go_and_native_agents_and_users_use_the_prefix() {
    let (backend_addr, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.base_path = Some("/apis/core.kubernetes-relay".into());
    let server = Server::start(cfg).await;
    let _go = go_agent(
        server.addr,
        "go-robot",
        backend_addr,
        &["--relay_prefix", "/apis/core.kubernetes-relay"],
    );
    let _native = Agent::start(Agent::config(
        &format!("{}/apis/core.kubernetes-relay", server.url()),
        "native-robot",
        &format!("http://{backend_addr}"),
    ));
    server.wait_agent("go-robot").await;
    server.wait_agent("native-robot").await;
    for name in ["go-robot", "native-robot"] {
        let url = format!(
            "{}/apis/core.kubernetes-relay/client/{name}/x?y=1",
            server.url()
        );
        let (status, h, _) = get(&url, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(h["x-echo-target"], "/x?y=1");
        let last = seen.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            last.headers["x-forwarded-prefix"],
            format!("/apis/core.kubernetes-relay/client/{name}")
        );
    }
    // Outside the prefix: no user routes, no agent endpoints; probes still answer.
    let (status, _, body) = get(&format!("{}/client/go-robot/x", server.url()), &[]).await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("/apis/core.kubernetes-relay/client/"));
    let (status, _, _) = get(
        &format!("{}/server/request?server=go-robot", server.url()),
        &[],
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(get(&format!("{}/healthz", server.url()), &[]).await.0, 200);
}

// ---------------------------------------------------------------- the protocol by hand

/// One agent call as the Go client makes it (no X-Relay-Protocol, a bearer token).
async fn go_call(
    server: &Server,
    method: &str,
    path_and_query: &str,
    body: Vec<u8>,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path_and_query}", server.url()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(full(body))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    (status, body_bytes(resp.into_body()).await.unwrap())
}

fn message(id: &str) -> HttpResponse {
    HttpResponse {
        id: Some(id.to_owned()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_v1alpha1_endpoints_answer_as_the_go_server_does() {
    let mut cfg = server_config();
    cfg.poll_timeout = Duration::from_millis(300);
    cfg.max_request_body = Some(1000);
    let server = Server::start(cfg).await;
    // An empty poll: 408, which the Go client re-polls at once.
    let (status, body) = go_call(&server, "GET", "/server/request?server=robot", vec![]).await;
    assert_eq!(status, 408);
    assert_eq!(body, "no request received within timeout\n");
    let (status, _) = go_call(&server, "GET", "/server/request", vec![]).await;
    assert_eq!(status, 400);
    // A response for an unknown id: 400; garbage: 400; requeststream for none: 410.
    let (status, _) = go_call(
        &server,
        "POST",
        "/server/response",
        v1alpha1::encode(&message("00000000000000000000000000000000")),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = go_call(&server, "POST", "/server/response", vec![0xff, 0xff]).await;
    assert_eq!(status, 400);
    let (status, _) = go_call(
        &server,
        "POST",
        "/server/requeststream?id=00000000000000000000000000000000",
        vec![],
    )
    .await;
    assert_eq!(status, 410);

    // A request: the poll carries method, url, host, headers and the whole body.
    let url = format!("{}/client/robot/a%2Fb?q=1", server.url());
    let user = tokio::spawn(async move {
        let req = Request::post(url)
            .header("x-a", "1")
            .body(full("hello"))
            .unwrap();
        let resp = h2_or_h1(req).await;
        resp
    });
    let poll = loop {
        let (status, body) = go_call(&server, "GET", "/server/request?server=robot", vec![]).await;
        if status == 200 {
            break v1alpha1::decode::<HttpRequest>(&body).unwrap();
        }
        assert_eq!(status, 408);
    };
    assert_eq!(poll.method.as_deref(), Some("POST"));
    assert_eq!(poll.url.as_deref(), Some("http://invalid/a%2Fb?q=1"));
    assert_eq!(poll.host.as_deref(), Some(server.addr.to_string().as_str()));
    assert_eq!(poll.body.as_deref(), Some(&b"hello"[..]));
    assert!(poll.header.contains(&HttpHeader::new("X-A", "1")));
    let id = poll.id.unwrap();
    // The answer in three messages; the trailer of a middle message goes out at the end.
    let mut first = message(&id);
    first.status_code = Some(201);
    first.header = vec![HttpHeader::new("Content-Type", "text/plain")];
    first.body = Some(Bytes::from_static(b"the"));
    let mut middle = message(&id);
    middle.body = Some(Bytes::from_static(b"-"));
    middle.trailer = vec![HttpHeader::new("X-Early", "1")];
    let mut last = message(&id);
    last.body = Some(Bytes::from_static(b"body"));
    last.eof = Some(true);
    last.trailer = vec![HttpHeader::new("X-Checksum", "abc")];
    last.backend_duration_ms = Some(12);
    for m in [first, middle, last] {
        let (status, body) =
            go_call(&server, "POST", "/server/response", v1alpha1::encode(&m)).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    }
    let resp = user.await.unwrap();
    assert_eq!(resp.status(), 201);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(collected.to_bytes(), "the-body");
    assert_eq!(trailers["x-early"], "1");
    assert_eq!(trailers["x-checksum"], "abc");
    // After the end the id is gone: 400, the Go client's signal to stop.
    let (status, _) = go_call(
        &server,
        "POST",
        "/server/response",
        v1alpha1::encode(&message(&id)),
    )
    .await;
    assert_eq!(status, 400);

    // A body over --max-request-body: 413 for the user; the poll hands nothing out.
    let url = format!("{}/client/robot/big", server.url());
    let big = tokio::spawn(async move {
        client()
            .request(Request::post(url).body(full(vec![0u8; 5000])).unwrap())
            .await
            .unwrap()
            .status()
    });
    loop {
        let (status, _) = go_call(&server, "GET", "/server/request?server=robot", vec![]).await;
        assert_eq!(status, 408, "an oversize request is never handed out");
        if big.is_finished() {
            break;
        }
    }
    assert_eq!(big.await.unwrap(), 413);

    // A first message without a status: the user gets 502 and the agent 400.
    let url = format!("{}/client/robot/nostatus", server.url());
    let user = tokio::spawn(async move { get(&url, &[]).await.0 });
    let id = loop {
        let (status, body) = go_call(&server, "GET", "/server/request?server=robot", vec![]).await;
        if status == 200 {
            break v1alpha1::decode::<HttpRequest>(&body).unwrap().id.unwrap();
        }
    };
    let mut m = message(&id);
    m.body = Some(Bytes::from_static(b"x"));
    let (status, _) = go_call(&server, "POST", "/server/response", v1alpha1::encode(&m)).await;
    assert_eq!(status, 400);
    assert_eq!(user.await.unwrap(), 502);
    server.wait_idle().await;
}

/// Sends `req` over HTTP/2 (trailers need it: hyper's HTTP/1.1 client drops them).
async fn h2_or_h1(req: Request<TestBody>) -> Response<Incoming> {
    h2_client().request(req).await.unwrap()
}

#[tokio::test]
async fn an_agent_forward_auth_service_grants_names_to_go_agents() {
    // The stand-in token service: robot tokens map to their names.
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    let service = backend(move |req: Request<Incoming>| {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            match auth.as_deref() {
                Some("Bearer oauth-robot-1") => Response::builder()
                    .header("x-relay-names", "robot-1")
                    .body(empty())
                    .unwrap(),
                _ => Response::builder().status(401).body(empty()).unwrap(),
            }
        }
    })
    .await;
    let mut cfg = server_config();
    cfg.agent_forward_auth = Some(relay_server::agent::forward_auth::AgentForwardAuthConfig {
        url: format!("http://{service}/verify").parse().unwrap(),
        names_header: http::HeaderName::from_static("x-relay-names"),
        timeout: Duration::from_secs(5),
        cache_for: Duration::from_secs(60),
    });
    let server = Server::start(cfg).await;
    let (backend_addr, _) = recording_backend().await;
    let spawn = |name: &str, token: &str| {
        go_relay_client(server.addr, name, token, Some(backend_addr), &[])
    };
    let _robot = spawn("robot-1", "oauth-robot-1");
    server.wait_agent("robot-1").await;
    for i in 0..5 {
        let (status, _, _) = get(&format!("{}/client/robot-1/{i}", server.url()), &[]).await;
        assert_eq!(status, 200);
    }
    // Verdicts are cached per credential: not one question per call.
    assert!(asked.load(Ordering::SeqCst) <= 2, "{asked:?}");
    // The granted token may not serve another name (403: the client exits), and a token
    // the service refuses gets 401.
    let mut other = spawn("robot-2", "oauth-robot-1");
    let status = tokio::task::spawn_blocking(move || {
        other.wait_line("403");
        other.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(1));
    let mut stranger = spawn("robot-1", "stolen");
    tokio::task::spawn_blocking(move || stranger.wait_line("poll failed: 401"))
        .await
        .unwrap();
}

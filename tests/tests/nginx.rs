//! An HTTP/1.1 reverse proxy with default nginx settings (request buffering on, 1 MiB body
//! limit, HTTP/1.0 upstream, response buffering on) between agent and server.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use relay_tests::procs::Nginx;
use relay_tests::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_flows_through_default_nginx() {
    // nginx drops the upgrade headers: the agent must find long polls by itself.
    everything_flows_through(Nginx::start, "relay/1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_flows_through_nginx_configured_for_websocket() {
    // The upgrade passes: a session carries the small requests; bodies still take
    // exchanges, which nginx buffers (bounded transport).
    everything_flows_through(Nginx::start_websocket, "relay/2").await;
}

async fn everything_flows_through(start: fn(std::net::SocketAddr) -> Nginx, protocol: &str) {
    let (events_tx, events_rx) = mpsc::channel::<()>(1);
    let events_rx = std::sync::Arc::new(tokio::sync::Mutex::new(events_rx));
    let addr = backend(move |req: Request<hyper::body::Incoming>| {
        let events_rx = events_rx.clone();
        async move {
            match req.uri().path() {
                "/upload" => {
                    let mut h = crc32fast::Hasher::new();
                    let mut n = 0usize;
                    let mut body = req.into_body();
                    while let Some(f) = body.frame().await {
                        if let Ok(d) = f.unwrap().into_data() {
                            n += d.len();
                            h.update(&d);
                        }
                    }
                    Response::new(full(format!("{n} {:08x}", h.finalize())))
                }
                "/download" => Response::new(full(pattern(5 << 20))),
                "/events" => {
                    let (tx, body) = channel_body(1);
                    tokio::spawn(async move {
                        let mut acks = events_rx.lock().await;
                        for i in 0..3 {
                            tx.send(data(format!("data: {i}\n\n"))).await.unwrap();
                            acks.recv().await.unwrap();
                        }
                    });
                    Response::new(body)
                }
                _ => Response::new(full("hello")),
            }
        }
    })
    .await;
    let server = Server::default().await;
    let server_addr = server.addr;
    let nginx = tokio::task::spawn_blocking(move || start(server_addr))
        .await
        .unwrap();
    let server_ref = &server;
    let cfg = Agent::config(
        &format!("http://{}", nginx.addr),
        "behind",
        &format!("http://{addr}"),
    );
    // Auto (whatever carrier the rest of the suite runs on): the agent must find out by
    // itself whether the upgrade passes, and the probe that nginx buffers request bodies.
    let mut cfg = cfg;
    cfg.transport = relay_client::Transport::Auto;
    let _agent = Agent::start(cfg);
    server_ref.wait_agent("behind").await;
    assert_eq!(
        server.state.broker.agents_per_protocol(),
        [("behind".to_owned(), protocol, 1)]
    );
    let c = client();
    let url = |p: &str| format!("{}/client/behind{p}", server.url());

    let resp = c
        .request(Request::get(url("/")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "hello");

    // 5 MiB each way: well over nginx's 1 MiB request body limit.
    let payload = pattern(5 << 20);
    let want = format!("{} {:08x}", payload.len(), crc32fast::hash(&payload));
    let resp = c
        .request(
            Request::post(url("/upload"))
                .body(full(payload.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), want.as_bytes());

    let resp = c
        .request(Request::get(url("/download")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-length"],
        (5u64 << 20).to_string().as_str()
    );
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), payload);

    // Events still arrive one by one (each is sent only after the previous one arrived).
    let resp = c
        .request(Request::get(url("/events")).body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    for i in 0..3 {
        let want = format!("data: {i}\n\n");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let f = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .expect("event stuck behind nginx")
                .unwrap()
                .unwrap();
            got.extend_from_slice(&f.into_data().unwrap());
        }
        assert_eq!(got, want.as_bytes());
        events_tx.send(()).await.unwrap();
    }
    assert!(body.frame().await.is_none());
    server.wait_idle().await;
    drop(nginx);
}

/// Deterministic, incompressible-looking bytes.
fn pattern(n: usize) -> Bytes {
    let mut v = Vec::with_capacity(n);
    let mut x: u32 = 0x1234_5678;
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v.into()
}

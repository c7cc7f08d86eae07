//! Bodies stream both ways, framing is preserved, trailers reach HTTP/2 users, requests do
//! not block each other, and a user leaving cancels the backend request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use relay_tests::*;
use tokio::sync::mpsc;

async fn relay_with(
    backend: std::net::SocketAddr,
    transport: Transport,
    h2: bool,
) -> (Server, Agent) {
    let server = Server::default().await;
    let mut cfg = Agent::config(&server.url(), "s", &format!("http://{backend}"));
    cfg.transport = transport;
    cfg.backend_http2 = h2;
    let agent = Agent::start(cfg);
    server.wait_agent("s").await;
    (server, agent)
}

#[tokio::test]
async fn upload_reaches_the_backend_while_the_user_is_still_sending() {
    for transport in [Transport::Stream, Transport::Bounded] {
        // The backend reports each piece as it arrives; the test sends the next piece only
        // after the backend saw the previous one, so buffering anywhere would deadlock.
        let (seen_tx, mut seen_rx) = mpsc::channel::<Bytes>(16);
        let addr = backend(move |req: Request<hyper::body::Incoming>| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut body = req.into_body();
                let mut total = 0usize;
                while let Some(f) = body.frame().await {
                    if let Ok(d) = f.unwrap().into_data() {
                        total += d.len();
                        seen_tx.send(d).await.unwrap();
                    }
                }
                Response::new(full(total.to_string()))
            }
        })
        .await;
        let (server, _agent) = relay_with(addr, transport, false).await;
        let (tx, body) = channel_body(1);
        let req = Request::post(format!("{}/client/s/up", server.url()))
            .body(body)
            .unwrap();
        let resp = tokio::spawn(client().request(req));
        let mut expect = 0;
        for i in 0..5u8 {
            let piece = Bytes::from(vec![i; 1000 + i as usize]);
            expect += piece.len();
            tx.send(data(piece.clone())).await.unwrap();
            let mut got = Vec::new();
            while got.len() < piece.len() {
                got.extend_from_slice(&seen_rx.recv().await.unwrap());
            }
            assert_eq!(got, piece, "{transport:?} piece {i}");
        }
        drop(tx);
        let resp = resp.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_bytes(resp.into_body()).await.unwrap(),
            expect.to_string()
        );
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    for transport in [Transport::Stream, Transport::Bounded] {
        // Each event is sent only after the user received the previous one.
        let (ack_tx, ack_rx) = mpsc::channel::<()>(1);
        let ack_rx = Arc::new(tokio::sync::Mutex::new(ack_rx));
        let addr = backend(move |_req| {
            let ack_rx = ack_rx.clone();
            async move {
                let (tx, body) = channel_body(1);
                tokio::spawn(async move {
                    let mut acks = ack_rx.lock().await;
                    for i in 0..5 {
                        tx.send(data(format!("data: event {i}\n\n"))).await.unwrap();
                        acks.recv().await.unwrap();
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap()
            }
        })
        .await;
        let (server, _agent) = relay_with(addr, transport, false).await;
        let resp = client()
            .request(
                Request::get(format!("{}/client/s/events", server.url()))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert!(resp.headers().get("content-length").is_none());
        let mut body = resp.into_body();
        for i in 0..5 {
            let mut got = Vec::new();
            let want = format!("data: event {i}\n\n");
            while got.len() < want.len() {
                let f = body.frame().await.unwrap().unwrap();
                got.extend_from_slice(&f.into_data().unwrap());
            }
            assert_eq!(String::from_utf8(got).unwrap(), want, "{transport:?}");
            ack_tx.send(()).await.unwrap();
        }
        assert!(
            body.frame().await.is_none(),
            "clean end after the last event"
        );
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn content_length_presence_is_preserved_both_ways() {
    let (rec, seen) = recording_backend().await;
    let chunked = backend(|_req| async {
        let (tx, body) = channel_body(2);
        tokio::spawn(async move {
            tx.send(data("abc")).await.unwrap();
            tx.send(data("def")).await.unwrap();
        });
        Response::new(body)
    })
    .await;
    let (server, _agent) = relay_with(rec, Transport::Auto, false).await;
    let mut cfg = Agent::config(&server.url(), "c", &format!("http://{chunked}"));
    cfg.transport = Transport::Auto;
    let _agent2 = Agent::start(cfg);
    server.wait_agent("c").await;
    let c = client();
    // Upload with a length.
    let resp = c
        .request(
            Request::post(format!("{}/client/s/cl", server.url()))
                .body(full("12345"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-length"],
        "5",
        "download length kept"
    );
    // Upload without a length (chunked).
    let (tx, body) = channel_body(2);
    tx.send(data("12")).await.unwrap();
    tx.send(data("345")).await.unwrap();
    drop(tx);
    c.request(
        Request::post(format!("{}/client/s/te", server.url()))
            .body(body)
            .unwrap(),
    )
    .await
    .unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].headers["content-length"], "5");
        assert!(seen[0].headers.get("transfer-encoding").is_none());
        assert!(
            seen[1].headers.get("content-length").is_none(),
            "no invented length"
        );
        assert_eq!(seen[1].headers["transfer-encoding"], "chunked");
        assert_eq!(seen[1].body, "12345");
    }
    // A download without a length stays without one.
    let resp = c
        .request(
            Request::get(format!("{}/client/c/", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "abcdef");
}

#[tokio::test]
async fn trailers_and_trailers_only_responses_reach_http2_users() {
    for transport in [Transport::Stream, Transport::Bounded] {
        let addr = backend(|req: Request<hyper::body::Incoming>| async move {
            if req.uri().path() == "/fail" {
                // gRPC Trailers-Only: status in the head, no body.
                return Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "not found")
                    .body(empty())
                    .unwrap();
            }
            let (tx, body) = channel_body(4);
            tokio::spawn(async move {
                tx.send(data(Bytes::from_static(b"\0\0\0\0\x02hi")))
                    .await
                    .unwrap();
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "ok".parse().unwrap());
                tx.send(Ok(Frame::trailers(t))).await.unwrap();
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap()
        })
        .await;
        let (server, _agent) = relay_with(addr, transport, true).await;
        let c = h2_client();
        let resp = c
            .request(
                Request::post(format!("{}/pkg.Svc/Ok", server.url()))
                    .header("x-server-name", "s")
                    .header("te", "trailers")
                    .header("content-type", "application/grpc")
                    .body(full(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut payload = Vec::new();
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            let f = f.unwrap();
            match f.into_data() {
                Ok(d) => payload.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert_eq!(payload, b"\0\0\0\0\x02hi");
        let trailers = trailers.expect("trailers reached the user");
        assert_eq!(trailers["grpc-status"], "0", "{transport:?}");
        assert_eq!(trailers["grpc-message"], "ok");

        let resp = c
            .request(
                Request::post(format!("{}/fail", server.url()))
                    .header("x-server-name", "s")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.headers()["grpc-status"], "5");
        let body = resp.into_body();
        assert!(
            hyper::body::Body::is_end_stream(&body),
            "trailers-only stays headers-only"
        );
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn one_stalled_request_does_not_delay_ninety_nine_others() {
    let addr = backend(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/stall" {
            std::future::pending::<()>().await;
        }
        Response::new(full(req.uri().path().to_owned()))
    })
    .await;
    let (server, _agent) = relay_with(addr, Transport::Auto, false).await;
    let c = client();
    let stalled = tokio::spawn(
        c.request(
            Request::get(format!("{}/client/s/stall", server.url()))
                .body(empty())
                .unwrap(),
        ),
    );
    wait_for(|| server.state.broker.in_flight() == 1).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..99 {
        let c = c.clone();
        let url = format!("{}/client/s/r{i}", server.url());
        set.spawn(async move {
            let resp = c
                .request(Request::get(url).body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            body_bytes(resp.into_body()).await.unwrap()
        });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap().starts_with(b"/r"));
        n += 1;
    }
    assert_eq!(n, 99);
    assert!(
        !stalled.is_finished(),
        "the stalled request is still waiting"
    );
    stalled.abort();
    server.wait_idle().await;
}

/// A backend whose handler reports when it is dropped (hyper drops it when the request's
/// connection or stream goes away).
async fn cancel_watching_backend() -> (std::net::SocketAddr, mpsc::Receiver<&'static str>) {
    let (tx, rx) = mpsc::channel(8);
    let addr = backend(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            struct OnDrop(mpsc::Sender<&'static str>);
            impl Drop for OnDrop {
                fn drop(&mut self) {
                    let _ = self.0.try_send("dropped");
                }
            }
            let guard = OnDrop(tx.clone());
            tx.send("started").await.unwrap();
            // Read the upload as a real handler would; report how it ended.
            if req.method() == http::Method::POST {
                let mut body = req.into_body();
                loop {
                    match body.frame().await {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) => tx.send("upload failed").await.unwrap(),
                        None => tx.send("upload ended").await.unwrap(),
                    }
                    break;
                }
            }
            std::future::pending::<()>().await;
            drop(guard);
            unreachable!()
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn user_disconnect_cancels_the_backend_request() {
    for h2 in [false, true] {
        let (addr, mut events) = cancel_watching_backend().await;
        let (server, _agent) = relay_with(addr, Transport::Auto, false).await;
        let c = if h2 { h2_client() } else { client() };
        let req = c.request(
            Request::get(format!("{}/client/s/wait", server.url()))
                .body(empty())
                .unwrap(),
        );
        let user = tokio::spawn(req);
        assert_eq!(events.recv().await, Some("started"));
        user.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            got,
            Ok(Some("dropped")),
            "h2={h2}: backend request not cancelled"
        );
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn user_disconnect_during_upload_cancels_the_backend_request() {
    let (addr, mut events) = cancel_watching_backend().await;
    let (server, _agent) = relay_with(addr, Transport::Auto, false).await;
    // A raw connection, so the disconnect happens mid-upload for sure.
    use tokio::io::AsyncWriteExt;
    let mut user = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    user.write_all(
        b"POST /client/s/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n",
    )
    .await
    .unwrap();
    assert_eq!(events.recv().await, Some("started"));
    drop(user);
    // The backend's upload fails (never looks complete) and its request is then dropped.
    let got = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(got, Ok(Some("upload failed")));
    server.wait_idle().await;
}

#[tokio::test]
async fn two_agents_share_a_name_and_survive_one_dying() {
    let hits = Arc::new(Mutex::new([0usize; 2]));
    let mut addrs = Vec::new();
    for i in 0..2 {
        let hits = hits.clone();
        addrs.push(
            backend(move |req: Request<hyper::body::Incoming>| {
                let hits = hits.clone();
                async move {
                    hits.lock().unwrap()[i] += 1;
                    if req.uri().path() == "/hold" {
                        std::future::pending::<()>().await;
                    }
                    Response::new(full(format!("backend {i}")))
                }
            })
            .await,
        );
    }
    let server = Server::default().await;
    let mk = |a: std::net::SocketAddr| {
        let mut cfg = Agent::config(&server.url(), "shared", &format!("http://{a}"));
        cfg.pollers = 2;
        Agent::start(cfg)
    };
    let a0 = mk(addrs[0]);
    let a1 = mk(addrs[1]);
    // Both agents registered: on a loaded machine the second can connect after the first
    // has served all the batches below (it failed that way twice, [800, 0] in 0.36 s).
    wait_for(|| {
        server
            .state
            .broker
            .agents_per_name()
            .iter()
            .any(|(n, agents)| n == "shared" && *agents == 2)
    })
    .await;
    let c = client();
    let url = |p: &str| format!("{}/client/shared/{p}", server.url());
    // Until both backends answered at least once (both agents take work). In batches of
    // eight at once: one request at a time may all go to one agent on long polls, since
    // the agent that just answered re-polls while the next request arrives and takes it
    // before the parked poll woken for it runs. That is the broker serving whoever asks
    // first, not a lost agent.
    for _ in 0..100 {
        let batch = (0..8).map(|_| {
            let c = c.clone();
            let req = Request::get(url("x")).body(empty()).unwrap();
            async move {
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                body_bytes(resp.into_body()).await.unwrap();
            }
        });
        futures_util::future::join_all(batch).await;
        let h = *hits.lock().unwrap();
        if h[0] > 0 && h[1] > 0 {
            break;
        }
    }
    let h = *hits.lock().unwrap();
    assert!(h[0] > 0 && h[1] > 0, "load not shared: {h:?}");
    // The agent holding a request dies: that request fails with 502, new ones all go to
    // the survivor.
    let before = *hits.lock().unwrap();
    let held = tokio::spawn(c.request(Request::get(url("hold")).body(empty()).unwrap()));
    wait_for(|| hits.lock().unwrap().iter().sum::<usize>() > before.iter().sum::<usize>()).await;
    let holder = if hits.lock().unwrap()[0] > before[0] {
        0
    } else {
        1
    };
    let (dying, survivor) = if holder == 0 { (a0, a1) } else { (a1, a0) };
    dying.kill();
    let resp = held.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body_bytes(resp.into_body()).await.unwrap())
            .contains("disconnected")
    );
    let survivor_hits = hits.lock().unwrap()[1 - holder];
    for _ in 0..10 {
        let resp = c
            .request(Request::get(url("y")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_bytes(resp.into_body()).await.unwrap();
    }
    assert_eq!(hits.lock().unwrap()[1 - holder], survivor_hits + 10);
    drop(survivor);
    server.wait_idle().await;
}

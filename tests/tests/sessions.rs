//! Agent sessions (protocol 2): the endpoint's refusals, the frames by hand (credit, whole
//! responses, cancel notices, pings, a lying RESPONSE, a frame in the wrong direction), and
//! faults on a session (the agent killed with 100 requests in flight, the session's
//! connection cut while answers are pending, a user stalling one download while small
//! requests flow, response exchanges refused while the session stands).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use relay_common::message::{BodyKind, ResponseHead};
use relay_common::session::{self, Frame};
use relay_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a session by hand for `name`.
async fn open(server: &Server, name: &str) -> Ws {
    open_query(server, &format!("server={name}")).await
}

/// Opens a session by hand with the query `query`.
async fn open_query(server: &Server, query: &str) -> Ws {
    let mut req = format!("ws://{}/server/session?{query}", server.addr)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    h.insert("x-relay-agent-id", "by-hand".parse().unwrap());
    h.insert("x-relay-protocol", "2".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn send(ws: &mut Ws, put: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    put(&mut b);
    ws.send(Message::Binary(b.freeze())).await.unwrap();
}

/// The next session frame from the server (pings by the library are skipped).
async fn next_frame(ws: &mut Ws, pending: &mut Vec<Frame>) -> Frame {
    loop {
        if !pending.is_empty() {
            return pending.remove(0);
        }
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no frame from the server")
            .expect("session closed")
            .unwrap();
        if let Message::Binary(b) = msg {
            *pending = session::decode(b, session::Heads::Json).unwrap();
        }
    }
}

async fn next_open(ws: &mut Ws, pending: &mut Vec<Frame>) -> relay_common::message::RequestHead {
    loop {
        match next_frame(ws, pending).await {
            Frame::Open(h) => return h,
            Frame::Ping(_) | Frame::Ack(_) => {}
            f => panic!("expected OPEN, got {f:?}"),
        }
    }
}

fn head(status: u16, len: u64) -> ResponseHead {
    ResponseHead {
        status,
        headers: vec![("content-type".into(), "text/plain".into())].into(),
        body: BodyKind::Stream,
        content_length: Some(len),
    }
}

#[tokio::test]
async fn the_session_endpoint_wants_a_websocket_and_a_valid_agent() {
    let server = Server::default().await;
    let c = client();
    let call = |auth: Option<&str>, upgrade: bool| {
        let mut b = Request::get(format!("{}/server/session?server=s", server.url()))
            .header("x-relay-agent-id", "a1")
            .header("x-relay-protocol", "2");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        if upgrade {
            b = b
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "8")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        c.request(b.body(empty()).unwrap())
    };
    // No upgrade (what a proxy that drops the headers delivers): 426 naming websocket.
    let r = call(Some(&format!("Bearer {TOKEN}")), false).await.unwrap();
    assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(r.headers()["upgrade"], "websocket");
    let text = body_bytes(r.into_body()).await.unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("WebSocket"),
        "{text:?}"
    );
    // A version other than 13.
    let r = call(Some(&format!("Bearer {TOKEN}")), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
    // The token is checked before anything else.
    let r = call(Some("Bearer wrong"), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(server.state.broker.agents().is_empty());
}

#[tokio::test]
async fn frames_by_hand_credit_whole_responses_cancels_and_pings() {
    let server = Server::default().await;
    let mut ws = open(&server, "hand").await;
    let mut pending = Vec::new();
    server.wait_agent("hand").await;
    assert_eq!(
        server.state.broker.agents_per_protocol(),
        [("hand".to_owned(), "relay/2", 1)]
    );
    let get = |path: &str| {
        client().request(
            Request::get(format!("{}/client/hand{path}", server.url()))
                .body(empty())
                .unwrap(),
        )
    };
    // Two users, one credit: one OPEN; the other request waits in the queue.
    send(&mut ws, |b| session::put_credit(b, 1)).await;
    let first = tokio::spawn(get("/one"));
    let second = tokio::spawn(get("/two"));
    let h1 = next_open(&mut ws, &mut pending).await;
    wait_for(|| server.state.broker.parked() == 1).await;
    assert!(!pending.iter().any(|f| matches!(f, Frame::Open(_))));
    // A whole response: status, headers and body reach the user.
    send(&mut ws, |b| {
        session::put_response(
            b,
            session::Heads::Json,
            &h1.id,
            &head(201, 5),
            b"hello",
            None,
        )
    })
    .await;
    // The server acknowledges it (the agent may forget it).
    loop {
        match next_frame(&mut ws, &mut pending).await {
            Frame::Ack(n) => {
                assert_eq!(n, 1);
                break;
            }
            Frame::Ping(_) => {}
            f => panic!("expected ACK, got {f:?}"),
        }
    }
    // More credit: the second request comes down. Its RESPONSE lies about its length:
    // the user's body must break, never end as if complete.
    send(&mut ws, |b| session::put_credit(b, 2)).await;
    let h2 = next_open(&mut ws, &mut pending).await;
    assert_ne!(h1.target, h2.target);
    send(&mut ws, |b| {
        session::put_response(
            b,
            session::Heads::Json,
            &h2.id,
            &head(200, 10),
            b"short",
            None,
        )
    })
    .await;
    for (r, h) in [(first, &h1), (second, &h2)] {
        let resp = r.await.unwrap().unwrap();
        let body = body_bytes(resp.into_body()).await;
        if h.target == "/one" {
            assert_eq!(body.unwrap(), "hello");
        } else {
            assert!(body.is_err(), "a lying RESPONSE must break the body");
        }
    }
    // A user who leaves: its id comes down as CANCEL.
    let gone = tokio::spawn(get("/leaving"));
    let h3 = next_open(&mut ws, &mut pending).await;
    gone.abort();
    loop {
        match next_frame(&mut ws, &mut pending).await {
            Frame::Cancel(id) => {
                assert_eq!(id, h3.id);
                break;
            }
            Frame::Ping(_) | Frame::Ack(_) => {}
            f => panic!("expected CANCEL, got {f:?}"),
        }
    }
    // PING is answered with the same bytes.
    send(&mut ws, |b| session::put_ping(b, *b"12345678", false)).await;
    loop {
        match next_frame(&mut ws, &mut pending).await {
            Frame::Pong(d) => {
                assert_eq!(&d, b"12345678");
                break;
            }
            Frame::Ping(_) | Frame::Ack(_) => {}
            f => panic!("expected PONG, got {f:?}"),
        }
    }
    server.wait_idle().await;
    // A frame in the wrong direction ends the session (a GOAWAY, then the close).
    send(&mut ws, |b| session::put_cancel(b, "00")).await;
    let mut saw_goaway = false;
    while let Some(Ok(msg)) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("the session did not end")
    {
        if let Message::Binary(b) = msg {
            saw_goaway |= session::decode(b, session::Heads::Json)
                .unwrap()
                .iter()
                .any(|f| matches!(f, Frame::GoAway(_)));
        }
    }
    assert!(saw_goaway);
}

/// A backend whose `/hold` requests wait for `release`; other paths answer at once.
async fn holding_backend(release: tokio::sync::watch::Receiver<bool>) -> std::net::SocketAddr {
    backend(move |req: Request<hyper::body::Incoming>| {
        let mut rx = release.clone();
        async move {
            if req.uri().path() == "/hold" {
                let _ = rx.wait_for(|v| *v).await;
            }
            if req.uri().path() == "/big" {
                return Response::new(full(Bytes::from(vec![7u8; 32 << 20])));
            }
            Response::new(full("done"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_100_requests_on_its_session_fails_each_visibly() {
    let (_release, rx) = tokio::sync::watch::channel(false);
    let addr = holding_backend(rx).await;
    let mut cfg = server_config();
    cfg.agent_grace = Duration::from_secs(1);
    let server = Server::start(cfg).await;
    let mut acfg = Agent::config(&server.url(), "k", &format!("http://{addr}"));
    acfg.transport = relay_client::Transport::Websocket;
    let agent = Agent::start(acfg);
    server.wait_agent("k").await;
    let users: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(
                client().request(
                    Request::get(format!("{}/client/k/hold", server.url()))
                        .body(empty())
                        .unwrap(),
                ),
            )
        })
        .collect();
    wait_for(|| server.state.broker.in_flight() == 100 && server.state.broker.parked() == 0).await;
    agent.kill();
    for u in users {
        let resp = tokio::time::timeout(Duration::from_secs(30), u)
            .await
            .expect("a request of the dead agent hung")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pending_when_the_session_is_cut_arrive_through_exchanges() {
    let (release, rx) = tokio::sync::watch::channel(false);
    let addr = holding_backend(rx).await;
    let server = Server::default().await;
    // The agent reaches the server through a proxy that can cut its connections.
    let cut = cuttable_proxy(server.addr).await;
    let mut acfg = Agent::config(
        &format!("http://{}", cut.addr),
        "c",
        &format!("http://{addr}"),
    );
    acfg.transport = relay_client::Transport::Websocket;
    let _agent = Agent::start(acfg);
    server.wait_agent("c").await;
    let users: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(
                client().request(
                    Request::get(format!("{}/client/c/hold", server.url()))
                        .body(empty())
                        .unwrap(),
                ),
            )
        })
        .collect();
    wait_for(|| server.state.broker.in_flight() == 50 && server.state.broker.parked() == 0).await;
    // Every connection between agent and server goes (the session among them); then the
    // backend answers: the agent, alive, delivers through exchanges and a new session.
    cut.cut_all();
    release.send(true).unwrap();
    for u in users {
        let resp = tokio::time::timeout(Duration::from_secs(30), u)
            .await
            .expect("an answer was lost with the session")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "done");
    }
    server.wait_idle().await;
}

/// A proxy to `upstream` that carries only session connections (`/server/session`, and the
/// probe before) and closes any other once it has read its request line, unanswered, as a relay-server does
/// past its connection limits.
async fn sessions_only(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut start = [0u8; 64];
                let mut n = 0;
                while n < start.len() && !start[..n].contains(&b'\n') {
                    match down.read(&mut start[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                // The probe before the session, too (its body never ends: hyper closes
                // its connection after it, so no exchange can reuse it).
                let line = &start[..n];
                if !line.starts_with(b"GET /server/session")
                    && !line.starts_with(b"POST /server/probe")
                {
                    return;
                }
                let mut up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                up.write_all(&start[..n]).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_cannot_reach_the_server_is_a_502_on_the_session_at_once() {
    let (_release, rx) = tokio::sync::watch::channel(false);
    let addr = holding_backend(rx).await;
    let mut cfg = server_config();
    // Far beyond the test's bound: the answer must not be the timeout's.
    cfg.response_timeout = Duration::from_secs(600);
    let server = Server::start(cfg).await;
    // The agent's session gets through; its exchanges are refused.
    let front = sessions_only(server.addr).await;
    let mut acfg = Agent::config(&format!("http://{front}"), "r", &format!("http://{addr}"));
    acfg.transport = relay_client::Transport::Websocket;
    let _agent = Agent::start(acfg);
    server.wait_agent("r").await;
    // A small answer goes back on the session.
    let small = client()
        .request(
            Request::get(format!("{}/client/r/small", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(small.status(), StatusCode::OK);
    // A big one needs a response exchange, which cannot get through: the user is told.
    let big = client().request(
        Request::get(format!("{}/client/r/big", server.url()))
            .body(empty())
            .unwrap(),
    );
    let resp = tokio::time::timeout(Duration::from_secs(60), big)
        .await
        .expect("the user waited for the response timeout")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let text = body_bytes(resp.into_body()).await.unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("could not send the response to the relay-server"),
        "{text}"
    );
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_flow_while_a_user_stalls_a_big_download() {
    let (_release, rx) = tokio::sync::watch::channel(false);
    let addr = holding_backend(rx).await;
    let (server, _agent) = relay_to(addr, "f").await;
    // A user asks for 32 MiB and reads nothing.
    let stalled = client()
        .request(
            Request::get(format!("{}/client/f/big", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stalled.status(), StatusCode::OK);
    // 50 small requests on the same agent all finish meanwhile (fewer than the queue
    // limit of a name, 100, even if all wait at once).
    let small: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(
                client().request(
                    Request::get(format!("{}/client/f/small", server.url()))
                        .body(empty())
                        .unwrap(),
                ),
            )
        })
        .collect();
    for s in small {
        let resp = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("a small request waited behind the stalled download")
            .unwrap()
            .unwrap();
        assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "done");
    }
    drop(stalled);
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_the_server_never_wrote_go_back_to_the_queue_when_the_session_dies() {
    let addr = backend(|_req| async { Response::new(full("fresh")) }).await;
    let mut cfg = server_config();
    cfg.agent_grace = Duration::from_secs(1);
    let server = Server::start(cfg).await;
    // A session that takes 200 requests on credit and reads nothing, over a connection
    // with a small receive buffer: 200 OPENs of 40 KiB each (8 MiB) cannot all be written
    // (Linux buffers at most 4 MiB on the sending side by default, tcp_wmem).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(server.addr).await.unwrap();
    let mut req = format!("ws://{}/server/session?server=q", server.addr)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    h.insert("x-relay-agent-id", "stuck".parse().unwrap());
    h.insert("x-relay-protocol", "2".parse().unwrap());
    let (mut stuck, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    send(&mut stuck, |b| session::put_credit(b, 1000)).await;
    server.wait_agent("q").await;
    let pad = "p".repeat(40 * 1024);
    let users: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(
                client().request(
                    Request::get(format!("{}/client/q/", server.url()))
                        .header("x-pad", &pad)
                        .body(empty())
                        .unwrap(),
                ),
            )
        })
        .collect();
    wait_for(|| server.state.broker.in_flight() == 200 && server.state.broker.parked() == 0).await;
    // A working agent joins; then the stuck session's connection is reset.
    let mut acfg = Agent::config(&server.url(), "q", &format!("http://{addr}"));
    acfg.transport = relay_client::Transport::Websocket;
    let _agent = Agent::start(acfg);
    wait_for(|| {
        let agents = server.state.broker.agents_per_name();
        agents.iter().any(|(n, count)| n == "q" && *count == 2)
    })
    .await;
    stuck.get_ref().set_zero_linger().unwrap();
    drop(stuck);
    // Requests whose OPEN never left the server are served by the other agent; ones that
    // were written fail with 502 when the stuck agent's grace ends. None waits for the
    // 60 s response timeout.
    let (mut served, mut failed) = (0, 0);
    for u in users {
        let resp = tokio::time::timeout(Duration::from_secs(30), u)
            .await
            .expect("a request was neither put back nor failed")
            .unwrap()
            .unwrap();
        match resp.status() {
            StatusCode::OK => {
                assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "fresh");
                served += 1;
            }
            StatusCode::BAD_GATEWAY => failed += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(served >= 50, "{served} served, {failed} failed");
    server.wait_idle().await;
}

#[tokio::test]
async fn a_newer_session_of_the_same_agent_and_slot_supersedes_the_old_one() {
    let server = Server::default().await;
    let mut first = open_query(&server, "server=s&slot=0").await;
    let mut other_slot = open_query(&server, "server=s&slot=1").await;
    let mut pending = Vec::new();
    // The agent gave up on its first session (black-holed, say) and opens another in the
    // same slot: the server ends the old one, which would otherwise go on claiming work.
    let _second = open_query(&server, "server=s&slot=0").await;
    loop {
        match next_frame(&mut first, &mut pending).await {
            Frame::GoAway(why) => {
                assert!(why.contains("superseded"), "{why}");
                break;
            }
            Frame::Ping(_) => {}
            f => panic!("expected GOAWAY, got {f:?}"),
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the superseded session was not closed");
    // Another slot (another relay URL of the agent) is left alone.
    send(&mut other_slot, |b| {
        session::put_ping(b, *b"12345678", false)
    })
    .await;
    let mut pending = Vec::new();
    assert!(matches!(
        next_frame(&mut other_slot, &mut pending).await,
        Frame::Pong(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_notices_a_black_holed_session_and_serves_again_through_a_new_one() {
    let addr = backend(|_req| async { Response::new(full("fresh")) }).await;
    let server = Server::default().await;
    let path = cuttable_proxy(server.addr).await;
    let mut acfg = Agent::config(
        &format!("http://{}", path.addr),
        "b",
        &format!("http://{addr}"),
    );
    acfg.transport = relay_client::Transport::Websocket;
    acfg.poll_deadline = Duration::from_secs(2);
    let _agent = Agent::start(acfg);
    server.wait_agent("b").await;
    let get = || async {
        let req = Request::get(format!("{}/client/b/", server.url()))
            .body(empty())
            .unwrap();
        // A request the dead session claimed waits for the response timeout: give up on
        // it and ask again (the user leaving cancels it).
        match tokio::time::timeout(Duration::from_millis(500), client().request(req)).await {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => Some(()),
            _ => None,
        }
    };
    eventually(Duration::from_secs(20), "a first answer", get).await;
    // The path goes silent for good: only a new session (a new connection) can serve.
    path.stall_all();
    eventually(
        Duration::from_secs(30),
        "an answer after the black hole",
        get,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_lost_in_a_black_holed_session_are_served_through_the_next_one() {
    let addr = backend(|_req| async { Response::new(full("fresh")) }).await;
    let server = Server::default().await;
    let path = cuttable_proxy(server.addr).await;
    let mut acfg = Agent::config(
        &format!("http://{}", path.addr),
        "r",
        &format!("http://{addr}"),
    );
    acfg.transport = relay_client::Transport::Websocket;
    acfg.poll_deadline = Duration::from_secs(2);
    let _agent = Agent::start(acfg);
    server.wait_agent("r").await;
    let get = || {
        client().request(
            Request::get(format!("{}/client/r/", server.url()))
                .body(empty())
                .unwrap(),
        )
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    // The path goes silent: the server still believes in the session and writes these
    // requests' OPENs into it; the agent never reads them.
    path.stall_all();
    let users: Vec<_> = (0..5).map(|_| tokio::spawn(get())).collect();
    // The agent gives the session up after its deadline and says on the next one how many
    // OPENs it got: the server puts the rest back, and they are served now rather than
    // failing at the 60 s response timeout.
    for u in users {
        let resp = tokio::time::timeout(Duration::from_secs(30), u)
            .await
            .expect("a request lost in the black hole was not put back")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "fresh");
    }
}

/// Opens a session by hand for `name`, offering the subprotocols `offer`; returns the one
/// the server chose.
async fn open_offering(server: &Server, name: &str, offer: &str) -> (Ws, Option<String>) {
    let mut req = format!("ws://{}/server/session?server={name}", server.addr)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    h.insert(
        "x-relay-agent-id",
        format!("by-hand-{name}").parse().unwrap(),
    );
    h.insert("x-relay-protocol", "2".parse().unwrap());
    h.insert("sec-websocket-protocol", offer.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

#[tokio::test]
async fn binary_heads_when_the_agent_offers_them_json_otherwise() {
    let server = Server::default().await;
    let (json, chosen) = open_offering(&server, "j", "relay-session.v2").await;
    assert_eq!(chosen.as_deref(), Some("relay-session.v2"));
    drop(json);
    let offer = "relay-session.v3, relay-session.v2";
    let (mut ws, chosen) = open_offering(&server, "bin", offer).await;
    assert_eq!(chosen.as_deref(), Some("relay-session.v3"));
    server.wait_agent("bin").await;
    send(&mut ws, |b| session::put_credit(b, 1)).await;
    // A header value with a byte above 0x7F (RFC 9110 §5.5 obs-text) both ways.
    let user = tokio::spawn(
        client().request(
            Request::get(format!("{}/client/bin/x?y=1", server.url()))
                .header("x-a", http::HeaderValue::from_bytes(b"caf\xe9").unwrap())
                .body(empty())
                .unwrap(),
        ),
    );
    let open = 'open: loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no OPEN from the server")
            .expect("session closed")
            .unwrap();
        if let Message::Binary(b) = msg {
            for f in session::decode(b, session::Heads::Binary).unwrap() {
                if let Frame::Open(h) = f {
                    break 'open h;
                }
            }
        }
    };
    assert_eq!(
        (open.method.as_str(), open.target.as_str()),
        ("GET", "/x?y=1")
    );
    assert_eq!(open.headers.to_map().unwrap()["x-a"].as_bytes(), b"caf\xe9");
    let rh = ResponseHead {
        status: 201,
        headers: vec![("x-b".into(), "\u{ff}".into())].into(),
        body: BodyKind::Stream,
        content_length: Some(5),
    };
    let heads = session::Heads::Binary;
    send(&mut ws, |b| {
        session::put_response(b, heads, &open.id, &rh, b"hello", None)
    })
    .await;
    let resp = user.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-b"].as_bytes(), b"\xff");
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "hello");
    drop(ws);
    server.wait_idle().await;
}

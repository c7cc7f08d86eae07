//! Shards (`--shards`): sessions placed on a shard, plain HTTP/1.1 users handed to their
//! name's shard with the bytes already read (pipelined requests, bodies in the same
//! packet), HTTP/2 by its first HEADERS frame, TLS connections after their handshake (with
//! what a client certificate grants), and what stays on the main runtime (names without a
//! session, heads the shards do not read).

use std::time::Duration;

use http::{Request, StatusCode};
use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server with two shards and a recording backend's agent for `a`, on a session (the
/// long-poll suite's agents have no session, so nothing is placed for them).
async fn sharded() -> (Server, Agent) {
    let (backend, _seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.shards = 2;
    let server = Server::start(cfg).await;
    let mut agent = Agent::config(&server.url(), "a", &format!("http://{backend}"));
    agent.transport = relay_client::Transport::Websocket;
    let agent = Agent::start(agent);
    server.wait_agent("a").await;
    (server, agent)
}

fn placement(server: &Server) -> &relay_server::base::placement::Placement {
    server.state.placement.as_deref().expect("shards are on")
}

#[tokio::test]
async fn a_user_connection_follows_its_name_s_session_onto_its_shard_with_what_was_read() {
    let (server, _agent) = sharded().await;
    let p = placement(&server);
    let home = p.home("a").expect("the session recorded its shard");
    assert_eq!(p.load(home), 1);
    let at_start = server.state.metrics.shard_handoffs();
    // Two requests in one write, the first with a body: everything read before the hand-over
    // reaches the shard in order.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /client/a/one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /client/a/two HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, b"hello");
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    // The user's connection, and an exchange the agent may have used for the body.
    let before = server.state.metrics.shard_handoffs();
    assert!(before > at_start);
    // The connection stays usable on its shard, for any name.
    s.write_all(b"GET /client/nobody/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    // X-Server-Name routes the same way.
    let mut g = TcpStream::connect(server.addr).await.unwrap();
    g.write_all(b"GET /pkg.Svc/Call HTTP/1.1\r\nHost: x\r\nX-Server-Name: a\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut g).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(server.state.metrics.shard_handoffs(), before + 1);
    // A name without a session stays where it was accepted.
    let mut n = TcpStream::connect(server.addr).await.unwrap();
    n.write_all(b"GET /client/nobody/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut n).await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert_eq!(server.state.metrics.shard_handoffs(), before + 1);
    // HTTP/2 with prior knowledge goes by its first HEADERS frame (HPACK-coded, by a real
    // client), with the name in the path or in X-Server-Name.
    let h2 = h2_client();
    for (path, header) in [("/client/a/h2", None), ("/pkg.Svc/Call", Some("a"))] {
        let mut req = Request::get(format!("{}{path}", server.url()));
        if let Some(name) = header {
            req = req.header("x-server-name", name);
        }
        let resp = h2.request(req.body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(
        server.state.metrics.shard_handoffs(),
        before + 2,
        "one HTTP/2 connection, placed"
    );
    let other = h2_client();
    let resp = other
        .request(
            Request::get(format!("{}/pkg.Svc/Call", server.url()))
                .header("x-server-name", "a")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(server.state.metrics.shard_handoffs(), before + 3);
    // An HTTP/2 client that waits for the server's SETTINGS before its first request is
    // served where it was accepted after a short wait, not held for the header read
    // timeout (10 s).
    let mut w = TcpStream::connect(server.addr).await.unwrap();
    w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), w.read_exact(&mut frame))
        .await
        .expect("the server sent no SETTINGS")
        .unwrap();
    assert_eq!(frame[3], 0x4, "the server's SETTINGS frame");
    assert_eq!(server.state.metrics.shard_handoffs(), before + 3);
    server.wait_idle().await;
}

#[tokio::test]
async fn heads_the_shards_do_not_place_are_judged_as_before() {
    let (backend, _seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.shards = 2;
    cfg.header_read_timeout = Duration::from_millis(300);
    cfg.max_head_bytes = 16 * 1024;
    let (server, _agent) = relay_with(cfg, backend, "a").await;
    // The agent's own connections (a session, or long polls).
    let agents = server.state.conns.open();
    // A head that never ends: closed after the header read timeout, unanswered.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /client/a/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out))
        .await
        .expect("the half head kept its connection")
        .unwrap();
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    // A head over the limit: hyper's 431, as without shards.
    let big = format!(
        "GET /client/a/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let text = exchange_closed(server.addr, big.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    // Garbage: hyper's 400.
    let text = exchange_closed(server.addr, b"NONSENSE\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    // A peer that closes at once costs nothing.
    drop(TcpStream::connect(server.addr).await.unwrap());
    wait_for(|| server.state.conns.open() <= agents).await;
}

#[tokio::test]
async fn sessions_of_different_names_spread_over_the_shards_and_leave_no_record() {
    let (backend, _seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.shards = 2;
    let server = Server::start(cfg).await;
    let start = |name: &str| {
        let mut c = Agent::config(&server.url(), name, &format!("http://{backend}"));
        c.transport = relay_client::Transport::Websocket;
        Agent::start(c)
    };
    let a = start("a");
    server.wait_agent("a").await;
    let b = start("b");
    server.wait_agent("b").await;
    let p = placement(&server);
    let (ha, hb) = (p.home("a").unwrap(), p.home("b").unwrap());
    assert_ne!(
        ha, hb,
        "the second name goes to the shard without a session"
    );
    assert_eq!((p.load(0), p.load(1)), (1, 1));
    // Both serve their users through their shards.
    let c = client();
    for name in ["a", "b"] {
        let resp = c
            .request(
                Request::get(format!("{}/client/{name}/x", server.url()))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    wait_for(|| p.names() == 0).await;
    assert_eq!((p.load(0), p.load(1)), (0, 0));
    // The server stops with connections on its shards.
    let _open = TcpStream::connect(server.addr).await.unwrap();
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server.join)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
}

/// A relay that terminates TLS places its connections too, after the handshake: the
/// session of an agent that authenticates by client certificate (the grant travels with
/// the connection: on the shard it is authenticated by it), and users over HTTP/1.1 and
/// HTTP/2 (ALPN), whose heads are read through TLS.
#[tokio::test]
async fn tls_connections_are_placed_after_their_handshake_with_their_certificate_s_grant() {
    use relay_tests::pki::{client_ca, client_cert, throwaway_pki_pem};
    let dir = relay_tests::procs::TempDir::new("shards-tls");
    let (server_ca, leaf, key) = throwaway_pki_pem();
    let server_ca = dir.write("server-ca.pem", &server_ca);
    let agents_ca = client_ca("relay agents");
    let (robot_cert, robot_key) = client_cert(&agents_ca, &["robot"], &[]);
    let (backend, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.shards = 2;
    cfg.agent_tokens.clear();
    cfg.tls = Some((dir.write("cert.pem", &leaf), dir.write("key.pem", &key)));
    cfg.agent_client_ca = Some(dir.write("agents-ca.pem", &agents_ca.0.pem()));
    let server = Server::start(cfg).await;
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let mut acfg = Agent::config(&base, "robot", &format!("http://{backend}"));
    acfg.transport = relay_client::Transport::Websocket;
    acfg.relay_ca_file = Some(server_ca.clone());
    acfg.token = None;
    acfg.client_cert = Some((
        dir.write("robot.crt", &robot_cert),
        dir.write("robot.key", &robot_key),
    ));
    let _agent = Agent::start(acfg);
    server.wait_agent("robot").await;
    let p = placement(&server);
    assert!(p.home("robot").is_some(), "the session runs on a shard");
    let after_session = server.state.metrics.shard_handoffs();
    for alpn_h2 in [false, true] {
        let users: hyper_util::client::legacy::Client<_, TestBody> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(
                    relay_client::tls::connector(Some(&server_ca), alpn_h2, Duration::ZERO)
                        .unwrap(),
                );
        for i in 0..2 {
            let resp = users
                .request(
                    Request::post(format!("{base}/client/robot/tls-{alpn_h2}-{i}"))
                        .body(full("over tls"))
                        .unwrap(),
                )
                .await
                .unwrap();
            let version = resp.version();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = body_bytes(resp.into_body()).await.unwrap();
            assert_eq!(
                &body[..],
                b"over tls",
                "the body read with the head arrived"
            );
            let expected = if alpn_h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            };
            assert_eq!(version, expected);
        }
    }
    // One hand-over per user connection (each client keeps its one connection alive).
    assert_eq!(server.state.metrics.shard_handoffs(), after_session + 2);
    assert_eq!(seen.lock().unwrap().len(), 4);
    server.wait_idle().await;
}

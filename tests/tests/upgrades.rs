//! 101 upgrades through the relay: WebSockets with a real WebSocket library, raw upgraded
//! byte streams, half-close, close propagation, refused and smuggled upgrades, and 1000
//! tunnels open at once.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Reads an HTTP head (up to the blank line) and returns it with any bytes that followed.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed inside a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw backend speaking the made-up protocol `echo`: it answers 101 to an upgrade and
/// then echoes bytes until the client shuts down writing, then sends "bye" and closes.
/// It reports whether any byte arrived before it sent the 101.
async fn raw_echo_backend() -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (early_tx, early_rx) = tokio::sync::mpsc::channel(2000);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let early_tx = early_tx.clone();
            tokio::spawn(async move {
                let (head, early) = read_head(&mut s).await;
                if !head.to_ascii_lowercase().contains("upgrade: echo") {
                    let _ = s.write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope").await;
                    return;
                }
                let _ = early_tx.try_send(early);
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
            });
        }
    });
    (addr, early_rx)
}

const UPGRADE_HEAD: &str = "GET /client/e/ HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n";

/// Opens a raw tunnel through the relay and returns the stream after the 101 head.
async fn open_tunnel(relay: SocketAddr, extra: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(relay).await.unwrap();
    let mut req = UPGRADE_HEAD.as_bytes().to_vec();
    req.extend_from_slice(extra);
    s.write_all(&req).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    assert!(rest.is_empty());
    s
}

#[tokio::test]
async fn a_tunnel_of_a_session_agent_takes_one_tunnel_exchange_and_long_polls_take_exchanges() {
    let addr = websocket_echo().await;
    let (server, _agent) = relay_to(addr, "ws").await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let url = format!("ws://{}/client/ws/socket", server.addr);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    // An agent on a session knows upgrades pass: both directions share one connection.
    // One on long polls (the path may not pass upgrades) keeps the exchanges.
    let want = u64::from(relay_tests::test_transport().tries_session());
    assert_eq!(server.state.metrics.tunnel_exchanges(), want);
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_exchange_cut_mid_tunnel_closes_the_users_connection_and_the_agent_serves_on() {
    let (addr, _early) = raw_echo_backend().await;
    let server = Server::default().await;
    // The agent reaches the server through a proxy that can cut its connections: the
    // session's and the tunnel exchange's.
    let cut = cuttable_proxy(server.addr).await;
    let mut cfg = Agent::config(
        &format!("http://{}", cut.addr),
        "e",
        &format!("http://{addr}"),
    );
    cfg.transport = Transport::Websocket;
    let _agent = Agent::start(cfg);
    server.wait_agent("e").await;
    let mut s = open_tunnel(server.addr, b"").await;
    for i in 0..5 {
        let msg = format!("line {i}\n");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    assert_eq!(server.state.metrics.tunnel_exchanges(), 1);
    cut.cut_all();
    // The user's connection ends: no byte more (no "bye": the backend never saw a clean
    // half-close), and not as a half-close either. A half-closed tunnel would go on taking
    // the user's bytes; a closed one refuses them.
    let ended = async {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "bytes after the cut: {rest:?}");
        let chunk = vec![b'x'; 65536];
        while s.write_all(&chunk).await.is_ok() {}
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), ended)
        .await
        .expect("the user's connection stayed open after its tunnel exchange was cut");
    server.wait_idle().await;
    // The agent, alive, opens a new session and tunnels again.
    server.wait_agent("e").await;
    let mut s = open_tunnel(server.addr, b"").await;
    s.write_all(b"again").await.unwrap();
    s.shutdown().await.unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"againbye");
    assert_eq!(server.state.metrics.tunnel_exchanges(), 2);
    server.wait_idle().await;
}

#[tokio::test]
async fn websocket_echo_with_a_real_client_library() {
    let addr = websocket_echo().await;
    let (server, _agent) = relay_to(addr, "ws").await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let url = format!("ws://{}/client/ws/socket", server.addr);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    // A fragmented message (two frames) arrives whole: the relay does not touch framing.
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    ws.send(Message::Frame(Frame::message(
        &b"frag"[..],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        &b"mented"[..],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("fragmented")
    );
    // Ping from the client is answered by the backend's library end to end.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "done".into(),
    })))
    .await
    .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Library(4001)),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(ws.next().await.is_none_or(|r| r.is_err()));
    drop(ws);
    server.wait_idle().await;
}

#[tokio::test]
async fn bytes_sent_with_the_head_are_forwarded_only_after_the_101() {
    let (addr, mut early) = raw_echo_backend().await;
    let (server, _agent) = relay_to(addr, "e").await;
    let mut s = open_tunnel(server.addr, b"EARLY BYTES").await;
    // The backend saw nothing but the head before it answered 101.
    assert_eq!(early.recv().await.unwrap(), b"");
    let mut got = vec![0u8; 11];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"EARLY BYTES");
    drop(s);
    server.wait_idle().await;
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open_in_both_transports() {
    for transport in [Transport::Stream, Transport::Bounded] {
        let (addr, _early) = raw_echo_backend().await;
        let server = Server::default().await;
        let mut cfg = Agent::config(&server.url(), "e", &format!("http://{addr}"));
        cfg.transport = transport;
        let _agent = Agent::start(cfg);
        server.wait_agent("e").await;
        let mut s = open_tunnel(server.addr, b"").await;
        // Interactive: each write is echoed before the next is sent.
        for i in 0..20 {
            let msg = format!("line {i}\n");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes(), "{transport:?}");
        }
        s.write_all(b"question").await.unwrap();
        s.shutdown().await.unwrap();
        // The backend echoes, sees our EOF, says bye and closes: all of it reaches us.
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"questionbye", "{transport:?}");
        server.wait_idle().await;
    }
}

#[tokio::test]
async fn backend_close_reaches_the_user_and_user_close_reaches_the_backend() {
    // Backend closes first: the user reads EOF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel::<&str>(4);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let (head, _) = read_head(&mut s).await;
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await
                    .unwrap();
                if head.contains("/close-now") {
                    return; // drops the socket
                }
                let mut b = [0u8; 16];
                while s.read(&mut b).await.unwrap_or(0) > 0 {}
                closed_tx.send("backend saw EOF").await.unwrap();
            });
        }
    });
    let (server, _agent) = relay_to(addr, "c").await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /client/c/close-now HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(s);

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"GET /client/c/stay HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    read_head(&mut s).await;
    drop(s);
    assert_eq!(closed_rx.recv().await, Some("backend saw EOF"));
    server.wait_idle().await;
}

#[tokio::test]
async fn a_refused_upgrade_keeps_the_connection_http() {
    let (addr, _early) = raw_echo_backend().await;
    let (server, _agent) = relay_to(addr, "e").await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // Asks for a protocol the backend refuses with 426, then sends a second request on the
    // same connection: it must be parsed as HTTP, not tunnelled.
    s.write_all(b"GET /client/e/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\nGET /client/nobody/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 426 "), "{text}");
    assert!(
        text.contains("\r\n\r\nnopeHTTP/1.1 503 "),
        "second request not parsed as HTTP: {text}"
    );
    server.wait_idle().await;
}

#[tokio::test]
async fn a_101_to_a_plain_request_is_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nSMUGGLED")
                    .await;
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
            });
        }
    });
    let (server, _agent) = relay_to(addr, "s").await;
    for req in [
        "GET /client/s/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        // Asked for one protocol, got another.
        "GET /client/s/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: echo\r\n\r\n",
    ] {
        let text =
            String::from_utf8_lossy(&raw_exchange(server.addr, req.as_bytes()).await).into_owned();
        assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
        assert!(!text.contains("SMUGGLED"), "{text}");
    }
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tunnels_open_at_once() {
    let (addr, _early) = raw_echo_backend().await;
    // A thousand users behind one address: above the default per-address limit.
    let mut cfg = server_config();
    cfg.max_connections_per_ip = 4096;
    let server = Server::start(cfg).await;
    let _agent = Agent::start(Agent::config(&server.url(), "e", &format!("http://{addr}")));
    server.wait_agent("e").await;
    let mut tunnels = Vec::new();
    for wave in 0..20 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..50 {
            set.spawn(open_tunnel(server.addr, b""));
        }
        while let Some(s) = set.join_next().await {
            tunnels.push(s.unwrap());
        }
        assert_eq!(tunnels.len(), (wave + 1) * 50);
    }
    assert_eq!(server.state.broker.in_flight(), 1000);
    assert_eq!(
        server.state.tunnels.len(),
        1000,
        "relay_open_tunnels counts users' tunnels, not the exchanges that carry them"
    );
    // The carriers have their gauge: one tunnel exchange per tunnel on a session; long
    // polls carry tunnels on plain exchanges, which are requests, not switched carriers.
    let req = hyper::Request::get(format!("{}/metrics", server.url()))
        .body(empty())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let text = String::from_utf8(body_bytes(resp.into_body()).await.unwrap().to_vec()).unwrap();
    let gauge = |series: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    };
    assert_eq!(gauge("relay_open_tunnels"), 1000);
    let carried = if native_protocol() == "relay/2" {
        1000
    } else {
        0
    };
    assert_eq!(gauge("relay_tunnel_carriers"), carried);
    // Every tunnel carries its own bytes while all are open.
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in tunnels.into_iter().enumerate() {
        set.spawn(async move {
            let msg = format!("tunnel {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes());
            s
        });
    }
    let mut open = Vec::new();
    while let Some(s) = set.join_next().await {
        open.push(s.unwrap());
    }
    assert_eq!(open.len(), 1000);
    drop(open);
    server.wait_idle().await;
}

#[tokio::test]
async fn idle_tunnels_close_after_the_idle_timeout_and_busy_ones_stay() {
    let (addr, _early) = raw_echo_backend().await;
    let mut cfg = server_config();
    cfg.tunnel_idle_timeout = std::time::Duration::from_millis(800);
    let server = Server::start(cfg).await;
    let _agent = Agent::start(Agent::config(&server.url(), "e", &format!("http://{addr}")));
    server.wait_agent("e").await;
    let mut idle = open_tunnel(server.addr, b"").await;
    let mut busy = open_tunnel(server.addr, b"").await;
    // The busy tunnel keeps talking until the idle one has been closed.
    let mut closed = Vec::new();
    let mut buf = [0u8; 4];
    loop {
        busy.write_all(b"tick").await.unwrap();
        busy.read_exact(&mut buf).await.unwrap();
        tokio::select! {
            r = idle.read_to_end(&mut closed) => { r.unwrap(); break; }
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
    }
    assert!(closed.is_empty());
    busy.write_all(b"more").await.unwrap();
    busy.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    drop(busy);
    server.wait_idle().await;
}

#[tokio::test]
async fn a_tunnel_whose_user_stops_reading_closes_after_the_write_timeout() {
    let (addr, _early) = raw_echo_backend().await;
    let mut cfg = server_config();
    // Far beyond the test: only the write timeout can close this tunnel.
    cfg.tunnel_idle_timeout = std::time::Duration::from_secs(3600);
    cfg.user_write_timeout = std::time::Duration::from_millis(500);
    let server = Server::start(cfg).await;
    let _agent = Agent::start(Agent::config(&server.url(), "e", &format!("http://{addr}")));
    server.wait_agent("e").await;
    let tunnel = open_tunnel(server.addr, b"").await;
    // The user sends and sends but never reads what the echo sends back: every buffer on
    // the way back fills, and the relay's write to the user waits for good.
    let (_rd, mut wr) = tunnel.into_split();
    let flood = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while wr.write_all(&chunk).await.is_ok() {}
    });
    // Before the fix the write blocked the tunnel's loop: no timeout, no agent-gone, no
    // stop could end it. Now it closes, and the request is released.
    wait_for(|| server.state.broker.in_flight() == 0).await;
    assert_eq!(server.state.budget.in_use(), 0);
    flood.abort();
}

#[tokio::test]
async fn a_revoked_user_token_ends_its_tunnels_and_leaves_the_others() {
    use relay_server::user::access::{AccessMode, AccessPolicy};
    use relay_server::{Secret, TokenScope};
    let (addr, _early) = raw_echo_backend().await;
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::Token,
        ..AccessPolicy::default()
    };
    let users = |tokens: &[&str]| {
        tokens
            .iter()
            .map(|t| (TokenScope::Any, Secret((*t).into())))
            .collect::<Vec<_>>()
    };
    let (leaked, kept) = ("leaked-user-token-0123456789", "kept-user-token-0123456789");
    cfg.user_tokens = users(&[leaked, kept]);
    let server = Server::start(cfg.clone()).await;
    let _agent = Agent::start(Agent::config(&server.url(), "e", &format!("http://{addr}")));
    server.wait_agent("e").await;
    let open = |token: &'static str| async move {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let head = UPGRADE_HEAD.replace("\r\n\r\n", &format!("\r\nX-Relay-Token: {token}\r\n\r\n"));
        s.write_all(head.as_bytes()).await.unwrap();
        let (head, _) = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        s
    };
    let mut doomed = open(leaked).await;
    let mut other = open(kept).await;
    let mut buf = [0u8; 4];
    for s in [&mut doomed, &mut other] {
        s.write_all(b"ping").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    // The leaked token leaves the configuration.
    cfg.user_tokens = users(&[kept]);
    server.state.reload(&cfg).unwrap();
    // Its tunnel closes at once (the idle timeout is minutes away)...
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        doomed.read_to_end(&mut rest),
    )
    .await
    .expect("the tunnel of a revoked token stayed open")
    .unwrap();
    assert!(rest.is_empty());
    // ...and the other token's tunnel goes on.
    other.write_all(b"pong").await.unwrap();
    other.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    drop(other);
    server.wait_idle().await;
    assert!(server.state.revocations.is_empty());
}

/// Sends an upgrade request to protocol `proto` from the local address `from`, with
/// `extra` header lines, and returns the connection with the head of its answer.
async fn upgrade_from(
    relay: SocketAddr,
    from: &str,
    proto: &str,
    extra: &str,
) -> (TcpStream, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut s = sock.connect(relay).await.unwrap();
    let head = UPGRADE_HEAD
        .replace("Upgrade: echo", &format!("Upgrade: {proto}"))
        .replace("Host: x\r\n", &format!("Host: x\r\n{extra}"));
    s.write_all(head.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut s).await;
    (s, head)
}

#[tokio::test]
async fn tunnels_are_limited_per_client_address_and_a_place_frees_with_its_tunnel() {
    let (addr, _early) = raw_echo_backend().await;
    let mut cfg = server_config();
    cfg.max_tunnels_per_ip = 2;
    cfg.trusted_proxies = vec!["127.0.0.3/32".parse().unwrap()];
    let server = Server::start(cfg).await;
    let _agent = Agent::start(Agent::config(&server.url(), "e", &format!("http://{addr}")));
    server.wait_agent("e").await;
    let places = &server.state.tunnel_places;
    let first = open_tunnel(server.addr, b"").await;
    let _second = open_tunnel(server.addr, b"").await;
    // The third from the same address is refused before the backend hears of it.
    let (_s, head) = upgrade_from(server.addr, "127.0.0.1", "echo", "").await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert_eq!(server.state.metrics.rejections("tunnels_per_ip"), 1);
    // Another address has an allowance of its own, and behind a trusted proxy each client
    // it names has its own: the proxy's own address holds none of theirs.
    let (_other, head) = upgrade_from(server.addr, "127.0.0.2", "echo", "").await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_proxied, head) = upgrade_from(
        server.addr,
        "127.0.0.3",
        "echo",
        "X-Forwarded-For: 10.9.9.9\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_s, head) = upgrade_from(
        server.addr,
        "127.0.0.3",
        "echo",
        "X-Forwarded-For: 127.0.0.1\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    let client: std::net::IpAddr = "10.9.9.9".parse().unwrap();
    assert_eq!(places.open_at(client), 1);
    // A closed tunnel gives its place back.
    drop(first);
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    wait_for(|| places.open_at(local) == 1).await;
    // Upgrades the backend refuses hold a place only while they wait for its answer.
    for _ in 0..3 {
        let (_s, head) = upgrade_from(server.addr, "127.0.0.1", "other", "").await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    }
    wait_for(|| places.open_at(local) == 1).await;
    let _again = open_tunnel(server.addr, b"").await;
    assert_eq!(server.state.metrics.rejections("tunnels_per_ip"), 2);
    drop((_second, _again, _other, _proxied));
    server.wait_idle().await;
    wait_for(|| places.addresses() == 0).await;
}

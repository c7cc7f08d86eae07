//! Service ports served by the agent (Backend.AI style) and `relay-client connect`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Request;
use relay_tests::sockets::keepalive_timers;
use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A server and an agent named `k` serving `services` (and nothing behind --backend-url).
async fn agent_with(
    services: Vec<(String, String)>,
    cmds: Vec<(String, String)>,
) -> (Server, Agent) {
    let server = Server::default().await;
    let mut cfg = Agent::config(&server.url(), "k", "http://127.0.0.1:9");
    cfg.services = services;
    cfg.service_cmds = cmds;
    cfg.service_start_timeout = Duration::from_secs(30);
    let agent = Agent::start(cfg);
    server.wait_agent("k").await;
    (server, agent)
}

/// Runs `relay-client connect` in-process; returns its local address.
async fn connect(server: &Server, app: &str) -> (SocketAddr, CancellationToken) {
    connect_with(server, app, Duration::from_secs(30)).await
}

/// [`connect`] with `tcp_keepalive` on its connections to the relay-server.
async fn connect_with(
    server: &Server,
    app: &str,
    tcp_keepalive: Duration,
) -> (SocketAddr, CancellationToken) {
    // The binary's own listener (a queue of 1 024, not tokio's 128).
    let listener = relay_client::connect::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = relay_client::connect::ConnectConfig {
        relay_url: server.url().parse().unwrap(),
        name: "k".into(),
        app: app.into(),
        kernel_id: None,
        user_token: None,
        relay_ca_file: None,
        tcp_keepalive,
    };
    let stop = CancellationToken::new();
    tokio::spawn(relay_client::connect::run(cfg, listener, stop.clone()));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_carries_tcp_with_half_close() {
    let echo = tcp_echo(b"bye").await;
    let (server, _agent) = agent_with(vec![("echo".into(), echo.to_string())], vec![]).await;
    let (local, _stop) = connect(&server, "echo").await;
    // Several connections at once, each its own tunnel.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        set.spawn(async move {
            let mut s = TcpStream::connect(local).await.unwrap();
            let payload: Vec<u8> = (0..200_000u32).map(|j| (j as u8) ^ (i as u8)).collect();
            let (mut rd, mut wr) = s.split();
            let write = async {
                wr.write_all(&payload).await.unwrap();
                // nc -N style: shut down writing, then read the whole reply.
                wr.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = rd.read_to_end(&mut got);
            let (_, r) = tokio::join!(write, read);
            r.unwrap();
            let mut want = payload.clone();
            want.extend_from_slice(b"bye");
            assert!(got == want, "connection {i}: {} bytes back", got.len());
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    server.wait_idle().await;
}

/// Issue 13's case: 200 tunnels opened at once through one `relay-client connect`, with
/// the default limits (the users' connections and the agent's come from the same
/// address). Each echoes 64 KiB exactly; none hangs, none closes without its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tunnels_at_once_through_one_connect_all_echo() {
    let echo = tcp_echo(b"").await;
    let (server, _agent) = agent_with(vec![("echo".into(), echo.to_string())], vec![]).await;
    let (local, _stop) = connect(&server, "echo").await;
    // One tunnel first: the agent's carrier (its session, or its pollers) is then connected
    // and authenticated, which is what lets its later connections past the address's
    // limit (a cold agent's first connection meets the plain limit).
    let mut first = TcpStream::connect(local).await.unwrap();
    first.write_all(b"warm").await.unwrap();
    first.shutdown().await.unwrap();
    let mut back = Vec::new();
    first.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"warm");
    wait_for(|| server.state.conns.addresses() == 0).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        set.spawn(async move {
            let mut s = TcpStream::connect(local).await.unwrap();
            let payload: Vec<u8> = (0..65_536u32).map(|j| (j ^ i) as u8).collect();
            let (mut rd, mut wr) = s.split();
            // A tunnel refused at once resets the local connection: counted, not a panic.
            let write = async {
                let _ = wr.write_all(&payload).await;
                let _ = wr.shutdown().await;
            };
            let mut got = Vec::new();
            let _ = tokio::join!(write, rd.read_to_end(&mut got));
            (i, got == payload, got.len())
        });
    }
    let mut bad = Vec::new();
    // A generous bound so that a hang fails with the list instead of at the harness's limit.
    let all = tokio::time::timeout(Duration::from_secs(100), async {
        while let Some(r) = set.join_next().await {
            let (i, ok, n) = r.unwrap();
            if !ok {
                bad.push((i, n));
            }
        }
    })
    .await;
    let metrics = client()
        .request(
            Request::get(format!("{}/metrics", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let metrics = body_bytes(metrics.into_body()).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let rejections: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("relay_limit_rejections"))
        .collect();
    assert!(
        all.is_ok(),
        "{} tunnels still open after 100 s; {rejections:?}",
        set.len()
    );
    assert!(
        bad.is_empty(),
        "tunnels with wrong bytes (id, bytes back): {bad:?}; {rejections:?}"
    );
    server.wait_idle().await;
}

async fn ws(server: &Server, path: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{}{path}", server.addr), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn backend_ai_semantics_for_plain_websocket_clients() {
    let echo = tcp_echo(b"bye").await;
    let (_held, refused) = refusing_addr();
    let (server, _agent) = agent_with(
        vec![
            ("echo".into(), echo.to_string()),
            ("down".into(), refused.to_string()),
        ],
        vec![],
    )
    .await;
    let mut w = ws(&server, "/client/k/stream/kernel/k/tcpproxy?app=echo").await;
    // TEXT is dropped; BINARY is the byte stream; pings are answered.
    w.send(Message::text("ignored")).await.unwrap();
    w.send(Message::binary(b"abc".to_vec())).await.unwrap();
    assert_eq!(
        w.next().await.unwrap().unwrap(),
        Message::binary(b"abc".to_vec())
    );
    w.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    assert!(matches!(w.next().await.unwrap().unwrap(), Message::Pong(_)));
    // The session path works too, and closing ends the service connection; the service
    // then closes, which a Backend.AI client sees as 1001 on its next connection's end.
    drop(w);
    let mut w = ws(&server, "/client/k/stream/session/k/httpproxy?service=echo").await;
    w.send(Message::binary(b"x".to_vec())).await.unwrap();
    assert_eq!(
        w.next().await.unwrap().unwrap(),
        Message::binary(b"x".to_vec())
    );
    drop(w);

    // A refused service: 101, then close 1013 (try again later).
    let mut w = ws(&server, "/client/k/stream/kernel/k/tcpproxy?app=down").await;
    match w.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Again),
        other => panic!("expected close 1013, got {other:?}"),
    }
    drop(w);
    server.wait_idle().await;
}

#[tokio::test]
async fn service_closing_its_side_closes_the_websocket_with_1001() {
    // A service that says hello and closes at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(b"hello").await;
        }
    });
    let (server, _agent) = agent_with(vec![("hi".into(), addr.to_string())], vec![]).await;
    let mut w = ws(&server, "/client/k/stream/kernel/k/tcpproxy?app=hi").await;
    assert_eq!(
        w.next().await.unwrap().unwrap(),
        Message::binary(b"hello".to_vec())
    );
    match w.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    drop(w);
    server.wait_idle().await;
}

#[tokio::test]
async fn unknown_apps_and_ids_are_404_json_and_apps_lists_services() {
    let echo = tcp_echo(b"bye").await;
    let (server, _agent) = agent_with(vec![("echo".into(), echo.to_string())], vec![]).await;
    let c = client();
    for path in [
        "/client/k/stream/kernel/k/tcpproxy?app=nope",
        "/client/k/stream/kernel/other/tcpproxy?app=echo",
        "/client/k/stream/session/other/apps",
    ] {
        let resp = c
            .request(
                Request::get(format!("{}{path}", server.url()))
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let v: serde_json::Value =
            serde_json::from_slice(&body_bytes(resp.into_body()).await.unwrap()).unwrap();
        assert!(v["title"].as_str().unwrap().contains("no "), "{v}");
    }
    let resp = c
        .request(
            Request::get(format!("{}/client/k/stream/session/k/apps", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&body_bytes(resp.into_body()).await.unwrap()).unwrap();
    assert_eq!(v[0]["name"], "echo");
    assert_eq!(v[0]["protocol"], "tcp");
    assert_eq!(v[0]["ports"][0], echo.port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_command_starts_on_first_use_and_stops_with_the_agent() {
    // The service's port must be named up front. The test reserves it with a socket that is
    // bound but not listening (connections are refused, no other process can take the port)
    // and the service inherits that socket and listens on it: no window in which the port is
    // free.
    let (fd, port) = reserved_port();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let script = format!(
        "import socket,time\ntime.sleep(0.5)\ns=socket.socket(fileno={raw})\ns.listen()\nwhile True:\n c,_=s.accept()\n d=c.recv(100)\n c.sendall(b'lazy:'+d)\n c.close()\n"
    );
    let dir = relay_tests::procs::TempDir::new("svc");
    let path = dir.0.join("svc.py");
    std::fs::write(&path, script).unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "nothing listens before first use"
    );
    let (server, agent) = agent_with(
        vec![("lazy".into(), format!("127.0.0.1:{port}"))],
        vec![("lazy".into(), format!("exec python3 {}", path.display()))],
    )
    .await;
    let (local, _stop) = connect(&server, "lazy").await;
    let mut s = TcpStream::connect(local).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"lazy:ping");
    drop(s);
    // The service holds the socket now; the test's copy goes, so the port closes with it.
    drop(fd);
    server.wait_idle().await;
    agent.stop().await.unwrap();
    // The service process went with the agent.
    wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_err()).await;
}

/// A TCP socket bound to a free loopback port but not listening, inheritable by child
/// processes (no close-on-exec), and its port.
fn reserved_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a descriptor this function owns.
    #[allow(unsafe_code)]
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        );
        assert_eq!(rc, 0, "bind");
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut blen = len;
        let rc = libc::getsockname(
            fd.as_raw_fd(),
            &mut bound as *mut _ as *mut libc::sockaddr,
            &mut blen,
        );
        assert_eq!(rc, 0, "getsockname");
        (fd, u16::from_be(bound.sin_port))
    }
}

/// Both ends of a service-port tunnel that the relay does not own carry TCP keep-alive with
/// the interval of their `--tcp-keepalive` (30 s by default; `0s` off): `relay-client
/// connect`'s connection to the relay-server, and the agent's bridge to the service, so a
/// quiet tunnel whose path died fails instead of hanging. Each side is switched on alone:
/// the connections to the relay's port are `connect`'s tunnel and (with keep-alive) the
/// agent's own; the one to the service's port is the agent's bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_tunnels_carry_tcp_keepalive_on_both_ends_unless_turned_off() {
    let echo = tcp_echo(b"").await;
    let ka = Duration::from_secs(30);
    for (connect_ka, agent_ka) in [
        (ka, Duration::ZERO),
        (Duration::ZERO, Duration::ZERO),
        (Duration::ZERO, ka),
    ] {
        let server = Server::default().await;
        let mut cfg = Agent::config(&server.url(), "k", "http://127.0.0.1:9");
        cfg.services = vec![("echo".into(), echo.to_string())];
        cfg.tcp_keepalive = agent_ka;
        let _agent = Agent::start(cfg);
        server.wait_agent("k").await;
        let (local, _stop) = connect_with(&server, "echo", connect_ka).await;
        // A tunnel, open: a round trip through it proves it is up.
        let mut s = TcpStream::connect(local).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let timers = |port: u16| {
            eventually(
                Duration::from_secs(10),
                "the connections settle (no data in flight)",
                move || {
                    let t = keepalive_timers(port);
                    async move { t }
                },
            )
        };
        let with = |timers: Vec<Option<f64>>| -> Vec<f64> {
            let with: Vec<f64> = timers.into_iter().flatten().collect();
            for left in &with {
                assert!(*left > 0.0 && *left <= 30.0, "timer {left} s");
            }
            with
        };
        let case = format!("connect {connect_ka:?}, agent {agent_ka:?}");
        if agent_ka.is_zero() {
            let relay = with(timers(server.addr.port()).await);
            let want = usize::from(!connect_ka.is_zero());
            assert_eq!(relay.len(), want, "{case}: timers to the relay {relay:?}");
        }
        let bridge = with(timers(echo.port()).await);
        let want = usize::from(!agent_ka.is_zero());
        assert_eq!(
            bridge.len(),
            want,
            "{case}: timers to the service {bridge:?}"
        );
        drop(s);
    }
}

//! The hostile-input suite: request smuggling, malformed framing, desync attempts, forged
//! forwarding headers, agent-name floods, slow readers and slowloris. (Path traversal and
//! name confusion: `routing.rs`; upgrade smuggling: `upgrades.rs`; another name's request
//! id: `agents.rs`; parked-request caps: `limits.rs`.)

use http::{Request, StatusCode};
use relay_server::user::access::{AccessMode, AccessPolicy};
use relay_server::{Secret, TokenScope};
use relay_tests::*;

#[tokio::test]
async fn smuggling_and_malformed_framing_are_refused_before_any_agent_sees_them() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let smuggled = "GET /client/a/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "conflicting Content-Length",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!{smuggled}"),
            "400",
        ),
        (
            "obs-fold",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "space before the colon",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "bad chunk size",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "overflowing chunk size",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "chunked not last",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "unknown transfer coding",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            "501",
        ),
        (
            "signed Content-Length",
            format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello{smuggled}"),
            "400",
        ),
        (
            "NUL in the target",
            format!("GET /client/a/x\0 HTTP/1.1\r\nHost: x\r\n\r\n{smuggled}"),
            "400",
        ),
        (
            "two Host headers",
            format!("GET /client/a/x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n{smuggled}"),
            "400",
        ),
    ];
    for (what, raw, status) in cases {
        let out = exchange_closed(server.addr, raw.as_bytes()).await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {out}"
        );
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            1,
            "{what}: a second answer: {out}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "{what} reached the backend"
        );
    }
    server.wait_idle().await;
}

/// Both Content-Length and Transfer-Encoding: hyper frames by Transfer-Encoding, removes
/// Content-Length and closes the connection after the answer (RFC 9112 §6.3), so whatever a
/// front proxy framed differently never becomes a second request.
#[tokio::test]
async fn cl_te_and_te_cl_frame_by_transfer_encoding_and_close() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let smuggled = "GET /client/a/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for raw in [
        format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /client/a/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n{smuggled}"),
    ] {
        let out = exchange_closed(server.addr, raw.as_bytes()).await;
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert!(out.to_ascii_lowercase().contains("connection: close"), "{out}");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|s| s.target == "/x" && s.headers.get("content-length").is_none()));
    assert_eq!(seen[0].body, "");
    assert_eq!(seen[1].body, "SMUGGLED");
}

#[tokio::test]
async fn an_early_refusal_with_an_unread_body_does_not_desync() {
    let (backend, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::Token,
        ..AccessPolicy::default()
    };
    cfg.user_tokens = vec![(
        TokenScope::Any,
        Secret("user-token-0123456789abcdef".into()),
    )];
    cfg.max_request_body = Some(10);
    let (server, _agent) = relay_with(cfg, backend, "a").await;
    let inner = "GET /client/a/smuggled HTTP/1.1\r\nHost: x\r\nX-Relay-Token: user-token-0123456789abcdef\r\n\r\n";
    // Refused for lack of a token; the body is a whole request.
    let raw = format!(
        "POST /client/a/x HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let out = exchange_closed(server.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 401 "), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    // Refused for its declared size, with a request in the body.
    let raw = format!(
        "POST /client/a/x HTTP/1.1\r\nHost: x\r\nX-Relay-Token: user-token-0123456789abcdef\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let out = exchange_closed(server.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 413 "), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn forwarding_headers_are_trusted_only_from_trusted_proxies() {
    let (backend, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.trusted_proxies = vec!["127.0.0.2".parse().unwrap()];
    let (server, _agent) = relay_with(cfg, backend, "a").await;
    let forged = "GET /client/a/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 203.0.113.7\r\nForwarded: for=203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: bank.example\r\nConnection: close\r\n\r\n";
    for from in ["127.0.0.1", "127.0.0.2"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(server.addr).await.unwrap();
        s.write_all(forged.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200 "));
    }
    let seen = seen.lock().unwrap();
    let untrusted = &seen[0].headers;
    assert_eq!(untrusted["x-forwarded-for"], "127.0.0.1");
    assert_eq!(untrusted["x-forwarded-proto"], "http");
    assert_eq!(untrusted["x-forwarded-host"], "x");
    assert!(untrusted.get("x-real-ip").is_none() && untrusted.get("forwarded").is_none());
    let trusted = &seen[1].headers;
    assert_eq!(trusted["x-forwarded-for"], "203.0.113.7, 127.0.0.2");
    assert_eq!(trusted["x-forwarded-proto"], "https");
    assert_eq!(trusted["x-forwarded-host"], "bank.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_agent_names_with_a_token_for_one_create_nothing() {
    let mut cfg = server_config();
    cfg.agent_tokens = vec![(TokenScope::Name("mine".into()), Secret(TOKEN.into()))];
    let server = Server::start(cfg).await;
    let c = h2_client();
    let mut forbidden = 0;
    for wave in 0..100 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            let req = Request::get(format!(
                "{}/server/request?server=n{wave}x{i}",
                server.url()
            ))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-relay-agent-id", format!("flood{i}"))
            .body(empty())
            .unwrap();
            let c = c.clone();
            set.spawn(async move { c.request(req).await.unwrap().status() });
        }
        while let Some(s) = set.join_next().await {
            assert_eq!(s.unwrap(), StatusCode::FORBIDDEN);
            forbidden += 1;
        }
    }
    assert_eq!(forbidden, 10_000);
    assert_eq!(server.state.broker.connected_names(), 0);
    assert_eq!(server.state.broker.in_flight(), 0);
}

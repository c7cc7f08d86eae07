//! Routing, methods, byte-exact targets and header rules, through a real relay.

use http::{Method, Request, StatusCode};
use relay_tests::*;

#[tokio::test]
async fn every_method_reaches_the_backend() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let c = client();
    for m in [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "X-CUSTOM",
    ] {
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        let body = if m == "GET" || m == "HEAD" {
            empty()
        } else {
            full(format!("body of {m}"))
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("{}/client/a/m", server.url()))
            .body(body)
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{m}");
        if m != "HEAD" {
            assert_eq!(resp.headers()["x-echo-method"], m);
        }
        let got = body_bytes(resp.into_body()).await.unwrap();
        if m != "GET" && m != "HEAD" {
            assert_eq!(got, format!("body of {m}").as_bytes());
        }
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 9);
        assert_eq!(seen[8].method, "X-CUSTOM");
    }
    server.wait_idle().await;
}

#[tokio::test]
async fn target_is_byte_exact_and_prefix_is_forwarded() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let c = client();
    let cases = [
        (
            "/client/a/x%2Fy/%41b?z=1&a=%2F&a=2&&b",
            "/x%2Fy/%41b?z=1&a=%2F&a=2&&b",
        ),
        ("/client/a", "/"),
        ("/client/a/", "/"),
        ("/client/a?q", "/?q"),
        ("/client/a//double//slash", "//double//slash"),
        ("/client/a/~user/%7E/a+b;p=1", "/~user/%7E/a+b;p=1"),
    ];
    for (path, want) in cases {
        let resp = c
            .request(
                Request::get(format!("{}{path}", server.url()))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let seen = seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(last.target, want, "{path}");
        assert_eq!(last.headers["x-forwarded-prefix"], "/client/a");
    }
}

#[tokio::test]
async fn x_server_name_routes_with_the_path_unchanged() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "grpc-1").await;
    let resp = h2_client()
        .request(
            Request::post(format!("{}/pkg.Service/Method?x=1", server.url()))
                .header("x-server-name", "grpc-1")
                .body(full("payload"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "payload");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].target, "/pkg.Service/Method?x=1");
    assert!(seen[0].headers.get("x-forwarded-prefix").is_none());
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarded_headers_added() {
    let addr = backend(|_req| async {
        http::Response::builder()
            .header("connection", "x-backend-private")
            .header("x-backend-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-visible", "yes")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let (rec, seen) = recording_backend().await;
    let (server, _agent) = relay_to(rec, "a").await;
    let agent2 = Agent::start(Agent::config(&server.url(), "b", &format!("http://{addr}")));
    server.wait_agent("b").await;
    let c = client();
    let req = Request::get(format!("{}/client/a/h", server.url()))
        .header("connection", "keep-alive, X-Forwarded-For, X-Drop-Me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eA==")
        .header("te", "gzip")
        .header("x-forwarded-for", "203.0.113.9")
        .header("host", "public.example")
        .header("x-keep", "kept")
        .body(empty())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    {
        let seen = seen.lock().unwrap();
        let h = &seen[0].headers;
        for gone in [
            "connection",
            "x-drop-me",
            "keep-alive",
            "proxy-authorization",
            "te",
            "upgrade",
        ] {
            assert!(h.get(gone).is_none(), "{gone} reached the backend");
        }
        assert_eq!(h["x-keep"], "kept");
        // The user declared its X-Forwarded-For hop-by-hop, so it went; the relay's own
        // value is added after stripping and cannot be removed that way.
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "public.example");
        assert_eq!(h["host"], "public.example", "the user's Host is preserved");
    }
    let resp = c
        .request(
            Request::get(format!("{}/client/b/", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-visible"], "yes");
    assert!(resp.headers().get("x-backend-private").is_none());
    assert!(resp.headers().get("keep-alive").is_none());
    drop(agent2);
}

#[tokio::test]
async fn bad_names_and_dot_segments_are_400_and_reach_nobody() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "b").await;
    for path in [
        "/client/",
        "/client//b",
        "/client/a/../b/x",
        "/client/a/%2e%2e/b/x",
        "/client/a%2F..%2Fb/x",
        "/client/%2e%2e/b",
        "/client/b/./x",
        "/client/b/..;x=y/",
        // Percent-encoded separators make a dot-segment too (a backend that decodes them
        // would climb out of the path).
        "/client/b/..%2fb/echo",
        "/client/b/lab/..%2Fadmin",
        "/client/b/x%5C..%5Cadmin",
        "/client/-b/",
        "/client/b%00/",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = raw_exchange(server.addr, raw.as_bytes()).await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 400 "), "{path}: {text}");
        assert!(text.contains("text/plain"), "{path}: {text}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request reached the backend"
    );
    // No route at all: 404.
    let resp = raw_exchange(
        server.addr,
        b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 404 "));
}

#[tokio::test]
async fn h2c_upgrade_from_users_is_refused() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let resp = raw_exchange(
        server.addr,
        b"GET /client/a/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("h2c"), "{text}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let resp = raw_exchange(
        server.addr,
        b"GET /client/a/ HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 400 "));
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn backend_url_path_is_prepended_and_host_can_be_rewritten() {
    let (backend, seen) = recording_backend().await;
    let server = Server::default().await;
    let mut cfg = Agent::config(&server.url(), "nb", &format!("http://{backend}/client/nb/"));
    cfg.rewrite_host = true;
    let _agent = Agent::start(cfg);
    server.wait_agent("nb").await;
    let resp = client()
        .request(
            Request::get(format!("{}/client/nb/api/status?x=%2F", server.url()))
                .header("host", "public.example")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].target, "/client/nb/api/status?x=%2F");
    assert_eq!(seen[0].headers["host"], backend.to_string().as_str());
    assert_eq!(seen[0].headers["x-forwarded-host"], "public.example");
}

#[tokio::test]
async fn a_header_count_limit_other_than_hyper_s_own_is_kept() {
    let (backend, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.max_headers = 20;
    let (server, _agent) = relay_with(cfg, backend, "a").await;
    let head = |fields: usize| {
        let extra: String = (0..fields - 2).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET /client/a/ HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
    };
    for (fields, want) in [(21, "HTTP/1.1 431 "), (20, "HTTP/1.1 200 ")] {
        let text =
            String::from_utf8_lossy(&raw_exchange(server.addr, head(fields).as_bytes()).await)
                .into_owned();
        assert!(
            text.starts_with(want),
            "{fields} fields: want {want}, got {:?}",
            text.lines().next()
        );
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn oversized_heads_targets_and_header_counts_are_refused() {
    let (backend, seen) = recording_backend().await;
    let (server, _agent) = relay_to(backend, "a").await;
    let long_target = format!("/client/a/{}", "x".repeat(9 * 1024));
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big_header = format!("X-Big: {}\r\n", "y".repeat(70 * 1024));
    for (req, want) in [
        (
            format!("GET {long_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            "HTTP/1.1 414 ",
        ),
        (
            format!("GET /client/a/ HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"),
            "HTTP/1.1 431 ",
        ),
        (
            format!("GET /client/a/ HTTP/1.1\r\nHost: x\r\n{big_header}Connection: close\r\n\r\n"),
            "HTTP/1.1 431 ",
        ),
    ] {
        let text =
            String::from_utf8_lossy(&raw_exchange(server.addr, req.as_bytes()).await).into_owned();
        assert!(
            text.starts_with(want),
            "want {want}, got {:?}",
            text.lines().next()
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request reached the backend"
    );
    // Just under the limits still works.
    let ok_target = format!("/client/a/{}", "x".repeat(7 * 1024));
    let text = String::from_utf8_lossy(
        &raw_exchange(
            server.addr,
            format!("GET {ok_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await,
    )
    .into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200 "),
        "{:?}",
        text.lines().next()
    );
}

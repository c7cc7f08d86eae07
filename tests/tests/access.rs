//! User access control through a real relay: tokens, signed links, forward-auth, host
//! routing, and the relay's credentials never reaching the backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use relay_server::user::access::{AccessMode, AccessPolicy};
use relay_server::user::forward_auth::ForwardAuthConfig;
use relay_server::{Secret, TokenScope};
use relay_tests::*;

const USER_TOKEN: &str = "user-token-for-a-0123456789";
const LINK_KEY: &str = "link-key-0123456789abcdef0123456789";

/// A server with `cfg`, agents for "a" and "b" in front of one recording backend.
async fn setup(cfg: relay_server::Config) -> (Server, Vec<Agent>, Arc<Mutex<Vec<Seen>>>) {
    let (backend, seen) = recording_backend().await;
    let server = Server::start(cfg).await;
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        agents.push(Agent::start(Agent::config(
            &server.url(),
            name,
            &format!("http://{backend}"),
        )));
        server.wait_agent(name).await;
    }
    (server, agents, seen)
}

fn get(url: String, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

async fn text(resp: Response<hyper::body::Incoming>) -> (StatusCode, http::HeaderMap, String) {
    let (parts, body) = resp.into_parts();
    let body = body_bytes(body).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into(),
    )
}

#[tokio::test]
async fn token_access_admits_only_the_right_token_and_strips_it() {
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::Token,
        ..AccessPolicy::default()
    };
    cfg.user_tokens = vec![(TokenScope::Name("a".into()), Secret(USER_TOKEN.into()))];
    let (server, _agents, seen) = setup(cfg).await;
    let c = client();
    let url = |p: &str| format!("{}{p}", server.url());

    // No credential: 401 with a challenge, for a connected and for an unknown name alike.
    for path in ["/client/a/x", "/client/nobody/x"] {
        let (status, h, body) = text(c.request(get(url(path), &[])).await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer realm=\"relay\"");
        assert!(body.contains("needs a user token"), "{body}");
    }
    // Wrong tokens of several lengths, and a right token for another name: 403.
    for t in [
        "x",
        "user-token-for-a-012345678",
        "user-token-for-a-0123456789x",
    ] {
        let resp = c
            .request(get(
                url("/client/a/x"),
                &[("authorization", &format!("Bearer {t}"))],
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{t}");
    }
    let (status, _, body) = text(
        c.request(get(url("/client/b/x"), &[("x-relay-token", USER_TOKEN)]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("does not give access to backend \"b\""),
        "{body}"
    );
    // A token in the query string is not a credential.
    let resp = c
        .request(get(url(&format!("/client/a/x?token={USER_TOKEN}")), &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        seen.lock().unwrap().is_empty(),
        "the backend saw a refused request"
    );

    // Bearer: admitted, and the backend does not see the token.
    let resp = c
        .request(get(
            url("/client/a/x"),
            &[("authorization", &format!("bearer {USER_TOKEN}"))],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // X-Relay-Token: admitted, the backend keeps its own Authorization.
    let resp = c
        .request(get(
            url("/client/a/y"),
            &[
                ("x-relay-token", USER_TOKEN),
                ("authorization", "Basic YmFja2VuZA=="),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].headers.get("authorization").is_none());
    assert!(seen[1].headers.get("x-relay-token").is_none());
    assert_eq!(seen[1].headers["authorization"], "Basic YmFja2VuZA==");
}

/// [`setup`] with signed-link access for every backend, and the link key.
async fn signed_link_setup() -> (Server, Vec<Agent>, Arc<Mutex<Vec<Seen>>>, Secret) {
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::SignedLink,
        ..AccessPolicy::default()
    };
    let key = Secret(LINK_KEY.into());
    cfg.link_secret = Some(key.clone());
    let (server, agents, seen) = setup(cfg).await;
    (server, agents, seen, key)
}

#[tokio::test]
async fn signed_link_opens_one_session_scoped_to_its_backend_and_path() {
    let (server, _agents, seen, key) = signed_link_setup().await;
    let c = client();

    let query = relay_server::user::link::sign(&key, "a", "/lab/", Duration::from_secs(60));
    let link = format!("{}/client/a/lab/?keep=1&{query}", server.url());
    let (status, h, _) = text(c.request(get(link.clone(), &[])).await.unwrap()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(h[header::LOCATION], "/client/a/lab/?keep=1");
    let cookie = h[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in [
        "Path=/client/a/",
        "HttpOnly",
        "SameSite=Lax",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "Secure on plain HTTP: {cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();

    // Single use.
    let (status, _, body) = text(c.request(get(link, &[])).await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("already used"), "{body}");

    // The session admits below the signed path, with the cookie stripped for the backend.
    let cookies = format!("theme=dark; {session}");
    let resp = c
        .request(get(
            format!("{}/client/a/lab/tree?keep=1", server.url()),
            &[("cookie", &cookies)],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Not outside the path, not on another backend, not without the cookie.
    for (path, cookie) in [
        ("/client/a/other", cookies.as_str()),
        ("/client/b/lab/", cookies.as_str()),
        ("/client/a/lab/", "theme=dark"),
    ] {
        let resp = c
            .request(get(
                format!("{}{path}", server.url()),
                &[("cookie", cookie)],
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // A tampered link (path changed) and an expired one are refused.
    let q = relay_server::user::link::sign(&key, "a", "/lab/", Duration::from_secs(60));
    let resp = c
        .request(get(format!("{}/client/a/?{q}", server.url()), &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let other = Secret("another-key-0123456789abcdef0123456".into());
    let q = relay_server::user::link::sign(&other, "a", "/", Duration::from_secs(60));
    let (status, _, body) = text(
        c.request(get(format!("{}/client/a/?{q}", server.url()), &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("signature"), "{body}");

    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "only the session request reaches the backend"
    );
    assert_eq!(seen[0].target, "/lab/tree?keep=1");
    assert_eq!(seen[0].headers["cookie"], "theme=dark");
    assert_eq!(server.state.sessions.len(), 1);
}

#[tokio::test]
async fn a_link_scope_is_whole_path_segments() {
    let (server, _agents, seen, key) = signed_link_setup().await;
    let c = client();
    let query = relay_server::user::link::sign(&key, "a", "/lab", Duration::from_secs(60));
    let link = format!("{}/client/a/lab?{query}", server.url());
    let (status, h, _) = text(c.request(get(link, &[])).await.unwrap()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = h[header::SET_COOKIE].to_str().unwrap().to_owned();
    let session = cookie.split(';').next().unwrap().to_owned();
    for (path, want) in [
        ("/client/a/lab", StatusCode::OK),
        ("/client/a/lab/", StatusCode::OK),
        ("/client/a/lab/notes", StatusCode::OK),
        ("/client/a/laboratory/secret", StatusCode::FORBIDDEN),
        ("/client/a/lab-admin/", StatusCode::FORBIDDEN),
        ("/client/a/lab/..%2Fadmin", StatusCode::BAD_REQUEST),
    ] {
        let resp = c
            .request(get(
                format!("{}{path}", server.url()),
                &[("cookie", &session)],
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{path}");
    }
    let seen = seen.lock().unwrap();
    let targets: Vec<&str> = seen.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(targets, ["/lab", "/lab/", "/lab/notes"]);
}

/// An authorization service: admits requests whose cookie says `sso=alice`, and sends
/// everyone else to a sign-in page. Records what it was asked.
async fn auth_service() -> (std::net::SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let addr = backend(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(req.headers().clone());
            let cookie = req
                .headers()
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if cookie.contains("sso=alice") {
                Response::builder()
                    .header("x-auth-request-user", "alice")
                    .header("x-not-copied", "1")
                    .body(empty())
                    .unwrap()
            } else if cookie.contains("sso=broken") {
                Response::builder().status(500).body(empty()).unwrap()
            } else {
                Response::builder()
                    .status(302)
                    .header("location", "https://sso.example/login")
                    .body(full("sign in first"))
                    .unwrap()
            }
        }
    })
    .await;
    (addr, asked)
}

#[tokio::test]
async fn forward_auth_decides_and_its_headers_replace_spoofed_ones() {
    let (auth, asked) = auth_service().await;
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::Open,
        per_name: [("a".to_owned(), AccessMode::ForwardAuth)].into(),
    };
    cfg.forward_auth = Some(ForwardAuthConfig {
        url: format!("http://{auth}/auth").parse().unwrap(),
        copy_headers: vec![http::HeaderName::from_static("x-auth-request-user")],
        timeout: Duration::from_secs(5),
    });
    let (server, _agents, seen) = setup(cfg).await;
    let c = client();

    let (status, h, body) = text(
        c.request(get(format!("{}/client/a/p?q=1", server.url()), &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(h[header::LOCATION], "https://sso.example/login");
    assert_eq!(body, "sign in first");
    let resp = c
        .request(get(
            format!("{}/client/a/p?q=1", server.url()),
            &[("cookie", "sso=alice"), ("x-auth-request-user", "mallory")],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = c
        .request(get(
            format!("{}/client/a/p", server.url()),
            &[("cookie", "sso=broken")],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    // Backend b is open: no question asked.
    let resp = c
        .request(get(format!("{}/client/b/p", server.url()), &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    {
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 3);
        assert_eq!(asked[0]["x-forwarded-uri"], "/client/a/p?q=1");
        assert_eq!(asked[0]["x-forwarded-method"], "GET");
        assert_eq!(asked[0]["x-forwarded-proto"], "http");
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let users: Vec<_> = seen[0]
            .headers
            .get_all("x-auth-request-user")
            .iter()
            .collect();
        assert_eq!(users, ["alice"], "the spoofed user header must be replaced");
        assert!(seen[0].headers.get("x-not-copied").is_none());
    }

    // The service gone: fail closed.
    let mut cfg = server_config();
    cfg.access.default = AccessMode::ForwardAuth;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cfg.forward_auth = Some(ForwardAuthConfig {
        url: format!("http://{dead}/").parse().unwrap(),
        copy_headers: vec![],
        timeout: Duration::from_secs(5),
    });
    let server = Server::start(cfg).await;
    let (status, _, body) = text(
        c.request(get(format!("{}/client/a/", server.url()), &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("authorization service failed"), "{body}");
}

#[tokio::test]
async fn forward_auth_judges_the_routed_host_whatever_the_user_sends() {
    // A service that admits only backend b's origin, recording what it was asked.
    let asked = Arc::new(Mutex::new(Vec::<http::HeaderMap>::new()));
    let log = asked.clone();
    let auth = backend(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let host = req.headers().get("x-forwarded-host").cloned();
            log.lock().unwrap().push(req.headers().clone());
            let ok = host.is_some_and(|h| h.as_bytes().starts_with(b"b.relay.test"));
            Response::builder()
                .status(if ok { 200 } else { 403 })
                .body(empty())
                .unwrap()
        }
    })
    .await;
    let mut cfg = server_config();
    cfg.public_domain = Some("relay.test".into());
    cfg.access.default = AccessMode::ForwardAuth;
    cfg.forward_auth = Some(ForwardAuthConfig {
        url: format!("http://{auth}/auth").parse().unwrap(),
        copy_headers: vec![],
        timeout: Duration::from_secs(5),
    });
    let (server, _agents, seen) = setup(cfg).await;

    // HTTP/1.1, absolute-form for a, Host naming b: routed to a, so judged as a.
    let raw = b"GET http://a.relay.test/secret HTTP/1.1\r\nHost: b.relay.test\r\nConnection: close\r\n\r\n";
    let resp = String::from_utf8_lossy(&raw_exchange(server.addr, raw).await).into_owned();
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    // HTTP/2, :authority a, a forged X-Forwarded-Host naming b.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://a.relay.test/secret")
        .header("x-forwarded-host", "b.relay.test")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::FORBIDDEN);
    assert!(seen.lock().unwrap().is_empty(), "backend a was reached");

    // b itself is admitted; the user's forwarding headers never reach the service.
    let resp = client()
        .request(get(
            format!("{}/page", server.url()),
            &[
                ("host", "b.relay.test"),
                ("cookie", "sso=alice"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-real-ip", "203.0.113.9"),
                ("forwarded", "for=203.0.113.9;host=evil.example"),
                ("x-original-url", "/admin"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let asked = asked.lock().unwrap();
    let last = asked.last().unwrap();
    assert_eq!(last["x-forwarded-host"], "b.relay.test");
    assert_eq!(last["x-forwarded-for"], "127.0.0.1");
    assert_eq!(last["x-forwarded-uri"], "/page");
    assert_eq!(last["cookie"], "sso=alice");
    for h in ["x-real-ip", "forwarded", "x-original-url"] {
        assert!(last.get(h).is_none(), "{h} reached the service");
    }
    assert_eq!(last.get_all("x-forwarded-host").iter().count(), 1);
}

#[tokio::test]
async fn public_domain_routes_hosts_to_backends_with_the_path_untouched() {
    let mut cfg = server_config();
    cfg.public_domain = Some("relay.test".into());
    let (server, _agents, seen) = setup(cfg).await;
    let c = client();
    for (host, path) in [
        ("a.relay.test", "/"),
        ("A.Relay.Test:8080", "/client/x/healthz"),
        ("b.relay.test", "/healthz"),
        ("b.relay.test", "/server/request?x=1"),
    ] {
        let resp = c
            .request(get(format!("{}{path}", server.url()), &[("host", host)]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{host}{path}");
        assert_eq!(resp.headers()["x-echo-target"], path);
    }
    // The relay's own host keeps path routing and its own endpoints.
    let resp = c
        .request(get(
            format!("{}/client/a/z", server.url()),
            &[("host", "relay.test")],
        ))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-echo-target"], "/z");
    let resp = c
        .request(get(
            format!("{}/healthz", server.url()),
            &[("host", "relay.test")],
        ))
        .await
        .unwrap();
    assert!(resp.headers().get("x-echo-target").is_none());
    // A label that is not a host-reachable name.
    let resp = c
        .request(get(
            format!("{}/", server.url()),
            &[("host", "x.y.relay.test")],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5);
    assert!(seen[0].headers.get("x-forwarded-prefix").is_none());
    assert_eq!(seen[0].headers["x-forwarded-host"], "a.relay.test");
}

#[tokio::test]
async fn a_revoked_user_token_ends_its_streams_at_once() {
    use http_body_util::BodyExt;
    let backend = backend(|_req: Request<hyper::body::Incoming>| async move {
        let (tx, body) = channel_body(1);
        tokio::spawn(async move {
            tx.send(data("event: hello\n\n")).await.unwrap();
            tx.closed().await;
        });
        hyper::Response::new(body)
    })
    .await;
    let mut cfg = server_config();
    cfg.access = AccessPolicy {
        default: AccessMode::Token,
        ..AccessPolicy::default()
    };
    cfg.user_tokens = vec![(TokenScope::Name("a".into()), Secret(USER_TOKEN.into()))];
    let server = Server::start(cfg.clone()).await;
    let _agent = Agent::start(Agent::config(
        &server.url(),
        "a",
        &format!("http://{backend}"),
    ));
    server.wait_agent("a").await;
    let resp = client()
        .request(get(
            format!("{}/client/a/events", server.url()),
            &[("x-relay-token", USER_TOKEN)],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"event: hello\n\n");
    // The token is replaced: the feed it opened ends with an error, not a clean end.
    cfg.user_tokens = vec![(
        TokenScope::Name("a".into()),
        Secret("a-new-token-0123456789".into()),
    )];
    server.state.reload(&cfg).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the stream of a revoked token stayed open");
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    server.wait_idle().await;
    assert!(server.state.revocations.is_empty());
}

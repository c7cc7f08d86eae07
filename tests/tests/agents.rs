//! Agent authentication, name scoping, id binding, and graceful shutdown on both sides.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use relay_server::{Secret, TokenScope};
use relay_tests::*;

const TOKEN_A: &str = "token-for-a-0123456789";
const TOKEN_B: &str = "token-for-b-0123456789";

async fn scoped_server() -> Server {
    let mut cfg = server_config();
    cfg.agent_tokens = vec![
        (TokenScope::Name("a".into()), Secret(TOKEN_A.into())),
        (TokenScope::Name("b".into()), Secret(TOKEN_B.into())),
    ];
    Server::start(cfg).await
}

/// Polls as a hand-written agent for `name` and returns the id of the one request taken.
async fn take_one_request(url: String, name: &'static str, token: &'static str) -> String {
    let resp = client()
        .request(
            Request::get(format!("{url}/server/request?server={name}&max=1"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-relay-agent-id", format!("agent-{name}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&body_bytes(resp.into_body()).await.unwrap()).unwrap();
    v["requests"][0]["id"].as_str().unwrap().to_owned()
}

/// A raw agent call with `token`.
async fn call(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()))
        .header("x-relay-agent-id", "manual-agent");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = client()
        .request(req.body(full(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let text = String::from_utf8_lossy(&body_bytes(resp.into_body()).await.unwrap()).into_owned();
    (status, text)
}

#[tokio::test]
async fn wrong_or_missing_tokens_are_401_and_end_the_agent() {
    let server = scoped_server().await;
    for token in [
        None,
        Some("wrong"),
        Some("token-for-a-012345678"),
        Some("token-for-a-0123456789x"),
    ] {
        let (status, _) = call(
            &server,
            "GET",
            "/server/request?server=a",
            token,
            Bytes::new(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    let mut cfg = Agent::config(&server.url(), "a", "http://127.0.0.1:9");
    cfg.token = Some(relay_client::Secret("not-the-token-at-all".into()));
    match Agent::start(cfg).exited().await {
        Err(relay_client::AgentError::Refused { status: 401, .. }) => {}
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    assert!(server.state.broker.live_backend("a").is_none());
}

#[tokio::test]
async fn a_token_serves_only_its_names() {
    let server = scoped_server().await;
    let (status, text) = call(
        &server,
        "GET",
        "/server/request?server=b",
        Some(TOKEN_A),
        Bytes::new(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(text.contains("may not serve"));
    let mut cfg = Agent::config(&server.url(), "b", "http://127.0.0.1:9");
    cfg.token = Some(relay_client::Secret(TOKEN_A.into()));
    cfg.transport = Transport::Stream;
    match Agent::start(cfg).exited().await {
        Err(relay_client::AgentError::Refused { status: 403, .. }) => {}
        other => panic!("expected a 403 refusal, got {other:?}"),
    }
    // Nothing was registered for the name the token does not cover.
    assert_eq!(server.state.broker.connected_names(), 0);
}

#[tokio::test]
async fn another_names_request_id_is_indistinguishable_from_an_unknown_one() {
    let server = scoped_server().await;
    // Agent "b" (manual) takes a user request and holds it.
    let poll = tokio::spawn(take_one_request(server.url(), "b", TOKEN_B));
    server.wait_agent("b").await;
    let user = tokio::spawn(
        client().request(
            Request::get(format!("{}/client/b/secret", server.url()))
                .body(empty())
                .unwrap(),
        ),
    );
    let id = poll.await.unwrap();
    assert_eq!(id.len(), 32);
    // Agent "a" tries to read b's upload and answer b's request.
    let unknown = "0123456789abcdef0123456789abcdef";
    for path in [
        "/server/requeststream?id={}&offset=0",
        "/server/response?id={}&offset=0",
    ] {
        let method = if path.contains("response") {
            "POST"
        } else {
            "GET"
        };
        let theirs = call(
            &server,
            method,
            &path.replace("{}", &id),
            Some(TOKEN_A),
            Bytes::new(),
        )
        .await;
        let nobody = call(
            &server,
            method,
            &path.replace("{}", unknown),
            Some(TOKEN_A),
            Bytes::new(),
        )
        .await;
        assert_eq!(
            theirs, nobody,
            "{path}: another name's id is distinguishable"
        );
        assert_eq!(theirs.0, StatusCode::NOT_FOUND);
    }
    // b still answers its own request.
    let head = serde_json::json!({"status": 200, "headers": [["x-by", "b"]], "body": "empty"});
    let mut frames = relay_common::frame::control(
        relay_common::frame::Kind::Head,
        &serde_json::to_vec(&head).unwrap(),
    )
    .to_vec();
    frames.extend_from_slice(&relay_common::frame::control(
        relay_common::frame::Kind::End,
        b"",
    ));
    let (status, _) = call(
        &server,
        "POST",
        &format!("/server/response?id={id}&offset=0"),
        Some(TOKEN_B),
        frames.into(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let resp = user.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-by"], "b");
    server.wait_idle().await;
}

#[tokio::test]
async fn malformed_exchanges_abort_the_user_response() {
    let server = Server::default().await;
    let poll = tokio::spawn(take_one_request(server.url(), "m", TOKEN));
    server.wait_agent("m").await;
    let user = tokio::spawn(
        client().request(
            Request::get(format!("{}/client/m/", server.url()))
                .body(empty())
                .unwrap(),
        ),
    );
    let id = poll.await.unwrap();
    // A head, some data, then the exchange stops without END/ABORT/CONTINUE.
    let head = serde_json::json!({"status": 200, "headers": [], "body": "stream"});
    let mut frames = relay_common::frame::control(
        relay_common::frame::Kind::Head,
        &serde_json::to_vec(&head).unwrap(),
    )
    .to_vec();
    frames.extend_from_slice(&relay_common::frame::header(
        relay_common::frame::Kind::Data,
        3,
    ));
    frames.extend_from_slice(b"abc");
    let resp_task = tokio::spawn(async move {
        match user.await.unwrap() {
            // hyper may drop the buffered head together with the failed body.
            Err(e) => Err(e.to_string()),
            Ok(resp) => match body_bytes(resp.into_body()).await {
                Err(e) => Err(e.to_string()),
                Ok(b) => Ok(b),
            },
        }
    });
    let (status, text) = call(
        &server,
        "POST",
        &format!("/server/response?id={id}&offset=0"),
        Some(TOKEN),
        frames.into(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let outcome = resp_task.await.unwrap();
    assert!(
        outcome.is_err(),
        "a cut exchange must abort the response, got {outcome:?}"
    );
    server.wait_idle().await;
}

type Held = tokio::task::JoinHandle<
    Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
>;

/// A relay to a backend that holds every request until released, with one request in flight.
async fn one_request_held() -> (Server, Agent, tokio::sync::watch::Sender<bool>, Held) {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let addr = backend(move |_req| {
        let mut rx = release_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
            Response::new(full("finished"))
        }
    })
    .await;
    let (server, agent) = relay_to(addr, "d").await;
    let inflight = tokio::spawn(
        client().request(
            Request::get(format!("{}/client/d/", server.url()))
                .body(empty())
                .unwrap(),
        ),
    );
    wait_for(|| server.state.broker.in_flight() == 1).await;
    (server, agent, release_tx, inflight)
}

#[tokio::test]
async fn server_drain_finishes_requests_in_flight_and_refuses_new_ones() {
    let (server, _agent, release_tx, inflight) = one_request_held().await;
    server.shutdown.cancel();
    wait_for(|| server.state.draining()).await;
    let resp = client()
        .request(
            Request::get(format!("{}/client/d/new", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    release_tx.send(true).unwrap();
    let resp = inflight.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "finished");
    tokio::time::timeout(Duration::from_secs(10), server.join)
        .await
        .expect("server did not stop after the drain")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn agent_drain_finishes_requests_in_flight() {
    let (server, agent, release_tx, inflight) = one_request_held().await;
    let stopped = tokio::spawn(agent.stop());
    // The draining agent is no longer offered new work.
    wait_for(|| server.state.broker.live_backend("d").is_none()).await;
    release_tx.send(true).unwrap();
    let resp = inflight.await.unwrap().unwrap();
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "finished");
    stopped.await.unwrap().unwrap();
}

#[tokio::test]
async fn agent_reconnects_after_the_server_restarts() {
    let (rec, _seen) = recording_backend().await;
    let server = Server::default().await;
    let addr = server.addr;
    let _agent = Agent::start(Agent::config(&server.url(), "r", &format!("http://{rec}")));
    server.wait_agent("r").await;
    server.shutdown.cancel();
    server.join.await.unwrap().unwrap();
    // A new server on the same address (the agent keeps retrying with backoff meanwhile).
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let state = std::sync::Arc::new(relay_server::State::new(server_config()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(relay_server::serve(
        listener,
        state.clone(),
        shutdown.clone(),
    ));
    wait_for(|| state.broker.live_backend("r").is_some()).await;
    let resp = client()
        .request(
            Request::get(format!("http://{addr}/client/r/again"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    shutdown.cancel();
}

#[tokio::test]
async fn agent_endpoints_on_their_own_listener() {
    let (rec, _seen) = recording_backend().await;
    let faces = Faces::start(server_config(), true, false).await;
    let (state, shutdown) = (faces.state.clone(), faces.shutdown.clone());
    let (public_addr, agent_addr) = (faces.public, faces.agent.unwrap());
    let _agent = Agent::start(Agent::config(
        &format!("http://{agent_addr}"),
        "p",
        &format!("http://{rec}"),
    ));
    wait_for(|| state.broker.live_backend("p").is_some()).await;
    let c = client();
    let get = |url: String| c.request(Request::get(url).body(empty()).unwrap());
    assert_eq!(
        get(format!("http://{public_addr}/client/p/"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // Agent endpoints are not on the public face, with or without a token.
    let resp = c
        .request(
            Request::get(format!("http://{public_addr}/server/request?server=p"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("x-relay-agent-id", "x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // Users are not served on the agent face.
    assert_eq!(
        get(format!("http://{agent_addr}/client/p/"))
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(format!("http://{agent_addr}/healthz"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    shutdown.cancel();
}

/// A GET through `server`; its status and body.
async fn status_and_body(server: &Server, path: &str) -> (StatusCode, Bytes) {
    let resp = client()
        .request(
            Request::get(format!("{}{path}", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    (
        status,
        body_bytes(resp.into_body()).await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn an_agent_with_several_relay_urls_serves_through_each_and_outlives_one() {
    let (backend_addr, _) = recording_backend().await;
    // The first URL has nothing listening: the agent still serves through the others.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a = Server::default().await;
    let b = Server::default().await;
    let mut cfg = Agent::config(
        &format!("http://{dead}"),
        "multi",
        &format!("http://{backend_addr}"),
    );
    cfg.more_relay_urls = vec![a.url().parse().unwrap(), b.url().parse().unwrap()];
    cfg.pollers = 2;
    let agent = Agent::start(cfg);
    a.wait_agent("multi").await;
    b.wait_agent("multi").await;
    for server in [&a, &b] {
        for i in 0..5 {
            let (status, _) = status_and_body(server, &format!("/client/multi/{i}")).await;
            assert_eq!(status, 200);
        }
    }
    // One server goes away: the agent keeps serving through the other.
    a.shutdown.cancel();
    a.join.await.unwrap().unwrap();
    for i in 0..5 {
        let (status, _) = status_and_body(&b, &format!("/client/multi/after/{i}")).await;
        assert_eq!(status, 200);
    }
    agent.stop().await.unwrap();
}

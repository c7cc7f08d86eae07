//! Cluster mode with a real redis-server, relay-server replicas (the binary) and a
//! round-robin TCP balancer: forwarding of plain, streamed (100 MB each way), gRPC-style
//! (trailers) and WebSocket requests, agent calls landing on the wrong replica, load
//! sharing, a replica dying, Redis going away and coming back.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use relay_common::frame::{self, Kind};
use relay_common::message::{BodyKind, PollAnswer, ResponseHead};
use relay_tests::cluster::{balancer, replica, Redis, Replica, Secret};
use relay_tests::{
    backend, body_bytes, channel_body, client, data, empty, eventually, full, h2_client,
    websocket_echo, Agent, TOKEN,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MB100: usize = 100_000_000;

/// The replica's `/metrics` text.
async fn metrics(r: &Replica) -> String {
    let resp = client()
        .request(
            Request::get(format!("{}/metrics", r.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    String::from_utf8(body_bytes(resp.into_body()).await.unwrap().to_vec()).unwrap()
}

/// One counter or gauge value from `/metrics` text (0 when absent).
fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until the directory lists `tag` for `name` (state in Redis, polled).
async fn wait_directory(redis: &Redis, name: &str, tag: &str) {
    wait_directory_any(redis, name, &[tag]).await;
}

/// Waits until the directory lists one of `tags` for `name`. An agent behind the balancer
/// keeps one session, on whichever replica the balancer chose.
async fn wait_directory_any(redis: &Redis, name: &str, tags: &[&str]) {
    let client = redis::Client::open(redis.url()).unwrap();
    let what = format!("{tags:?} registering {name:?}");
    eventually(Duration::from_secs(20), &what, || {
        let members: Vec<String> = client
            .get_connection()
            .and_then(|mut c| {
                redis::cmd("ZRANGE")
                    .arg(format!("relay:name:{name}"))
                    .arg(0)
                    .arg(-1)
                    .query(&mut c)
            })
            .unwrap_or_default();
        std::future::ready(
            members
                .iter()
                .any(|m| tags.contains(&m.as_str()))
                .then_some(()),
        )
    })
    .await
}

/// A GET of `url`; status and body (empty when the body broke).
async fn fetch(url: String) -> (StatusCode, String) {
    let resp = client()
        .request(Request::get(url).body(empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = body_bytes(resp.into_body()).await.unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// POSTs `body` to a `/count` URL of [`test_backend`]; the count it answers with (200).
async fn count(url: String, body: relay_tests::TestBody) -> String {
    let resp = client()
        .request(Request::post(url).body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let text = String::from_utf8(body_bytes(resp.into_body()).await.unwrap().to_vec()).unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    text
}

/// A GET through `base` for backend `name`.
async fn get(base: &str, name: &str, path: &str) -> (StatusCode, String) {
    fetch(format!("{base}/client/{name}{path}")).await
}

/// A GET of one of the replica's own endpoints.
async fn get_path(r: &Replica, path: &str) -> (StatusCode, String) {
    fetch(format!("{}{path}", r.url())).await
}

/// A backend: `/who` answers `id`, `/count` counts the upload, `/big?n` streams n bytes,
/// `/grpc` answers with trailers, `/slow` never answers.
async fn test_backend(id: &'static str) -> std::net::SocketAddr {
    backend(move |req: Request<hyper::body::Incoming>| async move {
        match req.uri().path() {
            "/count" => {
                let mut body = req.into_body();
                let mut n = 0usize;
                while let Some(Ok(f)) = body.frame().await {
                    n += f.data_ref().map_or(0, |d| d.len());
                }
                hyper::Response::new(full(n.to_string()))
            }
            "/big" => {
                let n: usize = req.uri().query().unwrap().parse().unwrap();
                let (tx, body) = channel_body(4);
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![b'd'; 1 << 20]);
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len());
                        if tx.send(data(chunk.slice(..k))).await.is_err() {
                            return;
                        }
                        left -= k;
                    }
                });
                hyper::Response::new(body)
            }
            "/grpc" => {
                let (tx, body) = channel_body(4);
                tokio::spawn(async move {
                    tx.send(data(Bytes::from_static(b"\0\0\0\0\x02hi")))
                        .await
                        .unwrap();
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    tx.send(Ok(Frame::trailers(t))).await.unwrap();
                });
                hyper::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap()
            }
            "/slow" => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            "/cookie" => {
                let cookie = req.headers().get("cookie").map(|v| v.as_bytes().to_vec());
                hyper::Response::new(full(cookie.unwrap_or_default()))
            }
            _ => hyper::Response::new(full(id)),
        }
    })
    .await
}

fn agent(relay: &str, name: &str, backend: std::net::SocketAddr, h2: bool) -> Agent {
    let mut cfg = Agent::config(relay, name, &format!("http://{backend}"));
    cfg.backend_http2 = h2;
    Agent::start(cfg)
}

#[tokio::test]
async fn requests_reach_an_agent_on_another_replica_streaming_both_ways() {
    let redis = Redis::start();
    let secret = Secret::new();
    let home = replica(&redis, &secret, &[]);
    let other = replica(&redis, &secret, &[]);
    let _a = agent(&home.url(), "s", test_backend("home").await, true);
    let _w = agent(&home.url(), "ws", websocket_echo().await, false);
    wait_directory(&redis, "s", &home.tag).await;
    wait_directory(&redis, "ws", &home.tag).await;

    // Plain.
    assert_eq!(
        get(&other.url(), "s", "/who").await,
        (StatusCode::OK, "home".into())
    );

    // Header values with bytes beyond ASCII (a UTF-8 cookie) cross replicas unchanged.
    let cookie: &[u8] = b"name=caf\xc3\xa9; raw=\xff";
    let resp = client()
        .request(
            Request::get(format!("{}/client/s/cookie", other.url()))
                .header("cookie", http::HeaderValue::from_bytes(cookie).unwrap())
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), cookie);

    // 100 MB up, streamed as it is sent.
    let (tx, body) = channel_body(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; 1 << 20]);
        let mut left = MB100;
        while left > 0 {
            let k = left.min(chunk.len());
            tx.send(data(chunk.slice(..k))).await.unwrap();
            left -= k;
        }
    });
    assert_eq!(
        count(format!("{}/client/s/count", other.url()), body).await,
        MB100.to_string()
    );

    // 100 MB down.
    let resp = client()
        .request(
            Request::get(format!("{}/client/s/big?{MB100}", other.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while let Some(f) = body.frame().await {
        got += f.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(got, MB100);

    // gRPC-style: HTTP/2, X-Server-Name, trailers.
    let resp = h2_client()
        .request(
            Request::post(format!("http://{}/grpc", other.public))
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
    let (mut payload, mut trailers) = (Vec::new(), None);
    while let Some(f) = body.frame().await {
        match f.unwrap().into_data() {
            Ok(d) => payload.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    assert_eq!(payload, b"\0\0\0\0\x02hi");
    assert_eq!(
        trailers.expect("trailers crossed both replicas")["grpc-status"],
        "0"
    );

    // WebSocket: the 101 and then bytes both ways through both replicas.
    let mut ws = ws_echo(other.public).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();

    let m = metrics(&other).await;
    assert_eq!(
        value(&m, "relay_cluster_forwarded_total{kind=\"user_out\"}"),
        6,
        "{m}"
    );
    assert_eq!(value(&m, "relay_cluster_redis_up"), 1);
    let m = metrics(&home).await;
    assert_eq!(
        value(&m, "relay_cluster_forwarded_total{kind=\"user_in\"}"),
        6,
        "{m}"
    );

    // The status data shows the cluster view: this replica, Redis, the replicas.
    let (status, json) = get_path(&other, "/status.json").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["cluster"]["replica"], other.tag.as_str());
    assert_eq!(v["cluster"]["redis"], "up");
    let replicas: Vec<&str> = v["cluster"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert!(replicas.contains(&home.tag.as_str()), "{json}");

    // The cluster listener wants the secret.
    let resp = client()
        .request(
            Request::get(format!("http://{}/cluster/request", other.cluster))
                .header(
                    "x-relay-cluster-secret",
                    "not the secret, but long enough to try",
                )
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // And the public listener has no cluster endpoint.
    assert_eq!(
        get_path(&other, "/cluster/request").await.0,
        StatusCode::NOT_FOUND
    );
}

/// A WebSocket to backend `ws` through the replica at `public` (asserting the 101).
async fn ws_echo(public: std::net::SocketAddr) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(public).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{public}/client/ws/echo"), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The agent protocol by hand: a poll parked on one replica, the response posted to another
/// and the upload pulled from a third reach the owner (the id carries its tag).
#[tokio::test]
async fn agent_calls_that_land_on_another_replica_reach_the_owner() {
    let redis = Redis::start();
    let secret = Secret::new();
    let r: Vec<Replica> = (0..3).map(|_| replica(&redis, &secret, &[])).collect();
    let c = client();
    let call = |method: &str, url: String, body: relay_tests::TestBody| {
        Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-relay-agent-id", "handmade-agent-0001")
            .header("x-relay-protocol", "1")
            .body(body)
            .unwrap()
    };
    // Park a poll on replica 0, then send a user request with a body to replica 0.
    let poll = c.request(call(
        "GET",
        format!("{}/server/request?server=hand", r[0].url()),
        empty(),
    ));
    let poll = tokio::spawn(poll);
    wait_directory(&redis, "hand", &r[0].tag).await;
    let user = tokio::spawn(
        client().request(
            Request::post(format!("{}/client/hand/upload", r[1].url()))
                .body(full("user bytes"))
                .unwrap(),
        ),
    );
    let resp = poll.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: PollAnswer =
        serde_json::from_slice(&body_bytes(resp.into_body()).await.unwrap()).unwrap();
    let head = &answer.requests[0];
    assert_eq!(head.body, BodyKind::Stream);
    assert!(
        head.id.starts_with(&r[0].tag),
        "the id {} carries its owner",
        head.id
    );

    // The upload, pulled through replica 2.
    let resp = c
        .request(call(
            "GET",
            format!(
                "{}/server/requeststream?id={}&offset=0",
                r[2].url(),
                head.id
            ),
            empty(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let framed = body_bytes(resp.into_body()).await.unwrap();
    let mut dec = frame::Decoder::default();
    let mut input = framed.clone();
    let mut upload = Vec::new();
    while let Some(item) = dec.decode(&mut input).unwrap() {
        if let frame::Item::Data(d) = item {
            upload.extend_from_slice(&d);
        }
    }
    assert_eq!(upload, b"user bytes");

    // The response, posted to replica 1.
    let head_json = serde_json::to_vec(&ResponseHead {
        status: 201,
        headers: vec![("x-made".into(), "by hand".into())].into(),
        body: BodyKind::Stream,
        content_length: None,
    })
    .unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&frame::control(Kind::Head, &head_json));
    out.extend_from_slice(&frame::header(Kind::Data, 5));
    out.extend_from_slice(b"reply");
    out.extend_from_slice(&frame::control(Kind::End, b""));
    let resp = c
        .request(call(
            "POST",
            format!("{}/server/response?id={}&offset=0", r[1].url(), head.id),
            full(out),
        ))
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let resp = user.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-made"], "by hand");
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "reply");
    assert_eq!(
        value(
            &metrics(&r[1]).await,
            "relay_cluster_forwarded_total{kind=\"agent_out\"}"
        ),
        1
    );
    assert_eq!(
        value(
            &metrics(&r[2]).await,
            "relay_cluster_forwarded_total{kind=\"agent_out\"}"
        ),
        1
    );
    assert_eq!(
        value(
            &metrics(&r[0]).await,
            "relay_cluster_forwarded_total{kind=\"agent_in\"}"
        ),
        2
    );
    // An id of this replica's own tag that it does not know is just unknown, and a grant
    // never widens: a token-less call is refused before any forwarding.
    let resp = c
        .request(
            Request::post(format!("{}/server/response?id={}", r[1].url(), head.id))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn agents_on_several_replicas_share_the_load_and_real_agents_work_through_the_balancer() {
    let redis = Redis::start();
    let secret = Secret::new();
    let r: Vec<Replica> = (0..3).map(|_| replica(&redis, &secret, &[])).collect();
    let lb = balancer(r.iter().map(|x| x.public).collect()).await;
    let _a = agent(&r[0].url(), "shared", test_backend("a").await, false);
    let _b = agent(&r[1].url(), "shared", test_backend("b").await, false);
    wait_directory(&redis, "shared", &r[0].tag).await;
    wait_directory(&redis, "shared", &r[1].tag).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let (status, who) = get(&r[2].url(), "shared", "/who").await;
        assert_eq!(status, StatusCode::OK);
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both replicas' agents served: {seen:?}");

    // A real relay-client whose every connection goes through the balancer: its session
    // lands on one replica, its responses and uploads on any.
    let _lb_agent = agent(
        &format!("http://{lb}"),
        "lb",
        test_backend("lb").await,
        false,
    );
    let tags: Vec<&str> = r.iter().map(|x| x.tag.as_str()).collect();
    wait_directory_any(&redis, "lb", &tags).await;
    if !relay_tests::test_transport().tries_session() {
        // Its first polls go round the balancer to every replica. Each must be listed
        // before the first request: a replica whose list of the name's holders was read
        // before the others registered would keep the request for its own agent, whose
        // polls may all be parked elsewhere (the blind choice `cluster/parked.rs`
        // describes), and the request would wait out its pickup timeout.
        for tag in &tags {
            wait_directory(&redis, "lb", tag).await;
        }
    }
    for i in 0..30 {
        let body = vec![b'x'; 10_000 + i];
        assert_eq!(
            count(format!("http://{lb}/client/lb/count"), full(body)).await,
            (10_000 + i).to_string()
        );
    }
}

#[tokio::test]
async fn a_request_goes_where_the_agents_poll_is_parked_not_where_its_name_lingers() {
    // An agent that moved (a balancer, a restart) leaves a replica that still holds its name:
    // the agent's record there lingers for the agent grace and the directory's entry for its
    // lease. A request sent there would wait out the pickup timeout (503); it must go to the
    // replica where the agent's poll is parked.
    let redis = Redis::start();
    let secret = Secret::new();
    let grace = ["--agent-grace", "120s"];
    let r: Vec<Replica> = (0..3).map(|_| replica(&redis, &secret, &grace)).collect();
    let (left, home, entry) = (&r[0], &r[1], &r[2]);
    let old = agent(&left.url(), "moved", test_backend("left").await, false);
    wait_directory(&redis, "moved", &left.tag).await;
    old.kill();
    let _new = agent(&home.url(), "moved", test_backend("home").await, false);
    wait_directory(&redis, "moved", &home.tag).await;
    wait_directory(&redis, "moved", &left.tag).await;
    // The entry replica's list of holders alternates its order; every request still goes
    // home, and so does every one reaching the replica the agent left.
    for _ in 0..6 {
        for via in [entry, left] {
            assert_eq!(
                get(&via.url(), "moved", "/who").await,
                (StatusCode::OK, "home".into())
            );
        }
    }
}

#[tokio::test]
async fn go_relay_clients_through_the_balancer_are_answered_on_every_replica() {
    let redis = Redis::start();
    let secret = Secret::new();
    let r: Vec<Replica> = (0..3).map(|_| replica(&redis, &secret, &[])).collect();
    let lb = balancer(r.iter().map(|x| x.public).collect()).await;
    const SIZE: usize = 3 * 1024 * 1024 + 17;
    let be = backend(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/count" {
            let n = body_bytes(req.into_body()).await.unwrap().len();
            return http::Response::new(full(n.to_string()));
        }
        // Several messages of the Go client (1 MiB each), so they land on several replicas.
        http::Response::new(full(vec![b'g'; SIZE]))
    })
    .await;
    // Three pollers, each on its own connection through the balancer; every request's
    // messages go out on fresh connections, so they land anywhere.
    let _go = relay_tests::procs::go_relay_client(
        lb,
        "go",
        TOKEN,
        Some(be),
        &["--num_pending_requests", "3"],
    );
    for x in &r {
        wait_directory(&redis, "go", &x.tag).await;
    }
    for i in 0..6 {
        let (status, body) = fetch(format!("http://{lb}/client/go/big")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), SIZE, "download {i} arrives whole");
        assert_eq!(
            count(
                format!("http://{lb}/client/go/count"),
                full(vec![b'u'; 50_000 + i])
            )
            .await,
            (50_000 + i).to_string()
        );
    }
    let mut forwarded = 0;
    for x in &r {
        forwarded += value(
            &metrics(x).await,
            r#"relay_cluster_forwarded_total{kind="agent_out"}"#,
        );
    }
    assert!(
        forwarded > 0,
        "messages reached replicas that did not own their request"
    );
}

#[tokio::test]
async fn a_dying_replica_fails_its_requests_cleanly_and_its_agents_move() {
    let redis = Redis::start();
    let secret = Secret::new();
    let mut r: Vec<Replica> = (0..3).map(|_| replica(&redis, &secret, &[])).collect();
    let lb = balancer(r.iter().map(|x| x.public).collect()).await;
    let be = test_backend("up").await;
    // One agent only on replica 0, one through the balancer.
    let _pinned = agent(&r[0].url(), "pinned", be, false);
    let _moving = agent(&format!("http://{lb}"), "moving", be, false);
    wait_directory(&redis, "pinned", &r[0].tag).await;
    let tags: Vec<&str> = r.iter().map(|x| x.tag.as_str()).collect();
    wait_directory_any(&redis, "moving", &tags).await;
    // A request forwarded to replica 0 that is waiting for its answer when 0 dies.
    let via = r[1].url();
    let in_flight = tokio::spawn(async move { get(&via, "pinned", "/slow").await });
    eventually(
        Duration::from_secs(20),
        "a request in flight on 0",
        || async { (value(&metrics(&r[0]).await, "relay_requests_in_flight") > 0).then_some(()) },
    )
    .await;
    drop(r.remove(0)); // SIGKILL
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), in_flight)
        .await
        .expect("the in-flight request ends, never hangs")
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");

    // Through the balancer the name served by the moving agent works again within 35 s.
    let body = eventually(
        Duration::from_secs(35),
        "moving answering again",
        || async {
            let (status, body) = get(&format!("http://{lb}"), "moving", "/who").await;
            (status == StatusCode::OK).then_some(body)
        },
    )
    .await;
    assert_eq!(body, "up");
    // Then every request succeeds, whichever replica it lands on.
    for _ in 0..6 {
        assert_eq!(
            get(&format!("http://{lb}"), "moving", "/who").await.0,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn without_redis_replicas_serve_their_own_agents_and_recover_when_it_returns() {
    let mut redis = Redis::start();
    let secret = Secret::new();
    let home = replica(&redis, &secret, &[]);
    let mut other = replica(&redis, &secret, &[]);
    let _a = agent(&home.url(), "r", test_backend("r").await, false);
    wait_directory(&redis, "r", &home.tag).await;
    assert_eq!(get(&other.url(), "r", "/who").await.0, StatusCode::OK);

    redis.stop();
    // Local agents keep working.
    assert_eq!(
        get(&home.url(), "r", "/who").await,
        (StatusCode::OK, "r".into())
    );
    // Cross-replica requests get a clear 503 with Retry-After (the name's cached lookup
    // lasts a second; the answer turns once it runs out).
    let resp = eventually(
        Duration::from_secs(20),
        "a refusal without Redis",
        || async {
            let resp = client()
                .request(
                    Request::get(format!("{}/client/r/who", other.url()))
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            (resp.status() != StatusCode::OK).then_some(resp)
        },
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let text = String::from_utf8(body_bytes(resp.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(
        text.contains("Redis") && text.contains("unreachable"),
        "{text}"
    );
    let (status, ready) = get_path(&other, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ready.starts_with("degraded"), "{ready}");
    other
        .proc
        .wait_line("cluster directory (Redis) unreachable");

    // Redis comes back empty; the replicas register again on their own.
    redis.restart();
    wait_directory(&redis, "r", &home.tag).await;
    other.proc.next_line("cluster directory (Redis) reachable");
    assert_eq!(
        get(&other.url(), "r", "/who").await,
        (StatusCode::OK, "r".into())
    );
    assert_eq!(
        get_path(&other, "/readyz").await,
        (StatusCode::OK, "ready\n".into())
    );
}

#[tokio::test]
async fn a_signed_link_is_single_use_and_its_session_admits_on_every_replica() {
    let redis = Redis::start();
    let secret = Secret::new();
    let key = relay_common::id::random_hex(32);
    let key_file = secret.path.with_file_name("link-secret");
    std::fs::write(&key_file, &key).unwrap();
    let flags = [
        "--access",
        "signed-link",
        "--link-secret-file",
        key_file.to_str().unwrap(),
    ];
    let home = replica(&redis, &secret, &flags);
    let other = replica(&redis, &secret, &flags);
    let _a = agent(&home.url(), "sl", test_backend("sl").await, false);
    wait_directory(&redis, "sl", &home.tag).await;
    let q = relay_server::user::link::sign(
        &relay_server::Secret(key),
        "sl",
        "/",
        Duration::from_secs(60),
    );
    let open = |base: String, cookie: Option<String>, query: Option<String>| async move {
        let mut req = Request::get(match query {
            // The link is signed for "/" and opened there; its session covers "/who".
            Some(q) => format!("{base}/client/sl/?{q}"),
            None => format!("{base}/client/sl/who"),
        });
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        client().request(req.body(empty()).unwrap()).await.unwrap()
    };
    // Redeemed on one replica…
    let resp = open(other.url(), None, Some(q.clone())).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // …used up on every replica…
    let resp = open(home.url(), None, Some(q)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let text = body_bytes(resp.into_body()).await.unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("already used"),
        "{text:?}"
    );
    // …and its session admits on both.
    for base in [home.url(), other.url()] {
        let resp = open(base, Some(cookie.clone()), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "sl");
    }
    // A made-up session admits nowhere.
    let resp = open(home.url(), Some("relay_session=00ff".into()), None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Redis holds digests, never the cookie's value.
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("relay:session:*")
        .query(&mut c)
        .unwrap();
    assert_eq!(keys.len(), 1);
    let id = cookie.split('=').nth(1).unwrap();
    assert!(!keys[0].contains(id));
    // Whoever can write to Redis cannot mint a session: a copy of the real record under the
    // digest of an id of their choosing admits nowhere (the record's MAC binds it to its
    // digest and needs the cluster secret).
    let record: String = redis::cmd("GET").arg(&keys[0]).query(&mut c).unwrap();
    let minted = "6d696e7465642d62792d612d72656469732d777269746572".to_owned();
    let digest: String = {
        use sha2::Digest;
        relay_common::id::hex(&sha2::Sha256::digest(minted.as_bytes()))
    };
    let _: () = redis::cmd("SET")
        .arg(format!("relay:session:{digest}"))
        .arg(&record)
        .query(&mut c)
        .unwrap();
    // Nor can it write a session record of its own.
    let value = record.rsplit_once('\n').unwrap().0.to_owned();
    let _: () = redis::cmd("SET")
        .arg(format!("relay:session:{digest}"))
        .arg(&value)
        .query(&mut c)
        .unwrap();
    for base in [home.url(), other.url()] {
        let resp = open(base, Some(format!("relay_session={minted}")), None).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn redis_writers_without_the_secret_cannot_steer_requests_and_calls_need_a_mac() {
    let redis = Redis::start();
    let secret = Secret::new();
    let a = replica(&redis, &secret, &[]);
    // A listener of the attacker's, which Redis is told holds backend `x`.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let caught = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = caught.clone();
    tokio::spawn(async move {
        // Holds what it accepts open and unanswered, as a thief would.
        let mut held = Vec::new();
        while let Ok((s, _)) = trap.accept().await {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("relay:replica:0badc0de")
        .arg(format!("http://{trap_addr}"))
        .query(&mut c)
        .unwrap();
    // A copy of a genuine replica's signed record under the fake tag fails as well.
    // The replica may announce Redis reachable a moment before its record is written.
    let key = format!("relay:replica:{}", a.tag);
    let genuine: String = eventually(Duration::from_secs(20), "the replica's record", || {
        let v: Option<String> = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        std::future::ready(v)
    })
    .await;
    let _: () = redis::cmd("SET")
        .arg("relay:replica:0badc0df")
        .arg(genuine.replace(&a.cluster.to_string(), &trap_addr.to_string()))
        .query(&mut c)
        .unwrap();
    for tag in ["0badc0de", "0badc0df"] {
        let _: () = redis::cmd("ZADD")
            .arg("relay:name:x")
            .arg(u64::MAX / 4)
            .arg(tag)
            .query(&mut c)
            .unwrap();
    }
    // The user's request is not sent there: no replica holds `x`.
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), get(&a.url(), "x", "/"))
        .await
        .expect("the request went to the attacker's address and waits there");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(!caught.load(std::sync::atomic::Ordering::SeqCst));
    // A call that presents the cluster secret itself (the old scheme) is refused: only a
    // MAC made with the derived key admits, and the secret never travels.
    let secret_value = std::fs::read_to_string(&secret.path).unwrap();
    let resp = client()
        .request(
            Request::get(format!("http://{}/cluster/request", a.cluster))
                .header("x-relay-cluster-secret", secret_value.trim())
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let text = body_bytes(resp.into_body()).await.unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("X-Relay-Cluster-Auth"),
        "{text:?}"
    );
}

#[tokio::test]
async fn replicas_call_each_other_over_tls_when_configured() {
    let redis = Redis::start();
    let secret = Secret::new();
    let (ca, leaf, key) = relay_tests::pki::throwaway_pki_pem();
    let dir = secret.path.parent().unwrap().to_owned();
    let (ca_file, cert_file, key_file) = (
        dir.join("cluster-ca.pem"),
        dir.join("cluster-cert.pem"),
        dir.join("cluster-key.pem"),
    );
    std::fs::write(&ca_file, ca).unwrap();
    std::fs::write(&cert_file, leaf).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let flags = [
        "--cluster-tls-cert",
        cert_file.to_str().unwrap(),
        "--cluster-tls-key",
        key_file.to_str().unwrap(),
        "--cluster-ca",
        ca_file.to_str().unwrap(),
    ];
    let home = replica(&redis, &secret, &flags);
    let other = replica(&redis, &secret, &flags);
    let _a = agent(&home.url(), "s", test_backend("home").await, true);
    let _w = agent(&home.url(), "ws", websocket_echo().await, false);
    wait_directory(&redis, "s", &home.tag).await;
    wait_directory(&redis, "ws", &home.tag).await;
    // The directory advertises the TLS listener.
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let record: String = redis::cmd("GET")
        .arg(format!("relay:replica:{}", home.tag))
        .query(&mut c)
        .unwrap();
    assert!(
        record.contains(&format!("https://{}", home.cluster)),
        "{record}"
    );
    // A pooled HTTP/2 call and an HTTP/1.1 upgrade cross over TLS.
    assert_eq!(
        get(&other.url(), "s", "/who").await,
        (StatusCode::OK, "home".into())
    );
    let mut ws = ws_echo(other.public).await;
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));
    ws.close(None).await.unwrap();
    let m = metrics(&other).await;
    assert_eq!(
        value(&m, "relay_cluster_forwarded_total{kind=\"user_out\"}"),
        2,
        "{m}"
    );
    // Plain HTTP gets no answer from the cluster listener.
    let resp = client()
        .request(
            Request::get(format!("http://{}/cluster/request", home.cluster))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert!(resp.is_err(), "{resp:?}");
}

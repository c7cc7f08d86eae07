//! Operations: metric names and values after known traffic, bounded label sets, readiness
//! during the drain, the admin listener, and the status page's JSON twin.

use http::{Request, Response, StatusCode};
use relay_tests::*;

async fn get_text(url: String) -> (StatusCode, String) {
    let resp = client()
        .request(Request::get(url).body(empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = body_bytes(resp.into_body()).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the sample line that starts with `series` (exact labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A backend answering `/status/NNN` with that status and anything else with 200.
async fn status_backend() -> std::net::SocketAddr {
    backend(|req: Request<hyper::body::Incoming>| async move {
        let code = req
            .uri()
            .path()
            .strip_prefix("/status/")
            .and_then(|c| c.parse().ok())
            .unwrap_or(200);
        let _ = body_bytes(req.into_body()).await;
        Response::builder().status(code).body(full("x")).unwrap()
    })
    .await
}

#[tokio::test]
async fn metrics_count_known_traffic_and_forget_names_that_leave() {
    let addr = status_backend().await;
    let (server, agent) = relay_to(addr, "a").await;
    let c = client();
    let url = |p: &str| format!("{}{p}", server.url());
    for _ in 0..3 {
        let r = c
            .request(Request::get(url("/client/a/")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        body_bytes(r.into_body()).await.unwrap();
    }
    let r = c
        .request(
            Request::post(url("/client/a/up"))
                .body(full("hello"))
                .unwrap(),
        )
        .await
        .unwrap();
    body_bytes(r.into_body()).await.unwrap();
    let r = c
        .request(
            Request::get(url("/client/a/status/503"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    body_bytes(r.into_body()).await.unwrap();
    assert_eq!(get_text(url("/client/ghost/")).await.0, 503);
    // An agent with a wrong token.
    let bad = client()
        .request(
            Request::get(url("/server/request?server=a"))
                .header("authorization", "Bearer wrong-token-0123456789")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    server.wait_idle().await;

    let (status, m) = get_text(url("/metrics")).await;
    assert_eq!(status, 200);
    let has = |series: &str, want: f64| {
        assert_eq!(sample(&m, series), Some(want), "{series} in\n{m}");
    };
    has(
        r#"relay_requests_total{name="a",method="GET",status="2xx"}"#,
        3.0,
    );
    has(
        r#"relay_requests_total{name="a",method="POST",status="2xx"}"#,
        1.0,
    );
    has(
        r#"relay_requests_total{name="a",method="GET",status="5xx"}"#,
        1.0,
    );
    has(
        r#"relay_requests_total{name="",method="GET",status="5xx"}"#,
        1.0,
    );
    has(r#"relay_body_bytes_total{name="a",direction="up"}"#, 5.0);
    has(r#"relay_body_bytes_total{name="a",direction="down"}"#, 5.0);
    has(
        &format!(
            r#"relay_agents{{name="a",protocol="{}"}}"#,
            native_protocol()
        ),
        1.0,
    );
    has(r#"relay_auth_failures_total{side="agent"}"#, 1.0);
    has("relay_request_duration_seconds_count", 5.0);
    has("relay_time_to_response_head_seconds_count", 5.0);
    has("relay_pickup_wait_seconds_count", 5.0);
    has("relay_parked_requests", 0.0);
    assert!(m.trim_end().ends_with("# EOF"));

    // The name leaves: its series go with it.
    agent.stop().await.unwrap();
    wait_for(|| !server.state.broker.is_connected("a")).await;
    let (_, m) = get_text(url("/metrics")).await;
    assert!(
        !m.contains(r#"name="a""#),
        "series of a gone name remain:\n{m}"
    );
}

#[tokio::test]
async fn status_json_lists_backends_agents_and_errors() {
    let addr = status_backend().await;
    let (server, _agent) = relay_to(addr, "a").await;
    for p in ["/client/a/", "/client/a/", "/client/nobody/"] {
        get_text(format!("{}{p}", server.url())).await;
    }
    let (status, text) = get_text(format!("{}/status.json", server.url())).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let b = &v["backends"][0];
    assert_eq!(b["name"], "a");
    assert_eq!(b["requests"], 2);
    assert_eq!(b["series"].as_array().unwrap().len(), 90);
    let agent = &b["agents"][0];
    assert_eq!(agent["addr"], "127.0.0.1");
    assert!(agent["version"]
        .as_str()
        .unwrap()
        .starts_with("relay-client/"));
    let err = &v["recent_errors"][0];
    assert_eq!(err["status"], 503);
    assert!(err["message"].as_str().unwrap().contains("nobody"));
    let (status, page) = get_text(format!("{}/status", server.url())).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>relay status</title>") && !page.contains("src=\"http"));
}

#[tokio::test]
async fn readiness_fails_during_the_drain_while_health_holds() {
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let addr = backend(move |_req| {
        let r = r.clone();
        async move {
            r.notified().await;
            Response::new(full("late"))
        }
    })
    .await;
    let (server, _agent) = relay_to(addr, "a").await;
    assert_eq!(
        get_text(format!("{}/readyz", server.url())).await,
        (StatusCode::OK, "ready\n".into())
    );
    let held = tokio::spawn(get_text(format!("{}/client/a/", server.url())));
    wait_for(|| server.state.broker.in_flight() == 1).await;
    server.shutdown.cancel();
    wait_for(|| server.state.draining()).await;
    assert_eq!(
        get_text(format!("{}/readyz", server.url())).await,
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
    );
    assert_eq!(get_text(format!("{}/healthz", server.url())).await.0, 200);
    // The relay's own answers keep their length (no chunked framing for a known body).
    let raw = raw_exchange(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let raw = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(
        raw.contains("content-length: 3\r\n") && !raw.contains("chunked"),
        "{raw}"
    );
    release.notify_one();
    assert_eq!(held.await.unwrap(), (StatusCode::OK, "late".into()));
}

#[tokio::test]
async fn an_admin_listener_takes_the_operator_endpoints_off_the_public_one() {
    let faces = Faces::start(server_config(), false, true).await;
    let (public_addr, admin_addr, shutdown) =
        (faces.public, faces.admin.unwrap(), faces.shutdown.clone());
    let (status, m) = get_text(format!("http://{admin_addr}/metrics")).await;
    assert_eq!(status, 200);
    assert!(m.contains("relay_open_connections"));
    assert_eq!(get_text(format!("http://{admin_addr}/readyz")).await.0, 200);
    let (status, _) = get_text(format!("http://{admin_addr}/client/a/")).await;
    assert_eq!(status, 404, "the admin listener relays nothing");
    let (status, body) = get_text(format!("http://{public_addr}/metrics")).await;
    assert_eq!(status, 404);
    assert!(!body.contains("relay_"));
    assert_eq!(
        get_text(format!("http://{public_addr}/healthz")).await.0,
        200
    );
    shutdown.cancel();
}

#[tokio::test]
async fn operator_pages_stay_off_the_agent_listener_and_away_from_trusted_proxies() {
    use relay_tests::procs::relay_server;
    let (mut server, addr) = relay_server(&["--agent-listen", "127.0.0.1:0"]);
    let agent = server
        .wait_line("agent endpoints on http://")
        .rsplit("http://")
        .next()
        .unwrap()
        .trim()
        .to_owned();
    for path in ["/metrics", "/status", "/status.json"] {
        assert_eq!(
            get_text(format!("http://{addr}{path}")).await.0,
            200,
            "{path}"
        );
        let (status, body) = get_text(format!("http://{agent}{path}")).await;
        assert_eq!(status, 404, "{path} on the agent listener: {body}");
        assert!(
            !body.contains("relay_") && !body.contains("backends"),
            "{body}"
        );
    }
    // A reverse proxy on loopback passes everyone's requests on: not to it either.
    let (_proxied, addr) = relay_server(&["--trusted-proxy", "127.0.0.1"]);
    for path in ["/metrics", "/status.json"] {
        let (status, body) = get_text(format!("http://{addr}{path}")).await;
        assert_eq!(status, 404, "{path} through a trusted proxy: {body}");
    }
    assert_eq!(get_text(format!("http://{addr}/healthz")).await.0, 200);
}

#[tokio::test]
async fn json_logs_carry_the_request_span_and_traceparent_passes_through() {
    use relay_tests::procs::{binary, Proc};
    let (backend, seen) = recording_backend().await;
    let mut server = Proc::spawn({
        let mut c = std::process::Command::new(binary("relay-server"));
        c.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--log", "info,relay_server::user::access=debug"])
            .args(["--agent-token", &format!("*={TOKEN}")]);
        c
    });
    // The start-up line is a JSON event too, with the address as a field.
    let line = server.wait_line("\"relay-server listening\"");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON start-up line");
    let addr = v["address"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    let _agent = Agent::start(Agent::config(
        &format!("http://{addr}"),
        "traced",
        &format!("http://{backend}"),
    ));
    server.wait_line("relay-client connected");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = client()
        .request(
            Request::get(format!("http://{addr}/client/traced/t"))
                .header("traceparent", traceparent)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(seen.lock().unwrap()[0].headers["traceparent"], traceparent);
    let line = server.wait_line("\"answered\"");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["status"], 200);
    let span = &v["span"];
    assert_eq!(span["backend"], "traced");
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["id"].as_str().unwrap().len(), 32);
    assert_eq!(span["method"], "GET");
    // Every line the server wrote, on stdout and stderr, is one JSON object.
    stop_gracefully(&mut server);
    let lines = server.drain_output();
    assert!(lines.len() >= 3, "{lines:?}");
    for l in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object()),
            "not a JSON object: {l:?}"
        );
    }
}

/// SIGTERM (the drain) and the exit.
fn stop_gracefully(p: &mut relay_tests::procs::Proc) {
    let pid = p.child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = p.child.wait();
}

#[test]
fn json_mode_start_up_banner_and_fatal_error_are_json_too() {
    use relay_tests::procs::{binary, Proc};
    // Zero-config: the generated token's banner, as one JSON event with the command.
    let mut server = Proc::spawn({
        let mut c = std::process::Command::new(binary("relay-server"));
        c.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env_remove("RELAY_AGENT_TOKEN")
            .env_remove("RELAY_CONFIG");
        c
    });
    let line = server.wait_line("\"agent_command\"");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON banner");
    let command = v["agent_command"].as_str().unwrap();
    assert!(
        command.starts_with("relay-client --relay-url http://127.0.0.1:"),
        "{command}"
    );
    assert!(command.contains(" --token "), "{command}");
    let taken =
        serde_json::from_str::<serde_json::Value>(&server.wait_line("\"relay-server listening\""))
            .unwrap()["address"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .to_owned();
    // A second server on the same address fails: its error is a JSON event on stderr.
    let out = std::process::Command::new(binary("relay-server"))
        .args(["--listen", &taken, "--log-format", "json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("a JSON error line");
    assert_eq!(v["level"], "ERROR");
    assert!(v["error"].as_str().unwrap().contains("binding"), "{v}");
    for l in stderr
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
    {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "{l:?}"
        );
    }
}

#[tokio::test]
async fn the_agent_admin_listener_reports_health_readiness_and_metrics() {
    use relay_tests::procs::{relay_client, relay_server};
    let (backend, _seen) = recording_backend().await;
    let (mut server, addr) = relay_server(&[]);
    let mut agent = relay_client(
        &format!("http://{addr}"),
        "adm",
        &format!("http://{backend}"),
        &["--admin-listen", "127.0.0.1:0"],
    );
    let line = agent.wait_line("admin endpoints listening");
    let admin = line
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    agent.wait_line("relay-client started");
    assert_eq!(get_text(format!("http://{admin}/healthz")).await.0, 200);
    // Ready once the relay-server answered (the first session or poll, just after start).
    let ready = eventually(std::time::Duration::from_secs(20), "readiness", || async {
        let r = get_text(format!("http://{admin}/readyz")).await;
        (r.0 == StatusCode::OK).then_some(r)
    })
    .await;
    assert_eq!(ready, (StatusCode::OK, "ready\n".into()));
    // Ready means the server answered the agent; its session (or poll) may still be on
    // the way: users are served once the server has registered it.
    server.wait_line("relay-client connected");
    for _ in 0..2 {
        assert_eq!(get_text(format!("http://{addr}/client/adm/x")).await.0, 200);
    }
    // The user has the whole answer before the agent's upload of it completes, so the
    // agent counts a request as served a moment later: wait for in-flight to drain.
    let patience = std::time::Duration::from_secs(30);
    let m = eventually(patience, "the agent idle", || async {
        let (_, m) = get_text(format!("http://{admin}/metrics")).await;
        (sample(&m, "relay_agent_requests_in_flight") == Some(0.0)).then_some(m)
    })
    .await;
    assert_eq!(
        sample(&m, r#"relay_agent_requests_total{outcome="served"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(sample(&m, "relay_agent_connected"), Some(1.0), "{m}");
    // The relay-server goes away: the agent is alive but not ready.
    drop(server);
    let patience = std::time::Duration::from_secs(60);
    let body = eventually(patience, "not ready without a server", || async {
        let (status, body) = get_text(format!("http://{admin}/readyz")).await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
    })
    .await;
    assert!(body.contains("not reachable"), "{body}");
    assert_eq!(get_text(format!("http://{admin}/healthz")).await.0, 200);
}

/// The metric names a PromQL expression uses (`relay_…`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("relay_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_the_server_exports() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/relay-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            names.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    assert!(names.len() >= 14, "{names:?}");

    // Some traffic: relayed requests, a refused agent token, a request over a limit.
    let server = Server::default().await;
    let _agent = Agent::start(Agent::config(
        &server.url(),
        "a",
        &format!("http://{}", status_backend().await),
    ));
    server.wait_agent("a").await;
    for path in ["/", "/status/503"] {
        get_text(format!("{}/client/a{path}", server.url())).await;
    }
    let refused = client()
        .request(
            Request::get(format!("{}/server/request?server=a", server.url()))
                .header("authorization", "Bearer not-a-token")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let long = format!("{}/client/a/{}", server.url(), "x".repeat(9000));
    assert_eq!(get_text(long).await.0, StatusCode::URI_TOO_LONG);

    let (status, metrics) = get_text(format!("{}/metrics", server.url())).await;
    assert_eq!(status, StatusCode::OK);
    // Series that exist only in cluster mode: their family must still be declared.
    let cluster_only = ["relay_cluster_forwarded_total"];
    for name in &names {
        let has_sample = metrics
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
        let family = name.trim_end_matches("_total");
        let declared = metrics.contains(&format!("# TYPE {family} "));
        assert!(
            has_sample || (cluster_only.contains(&name.as_str()) && declared),
            "the dashboard queries {name}, which /metrics does not export:\n{metrics}"
        );
    }
}

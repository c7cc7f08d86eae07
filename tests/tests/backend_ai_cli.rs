//! Backend.AI's own CLI (`backend.ai app`, PyPI backend.ai-client 23.9) pointed at the relay
//! reaches a service port of the agent unchanged: its API version probe (answered by the
//! agent, whatever the backend serves at `/`), its `/apps` check, then one signed WebSocket
//! per local TCP connection.

use std::path::PathBuf;
use std::process::Command;

use relay_tests::procs::Proc;
use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cli_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bai-venv/bin/backend.ai");
    assert!(
        path.exists(),
        "{} is missing: the README's test command installs backend.ai-client into target/bai-venv",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_ai_app_through_the_relay() {
    let cli = cli_binary();
    let echo = tcp_echo(b"").await;
    // A backend that answers every path with JSON of its own (a JSON API, not a Backend.AI
    // manager): the CLI's version probe must not reach it.
    let api = backend(|_req: http::Request<hyper::body::Incoming>| async move {
        let mut resp = hyper::Response::new(full(r#"{"service":"lab api"}"#));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        resp
    })
    .await;
    let server = Server::default().await;
    let mut cfg = Agent::config(&server.url(), "box", &format!("http://{api}"));
    cfg.services = vec![("echo".into(), echo.to_string())];
    cfg.kernel_id = Some("sess-1".into());
    let _agent = Agent::start(cfg);
    server.wait_agent("box").await;

    // `backend.ai app` cannot bind port 0 and report it; take a port the OS just handed out.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new(cli);
    cmd.args(["app", "sess-1", "echo", "-b", &format!("127.0.0.1:{port}")])
        .env("BACKEND_ENDPOINT", format!("{}/client/box", server.url()))
        .env("BACKEND_ENDPOINT_TYPE", "api")
        .env("BACKEND_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE")
        .env(
            "BACKEND_SECRET_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
        .env("PYTHONUNBUFFERED", "1");
    let mut proc = tokio::task::spawn_blocking(move || {
        let mut p = Proc::spawn(cmd);
        p.wait_line("A local proxy to the application");
        p
    })
    .await
    .unwrap();

    // Two local connections, each its own tunnel.
    for i in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let msg = format!("hello backend.ai {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    let _ = proc.child.kill();
    let _ = proc.child.wait();
    // Everyone else's `GET /` still reaches the backend.
    let resp = client()
        .request(
            http::Request::get(format!("{}/client/box/", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(
        body_bytes(resp.into_body()).await.unwrap(),
        r#"{"service":"lab api"}"#
    );
}

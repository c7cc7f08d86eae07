//! The live status page in a real browser (Debian's headless Chromium, driven over the
//! DevTools protocol with a real WebSocket client): a connected backend appears, and its
//! request counter moves after traffic without reloading the page.

use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Request;
use relay_tests::procs::{Proc, TempDir};
use relay_tests::*;
use tokio_tungstenite::tungstenite::Message;

fn chromium() -> &'static str {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(p).exists() {
            return p;
        }
    }
    panic!("chromium is not installed: run the README's test command, which installs it");
}

/// One page of a headless browser, evaluated over the DevTools protocol.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    next_id: u64,
}

impl Page {
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.ws.send(Message::text(call.to_string())).await.unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no DevTools answer")
                .unwrap()
                .unwrap();
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                return v["result"]["result"]["value"].clone();
            }
        }
    }

    /// Evaluates `expression` until it yields `want` (the page refreshes itself every 2 s).
    async fn wait_for_value(&mut self, expression: &str, want: serde_json::Value) {
        // A hand-rolled loop: each evaluation borrows the page's connection mutably, which
        // a closure handing out futures cannot.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.eval(expression).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expression} stayed {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_backends_and_refreshes_itself() {
    let (rec, _seen) = recording_backend().await;
    let (server, _agent) = relay_to(rec, "robot-7").await;
    let c = client();
    let traffic = |n: usize| {
        let c = c.clone();
        let url = format!("{}/client/robot-7/x", server.url());
        async move {
            for _ in 0..n {
                let r = c
                    .request(Request::get(&url).body(empty()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                body_bytes(r.into_body()).await.unwrap();
            }
        }
    };
    traffic(3).await;

    let profile = TempDir::new("chromium");
    let mut browser = Proc::spawn({
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(format!("{}/status", server.url()));
        cmd
    });
    let line = browser.wait_line("DevTools listening on ws://");
    let port: u16 = line
        .split("ws://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("DevTools port");
    // The page's own DevTools endpoint.
    let targets: serde_json::Value = {
        let resp = client()
            .request(
                Request::get(format!("http://127.0.0.1:{port}/json/list"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        serde_json::from_slice(&body_bytes(resp.into_body()).await.unwrap()).unwrap()
    };
    let page_ws = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_owned();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(page_ws, tcp).await.unwrap();
    let mut page = Page { ws, next_id: 0 };

    let counter = r#"(document.querySelector('tr[data-backend="robot-7"] .requests') || {}).textContent || null"#;
    page.wait_for_value(counter, "3".into()).await;
    let agents = r#"document.querySelector('tr[data-backend="robot-7"] .agents').textContent"#;
    let text = page.eval(agents).await;
    assert!(
        text.as_str().unwrap().contains("relay-client/"),
        "agent line: {text}"
    );
    // Traffic moves the counter on the open page.
    traffic(5).await;
    page.wait_for_value(counter, "8".into()).await;
    assert_eq!(page.eval("document.body.dataset.loaded").await, "1");
}

//! The relay-server terminating TLS itself: agents verify it with --relay-ca-file, users get
//! HTTP/2 or HTTP/1.1 by ALPN, and a changed certificate is picked up without a restart.

use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_tests::pki::throwaway_pki_pem;
use relay_tests::procs::TempDir;
use relay_tests::*;

fn https_client(ca: &std::path::Path, h2: bool) -> Client<relay_client::tls::Connector, TestBody> {
    let connector = relay_client::tls::connector(Some(ca), h2, std::time::Duration::ZERO).unwrap();
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn tls_with_alpn_and_certificate_reload() {
    let dir = TempDir::new("tls");
    let (ca1, leaf1, key1) = throwaway_pki_pem();
    // The certificate rotated to later, from another CA.
    let (ca2, leaf2, key2) = throwaway_pki_pem();
    let (cert, key, ca1_file, ca2_file, both_file) = (
        dir.0.join("cert.pem"),
        dir.0.join("key.pem"),
        dir.0.join("ca1.pem"),
        dir.0.join("ca2.pem"),
        dir.0.join("both.pem"),
    );
    std::fs::write(&cert, leaf1).unwrap();
    std::fs::write(&key, key1).unwrap();
    std::fs::write(&ca1_file, &ca1).unwrap();
    std::fs::write(&ca2_file, &ca2).unwrap();
    std::fs::write(&both_file, format!("{ca1}{ca2}")).unwrap();

    let (rec, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.tls = Some((cert.clone(), key.clone()));
    let server = Server::start(cfg).await;
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let mut acfg = Agent::config(&base, "t", &format!("http://{rec}"));
    // The agent trusts both CAs, as a planned rotation sets it up: it opens connections
    // (exchanges, a new session) before and after the rotation.
    acfg.relay_ca_file = Some(both_file.clone());
    let _agent = Agent::start(acfg);
    server.wait_agent("t").await;

    for h2 in [false, true] {
        let resp = https_client(&ca1_file, h2)
            .request(
                Request::get(format!("{base}/client/t/x"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(resp.version(), want, "ALPN picks the protocol");
    }
    assert_eq!(
        seen.lock().unwrap()[0].headers["x-forwarded-proto"],
        "https"
    );
    // Plain HTTP on the TLS port gets nowhere.
    let plain = raw_exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!String::from_utf8_lossy(&plain).contains("200 OK"));

    // Rotate to the certificate from the other CA: new connections get it (a client that
    // trusts only that CA gets through), and the agent keeps working.
    std::fs::write(dir.0.join("cert.new"), leaf2).unwrap();
    std::fs::write(dir.0.join("key.new"), key2).unwrap();
    std::fs::rename(dir.0.join("key.new"), &key).unwrap();
    std::fs::rename(dir.0.join("cert.new"), &cert).unwrap();
    let patience = std::time::Duration::from_secs(20);
    eventually(patience, "the new certificate served", || async {
        let r = https_client(&ca2_file, false)
            .request(
                Request::get(format!("{base}/healthz"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        r.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;
    // A broken file is refused; the last good certificate stays in service.
    let tls = server.state.tls.get().unwrap().clone();
    assert!(tls.reloads() >= 1);
    std::fs::write(&cert, "not a certificate").unwrap();
    wait_for(|| tls.failed_reloads() >= 1).await;
    let resp = https_client(&ca2_file, false)
        .request(
            Request::get(format!("{base}/client/t/y"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

//! Agents authenticated by client certificates (mTLS) instead of tokens.

use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_tests::pki::{client_ca, client_cert, throwaway_pki_pem};
use relay_tests::procs::TempDir;
use relay_tests::*;

#[tokio::test]
async fn agents_authenticate_by_client_certificate() {
    let dir = TempDir::new("mtls");
    let (server_ca, leaf, key) = throwaway_pki_pem();
    let server_ca = dir.write("server-ca.pem", &server_ca);
    let (cert, key) = (dir.write("cert.pem", &leaf), dir.write("key.pem", &key));
    let agents_ca = client_ca("relay agents");
    let agents_ca_file = dir.write("agents-ca.pem", &agents_ca.0.pem());
    let identity = |tag: &str, (c, k): (String, String)| {
        (
            dir.write(&format!("{tag}.crt"), &c),
            dir.write(&format!("{tag}.key"), &k),
        )
    };
    let robot = identity("robot", client_cert(&agents_ca, &["robot"], &[]));
    let any = identity("any", client_cert(&agents_ca, &[], &["urn:relay-agent:*"]));
    let other = identity("other", client_cert(&agents_ca, &["other"], &[]));
    let rogue_ca = client_ca("someone else");
    let rogue = identity("rogue", client_cert(&rogue_ca, &["robot"], &[]));

    let (rec, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.agent_tokens.clear();
    cfg.tls = Some((cert, key));
    cfg.agent_client_ca = Some(agents_ca_file);
    let server = Server::start(cfg).await;
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let agent = |name: &str, id: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let mut acfg = Agent::config(&base, name, &format!("http://{rec}"));
        acfg.relay_ca_file = Some(server_ca.clone());
        acfg.token = None;
        acfg.client_cert = id.cloned();
        Agent::start(acfg)
    };

    let _robot = agent("robot", Some(&robot));
    let _any = agent("anything-else", Some(&any));
    server.wait_agent("robot").await;
    server.wait_agent("anything-else").await;
    // Users present no certificate and still get through.
    let users: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build(
        relay_client::tls::connector(Some(&server_ca), true, std::time::Duration::ZERO).unwrap(),
    );
    for name in ["robot", "anything-else"] {
        let resp = users
            .request(
                Request::get(format!("{base}/client/{name}/x"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);

    // A certificate for another name, or none at all (and no token): refused, the agent ends.
    let err = agent("robot", Some(&other)).exited().await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let err = agent("robot", None).exited().await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // A certificate from another CA fails the handshake.
    let rogue_tls =
        relay_client::tls::client_config(Some(&server_ca), Some((&rogue.0, &rogue.1))).unwrap();
    let rogue_client: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build(
        relay_client::tls::connector_with(rogue_tls, false, std::time::Duration::ZERO).unwrap(),
    );
    let r = rogue_client
        .request(
            Request::get(format!("{base}/healthz"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert!(r.is_err(), "a certificate of an unknown CA was accepted");
}

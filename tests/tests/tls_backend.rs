//! An https backend verified against a CA given with --backend-ca-file (a throwaway CA made
//! here), and refused without it.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use relay_tests::procs::TempDir;
use relay_tests::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

async fn https_backend(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("over tls")))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_backend_with_a_private_ca() {
    let (ca_pem, cert, key) = relay_tests::pki::throwaway_pki();
    let addr = https_backend(cert, key).await;
    let dir = TempDir::new("ca");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let server = Server::default().await;

    let mut cfg = Agent::config(&server.url(), "tls", &format!("https://{addr}"));
    cfg.backend_ca_file = Some(ca_file);
    let _agent = Agent::start(cfg);
    server.wait_agent("tls").await;
    let resp = client()
        .request(
            Request::get(format!("{}/client/tls/", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await.unwrap(), "over tls");

    // Without the CA the backend's certificate is not trusted: 502, never a plaintext
    // fallback.
    let _untrusting = Agent::start(Agent::config(
        &server.url(),
        "tls2",
        &format!("https://{addr}"),
    ));
    server.wait_agent("tls2").await;
    let resp = client()
        .request(
            Request::get(format!("{}/client/tls2/", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let text = String::from_utf8_lossy(&body_bytes(resp.into_body()).await.unwrap()).into_owned();
    assert!(text.contains("could not reach the backend"), "{text}");
    server.wait_idle().await;
}

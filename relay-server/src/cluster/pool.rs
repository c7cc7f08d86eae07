//! Connections to other replicas: one pooled HTTP/2 connection per address for ordinary
//! calls, a fresh HTTP/1.1 connection per forwarded upgrade, plain TCP or TLS (`https://`
//! replicas, verified against `--cluster-ca`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::base::body::RelayBody;
use crate::cluster::directory::{ClusterError, ClusterTls};

/// Pings on idle inter-replica connections, so a vanished peer is noticed.
const PEER_KEEPALIVE: Duration = Duration::from_secs(10);

/// Longest wait for a TCP connection to another replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pooled HTTP/2 connections to other replicas, one per address, and how to reach
/// `https://` replicas.
pub struct Peers {
    h2: Mutex<HashMap<String, http2::SendRequest<RelayBody>>>,
    /// Client TLS for `https://` replicas: ALPN `h2` (pooled calls) and `http/1.1`
    /// (upgrades).
    tls: Option<(tokio_rustls::TlsConnector, tokio_rustls::TlsConnector)>,
}

/// A connection to another replica, plain or TLS.
pub trait PeerIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> PeerIo for T {}

impl Peers {
    /// No connections yet; `tls` gives the roots `https://` replicas are verified against.
    pub fn new(tls: Option<&ClusterTls>) -> Result<Self, ClusterError> {
        let tls = match tls {
            None => None,
            Some(t) => {
                let bad = |e: &dyn std::fmt::Display| {
                    ClusterError::Settings(format!("--cluster-ca {}: {e}", t.ca.display()))
                };
                let pem = std::fs::read(&t.ca).map_err(|e| bad(&e))?;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                    roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
                if roots.is_empty() {
                    return Err(bad(&"no PEM certificate in the file"));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let connector = |alpn: &[u8]| -> Result<_, ClusterError> {
                    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| bad(&e))?
                        .with_root_certificates(roots.clone())
                        .with_no_client_auth();
                    cfg.alpn_protocols = vec![alpn.to_vec()];
                    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
                };
                Some((connector(b"h2")?, connector(b"http/1.1")?))
            }
        };
        Ok(Peers {
            h2: Mutex::default(),
            tls,
        })
    }

    /// A connection to the replica at `url`, TLS for `https://`; `h2` picks the ALPN.
    pub(super) async fn connect(&self, url: &str, h2: bool) -> std::io::Result<Box<dyn PeerIo>> {
        let (tcp, host, https) = connect(url).await?;
        if !https {
            return Ok(Box::new(tcp));
        }
        let Some((h2_tls, h1_tls)) = &self.tls else {
            return Err(std::io::Error::other(format!(
                "{url} needs TLS, and this replica has no --cluster-tls-cert/--cluster-ca"
            )));
        };
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|_| std::io::Error::other(format!("bad replica host in {url:?}")))?;
        let tls = if h2 { h2_tls } else { h1_tls };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(Box::new(stream))
    }

    /// A sender on the pooled connection to `url`, connecting when there is none or it
    /// closed.
    pub(super) async fn h2(&self, url: &str) -> std::io::Result<http2::SendRequest<RelayBody>> {
        if let Some(s) = self.h2.lock().expect("bug: poisoned").get(url) {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let io = self.connect(url, true).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            // Bulk bodies: windows large enough that one stream fills a LAN link.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            // Long-lived and trusted: see the cluster listener's builder.
            .max_local_error_reset_streams(None)
            .max_pending_accept_reset_streams(None)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(PEER_KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(std::io::Error::other)?;
        let peer = url.to_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer, error = %e, "connection to a relay replica ended");
            }
        });
        self.h2
            .lock()
            .expect("bug: poisoned")
            .insert(url.to_owned(), send.clone());
        Ok(send)
    }

    pub(super) fn drop_conn(&self, url: &str) {
        self.h2.lock().expect("bug: poisoned").remove(url);
    }
}

/// A TCP connection to the replica at `url`, its host, and whether it speaks TLS.
async fn connect(url: &str) -> std::io::Result<(TcpStream, String, bool)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad replica address {url:?}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| std::io::Error::other(format!("bad replica address {url:?}")))?;
    let https = uri.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = authority.host().trim_matches(['[', ']']).to_owned();
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok((tcp, host, https))
}

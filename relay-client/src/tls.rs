//! HTTP clients with rustls for the relay-server and the backend.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{ClientConfig, RootCertStore};

use crate::error::AgentError;
use crate::keepalive;

/// The connector both clients use: plain HTTP or rustls-backed HTTPS.
pub type Connector = HttpsConnector<HttpConnector>;

/// A connector that trusts the system roots, plus `extra_ca` when given. `alpn_h2` offers
/// HTTP/2 over TLS as well as HTTP/1.1. Its connections have TCP keep-alive with interval
/// `keepalive` (`crate::keepalive`; zero: none).
pub fn connector(
    extra_ca: Option<&Path>,
    alpn_h2: bool,
    keepalive: Duration,
) -> Result<Connector, AgentError> {
    connector_with(client_config(extra_ca, None)?, alpn_h2, keepalive)
}

/// [`connector`] over a ready rustls configuration (e.g. one with a client certificate).
pub fn connector_with(
    tls: ClientConfig,
    alpn_h2: bool,
    keepalive: Duration,
) -> Result<Connector, AgentError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    if !keepalive.is_zero() {
        http.set_keepalive(Some(keepalive));
        http.set_keepalive_interval(Some(keepalive::probe_every(keepalive)));
        http.set_keepalive_retries(Some(keepalive::PROBES));
    }
    let b = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    Ok(if alpn_h2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.wrap_connector(http)
    })
}

/// A rustls client configuration trusting the system roots plus `extra_ca`, presenting
/// `identity` (certificate chain and key, PEM) when the server asks for a client certificate.
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, AgentError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs();
    for cert in native {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path)
            .map_err(|e| AgentError::Config(format!("reading {}: {e}", path.display())))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            n += 1;
        }
        if n == 0 {
            return Err(AgentError::Config(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let bad =
        |p: &Path, e: &dyn std::fmt::Display| AgentError::Config(format!("{}: {e}", p.display()));
    let pem = std::fs::read(cert).map_err(|e| bad(cert, &e))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no PEM certificate in the file"));
    }
    let pem = std::fs::read(key).map_err(|e| bad(key, &e))?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| bad(key, &e))?
        .ok_or_else(|| bad(key, &"no PEM private key in the file"))?;
    builder
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| bad(key, &e))
}

/// System trust anchors, read through hyper-rustls' native-roots support once per process:
/// the relay's client and the backend's each build a configuration at start, and reading
/// and parsing the system's PEM bundle is most of an agent's start-up work (about 19
/// million instructions each time, callgrind).
fn rustls_native_certs() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    static NATIVE: std::sync::OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> =
        std::sync::OnceLock::new();
    NATIVE
        .get_or_init(|| rustls_native_certs::load_native_certs().certs)
        .clone()
}

//! TLS termination with rustls: ALPN `h2` and `http/1.1`, certificate and key from PEM files,
//! reloaded when the files change (new connections get the new certificate; open ones keep
//! theirs). A reload that fails keeps the previous configuration and says why.
//!
//! With a client CA, clients may present a certificate (optional: users have none); one that
//! does not chain to the CA fails the handshake. Agents use such certificates instead of
//! tokens; see [`crate::base::auth::cert_grant`] for the names a certificate grants.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    path: String,
    reason: String,
}

fn err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The current server configuration, swapped on reload.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: RwLock<Arc<ServerConfig>>,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, TlsError> {
    let pem = std::fs::read(cert).map_err(|e| err(cert, e))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, e))?;
    if certs.is_empty() {
        return Err(err(cert, "no PEM certificate in the file"));
    }
    let pem = std::fs::read(key).map_err(|e| err(key, e))?;
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| err(key, e))?
        .ok_or_else(|| err(key, "no PEM private key in the file"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| err(ca, e))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(c.map_err(|e| err(ca, e))?)
                    .map_err(|e| err(ca, e))?;
            }
            if roots.is_empty() {
                return Err(err(ca, "no PEM certificate in the file"));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key_der)
        .map_err(|e| err(key, e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

type Mtimes = [Option<SystemTime>; 3];

fn mtimes(cert: &Path, key: &Path, ca: Option<&Path>) -> Mtimes {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    [m(cert), m(key), ca.and_then(m)]
}

impl Tls {
    /// Loads the certificate chain, key and optional client CA; fails if any is unusable.
    pub fn new(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Result<Self, TlsError> {
        let current = RwLock::new(load(&cert, &key, client_ca.as_deref())?);
        Ok(Tls {
            cert,
            key,
            client_ca,
            current,
            reloads: AtomicU64::new(0),
            failed_reloads: AtomicU64::new(0),
        })
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads refused so far (the previous certificate stayed).
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().expect("bug: poisoned").clone())
    }

    /// Reloads the files now (SIGHUP); a failure keeps the current configuration.
    pub fn reload_now(&self) {
        match load(&self.cert, &self.key, self.client_ca.as_deref()) {
            Ok(cfg) => {
                *self.current.write().expect("bug: poisoned") = cfg;
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                self.failed_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate");
            }
        }
    }

    /// Watches the files until `stop`, reloading on change.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let ca = self.client_ca.as_deref();
        let mut seen = mtimes(&self.cert, &self.key, ca);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
                _ = stop.cancelled() => return,
            }
            let now = mtimes(&self.cert, &self.key, ca);
            if now == seen {
                continue;
            }
            seen = now;
            self.reload_now();
        }
    }
}

//! `relay-client connect`: the user side of a service port. Every local TCP connection
//! becomes one WebSocket to `/client/<name>/stream/kernel/<id>/tcpproxy?app=<app>` (as
//! Backend.AI's `backend.ai app` does), offering the half-close subprotocol so that a client
//! that shuts down writing still receives the service's whole reply. With `--stdio` the one
//! connection is stdin and stdout instead (ssh's `ProxyCommand`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::error::{AgentError, TunnelError};
use crate::service::HALF_CLOSE_PROTOCOL;
use crate::splice::{splice, ws_config, Ends};
use crate::tls;

/// Settings of `connect`.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    /// relay-server base URL.
    pub relay_url: Uri,
    /// Backend name.
    pub name: String,
    /// Service (app) name.
    pub app: String,
    /// Kernel/session id (default: the backend name).
    pub kernel_id: Option<String>,
    /// User credential for the relay, sent as `Authorization: Bearer`.
    pub user_token: Option<Secret>,
    /// Extra CA for an https relay-server.
    pub relay_ca_file: Option<PathBuf>,
    /// TCP keep-alive interval of each tunnel's connection to the relay-server (zero: off;
    /// `crate::keepalive`): a tunnel that is quiet while the path to the relay dies (a NAT
    /// that forgot the flow, a laptop's network gone) fails within twice this instead of
    /// hanging until something is sent and then for the kernel's 15 minutes of retries.
    pub tcp_keepalive: Duration,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Target {
    ws_url: String,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    auth: Option<HeaderValue>,
    keepalive: Duration,
}

/// Accepts connections on `listener` until `shutdown`, tunnelling each one.
pub async fn run(
    cfg: ConnectConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let target = Arc::new(target(&cfg)?);
    // The open tunnels belong to this run: on shutdown they end with it (their local
    // connections close) before it returns.
    let tunnels = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => {
                tunnels.close();
                tunnels.wait().await;
                return Ok(());
            }
        };
        let target = target.clone();
        let shutdown = shutdown.clone();
        tunnels.spawn(async move {
            tokio::select! {
                r = tunnel(&target, tcp) => if let Err(e) = r {
                    tracing::warn!(%peer, error = %e, "tunnel failed");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn target(cfg: &ConnectConfig) -> Result<Target, AgentError> {
    let url = &cfg.relay_url;
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(AgentError::Config(format!(
                "--relay-url must be http(s)://, not {url}"
            )))
        }
    };
    let host = url
        .host()
        .ok_or_else(|| AgentError::Config(format!("--relay-url {url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let base = url.path().trim_end_matches('/');
    let id = cfg.kernel_id.as_deref().unwrap_or(&cfg.name);
    let authority = url.authority().map(|a| a.as_str()).unwrap_or(&host);
    let ws_url = format!(
        "{}://{authority}{base}/client/{}/stream/kernel/{id}/tcpproxy?app={}",
        if https { "wss" } else { "ws" },
        cfg.name,
        cfg.app
    );
    let tls = if https {
        let mut c = tls::client_config(cfg.relay_ca_file.as_deref(), None)?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsConnector::from(Arc::new(c)))
    } else {
        None
    };
    let auth = match &cfg.user_token {
        Some(t) => {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", t.0))
                .map_err(|_| AgentError::Config("the user token has invalid characters".into()))?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    Ok(Target {
        ws_url,
        host,
        port,
        tls,
        auth,
        keepalive: cfg.tcp_keepalive,
    })
}

async fn tunnel(target: &Target, local: TcpStream) -> Result<(), TunnelError> {
    let (ws, half_close) = open(target).await?;
    let _ = local.set_nodelay(true);
    let (rd, wr) = local.into_split();
    let ends = if half_close {
        Ends::HalfClose
    } else {
        Ends::Either(1000)
    };
    splice(ws, rd, wr, ends).await;
    Ok(())
}

/// Carries stdin and stdout as one tunnel (ssh's `ProxyCommand`): stdin's EOF is passed on
/// as a write shutdown while the service's bytes keep coming; the service's end ends it,
/// and the process exits, which closes stdout for the reader.
pub async fn stdio(cfg: ConnectConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let target = target(&cfg)?;
    let ws = tokio::select! {
        r = open(&target) => r.map_err(|e| AgentError::Config(format!("tunnel: {e}")))?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let (ws, half_close) = ws;
    let ends = if half_close {
        Ends::HalfCloseUntilRemoteEnds
    } else {
        Ends::Either(1000)
    };
    tokio::select! {
        _ = splice(ws, tokio::io::stdin(), tokio::io::stdout(), ends) => {}
        _ = shutdown.cancelled() => {}
    }
    Ok(())
}

/// Opens the WebSocket of one tunnel; says whether the half-close subprotocol was agreed.
async fn open(
    target: &Target,
) -> Result<(tokio_tungstenite::WebSocketStream<Box<dyn Io>>, bool), TunnelError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(TunnelError::Connect)?;
    let _ = tcp.set_nodelay(true);
    // No TCP_USER_TIMEOUT: a tunnel's far end may stop reading for as long as it likes.
    crate::keepalive::apply(&tcp, target.keepalive, false).map_err(TunnelError::Connect)?;
    let stream: Box<dyn Io> = match &target.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| TunnelError::HostName(e.to_string()))?;
            Box::new(tls.connect(name, tcp).await.map_err(TunnelError::Tls)?)
        }
    };
    let mut req = target
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| TunnelError::Handshake(format!("bad tunnel URL: {e}")))?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(HALF_CLOSE_PROTOCOL),
    );
    if let Some(auth) = &target.auth {
        req.headers_mut().insert("authorization", auth.clone());
    }
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .map_err(|e| TunnelError::Handshake(e.to_string()))?;
    let half_close = resp
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|v| v.as_bytes() == HALF_CLOSE_PROTOCOL.as_bytes());
    Ok((ws, half_close))
}

/// Binds the local listener (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AgentError> {
    // A queue of 1 024 connections not yet accepted, not tokio's 128: many tunnels opened
    // at once would otherwise wait a second for their SYN's retransmission.
    relay_config_file::listen::bind(addr)
        .map_err(|e| AgentError::Config(format!("binding {addr}: {e}")))
}

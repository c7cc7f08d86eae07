//! Accepting connections, dispatching requests, and the drain on shutdown.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::auth::{cert_grant, Grant};
use crate::base::body::RelayBody;
use crate::base::limits::{Activity, ConnLimits, ConnRefused, FirstBytes, Tracked};
use crate::base::tls::Tls;
use crate::{Config, State};

/// Longest TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often agents without polls are checked.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Serves `listener` until `shutdown` is cancelled, then drains: new user requests get 503,
/// requests in flight finish (up to `drain_timeout`), then everything stops.
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve(listener, Arc::new(State::new(cfg)), shutdown).await
}

/// Like [`run`] with state built by the caller (tests and embedders inspect it).
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listeners = Listeners {
        public: listener,
        agent: None,
        admin: None,
        cluster: None,
    };
    serve_faces(listeners, state, shutdown).await
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    /// Users and agents on one listener (agent calls still need their token).
    Shared,
    /// Users only: `/server/*` is 404.
    Public,
    /// Agents only: `/server/*` and `/healthz`.
    Agent,
    /// Operators only: health, readiness, metrics and the status page (plain HTTP).
    Admin,
    /// Other replicas only (cluster mode): forwarded user requests and agent calls, each
    /// with the cluster secret (plain HTTP).
    Cluster,
}

/// The listeners of one server.
pub struct Listeners {
    /// Users (and agents, when `agent` is `None`).
    pub public: TcpListener,
    /// Agents only (`--agent-listen`).
    pub agent: Option<TcpListener>,
    /// Operators only (`--admin-listen`): `/metrics`, `/status`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
    /// Other replicas only (`--cluster-listen`, cluster mode).
    pub cluster: Option<TcpListener>,
}

/// Serves users on the public listener and, when given, agent endpoints on their own
/// listener only (the public one then answers 404 for `/server/*`) and the operator
/// endpoints on theirs.
pub async fn serve_faces(
    listeners: Listeners,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Listeners {
        public,
        agent,
        admin,
        cluster,
    } = listeners;
    // Without an admin listener, metrics and the status page are served on a loopback
    // public listener only (the zero-config case); a public address never exposes them.
    let ops_public = admin.is_none() && public.local_addr()?.ip().is_loopback();
    state
        .ops_on_public
        .store(ops_public, std::sync::atomic::Ordering::Release);
    let tracker = TaskTracker::new();
    let tls = match &state.cfg.tls {
        Some((cert, key)) => {
            let tls = Arc::new(
                Tls::new(cert.clone(), key.clone(), state.cfg.agent_client_ca.clone())
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            );
            tracker.spawn(tls.clone().watch(state.stop.clone()));
            let _ = state.tls.set(tls.clone());
            Some(tls)
        }
        None => None,
    };

    let reaper_state = state.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        let mut n = 0u32;
        let mut trimmer = crate::base::trim::Trimmer::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    reaper_state.broker.reap();
                    let s = &reaper_state;
                    let others = s.conns.open() + s.tunnels.len();
                    trimmer.tick(s.broker.take_peak() + others, s.broker.in_flight() + others);
                    n = n.wrapping_add(1);
                    if n.is_multiple_of(30) {
                        reaper_state.sessions.reap();
                    }
                }
                _ = reaper_state.stop.cancelled() => break,
            }
        }
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_read_timeout)
        // hyper answers 431 to heads over these limits (RFC 6585 §5).
        .max_buf_size(state.cfg.max_head_bytes)
        .max_headers(state.cfg.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        // Reset floods (CVE-2023-44487 "rapid reset", and streams the server must reset for
        // errors): h2 closes the connection past these counts. Set explicitly so a change of
        // default upstream cannot switch them off.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(state.cfg.max_head_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));

    // Drain: keep accepting (agents must still deliver responses) but refuse new user work.
    let drain_state = state.clone();
    let drain_shutdown = shutdown.clone();
    tracker.spawn(async move {
        drain_shutdown.cancelled().await;
        drain_state.start_draining();
        tracing::info!(in_flight = drain_state.broker.in_flight(), "draining");
        let deadline = tokio::time::Instant::now() + drain_state.cfg.drain_timeout;
        while drain_state.broker.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drain_state.stop.cancel();
    });

    let public_face = if agent.is_some() {
        Face::Public
    } else {
        Face::Shared
    };
    let conns = Conns {
        state: &state,
        builder: &builder,
        limits: &state.conns,
        tracker: &tracker,
        tls: tls.as_ref(),
    };
    let agent_loop = async {
        if let Some(l) = agent {
            conns.accept_loop(l, Face::Agent).await;
        }
    };
    let admin_loop = async {
        if let Some(l) = admin {
            conns.accept_loop(l, Face::Admin).await;
        }
    };
    // A forwarded head carries the user's headers and the prepared head: room for both.
    let mut cluster_builder = builder.clone();
    cluster_builder
        .http1()
        .max_buf_size(state.cfg.max_head_bytes * 4)
        .http2()
        .max_header_list_size((state.cfg.max_head_bytes * 4) as u32)
        // One long-lived connection per peer carries every forwarded request, and each user
        // who leaves early resets a stream: h2's lifetime caps on resets (flood protection
        // for untrusted clients) would eventually close it with every stream on it.
        .max_local_error_reset_streams(None)
        .max_pending_accept_reset_streams(None);
    let cluster_conns = Conns {
        builder: &cluster_builder,
        ..conns
    };
    let cluster_loop = async {
        if let Some(l) = cluster {
            cluster_conns.accept_loop(l, Face::Cluster).await;
        }
    };
    if let Some(c) = &state.cluster {
        tracker.spawn(c.clone().run(state.broker.clone(), state.stop.clone()));
    }
    tokio::join!(
        conns.accept_loop(public, public_face),
        agent_loop,
        admin_loop,
        cluster_loop
    );
    tracker.close();
    // Connections got the stop; each gets a second to finish its response in progress.
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    state.tunnels.close();
    Ok(())
}

/// What every connection of the accept loops shares.
struct Conns<'a> {
    state: &'a Arc<State>,
    builder: &'a auto::Builder<TokioExecutor>,
    limits: &'a Arc<ConnLimits>,
    tracker: &'a TaskTracker,
    tls: Option<&'a Arc<Tls>>,
}

impl Conns<'_> {
    /// Accepts on `listener` until the stop, serving each connection on the tracker.
    async fn accept_loop(&self, listener: TcpListener, face: Face) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.state.stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let per_ip = !matches!(face, Face::Agent | Face::Cluster);
            let permit = match self.limits.admit(peer.ip(), per_ip) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::debug!(%peer, reason = %e, "connection refused");
                    self.state.metrics.rejected(match e {
                        ConnRefused::Total(_) => "connections",
                        ConnRefused::PerIp(_) => "connections_per_ip",
                    });
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn_state = self.state.clone();
            let https = self.tls.is_some() && !matches!(face, Face::Admin | Face::Cluster);
            let activity = Arc::new(Activity::default());
            let busy_on = activity.clone();
            let conn_permit = permit.clone();
            // What the client certificate (TLS) grants, set once the handshake is done.
            let cert: Arc<OnceLock<Grant>> = Arc::default();
            let conn_cert = cert.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = conn_state.clone();
                let busy = busy_on.begin();
                let cert = conn_cert.clone();
                if conn_permit.counts_per_ip()
                    && req.uri().path().starts_with("/server/")
                    && face != Face::Public
                    && state
                        .auth()
                        .tokens
                        .authenticate_agent(req.headers(), cert.get())
                        .is_ok()
                {
                    conn_permit.exempt_from_per_ip();
                }
                async move {
                    let resp =
                        crate::dispatch::route(state, req, peer, https, face, cert.get()).await;
                    // The connection counts as busy until the response body is over.
                    Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, busy)))
                }
            });
            let builder = self.builder.clone();
            let acceptor = self
                .tls
                .filter(|_| !matches!(face, Face::Admin | Face::Cluster))
                .map(|t| t.acceptor());
            let stop = self.state.stop.clone();
            let cfg = &self.state.cfg;
            let (detect, idle) = (cfg.header_read_timeout, cfg.idle_timeout);
            self.tracker.spawn(async move {
                let _permit = permit;
                let result = match acceptor {
                    None => {
                        let io = TokioIo::new(FirstBytes::new(stream, detect));
                        let conn = builder.serve_connection_with_upgrades(io, svc);
                        supervise(conn, &activity, idle, &stop).await
                    }
                    // Boxed: a TLS connection's state is much larger than a plain one's, and
                    // unboxed every plain connection's task would be as large.
                    Some(acceptor) => {
                        Box::pin(async move {
                            let tls_stream = match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(s)) => {
                                    if let Some(g) = cert_grant(s.get_ref().1.peer_certificates()) {
                                        let _ = cert.set(g);
                                    }
                                    s
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                            let io = TokioIo::new(FirstBytes::new(tls_stream, detect));
                            let conn = builder.serve_connection_with_upgrades(io, svc);
                            supervise(conn, &activity, idle, &stop).await
                        })
                        .await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// Runs one connection to its end; asks it to finish gracefully (HTTP/2 GOAWAY, HTTP/1.1
/// close after the response in progress) when the server stops or the connection has had
/// no request in progress for `idle`.
async fn supervise<I, S>(
    conn: auto::UpgradeableConnection<'_, I, S, TokioExecutor>,
    activity: &Activity,
    idle: Duration,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<
        Request<Incoming>,
        Response = Response<Tracked<RelayBody>>,
        Error = Infallible,
    >,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    TokioExecutor: auto::HttpServerConnExec<S::Future, Tracked<RelayBody>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = stop.cancelled() => {}
        _ = activity.idle_for(idle) => {}
    }
    conn.as_mut().graceful_shutdown();
    // A connection that does not finish within a second after the stop is dropped.
    match tokio::time::timeout(Duration::from_secs(1), conn).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

//! The listeners of one server (public, agent, admin, cluster), the tasks that run beside
//! them (TLS reload, housekeeping, the cluster lease) and the drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::base::streams::ConnExec;
use crate::base::tls::Tls;
use crate::connection::Conns;
use crate::shards::Shards;
use crate::{Config, State};

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
    // Shard threads stay while their connections run, at most until this returns.
    let gone = CancellationToken::new();
    let _gone = gone.clone().drop_guard();
    let shards = match &state.placement {
        Some(p) => Some(Shards::start(&state, p, &tracker, &gone)?),
        None => None,
    };
    let tls = start_tls(&state, &tracker)?;
    let cluster_tls = start_cluster_tls(&state, &tracker)?;
    tracker.spawn(housekeeping(state.clone()));
    tracker.spawn(deadlines(state.clone()));
    tracker.spawn(drain(state.clone(), shutdown));
    if let Some(c) = &state.cluster {
        tracker.spawn(c.clone().run(state.broker.clone(), state.stop.clone()));
    }

    // Built per connection: its executor is the connection's own (`base::streams`).
    let cfg = &state.cfg;
    let user_http = |exec| http_builder(cfg, exec);
    let cluster_http = |exec| cluster_builder(http_builder(cfg, exec), cfg);
    let conns = Conns {
        state: &state,
        builder: &user_http,
        limits: &state.conns,
        tracker: &tracker,
        tls: tls.as_ref(),
        shards: shards.as_ref(),
    };
    let cluster_conns = Conns {
        builder: &cluster_http,
        tls: cluster_tls.as_ref(),
        shards: None,
        ..conns
    };
    let public_face = if agent.is_some() {
        Face::Public
    } else {
        Face::Shared
    };
    tokio::join!(
        conns.accept_loop(public, public_face),
        conns.accept_optional(agent, Face::Agent),
        conns.accept_optional(admin, Face::Admin),
        cluster_conns.accept_optional(cluster, Face::Cluster),
    );
    tracker.close();
    // Connections got the stop; each gets a second to finish its response in progress.
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    state.tunnels.close();
    state.carriers.close();
    state.agent_sessions.close();
    Ok(())
}

/// Loads the certificate when TLS is configured and watches it for changes.
fn start_tls(state: &Arc<State>, tracker: &TaskTracker) -> std::io::Result<Option<Arc<Tls>>> {
    let Some((cert, key)) = &state.cfg.tls else {
        return Ok(None);
    };
    let tls = Arc::new(
        Tls::new(cert.clone(), key.clone(), state.cfg.agent_client_ca.clone())
            .map_err(|e| std::io::Error::other(e.to_string()))?,
    );
    tracker.spawn(tls.clone().watch(state.stop.clone()));
    let _ = state.tls.set(tls.clone());
    Ok(Some(tls))
}

/// Loads the cluster listener's certificate when TLS between replicas is configured, and
/// watches it for changes.
fn start_cluster_tls(
    state: &Arc<State>,
    tracker: &TaskTracker,
) -> std::io::Result<Option<Arc<Tls>>> {
    let Some(t) = state.cluster.as_ref().and_then(|c| c.tls()) else {
        return Ok(None);
    };
    let tls = Arc::new(
        Tls::new(t.cert.clone(), t.key.clone(), None)
            .map_err(|e| std::io::Error::other(format!("cluster TLS: {e}")))?,
    );
    tracker.spawn(tls.clone().watch(state.stop.clone()));
    Ok(Some(tls))
}

/// Once a second until the stop: agents without polls are reaped, users who stopped
/// reading lose what they hold of the memory budget, freed memory goes back to the OS after
/// a peak, and (every 30 s) expired signed-link sessions go.
async fn housekeeping(state: Arc<State>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    let mut n = 0u32;
    let mut trimmer = crate::base::trim::Trimmer::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.stop.cancelled() => break,
        }
        state.broker.reap();
        let cut = state.budget.cut_stalled(state.cfg.user_write_timeout);
        for _ in 0..cut {
            state.metrics.rejected("user_write_timeout");
        }
        state.budget.reap();
        let others = state.conns.open()
            + state.tunnels.len()
            + state.carriers.len()
            + state.agent_sessions.len();
        let (parked, in_flight) = (state.broker.take_peak(), state.broker.in_flight());
        trimmer.tick(crate::base::trim::Sample {
            peak: parked.max(in_flight) + others,
            load: in_flight + others,
            quiet: parked == 0,
            free: crate::base::trim::allocator_free(),
        });
        n = n.wrapping_add(1);
        if n.is_multiple_of(30) {
            state.sessions.reap();
        }
    }
}

/// Fails the requests past their pickup or response deadline, for all of them at once
/// (`Broker::sweep_overdue`; a timer per request cost more than the sweep).
async fn deadlines(state: Arc<State>) {
    let cfg = &state.cfg;
    let shortest = cfg
        .pickup_timeout
        .min(cfg.response_timeout)
        .min(cfg.upgrade_response_timeout);
    let mut tick = tokio::time::interval(crate::agent::broker::sweep_period(shortest));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => state.broker.sweep_overdue(),
            _ = state.stop.cancelled() => break,
        }
    }
}

/// The drain after `shutdown`: keep accepting (agents must still deliver responses) but
/// refuse new user work; then stop once nothing is in flight or the drain timeout passed.
async fn drain(state: Arc<State>, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    state.start_draining();
    tracing::info!(in_flight = state.broker.in_flight(), "draining");
    let deadline = tokio::time::Instant::now() + state.cfg.drain_timeout;
    while state.broker.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state.stop.cancel();
    // After the cancel: a request queued from now on sees the token when it is queued.
    state.broker.stop_all();
}

/// The number of header fields hyper's HTTP/1.1 server accepts when not told otherwise
/// (`DEFAULT_MAX_HEADERS` in hyper 1's `proto::h1::role`).
const HYPER_MAX_HEADERS: usize = 100;

/// The HTTP/1.1 and HTTP/2 settings of the user and agent listeners.
pub(crate) fn http_builder(cfg: &Config, exec: ConnExec) -> auto::Builder<ConnExec> {
    let mut builder = auto::Builder::new(exec);
    builder
        .http1()
        // The header read timeout is the connection supervisor's (`connection::supervise`):
        // hyper's armed and cleared a timer for every request head.
        .header_read_timeout(None)
        // hyper answers 431 to heads over these limits (RFC 6585 §5).
        .max_buf_size(cfg.max_head_bytes)
        .keep_alive(true);
    // hyper's own limit is 100 header fields on a stack array; any explicit limit, even
    // 100, makes it build two 100-entry vectors for every head it parses (2 % of a small
    // request's instructions), so the limit is set only when it differs.
    if cfg.max_headers != HYPER_MAX_HEADERS {
        builder.http1().max_headers(cfg.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        // Reset floods (CVE-2023-44487 "rapid reset", and streams the server must reset for
        // errors): h2 closes the connection past these counts. Set explicitly so a change of
        // default upstream cannot switch them off.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(cfg.max_head_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// The cluster listener's settings: trusted peers on long-lived connections.
fn cluster_builder(mut cluster: auto::Builder<ConnExec>, cfg: &Config) -> auto::Builder<ConnExec> {
    // A forwarded head carries the user's headers and the prepared head: room for both.
    cluster
        .http1()
        .max_buf_size(cfg.max_head_bytes * 4)
        .http2()
        .max_header_list_size((cfg.max_head_bytes * 4) as u32)
        // One long-lived connection per peer carries every forwarded request, and each user
        // who leaves early resets a stream: h2's lifetime caps on resets (flood protection
        // for untrusted clients) would eventually close it with every stream on it.
        .max_local_error_reset_streams(None)
        .max_pending_accept_reset_streams(None);
    cluster
}

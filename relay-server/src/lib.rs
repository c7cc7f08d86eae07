//! relay-server: the public side of the HTTP long-polling relay.
//!
//! # Layout
//! The folders are the layers; dependencies point one way (`ops`, `cluster` → `user` →
//! `agent` → `base`), and only the wiring at the root ([`dispatch`] and its `agent_call`,
//! [`listener`], [`connection`], [`State`]) knows them all.
//! - [`base`]: credentials, response bodies, the byte budget, connection limits, metrics,
//!   TLS. Knows no user, agent or replica.
//! - [`agent`]: the agent endpoints, the broker, and one request in flight with its upload
//!   and response sides as state machines.
//! - [`user`]: routing, access control, preparing a user request, its response or tunnel.
//! - [`cluster`]: the Redis directory and the calls between replicas.
//! - [`ops`]: `/metrics` and the status page.
//!
//! # Life of a request
//! 1. A user sends `GET /client/robot/status`. [`user::router`] takes `robot` from the raw
//!    path; [`user::access`] admits the user (or answers 401/403/a redirect);
//!    [`user::prepare`] strips hop-by-hop headers and the relay's credentials and sets
//!    `X-Forwarded-*`.
//! 2. [`dispatch`] finds a local agent for `robot` (else 503 at once, or another replica in
//!    cluster mode); [`user::relayed`] queues an [`agent::pending::Pending`] with a fresh
//!    128-bit id.
//! 3. A parked `/server/request` poll of a `robot` agent wakes, claims the request and
//!    returns its head as JSON ([`agent::endpoints`]). No poll within `pickup_timeout` → 503.
//! 4. If the request has a body, the agent pulls it through `/server/requeststream`
//!    exchanges ([`agent::upload`]), each holding the upload as a lease.
//! 5. The agent posts the backend's answer to `/server/response` ([`agent::response`]): a
//!    HEAD frame, DATA frames, then END/TRAILERS (or ABORT). The head becomes the user's
//!    response head, DATA flows into the user's body through a bounded channel. No head
//!    within `response_timeout` → 504.
//! 6. When the user leaves, the [`agent::pending::PendingGuard`] drops: the id is
//!    forgotten, and the agent learns of it in its next poll answer (`cancel`).
// `deny`, not `forbid`: the one exception is `trim::release`, a pointer-free libc call.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![deny(rust_2018_idioms)]

pub mod agent;
mod agent_call;
pub mod base;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod defaults;
pub mod dispatch;
pub mod front;
pub mod listener;
pub mod ops;
mod served;
pub mod shards;
pub mod user;

pub use config::{Config, ConfigError, Secret, TokenScope};
pub use listener::{run, serve, serve_faces, Listeners};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base::revocation::Credential;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What admits agents and users; replaced whole on reload.
pub struct Auth {
    /// Agent tokens.
    pub tokens: Arc<base::auth::TokenStore>,
    /// User tokens (`token` access).
    pub user_tokens: base::auth::TokenStore,
    /// Access mode per name.
    pub access: user::access::AccessPolicy,
    /// Proxies whose forwarding headers are believed (`--trusted-proxy`).
    pub trusted_proxies: Vec<config::Cidr>,
    /// The forward-auth client, when configured.
    pub forward_auth: Option<user::forward_auth::ForwardAuth>,
    /// The agents' forward-auth client (with its verdict cache), when configured.
    pub agent_forward_auth: Option<agent::forward_auth::AgentForwardAuth>,
}

impl Auth {
    fn new(cfg: &Config) -> Self {
        Auth {
            tokens: Arc::new(base::auth::TokenStore::new(&cfg.agent_tokens)),
            user_tokens: base::auth::TokenStore::new(&cfg.user_tokens),
            access: cfg.access.clone(),
            trusted_proxies: cfg.trusted_proxies.clone(),
            forward_auth: cfg
                .forward_auth
                .clone()
                .map(user::forward_auth::ForwardAuth::new),
            agent_forward_auth: cfg
                .agent_forward_auth
                .clone()
                .map(agent::forward_auth::AgentForwardAuth::new),
        }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// Shared state of a running server.
pub struct State {
    /// Settings.
    pub cfg: Config,
    /// Tokens and access rules; swapped whole on a configuration reload.
    auth: std::sync::RwLock<Arc<Auth>>,
    /// Signed-link sessions.
    pub sessions: user::link::Sessions,
    /// Prometheus metrics.
    pub metrics: Arc<base::metrics::Metrics>,
    /// User requests in progress admitted by a credential a reload may revoke.
    pub revocations: base::revocation::Revocations,
    /// Relayed bytes held in memory, all requests together.
    pub budget: Arc<base::budget::Budget>,
    /// Open connections, in total and per address.
    pub conns: Arc<base::limits::ConnLimits>,
    /// Users' tunnels open per client address.
    pub tunnel_places: Arc<base::tunnel_places::TunnelPlaces>,
    /// Where each name's sessions run, when the server runs shards (`shards.rs`).
    pub placement: Option<Arc<base::placement::Placement>>,
    /// Agents, queues, requests.
    pub broker: Arc<agent::broker::Broker>,
    /// Whether `/metrics` and `/status` are served on the public listener (no admin
    /// listener, public listener on loopback).
    pub ops_on_public: AtomicBool,
    /// Set when shutdown began: new user requests get 503, polls hand out no new work.
    draining: AtomicBool,
    /// Cancelled when the drain is over: parked polls and queued requests end at once.
    pub stop: CancellationToken,
    /// Users' switched connections, one task per open tunnel or WebSocket (they outlive
    /// the request handler that started them): what `relay_open_tunnels` counts.
    pub tunnels: TaskTracker,
    /// The switched connections that carry them: an agent's tunnel exchanges, the hop of
    /// a tunnel forwarded to another replica (not counted as tunnels: one user tunnel
    /// takes one of these as well on some paths and none on others).
    pub carriers: TaskTracker,
    /// Agent sessions and the deliveries they hand off (not counted as tunnels).
    pub agent_sessions: TaskTracker,
    /// Membership in a cluster of replicas (`--cluster-redis`).
    pub cluster: Option<Arc<cluster::directory::Cluster>>,
    /// TLS termination, once the listener loaded the certificate.
    pub tls: std::sync::OnceLock<Arc<base::tls::Tls>>,
}

impl State {
    /// Builds the state for `cfg`.
    pub fn new(cfg: Config) -> Self {
        let metrics = Arc::new(base::metrics::Metrics::default());
        let cluster = cfg.cluster.clone().map(|c| {
            Arc::new(
                cluster::directory::Cluster::new(c)
                    .expect("bug: cluster settings are checked by Config::validate"),
            )
        });
        let sessions = user::link::Sessions::new(
            link_key(&cfg),
            cfg.session_idle,
            cfg.session_max_age,
            cfg.max_sessions,
        );
        // Cluster mode: every replica honours every session.
        let sessions = match &cluster {
            Some(c) => sessions.shared(c.clone()),
            None => sessions,
        };
        State {
            cluster,
            metrics: metrics.clone(),
            budget: Arc::new(base::budget::Budget::new(cfg.max_buffered_bytes)),
            conns: Arc::new(base::limits::ConnLimits::new(
                cfg.max_connections,
                cfg.max_connections_per_ip,
            )),
            tunnel_places: base::tunnel_places::TunnelPlaces::new(cfg.max_tunnels_per_ip),
            placement: (cfg.shards > 0).then(|| base::placement::Placement::new(cfg.shards)),
            auth: std::sync::RwLock::new(Arc::new(Auth::new(&cfg))),
            sessions,
            revocations: Default::default(),
            broker: Arc::new(agent::broker::Broker::new(
                cfg.max_parked_per_name,
                cfg.max_parked_total,
                cfg.agent_grace,
                metrics,
            )),
            cfg,
            draining: AtomicBool::new(false),
            ops_on_public: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            carriers: TaskTracker::new(),
            agent_sessions: TaskTracker::new(),
            tls: std::sync::OnceLock::new(),
        }
    }

    /// The tokens and access rules in force.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().expect("bug: poisoned").clone()
    }

    /// Applies the reloadable part of `cfg`: agent and user tokens (exactly those `cfg`
    /// holds, so a token that left the configuration is refused from now on; the binary
    /// puts its generated zero-config token back in when the file has none), access rules,
    /// trusted proxies, the forward-auth settings and the signed-link key. Revocation is
    /// immediate: an agent whose token no longer grants its name is disconnected (parked
    /// polls end with 401, its requests and tunnels fail, new requests for a name left
    /// without agents get 503), and sessions opened by links of a replaced key end. Other
    /// requests in flight keep what admitted them; the next request sees the new rules.
    /// Returns the settings that differ from the running ones but only take effect after a
    /// restart.
    pub fn reload(&self, cfg: &Config) -> Result<Vec<&'static str>, ConfigError> {
        let next = Arc::new(Auth::new(cfg));
        *self.auth.write().expect("bug: poisoned") = next.clone();
        let revoked = self
            .broker
            .revoke(|token, name| next.tokens.still_grants_token(token, name));
        if revoked > 0 {
            tracing::warn!(
                agents = revoked,
                "agents disconnected: their token was revoked"
            );
        }
        self.sessions.set_key(link_key(cfg));
        // User requests in progress: each must still be admitted by what admitted it.
        let key = self.sessions.key_tag();
        let cut = self
            .revocations
            .revoke(|credential, name| match credential {
                Credential::UserToken(d) => next.user_tokens.still_grants_token(d, name),
                Credential::LinkKey(tag) => *tag == key,
            });
        if cut > 0 {
            tracing::warn!(
                requests = cut,
                "user requests ended: their credential was revoked"
            );
        }
        if let Some(tls) = self.tls.get() {
            tls.reload_now();
        }
        Ok(self.cfg.needs_restart(cfg))
    }

    /// Whether shutdown began.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// The signed-link key of `cfg`, or a random one (links then verify only against a key
/// nobody has: none can be redeemed).
fn link_key(cfg: &Config) -> Secret {
    cfg.link_secret
        .clone()
        .unwrap_or_else(|| Secret(relay_common::id::random_hex(32)))
}

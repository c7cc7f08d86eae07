//! Cluster mode: several replicas behind one load balancer, coordinated through a directory
//! in Redis (`--cluster-redis`). Off by default; a single process never touches Redis.
//!
//! # The directory
//! - `<prefix>replica:<tag>` → this replica's `--advertise-url`, with a lease (`PX`) renewed
//!   every second. Its absence tells a replica that Redis lost its registration (a restart,
//!   an eviction), which triggers a full re-registration at once.
//! - `<prefix>name:<name>` → a sorted set of the tags of replicas with live agents for the
//!   name, scored by the lease's end (ms since the epoch). Renewed every lease / 3 and at
//!   once when a name appears here; a member whose lease ran out is ignored by readers and
//!   removed by the next renewal, and the key itself expires with the last lease.
//!
//! A tag is 32 random bits chosen at start; request ids begin with their owner's tag
//! ([`RequestId::tagged`]), so an agent call landing on another replica finds the owner.
//! Lookups for a name are cached for a second; replica addresses for lease / 3. Redis being
//! unreachable never stops a replica serving its own agents; only cross-replica requests
//! fail (503 + `Retry-After`), and `/readyz` says `degraded`.
//!
//! [`RequestId::tagged`]: relay_common::id::RequestId::tagged

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::agent::broker::Broker;
use crate::base::auth::Secret;
use crate::user::link::StoreFuture;

/// Header carrying the shared cluster secret on calls between replicas.
pub const SECRET_HEADER: &str = "x-relay-cluster-secret";

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL of the directory.
    pub redis_url: String,
    /// How other replicas reach this one's cluster listener (`http://host:port`).
    pub advertise_url: String,
    /// Shared by all replicas; authenticates calls between them.
    pub secret: Secret,
    /// How long a directory entry outlives its last renewal.
    pub lease: Duration,
    /// Prefix of every key (several clusters can share one Redis).
    pub key_prefix: String,
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis URL is malformed.
    #[error("invalid --cluster-redis URL: {0}")]
    BadUrl(String),
    /// Settings that cannot work.
    #[error("{0}")]
    Settings(String),
    /// Redis did not answer.
    #[error("the cluster directory (Redis) is unreachable: {0}")]
    Unreachable(String),
}

/// Another replica that holds agents for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its tag.
    pub tag: u32,
    /// Its cluster listener.
    pub url: String,
}

/// What the status page shows of the cluster.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct View {
    /// Names (up to [`VIEW_NAMES`]) and the replicas holding each.
    pub names: Vec<(String, Vec<String>)>,
    /// Live replicas: tag and address.
    pub replicas: Vec<(String, String)>,
}

/// Most names the status view lists.
pub const VIEW_NAMES: usize = 1000;

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// How long a name's replica list is reused before Redis is asked again.
const NAME_CACHE: Duration = Duration::from_secs(1);
/// Longest wait for one Redis round trip.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// A replica's membership in the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    tag: u32,
    redis: ConnectionManager,
    /// [`UNKNOWN`], [`UP`] or [`DOWN`]: how the last Redis call went.
    health: AtomicU8,
    secret_digest: [u8; 32],
    names: Mutex<HashMap<String, (Vec<u32>, Instant)>>,
    urls: Mutex<HashMap<u32, (String, Instant)>>,
    next: AtomicUsize,
    view: Mutex<View>,
    /// Calls to other replicas (connection pool).
    pub peers: crate::cluster::peer::Peers,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn tag_hex(tag: u32) -> String {
    format!("{tag:08x}")
}

impl Cluster {
    /// Checks settings without connecting: the URL parses, the secret is long enough, the
    /// advertised address is an `http://` URL.
    pub fn check(cfg: &ClusterConfig) -> Result<(), ClusterError> {
        redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| ClusterError::BadUrl(e.to_string()))?;
        if cfg.secret.0.len() < 32 {
            return Err(ClusterError::Settings(
                "the cluster secret must be at least 32 characters".into(),
            ));
        }
        let ok = cfg
            .advertise_url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        // Empty: the binary fills it in from the bound cluster listener.
        if ok.is_none() && !cfg.advertise_url.is_empty() {
            return Err(ClusterError::Settings(format!(
                "--advertise-url {:?} must be http://HOST:PORT (the cluster listener)",
                cfg.advertise_url
            )));
        }
        if cfg.lease < Duration::from_secs(3) {
            return Err(ClusterError::Settings(
                "--cluster-lease must be at least 3s".into(),
            ));
        }
        Ok(())
    }

    /// A member with a fresh random tag; connects to Redis lazily (a replica starts and
    /// serves its own agents while Redis is down).
    pub fn new(cfg: ClusterConfig) -> Result<Self, ClusterError> {
        let client = redis::Client::open(cfg.redis_url.as_str())
            .map_err(|e| ClusterError::BadUrl(e.to_string()))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let redis = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| ClusterError::BadUrl(e.to_string()))?;
        let mut tag = [0u8; 4];
        getrandom::getrandom(&mut tag).expect("bug: the OS random source failed");
        Ok(Cluster {
            secret_digest: Sha256::digest(cfg.secret.0.as_bytes()).into(),
            tag: u32::from_be_bytes(tag),
            redis,
            health: AtomicU8::new(UNKNOWN),
            names: Mutex::default(),
            urls: Mutex::default(),
            next: AtomicUsize::new(0),
            view: Mutex::default(),
            peers: crate::cluster::peer::Peers::default(),
            cfg,
        })
    }

    /// This replica's tag.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// This replica's advertised address.
    pub fn advertise_url(&self) -> &str {
        &self.cfg.advertise_url
    }

    /// Whether the last Redis call succeeded.
    pub fn redis_up(&self) -> bool {
        self.health.load(Ordering::Acquire) == UP
    }

    /// The last cluster view (refreshed with every full renewal).
    pub fn view(&self) -> View {
        self.view.lock().expect("bug: poisoned").clone()
    }

    /// Whether `presented` is the cluster secret (compared as digests, in constant time).
    pub fn check_secret(&self, presented: Option<&[u8]>) -> bool {
        let Some(p) = presented else { return false };
        let d: [u8; 32] = Sha256::digest(p).into();
        bool::from(d.ct_eq(&self.secret_digest))
    }

    /// The secret for calls to other replicas.
    pub fn secret(&self) -> &str {
        &self.cfg.secret.0
    }

    fn replica_key(&self, tag: u32) -> String {
        format!("{}replica:{}", self.cfg.key_prefix, tag_hex(tag))
    }

    fn name_key(&self, name: &str) -> String {
        format!("{}name:{name}", self.cfg.key_prefix)
    }

    /// Records how a Redis call went; logs each change (and the first failure at start).
    fn mark(&self, ok: bool, why: Option<&redis::RedisError>) {
        let now = if ok { UP } else { DOWN };
        let was = self.health.swap(now, Ordering::AcqRel);
        if was == now {
            return;
        }
        if ok {
            tracing::info!(tag = %tag_hex(self.tag), "cluster directory (Redis) reachable");
        } else {
            tracing::warn!(
                error = %why.map(|e| e.to_string()).unwrap_or_default(),
                "cluster directory (Redis) unreachable: serving local agents only"
            );
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        p: &redis::Pipeline,
    ) -> Result<T, ClusterError> {
        let mut conn = self.redis.clone();
        let r = tokio::time::timeout(REDIS_TIMEOUT, p.query_async::<T>(&mut conn)).await;
        match r {
            Ok(Ok(v)) => {
                self.mark(true, None);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.mark(false, Some(&e));
                Err(ClusterError::Unreachable(e.to_string()))
            }
            Err(_) => {
                self.mark(false, None);
                Err(ClusterError::Unreachable("timed out".into()))
            }
        }
    }

    /// Other replicas with live agents for `name`, in round-robin order.
    pub async fn replicas_for(&self, name: &str) -> Result<Vec<Peer>, ClusterError> {
        let cached = self
            .names
            .lock()
            .expect("bug: poisoned")
            .get(name)
            .filter(|(_, at)| at.elapsed() < NAME_CACHE)
            .map(|(tags, _)| tags.clone());
        let tags = match cached {
            Some(t) => t,
            None => {
                let mut p = redis::pipe();
                p.cmd("ZRANGEBYSCORE")
                    .arg(self.name_key(name))
                    .arg(now_ms())
                    .arg("+inf");
                let (members,): (Vec<String>,) = self.query(&p).await?;
                let tags: Vec<u32> = members
                    .iter()
                    .filter_map(|m| u32::from_str_radix(m, 16).ok())
                    .filter(|t| *t != self.tag)
                    .collect();
                self.names
                    .lock()
                    .expect("bug: poisoned")
                    .insert(name.to_owned(), (tags.clone(), Instant::now()));
                tags
            }
        };
        let mut peers = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(url) = self.url_of(tag).await? {
                peers.push(Peer { tag, url });
            }
        }
        if !peers.is_empty() {
            let n = self.next.fetch_add(1, Ordering::Relaxed) % peers.len();
            peers.rotate_left(n);
        }
        Ok(peers)
    }

    /// The address of the replica with `tag`, if it is alive.
    pub async fn url_of(&self, tag: u32) -> Result<Option<String>, ClusterError> {
        let fresh = self.cfg.lease / 3;
        if let Some((url, at)) = self.urls.lock().expect("bug: poisoned").get(&tag) {
            if at.elapsed() < fresh {
                return Ok(Some(url.clone()));
            }
        }
        let mut p = redis::pipe();
        p.cmd("GET").arg(self.replica_key(tag));
        let (url,): (Option<String>,) = self.query(&p).await?;
        let mut urls = self.urls.lock().expect("bug: poisoned");
        match &url {
            Some(u) => {
                urls.insert(tag, (u.clone(), Instant::now()));
            }
            None => {
                urls.remove(&tag);
            }
        }
        Ok(url)
    }

    /// Claims a signed link's nonce until the link expires (Unix seconds): false when any
    /// replica redeemed it before.
    pub async fn claim_nonce(&self, nonce: &str, exp_unix: u64) -> Result<bool, ClusterError> {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(format!("{}nonce:{nonce}", self.cfg.key_prefix))
            .arg(1)
            .arg("NX")
            .arg("PXAT")
            .arg(exp_unix.saturating_mul(1000));
        let (set,): (Option<String>,) = self.query(&p).await?;
        Ok(set.is_some())
    }

    /// Stores a signed-link session under the digest of its id, expiring after `idle`
    /// without use.
    pub async fn put_session(
        &self,
        digest: &str,
        value: &str,
        idle: Duration,
    ) -> Result<(), ClusterError> {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(format!("{}session:{digest}", self.cfg.key_prefix))
            .arg(value)
            .arg("PX")
            .arg(idle.as_millis() as u64)
            .ignore();
        self.query(&p).await
    }

    /// A session's value, its idle timer restarted (one round trip).
    pub async fn touch_session(
        &self,
        digest: &str,
        idle: Duration,
    ) -> Result<Option<String>, ClusterError> {
        let key = format!("{}session:{digest}", self.cfg.key_prefix);
        let mut p = redis::pipe();
        p.cmd("GET").arg(&key);
        p.cmd("PEXPIRE")
            .arg(&key)
            .arg(idle.as_millis() as u64)
            .ignore();
        let (value,): (Option<String>,) = self.query(&p).await?;
        Ok(value)
    }

    /// Forgets what is cached about `tag` (its connection failed).
    pub fn forget_peer(&self, tag: u32) {
        self.urls.lock().expect("bug: poisoned").remove(&tag);
        self.names
            .lock()
            .expect("bug: poisoned")
            .retain(|_, (tags, _)| !tags.contains(&tag));
    }

    /// Keeps this replica's entries in the directory until `stop`, then removes them.
    pub async fn run(self: Arc<Self>, broker: Arc<Broker>, stop: CancellationToken) {
        let lease_ms = self.cfg.lease.as_millis() as u64;
        let me = tag_hex(self.tag);
        let mut registered: HashSet<String> = HashSet::new();
        let mut last_full: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            // Lookups of names nobody serves must not pile up (users choose names).
            self.names
                .lock()
                .expect("bug: poisoned")
                .retain(|_, (_, at)| at.elapsed() < NAME_CACHE);
            let local: HashSet<String> = broker
                .agents_per_name()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(name, _)| name)
                .collect();
            // Renews the replica's own lease; 0 means Redis lost it (restart, eviction).
            let mut p = redis::pipe();
            p.cmd("PEXPIRE")
                .arg(self.replica_key(self.tag))
                .arg(lease_ms);
            let Ok((kept,)) = self.query::<(u8,)>(&p).await else {
                continue;
            };
            let full = kept == 0 || last_full.is_none_or(|t| t.elapsed() >= self.cfg.lease / 3);
            let added: Vec<&String> = if full {
                local.iter().collect()
            } else {
                local.difference(&registered).collect()
            };
            let removed: Vec<&String> = registered.difference(&local).collect();
            if !full && added.is_empty() && removed.is_empty() {
                continue;
            }
            let now = now_ms();
            let mut p = redis::pipe();
            if full {
                p.cmd("SET")
                    .arg(self.replica_key(self.tag))
                    .arg(&self.cfg.advertise_url)
                    .arg("PX")
                    .arg(lease_ms)
                    .ignore();
            }
            for name in &added {
                let key = self.name_key(name);
                p.cmd("ZADD")
                    .arg(&key)
                    .arg(now + lease_ms)
                    .arg(&me)
                    .ignore();
                p.cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore();
                p.cmd("PEXPIRE").arg(&key).arg(lease_ms).ignore();
            }
            for name in &removed {
                p.cmd("ZREM").arg(self.name_key(name)).arg(&me).ignore();
            }
            if self.query::<()>(&p).await.is_ok() {
                registered = local;
                if full {
                    last_full = Some(Instant::now());
                    if let Ok(v) = self.fetch_view().await {
                        *self.view.lock().expect("bug: poisoned") = v;
                    }
                }
            }
        }
        // Leaving: other replicas stop sending at once instead of after the lease.
        let mut p = redis::pipe();
        p.cmd("DEL").arg(self.replica_key(self.tag)).ignore();
        for name in &registered {
            p.cmd("ZREM").arg(self.name_key(name)).arg(&me).ignore();
        }
        let _ = self.query::<()>(&p).await;
    }

    /// Reads the directory for the status page: live replicas and up to [`VIEW_NAMES`]
    /// names with their replicas.
    async fn fetch_view(&self) -> Result<View, ClusterError> {
        let prefix = &self.cfg.key_prefix;
        let keys = |pattern: String| {
            let mut p = redis::pipe();
            p.cmd("SCAN")
                .arg(0)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(10_000);
            p
        };
        let ((_, replica_keys),): ((u64, Vec<String>),) =
            self.query(&keys(format!("{prefix}replica:*"))).await?;
        let ((_, name_keys),): ((u64, Vec<String>),) =
            self.query(&keys(format!("{prefix}name:*"))).await?;
        let name_keys: Vec<String> = name_keys.into_iter().take(VIEW_NAMES).collect();
        let mut p = redis::pipe();
        for k in &replica_keys {
            p.cmd("GET").arg(k);
        }
        let now = now_ms();
        for k in &name_keys {
            p.cmd("ZRANGEBYSCORE").arg(k).arg(now).arg("+inf");
        }
        let values: Vec<redis::Value> = self.query(&p).await?;
        let mut values = values.into_iter();
        let mut view = View::default();
        for k in &replica_keys {
            let url: Option<String> = values.next().and_then(|v| redis::from_redis_value(v).ok());
            if let (Some(url), Some(tag)) = (url, k.strip_prefix(&format!("{prefix}replica:"))) {
                view.replicas.push((tag.to_owned(), url));
            }
        }
        for k in &name_keys {
            let tags: Vec<String> = values
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            if let (false, Some(name)) =
                (tags.is_empty(), k.strip_prefix(&format!("{prefix}name:")))
            {
                view.names.push((name.to_owned(), tags));
            }
        }
        view.replicas.sort();
        view.names.sort();
        Ok(view)
    }
}

impl crate::user::link::SharedSessions for Cluster {
    fn claim_nonce<'a>(&'a self, nonce: &'a str, exp_unix: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(Cluster::claim_nonce(self, nonce, exp_unix).await?) })
    }

    fn put_session<'a>(
        &'a self,
        digest: &'a str,
        value: &'a str,
        idle: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move { Ok(Cluster::put_session(self, digest, value, idle).await?) })
    }

    fn touch_session<'a>(
        &'a self,
        digest: &'a str,
        idle: Duration,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { Ok(Cluster::touch_session(self, digest, idle).await?) })
    }
}

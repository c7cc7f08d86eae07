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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use crate::base::auth::Secret;
use crate::cluster::seal::Seal;

/// Cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL of the directory.
    pub redis_url: String,
    /// How other replicas reach this one's cluster listener (`http://host:port`).
    pub advertise_url: String,
    /// Shared by all replicas; the keys that sign their Redis records and their calls to
    /// each other derive from it (it never crosses the wire).
    pub secret: Secret,
    /// How long a directory entry outlives its last renewal.
    pub lease: Duration,
    /// Prefix of every key (several clusters can share one Redis).
    pub key_prefix: String,
    /// TLS between replicas: this replica's listener certificate, and what its calls to
    /// other replicas verify theirs against.
    pub tls: Option<ClusterTls>,
}

/// TLS on the cluster listener and on calls between replicas.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// Certificate chain (PEM) of this replica's cluster listener.
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// The roots other replicas' certificates must chain to (PEM); a cluster sharing one
    /// self-signed certificate names that certificate here.
    pub ca: std::path::PathBuf,
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
pub(super) const NAME_CACHE: Duration = Duration::from_secs(1);
/// Longest wait for one Redis round trip.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// A replica's membership in the cluster.
pub struct Cluster {
    pub(super) cfg: ClusterConfig,
    pub(super) tag: u32,
    redis: ConnectionManager,
    /// [`UNKNOWN`], [`UP`] or [`DOWN`]: how the last Redis call went.
    health: AtomicU8,
    /// Keys that sign records and calls.
    pub(super) seal: Seal,
    /// Replicas per name looked up lately, and when (cached for [`NAME_CACHE`]).
    pub(super) names: Mutex<HashMap<String, (Vec<u32>, Instant)>>,
    urls: Mutex<HashMap<u32, (String, Instant)>>,
    next: AtomicUsize,
    /// The directory as the status page shows it, refreshed by the renewal loop.
    pub(super) view: Mutex<View>,
    /// Calls to other replicas (connection pool).
    pub peers: crate::cluster::pool::Peers,
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn tag_hex(tag: u32) -> String {
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
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let ok = cfg
            .advertise_url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some(scheme) && u.authority().is_some());
        // Empty: the binary fills it in from the bound cluster listener.
        if ok.is_none() && !cfg.advertise_url.is_empty() {
            return Err(ClusterError::Settings(format!(
                "--advertise-url {:?} must be {scheme}://HOST:PORT (the cluster listener{})",
                cfg.advertise_url,
                if cfg.tls.is_some() {
                    " with --cluster-tls-cert"
                } else {
                    ""
                }
            )));
        }
        // The roots for calls to https:// replicas must load.
        crate::cluster::pool::Peers::new(cfg.tls.as_ref())?;
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
            seal: Seal::new(&cfg.secret),
            tag: u32::from_be_bytes(tag),
            redis,
            health: AtomicU8::new(UNKNOWN),
            names: Mutex::default(),
            urls: Mutex::default(),
            next: AtomicUsize::new(0),
            view: Mutex::default(),
            peers: crate::cluster::pool::Peers::new(cfg.tls.as_ref())?,
            cfg,
        })
    }

    /// This replica's tag.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// TLS settings of the cluster listener, when it serves HTTPS.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.cfg.tls.as_ref()
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

    /// The keys that sign this cluster's records and calls.
    pub fn seal(&self) -> &Seal {
        &self.seal
    }

    pub(super) fn replica_key(&self, tag: u32) -> String {
        format!("{}replica:{}", self.cfg.key_prefix, tag_hex(tag))
    }

    pub(super) fn name_key(&self, name: &str) -> String {
        format!("{}name:{name}", self.cfg.key_prefix)
    }

    /// Records how a Redis call went; logs each change (and the first failure at start).
    pub(super) fn mark(&self, ok: bool, why: Option<&redis::RedisError>) {
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

    pub(super) async fn query<T: redis::FromRedisValue>(
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
        let (record,): (Option<String>,) = self.query(&p).await?;
        let url = record.and_then(|r| self.open_replica(tag, &r));
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

    /// The address in a replica record, if the record is signed with this cluster's key
    /// and fresh; a forged or stale one is ignored (and said so), so whoever can write to
    /// Redis without the secret cannot steer users' requests to an address of theirs.
    pub(super) fn open_replica(&self, tag: u32, record: &str) -> Option<String> {
        let url = self.seal.open_replica(tag, record, now_ms());
        if url.is_none() {
            tracing::warn!(
                tag = %tag_hex(tag),
                "a replica record in Redis is not signed with this cluster's secret, or expired: ignored"
            );
        }
        url
    }

    /// Forgets the cached replicas of `name` if they were looked up more than `age` ago;
    /// whether it did.
    pub fn forget_name_older_than(&self, name: &str, age: Duration) -> bool {
        let mut names = self.names.lock().expect("bug: poisoned");
        let stale = names.get(name).is_some_and(|(_, at)| at.elapsed() > age);
        if stale {
            names.remove(name);
        }
        stale
    }

    /// Forgets what is cached about `tag` (its connection failed).
    pub fn forget_peer(&self, tag: u32) {
        self.urls.lock().expect("bug: poisoned").remove(&tag);
        self.names
            .lock()
            .expect("bug: poisoned")
            .retain(|_, (tags, _)| !tags.contains(&tag));
    }
}

//! The renewal loop: this replica's lease and the names it holds, kept in the directory
//! while it runs and removed when it stops.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::agent::broker::Broker;
use crate::cluster::directory::{
    now_ms, tag_hex, Cluster, ClusterError, View, NAME_CACHE, VIEW_NAMES,
};

impl Cluster {
    /// Keeps this replica's entries in the directory until `stop`, then removes them.
    pub async fn run(self: Arc<Self>, broker: Arc<Broker>, stop: CancellationToken) {
        let lease_ms = self.cfg.lease.as_millis() as u64;
        let me = tag_hex(self.tag);
        let mut registered: HashSet<String> = HashSet::new();
        let mut last_full: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_pass = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // A new agent's name is listed now, not at the next tick: until it is,
                // other replicas send its requests elsewhere. A storm of connecting agents
                // makes one pass per 100 ms at most (each pass reads every name).
                _ = broker.agent_connected.notified() => {
                    let next = last_pass + Duration::from_millis(100);
                    tokio::select! {
                        _ = tokio::time::sleep_until(next.into()) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                _ = stop.cancelled() => break,
            }
            last_pass = Instant::now();
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
                // Signed until the lease would end; re-signed every lease / 3.
                p.cmd("SET")
                    .arg(self.replica_key(self.tag))
                    .arg(
                        self.seal
                            .replica(self.tag, &self.cfg.advertise_url, now + lease_ms),
                    )
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
            let record: Option<String> =
                values.next().and_then(|v| redis::from_redis_value(v).ok());
            let tag = k.strip_prefix(&format!("{prefix}replica:"));
            let url = tag
                .and_then(|t| u32::from_str_radix(t, 16).ok())
                .zip(record)
                .and_then(|(t, r)| self.open_replica(t, &r));
            if let (Some(url), Some(tag)) = (url, tag) {
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

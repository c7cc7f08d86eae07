//! Signed-link nonces and sessions in the cluster's Redis: every replica honours every
//! session, and a link opens one session in the whole cluster. Session ids are stored only
//! as digests, and each record carries a MAC of the cluster's key (see [`super::seal`]), so
//! a session cannot be minted by writing to Redis.

use std::time::Duration;

use crate::cluster::directory::{Cluster, ClusterError};
use crate::user::link::StoreFuture;

impl Cluster {
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
            .arg(self.seal.session(digest, value))
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
        let (record,): (Option<String>,) = self.query(&p).await?;
        // A record without this cluster's MAC was not written by a replica: no session.
        Ok(record.and_then(|r| {
            let value = self.seal.open_session(digest, &r).map(str::to_owned);
            if value.is_none() {
                tracing::warn!(
                    "a session record in Redis is not signed with this cluster's secret: ignored"
                );
            }
            value
        }))
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

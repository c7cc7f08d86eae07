//! Signed links and the sessions they open.
//!
//! A link `…/client/<name><path>?relay_exp=<unix>&relay_id=<nonce>&relay_sig=<hmac>` grants
//! access to `<path>` and everything below it on backend `<name>` until it is used once or
//! expires. The signature is HMAC-SHA256 (RFC 2104) over a versioned message of name, path,
//! expiry and nonce, so none of them can be changed without the key. Using the link answers
//! `303 See Other` to the same URL without the `relay_*` parameters, with an opaque session
//! cookie; the link itself never reaches the backend.
//!
//! Session ids are 256 random bits and the server keeps only their SHA-256 digests, so
//! neither a memory dump nor a hash-table timing leak gives a usable cookie. Nonces of used
//! links are remembered until the link's own expiry, which makes each link single use.
//!
//! In cluster mode sessions and used nonces live in Redis instead (digests only, with the
//! same expiries), so a link redeemed on one replica is used up everywhere and its session
//! admits on every replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::base::auth::Secret;
use relay_common::id::{hex, unhex};

/// Name of the session cookie. Reserved: the relay strips it from every forwarded request.
pub const SESSION_COOKIE: &str = "relay_session";

/// Query parameters of a signed link.
pub const PARAM_EXP: &str = "relay_exp";
/// See [`PARAM_EXP`].
pub const PARAM_ID: &str = "relay_id";
/// See [`PARAM_EXP`].
pub const PARAM_SIG: &str = "relay_sig";

/// Why a link or session was refused. Every variant is a 403 with this text.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Missing or malformed `relay_*` parameters.
    #[error("malformed signed link: it needs relay_exp, relay_id and relay_sig")]
    Malformed,
    /// The signature does not match (wrong key, or a changed name, path or expiry).
    #[error("the link's signature is not valid")]
    BadSignature,
    /// The expiry has passed.
    #[error("the link has expired; ask for a new one")]
    Expired,
    /// The link was used before.
    #[error("the link was already used; ask for a new one")]
    Used,
    /// Too many live sessions.
    #[error("too many open sessions; try again later")]
    Full,
    /// The shared session store (cluster mode) did not answer.
    #[error("the session store (Redis) is unreachable: {0}")]
    Store(String),
}

/// Signs `path` on backend `name` until `exp` (Unix seconds) with `nonce`.
fn mac(key: &[u8], name: &str, path: &str, exp: u64, nonce: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("bug: HMAC takes any key length");
    // Fields cannot contain '\n' (names and nonces by grammar, paths are request targets),
    // so the encoding is unambiguous.
    m.update(format!("relay-link-v1\n{name}\n{path}\n{exp}\n{nonce}").as_bytes());
    m
}

/// The query string (without `?`) that makes `path` on `name` a signed link valid for `ttl`.
pub fn sign(key: &Secret, name: &str, path: &str, ttl: Duration) -> String {
    let exp = unix_now() + ttl.as_secs().max(1);
    let nonce = relay_common::id::random_hex(16);
    let sig = hex(&mac(key.0.as_bytes(), name, path, exp, &nonce)
        .finalize()
        .into_bytes());
    format!("{PARAM_EXP}={exp}&{PARAM_ID}={nonce}&{PARAM_SIG}={sig}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The hex SHA-256 digest of a session id: what the server keeps instead of the id.
fn digest_hex(id: &str) -> String {
    hex(&Sha256::digest(id.as_bytes()))
}

/// A short public fingerprint of a link key, recorded with each session it opened: a session
/// is valid only while the key that signed its link is the key in force, so replacing a
/// leaked key ends what was opened with it.
fn key_tag(key: &Secret) -> String {
    let mut h = Sha256::new();
    h.update(b"relay-link-key-tag\n");
    h.update(key.0.as_bytes());
    hex(&h.finalize()[..8])
}

/// The `relay_*` parameters of a query, and the query without them.
pub struct LinkParams<'a> {
    exp: Option<&'a str>,
    id: Option<&'a str>,
    sig: Option<&'a str>,
    /// The query with the link parameters removed (`None` when nothing is left).
    pub rest: Option<String>,
}

impl<'a> LinkParams<'a> {
    /// Splits `query`; `None` when it carries no `relay_sig`.
    pub fn parse(query: &'a str) -> Option<Self> {
        let mut p = LinkParams {
            exp: None,
            id: None,
            sig: None,
            rest: None,
        };
        let mut rest = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some((PARAM_EXP, v)) => p.exp = Some(v),
                Some((PARAM_ID, v)) => p.id = Some(v),
                Some((PARAM_SIG, v)) => p.sig = Some(v),
                _ => rest.push(pair),
            }
        }
        p.sig?;
        p.rest = (!rest.is_empty()).then(|| rest.join("&"));
        Some(p)
    }
}

struct Session {
    name: String,
    prefix: String,
    /// [`key_tag`] of the key that signed the link: sessions end when the key is replaced.
    key_tag: String,
    created: Instant,
    last_used: Mutex<Instant>,
}

/// A failure of the shared session store (its own description).
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// What a shared store answers, later.
pub type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Used nonces and open sessions kept outside this replica (cluster mode: in Redis), so
/// that every replica honours every session and a link opens one session in the cluster.
/// Session ids are stored only as digests.
pub trait SharedSessions: Send + Sync {
    /// Claims a link's nonce until the link expires (Unix seconds): false when it was
    /// redeemed before, anywhere.
    fn claim_nonce<'a>(&'a self, nonce: &'a str, exp_unix: u64) -> StoreFuture<'a, bool>;
    /// Stores a session under `digest`, expiring after `idle` without use.
    fn put_session<'a>(
        &'a self,
        digest: &'a str,
        value: &'a str,
        idle: Duration,
    ) -> StoreFuture<'a, ()>;
    /// A session's value, its idle timer restarted.
    fn touch_session<'a>(
        &'a self,
        digest: &'a str,
        idle: Duration,
    ) -> StoreFuture<'a, Option<String>>;
}

/// Link verification and the session table.
pub struct Sessions {
    /// The HMAC key of links; replaced on reload (a rotated key stops old links at once).
    key: std::sync::RwLock<Secret>,
    idle: Duration,
    max_age: Duration,
    max_sessions: usize,
    sessions: DashMap<[u8; 32], Session>,
    /// Nonces of used links and the instant their link expires.
    used: Mutex<HashMap<String, u64>>,
    /// The cluster's Redis, which holds sessions and nonces instead (cluster mode).
    shared: Option<std::sync::Arc<dyn SharedSessions>>,
}

impl Sessions {
    /// An empty table; links are checked with `key`.
    pub fn new(key: Secret, idle: Duration, max_age: Duration, max_sessions: usize) -> Self {
        Sessions {
            key: std::sync::RwLock::new(key),
            idle,
            max_age,
            max_sessions,
            sessions: DashMap::new(),
            used: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// Keeps sessions and used nonces in `store` (the cluster's Redis), shared by every
    /// replica.
    pub fn shared(mut self, store: std::sync::Arc<dyn SharedSessions>) -> Self {
        self.shared = Some(store);
        self
    }

    /// Verifies links with `key` from now on; when it differs from the key in force,
    /// sessions opened with the old key end (everywhere: each session records its key's tag).
    pub fn set_key(&self, key: Secret) {
        let tag = key_tag(&key);
        let old = std::mem::replace(&mut *self.key.write().expect("bug: poisoned"), key);
        // Not under the key's lock: `check_local` takes the key after a table entry.
        if key_tag(&old) != tag {
            self.sessions.retain(|_, s| s.key_tag == tag);
        }
    }

    /// The tag of the key in force (what sessions opened now record).
    pub fn key_tag(&self) -> String {
        self.current_tag()
    }

    fn current_tag(&self) -> String {
        key_tag(&self.key.read().expect("bug: poisoned"))
    }

    /// Absolute session lifetime (the cookie's `Max-Age`).
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Checks a link for `path` on `name` and, if it is valid and unused, opens a session
    /// and returns its cookie value.
    pub async fn redeem(
        &self,
        name: &str,
        path: &str,
        p: &LinkParams<'_>,
    ) -> Result<String, LinkError> {
        let (Some(exp), Some(nonce), Some(sig)) = (p.exp, p.id, p.sig) else {
            return Err(LinkError::Malformed);
        };
        let exp: u64 = exp.parse().map_err(|_| LinkError::Malformed)?;
        if nonce.is_empty() || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LinkError::Malformed);
        }
        let sig = unhex(sig).ok_or(LinkError::Malformed)?;
        // `verify_slice` compares in constant time.
        let key = self.key.read().expect("bug: poisoned").clone();
        mac(key.0.as_bytes(), name, path, exp, nonce)
            .verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        let now = unix_now();
        if exp <= now {
            return Err(LinkError::Expired);
        }
        if let Some(c) = &self.shared {
            let store = |e: StoreError| LinkError::Store(e.to_string());
            if !c.claim_nonce(nonce, exp).await.map_err(store)? {
                return Err(LinkError::Used);
            }
            let id = relay_common::id::random_hex(32);
            let value = format!("{name}\n{path}\n{}\n{}", unix_now(), key_tag(&key));
            c.put_session(&digest_hex(&id), &value, self.idle)
                .await
                .map_err(store)?;
            return Ok(id);
        }
        {
            let mut used = self.used.lock().expect("bug: poisoned");
            if used.contains_key(nonce) {
                return Err(LinkError::Used);
            }
            if self.sessions.len() >= self.max_sessions {
                drop(used);
                self.reap();
                if self.sessions.len() >= self.max_sessions {
                    return Err(LinkError::Full);
                }
                used = self.used.lock().expect("bug: poisoned");
            }
            used.insert(nonce.to_owned(), exp);
        }
        let id = relay_common::id::random_hex(32);
        let now = Instant::now();
        self.sessions.insert(
            Sha256::digest(id.as_bytes()).into(),
            Session {
                name: name.to_owned(),
                prefix: path.to_owned(),
                key_tag: key_tag(&key),
                created: now,
                last_used: Mutex::new(now),
            },
        );
        Ok(id)
    }

    /// Whether the cookie value `id` is a live session for `path` on `name`; refreshes its
    /// idle timer when it is.
    pub async fn check(&self, id: &str, name: &str, path: &str) -> Result<bool, LinkError> {
        let Some(c) = &self.shared else {
            return Ok(self.check_local(id, name, path));
        };
        let Some(value) = c
            .touch_session(&digest_hex(id), self.idle)
            .await
            .map_err(|e| LinkError::Store(e.to_string()))?
        else {
            return Ok(false);
        };
        let mut parts = value.splitn(4, '\n');
        let (Some(n), Some(prefix), Some(created), Some(tag)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(false);
        };
        let created: u64 = created.parse().unwrap_or(0);
        let young = unix_now().saturating_sub(created) < self.max_age.as_secs();
        Ok(young && tag == self.current_tag() && n == name && within(path, prefix))
    }

    fn check_local(&self, id: &str, name: &str, path: &str) -> bool {
        let tag = self.current_tag();
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        let Some(s) = self.sessions.get(&key) else {
            return false;
        };
        let now = Instant::now();
        let mut last = s.last_used.lock().expect("bug: poisoned");
        let live = now.duration_since(s.created) < self.max_age
            && now.duration_since(*last) < self.idle
            && s.key_tag == tag;
        if live && s.name == name && within(path, &s.prefix) {
            *last = now;
            return true;
        }
        false
    }

    /// Drops expired sessions and the nonces of expired links. Run periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        self.sessions.retain(|_, s| {
            now.duration_since(s.created) < self.max_age
                && now.duration_since(*s.last_used.lock().expect("bug: poisoned")) < self.idle
        });
        let unix = unix_now();
        self.used
            .lock()
            .expect("bug: poisoned")
            .retain(|_, exp| *exp > unix);
    }
}

/// Whether `path` lies in the scope of a link for `prefix`, segment by segment: a link for
/// `/lab` admits `/lab`, `/lab/` and `/lab/x`, not `/laboratory` or `/lab-admin/`. (A path
/// that could normalise out of the scope, `/lab/..%2Fadmin`, never gets here: the router
/// refuses dot-segments in every spelling.)
pub fn within(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_whole_segments() {
        for (path, prefix, ok) in [
            ("/lab", "/lab", true),
            ("/lab/", "/lab", true),
            ("/lab/x/y", "/lab", true),
            ("/laboratory/secret", "/lab", false),
            ("/lab-admin/", "/lab", false),
            ("/lab/x", "/lab/", true),
            ("/lab", "/lab/", false),
            ("/anything", "/", true),
            ("/other", "/lab", false),
        ] {
            assert_eq!(within(path, prefix), ok, "{path} in {prefix}");
        }
    }

    fn sessions() -> Sessions {
        Sessions::new(
            Secret("k".repeat(32)),
            Duration::from_secs(60),
            Duration::from_secs(600),
            2,
        )
    }

    #[tokio::test]
    async fn link_round_trip_single_use_and_scope() {
        let s = sessions();
        let q = sign(
            &s.key.read().unwrap(),
            "a",
            "/lab/",
            Duration::from_secs(60),
        );
        let full = format!("x=1&{q}");
        let p = LinkParams::parse(&full).unwrap();
        assert_eq!(p.rest.as_deref(), Some("x=1"));
        // Another name or another path breaks the signature.
        assert_eq!(
            s.redeem("b", "/lab/", &p).await,
            Err(LinkError::BadSignature)
        );
        assert_eq!(s.redeem("a", "/", &p).await, Err(LinkError::BadSignature));
        let id = s.redeem("a", "/lab/", &p).await.unwrap();
        assert_eq!(s.redeem("a", "/lab/", &p).await, Err(LinkError::Used));
        assert_eq!(s.check(&id, "a", "/lab/tree").await, Ok(true));
        assert_eq!(s.check(&id, "a", "/other").await, Ok(false));
        assert_eq!(s.check(&id, "b", "/lab/").await, Ok(false));
        assert_eq!(s.check("nope", "a", "/lab/").await, Ok(false));
        // The same key again changes nothing; a new key ends the session.
        s.set_key(Secret("k".repeat(32)));
        assert_eq!(s.check(&id, "a", "/lab/tree").await, Ok(true));
        s.set_key(Secret("n".repeat(32)));
        assert_eq!(s.check(&id, "a", "/lab/tree").await, Ok(false));
        assert!(s.is_empty(), "sessions of the old key are dropped");
    }

    #[tokio::test]
    async fn expired_and_malformed() {
        let s = sessions();
        let exp = unix_now() - 1;
        let sig = hex(
            &mac(s.key.read().unwrap().0.as_bytes(), "a", "/", exp, "ab")
                .finalize()
                .into_bytes(),
        );
        let q = format!("relay_exp={exp}&relay_id=ab&relay_sig={sig}");
        assert_eq!(
            s.redeem("a", "/", &LinkParams::parse(&q).unwrap()).await,
            Err(LinkError::Expired)
        );
        let q = "relay_exp=9&relay_sig=00";
        assert_eq!(
            s.redeem("a", "/", &LinkParams::parse(q).unwrap()).await,
            Err(LinkError::Malformed)
        );
        assert!(LinkParams::parse("a=b").is_none());
    }

    #[tokio::test]
    async fn session_table_is_bounded() {
        let s = sessions();
        for _ in 0..2 {
            let q = sign(&s.key.read().unwrap(), "a", "/", Duration::from_secs(60));
            s.redeem("a", "/", &LinkParams::parse(&q).unwrap())
                .await
                .unwrap();
        }
        let q = sign(&s.key.read().unwrap(), "a", "/", Duration::from_secs(60));
        assert_eq!(
            s.redeem("a", "/", &LinkParams::parse(&q).unwrap()).await,
            Err(LinkError::Full)
        );
    }
}

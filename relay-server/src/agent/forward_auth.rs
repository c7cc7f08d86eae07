//! Agent forward-auth (`--agent-forward-auth-url`): an external service decides which
//! names an agent may serve, for fleets whose agents carry credentials of their own token
//! service (Cloud Robotics robots present rotating OAuth tokens, checked by its token
//! vendor) rather than this relay's tokens.
//!
//! When an agent call presents no configured token (and no client certificate), the relay
//! sends `GET <url>` with the call's `Authorization`, `Cookie` and `User-Agent` and its own
//! `X-Forwarded-For` (the agent's address). A 2xx whose names header (default
//! `X-Relay-Names`) lists names (comma-separated, or `*` for any) grants them; a 2xx
//! without names grants none (403). A 401 or 403 is the agent's answer (the Go client
//! exits on 403). Anything else, or no answer within the timeout, is a 502 and the agent
//! retries: the relay fails closed.
//!
//! Verdicts (grants and refusals, not failures) are kept for `cache_for` per credential,
//! so a Go client posting a message every 100 ms does not ask the service each time; a
//! credential the service stops accepting is refused within that time, and a reload clears
//! the cache. Credentials are kept only as digests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::Empty;
use sha2::{Digest, Sha256};

use crate::agent::error::AgentCallError;
use crate::base::auth::Grant;
use crate::base::outbound::{self, Outbound};

/// Most verdicts kept; when full, the expired go, and if none has, all.
const MAX_CACHED: usize = 10_000;

/// Settings of the agents' authorization service.
#[derive(Clone, Debug)]
pub struct AgentForwardAuthConfig {
    /// The authorization endpoint.
    pub url: Uri,
    /// The answer header that lists the granted names.
    pub names_header: HeaderName,
    /// How long the service may take.
    pub timeout: Duration,
    /// How long a verdict is kept.
    pub cache_for: Duration,
}

/// The credentials' headers the service sees.
const ASKED_HEADERS: [HeaderName; 3] = [header::AUTHORIZATION, header::COOKIE, header::USER_AGENT];

#[derive(Clone)]
enum Verdict {
    Grant(Grant),
    Refused(StatusCode),
}

/// The agents' forward-auth client and its verdict cache.
pub struct AgentForwardAuth {
    cfg: AgentForwardAuthConfig,
    client: Outbound,
    cache: Mutex<HashMap<[u8; 32], (Instant, Verdict)>>,
}

impl AgentForwardAuth {
    /// A client for `cfg`.
    pub fn new(cfg: AgentForwardAuthConfig) -> Self {
        AgentForwardAuth {
            client: outbound::client(cfg.timeout),
            cfg,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// What the service grants the agent whose call carries `headers`.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Grant, AgentCallError> {
        let key = credential_digest(headers);
        let cached = self
            .cache
            .lock()
            .expect("bug: poisoned")
            .get(&key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, v)| v.clone());
        let verdict = match cached {
            Some(v) => v,
            None => {
                let v = self.ask(headers, peer).await?;
                self.remember(key, v.clone());
                v
            }
        };
        match verdict {
            Verdict::Grant(g) => Ok(g),
            Verdict::Refused(StatusCode::FORBIDDEN) => Err(AgentCallError::Unauthorized(
                "the authorization service refused this agent (403)".into(),
            )),
            Verdict::Refused(status) => Err(AgentCallError::Unauthenticated(format!(
                "the authorization service refused this agent's credentials ({status})"
            ))),
        }
    }

    async fn ask(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Verdict, AgentCallError> {
        let mut ask = Request::new(Empty::new());
        *ask.uri_mut() = self.cfg.url.clone();
        let h = ask.headers_mut();
        for name in ASKED_HEADERS {
            for v in headers.get_all(&name) {
                h.append(name.clone(), v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            h.insert("x-forwarded-for", v);
        }
        let failed = |why: String| AgentCallError::AuthService(why);
        let resp = tokio::time::timeout(self.cfg.timeout, self.client.request(ask))
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.cfg.timeout)))?
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            let listed: Vec<&str> = resp
                .headers()
                .get_all(&self.cfg.names_header)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            let any = listed.contains(&"*");
            let names = listed
                .into_iter()
                .filter(|n| relay_common::name::is_valid_name(n))
                .map(str::to_owned)
                .collect();
            return Ok(Verdict::Grant(Grant::new(any, names)));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Ok(Verdict::Refused(status));
        }
        Err(failed(format!("it answered {status}")))
    }

    fn remember(&self, key: [u8; 32], v: Verdict) {
        let mut cache = self.cache.lock().expect("bug: poisoned");
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now() + self.cfg.cache_for, v));
    }
}

/// One digest over the credential headers (length-prefixed, so no two sets collide by
/// concatenation).
fn credential_digest(headers: &HeaderMap) -> [u8; 32] {
    let mut d = Sha256::new();
    for name in ASKED_HEADERS.iter().take(2) {
        for v in headers.get_all(name) {
            d.update((v.len() as u64).to_be_bytes());
            d.update(v.as_bytes());
        }
        d.update(u64::MAX.to_be_bytes());
    }
    d.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_credentials_apart() {
        let mut a = HeaderMap::new();
        a.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer ab"));
        let mut b = HeaderMap::new();
        b.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        b.insert(header::COOKIE, HeaderValue::from_static("b"));
        assert_ne!(credential_digest(&a), credential_digest(&b));
        let mut a2 = a.clone();
        a2.insert(header::USER_AGENT, HeaderValue::from_static("x"));
        assert_eq!(credential_digest(&a), credential_digest(&a2));
    }
}

//! What keeps Redis and the network between replicas from being trusted blindly: keys
//! derived from the cluster secret sign every directory and session record a replica
//! writes, and authenticate every call between replicas without the secret ever crossing
//! the wire.
//!
//! - A replica record (`<prefix>replica:<tag>`) is `v1 <expiry ms> <url> <mac>`, the MAC
//!   over the tag, the URL and the expiry: whoever can write to Redis but lacks the secret
//!   cannot point a tag at an address of theirs, and an old record stops being believed at
//!   its expiry even if it is written back.
//! - A signed-link session record (`<prefix>session:<digest>`) ends with a MAC over the
//!   digest and the value, so a session cannot be minted or moved to another id.
//! - A call between replicas carries `X-Relay-Cluster-Auth: v1 <unix ms> <nonce> <mac>`, the
//!   MAC over the method, the target, the time, the nonce and the relay's own headers of the
//!   call (the forwarded head or the agent's grant); the receiver accepts it within
//!   [`CALL_WINDOW`] of its own clock. The bodies are not covered: between replicas that do
//!   not share a trusted network, use TLS (`--cluster-tls-*`).
//!
//! All MACs are HMAC-SHA256 (RFC 2104) with keys derived from the secret per purpose, and
//! every check compares in constant time.

use std::time::Duration;

use hmac::{Hmac, Mac};
use relay_common::id::{hex, unhex};

use crate::base::auth::Secret;

/// Header authenticating a call between replicas.
pub const AUTH_HEADER: &str = "x-relay-cluster-auth";

/// How far a call's time may be from the receiver's clock (replicas run NTP).
pub const CALL_WINDOW: Duration = Duration::from_secs(60);

type Hm = Hmac<Sha256>;
use sha2::Sha256;

/// The keys one cluster secret yields.
pub struct Seal {
    records: [u8; 32],
    calls: [u8; 32],
}

/// Why a call between replicas was refused (every variant is a 401 with this text).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallAuthError {
    /// No `X-Relay-Cluster-Auth` header, or not of the expected shape.
    #[error("missing or malformed X-Relay-Cluster-Auth")]
    Malformed,
    /// The time is outside the window (a replay, or clocks apart).
    #[error("the call's time is more than 60 s from this replica's clock")]
    Stale,
    /// The MAC does not match (another secret, or a changed call).
    #[error("the call's signature is not valid (another cluster secret?)")]
    BadSignature,
}

fn derive(secret: &Secret, purpose: &str) -> [u8; 32] {
    let mut m = Hm::new_from_slice(secret.0.as_bytes()).expect("bug: HMAC takes any key length");
    m.update(purpose.as_bytes());
    m.finalize().into_bytes().into()
}

/// Fields joined unambiguously: each is prefixed with its length.
fn mac(key: &[u8; 32], fields: &[&[u8]]) -> Hm {
    let mut m = Hm::new_from_slice(key).expect("bug: HMAC takes any key length");
    for f in fields {
        m.update(format!("{}:", f.len()).as_bytes());
        m.update(f);
    }
    m
}

/// Exactly four space-separated fields (a version and three values), or `None`.
fn v1_fields(s: &str) -> Option<[&str; 4]> {
    let mut parts = s.split(' ');
    let fields = [parts.next()?, parts.next()?, parts.next()?, parts.next()?];
    parts.next().is_none().then_some(fields)
}

fn verify(m: Hm, sig_hex: &str) -> bool {
    unhex(sig_hex).is_some_and(|sig| m.verify_slice(&sig).is_ok())
}

impl Seal {
    /// The keys of `secret`.
    pub fn new(secret: &Secret) -> Self {
        Seal {
            records: derive(secret, "relay-cluster-records-v1"),
            calls: derive(secret, "relay-cluster-calls-v1"),
        }
    }

    /// The record of replica `tag` at `url`, believed until `expires_ms`.
    pub fn replica(&self, tag: u32, url: &str, expires_ms: u64) -> String {
        let exp = expires_ms.to_string();
        let sig = mac(
            &self.records,
            &[
                b"replica",
                &tag.to_be_bytes(),
                url.as_bytes(),
                exp.as_bytes(),
            ],
        );
        format!("v1 {exp} {url} {}", hex(&sig.finalize().into_bytes()))
    }

    /// The URL of a replica record for `tag`, if it is signed with this cluster's key and
    /// has not expired at `now_ms`.
    pub fn open_replica(&self, tag: u32, record: &str, now_ms: u64) -> Option<String> {
        let ["v1", exp, url, sig] = v1_fields(record)? else {
            return None;
        };
        let m = mac(
            &self.records,
            &[
                b"replica",
                &tag.to_be_bytes(),
                url.as_bytes(),
                exp.as_bytes(),
            ],
        );
        let fresh = exp.parse::<u64>().is_ok_and(|e| e > now_ms);
        (verify(m, sig) && fresh).then(|| url.to_owned())
    }

    /// A session record: `value` with a MAC binding it to the session's `digest`.
    pub fn session(&self, digest: &str, value: &str) -> String {
        let sig = mac(
            &self.records,
            &[b"session", digest.as_bytes(), value.as_bytes()],
        );
        format!("{value}\n{}", hex(&sig.finalize().into_bytes()))
    }

    /// The value of a session record for `digest`, if its MAC holds.
    pub fn open_session<'a>(&self, digest: &str, record: &'a str) -> Option<&'a str> {
        let (value, sig) = record.rsplit_once('\n')?;
        let m = mac(
            &self.records,
            &[b"session", digest.as_bytes(), value.as_bytes()],
        );
        verify(m, sig).then_some(value)
    }

    /// The `X-Relay-Cluster-Auth` value of a call at `now_ms`; `bound` are the relay's own
    /// headers of the call (forwarded head, grant), which the MAC covers too.
    pub fn call(&self, method: &str, target: &str, bound: &[&[u8]], now_ms: u64) -> String {
        let nonce = relay_common::id::random_hex(12);
        let ts = now_ms.to_string();
        let sig = self.call_mac(method, target, &ts, &nonce, bound);
        format!("v1 {ts} {nonce} {}", hex(&sig.finalize().into_bytes()))
    }

    /// Checks a call's `X-Relay-Cluster-Auth` value at `now_ms`.
    pub fn check_call(
        &self,
        value: Option<&[u8]>,
        method: &str,
        target: &str,
        bound: &[&[u8]],
        now_ms: u64,
    ) -> Result<(), CallAuthError> {
        let value = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or(CallAuthError::Malformed)?;
        let Some(["v1", ts, nonce, sig]) = v1_fields(value) else {
            return Err(CallAuthError::Malformed);
        };
        let at: u64 = ts.parse().map_err(|_| CallAuthError::Malformed)?;
        if at.abs_diff(now_ms) > CALL_WINDOW.as_millis() as u64 {
            return Err(CallAuthError::Stale);
        }
        let m = self.call_mac(method, target, ts, nonce, bound);
        if verify(m, sig) {
            Ok(())
        } else {
            Err(CallAuthError::BadSignature)
        }
    }

    fn call_mac(&self, method: &str, target: &str, ts: &str, nonce: &str, bound: &[&[u8]]) -> Hm {
        let mut fields: Vec<&[u8]> = vec![
            b"call",
            method.as_bytes(),
            target.as_bytes(),
            ts.as_bytes(),
            nonce.as_bytes(),
        ];
        fields.extend_from_slice(bound);
        mac(&self.calls, &fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(s: &str) -> Seal {
        Seal::new(&Secret(s.repeat(32)))
    }

    #[test]
    fn replica_records_hold_only_with_the_key_and_until_they_expire() {
        let s = seal("a");
        let r = s.replica(7, "http://10.0.0.1:9000", 5_000);
        assert_eq!(
            s.open_replica(7, &r, 4_999).as_deref(),
            Some("http://10.0.0.1:9000")
        );
        assert_eq!(s.open_replica(7, &r, 5_000), None, "expired");
        assert_eq!(s.open_replica(8, &r, 0), None, "another tag");
        assert_eq!(seal("b").open_replica(7, &r, 0), None, "another secret");
        let forged = r.replace("10.0.0.1", "10.6.6.6");
        assert_eq!(s.open_replica(7, &forged, 0), None);
        let extended = r.replace("5000", "9000");
        assert_eq!(s.open_replica(7, &extended, 0), None);
        assert_eq!(
            s.open_replica(7, "http://10.6.6.6:9000", 0),
            None,
            "unsigned"
        );
    }

    #[test]
    fn session_records_are_bound_to_their_id() {
        let s = seal("a");
        let r = s.session("d1", "a\n/\n0\ntag");
        assert_eq!(s.open_session("d1", &r), Some("a\n/\n0\ntag"));
        assert_eq!(s.open_session("d2", &r), None);
        assert_eq!(seal("b").open_session("d1", &r), None);
        assert_eq!(s.open_session("d1", "a\n/\n0\ntag"), None);
    }

    #[test]
    fn calls_hold_for_their_method_target_headers_and_time() {
        let s = seal("a");
        let head: &[u8] = b"{\"name\":\"a\"}";
        let v = s.call("GET", "/cluster/request", &[head], 100_000);
        let check =
            |seal: &Seal, m, t, b: &[u8], now| seal.check_call(Some(v.as_bytes()), m, t, &[b], now);
        assert_eq!(check(&s, "GET", "/cluster/request", head, 100_500), Ok(()));
        assert_eq!(
            check(&s, "POST", "/cluster/request", head, 100_500),
            Err(CallAuthError::BadSignature)
        );
        assert_eq!(
            check(&s, "GET", "/server/response?id=x", head, 100_500),
            Err(CallAuthError::BadSignature)
        );
        assert_eq!(
            check(&s, "GET", "/cluster/request", b"{\"name\":\"b\"}", 100_500),
            Err(CallAuthError::BadSignature)
        );
        assert_eq!(
            check(&seal("b"), "GET", "/cluster/request", head, 100_500),
            Err(CallAuthError::BadSignature)
        );
        assert_eq!(
            check(&s, "GET", "/cluster/request", head, 100_000 + 61_000),
            Err(CallAuthError::Stale)
        );
        assert_eq!(
            s.check_call(None, "GET", "/", &[], 0),
            Err(CallAuthError::Malformed)
        );
        assert_eq!(
            s.check_call(Some(b"v1 x y z"), "GET", "/", &[], 0),
            Err(CallAuthError::Malformed)
        );
    }
}

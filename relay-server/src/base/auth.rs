//! Bearer tokens scoped to backend names (agent tokens, and user tokens of `token` access).
//!
//! Tokens are kept only as SHA-256 digests and compared digest to digest in constant time,
//! against every configured entry (no early exit), so neither the length nor a prefix of a
//! token can be learned from timing. Tokens never reach a log line.

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use std::fmt;

/// A secret string whose `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which names an agent token may serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenScope {
    /// Any name (the generated zero-config token, or `*=TOKEN`).
    Any,
    /// Exactly this name.
    Name(String),
}

/// The configured agent tokens.
pub struct TokenStore {
    entries: Vec<(TokenScope, [u8; 32])>,
}

/// What an authenticated agent may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    any: bool,
    names: Vec<String>,
    /// The digest of the token that earned it; `None` for a client certificate (verified
    /// by the TLS handshake, not revocable by a reload) or a grant from another replica.
    token: Option<[u8; 32]>,
}

impl Grant {
    /// A grant of `names` (and of every name when `any`).
    pub fn new(any: bool, names: Vec<String>) -> Self {
        Grant {
            any,
            names,
            token: None,
        }
    }

    /// The digest of the token behind the grant (a reload re-checks it: a token that left
    /// the configuration revokes the grant).
    pub fn token(&self) -> Option<&[u8; 32]> {
        self.token.as_ref()
    }

    /// The grant as text for a call between replicas: `*`, or the names joined by commas
    /// (backend names never contain commas).
    pub fn encode(&self) -> String {
        if self.any {
            "*".to_owned()
        } else {
            self.names.join(",")
        }
    }

    /// The inverse of [`Grant::encode`].
    pub fn decode(s: &str) -> Self {
        if s == "*" {
            return Grant::new(true, Vec::new());
        }
        let names = s
            .split(',')
            .filter(|n| relay_common::name::is_valid_name(n))
            .map(str::to_owned)
            .collect();
        Grant::new(false, names)
    }

    /// Whether the grant covers `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.any || self.names.iter().any(|n| n == name)
    }
}

/// Why an agent call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing agent token: send Authorization: Bearer <token>")]
    Missing,
    /// The token matches no configured token.
    #[error("invalid agent token")]
    Invalid,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl TokenStore {
    /// Builds the store from the configuration.
    pub fn new(tokens: &[(TokenScope, Secret)]) -> Self {
        TokenStore {
            entries: tokens
                .iter()
                .map(|(scope, secret)| (scope.clone(), digest(secret.0.as_bytes())))
                .collect(),
        }
    }

    /// Checks an agent call: its bearer token, or without one its client certificate.
    pub fn authenticate_agent(
        &self,
        headers: &HeaderMap,
        cert: Option<&Grant>,
    ) -> Result<Grant, AuthError> {
        match (self.authenticate(headers), cert) {
            (Err(AuthError::Missing), Some(g)) => Ok(g.clone()),
            (r, _) => r,
        }
    }

    /// Checks the bearer token of an agent call.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Grant, AuthError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .as_bytes();
        // RFC 9110 §11.1: the scheme is case-insensitive.
        let token = match value.get(..7) {
            Some(s) if s.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
            _ => return Err(AuthError::Missing),
        };
        self.check(token).ok_or(AuthError::Invalid)
    }

    /// What `token` grants, if it matches a configured token. Compares the digest against
    /// every entry in constant time, without an early exit.
    pub fn check(&self, token: &[u8]) -> Option<Grant> {
        self.check_digest(&digest(token))
    }

    /// Whether the grant a token earned earlier still covers `name` under these tokens (a
    /// reload re-checks every agent this way). Grants without a token stand.
    pub fn still_grants(&self, grant: &Grant, name: &str) -> bool {
        match grant.token() {
            None => grant.allows(name),
            Some(d) => self.still_grants_token(d, name),
        }
    }

    /// Whether the token of digest `token` still grants `name`.
    pub fn still_grants_token(&self, token: &[u8; 32], name: &str) -> bool {
        self.check_digest(token).is_some_and(|g| g.allows(name))
    }

    fn check_digest(&self, presented: &[u8; 32]) -> Option<Grant> {
        let mut grant = Grant {
            any: false,
            names: Vec::new(),
            token: Some(*presented),
        };
        let mut matched = subtle::Choice::from(0);
        for (scope, d) in &self.entries {
            let eq = d.ct_eq(presented);
            matched |= eq;
            if bool::from(eq) {
                match scope {
                    TokenScope::Any => grant.any = true,
                    TokenScope::Name(n) => grant.names.push(n.clone()),
                }
            }
        }
        bool::from(matched).then_some(grant)
    }
}

/// URI SAN prefix naming a backend an agent certificate may serve (`urn:relay-agent:*` for
/// any name); DNS SANs that are backend names count too.
pub const AGENT_URI_PREFIX: &str = "urn:relay-agent:";

/// The names a verified client certificate lets an agent serve: each DNS subject alternative
/// name, and each `urn:relay-agent:<name>` URI name. `None` without a certificate or when it
/// names nothing.
pub fn cert_grant(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<Grant> {
    let der = certs?.first()?;
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let mut grant = Grant::new(false, Vec::new());
    for dns in cert.valid_dns_names() {
        if relay_common::name::is_valid_name(dns) {
            grant.names.push(dns.to_owned());
        }
    }
    for uri in cert.valid_uri_names() {
        match uri.strip_prefix(AGENT_URI_PREFIX) {
            Some("*") => grant.any = true,
            Some(n) if relay_common::name::is_valid_name(n) => grant.names.push(n.to_owned()),
            _ => {}
        }
    }
    (grant.any || !grant.names.is_empty()).then_some(grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> TokenStore {
        TokenStore::new(&[
            (TokenScope::Name("a".into()), Secret("ta".into())),
            (TokenScope::Name("b".into()), Secret("tab".into())),
            (TokenScope::Name("c".into()), Secret("tab".into())),
            (TokenScope::Any, Secret("root".into())),
        ])
    }

    fn auth(v: Option<&str>) -> Result<Grant, AuthError> {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        store().authenticate(&h)
    }

    #[test]
    fn scopes() {
        let g = auth(Some("Bearer ta")).unwrap();
        assert!(g.allows("a") && !g.allows("b"));
        let g = auth(Some("bearer tab")).unwrap();
        assert!(g.allows("b") && g.allows("c") && !g.allows("a"));
        assert!(auth(Some("Bearer root")).unwrap().allows("anything"));
        assert_eq!(auth(None), Err(AuthError::Missing));
        assert_eq!(auth(Some("Basic ta")), Err(AuthError::Missing));
        assert_eq!(auth(Some("Bearer t")), Err(AuthError::Invalid));
        assert_eq!(auth(Some("Bearer tax")), Err(AuthError::Invalid));
    }

    #[test]
    fn a_reload_rechecks_grants_by_their_token() {
        let g = auth(Some("Bearer tab")).unwrap();
        assert!(store().still_grants(&g, "b"));
        // The token now serves only `c`; another token took `b`.
        let next = TokenStore::new(&[
            (TokenScope::Name("c".into()), Secret("tab".into())),
            (TokenScope::Name("b".into()), Secret("new".into())),
        ]);
        assert!(!next.still_grants(&g, "b"));
        assert!(next.still_grants(&g, "c"));
        assert!(!TokenStore::new(&[]).still_grants(&g, "c"));
        // A certificate's grant is not a token's to revoke.
        let cert = Grant::new(false, vec!["b".into()]);
        assert!(TokenStore::new(&[]).still_grants(&cert, "b"));
        assert!(!TokenStore::new(&[]).still_grants(&cert, "a"));
    }

    #[test]
    fn wrong_tokens_of_any_length_are_refused() {
        // Every length reaches the same digest comparison: there is no length shortcut.
        let s = store();
        for len in [0, 1, 2, 3, 15, 16, 32, 64, 4096, 1 << 20] {
            assert_eq!(s.check(&vec![b't'; len]), None, "length {len}");
        }
        assert!(s.check(b"tab").is_some());
    }
}

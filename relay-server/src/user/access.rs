//! Who may reach a backend: the user access mode of each name, checked before anything
//! else is revealed about the name (an unauthenticated user cannot tell a connected backend
//! from an unknown one).
//!
//! Modes: `open`, `token` (bearer tokens kept as digests), `signed-link` (see [`crate::user::link`])
//! and `forward-auth` (see [`crate::user::forward_auth`]). Whatever the mode, the relay's own
//! credentials (`X-Relay-Token`, a bearer token it accepted, the `relay_session` cookie)
//! are removed before the request goes on to the backend.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::base::auth::TokenStore;
use crate::base::body::{empty, RelayBody};
use crate::user::link::{LinkError, LinkParams, Sessions, SESSION_COOKIE};

/// Header that carries a user token without taking `Authorization` from the backend.
pub const TOKEN_HEADER: &str = "x-relay-token";

/// How users of one backend name are admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    /// Everyone.
    Open,
    /// `Authorization: Bearer` or `X-Relay-Token` with a configured user token.
    Token,
    /// A signed link, exchanged for a session cookie.
    SignedLink,
    /// An external authorization service decides.
    ForwardAuth,
}

impl FromStr for AccessMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(AccessMode::Open),
            "token" => Ok(AccessMode::Token),
            "signed-link" => Ok(AccessMode::SignedLink),
            "forward-auth" => Ok(AccessMode::ForwardAuth),
            _ => Err(format!(
                "unknown access mode {s:?}: use open, token, signed-link or forward-auth"
            )),
        }
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessMode::Open => "open",
            AccessMode::Token => "token",
            AccessMode::SignedLink => "signed-link",
            AccessMode::ForwardAuth => "forward-auth",
        })
    }
}

/// The access mode of every name: a default and per-name overrides.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    /// Mode of names without an override.
    pub default: AccessMode,
    /// Per-name overrides.
    pub per_name: HashMap<String, AccessMode>,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        AccessPolicy {
            default: AccessMode::Open,
            per_name: HashMap::new(),
        }
    }
}

impl AccessPolicy {
    /// The mode of `name`.
    pub fn mode(&self, name: &str) -> AccessMode {
        self.per_name.get(name).copied().unwrap_or(self.default)
    }

    /// Every mode in use.
    pub fn modes(&self) -> impl Iterator<Item = AccessMode> + '_ {
        std::iter::once(self.default).chain(self.per_name.values().copied())
    }
}

/// Why a user was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No credential (401 with a `WWW-Authenticate` challenge, RFC 9110 §11.6.1).
    #[error(
        "backend {0:?} needs a user token: send Authorization: Bearer <token> or X-Relay-Token"
    )]
    Unauthenticated(String),
    /// A credential that does not admit to this name (403).
    #[error("{0}")]
    Forbidden(String),
    /// The forward-auth service failed (502).
    #[error("the authorization service failed: {0}")]
    AuthService(String),
}

/// The outcome of an admitted check that the relay answers itself.
pub enum Verdict {
    /// Go on to the backend (credentials already stripped).
    Admit,
    /// Answer the user with this instead (a signed link's redirect, the forward-auth
    /// service's denial).
    Respond(Response<RelayBody>),
}

/// Checks a user token from `X-Relay-Token` or `Authorization: Bearer`, and removes the
/// header it came from. `X-Relay-Token` wins so that a backend's own `Authorization` passes.
/// Returns the token's digest (what a reload re-checks).
pub fn check_token(
    tokens: &TokenStore,
    name: &str,
    headers: &mut HeaderMap,
) -> Result<[u8; 32], AccessError> {
    let (token, from) = if let Some(v) = headers.get(TOKEN_HEADER) {
        (
            v.as_bytes().trim_ascii().to_vec(),
            header::HeaderName::from_static(TOKEN_HEADER),
        )
    } else {
        match headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) {
            // RFC 9110 §11.1: the scheme is case-insensitive.
            Some(v) if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") => {
                (v[7..].trim_ascii().to_vec(), header::AUTHORIZATION)
            }
            _ => return Err(AccessError::Unauthenticated(name.to_owned())),
        }
    };
    match tokens.check(&token) {
        Some(grant) if grant.allows(name) => {
            headers.remove(from);
            Ok(*grant.token().expect("bug: a checked token has a digest"))
        }
        Some(_) => Err(AccessError::Forbidden(format!(
            "this token does not give access to backend {name:?}"
        ))),
        None => Err(AccessError::Forbidden("invalid user token".into())),
    }
}

/// Signed-link mode: redeems a link (answering with the redirect and cookie) or checks the
/// session cookie.
pub async fn check_link(
    sessions: &Sessions,
    name: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    cookie_path: &str,
    https: bool,
) -> Result<Verdict, AccessError> {
    if let Some(params) = query.and_then(LinkParams::parse) {
        let id = sessions
            .redeem(name, path, &params)
            .await
            .map_err(|e| match e {
                LinkError::Store(_) => AccessError::AuthService(e.to_string()),
                e => AccessError::Forbidden(e.to_string()),
            })?;
        tracing::info!(name, "signed link redeemed");
        let location = match &params.rest {
            Some(q) => format!(
                "{cookie_path_base}{path}?{q}",
                cookie_path_base = base(cookie_path)
            ),
            None => format!("{}{path}", base(cookie_path)),
        };
        // RFC 6265 §4.1: HttpOnly keeps scripts away from the cookie, Secure keeps it off
        // plain HTTP, SameSite=Lax keeps it off cross-site subrequests.
        let cookie = format!(
            "{SESSION_COOKIE}={id}; Path={cookie_path}; Max-Age={}; HttpOnly; SameSite=Lax{}",
            sessions.max_age().as_secs(),
            if https { "; Secure" } else { "" }
        );
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let h = resp.headers_mut();
        h.insert(
            header::LOCATION,
            HeaderValue::from_str(&location).map_err(|_| {
                AccessError::Forbidden("the link's path cannot be redirected to".into())
            })?,
        );
        h.insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("bug: cookie is ASCII"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The link must not leak to the next site through Referer.
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        return Ok(Verdict::Respond(resp));
    }
    let mut admitted = false;
    for id in cookies(headers, SESSION_COOKIE) {
        if sessions
            .check(id, name, path)
            .await
            .map_err(|e| AccessError::AuthService(e.to_string()))?
        {
            admitted = true;
            break;
        }
    }
    if admitted {
        Ok(Verdict::Admit)
    } else {
        Err(AccessError::Forbidden(format!(
            "backend {name:?} is reached through signed links; open a fresh link (no valid session)"
        )))
    }
}

/// `/client/<name>/` → `/client/<name>`; `/` → ``: the path the backend's paths hang off.
fn base(cookie_path: &str) -> &str {
    cookie_path.strip_suffix('/').unwrap_or(cookie_path)
}

/// Values of the cookie `name` in every `Cookie` field (RFC 6265 §5.4; HTTP/2 may split
/// the header into several fields, RFC 9113 §8.2.3).
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Whether a `Cookie` field may carry the relay's own cookie (its name appears anywhere in
/// it): one scan, for heads that skip [`strip_session_cookie`] when it cannot.
pub fn may_hold_session_cookie(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .windows(SESSION_COOKIE.len())
        .any(|w| w == SESSION_COOKIE.as_bytes())
}

/// Removes the relay's own cookie from the `Cookie` fields and joins what is left into one
/// field (RFC 9113 §8.2.3 allows either form towards HTTP/1.1).
pub fn strip_session_cookie(headers: &mut HeaderMap) {
    if !cookies(headers, SESSION_COOKIE).any(|_| true) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty() && pair.split_once('=').map(|(k, _)| k) != Some(SESSION_COOKIE)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// A response copied from the forward-auth service (its denial or redirect).
pub fn passthrough(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<RelayBody> {
    let mut resp = Response::new(crate::base::body::full(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::auth::{Secret, TokenScope};

    #[test]
    fn token_sources_and_stripping() {
        let store = TokenStore::new(&[
            (
                TokenScope::Name("a".into()),
                Secret("user-token-a-0123456".into()),
            ),
            (TokenScope::Any, Secret("user-token-any-012345".into())),
        ]);
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, "user-token-a-0123456".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer backend-own".parse().unwrap());
        check_token(&store, "a", &mut h).unwrap();
        assert!(h.get(TOKEN_HEADER).is_none());
        assert_eq!(h[header::AUTHORIZATION], "Bearer backend-own");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "bearer user-token-any-012345".parse().unwrap(),
        );
        check_token(&store, "zzz", &mut h).unwrap();
        assert!(h.get(header::AUTHORIZATION).is_none());
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, "user-token-a-0123456".parse().unwrap());
        assert!(matches!(
            check_token(&store, "b", &mut h),
            Err(AccessError::Forbidden(_))
        ));
        assert!(matches!(
            check_token(&store, "b", &mut HeaderMap::new()),
            Err(AccessError::Unauthenticated(_))
        ));
    }

    #[test]
    fn session_cookie_is_removed_and_others_kept() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; relay_session=xyz".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        strip_session_cookie(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "relay_session=xyz".parse().unwrap());
        strip_session_cookie(&mut h);
        assert!(h.get(header::COOKIE).is_none());
    }
}

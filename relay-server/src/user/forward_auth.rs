//! `forward-auth` access: an external service decides, following the convention of nginx
//! `auth_request` and Traefik ForwardAuth, so oauth2-proxy or any OIDC gateway can guard
//! backends.
//!
//! For every user request the relay sends `GET <url>` with the user's credentials and client
//! headers ([`ASKED_HEADERS`]) plus `X-Forwarded-Method`, `-Proto`, `-Host`, `-Uri` and
//! `-For`, all set by the relay from what it routed on: the host is the one the request was
//! routed by (the `:authority`, an absolute-form target's authority, or `Host`), never a
//! header the user chose, and the user's own forwarding headers (`Forwarded`,
//! `X-Forwarded-*`, `X-Real-IP`, `X-Original-*`) never reach the service, so a user cannot
//! make the service judge another host or path than the one that will be served. A 2xx admits the request and
//! the configured response headers (e.g. `X-Auth-Request-User`) are copied onto it,
//! replacing whatever the user sent under those names. A 3xx, 401 or 403 is passed to the
//! user as it is (a sign-in redirect or a challenge). Anything else, or no answer within the
//! timeout, is a 502: the relay fails closed.

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use relay_common::headers::strip_hop_by_hop;

use crate::base::outbound::{self, Outbound};
use crate::user::access::{passthrough, AccessError, Verdict};

/// Largest denial body copied to the user.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// Settings of the forward-auth check.
#[derive(Clone, Debug)]
pub struct ForwardAuthConfig {
    /// The authorization endpoint (`http://` or `https://`, system roots).
    pub url: Uri,
    /// Response headers of a 2xx answer copied onto the request to the backend.
    pub copy_headers: Vec<HeaderName>,
    /// How long the service may take.
    pub timeout: Duration,
}

/// The forward-auth client.
pub struct ForwardAuth {
    cfg: ForwardAuthConfig,
    client: Outbound,
}

/// The user's headers the authorization service sees: credentials, and what describes the
/// client software (what oauth2-proxy and similar gateways read). Nothing else passes.
pub const ASKED_HEADERS: &[&str] = &[
    "cookie",
    "authorization",
    "user-agent",
    "accept",
    "accept-language",
    "origin",
    "referer",
    "x-requested-with",
];

/// What the check needs to know about the user request.
pub struct Original<'a> {
    /// Request method.
    pub method: &'a Method,
    /// The target as the user sent it (path and query).
    pub uri: &'a str,
    /// The host the request was routed by.
    pub host: Option<&'a str>,
    /// The user's address.
    pub peer: SocketAddr,
    /// Whether the user came over TLS.
    pub https: bool,
    /// Whether `peer` is a trusted proxy, whose `X-Forwarded-Proto` and `-For` describe the
    /// client behind it.
    pub trusted: bool,
}

impl ForwardAuth {
    /// A client for `cfg`.
    pub fn new(cfg: ForwardAuthConfig) -> Self {
        ForwardAuth {
            client: outbound::client(cfg.timeout),
            cfg,
        }
    }

    /// Asks the service about one request; on admission, `headers` (the request to the
    /// backend) gets the copied headers.
    pub async fn check(
        &self,
        orig: &Original<'_>,
        headers: &mut HeaderMap,
    ) -> Result<Verdict, AccessError> {
        let mut ask = Request::new(Empty::new());
        *ask.uri_mut() = self.cfg.url.clone();
        *ask.headers_mut() = asked_headers(orig, headers);
        let resp = tokio::time::timeout(self.cfg.timeout, self.client.request(ask))
            .await
            .map_err(|_| {
                AccessError::AuthService(format!("no answer within {:?}", self.cfg.timeout))
            })?
            .map_err(|e| AccessError::AuthService(format!("{e}")))?;
        let status = resp.status();
        if status.is_success() {
            for name in &self.cfg.copy_headers {
                headers.remove(name);
                for v in resp.headers().get_all(name) {
                    headers.append(name.clone(), v.clone());
                }
            }
            return Ok(Verdict::Admit);
        }
        if status.is_redirection() || status.as_u16() == 401 || status.as_u16() == 403 {
            let (parts, body) = resp.into_parts();
            let body = tokio::time::timeout(
                self.cfg.timeout,
                Limited::new(body, MAX_DENIAL_BODY).collect(),
            )
            .await
            .map_err(|_| AccessError::AuthService("its denial body did not arrive".into()))?
            .map_err(|e| AccessError::AuthService(format!("reading its denial: {e}")))?
            .to_bytes();
            let mut h = parts.headers;
            strip_hop_by_hop(&mut h, false);
            h.remove(header::CONTENT_LENGTH);
            return Ok(Verdict::Respond(passthrough(status, h, body)));
        }
        Err(AccessError::AuthService(format!("it answered {status}")))
    }
}

/// The check request's headers: the whitelisted user headers and the relay's own view of
/// the request.
fn asked_headers(orig: &Original<'_>, user: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for &name in ASKED_HEADERS {
        for v in user.get_all(name) {
            h.append(HeaderName::from_static(name), v.clone());
        }
    }
    let from_proxy = |name: &str| {
        orig.trusted
            .then(|| user.get(name)?.to_str().ok())
            .flatten()
    };
    set(&mut h, "x-forwarded-method", orig.method.as_str());
    let proto =
        from_proxy("x-forwarded-proto").unwrap_or(if orig.https { "https" } else { "http" });
    set(&mut h, "x-forwarded-proto", proto);
    if let Some(host) = orig.host {
        set(&mut h, "x-forwarded-host", host);
    }
    set(&mut h, "x-forwarded-uri", orig.uri);
    let peer = orig.peer.ip().to_string();
    let chain = match from_proxy("x-forwarded-for") {
        Some(before) => format!("{before}, {peer}"),
        None => peer,
    };
    set(&mut h, "x-forwarded-for", &chain);
    h
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

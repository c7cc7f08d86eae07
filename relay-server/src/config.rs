//! Server settings as a plain struct; the binary fills it from flags and env vars.

use std::time::Duration;

pub use crate::base::auth::{Secret, TokenScope};
use crate::defaults;
use crate::user::access::{AccessMode, AccessPolicy};
use crate::user::forward_auth::ForwardAuthConfig;

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let net: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Cidr { net, len })
    }
}

impl Cidr {
    /// Whether `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        let (a, b, bits) = match (self.net, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => {
                (u32::from(n) as u128, u32::from(i) as u128, 32)
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => {
                (u128::from(n), u128::from(i), 128)
            }
            _ => return false,
        };
        let shift = bits - u32::from(self.len);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// Everything `run` needs. Defaults are the documented limits.
#[derive(Clone, Debug)]
pub struct Config {
    /// Agent tokens and the names each may serve. Empty means "refuse every agent".
    pub agent_tokens: Vec<(TokenScope, Secret)>,
    /// How long a user request waits for a connected agent to pick it up (then 503).
    pub pickup_timeout: Duration,
    /// How long a user request waits for its response head after arrival (then 504).
    pub response_timeout: Duration,
    /// Same for upgrade requests: services behind them often start on first use (Jupyter,
    /// VS Code) and answer 101 only once ready.
    pub upgrade_response_timeout: Duration,
    /// A switched connection without a byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// How long a long poll is held before an empty answer (204). Must stay below the read
    /// timeout of every proxy between agent and server (nginx: 60 s).
    pub poll_timeout: Duration,
    /// How long an agent may go without a parked poll before it is declared gone and its
    /// in-flight requests fail.
    pub agent_grace: Duration,
    /// Longest an upload exchange (`/server/requeststream`) stays open without user bytes
    /// before it ends with CONTINUE, so proxies never see a silent response.
    pub exchange_idle: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Requests waiting for pickup per backend name (then 503).
    pub max_parked_per_name: usize,
    /// Requests waiting for pickup across all names (then 503).
    pub max_parked_total: usize,
    /// Time allowed for a request head to arrive (slowloris guard: from a connection's start or
    /// the end of its last response; see `base::activity::Activity`).
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request head (hyper's read buffer); larger heads get 431.
    pub max_head_bytes: usize,
    /// Most header fields in a request; more get 431.
    pub max_headers: usize,
    /// Longest request target; longer ones get 414.
    pub max_uri_bytes: usize,
    /// Largest request body (413 beyond); `None` is unlimited.
    pub max_request_body: Option<u64>,
    /// Longest wait for the next request body byte while the relay waits for it (408).
    pub upload_inactivity_timeout: Duration,
    /// Relayed bytes held in memory across all requests (then exchanges wait); a name may
    /// hold a quarter, a client address an eighth.
    pub max_buffered_bytes: usize,
    /// A user who takes none of the response bytes waiting for it for this long has the
    /// response (or tunnel) failed, and what it held of the budget freed.
    pub user_write_timeout: Duration,
    /// Open connections across all listeners (more are closed at accept).
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Users' tunnels open (or being opened) from one client address; more get 503.
    pub max_tunnels_per_ip: usize,
    /// Shard threads (`shards.rs`; one per core by default): 0 serves everything on the
    /// runtime the server runs on.
    pub shards: usize,
    /// How long a shard's runtime spins after its work before it parks (`--spin`; zero:
    /// never): relay_config_file::spin.
    pub spin: Duration,
    /// An HTTP/2 connection without an open stream for this long is closed (GOAWAY).
    /// HTTP/1.1 connections idle between requests are bound by `header_read_timeout`.
    pub idle_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are kept and appended to; from anyone else they
    /// are replaced, so a user cannot make the backend believe a forged client address.
    pub trusted_proxies: Vec<Cidr>,
    /// `Retry-After` seconds on 503 answers.
    pub retry_after_secs: u64,
    /// Certificate chain and private key (PEM) to terminate TLS with; reloaded on change.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// CA (PEM) whose client certificates authenticate agents instead of tokens (TLS only).
    pub agent_client_ca: Option<std::path::PathBuf>,
    /// Who may reach which backend.
    pub access: AccessPolicy,
    /// User tokens of `token` access and the names each admits to.
    pub user_tokens: Vec<(TokenScope, Secret)>,
    /// HMAC key of signed links; a random per-process key when `None`.
    pub link_secret: Option<Secret>,
    /// A signed-link session unused for this long ends.
    pub session_idle: Duration,
    /// A signed-link session ends this long after the link was used, used or not.
    pub session_max_age: Duration,
    /// Most live signed-link sessions (then 403 until some expire).
    pub max_sessions: usize,
    /// The authorization service of `forward-auth` access.
    pub forward_auth: Option<ForwardAuthConfig>,
    /// The agents' authorization service (`--agent-forward-auth-url`), asked when an agent
    /// presents no configured token.
    pub agent_forward_auth: Option<crate::agent::forward_auth::AgentForwardAuthConfig>,
    /// `Host: <name>.<public_domain>` reaches backend `<name>` with the path untouched.
    pub public_domain: Option<String>,
    /// Path prefix the relay is served under (`/apis/core.kubernetes-relay`): agent
    /// endpoints and `/client/` live below it (see [`parse_base_path`]).
    pub base_path: Option<String>,
    /// Cluster mode (several replicas coordinated through Redis); `None` is one process.
    pub cluster: Option<crate::cluster::directory::ClusterConfig>,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A mode is used without what it needs.
    #[error("access mode {0} is used but {1}")]
    Incomplete(AccessMode, &'static str),
    /// `open` access on an address others can reach.
    #[error(
        "user access is open but the server listens on {0}, which is not loopback: \
         set --access token|signed-link|forward-auth, or pass --allow-open to serve every \
         backend to anyone who can reach this address"
    )]
    OpenOnPublicAddress(std::net::SocketAddr),
    /// Cluster settings that cannot work.
    #[error("{0}")]
    Cluster(String),
}

impl Config {
    /// Checks that every access mode in use has what it needs, and that `open` access is
    /// served beyond loopback only when `allow_open` says so (then it returns a warning).
    pub fn validate(
        &self,
        listen: std::net::SocketAddr,
        allow_open: bool,
    ) -> Result<Option<String>, ConfigError> {
        let mut open = false;
        for mode in self.access.modes() {
            match mode {
                AccessMode::Token if self.user_tokens.is_empty() => {
                    return Err(ConfigError::Incomplete(
                        mode,
                        "no --user-token is configured",
                    ))
                }
                AccessMode::ForwardAuth if self.forward_auth.is_none() => {
                    return Err(ConfigError::Incomplete(
                        mode,
                        "--forward-auth-url is not set",
                    ))
                }
                AccessMode::SignedLink if self.link_secret.is_none() => {
                    return Err(ConfigError::Incomplete(
                        mode,
                        "no --link-secret-file is set (sign-link needs the same key)",
                    ))
                }
                AccessMode::Open => open = true,
                _ => {}
            }
        }
        if let Some(c) = &self.cluster {
            crate::cluster::directory::Cluster::check(c)
                .map_err(|e| ConfigError::Cluster(e.to_string()))?;
        }
        if open && !listen.ip().is_loopback() {
            if !allow_open {
                return Err(ConfigError::OpenOnPublicAddress(listen));
            }
            return Ok(Some(format!(
                "user access is open on {listen}: anyone who can reach it reaches every open backend"
            )));
        }
        Ok(None)
    }
}

impl Config {
    /// The settings of `next` that differ from these and take effect only after a restart
    /// (a reload applies tokens, access rules, trusted proxies, forward auth and the link
    /// key; limits, timeouts, listeners' TLS files and cluster settings are fixed at start).
    pub fn needs_restart(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! compare {
            ($($field:ident),* $(,)?) => {
                $(
                    if format!("{:?}", self.$field) != format!("{:?}", next.$field) {
                        changed.push(stringify!($field));
                    }
                )*
            };
        }
        compare!(
            pickup_timeout,
            response_timeout,
            upgrade_response_timeout,
            tunnel_idle_timeout,
            poll_timeout,
            agent_grace,
            drain_timeout,
            max_parked_per_name,
            max_parked_total,
            header_read_timeout,
            max_head_bytes,
            max_headers,
            max_uri_bytes,
            max_request_body,
            upload_inactivity_timeout,
            max_buffered_bytes,
            user_write_timeout,
            max_connections,
            max_connections_per_ip,
            max_tunnels_per_ip,
            shards,
            spin,
            idle_timeout,
            tls,
            agent_client_ca,
            session_idle,
            session_max_age,
            max_sessions,
            public_domain,
            base_path,
        );
        // The advertised URL is derived from the bound listener when not configured, so
        // only what the operator sets is compared.
        let cluster = |c: &Config| {
            c.cluster
                .as_ref()
                .map(|c| (c.redis_url.clone(), c.lease, c.key_prefix.clone()))
        };
        if cluster(self) != cluster(next) {
            changed.push("cluster");
        }
        changed
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_tokens: Vec::new(),
            pickup_timeout: defaults::duration(defaults::PICKUP_TIMEOUT),
            response_timeout: defaults::duration(defaults::RESPONSE_TIMEOUT),
            upgrade_response_timeout: defaults::duration(defaults::UPGRADE_RESPONSE_TIMEOUT),
            tunnel_idle_timeout: defaults::duration(defaults::TUNNEL_IDLE_TIMEOUT),
            poll_timeout: defaults::duration(defaults::POLL_TIMEOUT),
            agent_grace: defaults::duration(defaults::AGENT_GRACE),
            exchange_idle: Duration::from_secs(20),
            drain_timeout: defaults::duration(defaults::DRAIN_TIMEOUT),
            max_parked_per_name: defaults::MAX_PARKED_PER_NAME,
            max_parked_total: defaults::MAX_PARKED,
            header_read_timeout: defaults::duration(defaults::HEADER_READ_TIMEOUT),
            max_head_bytes: defaults::MAX_HEAD_BYTES,
            max_headers: defaults::MAX_HEADERS,
            max_uri_bytes: defaults::MAX_URI_BYTES,
            retry_after_secs: 2,
            max_request_body: None,
            trusted_proxies: Vec::new(),
            upload_inactivity_timeout: defaults::duration(defaults::UPLOAD_INACTIVITY_TIMEOUT),
            max_buffered_bytes: defaults::MAX_BUFFERED_BYTES,
            user_write_timeout: defaults::duration(defaults::USER_WRITE_TIMEOUT),
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_ip: defaults::MAX_CONNECTIONS_PER_IP,
            max_tunnels_per_ip: defaults::MAX_TUNNELS_PER_IP,
            shards: defaults::shards(),
            spin: defaults::duration(defaults::SPIN),
            idle_timeout: defaults::duration(defaults::IDLE_TIMEOUT),
            tls: None,
            agent_client_ca: None,
            access: AccessPolicy::default(),
            user_tokens: Vec::new(),
            link_secret: None,
            session_idle: defaults::duration(defaults::SESSION_IDLE),
            session_max_age: defaults::duration(defaults::SESSION_MAX_AGE),
            max_sessions: 100_000,
            forward_auth: None,
            public_domain: None,
            agent_forward_auth: None,
            base_path: None,
            cluster: None,
        }
    }
}

/// Checks a `--base-path`: `/` and segments, no trailing slash (one is taken off), no
/// query, fragment, dot-segment or empty segment. `/` alone means no prefix.
pub fn parse_base_path(s: &str) -> Result<Option<String>, String> {
    let p = s.trim_end_matches('/');
    if p.is_empty() {
        return Ok(None);
    }
    let segments_ok = p.strip_prefix('/').is_some_and(|rest| {
        rest.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@".contains(&b))
        })
    });
    if !segments_ok {
        return Err(format!(
            "base path {s:?} must look like /a/b: a slash, then non-empty segments of URL path \
             characters (no query, fragment or dot-segments)"
        ));
    }
    Ok(Some(p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths() {
        assert_eq!(
            parse_base_path("/apis/core.kubernetes-relay/")
                .unwrap()
                .as_deref(),
            Some("/apis/core.kubernetes-relay")
        );
        assert_eq!(parse_base_path("/").unwrap(), None);
        for bad in ["apis", "/a//b", "/a/../b", "/a?x", "/a#b", "/a b"] {
            assert!(parse_base_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}

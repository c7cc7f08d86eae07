//! From parsed flags to the server's [`Config`]: tokens (flags and files), secrets, access
//! rules, cluster settings and their cross-checks; `sign-link` and `check-config`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use relay_server::cluster::directory::{ClusterConfig, ClusterTls};
use relay_server::user::access::AccessPolicy;
use relay_server::user::forward_auth::ForwardAuthConfig;
use relay_server::{Config, Secret, TokenScope};

use crate::cli::{parse, Cli, SignLink};

fn parse_token(kind: &str, s: &str) -> anyhow::Result<(TokenScope, Secret)> {
    let (name, token) = s
        .split_once('=')
        .with_context(|| format!("{kind} token must be NAME=TOKEN"))?;
    let name = name.trim();
    let token = token.trim();
    if token.len() < 16 {
        bail!("{kind} token for {name:?} is shorter than 16 characters");
    }
    let scope = if name == "*" {
        TokenScope::Any
    } else if relay_common::name::is_valid_name(name) {
        TokenScope::Name(name.to_owned())
    } else {
        bail!("invalid backend name {name:?} in {kind} token");
    };
    Ok((scope, Secret(token.to_owned())))
}

/// Tokens from the command line and a token file (one NAME=TOKEN per line).
fn tokens(
    kind: &str,
    args: &[String],
    file: Option<&PathBuf>,
) -> anyhow::Result<Vec<(TokenScope, Secret)>> {
    let mut out = Vec::new();
    for t in args {
        out.push(parse_token(kind, t)?);
    }
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(
                parse_token(kind, line).with_context(|| format!("{}:{}", path.display(), n + 1))?,
            );
        }
    }
    Ok(out)
}

fn read_link_secret(path: &PathBuf) -> anyhow::Result<Secret> {
    read_secret("link", path)
}

/// A secret of at least 32 characters from a file (surrounding whitespace trimmed).
fn read_secret(what: &str, path: &PathBuf) -> anyhow::Result<Secret> {
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned();
    if key.len() < 32 {
        bail!(
            "the {what} secret in {} is shorter than 32 characters",
            path.display()
        );
    }
    Ok(Secret(key))
}

/// `sign-link`: a signed link for `args.name`; what the flags leave out comes from the
/// server's own settings (`--config`, environment), so the same file serves both.
pub fn sign_link(args: SignLink, server: &Cli) -> anyhow::Result<()> {
    if !relay_common::name::is_valid_name(&args.name) {
        bail!("invalid backend name {:?}", args.name);
    }
    if !args.path.starts_with('/') || args.path.contains(['?', '#', '\n']) {
        bail!("--path must be a path starting with / (no query)");
    }
    let key_file = args
        .link_secret_file
        .as_ref()
        .or(server.link_secret_file.as_ref())
        .context("no link key: give --link-secret-file, or link_secret_file in --config")?;
    let key = read_link_secret(key_file)?;
    let query = relay_server::user::link::sign(&key, &args.name, &args.path, args.ttl);
    let base_url = args
        .base_url
        .clone()
        .or_else(|| server.public_url.clone())
        .unwrap_or_else(|| http::Uri::from_static("http://127.0.0.1:8080"));
    let scheme = base_url.scheme_str().unwrap_or("http");
    let authority = base_url.authority().context("--base-url needs a host")?;
    let public_domain = args
        .public_domain
        .as_ref()
        .or(server.public_domain.as_ref());
    let url = match public_domain {
        Some(domain) => {
            let port = authority
                .port()
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            format!(
                "{scheme}://{}.{domain}{port}{}?{query}",
                args.name, args.path
            )
        }
        None => {
            let base = base_url.path().trim_end_matches('/');
            format!(
                "{scheme}://{authority}{base}/client/{}{}?{query}",
                args.name, args.path
            )
        }
    };
    println!("{url}");
    Ok(())
}

pub fn tokens_of_users(cli: &Cli) -> anyhow::Result<Vec<(TokenScope, Secret)>> {
    tokens("user", &cli.user_tokens, cli.user_token_file.as_ref())
}

/// Builds the settings from parsed flags (no token generated, nothing bound).
pub fn build_config(cli: &Cli) -> anyhow::Result<Config> {
    let tokens = tokens("agent", &cli.agent_tokens, cli.agent_token_file.as_ref())?;
    let user_tokens = tokens_of_users(cli)?;
    let mut access = AccessPolicy {
        default: cli.access,
        ..AccessPolicy::default()
    };
    for entry in &cli.access_for {
        let (name, mode) = entry
            .split_once('=')
            .context("--access-for takes NAME=MODE")?;
        if !relay_common::name::is_valid_name(name) {
            bail!("invalid backend name {name:?} in --access-for");
        }
        access
            .per_name
            .insert(name.to_owned(), mode.parse().map_err(anyhow::Error::msg)?);
    }
    let link_secret = cli
        .link_secret_file
        .as_ref()
        .map(read_link_secret)
        .transpose()?;
    let forward_auth = cli.forward_auth_url.clone().map(|url| ForwardAuthConfig {
        url,
        copy_headers: cli.forward_auth_headers.clone(),
        timeout: cli.forward_auth_timeout,
    });
    let agent_forward_auth = cli.agent_forward_auth_url.clone().map(|url| {
        relay_server::agent::forward_auth::AgentForwardAuthConfig {
            url,
            names_header: cli.agent_forward_auth_names_header.clone(),
            timeout: cli.forward_auth_timeout,
            cache_for: cli.agent_forward_auth_cache,
        }
    });
    let public_domain = cli
        .public_domain
        .as_deref()
        .map(|d| d.trim_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty());
    // Checked here, not with clap's `requires`: values from a config file are defaults to
    // clap, and defaults never satisfy `requires`.
    let cluster_tls = match (&cli.cluster_tls_cert, &cli.cluster_tls_key) {
        (Some(cert), Some(key)) => Some(ClusterTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: cli.cluster_ca.clone().unwrap_or_else(|| cert.clone()),
        }),
        (None, None) if cli.cluster_ca.is_none() => None,
        (None, None) => bail!("--cluster-ca needs --cluster-tls-cert and --cluster-tls-key"),
        _ => bail!("--cluster-tls-cert and --cluster-tls-key go together"),
    };
    if cluster_tls.is_some() && cli.cluster_redis.is_none() {
        bail!("--cluster-tls-cert needs --cluster-redis");
    }
    let cluster = match (&cli.cluster_redis, &cli.cluster_secret_file) {
        (Some(_), _) if cli.cluster_listen.is_none() => {
            bail!("--cluster-redis needs --cluster-listen (the listener for the other replicas)")
        }
        (Some(_), None) => bail!("--cluster-redis needs --cluster-secret-file"),
        (None, _)
            if cli.cluster_listen.is_some()
                || cli.cluster_secret_file.is_some()
                || cli.advertise_url.is_some() =>
        {
            bail!(
                "--cluster-listen, --cluster-secret-file and --advertise-url need --cluster-redis"
            )
        }
        (Some(url), Some(secret)) => Some(ClusterConfig {
            redis_url: url.clone(),
            // Empty: derived from the cluster listener's address once it is bound.
            advertise_url: cli.advertise_url.clone().unwrap_or_default(),
            secret: read_secret("cluster", secret)?,
            lease: cli.cluster_lease,
            key_prefix: cli.cluster_key_prefix.clone(),
            tls: cluster_tls,
        }),
        _ => None,
    };
    let cfg = Config {
        agent_tokens: tokens,
        pickup_timeout: cli.pickup_timeout,
        response_timeout: cli.response_timeout,
        upgrade_response_timeout: cli.upgrade_response_timeout,
        tunnel_idle_timeout: cli.tunnel_idle_timeout,
        poll_timeout: cli.poll_timeout,
        agent_grace: cli.agent_grace,
        drain_timeout: cli.drain_timeout,
        max_parked_per_name: cli.max_parked_per_name,
        max_parked_total: cli.max_parked,
        tls: cli.tls_cert.clone().zip(cli.tls_key.clone()),
        agent_client_ca: cli.agent_client_ca.clone(),
        max_head_bytes: cli.max_head_bytes,
        max_headers: cli.max_headers,
        max_uri_bytes: cli.max_uri_bytes,
        header_read_timeout: cli.header_read_timeout,
        idle_timeout: cli.idle_timeout,
        max_request_body: cli.max_request_body,
        upload_inactivity_timeout: cli.upload_inactivity_timeout,
        user_write_timeout: cli.user_write_timeout,
        max_connections: cli.max_connections,
        max_buffered_bytes: cli.max_buffered_bytes,
        trusted_proxies: cli.trusted_proxies.clone(),
        max_connections_per_ip: cli.max_connections_per_ip,
        max_tunnels_per_ip: cli.max_tunnels_per_ip,
        shards: cli.shards,
        spin: cli.spin,
        access,
        user_tokens,
        link_secret,
        session_idle: cli.session_idle,
        session_max_age: cli.session_max_age,
        forward_auth,
        public_domain,
        base_path: cli.base_path.clone().filter(|p| !p.is_empty()),
        agent_forward_auth,
        cluster,
        ..Config::default()
    };
    Ok(cfg)
}

/// `relay-server check-config FILE`: the file as the server would read it (with the current
/// environment), validated like at start.
pub fn check_config(file: &std::path::Path) -> anyhow::Result<String> {
    let args: Vec<OsString> = vec!["relay-server".into(), "--config".into(), file.into()];
    let cli = parse(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = build_config(&cli)?;
    let warning = cfg.validate(cli.listen, cli.allow_open)?;
    let names = cfg.access.per_name.len();
    let mut out = format!(
        "{}: ok (listen {}, {} agent token(s), {} user token(s), access {} with {names} override(s))",
        file.display(),
        cli.listen,
        cfg.agent_tokens.len(),
        cfg.user_tokens.len(),
        cfg.access.default,
    );
    if let Some(w) = warning {
        out.push_str(&format!("\nwarning: {w}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults and `Config::default` come from one place; this catches a
    /// setting that `build_config` forgets to carry over.
    #[test]
    fn no_flags_give_the_library_defaults() {
        let cli = parse(&["relay-server".into()]).expect("no flags parse");
        let built = build_config(&cli).expect("defaults build");
        assert_eq!(format!("{built:?}"), format!("{:?}", Config::default()));
        assert_eq!(
            cli.listen.to_string(),
            relay_server::defaults::LISTEN,
            "the zero-config address"
        );
    }
}

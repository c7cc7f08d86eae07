//! The backend side of the agent: turning a relayed request head into a backend request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop};
use relay_common::message::{Fields, RequestHead};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::Config;
use crate::error::AgentError;
use crate::tls;

mod conn;
mod h1;
mod h2c;
mod pool;
mod response;

pub use conn::PooledBody;
use h1::Framing;
pub use h1::H1Error;
use h2c::{H2Body, H2c, H2cError};
use pool::{Pool, PoolError, Written};

/// Body type of backend requests.
pub type BackendBody = UnsyncBoxBody<bytes::Bytes, std::io::Error>;

/// The backend and how to reach it.
#[derive(Clone)]
pub struct Backend {
    client: Client<tls::Connector, BackendBody>,
    /// Plain HTTP/1.1 backends: connections driven by the requests themselves (`pool`).
    pool: Option<Arc<Pool>>,
    /// Plain backends that speak HTTP/2 (`--backend-http2`): one connection of the `h2`
    /// crate's (`h2c`).
    h2c: Option<Arc<H2c>>,
    /// `scheme://authority` of the backend.
    origin: String,
    /// Path prefix from `--backend-url`, without a trailing slash.
    base_path: String,
    authority: HeaderValue,
    rewrite_host: bool,
}

/// Why a backend request could not even be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

impl Backend {
    /// A backend client for `cfg.backend_url`.
    pub fn new(cfg: &Config) -> Result<Self, AgentError> {
        let url = &cfg.backend_url;
        let scheme = url.scheme_str().unwrap_or("");
        if scheme != "http" && scheme != "https" {
            return Err(AgentError::Config(format!(
                "--backend-url must be http:// or https://, not {url}"
            )));
        }
        let authority = url
            .authority()
            .ok_or_else(|| AgentError::Config(format!("--backend-url {url} has no host")))?;
        let connector = tls::connector(
            cfg.backend_ca_file.as_deref(),
            cfg.backend_http2,
            cfg.tcp_keepalive,
        )?;
        let mut b = Client::builder(TokioExecutor::new());
        // A burst opens as many backend connections as requests in flight (up to
        // --max-in-flight); keeping them all idle for 30 s afterwards held thousands of
        // descriptors (1 558 after the bench's burst of 10 000), so only so many stay.
        b.pool_idle_timeout(cfg.backend_idle_timeout)
            .pool_max_idle_per_host(cfg.backend_idle_connections);
        if cfg.backend_http2 {
            b.http2_only(true);
        }
        let mut base_path = url.path().to_owned();
        while base_path.ends_with('/') {
            base_path.pop();
        }
        // A plain-HTTP backend's `host:port` (brackets off an IPv6 host), for the pool or
        // the h2c client, whichever `--backend-http2` picks.
        let plain_addr = || {
            let port = authority.port_u16().unwrap_or(80);
            format!("{}:{port}", authority.host().trim_matches(['[', ']']))
        };
        let pool = (scheme == "http" && !cfg.backend_http2).then(|| {
            Pool::new(
                plain_addr(),
                cfg.backend_idle_connections,
                cfg.backend_idle_timeout,
                cfg.tcp_keepalive,
            )
        });
        let h2c = (scheme == "http" && cfg.backend_http2)
            .then(|| Arc::new(H2c::new(plain_addr(), cfg.tcp_keepalive)));
        Ok(Backend {
            client: b.build(connector),
            pool,
            h2c,
            origin: format!("{scheme}://{authority}"),
            base_path,
            authority: HeaderValue::from_str(authority.as_str())
                .map_err(|_| AgentError::Config("bad backend authority".into()))?,
            rewrite_host: cfg.rewrite_host,
        })
    }

    /// Sweeps idle backend connections past their time (see [`Pool::sweep`]) in a task
    /// that ends when the returned guard drops. Backends on hyper-util's client need none
    /// (its pool does this).
    pub fn sweeping(&self) -> Option<DropGuard> {
        let pool = self.pool.clone()?;
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        tokio::spawn(async move {
            tokio::select! {
                _ = pool.sweep() => {}
                _ = stop.cancelled() => {}
            }
        });
        Some(guard)
    }

    /// The backend request for `head` with `body`. A plain request to a plain-HTTP/1.1
    /// backend whose fields are still encoded has its head written at once, without a map
    /// (most requests, `h1::put_relayed_head`); the others are built as requests.
    pub fn prepare(
        &self,
        head: &mut RequestHead,
        body: BackendBody,
    ) -> Result<Outgoing, BuildError> {
        if let (Some(_), Fields::Encoded(block), None) = (&self.pool, &head.headers, &head.upgrade)
        {
            // Traces on: the map path hands the span on in `traceparent`.
            if !relay_config_file::telemetry::enabled() {
                let framing = Framing::of(&body);
                let mut buf = BytesMut::new();
                let host = (
                    self.rewrite_host.then_some(&self.authority),
                    &self.authority,
                );
                let line = (
                    head.method.as_str(),
                    self.base_path.as_str(),
                    head.target.as_str(),
                );
                if h1::put_relayed_head(&mut buf, line, block, host, framing) {
                    let method = Method::from_bytes(head.method.as_bytes())
                        .map_err(|_| BuildError(format!("invalid method {:?}", head.method)))?;
                    return Ok(Outgoing::Written(Written {
                        head: buf.freeze(),
                        method,
                        body,
                        framing,
                    }));
                }
            }
        }
        self.build(head, body).map(Outgoing::Request)
    }

    /// The backend request for `head` with `body`.
    pub fn build(
        &self,
        head: &mut RequestHead,
        body: BackendBody,
    ) -> Result<Request<BackendBody>, BuildError> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| BuildError(format!("invalid method {:?}", head.method)))?;
        // A request for a pooled connection gets its origin-form target at once (RFC 9112
        // §3.2.1), parsed once; hyper-util's client wants the absolute form and derives the
        // origin form itself.
        let pooled = self.pool.is_some() && head.upgrade.is_none() && head.target.starts_with('/');
        let uri = match pooled {
            true if self.base_path.is_empty() => Uri::try_from(head.target.clone()),
            true => Uri::try_from(format!("{}{}", self.base_path, head.target)),
            false => Uri::try_from(format!("{}{}{}", self.origin, self.base_path, head.target)),
        }
        .map_err(|e| BuildError(format!("invalid target {:?}: {e}", head.target)))?;
        let mut headers = head
            .headers
            .take_map()
            .map_err(|e| BuildError(e.to_string()))?;
        // Defence in depth: the server already stripped these (RFC 9110 §7.6.1).
        strip_hop_by_hop(&mut headers, true);
        if let Some(proto) = &head.upgrade {
            set_upgrade_headers(&mut headers, proto);
        }
        if self.rewrite_host {
            headers.insert(header::HOST, self.authority.clone());
        }
        // Traces on: the backend's parent span is this agent's request span.
        relay_config_file::telemetry::hand_on(&tracing::Span::current(), &mut headers);
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok(req)
    }

    /// Sends a request to the backend: on a pooled connection of its own when the backend
    /// is plain HTTP/1.1 and the request is no upgrade (those need hyper's upgradeable
    /// connections), else through hyper-util's client.
    pub async fn send(&self, out: Outgoing) -> Result<Answer, BackendError> {
        let mut req = match (out, &self.pool) {
            (Outgoing::Request(req), _) => req,
            (Outgoing::Written(w), Some(pool)) => return Ok(pool.send_written(w).await?.into()),
            (Outgoing::Written(_), None) => unreachable!("bug: a written head without a pool"),
        };
        // Upgrades need hyper's upgradeable connections.
        let plain = !req.headers().contains_key(header::UPGRADE);
        if let Some(h2c) = self.h2c.as_ref().filter(|_| plain) {
            let resp = h2c.send(req).await?;
            return Ok(Answer::Response(resp.map(BackendResponse::H2)));
        }
        match &self.pool {
            Some(pool) if plain => {
                // RFC 9112 §3.2: a request to an origin carries the origin-form target and
                // Host (hyper-util's client does the same for HTTP/1.1; the user's Host is
                // kept unless --rewrite-host replaced it).
                if req.uri().scheme().is_some() {
                    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    *req.uri_mut() =
                        Uri::try_from(target).map_err(|e| BackendError::Target(e.to_string()))?;
                }
                req.headers_mut()
                    .entry(header::HOST)
                    .or_insert_with(|| self.authority.clone());
                Ok(pool.send(req).await?.into())
            }
            _ => {
                // Boxed: upgrades and unpooled backends only, and hyper-util's future
                // would otherwise size every request's.
                let resp = Box::pin(self.client.request(req)).await?;
                Ok(Answer::Response(resp.map(BackendResponse::Shared)))
            }
        }
    }
}

/// A backend's answer.
pub enum Answer {
    /// A response with every field in a map (hyper-util's client, which also carries an
    /// upgrade in it, or a pooled head that needed the map: `HeadFields::Map`).
    Response(http::Response<BackendResponse>),
    /// A pooled connection's head, its fields already in the session's layout with the
    /// hop-by-hop ones dropped (`HeadFields::Encoded`).
    Encoded {
        /// The final status.
        status: http::StatusCode,
        /// The fields (`Fields::Encoded`).
        block: Fields,
        /// The announced length, taken out of the fields.
        content_length: Option<u64>,
        /// The body.
        body: BackendResponse,
    },
}

impl From<pool::Answered> for Answer {
    fn from(a: pool::Answered) -> Self {
        let body = BackendResponse::Pooled(a.body);
        match a.fields {
            response::HeadFields::Encoded {
                block,
                content_length,
            } => Answer::Encoded {
                status: a.status,
                block,
                content_length,
                body,
            },
            response::HeadFields::Map(map) => {
                let mut resp = http::Response::new(body);
                *resp.status_mut() = a.status;
                *resp.headers_mut() = map;
                Answer::Response(resp)
            }
        }
    }
}

/// A backend request ready to go.
pub enum Outgoing {
    /// Its head already written for a pooled HTTP/1.1 connection.
    Written(Written),
    /// A request for the pool or hyper-util's client.
    Request(Request<BackendBody>),
}

/// Why a backend request failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// On a pooled connection.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Through hyper-util's client.
    #[error(transparent)]
    Shared(#[from] hyper_util::client::legacy::Error),
    /// On the HTTP/2 connection.
    #[error(transparent)]
    H2c(#[from] H2cError),
    /// The target is not a valid origin-form target.
    #[error("invalid target: {0}")]
    Target(String),
}

/// A backend response's body, from whichever client carried the request.
pub enum BackendResponse {
    /// Read from a pooled connection (reading drives it).
    Pooled(PooledBody),
    /// From hyper-util's client.
    Shared(Incoming),
    /// From the HTTP/2 connection.
    H2(H2Body),
}

impl BackendResponse {
    /// The body for a response that streams: a pooled connection gets a task of its own
    /// ([`PooledBody::detach`]).
    pub fn streamed(self) -> Self {
        match self {
            BackendResponse::Pooled(b) => BackendResponse::Pooled(b.detach()),
            shared => shared,
        }
    }
}

/// Why a backend response's body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// On a pooled connection.
    #[error(transparent)]
    Pooled(#[from] H1Error),
    /// Through hyper-util's client.
    #[error(transparent)]
    Shared(#[from] hyper::Error),
    /// On the HTTP/2 connection.
    #[error(transparent)]
    H2(#[from] h2::Error),
}

impl Body for BackendResponse {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            BackendResponse::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            BackendResponse::Shared(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            BackendResponse::H2(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BackendResponse::Pooled(b) => b.is_end_stream(),
            BackendResponse::Shared(b) => b.is_end_stream(),
            BackendResponse::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BackendResponse::Pooled(b) => b.size_hint(),
            BackendResponse::Shared(b) => b.size_hint(),
            BackendResponse::H2(b) => b.size_hint(),
        }
    }
}

/// Boxes a body for the backend client.
pub fn boxed<B>(b: B) -> BackendBody
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = std::io::Error> + Send + 'static,
{
    b.boxed_unsync()
}

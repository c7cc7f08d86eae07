//! The backend side of the agent: turning a relayed request head into a backend request.

use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop};
use relay_common::message::RequestHead;

use crate::config::Config;
use crate::error::AgentError;
use crate::tls;

/// Body type of backend requests.
pub type BackendBody = UnsyncBoxBody<bytes::Bytes, std::io::Error>;

/// The backend and how to reach it.
#[derive(Clone)]
pub struct Backend {
    client: Client<tls::Connector, BackendBody>,
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
        let connector = tls::connector(cfg.backend_ca_file.as_deref(), cfg.backend_http2)?;
        let mut b = Client::builder(TokioExecutor::new());
        // A burst opens as many backend connections as requests in flight (up to
        // --max-in-flight); keeping them all idle for 30 s afterwards held thousands of
        // descriptors (1 558 after the bench's burst of 10 000), so only so many stay.
        b.pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.backend_idle_connections);
        if cfg.backend_http2 {
            b.http2_only(true);
        }
        let mut base_path = url.path().to_owned();
        while base_path.ends_with('/') {
            base_path.pop();
        }
        Ok(Backend {
            client: b.build(connector),
            origin: format!("{scheme}://{authority}"),
            base_path,
            authority: HeaderValue::from_str(authority.as_str())
                .map_err(|_| AgentError::Config("bad backend authority".into()))?,
            rewrite_host: cfg.rewrite_host,
        })
    }

    /// The backend request for `head` with `body`.
    pub fn build(
        &self,
        head: &mut RequestHead,
        body: BackendBody,
    ) -> Result<Request<BackendBody>, BuildError> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| BuildError(format!("invalid method {:?}", head.method)))?;
        let uri: Uri = format!("{}{}{}", self.origin, self.base_path, head.target)
            .parse()
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

    /// Sends a request to the backend.
    pub async fn send(
        &self,
        req: Request<BackendBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }
}

/// Boxes a body for the backend client.
pub fn boxed<B>(b: B) -> BackendBody
where
    B: hyper::body::Body<Data = bytes::Bytes, Error = std::io::Error> + Send + 'static,
{
    b.boxed_unsync()
}

//! Protocol v1alpha1: the Go `http-relay-client` of Google Cloud Robotics, served unchanged
//! on the same endpoints as this project's agents. A call without `X-Relay-Protocol` (and
//! without `X-Relay-Agent-Id`, which this project's agents send on every call too) is
//! v1alpha1 (`docs/PROTOCOL.md`, "Go relay-clients"):
//!
//! - `/server/request?server=NAME` ([`poll`]): a long poll answered with one protobuf
//!   `HttpRequest` carrying the whole request body, or 408 when nothing came;
//! - `/server/response` ([`response`]): one `HttpResponse` per POST, streamed on to the
//!   user; 400 once the request is gone (the Go client's "stop" signal);
//! - `/server/requeststream?id=ID` ([`requeststream`]): after a 101, one chunk of the
//!   user's bytes per call, 410 when the user's side is over.
//!
//! It is one more adapter over the same broker and per-request state machines as
//! protocol 1: names, tokens, limits, revocation and the user side are shared.

pub mod poll;
pub mod requeststream;
pub mod response;

use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use relay_common::v1alpha1::{canonical_name, HttpHeader};
use relay_common::{AGENT_ID_HEADER, PROTOCOL_HEADER};

use crate::agent::endpoints::{self, no_store, Call};
use crate::agent::error::AgentCallError;
use crate::base::auth::Grant;
use crate::base::body::{text_response, RelayBody};
use crate::State;

/// Whether an agent call speaks v1alpha1: this project's agents announce their protocol
/// and name themselves on every call, the Go client does neither. `/server/probe` is not a
/// v1alpha1 endpoint.
pub fn is_v1alpha1<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    !h.contains_key(PROTOCOL_HEADER)
        && !h.contains_key(AGENT_ID_HEADER)
        && req.uri().path() != "/server/probe"
}

/// A refused or failed v1alpha1 call, with the status the Go client acts on: 408 re-polls
/// at once, 400 on a response ends the request, 410 ends a stream, 403 makes it exit, and
/// anything else is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum GoCallError {
    /// Authentication or authorization, as for protocol 1 (401, 403).
    #[error(transparent)]
    Refused(AgentCallError),
    /// A poll without `server`.
    #[error("Missing server query parameter")]
    MissingServer,
    /// A requeststream call without `id`.
    #[error("Missing id query parameter")]
    MissingId,
    /// A malformed call or message.
    #[error("{0}")]
    BadMessage(String),
    /// A response message larger than the relay takes in one exchange.
    #[error("the response message is larger than {0} bytes")]
    TooLarge(usize),
    /// Nothing to hand out within the poll timeout.
    #[error("no request received within timeout")]
    NoRequest,
    /// The server is shutting down: the poll ends without work.
    #[error("server is restarting")]
    Restarting,
    /// The request the message is for is over (finished, user gone, never existed, or
    /// another name's): the Go client stops the backend request.
    #[error("duplicate or invalid request ID {0}")]
    RequestGone(String),
    /// A requeststream for a request whose user side is over.
    #[error("No ongoing request with id {0}")]
    StreamOver(String),
    /// Another message of the same request is being delivered (a retry overtook it).
    #[error("another message of this request is being delivered")]
    Busy,
}

impl GoCallError {
    /// The one status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            GoCallError::Refused(e) => e.status(),
            GoCallError::MissingServer
            | GoCallError::MissingId
            | GoCallError::BadMessage(_)
            | GoCallError::RequestGone(_) => StatusCode::BAD_REQUEST,
            GoCallError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GoCallError::NoRequest | GoCallError::Restarting => StatusCode::REQUEST_TIMEOUT,
            GoCallError::StreamOver(_) => StatusCode::GONE,
            GoCallError::Busy => StatusCode::CONFLICT,
        }
    }

    /// The text answer the Go client gets.
    pub fn into_response(self) -> Response<RelayBody> {
        match self {
            GoCallError::Refused(e) => e.into_response(),
            e => no_store_text(e.status(), &e.to_string()),
        }
    }
}

fn no_store_text(status: StatusCode, msg: &str) -> Response<RelayBody> {
    let mut r = text_response(status, msg);
    // RFC 9111 §5.2.2.5: every answer is for one agent.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Serves an authenticated v1alpha1 call: the endpoint is chosen, and a poll checked and
/// registered, at once (see [`Call`]).
pub fn serve(
    state: Arc<State>,
    grant: Grant,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Call {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/server/request" => serve_poll(state, grant, &req, peer),
        "/server/response" => later(async move { response::serve(&state, &grant, req).await }),
        "/server/requeststream" => {
            let id = query_param(&req, "id");
            later(async move { requeststream::serve(&state, &grant, id).await })
        }
        _ => endpoints::now(Err(AgentCallError::NoEndpoint)),
    }
}

/// A Go relay-client's long poll, checked and registered at once (see
/// `endpoints::serve_poll`).
pub fn serve_poll<B>(
    state: Arc<State>,
    grant: Grant,
    req: &Request<B>,
    peer: std::net::SocketAddr,
) -> Call {
    match poll::begin(&state, &grant, req, query_param(req, "server"), peer) {
        Ok(parked) => later(poll::parked(state, grant, parked)),
        Err(e) => Box::pin(std::future::ready(e.into_response())),
    }
}

/// The value of the query parameter `key`, as the Go relay's handlers read it.
fn query_param<B>(req: &Request<B>, key: &str) -> Option<String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}

/// A call whose endpoint's future answers (see `endpoints::later`).
fn later(
    fut: impl Future<Output = Result<Response<RelayBody>, GoCallError>> + Send + 'static,
) -> Call {
    Box::pin(fut.map(|r| r.unwrap_or_else(GoCallError::into_response)))
}

/// A 200 answer with `body` of `content_type`.
fn answer(content_type: &'static str, body: bytes::Bytes) -> Response<RelayBody> {
    no_store(Response::builder())
        .header(header::CONTENT_TYPE, content_type)
        .body(crate::base::body::full(body))
        .expect("bug: static response")
}

/// The message's header entries as a header map; a name or value HTTP cannot carry fails
/// the message (never split into two fields).
fn header_map(list: &[HttpHeader]) -> Result<HeaderMap, GoCallError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for h in list {
        let name = h.name.as_deref().unwrap_or_default();
        let bad = |what: &str| {
            GoCallError::BadMessage(format!(
                "invalid header {}: {what}",
                String::from_utf8_lossy(name)
            ))
        };
        let name = HeaderName::from_bytes(name).map_err(|_| bad("bad name"))?;
        let value = HeaderValue::from_bytes(h.value.as_deref().unwrap_or_default())
            .map_err(|_| bad("bad value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// A header map as message entries, one per value, names in Go's canonical form.
fn header_list(map: &HeaderMap) -> Vec<HttpHeader> {
    map.iter()
        .map(|(k, v)| HttpHeader::new(canonical_name(k.as_str()), v.as_bytes()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_ones_the_go_client_acts_on() {
        let cases = [
            (GoCallError::NoRequest, 408),
            (GoCallError::Restarting, 408),
            (GoCallError::RequestGone("x".into()), 400),
            (GoCallError::StreamOver("x".into()), 410),
            (GoCallError::MissingServer, 400),
            (GoCallError::TooLarge(1), 413),
            (
                GoCallError::Refused(AgentCallError::Forbidden("a".into())),
                403,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.into_response().status().as_u16(), status);
        }
    }

    #[test]
    fn headers_convert_both_ways_and_refuse_splitting() {
        let list = vec![
            HttpHeader::new("X-A", "1"),
            HttpHeader::new("X-A", b"caf\xe9".to_vec()),
        ];
        let map = header_map(&list).unwrap();
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert_eq!(header_list(&map), list);
        assert!(header_map(&[HttpHeader::new("X-A", "a\r\nX-B: c")]).is_err());
        assert!(header_map(&[HttpHeader::new("bad name", "v")]).is_err());
    }
}

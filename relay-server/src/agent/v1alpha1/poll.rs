//! `/server/request` for Go relay-clients: the long poll answered with one `HttpRequest`.
//!
//! v1alpha1 carries the whole request body inside the message, so the poll that claims a
//! request reads its body first, bounded by `--max-request-body` ([`MAX_BODY`] when
//! unset): beyond it the user gets 413 and the poll goes on waiting, as for a stalled (408)
//! or malformed (400) body. Until its answer is handed to hyper the poll holds the
//! request's response side, so a poll that dies after claiming fails its user at once
//! (502) instead of leaving it to the response timeout.

use std::future::poll_fn;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use relay_common::codec::BodyMsg;
use relay_common::headers::set_upgrade_headers;
use relay_common::message::RequestHead;
use relay_common::name::is_valid_name;
use relay_common::source::SourceError;
use relay_common::v1alpha1::{encode, HttpRequest, REQUEST_CONTENT_TYPE, URL_ORIGIN};

use super::{answer, header_list, GoCallError};
use crate::agent::endpoints::agent_info;
use crate::agent::error::AgentCallError;
use crate::agent::pending::Pending;
use crate::agent::poll::PollHandle;
use crate::agent::registration::AgentProtocol;
use crate::agent::upload_side::{lease, Phase, UploadFailure};
use crate::base::auth::Grant;
use crate::base::body::RelayBody;
use crate::State;

/// Largest request body handed to a Go relay-client when `--max-request-body` is unset
/// (the Go deployments' ingress allowed 50 MiB).
pub const MAX_BODY: u64 = 64 * 1024 * 1024;

/// A Go relay-client's poll, checked and registered ([`begin`]), to be waited on
/// ([`parked`]).
pub struct Parked {
    name: String,
    handle: PollHandle,
}

/// Checks a poll of a Go relay-client for `server` and registers it, at once.
pub fn begin<B>(
    state: &State,
    grant: &Grant,
    req: &Request<B>,
    server: Option<String>,
    peer: std::net::SocketAddr,
) -> Result<Parked, GoCallError> {
    let name = server
        .filter(|n| !n.is_empty())
        .ok_or(GoCallError::MissingServer)?;
    if !is_valid_name(&name) {
        return Err(GoCallError::BadMessage(format!(
            "invalid backend name {name:?}"
        )));
    }
    if !grant.allows(&name) {
        state.metrics.auth_failure("agent");
        return Err(GoCallError::Refused(AgentCallError::Forbidden(name)));
    }
    // The Go client names itself nowhere: its polls group by address and credential.
    let who = grant
        .token()
        .map_or_else(|| "cert".to_owned(), |d| hex(&d[..4]));
    let agent_id = format!("v1alpha1-{}-{who}", peer.ip());
    let handle = state
        .broker
        .begin_poll(&name, &agent_id, grant.token(), false, || {
            agent_info(req, peer, AgentProtocol::V1alpha1)
        });
    Ok(Parked { name, handle })
}

/// Waits on a registered poll until it can answer one request (or its deadline, the stop
/// or its agent's revocation ends it).
pub async fn parked(
    state: Arc<State>,
    grant: Grant,
    parked: Parked,
) -> Result<Response<RelayBody>, GoCallError> {
    let Parked { name, handle } = parked;
    let deadline = tokio::time::Instant::now() + state.cfg.poll_timeout;
    loop {
        let max = if state.draining() { 0 } else { 1 };
        let hold = deadline.saturating_duration_since(tokio::time::Instant::now());
        let batch = handle.next(max, hold, &state.stop).await;
        if handle.agent().gone.is_cancelled() && !state.auth().tokens.still_grants(&grant, &name) {
            state.metrics.auth_failure("agent");
            return Err(GoCallError::Refused(AgentCallError::Unauthenticated(
                "the agent token was revoked by a configuration reload".into(),
            )));
        }
        let Some(head) = batch.requests.into_iter().next() else {
            return Err(if state.draining() || state.stop.is_cancelled() {
                GoCallError::Restarting
            } else {
                GoCallError::NoRequest
            });
        };
        // Gone already (the user left): wait for the next one.
        let Some(pending) = state.broker.lookup(&head.id, |n| grant.allows(n)) else {
            continue;
        };
        // Boxed: inline, the body's read (920 bytes) would sit in every parked poll's
        // future for the whole wait; a claim is one allocation beside a whole body's.
        if let Some(msg) = Box::pin(claim(&state, &pending, head)).await {
            return Ok(answer(REQUEST_CONTENT_TYPE, Bytes::from(encode(&msg))));
        }
    }
}

/// The message for a claimed request, once its body is complete; `None` when the request
/// failed on the way (the user has its answer).
async fn claim(state: &State, pending: &Arc<Pending>, head: RequestHead) -> Option<HttpRequest> {
    let undelivered = pending.response.lease()?;
    match read_body(state, pending).await {
        Ok(body) => {
            // Headers this relay accepted always convert; if not, the lease drops: 502.
            let msg = message(head, body)?;
            undelivered.hand_over();
            Some(msg)
        }
        // The user has its 413, 408 or 400 from the upload's failure.
        Err(BodyEnd::Refused) => {
            undelivered.hand_over();
            None
        }
        // The user left or its connection broke: dropping the lease ends what is left.
        Err(BodyEnd::Broken) => None,
    }
}

enum BodyEnd {
    Refused,
    Broken,
}

/// The whole request body (empty for requests without one and for upgrades, whose bytes
/// come through requeststream after the switch).
async fn read_body(state: &State, pending: &Arc<Pending>) -> Result<Vec<u8>, BodyEnd> {
    if matches!(
        pending.upload.phase(),
        Phase::NoBody | Phase::AwaitingUpgrade
    ) {
        return Ok(Vec::new());
    }
    let mut lease = lease(pending, pending.upload.next_offset()).map_err(|_| BodyEnd::Broken)?;
    let max = state.cfg.max_request_body.unwrap_or(MAX_BODY);
    let inactivity = state.cfg.upload_inactivity_timeout;
    let mut body = Vec::new();
    loop {
        let step = tokio::select! {
            s = poll_fn(|cx| lease.source().poll_next(cx)) => s,
            _ = pending.done.cancelled() => return Err(BodyEnd::Broken),
            _ = tokio::time::sleep(inactivity) => {
                lease.fail(UploadFailure::Stalled(inactivity));
                return Err(BodyEnd::Refused);
            }
        };
        match step {
            Ok(BodyMsg::Data(d)) => {
                if (body.len() + d.len()) as u64 > max {
                    lease.fail(UploadFailure::TooLarge(max));
                    return Err(BodyEnd::Refused);
                }
                lease.delivered(d.len() as u64);
                body.extend_from_slice(&d);
            }
            // v1alpha1 has no request trailers (the Go relay drops them too).
            Ok(_) => {
                lease.finish();
                return Ok(body);
            }
            Err(SourceError::Body(e)) if e.is_parse() => {
                lease.fail(UploadFailure::Malformed);
                return Err(BodyEnd::Refused);
            }
            Err(_) => return Err(BodyEnd::Broken),
        }
    }
}

/// The `HttpRequest` for `head`: `url` is [`URL_ORIGIN`] + the raw target, `Host` goes in
/// `host`, and an upgrade keeps its `Connection`/`Upgrade` pair (the Go client replays the
/// headers as they come, and Go's transport only switches when they are there).
fn message(mut head: RequestHead, body: Vec<u8>) -> Option<HttpRequest> {
    let mut headers = head.headers.take_map().ok()?;
    let host = headers
        .remove(http::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned));
    if let Some(proto) = &head.upgrade {
        set_upgrade_headers(&mut headers, proto);
    }
    Some(HttpRequest {
        id: Some(head.id),
        method: Some(head.method),
        url: Some(format!("{URL_ORIGIN}{}", head.target)),
        header: header_list(&headers),
        body: Some(body),
        host,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::message::BodyKind;

    #[test]
    fn the_message_carries_target_host_and_upgrade_as_the_go_client_expects() {
        let head = RequestHead {
            id: "0123".into(),
            method: "GET".into(),
            target: "/a%2Fb?x=1".into(),
            headers: vec![
                ("host".into(), "robot.example".into()),
                ("x-a".into(), "1".into()),
            ]
            .into(),
            body: BodyKind::Empty,
            content_length: None,
            upgrade: Some("websocket".into()),
        };
        let m = message(head, b"body".to_vec()).unwrap();
        assert_eq!(m.url.as_deref(), Some("http://invalid/a%2Fb?x=1"));
        assert_eq!(m.host.as_deref(), Some("robot.example"));
        let names: Vec<_> = m
            .header
            .iter()
            .map(|h| String::from_utf8(h.name.clone().unwrap()).unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.eq_ignore_ascii_case("host")));
        assert!(names.contains(&"X-A".to_owned()));
        assert!(names.contains(&"Upgrade".to_owned()));
        assert!(names.contains(&"Connection".to_owned()));
        assert_eq!(m.body.as_deref(), Some(&b"body"[..]));
    }
}

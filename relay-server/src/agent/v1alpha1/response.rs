//! `/server/response` for Go relay-clients: one `HttpResponse` message per POST, delivered
//! towards the user before the POST is answered (the only backpressure v1alpha1 has).
//!
//! The first message carries the status (its presence marks it) and the headers; each
//! message's body goes on as it comes; trailers, from any message, go out with the end
//! (`eof`). A 101 switches the user's connection, and later bodies are tunnel bytes. Once
//! the request is over (finished, the user left, refused) a message gets 400, which makes
//! the Go client stop its backend request.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use relay_common::codec::BodyMsg;
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop};
use relay_common::message::{BodyKind, ResponseHead};
use relay_common::v1alpha1::{decode, decode_bytes, HttpResponse};

use super::{header_map, no_store_text, GoCallError};
use crate::agent::pending::Pending;
use crate::agent::response_side::{DeliverError, ResponseLease};
use crate::base::auth::Grant;
use crate::base::body::RelayBody;
use crate::State;

/// Largest message taken in one POST. The Go client flushes at 1 MiB (`--max_chunk_size`)
/// plus one 64 KiB block; a client configured with bigger chunks gets 413.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Serves one response message.
pub async fn serve(
    state: &State,
    grant: &Grant,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, GoCallError> {
    let bytes = read_message(req.into_body()).await?;
    serve_message(state, grant, bytes).await
}

/// The bytes of one message (at most [`MAX_MESSAGE`]).
pub async fn read_message(body: Incoming) -> Result<Bytes, GoCallError> {
    Ok(Limited::new(body, MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                GoCallError::TooLarge(MAX_MESSAGE)
            } else {
                GoCallError::BadMessage(format!("reading the message failed: {e}"))
            }
        })?
        .to_bytes())
}

/// The request id a message is about, if it decodes (cluster mode routes by its tag).
pub fn message_id(bytes: &[u8]) -> Option<String> {
    decode::<HttpResponse>(bytes).ok()?.id
}

/// Serves one response message already read (its body is passed on as a slice of it).
pub async fn serve_message(
    state: &State,
    grant: &Grant,
    bytes: Bytes,
) -> Result<Response<RelayBody>, GoCallError> {
    let msg: HttpResponse = decode_bytes(bytes)
        .map_err(|e| GoCallError::BadMessage(format!("not an HttpResponse message: {e}")))?;
    let id = msg
        .id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| GoCallError::BadMessage("the message has no id".into()))?;
    let pending = state
        .broker
        .lookup(&id, |n| grant.allows(n))
        .ok_or_else(|| GoCallError::RequestGone(id.clone()))?;
    let mut lease = pending.response.lease().ok_or(GoCallError::Busy)?;
    let result = tokio::select! {
        r = deliver(state, &mut lease, msg, &pending) => r,
        _ = pending.done.cancelled() => Err(DeliverError::UserGone),
        // The housekeeping found the user taking none of its waiting bytes: its response
        // fails (the lease drops uncleanly) and the Go client is told to stop.
        _ = pending.account().stalled() => {
            pending.done.cancel();
            drop(lease);
            return Err(GoCallError::RequestGone(id));
        }
    };
    match result {
        Ok(()) => {
            lease.hand_over();
            Ok(no_store_text(StatusCode::OK, "ok"))
        }
        Err(DeliverError::UserGone) => {
            lease.hand_over();
            Err(GoCallError::RequestGone(id))
        }
        Err(DeliverError::Protocol(why)) => {
            // The user's response fails (502, or an aborted body) and the client stops.
            lease.protocol_error();
            Err(GoCallError::BadMessage(why.to_owned()))
        }
    }
}

/// Delivers one message into the request's response.
async fn deliver(
    state: &State,
    lease: &mut ResponseLease,
    msg: HttpResponse,
    pending: &Pending,
) -> Result<(), DeliverError> {
    let eof = msg.eof == Some(true);
    let trailers =
        header_map(&msg.trailer).map_err(|_| DeliverError::Protocol("invalid trailer field"))?;
    let body = msg.body.unwrap_or_default();
    if lease.awaiting_head() {
        let Some(status) = msg.status_code else {
            return Err(DeliverError::Protocol(
                "the first message of a response has no status_code",
            ));
        };
        let head = head(
            status,
            &msg.header,
            eof && body.is_empty() && trailers.is_empty(),
        )?;
        if !lease.head(head)? {
            return Ok(());
        }
    }
    // A status on a later message is a retried first message's: the head stands.
    if !body.is_empty() {
        let n = body.len();
        // Waits while the budget or the name's or client's share is spent.
        let held = pending.account().hold(n).await;
        lease.data(body, held).await?;
        pending
            .download_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    lease.stash_trailers(trailers);
    if eof {
        // Counted before the user's response ends, so whoever saw it end sees the figure.
        if let Some(ms) = msg.backend_duration_ms.filter(|ms| *ms > 0) {
            state
                .metrics
                .backend_duration(Duration::from_millis(ms as u64));
        }
        let trailers = lease.take_trailers();
        let last = if trailers.is_empty() {
            BodyMsg::End
        } else {
            BodyMsg::Trailers(Box::new(trailers))
        };
        lease.end(last).await?;
        // After a 101 the Go client closes its backend connection with the last message:
        // user bytes could no longer go anywhere, so the tunnel closes whole (as the Go
        // server closes the user's connection). A request body was read whole by the poll,
        // so for other requests this changes nothing.
        pending.upload.close();
    }
    Ok(())
}

/// The response head of a first message. `complete` says the message is the whole
/// response without a body (a HEAD answer, a 204, a gRPC Trailers-Only answer).
fn head(
    status: i32,
    headers: &[relay_common::v1alpha1::HttpHeader],
    complete: bool,
) -> Result<ResponseHead, DeliverError> {
    let status = u16::try_from(status)
        .ok()
        .filter(|s| StatusCode::from_u16(*s).is_ok())
        .ok_or(DeliverError::Protocol("status_code is not an HTTP status"))?;
    let mut headers =
        header_map(headers).map_err(|_| DeliverError::Protocol("invalid header field"))?;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // RFC 9110 §7.8: the protocol switched to is named in the 101's Upgrade header.
    let upgrade = (status == 101)
        .then(|| {
            headers
                .get(header::UPGRADE)?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .flatten();
    // RFC 9110 §7.6.1: the Go client passes hop-by-hop fields on as they came.
    strip_hop_by_hop(&mut headers, false);
    if let Some(proto) = &upgrade {
        set_upgrade_headers(&mut headers, proto);
    }
    let body = if complete && status != 101 {
        BodyKind::Empty
    } else {
        BodyKind::Stream
    };
    Ok(ResponseHead {
        status,
        headers: headers.into(),
        body,
        content_length: content_length.filter(|_| status != 101),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::v1alpha1::HttpHeader;

    #[test]
    fn a_first_message_becomes_a_head_without_hop_by_hop_fields() {
        let h = head(
            200,
            &[
                HttpHeader::new("Content-Length", "5"),
                HttpHeader::new("Connection", "close, X-Secret"),
                HttpHeader::new("X-Secret", "s"),
                HttpHeader::new("X-Kept", "k"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.content_length, Some(5));
        assert_eq!(h.body, BodyKind::Stream);
        assert_eq!(
            h.headers.to_list(),
            vec![("x-kept".to_owned(), "k".to_owned())]
        );
    }

    #[test]
    fn a_switch_keeps_its_protocol_and_a_complete_answer_has_no_body() {
        let h = head(
            101,
            &[
                HttpHeader::new("Upgrade", "websocket"),
                HttpHeader::new("Connection", "Upgrade"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(h.body, BodyKind::Stream);
        assert!(h
            .headers
            .to_list()
            .contains(&("upgrade".to_owned(), "websocket".to_owned())));
        let h = head(204, &[], true).unwrap();
        assert_eq!(h.body, BodyKind::Empty);
        assert!(head(1000, &[], true).is_err());
        assert!(head(-1, &[], true).is_err());
    }
}

//! Serving one relayed request: pull the upload, call the backend, and post the response
//! back in streaming or bounded exchanges.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use http::{header, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use relay_common::codec::{encode_continue, BodyMsg, FrameReader, Message};
use relay_common::headers::{set_upgrade_headers, strip_hop_by_hop, upgrade_matches};
use relay_common::message::{BodyKind, RequestHead, ResponseHead};
use relay_common::session::INLINE_BODY_MAX;
use relay_common::BODY_CHANNEL_DEPTH;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bodies::{ChunksBody, ResponseFrames, Source, UploadBody};
use crate::config::Transport;
use crate::error::RelayCallError;
use crate::relay::{error_chain, RelayClient};
use crate::service::{self, Call, LocalAnswer, Services};
use crate::session::Reply;
use crate::tunnel::tunnel;
use crate::upstream::BackendResponse;
use crate::upstream::{boxed, Answer, Backend};
use crate::whole::{answer_whole, check_posted, post_error, post_local};

/// What serving a request needs.
pub struct Ctx {
    /// The relay-server.
    pub relay: RelayClient,
    /// The backend.
    pub backend: Backend,
    /// Streaming or bounded exchanges.
    pub transport: Transport,
    /// Largest bounded exchange.
    pub exchange_bytes: usize,
    /// Service ports answered by the agent itself (one set for every relay-server URL).
    pub services: Arc<Services>,
}

/// How a request ended, for the agent's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered to the end.
    Served,
    /// Broke on the way (backend, relay-server or protocol).
    Failed,
    /// The user went away.
    Cancelled,
}

/// Serves one request to its end. `reply` is the session the request came from: whole
/// small responses go back on it while it is open, everything else through exchanges.
pub async fn serve(
    ctx: Arc<Ctx>,
    head: RequestHead,
    cancel: CancellationToken,
    reply: Option<Arc<Reply>>,
) -> Outcome {
    // A span per request only when traces are exported or debug lines are wanted: the
    // fmt layer formats a span's fields when it opens, which costs more than the rest of
    // the agent's bookkeeping for a small request. Warnings name the request themselves.
    let traced = relay_config_file::telemetry::enabled();
    let span = match traced || tracing::enabled!(tracing::Level::DEBUG) {
        true => tracing::info_span!(
            "request",
            otel.kind = "client",
            id = %head.id,
            method = %head.method,
            path = %head.target.split('?').next().unwrap_or("/"),
        ),
        false => tracing::Span::none(),
    };
    if traced {
        // The relay-server's span for this request (its traceparent) is the parent.
        if let Ok(h) = head.headers.to_map() {
            relay_config_file::telemetry::continue_trace(&span, &h);
        }
    }
    let id = head.id.clone();
    async move {
        // Boxed where it is made: the select below and the span's wrapper each move their
        // futures, and this one is 2.5 KiB (three copies of it were 2 % of the agent's
        // instructions per small request).
        let inner = boxed_in_place(|| serve_inner(&ctx, head, &cancel, reply.as_deref()));
        tokio::select! {
            r = inner => match r {
                Ok(()) => Outcome::Served,
                // The response (or the upload) did not get through: the user gets an error,
                // or waits for the server's response timeout if not even the head
                // arrived. Worth an operator's eye either way.
                Err(e) => {
                    tracing::warn!(id, error = %e, "the request failed between agent and relay-server");
                    if let Some(out) = &reply {
                        crate::whole::fail_on_session(out, &id, &e);
                    }
                    Outcome::Failed
                }
            },
            _ = cancel.cancelled() => {
                tracing::debug!("cancelled: the user went away");
                Outcome::Cancelled
            }
        }
    }
    .instrument(span)
    .await
}

/// `make()`'s future in a box of its own, written there directly: `Box::pin(fut)` builds
/// the future on the stack and copies it into the box whole (its full size, whatever it
/// holds yet: ≈ 230 instructions per small request for `serve_inner`'s).
pub(crate) fn boxed_in_place<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// The paths a small request does not take (services, errors, a switch, a streamed
/// response) are boxed where they are awaited: a future is as large as its largest await,
/// and this one is built on the stack and copied into its parent whole, on every request.
async fn serve_inner(
    ctx: &Arc<Ctx>,
    mut head: RequestHead,
    cancel: &CancellationToken,
    reply: Option<&Reply>,
) -> Result<(), RelayCallError> {
    if let Some(call) = ctx.services.route(&head) {
        return Box::pin(serve_service(ctx, &head, call, cancel, reply)).await;
    }
    let body = if head.body == BodyKind::Stream {
        let (tx, rx) = mpsc::channel(BODY_CHANNEL_DEPTH);
        let relay = ctx.relay.clone();
        let id = head.id.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = pump_upload(&relay, &id, tx) => {}
                _ = cancel.cancelled() => {}
            }
        });
        boxed(UploadBody::new(rx, head.content_length))
    } else {
        boxed(http_body_util::Empty::new().map_err(|never| match never {}))
    };
    let req = match ctx.backend.prepare(&mut head, body) {
        Ok(r) => r,
        Err(e) => {
            return Box::pin(post_error(
                ctx,
                reply,
                &head.id,
                StatusCode::BAD_REQUEST,
                &e.0,
            ))
            .await
        }
    };
    let resp = match ctx.backend.send(req).await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "relay-client could not reach the backend: {}",
                error_chain(&e)
            );
            tracing::warn!(id = head.id, error = %msg, "backend request failed");
            return Box::pin(post_error(
                ctx,
                reply,
                &head.id,
                StatusCode::BAD_GATEWAY,
                &msg,
            ))
            .await;
        }
    };
    let (status, headers, content_length, body) = match resp {
        Answer::Encoded {
            status,
            block,
            content_length,
            body,
        } => (status, block, content_length, body),
        Answer::Response(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            return Box::pin(switch(ctx, &head, &mut resp, cancel, reply.is_some())).await;
        }
        Answer::Response(resp) => {
            let (parts, body) = resp.into_parts();
            let content_length = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let mut headers = parts.headers;
            strip_hop_by_hop(&mut headers, false);
            (parts.status, headers.into(), content_length, body)
        }
    };
    let has_body = !body.is_end_stream();
    let rh = ResponseHead {
        status: status.as_u16(),
        headers,
        body: if has_body {
            BodyKind::Stream
        } else {
            BodyKind::Empty
        },
        content_length,
    };
    // A response known to be small goes back whole on the session; one of unknown length
    // (it may stream: SSE, gRPC) or a big one takes an exchange of its own.
    let small = !has_body || content_length.is_some_and(|n| n <= INLINE_BODY_MAX as u64);
    if let Some(out) = reply.filter(|_| small) {
        return answer_whole(ctx, out, &head.id, rh, body).await;
    }
    let frames = ResponseFrames::new(&rh, has_body.then_some(Source::Body(body.streamed())));
    Box::pin(send_response(ctx, &head.id, frames)).await
}

/// The backend answered 101: if the user asked for exactly this switch, relay the 101 and
/// then the raw bytes both ways (backend→user as response DATA, user→backend from upload
/// exchanges), each direction ending on its own; otherwise answer 502.
async fn switch(
    ctx: &Arc<Ctx>,
    head: &RequestHead,
    resp: &mut http::Response<BackendResponse>,
    cancel: &CancellationToken,
    on_session: bool,
) -> Result<(), RelayCallError> {
    let answered = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let asked = head.upgrade.as_deref();
    if !asked.is_some_and(|r| upgrade_matches(r, &answered)) {
        let msg = format!("the backend switched to {answered:?}, which the user did not ask for");
        return post_error(ctx, None, &head.id, StatusCode::BAD_GATEWAY, &msg).await;
    }
    let upgraded = match hyper::upgrade::on(&mut *resp).await {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("the backend connection did not switch: {e}");
            return post_error(ctx, None, &head.id, StatusCode::BAD_GATEWAY, &msg).await;
        }
    };
    let mut headers = std::mem::take(resp.headers_mut());
    strip_hop_by_hop(&mut headers, false);
    set_upgrade_headers(&mut headers, &answered);
    let rh = ResponseHead {
        status: 101,
        headers: headers.into(),
        body: BodyKind::Stream,
        content_length: None,
    };
    let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
    let ends = (Box::new(rd) as _, Box::new(wr) as _);
    tunnel(ctx, &head.id, &rh, ends, cancel, on_session).await
}

/// A service-port call answered by the agent itself (see [`crate::service`]).
async fn serve_service(
    ctx: &Arc<Ctx>,
    head: &RequestHead,
    call: Result<Call<'_>, LocalAnswer>,
    cancel: &CancellationToken,
    reply: Option<&Reply>,
) -> Result<(), RelayCallError> {
    let answer = match call {
        Err(a) => a,
        Ok(Call::Apps) => ctx.services.apps(),
        Ok(Call::Version) => ctx.services.version(),
        Ok(Call::Proxy(app)) => match service::accept(head) {
            Err(a) => a,
            Ok((headers, half_close)) => match ctx.services.ensure_started(app).await {
                Err(a) => a,
                Ok(()) => {
                    let rh = ResponseHead {
                        status: 101,
                        headers: headers.into(),
                        body: BodyKind::Stream,
                        content_length: None,
                    };
                    let (agent_end, relay_end) = tokio::io::duplex(256 * 1024);
                    tokio::spawn(service::bridge(
                        agent_end,
                        ctx.services.addr(app).to_owned(),
                        half_close,
                        ctx.services.keepalive(),
                    ));
                    let (rd, wr) = tokio::io::split(relay_end);
                    let ends = (Box::new(rd) as _, Box::new(wr) as _);
                    let on_session = reply.is_some();
                    return tunnel(ctx, &head.id, &rh, ends, cancel, on_session).await;
                }
            },
        },
    };
    post_local(
        ctx,
        reply,
        &head.id,
        answer.status,
        answer.content_type,
        answer.body.into(),
    )
    .await
}

pub(crate) async fn send_response(
    ctx: &Ctx,
    id: &str,
    mut frames: ResponseFrames,
) -> Result<(), RelayCallError> {
    if ctx.transport != Transport::Bounded {
        let (status, text) = ctx.relay.post_response(id, 0, boxed(frames)).await?;
        check_posted(status, &text)?;
        return Ok(());
    }
    loop {
        let offset = frames.offset;
        let mut chunks = VecDeque::new();
        let mut size = 0usize;
        // Wait for the first piece, then take whatever else is ready, up to the cap: a
        // slow stream (SSE) goes out event by event, a fast one in full exchanges.
        // ResponseFrames never fails: backend errors become ABORT frames.
        let mut ready = frames.frame().await.and_then(Result::ok);
        while let Some(f) = ready.take() {
            let b = f.into_data().expect("bug: frames are data");
            size += b.len();
            chunks.push_back(b);
            if size >= ctx.exchange_bytes || frames.done() {
                break;
            }
            ready = poll_fn(|cx| match Pin::new(&mut frames).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(f)),
                _ => Poll::Ready(None),
            })
            .await;
        }
        let last = frames.done();
        if !last {
            chunks.push_back(encode_continue());
        }
        let (status, text) = ctx
            .relay
            .post_response(id, offset, boxed(ChunksBody::new(chunks)))
            .await?;
        if !check_posted(status, &text)? || last {
            return Ok(());
        }
    }
}

/// Pulls the user's upload through `/server/requeststream` exchanges into `tx`.
pub(crate) async fn pump_upload(relay: &RelayClient, id: &str, tx: mpsc::Sender<BodyMsg>) {
    let mut offset = 0u64;
    loop {
        let body = match relay.request_stream(id, offset, None).await {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(BodyMsg::Abort(e.to_string())).await;
                return;
            }
        };
        let mut reader = FrameReader::new(body);
        let failed = loop {
            let msg = match reader.next().await {
                Ok(Message::Body(msg)) => msg,
                Ok(Message::Continue) => break None,
                Ok(Message::Head(_)) => break Some("HEAD frame in an upload".to_owned()),
                Err(e) => break Some(format!("upload exchange failed: {e}")),
            };
            if let BodyMsg::Data(b) = &msg {
                offset += b.len() as u64;
            }
            let last = msg.is_last();
            if tx.send(msg).await.is_err() || last {
                return;
            }
        };
        if let Some(why) = failed {
            let _ = tx.send(BodyMsg::Abort(why)).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Arc<Ctx>, RequestHead, CancellationToken, Option<Arc<Reply>>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_request_s_future_stays_small() {
        // Every request's future is built on the stack and copied into its task; it is as
        // large as its largest await. With a tunnel's or a streamed response's state inline
        // it grew to about 10 KiB, and copying it cost a third of a small request's
        // instructions. Those paths are boxed; this keeps them so. (4.2 KiB today: the
        // backend call and the whole answer stay inline, since boxing them costs more in
        // allocations than it saves in copies.)
        let size = future_size(serve);
        assert!(size <= 5 * 1024, "a request's future takes {size} bytes");
    }
}

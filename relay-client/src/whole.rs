//! Whole responses: a small body read at once and sent on the session (kept there until
//! acknowledged), or in one exchange when there is no open session; responses the agent
//! makes itself (errors, service-port answers); a broken body passed on as broken.

use std::collections::VecDeque;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use relay_common::codec::{encode, encode_head, BodyMsg};
use relay_common::message::{decode_headers, encode_headers, BodyKind, ResponseHead, Trailers};
use relay_common::session::INLINE_BODY_MAX;

use crate::bodies::ChunksBody;
use crate::error::RelayCallError;
use crate::exchange::Ctx;
use crate::session::{Kept, Reply};
use crate::upstream::boxed;

/// Reads a small body whole and sends the response on the session (or, if the session is
/// gone meanwhile, in one exchange).
pub(crate) async fn answer_whole(
    ctx: &Ctx,
    out: &Reply,
    id: &str,
    head: ResponseHead,
    body: crate::upstream::BackendResponse,
) -> Result<(), RelayCallError> {
    let mut body = body;
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // The head and the bytes so far go to the user and the body is aborted, as
                // when it streams: a broken body, never a short complete one.
                let why = format!("the backend's response body failed: {e}");
                return Box::pin(post_broken(ctx, id, &head, data.freeze(), why)).await;
            }
        };
        match frame.into_data() {
            Ok(d) if data.len() + d.len() <= INLINE_BODY_MAX => data.extend_from_slice(&d),
            Ok(_) => {
                let why = "the backend sent more than its Content-Length".to_owned();
                return Box::pin(post_broken(ctx, id, &head, data.freeze(), why)).await;
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(Trailers {
                        headers: encode_headers(&t),
                    });
                }
            }
        }
    }
    let data = data.freeze();
    post_whole(ctx, Some(out), id, head, data, trailers).await
}

/// Sends a synthesised text response (the backend could not be asked).
pub(crate) async fn post_error(
    ctx: &Ctx,
    reply: Option<&Reply>,
    id: &str,
    status: StatusCode,
    msg: &str,
) -> Result<(), RelayCallError> {
    let body = Bytes::from(format!("{msg}\n"));
    post_local(
        ctx,
        reply,
        id,
        status.as_u16(),
        "text/plain; charset=utf-8",
        body,
    )
    .await
}

/// Answers 502 on the session a request came on when its response could not get to the
/// relay-server another way (an exchange refused or cut: the per-address limit, a proxy,
/// the server going away). The user learns why at once instead of waiting for the
/// server's response timeout (or a tunnel's 120 s upgrade timeout). The relay-server drops
/// it if the request is over or its head already went through an exchange (the request
/// then fails as a cut exchange fails it). Nothing to do if the session is gone too: the
/// server fails the requests of a lost session itself.
pub(crate) fn fail_on_session(out: &Reply, id: &str, why: &RelayCallError) {
    let body = Bytes::from(format!(
        "relay-client could not send the response to the relay-server: {why}\n"
    ));
    let head = ResponseHead {
        status: StatusCode::BAD_GATEWAY.as_u16(),
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())].into(),
        body: BodyKind::Stream,
        content_length: Some(body.len() as u64),
    };
    let _ = out.respond(Kept {
        id: id.to_owned(),
        head,
        body,
        trailers: None,
    });
}

/// Sends a complete response the agent produced itself.
pub(crate) async fn post_local(
    ctx: &Ctx,
    reply: Option<&Reply>,
    id: &str,
    status: u16,
    content_type: &str,
    body: Bytes,
) -> Result<(), RelayCallError> {
    let head = ResponseHead {
        status,
        headers: vec![("content-type".into(), content_type.into())].into(),
        body: BodyKind::Stream,
        content_length: Some(body.len() as u64),
    };
    post_whole(ctx, reply, id, head, body, None).await
}

/// Sends a response a lost session did not acknowledge, in one exchange.
pub(crate) async fn post_kept(ctx: &Ctx, kept: Kept) -> Result<(), RelayCallError> {
    let Kept {
        id,
        head,
        body,
        trailers,
    } = kept;
    post_whole(ctx, None, &id, head, body, trailers).await
}

/// Sends a head, the body bytes read so far and an ABORT, in one exchange.
async fn post_broken(
    ctx: &Ctx,
    id: &str,
    head: &ResponseHead,
    data: Bytes,
    why: String,
) -> Result<(), RelayCallError> {
    post_chunks(
        ctx,
        id,
        head_and_data(head, data),
        Some(BodyMsg::Abort(why)),
    )
    .await
}

/// Sends a whole response: on the session when there is one and it is open (a body of at
/// most `INLINE_BODY_MAX` bytes), else in one exchange.
async fn post_whole(
    ctx: &Ctx,
    reply: Option<&Reply>,
    id: &str,
    head: ResponseHead,
    body: Bytes,
    trailers: Option<Trailers>,
) -> Result<(), RelayCallError> {
    let (head, body, trailers) = match reply.filter(|_| body.len() <= INLINE_BODY_MAX) {
        Some(reply) => {
            let kept = Kept {
                id: id.to_owned(),
                head,
                body,
                trailers,
            };
            match reply.respond(kept) {
                Ok(()) => return Ok(()),
                // The session ended meanwhile.
                Err(kept) => (kept.head, kept.body, kept.trailers),
            }
        }
        None => (head, body, trailers),
    };
    let streams = head.body == BodyKind::Stream;
    let chunks = head_and_data(&head, if streams { body } else { Bytes::new() });
    let last = streams.then(|| match trailers.map(|t| decode_headers(&t.headers)) {
        Some(Ok(map)) => BodyMsg::Trailers(Box::new(map)),
        _ => BodyMsg::End,
    });
    // Boxed: the usual way is the session (above), and a future is as large as its
    // largest await; this one is built and copied on every small request.
    Box::pin(post_chunks(ctx, id, chunks, last)).await
}

/// Sends `chunks` and then `last` (the body's ending frame) in one exchange.
async fn post_chunks(
    ctx: &Ctx,
    id: &str,
    mut chunks: VecDeque<Bytes>,
    last: Option<BodyMsg>,
) -> Result<(), RelayCallError> {
    if let Some(last) = last {
        let last = encode(last);
        chunks.push_back(last.frame);
        chunks.extend(last.payload);
    }
    let (status, text) = ctx
        .relay
        .post_response(id, 0, boxed(ChunksBody::new(chunks)))
        .await?;
    check_posted(status, &text).map(|_| ())
}

/// Whether an exchange was accepted; `Ok(false)` when the user is gone.
pub(crate) fn check_posted(status: StatusCode, text: &[u8]) -> Result<bool, RelayCallError> {
    match status {
        StatusCode::OK => Ok(true),
        StatusCode::GONE | StatusCode::NOT_FOUND => Ok(false),
        s => Err(RelayCallError::Status {
            status: s.as_u16(),
            message: String::from_utf8_lossy(text).trim().to_owned(),
        }),
    }
}

/// The HEAD frame and, if there are any, the body bytes as one DATA frame.
fn head_and_data(head: &ResponseHead, data: Bytes) -> VecDeque<Bytes> {
    let mut chunks = VecDeque::from([encode_head(head)]);
    if !data.is_empty() {
        let d = encode(BodyMsg::Data(data));
        chunks.push_back(d.frame);
        chunks.push_back(d.payload.expect("bug: DATA has a payload"));
    }
    chunks
}

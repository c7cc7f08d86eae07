//! `/server/response`: one response exchange. It holds the request's response side as a
//! lease for as long as it runs, decodes the agent's frames and delivers them towards the
//! user; how it ends (CONTINUE, a final frame, a cut, a protocol error, the user leaving)
//! decides what the lease leaves behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use relay_common::codec::{BodyMsg, FrameReader, Message};

use crate::agent::error::AgentCallError;
use crate::agent::pending::Pending;
use crate::agent::response_side::{DeliverError, ResponseLease};
use crate::base::body::{text_response, RelayBody};

/// How an exchange that did not fail ended.
pub(crate) enum Ended {
    /// A final frame: the response is complete.
    Complete,
    /// CONTINUE: the next exchange goes on.
    Continue,
}

/// Why an exchange stopped early.
pub(crate) enum Stopped {
    UserGone,
    /// The user took none of the waiting bytes for the write timeout.
    UserStalled,
    Protocol(String),
}

impl From<DeliverError> for Stopped {
    fn from(e: DeliverError) -> Self {
        match e {
            DeliverError::UserGone => Stopped::UserGone,
            DeliverError::Protocol(why) => Stopped::Protocol(why.to_owned()),
        }
    }
}

/// Serves one response exchange for `pending`, whose body starts at `offset`.
pub async fn serve(
    pending: Arc<Pending>,
    req: Request<Incoming>,
    offset: Option<u64>,
) -> Result<Response<RelayBody>, AgentCallError> {
    let Some(lease) = pending.response.lease() else {
        return Err(AgentCallError::Conflict(
            "another response exchange is in progress".into(),
        ));
    };
    if Some(lease.offset()) != offset {
        // A gap or a duplicate: the body can no longer be delivered intact, so the user's
        // response is failed rather than left hanging.
        let msg = format!(
            "offset mismatch: the next response byte is {}",
            lease.offset()
        );
        lease.protocol_error();
        return Err(AgentCallError::Conflict(msg));
    }
    let mut lease = lease;
    let mut reader = FrameReader::new(req.into_body());
    let result = deliver(&mut lease, &mut reader, &pending).await;
    settle(lease, result, &pending).map(|()| text_response(StatusCode::OK, "ok"))
}

/// Delivers what `reader` carries into the lease until a final frame or CONTINUE, the user
/// leaving, or the user stalling.
pub(crate) async fn deliver<B>(
    lease: &mut ResponseLease,
    reader: &mut FrameReader<B>,
    pending: &Pending,
) -> Result<Ended, Stopped>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    tokio::select! {
        r = run(lease, reader, pending) => r,
        _ = pending.done.cancelled() => Err(Stopped::UserGone),
        // The housekeeping found the user taking none of its waiting bytes.
        _ = pending.account().stalled() => Err(Stopped::UserStalled),
    }
}

/// What an exchange's end leaves behind: the lease handed on (CONTINUE, the user gone),
/// finished, or failed; the agent's error when there is one.
pub(crate) fn settle(
    lease: ResponseLease,
    result: Result<Ended, Stopped>,
    pending: &Pending,
) -> Result<(), AgentCallError> {
    match result {
        Ok(Ended::Complete) => Ok(()),
        Ok(Ended::Continue) => {
            lease.hand_over();
            Ok(())
        }
        Err(Stopped::UserGone) => {
            lease.hand_over();
            Err(AgentCallError::UserGone)
        }
        Err(Stopped::UserStalled) => {
            // What the user did not read no longer counts against the budget (forfeited),
            // the user's response fails (the lease drops uncleanly: its body ends in an
            // error, never a clean end) and the agent stops as if the user had left.
            pending.done.cancel();
            tracing::debug!(id = %pending.id, "the user stopped reading: response failed");
            drop(lease);
            Err(AgentCallError::UserGone)
        }
        Err(Stopped::Protocol(msg)) => {
            lease.protocol_error();
            Err(AgentCallError::BadRequest(msg))
        }
    }
}

/// Decodes the exchange's frames into the lease until a final frame or CONTINUE.
async fn run<B>(
    lease: &mut ResponseLease,
    reader: &mut FrameReader<B>,
    pending: &Pending,
) -> Result<Ended, Stopped>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let msg = reader
            .next()
            .await
            .map_err(|e| Stopped::Protocol(e.to_string()))?;
        match msg {
            Message::Head(head) => {
                if !lease.head(head)? {
                    return Ok(Ended::Complete);
                }
            }
            Message::Body(BodyMsg::Data(bytes)) => {
                let len = bytes.len() as u64;
                // Waits while the budget or the name's or client's share is spent (the
                // caller gives up when the user leaves).
                // Both waits are boxed (one small allocation per chunk of up to 64 KiB):
                // kept inline they sized this future, which an idle tunnel holds for its
                // whole life, at three times its read's wait.
                let held = Box::pin(pending.account().hold(bytes.len())).await;
                Box::pin(lease.data(bytes, held)).await?;
                pending.download_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Message::Body(last) => {
                Box::pin(lease.end(last)).await?;
                return Ok(Ended::Complete);
            }
            // Also valid before HEAD: the agent has nothing to say yet.
            Message::Continue => return Ok(Ended::Continue),
        }
    }
}

//! `/server/requeststream` for Go relay-clients: after a 101, the user's bytes towards the
//! backend, one chunk per call. A call waits up to the poll timeout (at most 30 s, the Go
//! server's wait) for a chunk and answers it, or an empty 200 when none came; once the
//! user's side is over (half-closed, closed, or the request ended) it answers 410, on
//! which the Go client closes its backend connection.
//!
//! Each call holds the upload as a lease, like protocol 1's upload exchanges; a call cut
//! while it held bytes leaves the upload broken, so the tunnel ends rather than going on
//! with a hole.

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use relay_common::codec::BodyMsg;

use super::{answer, GoCallError};
use crate::agent::upload_side::{lease, Phase, Refusal};
use crate::base::auth::Grant;
use crate::base::body::RelayBody;
use crate::State;

/// The Go server's wait for one chunk; its client gives up on a call after 60 s.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// `Content-Type` of a chunk, spelt as the Go server spells it.
const CHUNK_TYPE: &str = "application/octet-data";

/// Serves one requeststream call for `id`.
pub async fn serve(
    state: &State,
    grant: &Grant,
    id: Option<String>,
) -> Result<Response<RelayBody>, GoCallError> {
    let id = id.filter(|i| !i.is_empty()).ok_or(GoCallError::MissingId)?;
    let over = || GoCallError::StreamOver(id.clone());
    let pending = state
        .broker
        .lookup(&id, |n| grant.allows(n))
        .ok_or_else(over)?;
    let deadline = tokio::time::Instant::now() + state.cfg.poll_timeout.min(MAX_WAIT);
    let empty = || answer(CHUNK_TYPE, Bytes::new());
    let mut lease = loop {
        match lease(&pending, pending.upload.next_offset()) {
            Ok(lease) => break lease,
            // The 101 has not reached the user yet: wait for the switch.
            Err(Refusal::Wait) => tokio::select! {
                _ = pending.upload.wait_for(|p| *p != Phase::AwaitingUpgrade) => {}
                _ = pending.done.cancelled() => return Err(over()),
                _ = tokio::time::sleep_until(deadline) => return Ok(empty()),
            },
            Err(Refusal::Refused(_)) => return Err(over()),
        }
    };
    let step = tokio::select! {
        s = poll_fn(|cx| lease.source().poll_next(cx)) => Some(s),
        _ = pending.done.cancelled() => {
            lease.give_back();
            return Err(over());
        }
        _ = tokio::time::sleep_until(deadline) => None,
    };
    match step {
        None => {
            lease.give_back();
            Ok(empty())
        }
        Some(Ok(BodyMsg::Data(chunk))) => {
            lease.delivered(chunk.len() as u64);
            lease.give_back();
            Ok(answer(CHUNK_TYPE, chunk))
        }
        // The user half-closed or closed: v1alpha1 can only end the whole stream.
        Some(Ok(_)) => {
            lease.finish();
            Err(over())
        }
        Some(Err(_)) => {
            lease.break_off();
            Err(over())
        }
    }
}

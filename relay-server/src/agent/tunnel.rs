//! `/server/tunnel`: a tunnel exchange (`relay_common::tunnel`). An agent whose backend
//! answered 101 switches one connection of its own to carry the switched connection both
//! ways: its frames in are those of a response exchange (HEAD with the 101, DATA, END or
//! ABORT), the frames out those of upload exchanges (the user's bytes, CONTINUE while the
//! user is quiet). The request's response side and upload side are leased exactly as
//! those exchanges lease them, so a cut connection fails the tunnel the same way: the
//! response lease drops uncleanly, the upload lease breaks.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use relay_common::codec::FrameReader;
use relay_common::headers::has_token;
use relay_common::tunnel::{write_frames, ReaderBody, TUNNEL_UPGRADE};

use crate::agent::endpoints::no_store;
use crate::agent::error::AgentCallError;
use crate::agent::pending::Pending;
use crate::agent::response::{self, Ended};
use crate::agent::response_side::ResponseLease;
use crate::agent::upload::{self, UploadExchange};
use crate::base::body::{full, RelayBody};
use crate::State;

/// Answers a tunnel exchange for `pending`: 101, then the tunnel runs on the switched
/// connection in a task of its own (owned by the server's carrier tracker).
pub fn serve(
    state: &Arc<State>,
    pending: Arc<Pending>,
    mut req: Request<Incoming>,
) -> Result<Response<RelayBody>, AgentCallError> {
    if req.method() != http::Method::GET
        || !has_token(req.headers(), header::UPGRADE, TUNNEL_UPGRADE)
        || !has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return Err(AgentCallError::UpgradeRequired(format!(
            "a tunnel exchange is GET with Upgrade: {TUNNEL_UPGRADE}"
        )));
    }
    // The whole response goes this way: it must not have begun elsewhere.
    let Some(lease) = pending.response.lease() else {
        return Err(AgentCallError::Conflict(
            "another response exchange is in progress".into(),
        ));
    };
    if lease.offset() != 0 || !lease.awaiting_head() {
        lease.hand_over();
        return Err(AgentCallError::Conflict(
            "the response has begun: a tunnel exchange carries it from its head".into(),
        ));
    }
    let switch = crate::base::switch::Switch::of(&mut req);
    state.metrics.tunnel_exchange();
    let task_state = state.clone();
    state.carriers.spawn(async move {
        // Not switched (the agent went away): the lease drops uncleanly and the user's
        // request fails with 502, as after a cut response exchange.
        // The connection keeps its place (an agent's) while the exchange is open.
        let (upgraded, _place) = match switch.switched().await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(id = %pending.id, error = %e, "tunnel exchange did not switch");
                return;
            }
        };
        run(&task_state, &pending, lease, TokioIo::new(upgraded)).await;
    });
    Ok(no_store(Response::builder())
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_UPGRADE)
        .body(full(Bytes::new()))
        .expect("bug: static response"))
}

/// Carries both directions until each has ended or one fails; dropping what is left
/// (a lease, an upload exchange) fails the tunnel as a cut exchange does.
async fn run<IO>(state: &State, pending: &Arc<Pending>, lease: ResponseLease, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(io);
    let down = async {
        let mut lease = lease;
        let mut reader = FrameReader::new(ReaderBody::new(rd));
        loop {
            match response::deliver(&mut lease, &mut reader, pending).await {
                Ok(Ended::Continue) => {}
                other => return response::settle(lease, other, pending).is_ok(),
            }
        }
    };
    let up = async {
        loop {
            let offset = Some(pending.upload.bytes());
            let Ok(lease) = upload::lease_when_switched(pending, offset).await else {
                // Complete, broken or never switched: nothing more goes this way.
                return true;
            };
            let exchange = std::pin::pin!(UploadExchange::new(
                lease,
                u64::MAX,
                state.cfg.exchange_idle,
                upload::limits(state),
            ));
            if write_frames(exchange, &mut wr).await.is_err() {
                return false;
            }
        }
    };
    tokio::pin!(down, up);
    // Either direction failing ends both (the connection is gone or the agent broke the
    // protocol); a direction that completed waits for the other.
    let ok = tokio::select! {
        d = &mut down => d && (&mut up).await,
        u = &mut up => u && (&mut down).await,
    };
    tracing::debug!(id = %pending.id, ok, "tunnel exchange over");
}

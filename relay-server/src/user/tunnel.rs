//! The user side of a switched connection (after a 101): backend→user bytes arrive as DATA
//! frames of the response exchanges and are written to the user's connection; user→backend
//! bytes leave through upload exchanges reading the connection's read half.
//!
//! Each direction ends on its own (END = the sender shut down writing, passed on as a
//! write shutdown, so half-closed connections keep working); ABORT, a cut exchange, the
//! agent going away, the idle timeout or the end of the drain close both.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::pending::PendingGuard;
use crate::agent::upload_side::UploadEnd;
use crate::base::body::{BodyMsg, Delivery};

/// Runs one tunnel until both directions ended or it must close. Dropping `guard` at the
/// end frees the request and tells the agent.
pub async fn bridge(
    on_upgrade: OnUpgrade,
    body_rx: Option<mpsc::Receiver<Delivery>>,
    guard: PendingGuard,
    agent_gone: CancellationToken,
    idle_timeout: Duration,
    stop: CancellationToken,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "the user connection did not switch");
            return;
        }
    };
    let pending = guard.pending().clone();
    let (rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    // Only now, with the 101 written, may user bytes flow to the backend.
    pending.upload.open_tunnel(rd);
    let mut down = body_rx;
    let mut up_open = true;
    let mut down_bytes = 0u64;
    let mut last = (0u64, 0u64);
    // Checked four times per timeout; a zero timeout would make the interval panic.
    let mut idle = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(1)));
    idle.tick().await;
    let mut quiet_ticks = 0;
    let reason = loop {
        if down.is_none() && !up_open {
            break "both directions ended";
        }
        tokio::select! {
            msg = async { down.as_mut().expect("bug: guarded").recv().await }, if down.is_some() => match msg {
                Some(Delivery { msg: BodyMsg::Data(b), held }) => {
                    down_bytes += b.len() as u64;
                    if wr.write_all(&b).await.is_err() {
                        break "the user connection failed";
                    }
                    drop(held);
                }
                Some(Delivery { msg: BodyMsg::End | BodyMsg::Trailers(_), .. }) => {
                    // The backend shut down writing: pass the half-close on.
                    let _ = wr.shutdown().await;
                    down = None;
                }
                Some(Delivery { msg: BodyMsg::Abort(_), .. }) | None => break "the backend side closed abruptly",
            },
            end = pending.upload.ended(), if up_open => {
                if end != UploadEnd::Finished {
                    break "the user side closed abruptly";
                }
                up_open = false;
            }
            _ = agent_gone.cancelled() => break "the relay-client disconnected",
            _ = stop.cancelled() => break "the relay is shutting down",
            _ = idle.tick() => {
                let now = (down_bytes, pending.upload.bytes());
                if now == last {
                    quiet_ticks += 1;
                    if quiet_ticks >= 4 {
                        break "idle timeout";
                    }
                } else {
                    quiet_ticks = 0;
                    last = now;
                }
            }
        }
    };
    tracing::debug!(id = %pending.id, reason, "tunnel closed");
    drop(guard);
}

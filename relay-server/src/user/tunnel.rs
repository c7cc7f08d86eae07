//! The user side of a switched connection (after a 101): backend→user bytes arrive as DATA
//! frames of the response exchanges and are written to the user's connection; user→backend
//! bytes leave through upload exchanges reading the connection's read half.
//!
//! Each direction ends on its own (END = the sender shut down writing, passed on as a
//! write shutdown, so half-closed connections keep working); ABORT, a cut exchange, the
//! agent going away, the idle timeout, a user who stops reading (the write timeout) or the
//! end of the drain close both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::agent::pending::PendingGuard;
use crate::agent::upload_side::UploadEnd;
use crate::base::body::{BodyMsg, Delivery};
use crate::base::revocation::{revoked, Admission};

/// When a tunnel ends.
pub struct Limits {
    /// No byte either way for this long closes it.
    pub idle: Duration,
    /// A user who takes none of the bytes being written for this long closes it.
    pub write: Duration,
}

/// Runs one tunnel until both directions ended or it must close. Dropping `guard` at the
/// end frees the request and tells the agent.
pub async fn bridge(
    on_upgrade: crate::base::switch::Switch,
    body_rx: Option<crate::base::queue::Receiver<Delivery>>,
    guard: PendingGuard,
    agent_gone: CancellationToken,
    admission: Option<Arc<Admission>>,
    limits: Limits,
    stop: CancellationToken,
) {
    // The user's connection keeps its place under the limits while the tunnel is open.
    let (upgraded, _place) = match on_upgrade.switched().await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "the user connection did not switch");
            return;
        }
    };
    let pending = guard.pending().clone();
    let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
    // Only now, with the 101 written, may user bytes flow to the backend.
    pending.upload.open_tunnel(rd);
    // The backend→user direction runs as one future polled beside the others, so a write
    // the user does not take never blocks the idle check, the agent-gone signal or the
    // stop (an `.await` on the write inside a `select!` branch would).
    let writer = Writer::default();
    let down = writer.run(body_rx, wr);
    tokio::pin!(down);
    let mut down_open = true;
    let mut up_open = true;
    let mut last = (0u64, 0u64);
    // Checked four times per timeout; a zero timeout would make the interval panic.
    let tick = limits.idle.min(limits.write) / 4;
    let mut check = tokio::time::interval(tick.max(Duration::from_millis(1)));
    check.tick().await;
    let mut quiet_since = tokio::time::Instant::now();
    let reason = loop {
        if !down_open && !up_open {
            break "both directions ended";
        }
        tokio::select! {
            r = &mut down, if down_open => match r {
                Ok(()) => down_open = false,
                Err(why) => break why,
            },
            end = pending.upload.ended(), if up_open => {
                if end != UploadEnd::Finished {
                    break "the user side closed abruptly";
                }
                up_open = false;
            }
            _ = agent_gone.cancelled() => break "the relay-client disconnected",
            _ = revoked(admission.as_deref()) => break "the user's credential was revoked",
            _ = stop.cancelled() => break "the relay is shutting down",
            _ = check.tick() => {
                let now = tokio::time::Instant::now();
                if writer.stalled_for(now) >= limits.write {
                    break "the user stopped reading";
                }
                let moved = (writer.bytes.load(Ordering::Relaxed), pending.upload.bytes());
                if moved != last {
                    last = moved;
                    quiet_since = now;
                } else if now - quiet_since >= limits.idle {
                    break "idle timeout";
                }
            }
        }
    };
    tracing::debug!(id = %pending.id, reason, "tunnel closed");
    drop(guard);
}

/// The backend→user direction's progress, read by the tunnel's checks.
#[derive(Default)]
struct Writer {
    bytes: AtomicU64,
    /// Since when a write has been waiting for the user to take bytes.
    writing_since: Mutex<Option<tokio::time::Instant>>,
}

impl Writer {
    /// Writes what the response exchanges deliver to the user until END (passed on as a
    /// write shutdown, so half-closed connections keep working); an error says why the
    /// tunnel must close.
    async fn run<W: AsyncWrite + Unpin>(
        &self,
        body_rx: Option<crate::base::queue::Receiver<Delivery>>,
        mut wr: W,
    ) -> Result<(), &'static str> {
        let Some(mut rx) = body_rx else {
            return Ok(());
        };
        loop {
            match rx.recv().await {
                Some(Delivery {
                    msg: BodyMsg::Data(b),
                    held,
                }) => {
                    self.set_writing(Some(tokio::time::Instant::now()));
                    let written = wr.write_all(&b).await;
                    self.set_writing(None);
                    written.map_err(|_| "the user connection failed")?;
                    self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    drop(held);
                }
                Some(Delivery {
                    msg: BodyMsg::End | BodyMsg::Trailers(_),
                    ..
                }) => {
                    // The backend shut down writing: pass the half-close on.
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                Some(Delivery {
                    msg: BodyMsg::Abort(_),
                    ..
                })
                | None => return Err("the backend side closed abruptly"),
            }
        }
    }

    /// How long the write in progress has waited (zero when none is).
    fn stalled_for(&self, now: tokio::time::Instant) -> Duration {
        self.writing_since
            .lock()
            .expect("bug: poisoned")
            .map_or(Duration::ZERO, |t| now - t)
    }

    fn set_writing(&self, since: Option<tokio::time::Instant>) {
        *self.writing_since.lock().expect("bug: poisoned") = since;
    }
}

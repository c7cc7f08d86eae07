//! Tunnels on the agent's side: a switched connection (the backend's after a 101, or a
//! service port's) carried to the relay-server on one tunnel exchange
//! (`relay_common::tunnel`, `docs/PROTOCOL.md` §6a) when the request came on a session,
//! else (or when the exchange is refused) on a response exchange and upload exchanges.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use relay_common::codec::{BodyMsg, FrameReader, Message};
use relay_common::message::ResponseHead;
use relay_common::tunnel::{write_frames, ReaderBody, TUNNEL_PATH, TUNNEL_UPGRADE};
use relay_common::BODY_CHANNEL_DEPTH;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bodies::{ResponseFrames, Source};
use crate::error::RelayCallError;
use crate::exchange::{pump_upload, send_response, Ctx};
use crate::relay::{empty, read_text_limited, RelayClient};

impl RelayClient {
    /// Opens a tunnel exchange for request `id` (`relay_common::tunnel`): the switched
    /// connection. `None` when tunnel exchanges are refused (remembered: later tunnels do
    /// not ask again) or fail: the caller uses response and upload exchanges.
    pub async fn open_tunnel(&self, id: &str) -> Option<hyper::upgrade::Upgraded> {
        use std::sync::atomic::Ordering;
        if !self.tunnel_exchanges.load(Ordering::Relaxed) {
            return None;
        }
        let mut req = self.request(Method::GET, &format!("{TUNNEL_PATH}?id={id}"), empty());
        let h = req.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_UPGRADE));
        let switch = async {
            let mut resp = self.upgrader.request(req).await.ok()?;
            match resp.status() {
                StatusCode::SWITCHING_PROTOCOLS => hyper::upgrade::on(&mut resp).await.ok(),
                // A server without tunnel exchanges, or a proxy that dropped the upgrade.
                s @ (StatusCode::NOT_FOUND
                | StatusCode::UPGRADE_REQUIRED
                | StatusCode::BAD_REQUEST) => {
                    let text = read_text_limited(resp.into_body(), 4096)
                        .await
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&text);
                    if s != StatusCode::NOT_FOUND || text.contains("no such agent endpoint") {
                        tracing::info!(status = s.as_u16(), answer = %text.trim(),
                            "tunnel exchanges refused: tunnels use response and upload exchanges");
                        self.tunnel_exchanges.store(false, Ordering::Relaxed);
                    }
                    None
                }
                _ => None,
            }
        };
        tokio::time::timeout(Duration::from_secs(10), switch)
            .await
            .ok()
            .flatten()
    }
}

/// The two directions of a switched connection on the agent's side.
pub type Ends = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// Carries a switched connection: the 101 `head` and then `rd`'s bytes go to the user as
/// response DATA (END when `rd` ends: a half-close), and the user's bytes are written to
/// `wr` (a write shutdown when the user half-closes). On a session (upgrades pass) both
/// directions share one tunnel exchange; otherwise, or when it is refused, they use a
/// response exchange and upload exchanges.
pub async fn tunnel(
    ctx: &Arc<Ctx>,
    id: &str,
    head: &ResponseHead,
    (rd, mut wr): Ends,
    cancel: &CancellationToken,
    on_session: bool,
) -> Result<(), RelayCallError> {
    if on_session {
        if let Some(io) = ctx.relay.open_tunnel(id).await {
            return carry(head, (rd, wr), TokioIo::new(io), cancel).await;
        }
    }
    let (tx, mut rx) = mpsc::channel(BODY_CHANNEL_DEPTH);
    let relay = ctx.relay.clone();
    let up_id = id.to_owned();
    let up = async move {
        let pump = pump_upload(&relay, &up_id, tx);
        let write = async {
            while let Some(msg) = rx.recv().await {
                if let Some(clean) = write_to_backend(&mut wr, msg).await {
                    return clean;
                }
            }
            false
        };
        let (_, clean) = tokio::join!(pump, write);
        clean
    };
    let frames = ResponseFrames::new(head, Some(Source::tunnel(rd)));
    let down = send_response(ctx, id, frames);
    both_directions(down, up, cancel).await
}

/// Carries a switched connection on a tunnel exchange's connection `io`: the response's
/// frames out (the 101 head, then `rd`'s bytes), the user's upload frames in (written to
/// `wr`). As on exchanges, a clean end of one direction is a half-close and waits for the
/// other; a failure ends both.
async fn carry<IO>(
    head: &ResponseHead,
    (rd, mut wr): Ends,
    io: IO,
    cancel: &CancellationToken,
) -> Result<(), RelayCallError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (io_rd, mut io_wr) = tokio::io::split(io);
    let down = async {
        let frames = ResponseFrames::new(head, Some(Source::tunnel(rd)));
        write_frames(std::pin::pin!(frames), &mut io_wr)
            .await
            .map_err(|e| RelayCallError::Transport(e.to_string()))
    };
    let up = async {
        let mut reader = FrameReader::new(ReaderBody::new(io_rd));
        loop {
            match reader.next().await {
                Ok(Message::Body(msg)) => {
                    if let Some(clean) = write_to_backend(&mut wr, msg).await {
                        return clean;
                    }
                }
                // The user is quiet; the server says so now and then.
                Ok(Message::Continue) => {}
                Ok(Message::Head(_)) | Err(_) => return false,
            }
        }
    };
    both_directions(down, up, cancel).await
}

/// Writes one of the user's body messages to the backend's side of the tunnel. `None`
/// while the tunnel goes on; `Some(true)` once the user half-closed (passed on as a write
/// shutdown), `Some(false)` when the user reset or the backend stopped taking bytes.
async fn write_to_backend(wr: &mut (dyn AsyncWrite + Send + Unpin), msg: BodyMsg) -> Option<bool> {
    match msg {
        BodyMsg::Data(b) => wr.write_all(&b).await.is_err().then_some(false),
        BodyMsg::End | BodyMsg::Trailers(_) => {
            let _ = wr.shutdown().await;
            Some(true)
        }
        BodyMsg::Abort(_) => Some(false),
    }
}

/// Runs a tunnel's two directions: `down` (backend to user) and `up` (user to backend,
/// `true` on a clean half-close). A clean end of one waits for the other; a reset on the
/// user side or a backend that stopped taking bytes ends the whole tunnel at once:
/// cancelling drops both halves, which closes the backend connection.
async fn both_directions(
    down: impl std::future::Future<Output = Result<(), RelayCallError>>,
    up: impl std::future::Future<Output = bool>,
    cancel: &CancellationToken,
) -> Result<(), RelayCallError> {
    tokio::pin!(down, up);
    tokio::select! {
        r = &mut down => {
            r?;
            if !(&mut up).await {
                cancel.cancel();
            }
        }
        clean = &mut up => {
            if clean {
                down.await?;
            } else {
                cancel.cancel();
            }
        }
    }
    Ok(())
}

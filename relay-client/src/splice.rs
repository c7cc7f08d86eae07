//! One local byte stream (a TCP connection, or stdin and stdout) carried over one WebSocket,
//! both ways: the agent's service ports and `relay-client connect` use it alike. BINARY
//! messages are bytes, TEXT is dropped, pings are answered; with the half-close subprotocol
//! an empty BINARY message ends one direction.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use relay_common::readbuf::ReadBuf;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest WebSocket message accepted (Backend.AI's default `max-wsmsg-size`).
const MAX_MESSAGE: usize = 16 << 20;
/// Largest read from the local side.
const SERVICE_READ: usize = 256 * 1024;

/// WebSocket settings for both ends of a service-port tunnel.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

pub(crate) fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }))
}

/// How a spliced connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// Each direction ends on its own (an empty BINARY message is a write shutdown); the
    /// WebSocket closes normally once both ended.
    HalfClose,
    /// As [`Ends::HalfClose`], but the local side is a pipe that cannot be half-closed and
    /// whose reader waits for EOF (ssh's ProxyCommand): once the WebSocket's direction
    /// ended, everything ends (the local side's own EOF is still passed on as a write
    /// shutdown while the other direction runs).
    HalfCloseUntilRemoteEnds,
    /// Either side ending ends both (Backend.AI's semantics); the local side's EOF closes
    /// the WebSocket with this code.
    Either(u16),
}

/// Carries one local byte stream (a TCP connection, or stdin and stdout) over one WebSocket,
/// both ways: BINARY messages are bytes, TEXT is dropped, pings are answered; `ends` says
/// how it ends.
pub async fn splice<S, R, W>(ws: WebSocketStream<S>, mut tcp_rd: R, mut tcp_wr: W, ends: Ends)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (half_close, eof_code) = match ends {
        Ends::Either(code) => (false, code),
        _ => (true, 1000),
    };
    let (ws_tx, mut ws_rx) = ws.split();
    let ws_tx = Arc::new(Mutex::new(ws_tx));

    let to_service = async {
        while let Some(msg) = ws_rx.next().await {
            match msg {
                // The peer sends nothing more (only its Close, which the closing
                // handshake below takes care of).
                Ok(Message::Binary(b)) if b.is_empty() && half_close => {
                    let _ = tcp_wr.shutdown().await;
                    return;
                }
                Ok(Message::Binary(b)) => {
                    if tcp_wr.write_all(&b).await.is_err() || tcp_wr.flush().await.is_err() {
                        return;
                    }
                }
                // Backend.AI drops TEXT frames; pings are answered by the library.
                Ok(Message::Text(_))
                | Ok(Message::Ping(_))
                | Ok(Message::Pong(_))
                | Ok(Message::Frame(_)) => {}
                Ok(Message::Close(_)) | Err(_) => return,
            }
        }
    };
    let from_service = async {
        // Each read becomes one message without copying: the filled part of the buffer is
        // split off and handed to the WebSocket as `Bytes`.
        let mut buf = ReadBuf::new(SERVICE_READ);
        loop {
            match buf.read(&mut tcp_rd).await {
                Ok(None) => {
                    let mut tx = ws_tx.lock().await;
                    if half_close {
                        let _ = tx.send(Message::binary(Vec::new())).await;
                    } else {
                        let _ = tx
                            .send(close(eof_code, "the other side closed the connection"))
                            .await;
                    }
                    return;
                }
                Ok(Some(data)) => {
                    if ws_tx
                        .lock()
                        .await
                        .send(Message::binary(data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_) => {
                    let _ = ws_tx
                        .lock()
                        .await
                        .send(close(1011, "the TCP connection failed"))
                        .await;
                    return;
                }
            }
        }
    };
    if ends == Ends::HalfCloseUntilRemoteEnds {
        {
            tokio::pin!(to_service, from_service);
            let mut local_done = false;
            loop {
                tokio::select! {
                    _ = &mut to_service => break,
                    _ = &mut from_service, if !local_done => local_done = true,
                }
            }
        }
        let _ = tcp_wr.shutdown().await;
        let _ = ws_tx.lock().await.send(close(1000, "")).await;
    } else if half_close {
        // Each direction ends on its own; the WebSocket closes normally after both.
        tokio::join!(to_service, from_service);
        let _ = ws_tx.lock().await.send(close(1000, "")).await;
    } else {
        // Backend.AI semantics: either side ending ends both.
        tokio::select! {
            _ = to_service => {}
            _ = from_service => {}
        }
    }
    let _ = ws_tx.lock().await.close().await;
}

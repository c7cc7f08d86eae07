//! The WebSocket carrier of an agent session ([`crate::session`]), the same on both sides:
//! an [`Outbox`] that frames are appended to and a writer that sends whatever is there as
//! one message (coalescing: several frames, one write), and a reader that turns messages
//! back into frames.
//!
//! Coalescing never waits for more frames: the writer takes what is ready when it runs,
//! after yielding once so that other tasks woken by the same event can add theirs (that
//! yield measured 15–20 % more requests per second on a busy session, and costs an idle one
//! nothing but a task switch).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::session::{self, Frame, SessionError, COALESCE_MAX, MAX_MESSAGE};

/// WebSocket settings of a session: small read buffer (an idle session holds little), and
/// messages bounded by [`MAX_MESSAGE`].
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2048)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Frames waiting to be written, appended by any task. Positions in the session's outgoing
/// byte stream ("marks": bytes ever appended) tell what was written: [`Outbox::sent`] is the
/// mark the writer has got to, so a frame whose end is past it never fully left.
#[derive(Default)]
pub struct Outbox {
    buf: Mutex<Pending>,
    ready: Notify,
    closed: AtomicBool,
    sent: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: BytesMut,
    /// Bytes ever appended (the mark of the end of `bytes`).
    appended: u64,
}

impl Outbox {
    /// Appends frames with `put` (one of the `session::put_*` functions). False when the
    /// session is over: nothing was appended.
    pub fn push(&self, put: impl FnOnce(&mut BytesMut)) -> bool {
        self.push_marked(|b, _| put(b))
    }

    /// Like [`Outbox::push`]; `put` also gets the mark of the buffer's first byte, so the
    /// mark of a frame's end is that plus the buffer's length after it.
    pub fn push_marked(&self, put: impl FnOnce(&mut BytesMut, u64)) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut p = self.buf.lock().expect("bug: poisoned");
        let start = p.appended - p.bytes.len() as u64;
        let before = p.bytes.len();
        put(&mut p.bytes, start);
        p.appended += (p.bytes.len() - before) as u64;
        drop(p);
        self.ready.notify_one();
        true
    }

    /// The mark up to which everything was written to the connection.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Drops what waits to be written (the session is over: the peer will not read it) and
    /// returns the mark where the dropped bytes began. A message the writer already took
    /// may still go out.
    pub fn discard(&self) -> u64 {
        let mut p = self.buf.lock().expect("bug: poisoned");
        let from = p.appended - p.bytes.len() as u64;
        p.bytes.clear();
        from
    }

    /// Bytes waiting to be written.
    pub fn buffered(&self) -> usize {
        self.buf.lock().expect("bug: poisoned").bytes.len()
    }

    /// Ends the session's writing: what is queued is still written, then a Close.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The next message to write (at least one whole frame; ready frames up to about
    /// [`COALESCE_MAX`]) with the mark of its end, or `None` once closed and empty.
    async fn next(&self) -> Option<(Bytes, u64)> {
        loop {
            // notify_one stores a permit when nobody waits, so a push between the check
            // and the wait is not missed.
            let empty = self.buf.lock().expect("bug: poisoned").bytes.is_empty();
            if !empty {
                tokio::task::yield_now().await;
                return Some(self.take());
            }
            if self.is_closed() {
                return None;
            }
            self.ready.notified().await;
        }
    }

    fn take(&self) -> (Bytes, u64) {
        let mut p = self.buf.lock().expect("bug: poisoned");
        let msg = Self::cut(&mut p.bytes);
        let end = p.appended - p.bytes.len() as u64;
        if !p.bytes.is_empty() {
            // More is waiting: the writer comes back for it at once.
            self.ready.notify_one();
        }
        (msg, end)
    }

    fn cut(buf: &mut BytesMut) -> Bytes {
        if buf.len() <= COALESCE_MAX {
            return buf.split().freeze();
        }
        // Cut at the last frame boundary under the cap (or after the first frame).
        let mut at = 0;
        while at < buf.len() {
            let len = u32::from_be_bytes(buf[at + 1..at + 5].try_into().expect("4 bytes"));
            let next = at + session::FRAME_HEADER_LEN + len as usize;
            if at > 0 && next > COALESCE_MAX {
                break;
            }
            at = next;
        }
        buf.split_to(at).freeze()
    }
}

/// Writes the outbox's messages to `sink` until the outbox is closed and empty, then sends
/// a Close (RFC 6455 §5.5.1) with `reason`.
pub async fn write<S>(mut sink: S, outbox: &Outbox, reason: &str) -> Result<(), tungstenite::Error>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    while let Some((msg, end)) = outbox.next().await {
        sink.send(Message::Binary(msg)).await?;
        outbox.sent.store(end, Ordering::Release);
    }
    let close = CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: reason.to_owned().into(),
    };
    sink.send(Message::Close(Some(close))).await?;
    sink.close().await
}

/// Why a session's reading ended.
#[derive(Debug, thiserror::Error)]
pub enum ReadEnd {
    /// A Close frame or the end of the stream.
    #[error("the peer closed the session")]
    Closed,
    /// The connection failed.
    #[error("session connection failed: {0}")]
    Transport(#[from] tungstenite::Error),
    /// The peer sent something that is not a session message.
    #[error("session protocol error: {0}")]
    Protocol(String),
}

impl From<SessionError> for ReadEnd {
    fn from(e: SessionError) -> Self {
        ReadEnd::Protocol(e.to_string())
    }
}

/// Reads the next message's frames, their heads encoded as `heads` (WebSocket pings are
/// answered by the library).
pub async fn read<S>(stream: &mut S, heads: session::Heads) -> Result<Vec<Frame>, ReadEnd>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(ReadEnd::Closed),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Binary(b))) => return Ok(session::decode(b, heads)?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_) | Message::Frame(_))) => {
                return Err(ReadEnd::Protocol("a text message on a session".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_frames_go_out_in_one_message_and_big_batches_split_at_frame_edges() {
        let o = Outbox::default();
        for n in 1..=3 {
            assert!(o.push(|b| session::put_credit(b, n)));
        }
        let (m, end) = o.next().await.unwrap();
        assert_eq!(end, m.len() as u64);
        let frames = session::decode(m, session::Heads::Json).unwrap();
        assert_eq!(frames.len(), 3);
        // 5 × 100 KiB GOAWAYs: messages of ≤ 256 KiB, whole frames each.
        let reason = "x".repeat(100 * 1024);
        for _ in 0..5 {
            o.push(|b| session::put_goaway(b, &reason));
        }
        let mut seen = 0;
        while seen < 5 {
            let (m, _) = o.next().await.unwrap();
            assert!(m.len() <= COALESCE_MAX);
            seen += session::decode(m, session::Heads::Json).unwrap().len();
        }
        assert_eq!(o.buffered(), 0);
        // Marks: where each frame ends in the stream; discard tells where dropping began.
        let mut ends = Vec::new();
        o.push_marked(|b, start| {
            for n in 0..2 {
                session::put_credit(b, n);
                ends.push(start + b.len() as u64);
            }
        });
        let (m, end) = o.next().await.unwrap();
        assert_eq!(end, ends[1]);
        assert_eq!(ends[1] - ends[0], (m.len() / 2) as u64);
        o.push(|b| session::put_credit(b, 9));
        assert_eq!(
            o.discard(),
            end,
            "the dropped bytes began where the message ended"
        );
        assert_eq!(o.buffered(), 0);
        assert_eq!(o.sent(), 0, "nothing was written: there is no writer here");
        o.close();
        assert!(!o.push(|b| session::put_credit(b, 1)));
        assert!(o.next().await.is_none());
    }
}

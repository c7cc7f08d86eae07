//! The WebSocket carrier of an agent session ([`crate::session`]), the same on both sides:
//! an [`Outbox`] that frames are appended to and a writer that sends whatever is there as
//! one message (coalescing: several frames, one write), and a reader that turns messages
//! back into frames. The WebSocket framing is [`crate::websocket`]'s.
//!
//! Coalescing never waits for more frames: the writer takes what is ready when it runs.
//! (It used to yield once first, so that other tasks woken by the same event could add
//! theirs; on the multi-threaded runtime that yield cost a poll of the I/O driver and a
//! wake-up of another worker per message, more than it saved: see `docs/PERFORMANCE.md`.)
//!
//! ACK frames are delayed (as TCP delays its ACKs, RFC 9293 §3.8.6.3): an acknowledgement
//! rides in the next message that goes anyway, or goes alone after [`ACK_DELAY`]. In the
//! common request–response rhythm each side's ACK then travels with its next OPEN or
//! RESPONSE, which saves a write on one side and a wake-up and a read on the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::session::{self, Frame, SessionError, COALESCE_MAX, MAX_MESSAGE};
use crate::websocket::{self, Incoming, Role, WsError};

/// Longest an acknowledgement waits for a message to ride in.
pub const ACK_DELAY: Duration = Duration::from_millis(20);

/// The two halves of a session's connection after the WebSocket handshake, as `role`:
/// messages up to [`MAX_MESSAGE`] bytes. Reading starts with a 1 KiB buffer, which grows
/// to a frame's size and goes back once the frame is read, so an idle session holds little
/// (an idle agent's cost on the relay-server is in `docs/PERFORMANCE.md`).
pub fn halves<T: AsyncRead + AsyncWrite>(
    io: T,
    role: Role,
) -> (
    websocket::Reader<tokio::io::ReadHalf<T>>,
    websocket::Writer<tokio::io::WriteHalf<T>>,
) {
    let (rd, wr) = tokio::io::split(io);
    (
        websocket::Reader::new(rd, role, MAX_MESSAGE),
        websocket::Writer::new(wr, role),
    )
}

/// Frames waiting to be written, appended by any task. Positions in the session's outgoing
/// byte stream ("marks": bytes ever appended) tell what was written: [`Outbox::sent`] is the
/// mark the writer has got to, so a frame whose end is past it never fully left.
///
/// The writer ([`write`]) is a future that the session's own task polls beside its other
/// work. Frames that task appends need no wake-up ([`Outbox::push_local`]): it polls the
/// writer again before it waits. Waking a task from inside itself would put it at the back
/// of the run queue and wake another worker thread for nothing, once per frame.
#[derive(Default)]
pub struct Outbox {
    buf: Mutex<Pending>,
    writer: AtomicWaker,
    closed: AtomicBool,
    sent: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: BytesMut,
    /// Bytes ever appended (the mark of the end of `bytes`).
    appended: u64,
    /// An ACK not yet appended: it goes with the next message.
    ack: Option<u64>,
    /// A WebSocket ping's payload to answer (RFC 6455 §5.5.2: a later ping's answer may
    /// replace an earlier one not yet sent).
    pong: Option<Bytes>,
}

/// What the writer sends next.
enum Next {
    /// A message of frames and the mark of its end.
    Frames(Bytes, u64),
    /// The answer to a ping.
    Pong(Bytes),
}

impl Outbox {
    /// Appends frames with `put` (one of the `session::put_*` functions) from any task, and
    /// wakes the writer. False when the session is over: nothing was appended.
    pub fn push(&self, put: impl FnOnce(&mut BytesMut)) -> bool {
        let pushed = self.push_local(put);
        if pushed {
            self.writer.wake();
        }
        pushed
    }

    /// Like [`Outbox::push`], from the task that polls the writer (no wake-up).
    pub fn push_local(&self, put: impl FnOnce(&mut BytesMut)) -> bool {
        self.push_marked(|b, _| put(b))
    }

    /// Like [`Outbox::push_local`]; `put` also gets the mark of the buffer's first byte, so
    /// the mark of a frame's end is that plus the buffer's length after it.
    pub fn push_marked(&self, put: impl FnOnce(&mut BytesMut, u64)) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut p = self.buf.lock().expect("bug: poisoned");
        let start = p.appended - p.bytes.len() as u64;
        let before = p.bytes.len();
        put(&mut p.bytes, start);
        p.appended += (p.bytes.len() - before) as u64;
        true
    }

    /// Acknowledges `n` (an ACK frame, [`session::put_ack`]) with the next message written,
    /// or alone after [`ACK_DELAY`]; a later call replaces an ACK not yet written. From the
    /// task that polls the writer.
    pub fn ack(&self, n: u64) {
        if !self.is_closed() {
            self.buf.lock().expect("bug: poisoned").ack = Some(n);
        }
    }

    /// Answers a WebSocket ping with the next thing written.
    pub fn pong(&self, payload: Bytes) {
        if !self.is_closed() {
            self.buf.lock().expect("bug: poisoned").pong = Some(payload);
            self.writer.wake();
        }
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
        p.ack = None;
        from
    }

    /// Bytes waiting to be written.
    pub fn buffered(&self) -> usize {
        self.buf.lock().expect("bug: poisoned").bytes.len()
    }

    /// Ends the session's writing: what is queued is still written, then a Close.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.writer.wake();
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The next message to write (at least one whole frame; ready frames up to about
    /// [`COALESCE_MAX`]) with the mark of its end, or `None` once closed and empty. An ACK
    /// alone waits for `timer` (armed here, [`ACK_DELAY`]) before it goes.
    fn poll_next(
        &self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        armed: &mut bool,
    ) -> Poll<Option<Next>> {
        // Registered before the check: a push from another task after it wakes us.
        self.writer.register(cx.waker());
        let mut p = self.buf.lock().expect("bug: poisoned");
        if let Some(pong) = p.pong.take() {
            return Poll::Ready(Some(Next::Pong(pong)));
        }
        let closed = self.is_closed();
        if !p.bytes.is_empty() || (closed && p.ack.is_some()) {
            *armed = false;
            return Poll::Ready(Some(Self::take(&mut p)));
        }
        if closed {
            return Poll::Ready(None);
        }
        if p.ack.is_none() {
            *armed = false;
            return Poll::Pending;
        }
        if !*armed {
            *armed = true;
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + ACK_DELAY);
        }
        if timer.poll(cx).is_ready() {
            // Nothing else came to carry it: the ACK goes alone.
            *armed = false;
            return Poll::Ready(Some(Self::take(&mut p)));
        }
        Poll::Pending
    }

    fn take(p: &mut Pending) -> Next {
        if let Some(n) = p.ack.take() {
            let before = p.bytes.len();
            session::put_ack(&mut p.bytes, n);
            p.appended += (p.bytes.len() - before) as u64;
        }
        // Anything left over (a cut batch) is taken when the writer asks again, at once.
        let msg = Self::cut(&mut p.bytes);
        let end = p.appended - p.bytes.len() as u64;
        Next::Frames(msg, end)
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
pub async fn write<W: AsyncWrite + Unpin>(
    mut sink: websocket::Writer<W>,
    outbox: &Outbox,
    reason: &str,
) -> std::io::Result<()> {
    let timer = tokio::time::sleep(ACK_DELAY);
    tokio::pin!(timer);
    let mut armed = false;
    while let Some(next) =
        std::future::poll_fn(|cx| outbox.poll_next(cx, timer.as_mut(), &mut armed)).await
    {
        match next {
            Next::Frames(msg, end) => {
                sink.binary(&msg).await?;
                outbox.sent.store(end, Ordering::Release);
            }
            Next::Pong(data) => sink.pong(&data).await?,
        }
    }
    sink.close(reason).await
}

/// Why a session's reading ended.
#[derive(Debug, thiserror::Error)]
pub enum ReadEnd {
    /// A Close frame or the end of the stream.
    #[error("the peer closed the session")]
    Closed,
    /// The connection failed or broke the WebSocket framing.
    #[error("session connection failed: {0}")]
    Transport(#[from] WsError),
    /// The peer sent something that is not a session message.
    #[error("session protocol error: {0}")]
    Protocol(String),
}

impl From<SessionError> for ReadEnd {
    fn from(e: SessionError) -> Self {
        ReadEnd::Protocol(e.to_string())
    }
}

/// Reads the next message's frames, their heads encoded as `heads`. A WebSocket ping is
/// answered through `outbox` (RFC 6455 §5.5.2). Cancel-safe: a message half read stays in
/// the reader.
pub async fn read<R: AsyncRead + Unpin>(
    stream: &mut websocket::Reader<R>,
    heads: session::Heads,
    outbox: &Outbox,
) -> Result<Vec<Frame>, ReadEnd> {
    loop {
        match stream.next().await? {
            Incoming::Closed => return Err(ReadEnd::Closed),
            Incoming::Binary(b) => return Ok(session::decode(b, heads)?),
            Incoming::Ping(data) => outbox.pong(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's next message, as `write` takes it.
    async fn next(o: &Outbox) -> Option<(Bytes, u64)> {
        let timer = tokio::time::sleep(ACK_DELAY);
        tokio::pin!(timer);
        let mut armed = false;
        match std::future::poll_fn(|cx| o.poll_next(cx, timer.as_mut(), &mut armed)).await? {
            Next::Frames(m, end) => Some((m, end)),
            Next::Pong(_) => panic!("no ping was answered here"),
        }
    }

    /// A WebSocket ping from the peer (a proxy's, say) is answered with its bytes, ahead of
    /// the frames waiting; the frames and the Close follow. The peer is tungstenite.
    #[tokio::test]
    async fn a_websocket_ping_is_answered_through_the_outbox() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::Role as TRole;
        use tokio_tungstenite::tungstenite::Message;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut rd, wr) = halves(ours, Role::Server);
        let mut peer =
            tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, TRole::Client, None).await;
        let mut credit = BytesMut::new();
        session::put_credit(&mut credit, 7);
        peer.send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        peer.send(Message::Binary(credit.freeze())).await.unwrap();
        let o = Outbox::default();
        let frames = read(&mut rd, session::Heads::Json, &o).await.unwrap();
        assert!(matches!(frames[..], [Frame::Credit(7)]), "{frames:?}");
        o.push(|b| session::put_credit(b, 1));
        o.close();
        write(wr, &o, "over").await.unwrap();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"are you there"))
        );
        let Message::Binary(m) = peer.next().await.unwrap().unwrap() else {
            panic!("the frames");
        };
        assert!(matches!(
            session::decode(m, session::Heads::Json).unwrap()[..],
            [Frame::Credit(1)]
        ));
        match peer.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.reason.as_str(), "over"),
            other => panic!("expected the close, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acks_ride_with_the_next_message_or_go_alone_after_the_delay() {
        let o = Outbox::default();
        o.ack(3);
        o.ack(4);
        o.push_local(|b| session::put_credit(b, 1));
        let (m, _) = next(&o).await.unwrap();
        let frames = session::decode(m, session::Heads::Json).unwrap();
        assert!(
            matches!(frames[..], [Frame::Credit(1), Frame::Ack(4)]),
            "the latest ACK rides at the end of the message: {frames:?}"
        );
        // Alone: nothing for ACK_DELAY, then the ACK by itself.
        o.ack(5);
        let t0 = tokio::time::Instant::now();
        let (m, end) = next(&o).await.unwrap();
        assert_eq!(t0.elapsed(), ACK_DELAY);
        assert!(matches!(
            session::decode(m, session::Heads::Json).unwrap()[..],
            [Frame::Ack(5)]
        ));
        assert_eq!(
            end,
            o.buf.lock().unwrap().appended,
            "the ACK counts in the marks"
        );
        // A frame pushed from another task during the delay takes the ACK along at once.
        o.ack(6);
        let waiting = next(&o);
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        o.push(|b| session::put_credit(b, 2));
        let (m, _) = tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("the push woke the writer")
            .unwrap();
        assert!(matches!(
            session::decode(m, session::Heads::Json).unwrap()[..],
            [Frame::Credit(2), Frame::Ack(6)]
        ));
        // A discarded outbox forgets its ACK; a closed one writes what it has, then ends.
        o.ack(7);
        o.discard();
        o.ack(8);
        o.close();
        o.ack(9);
        let (m, _) = next(&o).await.unwrap();
        assert!(matches!(
            session::decode(m, session::Heads::Json).unwrap()[..],
            [Frame::Ack(8)]
        ));
        assert!(next(&o).await.is_none());
    }

    #[tokio::test]
    async fn ready_frames_go_out_in_one_message_and_big_batches_split_at_frame_edges() {
        let o = Outbox::default();
        for n in 1..=3 {
            assert!(o.push(|b| session::put_credit(b, n)));
        }
        let (m, end) = next(&o).await.unwrap();
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
            let (m, _) = next(&o).await.unwrap();
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
        let (m, end) = next(&o).await.unwrap();
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
        assert!(next(&o).await.is_none());
    }
}

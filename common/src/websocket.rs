//! WebSocket framing (RFC 6455 §5) for the session carrier ([`crate::carrier`]): what a
//! session needs of it after the opening handshake, and no more. Binary messages, pings
//! answered, a close handshake; text and extensions are refused (none are negotiated).
//!
//! Why not tungstenite, which the handshakes still use: its read buffer grows to the
//! largest frame ever read and never shrinks, so an idle session kept the 256 KiB of its
//! busiest message for good (issue 13 asks that an idle session's buffers shrink), and it
//! zero-fills the whole spare capacity before every read. Here a read buffer that is empty
//! after a message goes back to nothing when it had grown past [`KEEP`], and reads land in
//! uninitialised capacity.

use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Which end of the connection this is (RFC 6455 §5.1: a client masks what it sends, a
/// server never does, and each refuses the other's mistake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The agent, which opened the connection.
    Client,
    /// The relay-server.
    Server,
}

/// Bytes reserved for a read when the buffer has no room: a small message in one read.
const READ_START: usize = 1024;

/// A read buffer that is empty after a message and holds more than this goes back to
/// nothing: an idle session keeps no burst-sized buffer.
pub const KEEP: usize = 16 * 1024;

/// A message from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A binary message, reassembled if it came in fragments.
    Binary(Bytes),
    /// A ping: answer it with a pong carrying the same bytes (RFC 6455 §5.5.2).
    Ping(Bytes),
    /// A close frame (RFC 6455 §5.5.1) or the end of the stream.
    Closed,
}

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer broke RFC 6455, or sent what a session does not use.
    #[error("{0}")]
    Protocol(&'static str),
    /// A message larger than the session allows.
    #[error("a WebSocket message over {0} bytes")]
    TooLarge(usize),
}

const FIN: u8 = 0x80;
const MASKED: u8 = 0x80;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The reading half: frames in, messages out.
pub struct Reader<R> {
    io: R,
    role: Role,
    max_message: usize,
    buf: BytesMut,
    /// A fragmented binary message so far.
    partial: Option<BytesMut>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Reads `io` as `role`, refusing messages over `max_message` bytes.
    pub fn new(io: R, role: Role, max_message: usize) -> Self {
        Reader {
            io,
            role,
            max_message,
            buf: BytesMut::new(),
            partial: None,
            eof: false,
        }
    }

    /// The next message. Cancel-safe: everything read so far stays in the reader.
    pub async fn next(&mut self) -> Result<Incoming, WsError> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Capacity of the read buffer (for tests of the shrink).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, WsError>> {
        loop {
            if let Some(msg) = self.frame()? {
                if self.buf.is_empty() && self.buf.capacity() > KEEP {
                    self.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(msg));
            }
            if self.eof {
                return Poll::Ready(match self.buf.is_empty() && self.partial.is_none() {
                    true => Ok(Incoming::Closed),
                    false => Err(WsError::Protocol("the connection ended inside a frame")),
                });
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_START);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.buf
            ))?;
            self.eof = n == 0;
        }
    }

    /// Takes one complete frame off the buffer; a message when it completes one. Reserves
    /// room for the rest of a frame whose header is in.
    fn frame(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let Some((head, len)) = header(&self.buf)? else {
                return Ok(None);
            };
            if len > self.max_message as u64 {
                return Err(WsError::TooLarge(self.max_message));
            }
            let total = head + len as usize;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let (b0, b1) = (self.buf[0], self.buf[1]);
            let masked = b1 & MASKED != 0;
            match (self.role, masked) {
                (Role::Server, false) => return Err(WsError::Protocol("an unmasked client frame")),
                (Role::Client, true) => return Err(WsError::Protocol("a masked server frame")),
                _ => {}
            }
            let key: Option<[u8; 4]> =
                masked.then(|| self.buf[head - 4..head].try_into().expect("4 bytes"));
            self.buf.advance(head);
            let mut payload = self.buf.split_to(len as usize);
            if let Some(key) = key {
                unmask(&mut payload, key);
            }
            let (fin, opcode) = (b0 & FIN != 0, b0 & 0x0F);
            if b0 & 0x70 != 0 {
                return Err(WsError::Protocol(
                    "reserved bits set (no extension was agreed)",
                ));
            }
            if opcode >= CLOSE && (!fin || payload.len() > 125) {
                return Err(WsError::Protocol("a fragmented or oversized control frame"));
            }
            match opcode {
                CLOSE => return Ok(Some(Incoming::Closed)),
                PING => return Ok(Some(Incoming::Ping(payload.freeze()))),
                PONG => continue,
                BINARY if self.partial.is_some() => {
                    return Err(WsError::Protocol("a new message inside a fragmented one"))
                }
                BINARY if fin => return Ok(Some(Incoming::Binary(payload.freeze()))),
                BINARY => self.partial = Some(payload),
                CONTINUATION => {
                    let Some(mut whole) = self.partial.take() else {
                        return Err(WsError::Protocol("a continuation without a message"));
                    };
                    if whole.len() + payload.len() > self.max_message {
                        return Err(WsError::TooLarge(self.max_message));
                    }
                    whole.extend_from_slice(&payload);
                    if fin {
                        return Ok(Some(Incoming::Binary(whole.freeze())));
                    }
                    self.partial = Some(whole);
                }
                TEXT => return Err(WsError::Protocol("a text message on a session")),
                _ => return Err(WsError::Protocol("a reserved opcode")),
            }
        }
    }
}

/// The length of the frame header at the start of `b` and of its payload, once the
/// header is complete.
fn header(b: &[u8]) -> Result<Option<(usize, u64)>, WsError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let mask = if b[1] & MASKED != 0 { 4 } else { 0 };
    let (ext, len) = match b[1] & 0x7F {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let head = 2 + ext + mask;
    if b.len() < head {
        return Ok(None);
    }
    let len = match len {
        Some(n) => n,
        None if ext == 2 => u64::from(u16::from_be_bytes([b[2], b[3]])),
        None => {
            let n = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err(WsError::Protocol("a payload length with its top bit set"));
            }
            n
        }
    };
    Ok(Some((head, len)))
}

/// XORs `data` with `key` (RFC 6455 §5.3), eight bytes at a time.
fn unmask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c[..].try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// The writing half: one frame per message, written whole.
pub struct Writer<W> {
    io: W,
    role: Role,
    out: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Writes to `io` as `role`.
    pub fn new(io: W, role: Role) -> Self {
        Writer {
            io,
            role,
            out: BytesMut::new(),
        }
    }

    /// Sends one binary message.
    pub async fn binary(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.send(BINARY, payload).await
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.send(PONG, payload).await
    }

    /// Sends a Close with status 1000 (normal closure) and `reason` (cut to fit a control
    /// frame), then shuts the connection's sending side.
    pub async fn close(&mut self, reason: &str) -> std::io::Result<()> {
        let mut reason = reason.as_bytes();
        reason = &reason[..reason.len().min(123)];
        // Never cut inside a UTF-8 sequence (§5.5.1: the reason is UTF-8).
        while std::str::from_utf8(reason).is_err() {
            reason = &reason[..reason.len() - 1];
        }
        let mut body = Vec::with_capacity(2 + reason.len());
        body.extend_from_slice(&1000u16.to_be_bytes());
        body.extend_from_slice(reason);
        self.send(CLOSE, &body).await?;
        self.io.shutdown().await
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let vectored = self.role == Role::Server && self.io.is_write_vectored();
        let copied = if vectored { 0 } else { payload.len() };
        self.out.reserve(14 + copied);
        self.put_head(opcode, payload.len());
        if self.role == Role::Client {
            // A fresh unpredictable key per frame (§5.3), then the payload masked in place.
            let key: [u8; 4] = rand::random();
            self.out.extend_from_slice(&key);
            let at = self.out.len();
            self.out.extend_from_slice(payload);
            unmask(&mut self.out[at..], key);
        } else if vectored {
            // A server's payload goes out as it is (§5.1: never masked): the head and the
            // payload in one vectored write, without copying the payload behind the head.
            return self.write_head_and(payload).await;
        } else {
            self.out.extend_from_slice(payload);
        }
        self.write_head_and(&[]).await
    }

    /// The frame head for a payload of `len` bytes (§5.2), into `out`.
    fn put_head(&mut self, opcode: u8, len: usize) {
        self.out.put_u8(FIN | opcode);
        let mask_bit = if self.role == Role::Client { MASKED } else { 0 };
        match len {
            n if n < 126 => self.out.put_u8(mask_bit | n as u8),
            n if n <= 0xFFFF => {
                self.out.put_u8(mask_bit | 126);
                self.out.put_u16(n as u16);
            }
            n => {
                self.out.put_u8(mask_bit | 127);
                self.out.put_u64(n as u64);
            }
        }
    }

    /// Writes what `out` holds, then `rest`, whole; then flushes and empties `out`.
    async fn write_head_and(&mut self, mut rest: &[u8]) -> std::io::Result<()> {
        let mut at = 0;
        while at < self.out.len() || !rest.is_empty() {
            let n = if at == self.out.len() {
                self.io.write(rest).await?
            } else if rest.is_empty() {
                self.io.write(&self.out[at..]).await?
            } else {
                let bufs = [IoSlice::new(&self.out[at..]), IoSlice::new(rest)];
                self.io.write_vectored(&bufs).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let head = n.min(self.out.len() - at);
            at += head;
            rest = &rest[n - head..];
        }
        self.io.flush().await?;
        self.out.clear();
        if self.out.capacity() > KEEP {
            self.out = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "websocket_tests.rs"]
mod tests;

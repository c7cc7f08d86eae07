//! Tunnel exchanges: after a 101 the agent may carry both directions of a switched
//! connection on one connection of its own, switched too (`GET /server/tunnel?id=…` with
//! `Upgrade: relay-tunnel`), instead of a response exchange plus upload exchanges.
//!
//! On the switched connection each side writes exactly the frames ([`crate::codec`]) it
//! would have sent in the body of its exchanges: the agent the response's frames (HEAD with
//! the 101, DATA, END or ABORT), the server the user's upload frames (DATA, END or ABORT,
//! and CONTINUE now and then while the user is quiet, which keeps proxies from timing the
//! connection out). A cut connection fails the tunnel as a cut exchange does: never a clean
//! end. An idle tunnel then costs the server no HTTP/1.1 connection state (hyper's buffers
//! go with the switch), and bytes cross one connection with no chunked encoding.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::readbuf::ReadBuf;
use crate::TUNNEL_READ;

/// The path of the tunnel exchange (under the server's base path).
pub const TUNNEL_PATH: &str = "/server/tunnel";

/// The `Upgrade` token of a tunnel exchange (RFC 9110 §7.8).
pub const TUNNEL_UPGRADE: &str = "relay-tunnel";

/// Frames this short are copied behind the frame before them and written together; longer
/// ones are written as they are (one more write, no copy).
const JOIN_MAX: usize = 4 * 1024;

/// The bytes of one direction of a switched connection as an HTTP body, so that
/// [`crate::codec::FrameReader`] reads frames from it as from an exchange's body. Its end
/// is the end of the body (a reader then reports a cut unless a final frame came).
pub struct ReaderBody<R> {
    rd: R,
    buf: ReadBuf,
}

impl<R> ReaderBody<R> {
    /// A body of `rd`'s bytes, read into an adaptive buffer (small while the tunnel idles).
    pub fn new(rd: R) -> Self {
        ReaderBody {
            rd,
            buf: ReadBuf::new(TUNNEL_READ),
        }
    }
}

impl<R: AsyncRead + Unpin> Body for ReaderBody<R> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        match std::task::ready!(this.buf.poll_read(Pin::new(&mut this.rd), cx)) {
            Ok(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// Why writing a body of frames to a switched connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E: std::fmt::Display> {
    /// The body failed (its error).
    #[error("{0}")]
    Body(E),
    /// The connection failed.
    #[error("writing the tunnel exchange: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes every frame of `body` (an exchange body of frames) to `wr` as it comes, until the
/// body ends. A short frame ready right behind another goes out in the same write.
///
/// The body comes pinned by the caller: an `async fn` keeps an argument twice (as passed
/// and as moved into its body, rust-lang/rust#62958), and an idle tunnel holds this future
/// for its whole life.
pub async fn write_frames<B, W>(
    mut body: Pin<&mut B>,
    wr: &mut W,
) -> Result<(), WriteError<B::Error>>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    W: AsyncWrite + Unpin,
{
    let mut joined = BytesMut::new();
    loop {
        let next = match body.frame().now_or_never() {
            Some(f) => f,
            None => {
                // Nothing more is ready: what was joined goes now.
                if !joined.is_empty() {
                    wr.write_all(&joined.split()).await?;
                }
                body.frame().await
            }
        };
        let data = match next {
            None => break,
            Some(Err(e)) => return Err(WriteError::Body(e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        if data.len() <= JOIN_MAX {
            joined.put_slice(&data);
            if joined.len() < JOIN_MAX {
                continue;
            }
            wr.write_all(&joined.split()).await?;
        } else {
            // The frame header before a long payload goes in the same write (vectored).
            write_both(wr, &joined.split(), &data).await?;
        }
    }
    if !joined.is_empty() {
        wr.write_all(&joined).await?;
    }
    wr.flush().await?;
    Ok(())
}

/// Writes `a` then `b`, in one vectored write where the writer takes both.
async fn write_both<W: AsyncWrite + Unpin>(wr: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = wr
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    wr.write_all(b).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, encode_continue, BodyMsg, FrameReader, Message};
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn frames_written_to_a_connection_read_back_as_the_same_messages() {
        let big = Bytes::from(vec![7u8; 100 * 1024]);
        let mut frames = Vec::new();
        for msg in [
            BodyMsg::Data(Bytes::from_static(b"small")),
            BodyMsg::Data(big.clone()),
        ] {
            let e = encode(msg);
            frames.push(e.frame);
            frames.extend(e.payload);
        }
        frames.push(encode_continue());
        frames.push(encode(BodyMsg::End).frame);
        let body = StreamBody::new(futures_util::stream::iter(
            frames
                .into_iter()
                .map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
        ));
        let (mut a, b) = tokio::io::duplex(1024);
        let writer =
            tokio::spawn(async move { write_frames(std::pin::pin!(body), &mut a).await.is_ok() });
        let mut reader = FrameReader::new(ReaderBody::new(b));
        // DATA payloads may arrive in pieces; their bytes and the order of the rest count.
        let mut got = BytesMut::new();
        let mut continued_after = None;
        loop {
            match reader.next().await.unwrap() {
                Message::Body(BodyMsg::Data(d)) => got.put_slice(&d),
                Message::Continue => continued_after = Some(got.len()),
                Message::Body(BodyMsg::End) => break,
                _ => panic!("unexpected message"),
            }
        }
        let mut want = BytesMut::from(&b"small"[..]);
        want.put_slice(&big);
        assert_eq!(got.freeze(), want.freeze());
        assert_eq!(continued_after, Some(5 + big.len()));
        assert!(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_connection_cut_between_frames_is_a_cut_never_an_end() {
        let (mut a, b) = tokio::io::duplex(1024);
        let e = encode(BodyMsg::Data(Bytes::from_static(b"part")));
        a.write_all(&e.frame).await.unwrap();
        a.write_all(&e.payload.unwrap()).await.unwrap();
        drop(a);
        let mut reader = FrameReader::new(ReaderBody::new(b));
        assert!(matches!(
            reader.next().await.unwrap(),
            Message::Body(BodyMsg::Data(_))
        ));
        assert!(reader.next().await.is_err(), "no final frame: a cut");
    }
}

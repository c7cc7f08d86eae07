//! HTTP/1.1 framing both binaries write (RFC 9112): a field line, the line that opens a
//! chunk, the last chunk with its trailers. The agent writes them to backends
//! (`relay-client`'s upstream), the relay-server to users (its HTTP/1.1 front).

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// One field line (RFC 9112 §5).
pub fn put_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    // One growth of the buffer, then plain slice copies: four `put_slice` calls checked
    // the capacity and called `memcpy` four times a field, the separators included.
    let at = buf.len();
    buf.resize(at + name.len() + value.len() + 4, 0);
    let (n, rest) = buf[at..].split_at_mut(name.len());
    n.copy_from_slice(name);
    let (sep, rest) = rest.split_at_mut(2);
    sep.copy_from_slice(b": ");
    let (v, end) = rest.split_at_mut(value.len());
    v.copy_from_slice(value);
    end.copy_from_slice(b"\r\n");
}

/// The line that opens a chunk of `len` bytes (RFC 9112 §7.1), split off `lines`: one
/// allocation serves many chunks' lines instead of one each.
pub fn chunk_line(lines: &mut BytesMut, len: usize) -> Bytes {
    if lines.capacity() - lines.len() < 18 {
        *lines = BytesMut::with_capacity(1024);
    }
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        lines.put_u8(b"0123456789abcdef"[(len >> (i * 4)) & 0xf]);
    }
    lines.put_slice(b"\r\n");
    lines.split().freeze()
}

/// The last chunk and the trailer section (RFC 9112 §7.1.2).
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let Some(t) = trailers else {
        return Bytes::from_static(b"0\r\n\r\n");
    };
    let mut b = BytesMut::with_capacity(64);
    b.put_slice(b"0\r\n");
    for (name, value) in t {
        put_field(&mut b, name.as_str().as_bytes(), value.as_bytes());
    }
    b.put_slice(b"\r\n");
    b.freeze()
}

/// The most buffers one `writev` takes from a queue: a head, a chunk's line, its data and
/// its end make four, so a few small responses or chunks leave in one call.
const SLICES: usize = 16;

/// Writes the buffers queued in `out` with vectored writes until the queue is empty or the
/// socket would block, dropping what was written; the bytes written (`Pending` only if
/// none were). A queued message's head, chunk lines and body leave together without being
/// copied into one buffer first.
pub fn poll_write_queued<W: tokio::io::AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut std::task::Context<'_>,
    out: &mut std::collections::VecDeque<Bytes>,
) -> std::task::Poll<std::io::Result<usize>> {
    use bytes::Buf;
    use std::io::IoSlice;
    use std::task::Poll;
    let mut total = 0;
    while !out.is_empty() {
        let mut slices = [IoSlice::new(&[]); SLICES];
        let n = out.len().min(SLICES);
        for (s, b) in slices.iter_mut().zip(out.iter()) {
            *s = IoSlice::new(b);
        }
        let mut wrote = match std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Pending if total == 0 => return Poll::Pending,
            Poll::Pending => break,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => w,
        };
        total += wrote;
        while wrote > 0 {
            let first = out.front_mut().expect("bug: wrote more than queued");
            let k = wrote.min(first.len());
            first.advance(k);
            wrote -= k;
            if first.is_empty() {
                out.pop_front();
            }
        }
    }
    Poll::Ready(Ok(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lines_are_hex_and_split_off_one_buffer() {
        let mut lines = BytesMut::new();
        for (len, line) in [
            (0, "0"),
            (9, "9"),
            (255, "ff"),
            (16, "10"),
            (1 << 20, "100000"),
        ] {
            assert_eq!(
                &chunk_line(&mut lines, len)[..],
                format!("{line}\r\n").as_bytes()
            );
        }
        let mut b = BytesMut::new();
        put_field(&mut b, b"x-a", b"1");
        assert_eq!(&b[..], b"x-a: 1\r\n");
    }

    /// A socket that takes a few bytes at a time: every queued buffer leaves whole and in
    /// order, and written ones leave the queue.
    #[tokio::test]
    async fn queued_buffers_leave_in_order_through_partial_writes() {
        use std::collections::VecDeque;
        use tokio::io::AsyncReadExt;
        let (mut w, mut r) = tokio::io::duplex(7);
        let parts: Vec<Bytes> = (0..40u8)
            .map(|i| Bytes::from(vec![i; 1 + usize::from(i % 5)]))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out: VecDeque<Bytes> = parts.into_iter().collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        });
        let mut calls = 0;
        while !out.is_empty() {
            let n = std::future::poll_fn(|cx| poll_write_queued(&mut w, cx, &mut out))
                .await
                .expect("the pipe is open");
            assert!((1..=7).contains(&n), "wrote {n} bytes into a 7-byte pipe");
            calls += 1;
        }
        drop(w);
        assert_eq!(reader.await.unwrap().unwrap(), want);
        assert!(
            calls >= want.len() / 7,
            "{calls} writes for {} bytes",
            want.len()
        );
    }

    /// Nobody reads: the first call fills the socket and answers what it wrote, keeping
    /// the rest queued; the next has room for nothing and answers `Pending`.
    #[test]
    fn a_full_socket_is_pending_only_when_nothing_was_written() {
        use std::collections::VecDeque;
        use std::task::{Context, Poll, Waker};
        let (mut w, _r) = tokio::io::duplex(7);
        let mut out = VecDeque::from([Bytes::from_static(b"0123"), Bytes::from_static(b"456789")]);
        let mut cx = Context::from_waker(Waker::noop());
        match poll_write_queued(&mut w, &mut cx, &mut out) {
            Poll::Ready(Ok(7)) => {}
            other => panic!("expected 7 bytes written, got {other:?}"),
        }
        assert_eq!(out, [Bytes::from_static(b"789")]);
        assert!(poll_write_queued(&mut w, &mut cx, &mut out).is_pending());
        assert_eq!(out, [Bytes::from_static(b"789")]);
    }
}

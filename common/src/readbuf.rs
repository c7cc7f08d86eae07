//! An adaptive read buffer for byte streams that are idle most of their life (tunnels,
//! service ports) and fast when busy.
//!
//! A fixed 64 KiB read buffer per direction made every idle tunnel cost well over 64 KiB on
//! each side (measured: 84 KiB per idle tunnel in the relay-server, `docs/PERFORMANCE.md`).
//! This one starts at [`MIN_READ`] and doubles while reads fill it, up to the caller's
//! maximum, and halves again after reads that use less than a quarter of it, so an idle
//! stream holds a few KiB and a bulk transfer still reads in large pieces. Each filled
//! part is split off as [`Bytes`] without copying.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;

/// Smallest (and first) read size.
pub const MIN_READ: usize = 4 * 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct ReadBuf {
    buf: BytesMut,
    next: usize,
    max: usize,
}

impl ReadBuf {
    /// A buffer that grows up to `max` bytes per read (at least [`MIN_READ`]).
    pub fn new(max: usize) -> Self {
        ReadBuf {
            buf: BytesMut::new(),
            next: MIN_READ,
            max: max.max(MIN_READ),
        }
    }

    /// The current read size.
    pub fn read_size(&self) -> usize {
        self.next
    }

    /// Reads once from `rd`: `Some(bytes)` with what arrived, `None` at end of stream.
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        rd: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<Option<Bytes>>> {
        if self.next == MIN_READ {
            return self.poll_read_quiet(rd, cx);
        }
        if self.buf.capacity() - self.buf.len() < self.next {
            self.buf.reserve(self.next);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(rd, cx, &mut self.buf))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        if n >= room.min(self.next) {
            self.next = (self.next * 2).min(self.max);
        } else if n < self.next / 4 {
            self.next = (self.next / 2).max(MIN_READ);
        }
        let data = self.buf.split().freeze();
        // Quiet again: the next reads wait on the stack, and the rest of the bulk-transfer
        // buffer goes.
        if self.next == MIN_READ {
            self.buf = BytesMut::new();
        }
        Poll::Ready(Ok(Some(data)))
    }

    /// A read of a quiet stream: it waits with a buffer on the stack, so a stream that idles
    /// holds no heap at all (a read buffer reserved before the wait stays reserved for as
    /// long as the wait lasts: 4 KiB per idle direction). What arrives is copied out (at
    /// most [`MIN_READ`] bytes); a read that fills the buffer switches to heap reads.
    fn poll_read_quiet<R: AsyncRead + ?Sized>(
        &mut self,
        rd: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<Option<Bytes>>> {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); MIN_READ];
        let mut into = tokio::io::ReadBuf::uninit(&mut stack);
        std::task::ready!(rd.poll_read(cx, &mut into))?;
        let got = into.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(None));
        }
        if got.len() == MIN_READ {
            self.next = (MIN_READ * 2).min(self.max);
        }
        Poll::Ready(Ok(Some(Bytes::copy_from_slice(got))))
    }

    /// `poll_read` as a future.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        rd: &mut R,
    ) -> std::io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_read(Pin::new(&mut *rd), cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::{ReadBuf, MIN_READ};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_quiet_stream_waits_without_a_heap_buffer() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        let mut buf = ReadBuf::new(64 * 1024);
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(buf
            .poll_read(std::pin::Pin::new(&mut rx), &mut cx)
            .is_pending());
        assert_eq!(buf.buf.capacity(), 0, "nothing reserved while waiting");
        tx.write_all(b"hello").await.unwrap();
        assert_eq!(&buf.read(&mut rx).await.unwrap().unwrap()[..], b"hello");
        assert_eq!((buf.read_size(), buf.buf.capacity()), (MIN_READ, 0));
    }

    #[tokio::test]
    async fn grows_while_reads_fill_and_shrinks_when_quiet() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
        let mut buf = ReadBuf::new(64 * 1024);
        assert_eq!(buf.read_size(), MIN_READ);
        tx.write_all(&vec![7u8; 512 * 1024]).await.unwrap();
        let mut got = 0;
        while got < 512 * 1024 {
            got += buf.read(&mut rx).await.unwrap().unwrap().len();
        }
        assert_eq!(buf.read_size(), 64 * 1024, "bulk reads reach the maximum");
        for _ in 0..8 {
            tx.write_all(b"x").await.unwrap();
            assert_eq!(&buf.read(&mut rx).await.unwrap().unwrap()[..], b"x");
        }
        assert_eq!(buf.read_size(), MIN_READ, "small reads shrink it back");
        drop(tx);
        assert_eq!(buf.read(&mut rx).await.unwrap(), None);
    }
}

//! A socket that can leave its runtime from inside the TLS stream that wraps it, and come
//! back on another: what placing a TLS connection on a shard needs (`shards.rs`).
//!
//! A tokio socket belongs to the I/O driver of the runtime it was registered with; a shard
//! is a runtime of its own, so a socket moves as a standard socket and registers again
//! there (`TcpStream::into_std`, `from_std`). A plain connection does exactly that. A TLS
//! connection's socket sits inside its `TlsStream`, whose session state (keys, sequence
//! numbers, buffered records) cannot be rebuilt around a new socket: tokio-rustls has no
//! constructor from a socket and a session. So the TLS stream wraps this instead, and only
//! the socket inside is taken out and put back; the session travels untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP socket that may be taken out (between runtimes) and put back.
#[derive(Debug)]
pub struct Movable(Option<TcpStream>);

impl Movable {
    /// Wraps `s`.
    pub fn new(s: TcpStream) -> Self {
        Movable(Some(s))
    }

    /// Takes the socket out, as a standard socket free of this runtime's driver; `None`
    /// when it is already out or cannot leave (the connection is then lost).
    pub fn take_std(&mut self) -> Option<std::net::TcpStream> {
        self.0.take()?.into_std().ok()
    }

    /// Puts a socket taken out with [`Movable::take_std`] back, registered with the current
    /// runtime.
    pub fn put_std(&mut self, s: std::net::TcpStream) -> io::Result<()> {
        self.0 = Some(TcpStream::from_std(s)?);
        Ok(())
    }

    fn socket(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match &mut self.0 {
            Some(s) => Ok(Pin::new(s)),
            // Only reachable through a bug: a stream is served only with its socket in.
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "bug: the connection's socket is on its way to another thread",
            )),
        }
    }
}

impl AsyncRead for Movable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().socket()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Movable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().socket()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().socket()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().socket()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().socket()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes flow both ways before and after the socket is taken out and put back, and a
    /// stream without its socket fails instead of hanging.
    #[tokio::test]
    async fn a_socket_taken_out_and_put_back_carries_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut client, mut m) = (client.unwrap(), Movable::new(server.unwrap().0));
        client.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        m.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");

        let std = m.take_std().expect("the socket comes out");
        let err = m.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
        // Sent while the socket was out: waiting in the kernel, read after it is back.
        client.write_all(b"two").await.unwrap();
        m.put_std(std).unwrap();
        m.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");
        m.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}

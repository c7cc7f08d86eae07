use super::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::Role as TRole;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const MAX: usize = 4 << 20;

fn pair() -> (Writer<DuplexStream>, Reader<DuplexStream>) {
    let (a, b) = duplex(1 << 20);
    (
        Writer::new(a, Role::Client),
        Reader::new(b, Role::Server, MAX),
    )
}

/// A frame as a peer would write it, masked with `key` when given.
fn raw(first: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![first];
    let bit = if key.is_some() { MASKED } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(bit | n as u8),
        n if n <= 0xFFFF => {
            f.push(bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match key {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

#[tokio::test]
async fn messages_of_every_length_class_cross_both_ways() {
    let sizes = [0, 1, 125, 126, 65_535, 65_536, 300 * 1024];
    let (mut w, mut r) = pair();
    for n in sizes {
        let msg: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let (sent, got) = tokio::join!(w.binary(&msg), r.next());
        sent.unwrap();
        assert_eq!(got.unwrap(), Incoming::Binary(msg.into()), "{n} bytes");
    }
    // The server's side, unmasked, read by a client.
    let (a, b) = duplex(1 << 20);
    let (mut w, mut r) = (
        Writer::new(a, Role::Server),
        Reader::new(b, Role::Client, MAX),
    );
    for n in sizes {
        let msg = vec![0xA5; n];
        let (sent, got) = tokio::join!(w.binary(&msg), r.next());
        sent.unwrap();
        assert_eq!(got.unwrap(), Incoming::Binary(msg.into()));
    }
    w.close("bye").await.unwrap();
    assert_eq!(r.next().await.unwrap(), Incoming::Closed);
}

#[tokio::test]
async fn a_big_message_leaves_no_big_buffer_behind() {
    let (mut w, mut r) = pair();
    let big = vec![1u8; 256 * 1024];
    let (sent, got) = tokio::join!(w.binary(&big), r.next());
    sent.unwrap();
    assert_eq!(got.unwrap(), Incoming::Binary(big.into()));
    assert!(
        r.buffered_capacity() <= KEEP,
        "the read buffer kept {} bytes after the message",
        r.buffered_capacity()
    );
    assert!(w.out.capacity() <= KEEP, "the write buffer shrank too");
    // And it still reads what comes next.
    let (sent, got) = tokio::join!(w.binary(b"small"), r.next());
    sent.unwrap();
    assert_eq!(got.unwrap(), Incoming::Binary(Bytes::from_static(b"small")));
}

#[tokio::test]
async fn fragments_reassemble_with_a_ping_between_them_and_input_fed_byte_by_byte() {
    let k = Some([1, 2, 3, 4]);
    let mut wire = raw(BINARY, b"hel", k);
    wire.extend(raw(FIN | PING, b"p", k));
    wire.extend(raw(CONTINUATION, b"lo ", k));
    wire.extend(raw(FIN | PONG, b"", k));
    wire.extend(raw(FIN | CONTINUATION, b"world", k));
    wire.extend(raw(FIN | CLOSE, &1000u16.to_be_bytes(), k));
    let (mut a, b) = duplex(16);
    let mut r = Reader::new(b, Role::Server, MAX);
    let feed = tokio::spawn(async move {
        for byte in wire {
            a.write_all(&[byte]).await.unwrap();
        }
        a
    });
    assert_eq!(
        r.next().await.unwrap(),
        Incoming::Ping(Bytes::from_static(b"p"))
    );
    assert_eq!(
        r.next().await.unwrap(),
        Incoming::Binary(Bytes::from_static(b"hello world"))
    );
    assert_eq!(r.next().await.unwrap(), Incoming::Closed);
    drop(feed.await.unwrap());
}

#[tokio::test]
async fn protocol_violations_are_refused_with_what_was_wrong() {
    let k = Some([9, 8, 7, 6]);
    let cases: [(Role, Vec<u8>, &str); 8] = [
        (Role::Server, raw(FIN | BINARY, b"x", None), "unmasked"),
        (Role::Client, raw(FIN | BINARY, b"x", k), "masked server"),
        (Role::Server, raw(FIN | TEXT, b"x", k), "text"),
        (
            Role::Server,
            raw(FIN | 0x40 | BINARY, b"x", k),
            "reserved bits",
        ),
        (Role::Server, raw(FIN | 0x3, b"x", k), "reserved opcode"),
        (Role::Server, raw(PING, b"x", k), "control frame"),
        (
            Role::Server,
            raw(FIN | CONTINUATION, b"x", k),
            "continuation",
        ),
        (
            Role::Server,
            {
                let mut w = raw(BINARY, b"a", k);
                w.extend(raw(FIN | BINARY, b"b", k));
                w
            },
            "inside a fragmented",
        ),
    ];
    for (role, wire, what) in cases {
        let (mut a, b) = duplex(1024);
        a.write_all(&wire).await.unwrap();
        let mut r = Reader::new(b, role, MAX);
        let err = r.next().await.expect_err(what).to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    // Too large, refused from the header alone.
    let (mut a, b) = duplex(1024);
    a.write_all(&raw(FIN | BINARY, &[0; 200], k)).await.unwrap();
    let mut r = Reader::new(b, Role::Server, 100);
    assert!(matches!(r.next().await, Err(WsError::TooLarge(100))));
    // The stream ending mid-frame is an error; between frames, a close.
    let (mut a, b) = duplex(1024);
    a.write_all(&raw(FIN | BINARY, b"abc", k)[..4])
        .await
        .unwrap();
    drop(a);
    assert!(matches!(
        Reader::new(b, Role::Server, MAX).next().await,
        Err(WsError::Protocol(_))
    ));
    let (a, b) = duplex(1024);
    drop(a);
    assert_eq!(
        Reader::new(b, Role::Server, MAX).next().await.unwrap(),
        Incoming::Closed
    );
}

/// The framing against tungstenite's, both roles: what either side writes, the other
/// library reads.
#[tokio::test]
async fn tungstenite_reads_what_we_write_and_we_read_what_it_writes() {
    for (ours, theirs) in [(Role::Client, TRole::Server), (Role::Server, TRole::Client)] {
        let (a, b) = duplex(1 << 20);
        let (rd, wr) = tokio::io::split(a);
        let mut w = Writer::new(wr, ours);
        let mut r = Reader::new(rd, ours, MAX);
        let mut peer = WebSocketStream::from_raw_socket(b, theirs, None).await;
        for n in [3, 200, 70_000] {
            let msg = vec![n as u8; n];
            w.binary(&msg).await.unwrap();
            assert_eq!(
                peer.next().await.unwrap().unwrap(),
                Message::Binary(msg.clone().into())
            );
            peer.send(Message::Binary(msg.clone().into()))
                .await
                .unwrap();
            assert_eq!(r.next().await.unwrap(), Incoming::Binary(msg.into()));
        }
        peer.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        let Incoming::Ping(data) = r.next().await.unwrap() else {
            panic!("a ping");
        };
        w.pong(&data).await.unwrap();
        // tungstenite reports the pong; then our close reaches it as a Close.
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"hi"))
        );
        w.close("session over").await.unwrap();
        match peer.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.reason.as_str(), "session over"),
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// A socket that takes at most `cap` bytes per write, over several slices as a socket's
/// `writev` does, and keeps them.
struct Vectored {
    cap: usize,
    got: Vec<u8>,
    writes: usize,
}

impl AsyncWrite for Vectored {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(b)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        me.writes += 1;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(me.cap - n);
            me.got.extend_from_slice(&b[..take]);
            n += take;
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// On a socket that takes several buffers in one write, the server's frames go out as the
/// head and the payload as it is: one write for a whole frame, nothing copied behind the
/// head, and any split of a short write resumed at the right byte.
#[tokio::test]
async fn a_servers_frame_goes_out_in_one_vectored_write_without_a_copy() {
    for n in [0, 1, 125, 126, 10_000, 65_536] {
        let msg: Vec<u8> = (0..n).map(|i| (i * 13 % 251) as u8).collect();
        let io = Vectored {
            cap: usize::MAX,
            got: Vec::new(),
            writes: 0,
        };
        let mut w = Writer::new(io, Role::Server);
        w.binary(&msg).await.unwrap();
        assert_eq!(w.io.got, raw(FIN | BINARY, &msg, None), "{n} bytes");
        assert_eq!(w.io.writes, 1, "{n} bytes in one write");
        assert!(w.out.capacity() <= 64, "the payload was copied ({n} bytes)");
        // Short writes: 3 bytes at a time splits the head and the payload everywhere.
        let io = Vectored {
            cap: 3,
            got: Vec::new(),
            writes: 0,
        };
        let mut w = Writer::new(io, Role::Server);
        w.binary(&msg).await.unwrap();
        assert_eq!(
            w.io.got,
            raw(FIN | BINARY, &msg, None),
            "{n} bytes, 3 at a time"
        );
    }
}

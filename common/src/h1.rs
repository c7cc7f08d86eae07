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
}

//! Binary heads: the request head of an OPEN frame and the response head (and trailers) of
//! a RESPONSE frame as length-prefixed fields, on sessions that chose the subprotocol
//! [`crate::session::SESSION_SUBPROTOCOL_BINARY`]. Same content as the JSON of
//! [`crate::message`], without the escaping, the number formatting and the field names: a
//! small request's head is encoded and decoded in a fraction of the JSON's instructions.
//!
//! ```text
//! request head  = id:s16 method:s16 target:s32 flags:u8 [content_length:u64] [upgrade:s16] fields
//! response head = status:u16 flags:u8 [content_length:u64] fields
//! trailers      = fields
//! fields        = count:u32 (name:s16 value:s32)*
//! s16, s32      = length (u16, u32, big-endian) and that many bytes
//! flags         = bit 0: a body follows (`stream`), bit 1: content_length is present,
//!                 bit 2 (requests): upgrade is present; other bits are zero
//! ```
//!
//! Names, the method, the target and the upgrade protocol are UTF-8 (ASCII in practice);
//! a value is the header's bytes as they are (RFC 9110 §5.5 allows obs-text), where the
//! JSON carries each byte as a code point.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::message::{latin1, BodyKind, Fields, RequestHead, ResponseHead, Trailers};

const STREAM: u8 = 1;
const LENGTH: u8 = 2;
const UPGRADE: u8 = 4;

/// A head that does not decode; the text says what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct HeadError(pub &'static str);

// One capacity check per field; the fixed-size prefix then compiles to a store (through
// `put_u16`/`put_u32` it was a call and a `memcpy` of two or four bytes: 240 instructions
// per header field written).
fn s16(b: &mut BytesMut, s: &[u8]) {
    let n = u16::try_from(s.len()).expect("bug: a head field over 64 KiB");
    b.reserve(2 + s.len());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(s);
}

fn s32(b: &mut BytesMut, s: &[u8]) {
    let n = u32::try_from(s.len()).expect("bug: a head field over 4 GiB");
    b.reserve(4 + s.len());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(s);
}

fn flags(body: BodyKind, length: Option<u64>) -> u8 {
    let mut f = 0;
    if body == BodyKind::Stream {
        f |= STREAM;
    }
    if length.is_some() {
        f |= LENGTH;
    }
    f
}

fn put_fields(b: &mut BytesMut, fields: &[(String, String)]) {
    b.put_u32(u32::try_from(fields.len()).expect("bug: over 4 G fields"));
    for (name, value) in fields {
        s16(b, name.as_bytes());
        if value.is_ascii() {
            s32(b, value.as_bytes());
        } else {
            // Each code point is one byte (`message::encode_headers` made it so).
            let bytes: Vec<u8> = value
                .chars()
                .map(|c| u8::try_from(u32::from(c)).expect("bug: values are ISO-8859-1"))
                .collect();
            s32(b, &bytes);
        }
    }
}

fn put_map(b: &mut BytesMut, map: &HeaderMap) {
    b.put_u32(u32::try_from(map.len()).expect("bug: over 4 G fields"));
    for (name, value) in map {
        s16(b, name.as_str().as_bytes());
        s32(b, value.as_bytes());
    }
}

/// Appends `head` in the binary layout.
pub fn put_request(b: &mut BytesMut, head: &RequestHead) {
    s16(b, head.id.as_bytes());
    s16(b, head.method.as_bytes());
    s32(b, head.target.as_bytes());
    let mut f = flags(head.body, head.content_length);
    if head.upgrade.is_some() {
        f |= UPGRADE;
    }
    b.put_u8(f);
    if let Some(n) = head.content_length {
        b.put_u64(n);
    }
    if let Some(u) = &head.upgrade {
        s16(b, u.as_bytes());
    }
    put_head_fields(b, &head.headers);
}

/// Appends `head` in the binary layout.
pub fn put_response(b: &mut BytesMut, head: &ResponseHead) {
    // The fixed fields in one copy: each `put_u*` is a capacity check and a `memcpy` call.
    let mut fixed = [0u8; 11];
    fixed[..2].copy_from_slice(&head.status.to_be_bytes());
    fixed[2] = flags(head.body, head.content_length);
    let n = match head.content_length {
        Some(len) => {
            fixed[3..].copy_from_slice(&len.to_be_bytes());
            11
        }
        None => 3,
    };
    b.extend_from_slice(&fixed[..n]);
    put_head_fields(b, &head.headers);
}

fn put_head_fields(b: &mut BytesMut, f: &Fields) {
    match f {
        Fields::Map(map) => put_map(b, map),
        Fields::List(list) => put_fields(b, list),
        Fields::Encoded(block) => b.put_slice(block),
    }
}

/// Header fields written straight into the binary layout (`fields` above), one at a time:
/// what [`Fields::Encoded`] holds. The count is written last, into the four bytes kept for
/// it at the start.
pub struct FieldBlock {
    buf: BytesMut,
    count: u32,
}

impl FieldBlock {
    /// An empty block with room for `bytes` of names and values in `fields` fields.
    pub fn with_capacity(fields: usize, bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(4 + 6 * fields + bytes);
        buf.put_u32(0);
        FieldBlock { buf, count: 0 }
    }

    /// Appends one field. The caller passes a name and value `http` accepted (a
    /// [`HeaderName`] and a [`HeaderValue`], or text known to be valid as one).
    pub fn push(&mut self, name: &str, value: &[u8]) {
        self.put(name.as_bytes(), value);
    }

    /// Writes a field's length-prefixed name and value with one growth of the buffer and
    /// plain slice copies: `s16` and `s32` checked the capacity and called `memcpy` four
    /// times a field (≈ 140 instructions; five fields in every relayed request).
    fn put(&mut self, name: &[u8], value: &[u8]) -> usize {
        let n = u16::try_from(name.len()).expect("bug: a head field over 64 KiB");
        let v = u32::try_from(value.len()).expect("bug: a head field over 4 GiB");
        let at = self.buf.len();
        self.buf.resize(at + 6 + name.len() + value.len(), 0);
        let (len, rest) = self.buf[at..].split_at_mut(2);
        len.copy_from_slice(&n.to_be_bytes());
        let (out, rest) = rest.split_at_mut(name.len());
        out.copy_from_slice(name);
        let (len, out) = rest.split_at_mut(4);
        len.copy_from_slice(&v.to_be_bytes());
        out.copy_from_slice(value);
        self.count += 1;
        at + 2
    }

    /// Appends one field as an HTTP/1.1 head spells it: the name a token in any case,
    /// written in lower case as `http` would make it (RFC 9110 §5.1: names are
    /// case-insensitive). The caller checked the name's bytes (`headers::is_tchar`) and the
    /// value's (`headers::is_value_byte`).
    pub fn push_token(&mut self, name: &[u8], value: &[u8]) {
        let at = self.put(name, value);
        self.buf[at..at + name.len()].make_ascii_lowercase();
    }

    /// The finished block.
    pub fn finish(mut self) -> Fields {
        self.buf[..4].copy_from_slice(&self.count.to_be_bytes());
        Fields::Encoded(self.buf.freeze())
    }
}

/// The fields of a [`FieldBlock`] as a map. A block holds only fields `http` accepted, so
/// this refuses only a block that was not made by [`FieldBlock`].
pub(crate) fn block_map(block: &Bytes) -> Result<HeaderMap, crate::message::HeaderError> {
    match fields_map(block, block) {
        Ok(Some(map)) => Ok(map),
        _ => crate::message::decode_headers(&block_list(block)),
    }
}

/// The fields of a [`FieldBlock`] as the wire's list.
pub(crate) fn block_list(block: &Bytes) -> Vec<(String, String)> {
    fields(block).expect("bug: only a FieldBlock makes an encoded block, and it decodes")
}

/// Appends trailer fields in the binary layout.
pub fn put_trailers(b: &mut BytesMut, t: &Trailers) {
    put_fields(b, &t.headers);
}

const SHORT: HeadError = HeadError("truncated head");

// The decoders read from a byte slice: a `Bytes` split per field would cost two atomic
// reference-count updates each (and one allocation when the buffer is still unique).

#[inline(always)] // ≈ 20 calls per small request's head, each a few instructions
fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], HeadError> {
    if p.len() < n {
        return Err(SHORT);
    }
    let (head, rest) = p.split_at(n);
    *p = rest;
    Ok(head)
}

#[inline(always)]
fn int<const N: usize>(p: &mut &[u8]) -> Result<[u8; N], HeadError> {
    Ok(take(p, N)?.try_into().expect("bug: N bytes taken"))
}

fn text(p: &mut &[u8], wide: bool) -> Result<String, HeadError> {
    let n = match wide {
        false => u16::from_be_bytes(int(p)?) as usize,
        true => u32::from_be_bytes(int(p)?) as usize,
    };
    std::str::from_utf8(take(p, n)?)
        .map(str::to_owned)
        .map_err(|_| HeadError("a head field is not UTF-8"))
}

fn body_and_length(p: &mut &[u8], f: u8, known: u8) -> Result<(BodyKind, Option<u64>), HeadError> {
    if f & !known != 0 {
        return Err(HeadError("unknown head flags"));
    }
    let body = match f & STREAM {
        0 => BodyKind::Empty,
        _ => BodyKind::Stream,
    };
    let length = match f & LENGTH {
        0 => None,
        _ => Some(u64::from_be_bytes(int(p)?)),
    };
    Ok((body, length))
}

/// Walks header fields (the rest of `p` must be exactly them), handing each name (UTF-8,
/// like every text field) and value bytes to `each`, with the field count (room to reserve
/// on the first), until it returns false.
fn each_field<'a>(
    p: &'a [u8],
    mut each: impl FnMut(usize, &'a [u8], &'a [u8]) -> Result<bool, HeadError>,
) -> Result<bool, HeadError> {
    let p = &mut &*p;
    let count = u32::from_be_bytes(int(p)?) as usize;
    // Each field takes at least 6 bytes: a count beyond that is a lie, not an allocation.
    if count > p.len() / 6 {
        return Err(SHORT);
    }
    for _ in 0..count {
        let n = u16::from_be_bytes(int(p)?) as usize;
        let name = take(p, n)?;
        let n = u32::from_be_bytes(int(p)?) as usize;
        if !each(count, name, take(p, n)?)? {
            return Ok(false);
        }
    }
    if !p.is_empty() {
        return Err(HeadError("bytes after the head"));
    }
    Ok(true)
}

/// Decodes header fields; the rest of `p` must be exactly them.
pub fn fields(p: &[u8]) -> Result<Vec<(String, String)>, HeadError> {
    let mut out = Vec::new();
    each_field(p, |count, name, value| {
        if out.is_empty() {
            out.reserve_exact(count);
        }
        let name = std::str::from_utf8(name).map_err(|_| HeadError("a head field is not UTF-8"))?;
        out.push((name.to_owned(), latin1(value)));
        Ok(true)
    })?;
    Ok(out)
}

/// Decodes header fields straight into a map; `Ok(None)` when a name or value is not one
/// `http` accepts, so that the caller keeps the list and the refusal surfaces where the
/// headers are used, with its reason (as for JSON heads). The values' bytes are what the
/// list's ISO-8859-1 code points stand for, as slices of `buf` (which `p` lies in) rather
/// than copies: one allocation less per field (they keep the buffer alive while the head
/// lives).
fn fields_map(p: &[u8], buf: &Bytes) -> Result<Option<HeaderMap>, HeadError> {
    let mut map = HeaderMap::new();
    let whole = each_field(p, |count, name, value| {
        if map.is_empty() {
            map.reserve(count);
        }
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(value));
        // `from_bytes` accepts only token characters (ASCII): no UTF-8 check is needed
        // here; a name it refuses sends the caller to the list, which checks.
        let name = match crate::headers::common_name(name) {
            Some(n) => Ok(n),
            None => HeaderName::from_bytes(name),
        };
        Ok(match (name, value) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
                true
            }
            _ => false,
        })
    })?;
    Ok(whole.then_some(map))
}

/// Whether every field of a block (the rest of `p`) has a name and a value `http` accepts:
/// token characters (RFC 9110 §5.1), and values without control characters other than tab
/// (§5.5). A block that passes is what [`FieldBlock`] makes, without building anything.
fn block_valid(p: &[u8]) -> Result<bool, HeadError> {
    each_field(p, |_, name, value| {
        use crate::headers::is_tchar;
        // Folded rather than short-circuited: the loop stays branch-free (most heads pass).
        let name_ok = !name.is_empty() && name.iter().fold(true, |ok, &b| ok & is_tchar(b));
        Ok(name_ok && value_valid(value))
    })
}

/// Whether every byte of a field value is one `http` accepts ([`is_value_byte`]), eight
/// bytes at a time: a word with no byte below 0x20 and none equal to 0x7f passes in a few
/// instructions; one that has either (a tab, or a byte to refuse) is checked byte by byte.
/// A byte-at-a-time check was ≈ 4 instructions per byte of a head's values.
///
/// [`is_value_byte`]: crate::headers::is_value_byte
fn value_valid(value: &[u8]) -> bool {
    use crate::headers::is_value_byte;
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut words = value.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("bug: 8 bytes"));
        // Nonzero exactly when some byte is below 0x20, or (the same test on x ^ 0x7f…)
        // equal to 0x7f (Hacker's Delight 6-1; a borrow may mark a wrong byte, never none).
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let del = x ^ (ONES * 0x7f);
        let del = del.wrapping_sub(ONES) & !del & HIGH;
        if below | del != 0 && !w.iter().all(|&b| is_value_byte(b)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| is_value_byte(b))
}

/// Calls `each` with every field of an encoded block ([`Fields::Encoded`]) in order, until
/// it returns false; false then.
pub fn each_encoded(block: &[u8], mut each: impl FnMut(&[u8], &[u8]) -> bool) -> bool {
    each_field(block, |_, name, value| Ok(each(name, value))).unwrap_or(false)
}

/// Decodes a request head (the whole of `buf`). Its headers stay in the binary layout
/// ([`Fields::Encoded`], a slice of `buf`) when `http` accepts all of them: an agent that
/// writes them to an HTTP/1.1 backend never builds a map (one is built from the block if a
/// caller asks); else they come as the list.
pub fn request(buf: &Bytes) -> Result<RequestHead, HeadError> {
    let p = &mut &buf[..];
    let id = text(p, false)?;
    let method = text(p, false)?;
    let target = text(p, true)?;
    let f = int::<1>(p)?[0];
    let (body, content_length) = body_and_length(p, f, STREAM | LENGTH | UPGRADE)?;
    let upgrade = match f & UPGRADE {
        0 => None,
        _ => Some(text(p, false)?),
    };
    let headers = match block_valid(p)? {
        true => Fields::Encoded(buf.slice_ref(p)),
        false => Fields::List(fields(p)?),
    };
    Ok(RequestHead {
        id,
        method,
        target,
        headers,
        body,
        content_length,
        upgrade,
    })
}

/// Decodes a response head (the whole of `p`, which lies in `buf`); its headers come as a
/// map when `http` accepts all of them, as a request head's do.
pub fn response(buf: &Bytes, p: &[u8]) -> Result<ResponseHead, HeadError> {
    let p = &mut &*p;
    let status = u16::from_be_bytes(int(p)?);
    let f = int::<1>(p)?[0];
    let (body, content_length) = body_and_length(p, f, STREAM | LENGTH)?;
    let headers = match fields_map(p, buf)? {
        Some(map) => Fields::Map(map),
        None => Fields::List(fields(p)?),
    };
    Ok(ResponseHead {
        status,
        headers,
        body,
        content_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time check agrees with the byte check on every byte value, at every
    /// place in a word and in the tail.
    #[test]
    fn value_check_agrees_with_the_byte_check() {
        use crate::headers::is_value_byte;
        for len in [1, 7, 8, 9, 16, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    assert_eq!(
                        value_valid(&v),
                        is_value_byte(b),
                        "byte {b:#x} at {at} of {len}"
                    );
                }
            }
        }
        assert!(value_valid(b""));
        assert!(value_valid(b"text/html; charset=utf-8\tcaf\xe9 \x80\xff~"));
        assert!(!value_valid(b"a perfectly fine value\r\nx: smuggled"));
    }

    fn req() -> RequestHead {
        RequestHead {
            id: "0123456789abcdef0123456789abcdef".into(),
            method: "POST".into(),
            target: "/a/b?c=%2F&d".into(),
            headers: list(&[("host", "x"), ("x-a", "caf\u{e9}"), ("x-a", "")]),
            body: BodyKind::Stream,
            content_length: Some(7),
            upgrade: Some("websocket".into()),
        }
    }

    fn list(pairs: &[(&str, &str)]) -> Fields {
        Fields::List(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn request_bytes(head: &RequestHead) -> Bytes {
        let mut b = BytesMut::new();
        put_request(&mut b, head);
        b.freeze()
    }

    /// Heads compared field by field, the headers as the wire's list.
    fn same(a: &RequestHead, b: &RequestHead) -> bool {
        let plain = |h: &RequestHead| RequestHead {
            headers: h.headers.to_list().into(),
            ..h.clone()
        };
        format!("{:?}", plain(a)) == format!("{:?}", plain(b))
    }

    /// A block written field by field is what the same fields as a list encode to, and it
    /// reads back as the same list, map and JSON.
    #[test]
    fn a_field_block_is_the_list_encoded() {
        let pairs = [("host", "x"), ("x-a", "caf\u{e9}"), ("x-a", ""), ("b", "1")];
        let mut block = FieldBlock::with_capacity(1, 1);
        for (k, v) in pairs {
            let bytes: Vec<u8> = v.chars().map(|c| c as u8).collect();
            block.push(k, &bytes);
        }
        let encoded = block.finish();
        let mut listed = req();
        listed.headers = list(&pairs);
        let mut direct = req();
        direct.headers = encoded.clone();
        assert_eq!(request_bytes(&direct), request_bytes(&listed));
        assert_eq!(encoded.to_list(), listed.headers.to_list());
        assert_eq!(encoded.to_map().unwrap(), listed.headers.to_map().unwrap());
        assert_eq!(
            serde_json::to_string(&encoded).unwrap(),
            serde_json::to_string(&listed.headers).unwrap()
        );
        let empty = FieldBlock::with_capacity(0, 0).finish();
        assert!(empty.to_list().is_empty() && empty.to_map().unwrap().is_empty());
    }

    #[test]
    fn heads_round_trip_with_every_optional_part() {
        let back = request(&request_bytes(&req())).unwrap();
        assert!(
            matches!(back.headers, Fields::Encoded(_)),
            "valid request headers stay encoded"
        );
        assert_eq!(
            back.headers.to_map().unwrap(),
            req().headers.to_map().unwrap()
        );
        assert!(same(&back, &req()));
        // A value `http` refuses (a line break) keeps the list, and is refused where used.
        let mut broken = req();
        let mut pairs = broken.headers.to_list();
        pairs.push(("x-b".into(), "a\r\nb".into()));
        broken.headers = pairs.clone().into();
        let back = request(&request_bytes(&broken)).unwrap();
        assert!(matches!(&back.headers, Fields::List(l) if *l == pairs));
        assert!(back.headers.to_map().is_err());
        let mut bare = req();
        (bare.body, bare.content_length, bare.upgrade, bare.headers) =
            (BodyKind::Empty, None, None, Fields::default());
        let back = request(&request_bytes(&bare)).unwrap();
        assert!(matches!(&back.headers, Fields::Encoded(_)));
        assert!(back.headers.to_map().unwrap().is_empty());
        assert!(same(&back, &bare));

        let rh = ResponseHead {
            status: 404,
            headers: list(&[("content-type", "text/plain")]),
            body: BodyKind::Stream,
            content_length: Some(1 << 40),
        };
        let mut b = BytesMut::new();
        put_response(&mut b, &rh);
        let buf = b.clone().freeze();
        let mut back = response(&buf, &buf).unwrap();
        assert!(
            matches!(back.headers, Fields::Map(_)),
            "valid headers come as a map"
        );
        assert_eq!(
            back.headers.take_map().unwrap(),
            rh.headers.to_map().unwrap()
        );
        let back = ResponseHead {
            headers: rh.headers.clone(),
            ..back
        };
        assert_eq!(format!("{back:?}"), format!("{rh:?}"));
        b.put_slice(b"rest");
        let buf = b.freeze();
        assert_eq!(
            response(&buf, &buf).unwrap_err(),
            HeadError("bytes after the head"),
            "a head is exactly its bytes"
        );
    }

    /// The decoders' header values point into the message's buffer: no copies.
    #[test]
    fn decoders_slice_the_values() {
        let buf = request_bytes(&req());
        let range = buf.as_ptr_range();
        let Fields::Encoded(block) = request(&buf).unwrap().headers else {
            panic!("valid request headers stay encoded")
        };
        assert!(
            range.contains(&block.as_ptr()),
            "the block is a slice of the message"
        );
        let map = block_map(&block).unwrap();
        assert!(!map.is_empty());
        assert!(map
            .values()
            .filter(|v| !v.is_empty())
            .all(|v| range.contains(&v.as_bytes().as_ptr())));

        let mut b = BytesMut::from(&b"prefix"[..]);
        put_response(&mut b, &req_response());
        let buf = b.freeze();
        let Fields::Map(map) = response(&buf, &buf[6..]).unwrap().headers else {
            panic!("valid headers come as a map")
        };
        let range = buf.as_ptr_range();
        assert!(!map.is_empty());
        assert!(map
            .values()
            .filter(|v| !v.is_empty())
            .all(|v| range.contains(&v.as_bytes().as_ptr())));
    }

    fn req_response() -> ResponseHead {
        ResponseHead {
            status: 200,
            headers: list(&[("content-type", "text/plain")]),
            body: BodyKind::Empty,
            content_length: None,
        }
    }

    #[test]
    fn golden_bytes_pin_the_layout() {
        let head = ResponseHead {
            status: 200,
            headers: list(&[("a", "\u{ff}")]),
            body: BodyKind::Stream,
            content_length: Some(2),
        };
        let mut b = BytesMut::new();
        put_response(&mut b, &head);
        assert_eq!(
            &b[..],
            b"\x00\xc8\x03\0\0\0\0\0\0\0\x02\0\0\0\x01\0\x01a\0\0\0\x01\xff"
        );
        // A head holding a map encodes the same bytes as one holding the list.
        let mapped = ResponseHead {
            headers: head.headers.to_map().unwrap().into(),
            ..head
        };
        let mut m = BytesMut::new();
        put_response(&mut m, &mapped);
        assert_eq!(m, b);
    }

    #[test]
    fn bad_heads_are_refused() {
        let whole = request_bytes(&req());
        for cut in [0, 1, 10, whole.len() - 1] {
            assert_eq!(
                request(&whole.slice(..cut)).unwrap_err(),
                SHORT,
                "cut at {cut}"
            );
        }
        let mut longer = whole.to_vec();
        longer.push(0);
        assert_eq!(
            request(&longer.into()).unwrap_err(),
            HeadError("bytes after the head")
        );
        // id "", method "\xff": not UTF-8.
        let bad = Bytes::from_static(b"\0\0\0\x01\xff");
        assert_eq!(
            request(&bad).unwrap_err(),
            HeadError("a head field is not UTF-8")
        );
        // Unknown flag bits, and a field count the bytes cannot hold.
        let flags = Bytes::from_static(b"\0\xc8\x80\0\0\0\0");
        assert_eq!(
            response(&flags, &flags).unwrap_err(),
            HeadError("unknown head flags")
        );
        let count = Bytes::from_static(b"\0\xc8\0\xff\xff\xff\xff");
        assert_eq!(response(&count, &count).unwrap_err(), SHORT);
    }

    #[test]
    fn no_cut_or_corrupted_head_makes_the_decoder_panic() {
        let whole = request_bytes(&req());
        for cut in 0..whole.len() {
            assert!(request(&whole.slice(..cut)).is_err());
        }
        for i in 0..whole.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut w = whole.to_vec();
                w[i] = v;
                let _ = request(&w.into());
            }
        }
    }
}

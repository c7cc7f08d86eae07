//! The first request of an HTTP/2 connection with prior knowledge, read from its first
//! bytes (the preface, the client's first frames, the first HEADERS frame) before any
//! HTTP/2 server sees them: its `:path`, `:authority` and `X-Server-Name`, for the shards'
//! placement (`shards.rs`). Nothing else is done with what is decoded here: the bytes go
//! on to the HTTP/2 server unchanged, which decodes and judges them itself.
//!
//! RFC 9113 §3.4 (preface), §4.1 (frame layout), §6.2 (HEADERS: padding, priority);
//! RFC 7541 (HPACK): §5.1 integers, §5.2 string literals, §6 representations, Appendix A
//! (the static table), Appendix B (the Huffman code). A head this does not understand
//! (CONTINUATION frames, an index it cannot resolve, bad Huffman) is simply not placed.

use std::sync::OnceLock;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types and flags (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What the first request says about where it goes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FirstHead {
    /// `:path` (with its query).
    pub path: Option<String>,
    /// `:authority`.
    pub authority: Option<String>,
    /// `x-server-name`.
    pub server_name: Option<Vec<u8>>,
}

/// How far the first bytes go.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Not yet the whole first HEADERS frame.
    Incomplete,
    /// The first request's fields, or `None` when the bytes are not a head this reads.
    Done(Option<FirstHead>),
}

/// Reads the first request from the first bytes of a connection that began with the
/// preface. `from` is where the frames not yet gone over begin (0 at first); a call on more
/// of the same bytes resumes there instead of walking every frame before it again (a client
/// may send its first frames a few bytes at a time), and moves it on.
pub fn scan(bytes: &[u8], from: &mut usize) -> Scan {
    if *from == 0 {
        if bytes.len() < PREFACE.len() {
            return match PREFACE.starts_with(bytes) {
                true => Scan::Incomplete,
                false => Scan::Done(None),
            };
        }
        if !bytes.starts_with(PREFACE) {
            return Scan::Done(None);
        }
        *from = PREFACE.len();
    }
    loop {
        // Past the end only if the caller's bytes are not the ones it scanned before.
        let Some(rest) = bytes.get(*from..) else {
            return Scan::Done(None);
        };
        let Some(head) = rest.get(..9) else {
            return Scan::Incomplete;
        };
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let Some(payload) = rest.get(9..9 + len) else {
            return Scan::Incomplete;
        };
        if kind == HEADERS {
            return Scan::Done(headers(payload, flags));
        }
        // SETTINGS, WINDOW_UPDATE, PRIORITY, PING may come first; anything else before a
        // request is not placed.
        if !matches!(kind, 0x2 | 0x4 | 0x6 | 0x8) {
            return Scan::Done(None);
        }
        *from += 9 + len;
    }
}

/// The fields of one HEADERS frame's payload, if it holds the whole block.
fn headers(payload: &[u8], flags: u8) -> Option<FirstHead> {
    if flags & END_HEADERS == 0 {
        return None;
    }
    let mut block = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*block.first()?);
        block = &block[1..];
    }
    if flags & PRIORITY != 0 {
        block = block.get(5..)?;
    }
    let block = block.get(..block.len().checked_sub(pad)?)?;
    decode(block)
}

/// Decodes a header block with an empty dynamic table (the connection's first).
fn decode(mut b: &[u8]) -> Option<FirstHead> {
    let mut out = FirstHead::default();
    // Entries this block adds, newest first (RFC 7541 §2.3.3: index 62 is the newest).
    let mut dynamic: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    while let Some(&first) = b.first() {
        let (name, value, index_it) = if first & 0x80 != 0 {
            // §6.1: an indexed field.
            let i = integer(&mut b, 7)?;
            let (n, v) = entry(i, &dynamic)?;
            (n, v, false)
        } else if first & 0xe0 == 0x20 {
            // §6.3: a dynamic table size update.
            integer(&mut b, 5)?;
            continue;
        } else {
            // §6.2: a literal, with incremental indexing (01), without (0000) or never
            // indexed (0001).
            let (prefix, index_it) = if first & 0x40 != 0 {
                (6, true)
            } else {
                (4, false)
            };
            let i = integer(&mut b, prefix)?;
            let name = match i {
                0 => string(&mut b)?,
                i => entry(i, &dynamic)?.0,
            };
            (name, string(&mut b)?, index_it)
        };
        match name.as_slice() {
            b":path" => out.path = Some(String::from_utf8(value.clone()).ok()?),
            b":authority" => out.authority = Some(String::from_utf8(value.clone()).ok()?),
            n if n.eq_ignore_ascii_case(b"x-server-name") => out.server_name = Some(value.clone()),
            _ => {}
        }
        if index_it {
            dynamic.insert(0, (name, value));
        }
    }
    Some(out)
}

/// The name and value at index `i` (§2.3.3): the static table, then this block's entries.
fn entry(i: usize, dynamic: &[(Vec<u8>, Vec<u8>)]) -> Option<(Vec<u8>, Vec<u8>)> {
    match i {
        0 => None,
        1..=61 => {
            let (n, v) = STATIC[i - 1];
            Some((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        }
        _ => dynamic.get(i - 62).cloned(),
    }
}

/// An integer with an `n`-bit prefix (§5.1), consumed from `b`.
fn integer(b: &mut &[u8], n: u32) -> Option<usize> {
    let mask = (1usize << n) - 1;
    let (&first, mut rest) = b.split_first()?;
    let mut value = usize::from(first) & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, r) = rest.split_first()?;
            rest = r;
            value = value.checked_add(usize::from(byte & 0x7f).checked_shl(shift)?)?;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
            if shift > 28 {
                return None;
            }
        }
    }
    *b = rest;
    Some(value)
}

/// A string literal (§5.2), consumed from `b`.
fn string(b: &mut &[u8]) -> Option<Vec<u8>> {
    let huffman = b.first()? & 0x80 != 0;
    let len = integer(b, 7)?;
    let raw = b.get(..len)?;
    *b = &b[len..];
    match huffman {
        true => huffman_decode(raw),
        false => Some(raw.to_vec()),
    }
}

/// Decodes Huffman-coded bytes (Appendix B; the code is canonical, so the code lengths
/// define it). The padding must be at most 7 bits of the EOS code's 1s (§5.2).
fn huffman_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let canon = canonical();
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for byte in raw {
        for bit in (0..8).rev() {
            code = code << 1 | u32::from(byte >> bit & 1);
            len += 1;
            let offset = code.wrapping_sub(canon.first[len]);
            if offset < canon.count[len] {
                let sym = canon.symbols[canon.start[len] + offset as usize];
                if sym == 256 {
                    return None; // EOS inside the string (§5.2)
                }
                out.push(sym as u8);
                (code, len) = (0, 0);
            } else if len >= 30 {
                return None;
            }
        }
    }
    (len <= 7 && code == (1 << len) - 1).then_some(out)
}

/// The canonical code per length: its first code, its number of symbols, and where they
/// start in `symbols` (ordered by length, then symbol).
struct Canonical {
    first: [u32; 31],
    count: [u32; 31],
    start: [usize; 31],
    symbols: Vec<u16>,
}

fn canonical() -> &'static Canonical {
    static CANON: OnceLock<Canonical> = OnceLock::new();
    CANON.get_or_init(|| {
        let mut symbols: Vec<u16> = (0..=256).collect();
        symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
        let mut c = Canonical {
            first: [0; 31],
            count: [0; 31],
            start: [0; 31],
            symbols,
        };
        for &s in &c.symbols {
            c.count[usize::from(CODE_LENGTHS[usize::from(s)])] += 1;
        }
        let (mut code, mut start) = (0u32, 0usize);
        for len in 1..31 {
            c.first[len] = code;
            c.start[len] = start;
            code = (code + c.count[len]) << 1;
            start += c.count[len] as usize;
        }
        c
    })
}

/// The static table (RFC 7541 Appendix A): index 1 is the first entry.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code's length in bits for each symbol (Appendix B), the last (256) EOS.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan of the bytes at once.
    fn scan(bytes: &[u8]) -> Scan {
        super::scan(bytes, &mut 0)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The connection's first bytes: the preface, an empty SETTINGS, a WINDOW_UPDATE and a
    /// HEADERS frame with `block` (and the given extra flags and leading payload bytes).
    fn first_bytes(block: &[u8], flags: u8, lead: &[u8], pad: usize) -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0x0f, 0, 1]);
        let len = lead.len() + block.len() + pad;
        b.extend_from_slice(&[0, 0, len as u8, HEADERS, END_HEADERS | flags, 0, 0, 0, 1]);
        b.extend_from_slice(lead);
        b.extend_from_slice(block);
        b.extend(std::iter::repeat_n(0, pad));
        b
    }

    #[test]
    fn the_rfc_7541_examples_decode() {
        // Appendix C.3.1 (literals) and C.4.1 (the same request, Huffman-coded).
        for block in [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        ] {
            let got = scan(&first_bytes(&hex(block), 0, &[], 0));
            let want = FirstHead {
                path: Some("/".into()),
                authority: Some("www.example.com".into()),
                server_name: None,
            };
            assert_eq!(got, Scan::Done(Some(want)), "{block}");
        }
    }

    /// A Huffman-coded string literal of `s` (the canonical code from the lengths).
    fn huffman(s: &[u8]) -> Vec<u8> {
        let c = canonical();
        let code_of = |sym: u16| {
            let len = usize::from(CODE_LENGTHS[usize::from(sym)]);
            let rank = c.symbols[c.start[len]..]
                .iter()
                .position(|&x| x == sym)
                .unwrap();
            (c.first[len] + rank as u32, len)
        };
        let (mut bits, mut n, mut out) = (0u64, 0usize, Vec::new());
        for &b in s {
            let (code, len) = code_of(u16::from(b));
            bits = bits << len | u64::from(code);
            n += len;
            while n >= 8 {
                out.push((bits >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            out.push((bits << (8 - n)) as u8 | ((1u8 << (8 - n)) - 1));
        }
        let mut lit = vec![0x80 | out.len() as u8];
        lit.extend(out);
        lit
    }

    #[test]
    fn every_byte_round_trips_through_the_huffman_code_and_bad_padding_is_refused() {
        let all: Vec<u8> = (0..=255).collect();
        for chunk in all.chunks(40) {
            let lit = huffman(chunk);
            assert_eq!(huffman_decode(&lit[1..]).as_deref(), Some(chunk));
        }
        // "a" is 5 bits (00011): 3 bits of padding, which must be 1s.
        assert_eq!(huffman_decode(&[0b0001_1111]).as_deref(), Some(&b"a"[..]));
        assert_eq!(huffman_decode(&[0b0001_1011]), None);
        // A whole byte of padding is too much.
        assert_eq!(huffman_decode(&[0b0001_1111, 0xff]), None);
    }

    #[test]
    fn x_server_name_and_the_path_are_found_however_they_are_coded() {
        // :method GET, :scheme http, :path (indexed name 4, Huffman value, added to the
        // table), x-server-name (literal name, never indexed, plain value), then the path
        // again by its dynamic index 62.
        let mut block = vec![0x82, 0x86, 0x44];
        block.extend(huffman(b"/pkg.Svc/Call?x=1"));
        block.extend([0x10, 13]);
        block.extend(b"x-server-name");
        block.extend([4]);
        block.extend(b"mybe");
        block.push(0x80 | 62);
        let want = FirstHead {
            path: Some("/pkg.Svc/Call?x=1".into()),
            authority: None,
            server_name: Some(b"mybe".to_vec()),
        };
        // Plain, then padded with priority fields.
        let plain = first_bytes(&block, 0, &[], 0);
        assert_eq!(scan(&plain), Scan::Done(Some(want)));
        let padded = first_bytes(&block, PADDED | PRIORITY, &[3, 0, 0, 0, 0, 16], 3);
        assert!(
            matches!(scan(&padded), Scan::Done(Some(h)) if h.server_name.as_deref() == Some(&b"mybe"[..]))
        );
        // Every prefix of the bytes is incomplete, scanned at once or resumed where the last
        // scan stopped (at the HEADERS frame, past the SETTINGS and WINDOW_UPDATE before it);
        // other bytes are not a head.
        let mut from = 0;
        for n in 0..plain.len() {
            assert_eq!(scan(&plain[..n]), Scan::Incomplete, "{n}");
            assert_eq!(super::scan(&plain[..n], &mut from), Scan::Incomplete, "{n}");
        }
        assert_eq!(from, PREFACE.len() + 9 + 13);
        assert!(matches!(
            super::scan(&plain, &mut from),
            Scan::Done(Some(_))
        ));
        assert_eq!(scan(b"GET / HTTP/1.1\r\n"), Scan::Done(None));
        // A dynamic index that does not exist, CONTINUATION, DATA first: not placed.
        assert_eq!(
            scan(&first_bytes(&[0x80 | 62], 0, &[], 0)),
            Scan::Done(None)
        );
        let mut split = first_bytes(&block, 0, &[], 0);
        split[PREFACE.len() + 9 + 13 + 4] &= !END_HEADERS;
        assert_eq!(scan(&split), Scan::Done(None));
        let mut data = PREFACE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0x0, 0, 0, 0, 0, 1]);
        assert_eq!(scan(&data), Scan::Done(None));
    }
}

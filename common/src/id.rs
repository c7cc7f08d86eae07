//! Request ids: 128 bits from a CSPRNG, as 32 lowercase hex digits.
//!
//! Ids carry no name: the server binds each id to its backend name in its own table (the Go
//! relay read the name from an id prefix, which let a client claim another name's requests).
//! An id of another name is answered exactly like an unknown one. In cluster mode the first
//! 32 bits name the replica that owns the request (only for routing; the owner still checks
//! the id against its own table).

use std::fmt;

/// An unguessable request id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// Draws a fresh id from the thread's CSPRNG (ChaCha12 seeded and periodically
    /// reseeded from the OS): as unguessable as the OS source, without its system call
    /// per request (one of ~18 per relayed request, docs/PERFORMANCE.md).
    pub fn random() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 16];
        rand::rng().fill_bytes(&mut b);
        RequestId(b)
    }

    /// An id whose first 32 bits are `tag` (the replica that owns the request in cluster
    /// mode, so any replica can route an agent's call to it) and whose other 96 bits are
    /// random: still far beyond guessing.
    pub fn tagged(tag: u32) -> Self {
        let mut id = RequestId::random();
        id.0[..4].copy_from_slice(&tag.to_be_bytes());
        id
    }

    /// The first 32 bits (the owner's tag of a [`RequestId::tagged`] id).
    pub fn tag(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// Parses the 32-hex-digit form; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let s: &[u8; 32] = s.as_bytes().try_into().ok()?;
        // One table lookup per digit and one check at the end: the agent's responses name
        // their request this way, once per relayed request.
        let mut b = [0u8; 16];
        let mut bad = 0u8;
        for (out, pair) in b.iter_mut().zip(s.chunks_exact(2)) {
            let (hi, lo) = (HEX_VAL[usize::from(pair[0])], HEX_VAL[usize::from(pair[1])]);
            bad |= hi | lo;
            *out = (hi << 4) | (lo & 0xf);
        }
        (bad & INVALID == 0).then_some(RequestId(b))
    }
}

/// A digit's value, or [`INVALID`] for anything but `0-9a-f`.
const INVALID: u8 = 0x10;
const HEX_VAL: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Each byte's two hex digits, looked up at once.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

impl RequestId {
    /// The 32 lowercase hex digits, one table lookup per byte.
    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (pair, b) in out.chunks_exact_mut(2).zip(self.0) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
        }
        out
    }

    /// [`RequestId::hex`] as a `String`: what `to_string` gives, without the formatting
    /// machinery (a relayed request's id is written this way once, ≈ 350 instructions
    /// through `Display`).
    pub fn to_hex_string(&self) -> String {
        std::str::from_utf8(&self.hex())
            .expect("bug: hex digits are ASCII")
            .to_owned()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One write of 32 digits: formatting byte by byte was 3 % of a relayed request's
        // instructions (callgrind, docs/PERFORMANCE.md).
        f.write_str(std::str::from_utf8(&self.hex()).expect("bug: hex digits are ASCII"))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Random bytes as lowercase hex (tokens, agent ids).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("bug: the OS random source failed");
    hex(&b)
}

/// Bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (either case) back to bytes; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| Some(HEX_VAL[usize::from(c.to_ascii_lowercase())]).filter(|v| *v < 16);
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [h, l] => Some((val(*h)? << 4) | val(*l)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let id = RequestId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(id.to_hex_string(), s);
        let formatted: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            s, formatted,
            "the table spells each byte as `{{:02x}}` does"
        );
        assert_eq!(RequestId::parse(&s), Some(id));
        assert_ne!(RequestId::random(), id);
        assert_eq!(RequestId::parse(&s.to_uppercase()), None);
        assert_eq!(RequestId::parse(&s[..31]), None);
        assert_eq!(RequestId::parse("zz000000000000000000000000000000"), None);
        // Each position rejects each kind of non-digit (the check is one OR at the end).
        for at in [0, 1, 17, 31] {
            for c in ['g', 'G', 'A', '/', ':', '`', '\u{e9}'] {
                let mut bad: Vec<char> = s.chars().collect();
                bad[at] = c;
                let bad: String = bad.into_iter().collect();
                assert_eq!(RequestId::parse(&bad), None, "{bad}");
            }
        }
        let known = RequestId([
            0x00, 0x01, 0x0a, 0x10, 0x7f, 0x80, 0xab, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x42,
        ]);
        assert_eq!(known.to_string(), "00010a107f80abff0000000000000042");
    }

    #[test]
    fn tagged_ids_carry_their_tag() {
        let id = RequestId::tagged(0xdead_beef);
        assert_eq!(id.tag(), 0xdead_beef);
        assert!(id.to_string().starts_with("deadbeef"));
        assert_ne!(RequestId::tagged(0xdead_beef), id, "the rest stays random");
    }
}

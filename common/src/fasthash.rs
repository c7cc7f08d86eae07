//! A hasher for maps whose keys no one outside the relay chooses: request ids (128 random
//! bits drawn by the server), pointers and counters. The standard library's SipHash is
//! keyed so that chosen keys cannot pile up in one bucket (HashDoS), which costs ≈ 100
//! instructions per hash; these maps are hashed several times per relayed request
//! (callgrind: ≈ 1 000 instructions per request on each side, docs/PERFORMANCE.md). Maps
//! keyed by anything a user or a peer picks (names, addresses) keep SipHash.
//!
//! The mixing is rustc-hash's (FxHash, version 2): add, multiply by an odd constant, and
//! rotate at the end so that the low bits hashbrown indexes with depend on every input bit.

use std::hash::{BuildHasherDefault, Hasher};

/// The [`std::hash::BuildHasher`] of [`FastHasher`].
pub type FastHash = BuildHasherDefault<FastHasher>;

/// See the module documentation.
#[derive(Default, Clone, Copy, Debug)]
pub struct FastHasher(u64);

const K: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    fn add(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Keys the relay's maps use spread over the buckets a table indexes by its low bits:
    /// aligned pointers (low bits zero), consecutive counters, random ids.
    #[test]
    fn aligned_and_consecutive_keys_spread_over_the_low_bits() {
        let h = FastHash::default();
        let buckets = |keys: &mut dyn Iterator<Item = u64>| {
            let mut seen = [0u32; 64];
            for k in keys {
                seen[(h.hash_one(k) & 63) as usize] += 1;
            }
            seen.iter().filter(|&&n| n > 0).count()
        };
        // 1 024 keys into 64 buckets: every bucket gets some.
        assert_eq!(
            buckets(&mut (0..1024u64).map(|i| 0x7f00_0000_1000 + i * 64)),
            64
        );
        assert_eq!(buckets(&mut (0..1024u64)), 64);
        let ids = (0..1024u64).map(|i| crate::id::RequestId::random().tag() as u64 ^ i);
        assert_eq!(buckets(&mut ids.into_iter()), 64);
        // Strings differ in their hash when one byte differs.
        assert_ne!(
            h.hash_one("0123456789abcdef0"),
            h.hash_one("0123456789abcdef1")
        );
    }
}

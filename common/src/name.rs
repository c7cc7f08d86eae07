//! Backend names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
//!
//! The name is checked on the raw, undecoded path segment, before anything else looks at the
//! request, so no decoding step can turn one name into another.

/// Longest allowed name in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Whether `s` is a valid backend name.
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        // A name made only of dots cannot pass the first-character rule, but `a..b` could be
        // mistaken for a dot-segment by a careless normaliser downstream; refuse it outright.
        && !s.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "robot-1", "A.b_c-d", &"x".repeat(63)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "_a",
            "a/b",
            "a%2Fb",
            "a b",
            "a..b",
            "é",
            &"x".repeat(64),
            "a\0",
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}

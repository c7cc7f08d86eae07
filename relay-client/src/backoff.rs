//! How long an agent waits before it tries a relay-server again: exponential, with jitter
//! so that the agents of a restarted server do not all come back in the same instant.

use std::time::Duration;

/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential backoff with "equal jitter": each delay is drawn between half its cap and
/// the cap, so a delay is never near zero and the agents still spread out.
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// No delay drawn yet. Callers start over by replacing the value with
    /// `Backoff::default()`; there is no reset method.
    pub(crate) fn is_fresh(&self) -> bool {
        self.next == MIN_BACKOFF
    }

    /// The next delay; the cap doubles for the one after, up to [`MAX_BACKOFF`].
    pub(crate) fn next(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).expect("bug: the OS random source failed");
        let frac = u32::from_le_bytes(b) as f64 / u32::MAX as f64;
        cap.mul_f64(0.5 + frac / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_their_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        assert!(b.is_fresh());
        let mut cap = MIN_BACKOFF;
        for _ in 0..16 {
            let d = b.next();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            cap = (cap * 2).min(MAX_BACKOFF);
        }
        assert!(!b.is_fresh());
        // Capped: the sixteenth delay is no longer than the longest.
        assert!(b.next() <= MAX_BACKOFF);
    }
}

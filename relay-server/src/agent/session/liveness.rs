//! When a session pings its agent and when it takes the agent for dead, on one timer.
//!
//! Proxies commonly close WebSockets idle for 30–60 s, so the server pings every
//! [`PING_EVERY`]; a session from which nothing arrived for [`SILENT_LIMIT`] is half-open
//! (the agent or the path is gone without a FIN) and ends. One timer serves both: it fires
//! at the next ping or at the silence limit counted from the last frame seen when it was
//! armed, whichever comes first, and a frame only records the time (no timer work per
//! message). One `Sleep` instead of a `Sleep` and an `Interval` (which boxes a second one):
//! 150 bytes of every idle session.

use std::time::{Duration, Instant};

/// How often the server pings a session (the agent pings too).
pub const PING_EVERY: Duration = Duration::from_secs(15);
/// A session from which nothing arrived for this long is taken for dead.
pub const SILENT_LIMIT: Duration = Duration::from_secs(45);

/// The times one session's timer works from.
#[derive(Debug)]
pub struct Liveness {
    last_in: Instant,
    next_ping: Instant,
}

/// What is due when the timer fires.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing arrived for [`SILENT_LIMIT`]: the session ends.
    Silent,
    /// Send a ping; the timer fires again at the time given.
    Ping(Instant),
    /// Nothing yet (a frame came since it was armed); it fires again at the time given.
    Wait(Instant),
}

impl Liveness {
    /// A session opened at `now`.
    pub fn new(now: Instant) -> Self {
        Liveness {
            last_in: now,
            next_ping: now + PING_EVERY,
        }
    }

    /// When the timer first fires.
    pub fn first(&self) -> Instant {
        self.next_ping.min(self.last_in + SILENT_LIMIT)
    }

    /// A frame arrived at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.last_in = now;
    }

    /// The timer fired at `now`.
    pub fn fired(&mut self, now: Instant) -> Due {
        if now >= self.last_in + SILENT_LIMIT {
            return Due::Silent;
        }
        let ping = now >= self.next_ping;
        if ping {
            self.next_ping = now + PING_EVERY;
        }
        let next = self.next_ping.min(self.last_in + SILENT_LIMIT);
        match ping {
            true => Due::Ping(next),
            false => Due::Wait(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_quiet_session_is_pinged_every_15_s_and_ends_after_45_s() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        assert_eq!(l.first(), t0 + s(15));
        assert_eq!(l.fired(t0 + s(15)), Due::Ping(t0 + s(30)));
        assert_eq!(l.fired(t0 + s(30)), Due::Ping(t0 + s(45)));
        assert_eq!(l.fired(t0 + s(45)), Due::Silent);
    }

    #[test]
    fn frames_keep_it_alive_and_pings_go_on_regardless() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        l.heard(t0 + s(10));
        assert_eq!(l.fired(t0 + s(15)), Due::Ping(t0 + s(30)));
        l.heard(t0 + s(29));
        assert_eq!(l.fired(t0 + s(30)), Due::Ping(t0 + s(45)));
        // 45 s after the start, but 16 s after the last frame.
        assert_eq!(l.fired(t0 + s(45)), Due::Ping(t0 + s(60)));
        assert_eq!(l.fired(t0 + s(60)), Due::Ping(t0 + s(74)));
        // Armed for the silence limit (29 + 45), before the next ping (75).
        assert_eq!(l.fired(t0 + s(74)), Due::Silent);
    }

    #[test]
    fn a_late_timer_pings_once_and_a_frame_before_the_limit_only_rearms_it() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        l.heard(t0 + s(2));
        // A busy thread: the timer armed for 15 s ran at 35 s.
        assert_eq!(l.fired(t0 + s(35)), Due::Ping(t0 + s(47)));
        // Armed for the silence limit (2 + 45); a frame came just before it.
        l.heard(t0 + s(46));
        assert_eq!(l.fired(t0 + s(47)), Due::Wait(t0 + s(50)));
        assert_eq!(l.fired(t0 + s(50)), Due::Ping(t0 + s(65)));
    }
}

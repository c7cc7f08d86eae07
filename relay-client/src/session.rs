//! The agent's end of a session (protocol 2, `relay_common::session`): request heads
//! arrive as OPEN frames and are served like polled ones; whole small responses go back
//! on the session (see `exchange`); the agent grants the server credit for exactly the
//! slots it has free, pings, and notices a dead or black-holed connection within its
//! poll deadline.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_common::carrier::{self, Outbox, ReadEnd};
use relay_common::gate::gated;
use relay_common::message::{ResponseHead, Trailers};
use relay_common::session::{self, Frame};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::agent::{dispatch, resend, Link, Shared};
use crate::relay::OpenSession;

/// How long the farewell (GOAWAY, Close) may take when the agent stops.
const FAREWELL: Duration = Duration::from_secs(2);

/// The way back for the requests that came on one session: whole responses go into its
/// outbox and are kept until the server's ACK covers them; those not covered when the
/// session is lost are sent again through exchanges (where a duplicate is refused).
pub struct Reply {
    outbox: Outbox,
    heads: session::Heads,
    unacked: Mutex<Unacked>,
}

#[derive(Default)]
struct Unacked {
    /// RESPONSE frames acknowledged (the front of `kept` is number `acked`).
    acked: u64,
    kept: VecDeque<Kept>,
}

/// A whole response sent on a session and not yet acknowledged.
pub struct Kept {
    /// The request.
    pub id: String,
    /// Its head.
    pub head: ResponseHead,
    /// Its body.
    pub body: Bytes,
    /// Its trailers.
    pub trailers: Option<Trailers>,
}

impl Reply {
    fn new(heads: session::Heads) -> Self {
        Reply {
            outbox: Outbox::default(),
            heads,
            unacked: Mutex::new(Unacked::default()),
        }
    }

    /// Sends a whole response on the session. Gives it back when the session is over: the
    /// caller sends it through an exchange.
    pub fn respond(&self, kept: Kept) -> Result<(), Box<Kept>> {
        let mut u = self.unacked.lock().expect("bug: poisoned");
        // Under the lock: the order of `kept` is the order of the frames.
        let pushed = self.outbox.push(|b| {
            let (id, t) = (&kept.id, kept.trailers.as_ref());
            session::put_response(b, self.heads, id, &kept.head, &kept.body, t)
        });
        if !pushed {
            return Err(Box::new(kept));
        }
        u.kept.push_back(kept);
        Ok(())
    }

    fn ack(&self, n: u64) {
        let mut u = self.unacked.lock().expect("bug: poisoned");
        while u.acked < n && u.kept.pop_front().is_some() {
            u.acked += 1;
        }
        // A burst's thousands of unacknowledged responses grew the queue; once they are
        // all acknowledged its room goes back, instead of staying at the peak for good.
        if u.kept.is_empty() && u.kept.capacity() > crate::agent::KEEP_ROOM {
            u.kept = VecDeque::new();
        }
    }

    /// Ends the session's writing and returns the responses no ACK covered.
    fn close(&self) -> Vec<Kept> {
        let mut u = self.unacked.lock().expect("bug: poisoned");
        self.outbox.close();
        u.kept.drain(..).collect()
    }
}

/// Why a session ended; the caller opens a new one unless it stopped.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The agent stopped (`stop`).
    #[error("the agent stopped")]
    Stopped,
    /// The server said it goes away (drain, revocation): open a new session.
    #[error("the relay-server ended the session: {0}")]
    GoAway(String),
    /// Reading failed or the server closed.
    #[error("{0}")]
    Read(#[from] ReadEnd),
    /// Nothing arrived for the poll deadline: the connection is taken for dead.
    #[error("nothing arrived on the session for {0:?}")]
    Silent(Duration),
    /// Writing failed.
    #[error("writing to the session failed")]
    WriteFailed,
}

/// Serves requests from one open session until it ends. `slots` is the most credit this
/// session may hold (the agent's capacity, shared with its other links).
pub(crate) async fn run(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    open: OpenSession,
    slots: usize,
    draining: &CancellationToken,
    stop: &CancellationToken,
) -> SessionEnd {
    // OPENs received: acknowledged to the server, and reported by the next session if
    // this one is given up, so the server can put back those that never arrived.
    let mut opens = 0u64;
    let OpenSession { ws, number, heads } = open;
    let (mut stream, sink) = ws;
    let reply = Arc::new(Reply::new(heads));
    let outbox = &reply.outbox;
    let writer = carrier::write(sink, outbox, "agent leaving");
    tokio::pin!(writer);
    let deadline = link.relay.poll_deadline();
    // At most 15 s apart: the server ends a session silent for 45 s.
    let every = (deadline / 3).min(Duration::from_secs(15));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_in = Instant::now();
    // Fires at the deadline counted from the last frame seen when it was armed; a frame
    // since then re-arms it (checked only when it fires: no timer work per message).
    let silence = tokio::time::sleep(deadline);
    tokio::pin!(silence);
    // Slots granted to the server and not yet used by an OPEN.
    let mut granted: Option<OwnedSemaphorePermit> = None;
    let mut said_draining = false;
    let mut pings = 0u64;
    // Made once and gated: the loop turns a few times per request, and each turn would
    // register them again (relay_common::gate).
    let stopped = gated(stop.cancelled());
    let drain = gated(draining.cancelled());
    tokio::pin!(stopped, drain);
    // Kept across turns too, made again only after it fired.
    let mut freed = gated(shared.freed.clone().notified_owned());
    freed.inner_mut().enable();
    let mut freed_spent = false;
    let end = loop {
        // Registered before the check: a slot freed from here on wakes this loop.
        if freed_spent {
            freed.reset(shared.freed.clone().notified_owned());
            freed.inner_mut().enable();
            freed_spent = false;
        }
        if draining.is_cancelled() {
            if !said_draining {
                said_draining = true;
                granted = None;
                outbox.push_local(|b| session::put_goaway(b, "draining"));
            }
        } else {
            grant(shared, &mut granted, slots, outbox);
        }
        // The writer goes last in every turn, so what this turn queued (a response and the
        // CREDIT for the slot it freed, ACKs, pongs) leaves in one write: polled among the
        // branches in random order it wrote a response alone half the time, and the CREDIT
        // right after it (1.6 sends per request instead of 1). Polled here as well, since a
        // branch that is always ready would otherwise keep it from running.
        // With at least two other requests still being served, the answers of those
        // whose backends already replied join this message if their tasks run first:
        // 4.0 -> 3.6-3.7 system calls per request at 16 connections. A lone request, or
        // one beside a long download, is written at once.
        let busy = || shared.in_flight.lock().expect("bug: poisoned").len() >= 2;
        if outbox.buffered() > 0 && busy() {
            tokio::task::yield_now().await;
        }
        let wrote = std::future::poll_fn(|cx| Poll::Ready(writer.as_mut().poll(cx))).await;
        if wrote.is_ready() {
            break SessionEnd::WriteFailed;
        }
        tokio::select! {
            biased;
            _ = &mut stopped => break SessionEnd::Stopped,
            read = carrier::read(&mut stream, heads, outbox) => {
                let frames = match read {
                    Ok(f) => f,
                    Err(e) => break SessionEnd::Read(e),
                };
                last_in = Instant::now();
                let before = opens;
                if let Some(end) = handle(shared, link, &reply, &mut granted, &mut opens, frames) {
                    break end;
                }
                if opens > before {
                    outbox.ack(opens);
                }
            }
            _ = &mut freed => freed_spent = true,
            _ = &mut drain, if !said_draining => {}
            _ = &mut silence => {
                if last_in.elapsed() >= deadline {
                    break SessionEnd::Silent(deadline);
                }
                silence.as_mut().reset((last_in + deadline).into());
            }
            _ = ping.tick() => {
                pings += 1;
                outbox.push_local(|b| session::put_ping(b, pings.to_be_bytes(), false));
            }
            _ = &mut writer => break SessionEnd::WriteFailed,
        }
    };
    // Nothing more is read from this session: what it delivered is final.
    link.relay.session_ended(number, opens);
    // From now on responses go through exchanges, and so do those the server did not
    // acknowledge (they may be lost with the connection).
    let unacked = reply.close();
    if matches!(end, SessionEnd::Stopped) {
        let _ = tokio::time::timeout(FAREWELL, writer).await;
    }
    if !unacked.is_empty() {
        tracing::debug!(n = unacked.len(), "re-sending unacknowledged responses");
    }
    for kept in unacked {
        resend(shared, link, kept);
    }
    end
}

/// Grants the server the free slots this session may still hold, as one CREDIT frame.
fn grant(
    shared: &Shared,
    granted: &mut Option<OwnedSemaphorePermit>,
    slots: usize,
    outbox: &Outbox,
) {
    let held = granted.as_ref().map_or(0, |p| p.num_permits());
    let want = slots
        .saturating_sub(held)
        .min(shared.permits.available_permits());
    if want == 0 {
        return;
    }
    let Ok(more) = shared.permits.clone().try_acquire_many_owned(want as u32) else {
        return;
    };
    if outbox.push_local(|b| session::put_credit(b, want as u32)) {
        match granted {
            Some(p) => p.merge(more),
            None => *granted = Some(more),
        }
    }
}

/// Acts on one message's frames; `Some` ends the session.
fn handle(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    reply: &Arc<Reply>,
    granted: &mut Option<OwnedSemaphorePermit>,
    opens: &mut u64,
    frames: Vec<Frame>,
) -> Option<SessionEnd> {
    let outbox = &reply.outbox;
    for frame in frames {
        match frame {
            Frame::Open(head) => {
                *opens += 1;
                // The server sends no more OPENs than credit; a missing slot means it broke
                // that promise, and the request is served anyway.
                let permit = granted.as_mut().and_then(|p| p.split(1));
                dispatch(shared, link, head, permit, Some(reply.clone()));
            }
            Frame::Cancel(id) => {
                if let Some(t) = shared
                    .in_flight
                    .lock()
                    .expect("bug: poisoned")
                    .get(id.as_str())
                {
                    t.cancel();
                }
            }
            Frame::Ping(d) => {
                outbox.push_local(|b| session::put_ping(b, d, true));
            }
            Frame::Pong(_) => {}
            Frame::Ack(n) => reply.ack(n),
            Frame::GoAway(why) => return Some(SessionEnd::GoAway(why)),
            Frame::Response(_) | Frame::Credit(_) => {
                let why = "RESPONSE and CREDIT go from the agent to the server".into();
                return Some(SessionEnd::Read(ReadEnd::Protocol(why)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::message::BodyKind;

    fn kept(id: &str) -> Kept {
        Kept {
            id: id.into(),
            head: ResponseHead {
                status: 200,
                headers: Default::default(),
                body: BodyKind::Empty,
                content_length: None,
            },
            body: Bytes::new(),
            trailers: None,
        }
    }

    #[test]
    fn a_burst_s_queue_of_unacknowledged_responses_gives_its_room_back() {
        let r = Reply::new(session::Heads::Binary);
        let room = |r: &Reply| r.unacked.lock().unwrap().kept.capacity();
        // The request-response rhythm keeps its small queue.
        for id in ["a", "b"] {
            assert!(r.respond(kept(id)).is_ok());
        }
        r.ack(2);
        let small = room(&r);
        assert!(small > 0);
        for i in 0..3 * crate::agent::KEEP_ROOM {
            assert!(r.respond(kept(&i.to_string())).is_ok());
        }
        let n = 2 + 3 * crate::agent::KEEP_ROOM as u64;
        // Not yet while one is unacknowledged.
        r.ack(n - 1);
        assert!(room(&r) > crate::agent::KEEP_ROOM);
        r.ack(n);
        assert!(
            room(&r) <= crate::agent::KEEP_ROOM,
            "{} places kept",
            room(&r)
        );
        r.ack(n);
        assert_eq!(r.close().len(), 0);
    }

    #[test]
    fn responses_are_kept_until_acknowledged_and_handed_back_when_the_session_ends() {
        let r = Reply::new(session::Heads::Binary);
        for id in ["a", "b", "c"] {
            assert!(r.respond(kept(id)).is_ok());
        }
        r.ack(1);
        // An old or repeated ACK changes nothing.
        r.ack(1);
        r.ack(0);
        let left: Vec<String> = r.close().into_iter().map(|k| k.id).collect();
        assert_eq!(left, ["b", "c"]);
        // After the end nothing more is taken.
        assert_eq!(
            r.respond(kept("d")).err().map(|k| k.id),
            Some("d".to_owned())
        );
        assert!(r.close().is_empty());
    }
}

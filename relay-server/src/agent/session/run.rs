//! One agent session from its switch to its end: it is the agent's one standing poll
//! (requests are claimed while the agent has credit and go down as OPEN frames, cancel
//! notices as CANCEL), and it delivers the whole responses that come up into the requests'
//! response sides, exactly as a `/server/response` exchange would.
//!
//! The session owns its connection, its writer and its registration with the broker: when
//! it ends (agent gone, connection dead, revoked, server stopped, superseded by the agent's
//! newer session in the same slot) the registration drops, which starts the agent's grace
//! period. Requests it handed out stay claimed by the agent: an agent that comes back (a
//! new session, same agent id) finishes them through exchanges; one that does not is
//! declared gone after the grace period and they fail with 502 (or an aborted body), never
//! silently. The exceptions go back to the queue: OPENs never written, and OPENs the
//! agent's next session reports it never received (`resume`, see
//! [`crate::agent::handout::Parked`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use relay_common::carrier::{self, Outbox, ReadEnd};
use relay_common::gate::gated;
use relay_common::session::{self, Frame};
use relay_common::websocket::Role;
use relay_common::MAX_POLL_BATCH;

use crate::agent::handout::Handout;
use crate::agent::registration::{Agent, AgentInfo};
use crate::agent::session::delivery;
use crate::agent::session::liveness::{Due, Liveness};
use crate::base::auth::Grant;
use crate::State;

/// Most credit an agent may have outstanding (its free slots).
const MAX_CREDIT: usize = 1 << 16;
/// How long the last frames (GOAWAY, Close) may take to go out.
const FAREWELL: Duration = Duration::from_secs(5);

/// Why a session ended (logged).
#[derive(Debug)]
enum End {
    Read(ReadEnd),
    Silent,
    WriterFailed,
    Revoked,
    Stopped,
    /// The agent opened a newer session in the same slot.
    Superseded,
}

/// Which of the agent's sessions this is: its slot (relay URL index), the agent's number
/// for it (0: the agent does not resume), and what it reports of its previous one.
pub struct Carrier {
    /// The slot.
    pub slot: u32,
    /// The agent's number for the session.
    pub number: u64,
    /// `(earlier session, OPENs it received there)`.
    pub resume: Option<(u64, u64)>,
}

/// Runs one session from its `switch` (done when hyper has switched the connection)
/// until it ends.
///
/// A function returning an `async move` block rather than an `async fn`: an `async fn`
/// keeps each argument twice in its future, as passed and as moved into the body
/// (rust-lang/rust#62958), and the session's future is most of what an idle agent costs.
pub fn run(
    state: Arc<State>,
    grant: Grant,
    (name, agent_id): (String, String),
    carrier: Carrier,
    info: AgentInfo,
    (switch, heads): (crate::base::switch::Switch, session::Heads),
) -> impl std::future::Future<Output = ()> + Send {
    let slot = carrier.slot;
    async move {
        // The connection keeps its place (an agent's, which lets the agent's other
        // connections past its address's limit) while the session is open.
        let (upgraded, _place) = match switch.switched().await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "agent session: the connection did not switch");
                return;
            }
        };
        // Its shard is its name's home while it lasts (`shards.rs`).
        let _home = state
            .placement
            .as_ref()
            .and_then(|p| p.session_started(&name));
        let (mut stream, sink) = carrier::halves(TokioIo::new(upgraded), Role::Server);
        let outbox = Outbox::default();
        let writer = carrier::write(sink, &outbox, "session over");
        tokio::pin!(writer);
        let begin = |draining: bool| {
            let info = info.clone();
            state
                .broker
                .begin_poll(&name, &agent_id, grant.token(), draining, move || info)
        };
        let mut handle = begin(false);
        let agent = handle.agent().clone();
        let (number, superseded) = agent.open_session(slot);
        if let Some((earlier, opens)) = carrier.resume {
            agent.resume_session(slot, earlier, opens);
        }
        tracing::info!(name, agent = agent_id, slot, ?heads, "agent session opened");
        let mut credit = 0usize;
        // The most credit the agent has given at once: credit below it means requests are
        // out on the agent (a load signal for coalescing, below).
        let mut most_credit = 0usize;
        let mut agent_draining = false;
        let mut liveness = Liveness::new(Instant::now());
        let timer = tokio::time::sleep_until(liveness.first().into());
        tokio::pin!(timer);
        let mut pings = 0u64;
        let mut responses = 0u64;
        // OPENs the agent has not acknowledged: put back in the queue if the session ends
        // before they are written, or if the agent says later that they never arrived.
        let mut handout = handle.handout();
        let mut acked = 0u64;
        let mut settled = 0u64;
        // The waits that end the session live across its turns: made once, not per request.
        // Gated: the loop turns a few times per request, and each turn would poll them again
        // (relay_common::gate). One gated future for the three: one gate and one allocation
        // instead of three of each (about 250 bytes of every idle session).
        let ending = gated(async {
            tokio::select! {
                _ = state.stop.cancelled() => End::Stopped,
                _ = agent.gone.cancelled() => End::Revoked,
                _ = superseded.cancelled() => End::Superseded,
            }
        });
        tokio::pin!(ending);
        // Registrations for work and cancel notices, kept across turns (made again after a
        // wake-up, and with a new poll handle).
        let mut standing = handle.standing();
        let end = 'session: loop {
            // An agent that does not resume acknowledges nothing: written is enough.
            let settle_at = if carrier.number == 0 {
                outbox.sent()
            } else {
                acked
            };
            if settle_at != settled {
                settled = settle_at;
                if carrier.number == 0 {
                    handout.delivered(settled);
                } else {
                    handout.received(settled);
                }
            }
            let max = if agent_draining || state.draining() {
                0
            } else {
                credit.min(MAX_POLL_BATCH)
            };
            handle.stand(&mut standing, max);
            if let Some(batch) = handle.try_next(max) {
                credit -= batch.requests.len();
                let mut marks = Vec::with_capacity(batch.requests.len());
                outbox.push_marked(|b, start| {
                    for head in &batch.requests {
                        session::put_open(b, heads, head);
                        marks.push(start + b.len() as u64);
                    }
                    for id in &batch.cancel {
                        session::put_cancel(b, &id.to_hex_string());
                    }
                });
                let opened = batch.claimed.into_iter().zip(batch.requests);
                for (mark, (pending, head)) in marks.into_iter().zip(opened) {
                    handout.push(mark, pending, head);
                }
            }
            tokio::select! {
                // Something to claim: the next turn takes it.
                _ = standing.fired() => {
                    // Under load (at least two requests already out on the agent), let the
                    // other users' tasks that are ready run first, so that their requests
                    // leave in the same message: 3.9 -> 3.5-3.75 system calls per request at
                    // 16 connections. Alone, or beside one long download, a request goes at
                    // once (a yield there only added latency).
                    if credit + 1 < most_credit {
                        tokio::task::yield_now().await;
                    }
                }
                end = &mut ending => break end,
                read = carrier::read(&mut stream, heads, &outbox) => {
                    let frames = match read {
                        Ok(f) => f,
                        Err(e) => break End::Read(e),
                    };
                    liveness.heard(Instant::now());
                    let before = responses;
                    for frame in frames {
                        match frame {
                            Frame::Credit(n) => {
                                credit = (credit + n as usize).min(MAX_CREDIT);
                                most_credit = most_credit.max(credit);
                            }
                            Frame::Response(r) => {
                                responses += 1;
                                delivery::deliver_response(&state, &grant, r);
                            }
                            Frame::Ping(d) => {
                                outbox.push_local(|b| session::put_ping(b, d, true));
                            }
                            Frame::Pong(_) => {}
                            Frame::GoAway(why) => {
                                // The agent drains: no new work, but its answers and our cancel
                                // notices still travel here. Re-registering marks it draining.
                                tracing::info!(name, agent = agent_id, reason = why, "agent session draining");
                                if !agent_draining {
                                    agent_draining = true;
                                    handle = begin(true);
                                    standing = handle.standing();
                                }
                            }
                            // From the agent: OPENs received so far.
                            Frame::Ack(n) => acked = acked.max(n),
                            Frame::Open(_) | Frame::Cancel(_) => {
                                let why = "OPEN and CANCEL go from the server to the agent".into();
                                break 'session End::Read(ReadEnd::Protocol(why));
                            }
                        }
                    }
                    if responses > before {
                        // The agent may forget what an ACK covers; it rides with the next OPEN
                        // (or goes alone after carrier::ACK_DELAY).
                        outbox.ack(responses);
                    }
                }
                _ = &mut timer => {
                    let next = match liveness.fired(Instant::now()) {
                        Due::Silent => break End::Silent,
                        Due::Ping(next) => {
                            pings += 1;
                            outbox.push_local(|b| session::put_ping(b, pings.to_be_bytes(), false));
                            next
                        }
                        Due::Wait(next) => next,
                    };
                    timer.as_mut().reset(next.into());
                }
                _ = &mut writer => break End::WriterFailed,
            }
        };
        agent.close_session(slot, number);
        drop(handle);
        // Queued frames are not written any more: OPENs among them go back to the queue, for
        // this agent's next session or another agent.
        let cut = outbox.discard();
        handout.put_back_after(cut);
        let reason = match &end {
            End::Stopped => "the relay-server is shutting down",
            End::Revoked => "the agent token was revoked",
            End::Silent => "nothing received for 45 s",
            End::Superseded => "superseded by a newer session of this agent",
            _ => "session over",
        };
        match &end {
            End::Read(ReadEnd::Closed) | End::Stopped => {
                tracing::info!(name, agent = agent_id, reason, "agent session closed");
            }
            e => tracing::warn!(name, agent = agent_id, end = ?e, "agent session ended"),
        }
        // A session the agent replaced is one it no longer reads (it opens another in a slot
        // only after giving the old one up): its requests are settled at once, not after a
        // farewell that may wait on a dead connection. Any other session's farewell comes
        // first, so that what the writer still had in hand counts as written or not.
        let superseded = matches!(end, End::Superseded);
        if superseded {
            settle(&mut handout, &outbox, &agent, &carrier, acked);
        }
        if !matches!(end, End::WriterFailed) {
            outbox.push_local(|b| session::put_goaway(b, reason));
            outbox.close();
            let _ = tokio::time::timeout(FAREWELL, writer).await;
        }
        if !superseded {
            settle(&mut handout, &outbox, &agent, &carrier, acked);
        }
    }
}

/// Settles an ended session's requests: those in a message the writer had taken and did
/// not finish never arrived whole and go back to the queue; those the agent acknowledged
/// stay with it; the rest wait for the agent's next session to say whether they arrived
/// (an agent that does not number its sessions acknowledges nothing: written counts).
fn settle(handout: &mut Handout, outbox: &Outbox, agent: &Agent, carrier: &Carrier, acked: u64) {
    handout.put_back_after(outbox.sent());
    if carrier.number == 0 {
        handout.delivered_all();
    } else {
        handout.received(acked);
        agent.park_session(carrier.slot, carrier.number, handout.park());
    }
}

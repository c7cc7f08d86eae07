//! One connected agent process: what it says it is, its polls and tokens, the cancel
//! notices waiting for it, and its sessions by slot with the requests a lost session
//! leaves for the next one to settle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use relay_common::id::RequestId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::handout::Parked;

/// Where an agent polls from and what it says it is (for the status page).
#[derive(Clone, Debug, Default)]
pub struct AgentInfo {
    /// The address of its first poll.
    pub addr: String,
    /// Its `User-Agent` (name and version).
    pub version: String,
    /// The protocol it speaks.
    pub protocol: AgentProtocol,
}

/// The protocol an agent speaks (shown per agent on the status page and in `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AgentProtocol {
    /// This project's protocol (`X-Relay-Protocol: 1`).
    #[default]
    Relay1,
    /// The Go `http-relay-client`'s protobuf messages (no `X-Relay-Protocol` header).
    V1alpha1,
    /// A session over a WebSocket (protocol 2, `/server/session`).
    Session,
}

impl AgentProtocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentProtocol::Relay1 => "relay/1",
            AgentProtocol::V1alpha1 => "v1alpha1",
            AgentProtocol::Session => "relay/2",
        }
    }
}

/// One connected agent process (identified by its `X-Relay-Agent-Id`) serving one name.
pub struct Agent {
    /// The agent's self-chosen id; only used to group its polls.
    pub id: String,
    /// Address and version.
    pub info: AgentInfo,
    /// When it connected (Unix seconds).
    pub since: u64,
    pub(super) state: Mutex<AgentState>,
    /// Woken when a cancel notice is queued for this agent.
    pub(super) wake: Arc<Notify>,
    /// Cancelled when the agent is declared gone; requests it claimed fail at once.
    pub gone: CancellationToken,
}

pub(super) struct AgentState {
    pub(super) polls: usize,
    pub(super) last_seen: Instant,
    pub(super) draining: bool,
    pub(super) cancels: Vec<RequestId>,
    /// Digests of the tokens its polls presented (one, unless it rotated its token), each
    /// re-checked on reload.
    pub(super) tokens: Vec<[u8; 32]>,
    /// Its open sessions by slot (the agent's relay URL index): each with a number and
    /// the token that ends it when a newer session takes the slot. A list: an agent has a
    /// session per relay URL, usually one (a map's table cost 116 bytes per idle agent).
    sessions: Vec<(u32, u64, CancellationToken)>,
    opened: u64,
    /// Per slot: the last ended session's requests not acknowledged (its agent-chosen
    /// number and the requests), until the agent's next session there settles them.
    parked: HashMap<u32, (u64, Parked)>,
    /// Per slot: a resume that came before its session was parked.
    resumes: HashMap<u32, (u64, u64)>,
}

impl Agent {
    /// A newly connected agent `id`.
    pub(super) fn new(id: &str, info: AgentInfo) -> Agent {
        Agent {
            id: id.to_owned(),
            info,
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            state: Mutex::new(AgentState {
                polls: 0,
                last_seen: Instant::now(),
                draining: false,
                cancels: Vec::new(),
                tokens: Vec::new(),
                sessions: Vec::new(),
                opened: 0,
                parked: HashMap::new(),
                resumes: HashMap::new(),
            }),
            wake: Arc::default(),
            gone: CancellationToken::new(),
        }
    }

    /// A poll (or session) of this agent begins, made with the token of digest `token`.
    pub(super) fn poll_begins(&self, token: Option<&[u8; 32]>, draining: bool) {
        let mut s = self.state.lock().expect("bug: poisoned");
        s.polls += 1;
        s.draining |= draining;
        if let Some(t) = token.filter(|t| !s.tokens.contains(t)) {
            // One, unless the agent rotates its token: no room kept for more (a first push
            // reserves four, 96 bytes per idle agent for nothing).
            s.tokens.reserve_exact(1);
            s.tokens.push(*t);
        }
    }

    /// Registers a session in `slot`; one already there is superseded (its token is
    /// cancelled): an agent opens a new session when it takes the old one for dead, and a
    /// black-holed session the server still believes in would otherwise go on claiming
    /// requests that can never reach the agent. Returns the session's number and token.
    pub fn open_session(&self, slot: u32) -> (u64, CancellationToken) {
        let mut s = self.state.lock().expect("bug: poisoned");
        s.opened += 1;
        let (n, token) = (s.opened, CancellationToken::new());
        match s.sessions.iter_mut().find(|(held, ..)| *held == slot) {
            Some(held) => std::mem::replace(held, (slot, n, token.clone())).2.cancel(),
            None => {
                s.sessions.reserve_exact(1);
                s.sessions.push((slot, n, token.clone()));
            }
        }
        (n, token)
    }

    /// A session (the agent's number `session`) in `slot` ended: keeps its requests not
    /// acknowledged for the agent's next session there to settle.
    pub fn park_session(&self, slot: u32, session: u64, parked: Parked) {
        let mut s = self.state.lock().expect("bug: poisoned");
        if self.gone.is_cancelled() {
            // Declared gone (checked under the lock the reaper holds when it declares):
            // its requests fail with it, and nothing may keep it alive.
            drop(s);
            drop(parked);
            return;
        }
        if s.resumes.get(&slot).is_some_and(|(id, _)| *id == session) {
            let (_, n) = s.resumes.remove(&slot).expect("bug: checked");
            drop(s);
            parked.resume(n);
            return;
        }
        let replaced = s.parked.insert(slot, (session, parked));
        drop(s);
        // Never settled: those stay with the agent.
        drop(replaced);
    }

    /// The agent's new session in `slot` says it received `n` OPENs on its session
    /// `session` before giving it up: the others go back to the queue.
    pub fn resume_session(&self, slot: u32, session: u64, n: u64) {
        let mut s = self.state.lock().expect("bug: poisoned");
        if s.parked.get(&slot).is_some_and(|(id, _)| *id == session) {
            let (_, parked) = s.parked.remove(&slot).expect("bug: checked");
            drop(s);
            parked.resume(n);
        } else {
            // The old session has not ended here yet (it is being superseded).
            s.resumes.insert(slot, (session, n));
        }
    }

    /// Lets go of parked requests (the agent is gone; they fail with it). Also breaks the
    /// cycle agent → parked request → its claim → agent.
    pub(super) fn forget_parked(&self) {
        let parked = std::mem::take(&mut self.state.lock().expect("bug: poisoned").parked);
        drop(parked);
    }

    /// Ends session `n` in `slot` (nothing if a newer one holds the slot).
    pub fn close_session(&self, slot: u32, n: u64) {
        let mut s = self.state.lock().expect("bug: poisoned");
        s.sessions
            .retain(|(held, number, _)| (*held, *number) != (slot, n));
    }

    /// Queues a cancel notice (the user of `id` left) and wakes one of the agent's polls.
    pub fn notify_cancel(&self, id: RequestId) {
        // A Go relay-client has no cancel notices: it learns that the user left from the
        // 400 its next response message gets.
        if self.info.protocol == AgentProtocol::V1alpha1 {
            return;
        }
        self.state.lock().expect("bug: poisoned").cancels.push(id);
        self.wake.notify_one();
    }
}

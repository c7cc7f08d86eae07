//! The broker: which agents are connected for which names, the requests waiting for them,
//! and the table of requests in flight.
//!
//! Locks here are `std::sync::Mutex`es held for a few instructions, never across an
//! `.await`, and never while writing to a peer (the Go relay stalled on exactly that,
//! PR #365).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use relay_common::fasthash::FastHash;
use relay_common::id::RequestId;
use relay_common::message::RequestHead;
use tokio::sync::Notify;

use crate::agent::pending::{Pending, PendingGuard};
pub use crate::agent::poll::PollHandle;
use crate::agent::registration::{Agent, AgentInfo, AgentProtocol, AgentState};
use crate::base::metrics::{NameLabel, NameSeries};

/// Per-name state, kept only while agents are connected for the name.
pub struct NameQueue {
    /// The backend name.
    pub name: String,
    pub(super) queue: Mutex<VecDeque<Arc<Pending>>>,
    /// Woken when a request is queued.
    pub(super) work: Arc<Notify>,
    agents: Mutex<HashMap<String, Arc<Agent>>>,
    /// The broker's count of requests waiting for pickup (a request put back counts again).
    parked: Arc<AtomicUsize>,
    /// The name's request and byte counters (made on the first answered request).
    series: OnceLock<Box<NameSeries>>,
    /// Set when the broker drops the name (its last agent left): requests still under way
    /// count under `name=""` from then on, as any name without agents does.
    forgotten: AtomicBool,
}

impl NameQueue {
    /// The name as a metrics label with its cached series, while agents serve it.
    pub fn label(&self) -> NameLabel<'_> {
        if self.forgotten.load(Ordering::Acquire) {
            return None;
        }
        Some((self.name.as_str(), self.series.get_or_init(Box::default)))
    }

    fn has_live_agent(&self) -> bool {
        self.agents
            .lock()
            .expect("bug: poisoned")
            .values()
            .any(|a| !a.state.lock().expect("bug: poisoned").draining)
    }

    /// Whether a non-draining agent has a poll parked here right now.
    pub fn has_parked_poll(&self) -> bool {
        self.agents
            .lock()
            .expect("bug: poisoned")
            .values()
            .any(|a| {
                let s = a.state.lock().expect("bug: poisoned");
                !s.draining && s.polls > 0
            })
    }

    /// Removes a request from the wait queue (pickup timeout or user gone).
    pub fn unqueue(&self, id: RequestId) -> bool {
        let mut q = self.queue.lock().expect("bug: poisoned");
        let before = q.len();
        q.retain(|p| p.id != id);
        before != q.len()
    }

    /// Puts a request whose delivery to an agent failed back at the head of the queue (it
    /// was first in line), with its head; nothing when its user left meanwhile.
    pub(crate) fn put_back(&self, pending: Arc<Pending>, head: RequestHead) {
        let mut q = self.queue.lock().expect("bug: poisoned");
        if pending.put_back(head, &self.parked) {
            tracing::debug!(id = %pending.id, "request put back in the queue");
            q.push_front(pending);
            drop(q);
            self.work.notify_one();
        }
    }

    /// Takes up to `max` requests for `agent`, skipping ones already cancelled.
    pub(crate) fn take(&self, agent: &Arc<Agent>, max: usize, out: &mut Vec<Arc<Pending>>) {
        let mut q = self.queue.lock().expect("bug: poisoned");
        if agent.gone.is_cancelled() {
            return;
        }
        while out.len() < max {
            let Some(p) = q.pop_front() else { break };
            if p.claim(agent) {
                out.push(p);
            }
        }
    }
}

/// How often the broker looks for requests past a deadline ([`Broker::sweep_overdue`]),
/// for the shortest of the wait timeouts: a twentieth of it, between 10 ms and 1 s. A
/// request's 503 or 504 then comes at most 5 % (or a second) after its deadline.
pub fn sweep_period(shortest_timeout: Duration) -> Duration {
    (shortest_timeout / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Agents of one name with their parked polls.
pub type AgentList = Vec<(Arc<Agent>, usize)>;

/// Everything the broker tracks.
pub struct Broker {
    backends: DashMap<String, Arc<NameQueue>>,
    /// Keyed by ids the server drew: no need for SipHash's keyed protection.
    requests: DashMap<RequestId, Arc<Pending>, FastHash>,
    parked_total: Arc<AtomicUsize>,
    /// Most requests waiting for pickup since [`Broker::take_peak`] last ran.
    peak_parked: AtomicUsize,
    max_parked_per_name: usize,
    max_parked_total: usize,
    agent_grace: Duration,
    /// Metrics (the broker removes a name's series when it forgets the name).
    pub metrics: Arc<crate::base::metrics::Metrics>,
    /// Woken when an agent connects: cluster mode lists a new name at once, since other
    /// replicas can only send its requests here once it is listed.
    pub agent_connected: Notify,
}

/// Outcome of one long poll.
pub struct PollBatch {
    /// Requests handed to the agent, with their heads.
    pub requests: Vec<RequestHead>,
    /// The same requests (same order): what a [`crate::agent::handout::Handout`] puts back
    /// if their delivery fails.
    pub claimed: Vec<Arc<Pending>>,
    /// Requests whose users left.
    pub cancel: Vec<RequestId>,
}

/// A request refused because too many wait already (for this name, or in total).
#[derive(Debug, thiserror::Error)]
#[error("too many requests are waiting for backend {0:?}")]
pub struct QueueFull(pub String);

impl Broker {
    /// An empty broker with the given limits.
    pub fn new(
        max_parked_per_name: usize,
        max_parked_total: usize,
        agent_grace: Duration,
        metrics: Arc<crate::base::metrics::Metrics>,
    ) -> Self {
        Broker {
            metrics,
            backends: DashMap::new(),
            requests: DashMap::default(),
            parked_total: Arc::new(AtomicUsize::new(0)),
            peak_parked: AtomicUsize::new(0),
            max_parked_per_name,
            max_parked_total,
            agent_grace,
            agent_connected: Notify::new(),
        }
    }

    /// Number of requests in flight (queued or claimed, response not finished).
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// The most requests waiting for pickup since the last call: a burst between two
    /// samples is seen, since every request waits first, and 0 says no request arrived.
    pub fn take_peak(&self) -> usize {
        self.peak_parked.swap(0, Ordering::Relaxed)
    }

    /// Number of requests waiting for pickup.
    pub fn parked(&self) -> usize {
        self.parked_total.load(Ordering::Acquire)
    }

    /// Number of names with connected agents.
    pub fn connected_names(&self) -> usize {
        self.backends.len()
    }

    /// Whether agents (draining or not) are connected for `name`.
    pub fn is_connected(&self, name: &str) -> bool {
        self.backends.contains_key(name)
    }

    /// The queue of `name` while agents (draining or not) are connected for it.
    pub fn connected(&self, name: &str) -> Option<Arc<NameQueue>> {
        self.backends.get(name).map(|b| b.clone())
    }

    /// Every connected agent per name (name, agent, parked polls).
    pub fn agents(&self) -> Vec<(String, AgentList)> {
        self.backends
            .iter()
            .map(|b| {
                let agents = b
                    .agents
                    .lock()
                    .expect("bug: poisoned")
                    .values()
                    .map(|a| {
                        let polls = a.state.lock().expect("bug: poisoned").polls;
                        (a.clone(), polls)
                    })
                    .collect();
                (b.key().clone(), agents)
            })
            .collect()
    }

    /// Connected agent processes per name and protocol.
    pub fn agents_per_protocol(&self) -> Vec<(String, &'static str, usize)> {
        let mut out = Vec::new();
        for b in self.backends.iter() {
            let agents = b.agents.lock().expect("bug: poisoned");
            for p in [
                AgentProtocol::Relay1,
                AgentProtocol::Session,
                AgentProtocol::V1alpha1,
            ] {
                let n = agents.values().filter(|a| a.info.protocol == p).count();
                if n > 0 {
                    out.push((b.key().clone(), p.as_str(), n));
                }
            }
        }
        out
    }

    /// Connected agent processes per name.
    pub fn agents_per_name(&self) -> Vec<(String, usize)> {
        self.backends
            .iter()
            .map(|b| {
                let n = b.agents.lock().expect("bug: poisoned").len();
                (b.key().clone(), n)
            })
            .collect()
    }

    /// Tells every request in flight that the relay stopped (after `state.stop` was
    /// cancelled: a request queued later checks the token itself).
    pub fn stop_all(&self) {
        for p in self.requests.iter() {
            p.stop();
        }
    }

    /// Wakes the user side of every request past one of its deadlines (see
    /// [`Pending::check_overdue`]); the relay runs it every [`sweep_period`].
    pub fn sweep_overdue(&self) {
        let now = std::time::Instant::now();
        for p in self.requests.iter() {
            p.check_overdue(now);
        }
    }

    /// The backend for `name` if a non-draining agent is connected.
    pub fn live_backend(&self, name: &str) -> Option<Arc<NameQueue>> {
        let b = self.backends.get(name)?.clone();
        b.has_live_agent().then_some(b)
    }

    /// Queues a user request for `backend` (refused when the name's queue or all queues
    /// together are full). The guard cancels it everywhere when dropped.
    pub fn enqueue(
        self: &Arc<Self>,
        backend: &Arc<NameQueue>,
        pending: impl Into<Arc<Pending>>,
        claimed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<PendingGuard, QueueFull> {
        if self.parked_total.load(Ordering::Acquire) >= self.max_parked_total {
            return Err(QueueFull(backend.name.clone()));
        }
        let pending = pending.into();
        pending.set_queued(self.parked_total.clone(), claimed);
        {
            let mut q = backend.queue.lock().expect("bug: poisoned");
            if q.len() >= self.max_parked_per_name {
                drop(q);
                // Never queued: leaving the Queued state releases the global slot.
                pending.cancel_queued();
                return Err(QueueFull(backend.name.clone()));
            }
            self.requests.insert(pending.id, pending.clone());
            q.push_back(pending.clone());
        }
        // An atomic read, not `requests.len()`, which locks every shard of the map. At
        // least 1: a session may have taken the request already, and the peak also says
        // that requests arrived.
        let parked = self.parked_total.load(Ordering::Acquire).max(1);
        self.peak_parked.fetch_max(parked, Ordering::Relaxed);
        backend.work.notify_one();
        Ok(PendingGuard::new(self.clone(), backend.clone(), pending))
    }

    /// Forgets a finished or abandoned request.
    pub fn forget(&self, id: RequestId) {
        self.requests.remove(&id);
    }

    /// Looks a request up for an agent call. A request of a name the caller may not serve is
    /// reported exactly like an unknown one.
    pub fn lookup(&self, id: &str, allowed: impl Fn(&str) -> bool) -> Option<Arc<Pending>> {
        let id = RequestId::parse(id)?;
        let p = self.requests.get(&id)?.clone();
        allowed(&p.name).then_some(p)
    }

    /// Registers a poll of `agent_id` for `name`, made with the token of digest `token`
    /// (`None`: a client certificate); the returned handle must be ended with
    /// [`PollHandle`]'s drop.
    pub fn begin_poll(
        &self,
        name: &str,
        agent_id: &str,
        token: Option<&[u8; 32]>,
        draining: bool,
        info: impl FnOnce() -> AgentInfo,
    ) -> PollHandle {
        let backend = self
            .backends
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(NameQueue {
                    name: name.to_owned(),
                    queue: Mutex::new(VecDeque::new()),
                    work: Arc::default(),
                    agents: Mutex::new(HashMap::new()),
                    parked: self.parked_total.clone(),
                    series: OnceLock::new(),
                    forgotten: AtomicBool::new(false),
                })
            })
            .clone();
        let agent = backend
            .agents
            .lock()
            .expect("bug: poisoned")
            .entry(agent_id.to_owned())
            .or_insert_with(|| {
                tracing::info!(name, agent = agent_id, "relay-client connected");
                self.agent_connected.notify_one();
                Arc::new(Agent::new(agent_id, info()))
            })
            .clone();
        agent.poll_begins(token, draining);
        PollHandle::new(backend, agent)
    }

    /// Applies a reload: every agent one of whose tokens `still` no longer grants its name
    /// is gone at once. Its parked polls end (they answer 401), the requests it claimed
    /// fail, tunnels through it close, and new requests for a name left without agents get
    /// 503. Returns how many agents were revoked.
    pub fn revoke(&self, still: impl Fn(&[u8; 32], &str) -> bool) -> usize {
        let mut revoked = 0;
        self.retain_agents(|name, id, s| {
            let keep = s.tokens.iter().all(|t| still(t, name));
            if !keep {
                tracing::warn!(name, agent = %id, "relay-client's token revoked: disconnected");
                revoked += 1;
            }
            keep
        });
        revoked
    }

    /// Declares agents without polls for longer than the grace period gone, and drops the
    /// state of names left without agents. Run periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        self.retain_agents(|name, id, s| {
            let alive = s.polls > 0 || now.duration_since(s.last_seen) < self.agent_grace;
            if !alive {
                tracing::info!(name, agent = %id, "relay-client gone");
            }
            alive
        });
    }

    /// Keeps the agents `keep` says to keep: the others are declared gone (their claimed
    /// and parked requests fail), and a name left without agents is dropped with its queue
    /// (waiting requests fail).
    fn retain_agents(&self, mut keep: impl FnMut(&str, &str, &AgentState) -> bool) {
        self.backends.retain(|name, backend| {
            let mut agents = backend.agents.lock().expect("bug: poisoned");
            let mut gone = Vec::new();
            agents.retain(|id, agent| {
                let stays = keep(name, id, &agent.state.lock().expect("bug: poisoned"));
                if !stays {
                    agent.gone.cancel();
                    gone.push(agent.clone());
                }
                stays
            });
            let left = !agents.is_empty();
            drop(agents);
            for agent in gone {
                agent.forget_parked();
                // The users of the requests it holds answer 502 now (their user sides wait
                // on `Pending::claimer_lost`, not on every agent's end). After `gone` was
                // cancelled: a claim racing this sweep sees it (`Pending::claim`).
                for p in self.requests.iter() {
                    p.claimer_gone(&agent);
                }
            }
            if !left {
                backend.forgotten.store(true, Ordering::Release);
                self.metrics.forget(name);
                for p in backend.queue.lock().expect("bug: poisoned").iter() {
                    p.orphan();
                }
            }
            left
        });
    }
}

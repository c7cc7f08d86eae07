//! Prometheus metrics (OpenMetrics text at `/metrics`), kept with `prometheus-client`.
//!
//! Label cardinality is bounded: a backend name appears as a label only while agents serve
//! it (requests for other names count under `name=""`), its series are removed when the
//! broker forgets the name, methods outside the standard set count as `other`, and statuses
//! count by class.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Standard methods kept as label values; anything else is `other`.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    name: String,
    method: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    name: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    name: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// Every metric the server exports.
pub struct Metrics {
    /// Per-backend history for the status page (same cardinality rules).
    pub history: crate::base::history::History,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    pickup_wait: Histogram,
    time_to_head: Histogram,
    duration: Histogram,
    bytes: Family<BytesLabels, Counter>,
    agents: Family<AgentLabels, Gauge>,
    backend_duration: Histogram,
    parked: Gauge,
    in_flight: Gauge,
    tunnels: Gauge,
    carriers: Gauge,
    tunnel_exchanges: Counter,
    shard_handoffs: Counter,
    connections: Gauge,
    buffered: Gauge,
    auth_failures: Family<SideLabel, Counter>,
    rejections: Family<LimitLabel, Counter>,
    forwarded: Family<KindLabel, Counter>,
    redis_up: Gauge,
}

fn seconds() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relay");
        let m = Metrics {
            history: crate::base::history::History::default(),
            requests: Family::default(),
            pickup_wait: seconds(),
            time_to_head: seconds(),
            duration: seconds(),
            bytes: Family::default(),
            agents: Family::default(),
            backend_duration: seconds(),
            parked: Gauge::default(),
            in_flight: Gauge::default(),
            tunnels: Gauge::default(),
            carriers: Gauge::default(),
            tunnel_exchanges: Counter::default(),
            shard_handoffs: Counter::default(),
            connections: Gauge::default(),
            buffered: Gauge::default(),
            auth_failures: Family::default(),
            rejections: Family::default(),
            forwarded: Family::default(),
            redis_up: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "User requests answered, by backend name, method and status class",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "pickup_wait",
            "Time from a request's arrival until an agent took it",
            Unit::Seconds,
            m.pickup_wait.clone(),
        );
        registry.register_with_unit(
            "time_to_response_head",
            "Time from a request's arrival until its response head",
            Unit::Seconds,
            m.time_to_head.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival until its response (or tunnel) ended",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register_with_unit(
            "body",
            "Relayed body bytes, up (user to backend) and down (backend to user)",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "agents",
            "Connected agent processes per backend name and protocol (relay/1, or v1alpha1 \
             for Go http-relay-clients)",
            m.agents.clone(),
        );
        registry.register_with_unit(
            "backend_duration",
            "Time backends took to answer, as Go http-relay-clients report it \
             (backend_duration_ms of their last message)",
            Unit::Seconds,
            m.backend_duration.clone(),
        );
        registry.register(
            "parked_requests",
            "Requests waiting for an agent to pick them up",
            m.parked.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests between arrival and the end of their response",
            m.in_flight.clone(),
        );
        registry.register(
            "open_tunnels",
            "Open tunnels and WebSockets: users' switched (101) connections",
            m.tunnels.clone(),
        );
        registry.register(
            "tunnel_carriers",
            "Switched connections carrying users' tunnels: agents' tunnel exchanges and hops \
             to other replicas",
            m.carriers.clone(),
        );
        registry.register(
            "tunnel_exchanges",
            "Tunnels whose agent carried both directions on one tunnel exchange",
            m.tunnel_exchanges.clone(),
        );
        registry.register(
            "shard_handoffs",
            "Connections the accept path handed to the shard of their name (--shards)",
            m.shard_handoffs.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register_with_unit(
            "buffered",
            "Relayed bytes held in memory",
            Unit::Bytes,
            m.buffered.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused credentials, by side (agent, user, or cluster for calls between replicas)",
            m.auth_failures.clone(),
        );
        registry.register(
            "cluster_forwarded",
            "Calls between replicas (cluster mode), by kind: user_out/user_in (user requests \
             sent to / received from the replica holding the agent), agent_out/agent_in \
             (agent calls for requests another replica owns)",
            m.forwarded.clone(),
        );
        registry.register(
            "cluster_redis_up",
            "1 while the cluster directory (Redis) answers, 0 when it does not (cluster mode)",
            m.redis_up.clone(),
        );
        registry.register(
            "limit_rejections",
            "Requests or connections refused by a limit",
            m.rejections.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn method_label(m: &http::Method) -> &'static str {
    METHODS.get(method_index(m)).copied().unwrap_or("other")
}

/// The method's place in [`METHODS`] (`METHODS.len()`: `other`).
fn method_index(m: &http::Method) -> usize {
    METHODS
        .iter()
        .position(|x| *x == m.as_str())
        .unwrap_or(METHODS.len())
}

fn status_label(status: u16) -> &'static str {
    STATUS_CLASSES[status_index(status)]
}

/// The status class's place in [`STATUS_CLASSES`] (anything outside 1xx-5xx counts as 5xx).
fn status_index(status: u16) -> usize {
    match usize::from(status / 100) {
        c @ 1..=5 => c - 1,
        _ => STATUS_CLASSES.len() - 1,
    }
}

/// A connected name's request and byte counters, kept with its queue in the broker: a
/// request finds its counter by index instead of building a label set (a `String`) and
/// looking it up in the family's hashed, read-locked map, twice per request before. Each
/// counter is made on first use, so the exposition shows the same series as before.
#[derive(Default)]
pub struct NameSeries {
    requests: [[OnceLock<Counter>; STATUS_CLASSES.len()]; METHODS.len() + 1],
    /// Up, down.
    bytes: [OnceLock<Counter>; 2],
    /// The status page's series.
    history: OnceLock<crate::base::history::NameHistory>,
}

/// A name as a label, with its cached series (`None`: a name without agents, counted
/// under `name=""`).
pub type NameLabel<'a> = Option<(&'a str, &'a NameSeries)>;

impl Metrics {
    /// Counts one answered request. `name` is `None` for names without agents.
    pub fn request(&self, name: NameLabel<'_>, method: &http::Method, status: u16) {
        let labels = |name: &str| RequestLabels {
            name: name.to_owned(),
            method: method_label(method),
            status: status_label(status),
        };
        match name {
            Some((name, series)) => series.requests[method_index(method)][status_index(status)]
                .get_or_init(|| self.requests.get_or_create(&labels(name)).clone())
                .inc(),
            None => self.requests.get_or_create(&labels("")).inc(),
        };
    }

    /// Records how long a request waited for pickup.
    pub fn pickup(&self, wait: Duration) {
        self.pickup_wait.observe(wait.as_secs_f64());
    }

    /// Records an answered request in the status page's history (`error`: the message of
    /// a failure).
    pub fn record(&self, name: NameLabel<'_>, status: u16, error: Option<&str>) {
        match name {
            Some((name, series)) => {
                let h = series.history.get_or_init(|| self.history.handle(name));
                self.history.record(Some(name), Some(h), status, error);
            }
            None => self.history.record(None, None, status, error),
        }
    }

    /// Records the time to the response head.
    pub fn head(&self, after: Duration) {
        self.time_to_head.observe(after.as_secs_f64());
    }

    /// Records a finished request: its duration and body bytes each way.
    pub fn finished(&self, name: NameLabel<'_>, took: Duration, up: u64, down: u64) {
        self.duration.observe(took.as_secs_f64());
        for (i, (direction, n)) in [("up", up), ("down", down)].into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let labels = |name: &str| BytesLabels {
                name: name.to_owned(),
                direction,
            };
            match name {
                Some((name, series)) => series.bytes[i]
                    .get_or_init(|| self.bytes.get_or_create(&labels(name)).clone())
                    .inc_by(n),
                None => self.bytes.get_or_create(&labels("")).inc_by(n),
            };
        }
    }

    /// Records the backend time a Go relay-client reported for one request.
    pub fn backend_duration(&self, took: Duration) {
        self.backend_duration.observe(took.as_secs_f64());
    }

    /// Counts a refused credential (`agent` or `user`).
    pub fn auth_failure(&self, side: &'static str) {
        self.auth_failures.get_or_create(&SideLabel { side }).inc();
    }

    /// Counts a call between replicas.
    pub fn forwarded(&self, kind: &'static str) {
        self.forwarded.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts a limit rejection.
    pub fn rejected(&self, limit: &'static str) {
        self.rejections.get_or_create(&LimitLabel { limit }).inc();
    }

    /// Counts a tunnel carried on a tunnel exchange.
    pub fn tunnel_exchange(&self) {
        self.tunnel_exchanges.inc();
    }

    /// Counts a connection handed to a shard.
    pub fn shard_handoff(&self) {
        self.shard_handoffs.inc();
    }

    /// Connections handed to shards so far.
    pub fn shard_handoffs(&self) -> u64 {
        self.shard_handoffs.get()
    }

    /// Tunnels carried on tunnel exchanges so far.
    pub fn tunnel_exchanges(&self) -> u64 {
        self.tunnel_exchanges.get()
    }

    /// Rejections counted so far for `limit`.
    pub fn rejections(&self, limit: &'static str) -> u64 {
        self.rejections.get_or_create(&LimitLabel { limit }).get()
    }

    /// Removes every series labelled with `name` (the broker forgot it).
    pub fn forget(&self, name: &str) {
        self.history.forget(name);
        for method in METHODS.iter().copied().chain(["other"]) {
            for status in STATUS_CLASSES {
                self.requests.remove(&RequestLabels {
                    name: name.to_owned(),
                    method,
                    status,
                });
            }
        }
        for direction in ["up", "down"] {
            self.bytes.remove(&BytesLabels {
                name: name.to_owned(),
                direction,
            });
        }
        for protocol in ["relay/1", "v1alpha1"] {
            self.agents.remove(&AgentLabels {
                name: name.to_owned(),
                protocol,
            });
        }
    }

    /// The exposition text, with the gauges set from `now`.
    pub fn render(&self, now: &Sample) -> String {
        self.parked.set(now.parked as i64);
        self.in_flight.set(now.in_flight as i64);
        self.tunnels.set(now.tunnels as i64);
        self.carriers.set(now.carriers as i64);
        self.connections.set(now.connections as i64);
        self.buffered.set(now.buffered as i64);
        if let Some(up) = now.redis_up {
            self.redis_up.set(i64::from(up));
        }
        self.agents.clear();
        for (name, protocol, agents) in &now.agents_per_name {
            self.agents
                .get_or_create(&AgentLabels {
                    name: name.clone(),
                    protocol,
                })
                .set(*agents as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("bug: writing to a String cannot fail");
        out
    }
}

/// Gauges read from the running server when `/metrics` is asked for.
#[derive(Debug, Default)]
pub struct Sample {
    /// Parked user requests.
    pub parked: usize,
    /// Requests in flight.
    pub in_flight: usize,
    /// Open tunnels.
    pub tunnels: usize,
    /// Switched connections carrying tunnels.
    pub carriers: usize,
    /// Open connections.
    pub connections: usize,
    /// Relayed bytes held in memory.
    pub buffered: usize,
    /// Whether Redis answers (cluster mode only).
    pub redis_up: Option<bool>,
    /// Agents per connected name and protocol.
    pub agents_per_name: Vec<(String, &'static str, usize)>,
}

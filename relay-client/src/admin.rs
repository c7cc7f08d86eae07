//! The agent's optional operator endpoint (`--admin-listen`): `/healthz`, `/readyz` (ready
//! while the relay-server answers and the agent is not draining) and Prometheus `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// What the agent counts.
pub struct Stats {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    /// The family's counters for served, failed and cancelled, taken once: a lookup in the
    /// family hashes its label on every request (≈ 160 instructions). All three show from
    /// the start, at 0 until they happen.
    outcomes: [Counter; 3],
    in_flight: Gauge,
    poll_failures: Counter,
    connected: Gauge,
    reachable: AtomicBool,
    draining: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relay_agent");
        let s = Stats {
            registry: Registry::default(),
            requests: Family::default(),
            outcomes: Default::default(),
            in_flight: Gauge::default(),
            poll_failures: Counter::default(),
            connected: Gauge::default(),
            reachable: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        };
        // The gauge first: a scrape reads the metrics in this order, and `finished` counts
        // the outcome before the gauge drops, so a scrape that reads nothing in flight then
        // reads every outcome (the other order could read an outcome's count just before
        // it rose, then the gauge just after it fell).
        registry.register(
            "requests_in_flight",
            "Requests being served",
            s.in_flight.clone(),
        );
        registry.register(
            "requests",
            "Requests handled, by outcome: served (answered to the end), failed, cancelled",
            s.requests.clone(),
        );
        registry.register(
            "poll_failures",
            "Long polls that failed (the relay-server unreachable or refusing)",
            s.poll_failures.clone(),
        );
        registry.register(
            "connected",
            "1 while the relay-server answers the agent's polls",
            s.connected.clone(),
        );
        let outcomes = ["served", "failed", "cancelled"]
            .map(|outcome| s.requests.get_or_create(&OutcomeLabel { outcome }).clone());
        Stats {
            registry,
            outcomes,
            ..s
        }
    }
}

impl Stats {
    /// The relay-server answered (probe or poll).
    pub fn reachable(&self) {
        self.reachable.store(true, Ordering::Release);
        self.connected.set(1);
    }

    /// A poll failed.
    pub fn poll_failed(&self) {
        self.poll_failures.inc();
        self.reachable.store(false, Ordering::Release);
        self.connected.set(0);
    }

    /// The agent began its drain.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// A request was handed to the agent.
    pub fn started(&self) {
        self.in_flight.inc();
    }

    /// A request ended.
    pub fn finished(&self, outcome: crate::exchange::Outcome) {
        let i = match outcome {
            crate::exchange::Outcome::Served => 0,
            crate::exchange::Outcome::Failed => 1,
            crate::exchange::Outcome::Cancelled => 2,
        };
        // Counted before the gauge drops, so a scrape that sees nothing in flight sees
        // every outcome.
        self.outcomes[i].inc();
        // One atomic step on the gauge itself: a count kept beside it and copied in with
        // `set` let a request starting while another ended leave the gauge at 0 with one
        // in flight (the two copies landed in the other order).
        self.in_flight.dec();
    }

    fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining");
        }
        if !self.reachable.load(Ordering::Acquire) {
            return Err("the relay-server is not reachable");
        }
        Ok(())
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn answer(stats: &Stats, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match stats.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into(), PLAIN),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), PLAIN),
        },
        "/metrics" => {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &stats.registry)
                .expect("bug: writing to a String cannot fail");
            text(
                StatusCode::OK,
                out,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "this listener serves /healthz, /readyz and /metrics\n".into(),
            PLAIN,
        ),
    }
}

/// Serves the operator endpoints on `listener` until `stop`.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        let stats = stats.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = answer(&stats, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Outcome;

    fn exposition(stats: &Stats) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &stats.registry).expect("encodes");
        out
    }

    /// The counters taken at start are the family's: each outcome counts under its own
    /// label, and one that never happened shows 0.
    #[test]
    fn outcomes_count_under_their_labels() {
        let stats = Stats::default();
        for outcome in [Outcome::Served, Outcome::Served, Outcome::Failed] {
            stats.started();
            stats.finished(outcome);
        }
        let text = exposition(&stats);
        for line in [
            r#"relay_agent_requests_total{outcome="served"} 2"#,
            r#"relay_agent_requests_total{outcome="failed"} 1"#,
            r#"relay_agent_requests_total{outcome="cancelled"} 0"#,
            "relay_agent_requests_in_flight 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}

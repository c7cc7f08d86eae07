//! The operator endpoints `/metrics`, `/status` and `/status.json`: gauges sampled from the
//! running server at the moment they are asked for.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use crate::base::body::{full, RelayBody};
use crate::base::metrics::Sample;
use crate::ops::status;
use crate::State;

/// Answers one operator endpoint (`path` is `/metrics`, `/status.json` or `/status`).
pub fn answer(state: &State, path: &str) -> Response<RelayBody> {
    let (body, content_type) = match path {
        "/metrics" => (
            state.metrics.render(&sample(state)),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/status.json" => (status::json(state).to_string(), "application/json"),
        _ => (status::PAGE.to_owned(), "text/html; charset=utf-8"),
    };
    let mut resp = Response::new(full(Bytes::from(body)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn sample(state: &State) -> Sample {
    Sample {
        parked: state.broker.parked(),
        in_flight: state.broker.in_flight(),
        tunnels: state.tunnels.len(),
        carriers: state.carriers.len(),
        connections: state.conns.open(),
        buffered: state.budget.in_use(),
        redis_up: state.cluster.as_ref().map(|c| c.redis_up()),
        agents_per_name: state.broker.agents_per_protocol(),
    }
}

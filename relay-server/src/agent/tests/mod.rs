//! Unit tests of the agent layer: the broker, the request's two state machines and the
//! upload framing, on real values (no mocks) and, where timing matters, tokio's paused
//! clock.

mod broker;
mod exchange;
mod handout;
mod sides;

use std::sync::Arc;
use std::time::Duration;

use relay_common::id::RequestId;
use relay_common::message::{BodyKind, RequestHead};
use tokio::sync::oneshot;

use crate::agent::broker::Broker;
use crate::agent::pending::{Deadlines, Pending};
use crate::agent::registration::AgentInfo;
use crate::agent::response_side::ResponseStart;
use crate::agent::upload_side::UploadSide;
use crate::base::metrics::Metrics;

/// A request for `name` with `upload`, and where its response head goes.
fn request(name: &str, upload: UploadSide) -> (Pending, oneshot::Receiver<ResponseStart>) {
    let far = std::time::Instant::now() + Duration::from_secs(3_600);
    let deadlines = Deadlines {
        pickup: far,
        response: far,
    };
    request_by(name, upload, deadlines)
}

/// Like [`request`], with its `deadlines`.
fn request_by(
    name: &str,
    upload: UploadSide,
    deadlines: Deadlines,
) -> (Pending, oneshot::Receiver<ResponseStart>) {
    let id = RequestId::random();
    let head = RequestHead {
        id: id.to_string(),
        method: "POST".into(),
        target: "/".into(),
        headers: Default::default(),
        body: BodyKind::Stream,
        content_length: None,
        upgrade: None,
    };
    let (tx, rx) = oneshot::channel();
    let budget = Arc::new(crate::base::budget::Budget::new(1 << 20));
    let account = crate::base::budget::LazyAccount::new(budget, [127, 0, 0, 1].into());
    (
        Pending::new(id, name.into(), head, upload, tx, account, deadlines),
        rx,
    )
}

/// A broker with room for `per_name` requests per name and `total` in all, whose agents are
/// gone as soon as they have no poll (no grace).
fn broker(per_name: usize, total: usize) -> Arc<Broker> {
    Arc::new(Broker::new(
        per_name,
        total,
        Duration::ZERO,
        Arc::new(Metrics::default()),
    ))
}

fn info() -> AgentInfo {
    AgentInfo {
        addr: "127.0.0.1".into(),
        version: "test".into(),
        ..Default::default()
    }
}

//! The agent's life: for each relay-server URL, probe the transport and keep its share of
//! the long polls open; hand each request to its own task (its exchanges go back to the
//! server it came from), cancel what a server says is gone, and drain on shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_common::fasthash::FastHash;
use relay_common::message::RequestHead;
use relay_common::MAX_POLL_BATCH;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Stats;
use crate::backoff::Backoff;
use crate::config::{Config, Transport};
use crate::error::{AgentError, RelayCallError};
use crate::exchange::{serve, Ctx};
use crate::relay::{Polled, RelayClient};
use crate::service::Services;
use crate::session::{Kept, Reply};
use crate::upstream::Backend;

/// The longest delay before a new session after one was lost (the shared backoff
/// doubles up to 30 s; sessions cap it here), so that agents serve again within
/// seconds of a server restart.
const MAX_SESSION_BACKOFF: Duration = Duration::from_secs(4);

/// The requests being served, by id, with what cancels each.
pub(crate) type InFlight = Mutex<HashMap<Arc<str>, CancellationToken, FastHash>>;

/// What every link shares: the backend's capacity, the requests in flight, the drain.
pub(crate) struct Shared {
    stats: Arc<Stats>,
    pub(crate) permits: Arc<Semaphore>,
    /// Signalled when a request finishes, so polls and sessions at capacity can ask for
    /// work again.
    pub(crate) freed: Arc<Notify>,
    /// Keyed by ids the relay-server drew: no need for SipHash's keyed protection.
    pub(crate) in_flight: InFlight,
    tracker: TaskTracker,
}

/// One relay-server URL and the context of the requests taken from it (their exchanges go
/// back to the server they came from).
pub(crate) struct Link {
    ctx: Arc<Ctx>,
    pub(crate) relay: RelayClient,
}

/// Runs the agent until `shutdown`, then drains. Returns an error only when retrying cannot
/// help (refused token or name, bad configuration).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    if !relay_common::name::is_valid_name(&cfg.name) {
        return Err(AgentError::Config(format!(
            "invalid backend name {:?}",
            cfg.name
        )));
    }
    let agent_id = relay_common::id::random_hex(16);
    // One client per URL, built up front so a bad URL or certificate fails at start.
    let urls: Vec<_> = std::iter::once(cfg.relay_url.clone())
        .chain(cfg.more_relay_urls.iter().cloned())
        .collect();
    let mut relays = Vec::with_capacity(urls.len());
    for (slot, url) in urls.iter().enumerate() {
        let mut one = cfg.clone();
        one.relay_url = url.clone();
        relays.push((
            url.clone(),
            RelayClient::new(&one, &agent_id)?.with_slot(slot),
        ));
    }
    let backend = Backend::new(&cfg)?;
    let _sweeping = backend.sweeping();
    let services = Arc::new(Services::new(
        cfg.kernel_id.clone().unwrap_or_else(|| cfg.name.clone()),
        &cfg.services,
        &cfg.service_cmds,
        cfg.service_start_timeout,
        cfg.tcp_keepalive,
    )?);
    let stats = Arc::new(Stats::default());
    let admin_stop = CancellationToken::new();
    let _admin_guard = admin_stop.clone().drop_guard();
    if let Some(addr) = cfg.admin_listen {
        let listener = relay_config_file::listen::bind(addr)
            .map_err(|e| AgentError::Config(format!("binding --admin-listen {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        tracing::info!(addr = %local, "admin endpoints listening");
        tokio::spawn(crate::admin::serve(listener, stats.clone(), admin_stop));
    }
    let shared = Arc::new(Shared {
        stats: stats.clone(),
        permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
        freed: Arc::default(),
        in_flight: Mutex::new(HashMap::default()),
        tracker: TaskTracker::new(),
    });
    // The pollers are spread over the URLs, at least one each.
    let links_n = relays.len();
    let per_link = cfg.pollers.max(1).div_ceil(links_n).max(1);
    let stop = CancellationToken::new();
    let mut links = tokio::task::JoinSet::new();
    for (url, relay) in relays {
        let ctx = Ctx {
            relay: relay.clone(),
            backend: backend.clone(),
            // Until the probe says otherwise.
            transport: cfg.transport,
            exchange_bytes: cfg.exchange_bytes,
            services: services.clone(),
        };
        let link = link(
            cfg.clone(),
            url,
            ctx,
            shared.clone(),
            (per_link, links_n),
            shutdown.clone(),
            stop.clone(),
        );
        links.spawn(link);
    }
    let result = tokio::select! {
        Some(r) = links.join_next() => r.expect("bug: link task panicked"),
        _ = shutdown.cancelled() => Ok(()),
    };
    if result.is_ok() {
        // Polls go on in draining mode (no new work, cancel notices still arrive) while the
        // requests in flight finish.
        shared.tracker.close();
        shared.stats.draining();
        let n = shared.in_flight.lock().expect("bug: poisoned").len();
        tracing::info!(in_flight = n, "draining");
        if tokio::time::timeout(cfg.drain_timeout, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed with requests still in flight");
        }
    }
    stop.cancel();
    // Sessions write what they still hold (the last answers) and close; then whatever
    // is left is cut.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while links.join_next().await.is_some() {}
    })
    .await;
    links.shutdown().await;
    result
}

/// Serves through one relay-server URL: probes it until it answers (the other URLs serve
/// meanwhile), then keeps `pollers` polls on it. Ends with an error only when retrying
/// cannot help, and otherwise at `stop`.
async fn link(
    cfg: Config,
    url: http::Uri,
    mut ctx: Ctx,
    shared: Arc<Shared>,
    (pollers, links): (usize, usize),
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let relay = ctx.relay.clone();
    let mut backoff = Backoff::default();
    let transport = loop {
        let r = tokio::select! {
            r = relay.probe(cfg.transport) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        match r {
            Ok(t) => break t,
            Err(e) => {
                fatal(&e)?;
                tracing::warn!(relay = %url, error = %e, "relay-server not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(name = %cfg.name, ?transport, relay = %url, "relay-client started");
    shared.stats.reachable();
    ctx.transport = transport;
    let link = Arc::new(Link {
        ctx: Arc::new(ctx),
        relay,
    });
    if cfg.transport.tries_session() {
        let slots = cfg.max_in_flight.div_ceil(links).max(1);
        match sessions(&cfg, &url, &shared, &link, slots, &shutdown, &stop).await? {
            Carried::Done => return Ok(()),
            Carried::Refused(why) => {
                tracing::warn!(relay = %url, reason = why, "no session possible: using long polls");
            }
        }
    }
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..pollers {
        polls.spawn(poller(
            shared.clone(),
            link.clone(),
            shutdown.clone(),
            stop.clone(),
        ));
    }
    while let Some(r) = polls.join_next().await {
        r.expect("bug: poller panicked")?;
    }
    Ok(())
}

/// How a link's sessions ended.
enum Carried {
    /// The agent stopped.
    Done,
    /// The way to the server does not carry sessions (its reason): use long polls.
    Refused(String),
}

/// Keeps one session open on the link, opening a new one whenever it ends, until `stop`.
/// In `auto` mode, an upgrade refused by the server or a proxy (any answer but 101 that
/// retrying cannot change) hands the link to long polls.
async fn sessions(
    cfg: &Config,
    url: &http::Uri,
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    slots: usize,
    draining: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Carried, AgentError> {
    let mut backoff = Backoff::default();
    loop {
        let opened = tokio::select! {
            r = link.relay.open_session() => r,
            _ = stop.cancelled() => return Ok(Carried::Done),
        };
        match opened {
            Ok(open) => {
                backoff = Backoff::default();
                shared.stats.reachable();
                tracing::info!(relay = %url, carrier = "websocket", heads = ?open.heads, "agent session open");
                let end = crate::session::run(shared, link, open, slots, draining, stop).await;
                match end {
                    crate::session::SessionEnd::Stopped => return Ok(Carried::Done),
                    // A black-holed path: pooled connections to the server are most likely
                    // dead the same way, and calls on them would wait forever.
                    crate::session::SessionEnd::Silent(_) => link.relay.fresh_connections(),
                    _ => {}
                }
                tracing::warn!(relay = %url, reason = %end, "agent session lost; opening another");
            }
            Err(e) => {
                fatal(&e)?;
                if cfg.transport == Transport::Auto {
                    if let RelayCallError::Status { status, message } = &e {
                        if !matches!(status, 429 | 502 | 503 | 504) {
                            return Ok(Carried::Refused(format!("{status} {message}")));
                        }
                    }
                }
                shared.stats.poll_failed();
                tracing::warn!(relay = %url, error = %e, "agent session could not open");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next().min(MAX_SESSION_BACKOFF)) => {}
            _ = stop.cancelled() => return Ok(Carried::Done),
        }
    }
}

fn fatal(e: &RelayCallError) -> Result<(), AgentError> {
    match e {
        RelayCallError::Status {
            status: s @ (401 | 403),
            message,
        } => Err(AgentError::Refused {
            status: *s,
            message: message.clone(),
        }),
        _ => Ok(()),
    }
}

async fn poller(
    shared: Arc<Shared>,
    link: Arc<Link>,
    draining: CancellationToken,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::default();
    loop {
        let is_draining = draining.is_cancelled();
        // Reserve the slots this poll asks for, so polls together never take more work
        // than `max_in_flight`; unused slots go back when the answer arrives.
        let mut reserved = None;
        if !is_draining {
            let mut want = shared.permits.available_permits().min(MAX_POLL_BATCH);
            while want > 0 {
                match shared.permits.clone().try_acquire_many_owned(want as u32) {
                    Ok(p) => {
                        reserved = Some(p);
                        break;
                    }
                    Err(_) => want = shared.permits.available_permits().min(want - 1),
                }
            }
        }
        let max = reserved.as_ref().map_or(0, |p| p.num_permits());
        let freed = shared.freed.notified();
        let r = tokio::select! {
            r = link.relay.poll(max, is_draining) => r,
            _ = stop.cancelled() => return Ok(()),
            _ = draining.cancelled(), if !is_draining => continue,
            _ = freed, if max == 0 && !is_draining => continue,
        };
        match r {
            Ok(Polled::Answer(answer)) => {
                backoff = Backoff::default();
                shared.stats.reachable();
                for head in answer.requests {
                    // The server never hands out more than `max`; a permit is missing
                    // only if it broke that promise, and the request is served anyway.
                    let permit = reserved.as_mut().and_then(|p| p.split(1));
                    dispatch(&shared, &link, head, permit, None);
                }
                let map = shared.in_flight.lock().expect("bug: poisoned");
                for id in answer.cancel {
                    if let Some(t) = map.get(id.as_str()) {
                        t.cancel();
                    }
                }
            }
            Ok(Polled::Empty) => {
                backoff = Backoff::default();
                shared.stats.reachable();
            }
            Err(e) => {
                fatal(&e)?;
                shared.stats.poll_failed();
                let first = backoff.is_fresh();
                let wait = backoff.next();
                if first {
                    // A single failure is routine (a proxy closed an idle pooled connection
                    // just as it was reused); a streak is worth a warning.
                    tracing::debug!(error = %e, retry_in = ?wait, "long poll failed");
                } else {
                    tracing::warn!(error = %e, retry_in = ?wait, "long poll failed again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        }
        if reserved.is_some_and(|p| p.num_permits() > 0) {
            // Slots went back: polls waiting at capacity may ask for work again.
            shared.freed.notify_waiters();
        }
    }
}

/// Above this many places, a table or queue of requests in flight that empties gives its
/// room back (after a burst); at or below it, the room is kept for the next requests.
pub(crate) const KEEP_ROOM: usize = 1024;

/// Serves one request in a task of its own; `reply` is the session it came from (whole
/// small responses go back on it), `None` for a polled request.
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    head: RequestHead,
    permit: Option<OwnedSemaphorePermit>,
    reply: Option<Arc<Reply>>,
) {
    let cancel = CancellationToken::new();
    // One copy of the id, shared by the table's key and the task (which forgets it).
    let id: Arc<str> = head.id.as_str().into();
    shared
        .in_flight
        .lock()
        .expect("bug: poisoned")
        .insert(id.clone(), cancel.clone());
    let task_shared = shared.clone();
    let ctx = link.ctx.clone();
    // Boxed: the request's future is several KiB, and a task moves its future (and its
    // stage) by copying it; a box moves as a pointer.
    shared
        .tracker
        .spawn(crate::exchange::boxed_in_place(|| async move {
            tracing::debug!(
                id = &*id,
                method = head.method,
                target = head.target,
                "request"
            );
            task_shared.stats.started();
            let outcome = serve(ctx, head, cancel, reply).await;
            task_shared.stats.finished(outcome);
            finished(&task_shared.in_flight, &id);
            drop(permit);
            task_shared.freed.notify_waiters();
        }));
}

/// Forgets a request that is over. The last request of a burst gives the table's room back
/// (a burst of 10 000 grew it to 16 384 places, half a MiB): not kept at the peak for good.
fn finished(in_flight: &InFlight, id: &str) {
    let mut map = in_flight.lock().expect("bug: poisoned");
    map.remove(id);
    if map.is_empty() && map.capacity() > KEEP_ROOM {
        *map = HashMap::default();
    }
}

/// Sends a response a lost session did not acknowledge through an exchange, in a task the
/// drain waits for.
pub(crate) fn resend(shared: &Arc<Shared>, link: &Arc<Link>, kept: Kept) {
    let ctx = link.ctx.clone();
    shared.tracker.spawn(async move {
        let id = kept.id.clone();
        if let Err(e) = crate::whole::post_kept(&ctx, kept).await {
            tracing::debug!(id, error = %e, "re-sending a response failed");
        }
    });
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;

//! Which replicas have a poll of a name's agent parked right now.
//!
//! An agent reached through a load balancer spreads its long polls over the replicas as its
//! pooled connections land, and a parked poll stays where it is until work reaches that
//! replica (up to the poll timeout, 25 s). So a replica that still holds the name (its lease
//! runs for a while after the agent's last poll there) may have no poll coming at all while
//! the agent's polls idle elsewhere: a request queued there would wait out its pickup
//! timeout and end in 503. Before a request without a local parked poll is forwarded, the
//! peers holding the name are asked (`GET /cluster/parked/<hex name>`, signed like every
//! call) and one with a parked poll is preferred; when none has one, the request stays with
//! a local agent if there is one.
//!
//! What is left: when every poll of the agent is in transit at that instant (each returned
//! with work and not yet parked again), the choice is blind, and a poll may then park
//! elsewhere and stay. The request waits for its pickup timeout in that case.

use std::time::Duration;

use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use relay_common::id::{hex, unhex};

use crate::base::body::{empty, text_response, RelayBody};
use crate::cluster::directory::{Cluster, ClusterError, Peer};
use crate::cluster::peer::sign;
use crate::State;

/// Path prefix of the question on the cluster listener; the name follows in hex (a name may
/// come from a header or a host and hold bytes a path cannot).
pub const PARKED_PATH: &str = "/cluster/parked/";

/// How long a peer may take to answer; one slower is taken as having no poll parked.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The answer to a peer's question: 204 when a non-draining agent of the name has a poll
/// (or session) parked here, 404 otherwise. An agent at capacity counts (its poll that
/// takes no work stays parked for cancel notices, and it polls for work as a slot frees).
pub fn answer(state: &State, hex_name: &str) -> Response<RelayBody> {
    let Some(name) = unhex(hex_name).and_then(|b| String::from_utf8(b).ok()) else {
        return text_response(StatusCode::BAD_REQUEST, "the name is not hex of UTF-8");
    };
    let parked = state
        .broker
        .live_backend(&name)
        .is_some_and(|b| b.has_parked_poll());
    // No body: the asker reads only the status, and an unread body would cost it a
    // RST_STREAM on the pooled HTTP/2 connection.
    let status = match parked {
        true => StatusCode::NO_CONTENT,
        false => StatusCode::NOT_FOUND,
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    resp
}

/// How old a cached list of the name's replicas may be before a request that found no
/// poll parked asks Redis again (a name is listed on a replica as its first agent
/// connects, and the list is cached for a second): often enough to find where an agent's
/// polls just went, rarely enough that Redis load does not follow the request rate.
const RECHECK_AFTER: Duration = Duration::from_millis(100);

/// Where a request for `name` that found no poll parked here goes: the replicas to try in
/// order, or `None` when it stays with the local agent (`has_local`) or nobody holds the
/// name.
pub async fn route(
    cluster: &Cluster,
    name: &str,
    has_local: bool,
) -> Result<Option<Vec<Peer>>, ClusterError> {
    let peers = cluster.replicas_for(name).await?;
    if !peers.is_empty() && !worth_asking(has_local, &peers) {
        return Ok(Some(peers));
    }
    let (peers, any) = parked_first(cluster, name, peers).await;
    if any {
        return Ok(Some(peers));
    }
    if cluster.forget_name_older_than(name, RECHECK_AFTER) {
        let new: Vec<Peer> = cluster
            .replicas_for(name)
            .await?
            .into_iter()
            .filter(|p| !peers.iter().any(|q| q.tag == p.tag))
            .collect();
        if !new.is_empty() {
            let (mut new, any) = parked_first(cluster, name, new).await;
            if any || !has_local {
                new.extend(peers);
                return Ok(Some(new));
            }
        }
    }
    Ok((!has_local && !peers.is_empty()).then_some(peers))
}

/// `peers` (holding `name`) with those that have a poll parked for it first, keeping their
/// order otherwise; and whether any has one. All are asked at once.
async fn parked_first(cluster: &Cluster, name: &str, peers: Vec<Peer>) -> (Vec<Peer>, bool) {
    let target = format!("{PARKED_PATH}{}", hex(name.as_bytes()));
    let asked = peers.iter().map(|p| ask(cluster, &p.url, &target));
    let parked = join_all(asked).await;
    let any = parked.iter().any(|p| *p);
    let (mut first, rest): (Vec<_>, Vec<_>) = peers
        .into_iter()
        .zip(parked)
        .partition(|(_, parked)| *parked);
    first.extend(rest);
    (first.into_iter().map(|(p, _)| p).collect(), any)
}

/// Whether the peer at `url` says it has a poll parked (any failure: no).
async fn ask(cluster: &Cluster, url: &str, target: &str) -> bool {
    let call = async {
        let mut send = cluster.peers.h2(url).await.ok()?;
        let mut req = Request::new(empty());
        *req.uri_mut() = format!("{url}{target}").parse().ok()?;
        sign(cluster, &mut req);
        send.ready().await.ok()?;
        let resp = send.send_request(req).await.ok()?;
        Some(resp.status() == StatusCode::NO_CONTENT)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, call).await,
        Ok(Some(true))
    )
}

/// Whether asking is worth a round trip: with no local agent and a single peer holding the
/// name there is no choice to make.
fn worth_asking(has_local: bool, peers: &[Peer]) -> bool {
    has_local || peers.len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_is_skipped_only_without_a_choice() {
        let peer = |tag| Peer {
            tag,
            url: String::new(),
        };
        assert!(!worth_asking(false, &[peer(1)]));
        assert!(worth_asking(true, &[peer(1)]));
        assert!(worth_asking(false, &[peer(1), peer(2)]));
    }
}

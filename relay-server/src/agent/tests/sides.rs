//! The upload and response sides as state machines: every transition, and what a lease
//! dropped without an ending leaves behind.

use std::sync::Arc;

use bytes::Bytes;
use relay_common::codec::BodyMsg;
use relay_common::message::{BodyKind, ResponseHead};

use super::request;
use crate::agent::error::AgentCallError;
use crate::agent::response_side::ResponseStart;
use crate::agent::upload_side::{lease, Phase, Refusal, UploadEnd, UploadFailure, UploadSide};
use crate::base::body::UserBody;
use crate::base::budget::Budget;

fn with_body() -> Arc<crate::agent::pending::Pending> {
    let (_tx, body) = UserBody::test();
    Arc::new(request("n", UploadSide::body(body)).0)
}

fn refusal(r: Result<impl Sized, Refusal>) -> (u16, String) {
    match r {
        Err(Refusal::Refused(e)) => (e.status().as_u16(), e.to_string()),
        Err(Refusal::Wait) => (0, "wait".into()),
        Ok(_) => (200, "leased".into()),
    }
}

#[test]
fn one_exchange_at_a_time_and_only_at_the_next_offset() {
    let p = with_body();
    assert_eq!(refusal(lease(&p, Some(5))).0, 409, "no byte delivered yet");
    assert_eq!(refusal(lease(&p, None)).0, 409, "the offset is required");
    let mut l = lease(&p, Some(0)).ok().expect("offset 0 is next");
    assert_eq!(p.upload.phase(), Phase::Open);
    assert_eq!(
        refusal(lease(&p, Some(0))),
        (409, "another upload exchange is in progress".into())
    );
    l.delivered(3);
    l.give_back();
    assert_eq!(p.upload.bytes(), 3);
    assert_eq!(refusal(lease(&p, Some(0))).0, 409, "offset 0 is behind");
    let l = lease(&p, Some(3))
        .ok()
        .expect("the next exchange goes on at 3");
    l.finish();
    assert_eq!(p.upload.phase(), Phase::Over(UploadEnd::Finished));
    assert_eq!(
        refusal(lease(&p, Some(3))),
        (410, "the request body was already delivered".into())
    );
}

#[test]
fn a_lease_dropped_without_an_ending_breaks_the_upload() {
    let p = with_body();
    let l = lease(&p, Some(0)).ok().expect("leased");
    drop(l);
    assert_eq!(p.upload.phase(), Phase::Over(UploadEnd::Broken));
    assert_eq!(
        refusal(lease(&p, Some(0))),
        (410, "the request body was lost in a cut exchange".into())
    );
}

#[test]
fn closing_the_request_wins_over_a_late_lease_ending() {
    for end in 0..3 {
        let p = with_body();
        let l = lease(&p, Some(0)).ok().expect("leased");
        p.upload.close();
        match end {
            0 => l.give_back(),
            1 => l.fail(UploadFailure::Malformed),
            _ => drop(l),
        }
        assert_eq!(
            p.upload.phase(),
            Phase::Over(UploadEnd::Finished),
            "ending {end}"
        );
    }
}

#[test]
fn no_body_and_upgrades_refuse_or_wait() {
    let p = Arc::new(request("n", UploadSide::none()).0);
    assert_eq!(
        refusal(lease(&p, Some(0))),
        (410, "the request has no body".into())
    );
    let p = Arc::new(request("n", UploadSide::awaiting_upgrade()).0);
    assert_eq!(refusal(lease(&p, Some(0))).1, "wait");
}

#[tokio::test]
async fn waiters_see_failures_and_the_end() {
    let p = with_body();
    let waiter = {
        let p = p.clone();
        tokio::spawn(async move { (p.upload.failed().await, p.upload.ended().await) })
    };
    let l = lease(&p, Some(0)).ok().expect("leased");
    l.fail(UploadFailure::TooLarge(10));
    let (failed, ended) = waiter.await.unwrap();
    assert_eq!(failed, UploadFailure::TooLarge(10));
    assert_eq!(ended, UploadEnd::Failed(UploadFailure::TooLarge(10)));
    // An upgrade that is closed before it switched releases whoever waits for the switch.
    let p = Arc::new(request("n", UploadSide::awaiting_upgrade()).0);
    let waiter = {
        let p = p.clone();
        tokio::spawn(async move { p.upload.wait_for(|ph| *ph != Phase::AwaitingUpgrade).await })
    };
    p.upload.close();
    assert_eq!(waiter.await.unwrap(), Phase::Over(UploadEnd::Finished));
}

fn head(body: BodyKind) -> ResponseHead {
    ResponseHead {
        status: 200,
        headers: Default::default(),
        body,
        content_length: None,
    }
}

#[tokio::test]
async fn a_response_streams_in_order_across_exchanges() {
    let (p, head_rx) = request("n", UploadSide::none());
    let budget = Budget::new(1 << 20);
    let account = budget.account("n", [127, 0, 0, 1].into());
    let mut l = p.response.lease().expect("free");
    assert!(p.response.lease().is_none(), "one exchange at a time");
    assert!(l.head(head(BodyKind::Stream)).unwrap());
    let Ok(ResponseStart::Head(h, Some(mut rx))) = head_rx.await else {
        panic!("a head with a body channel")
    };
    assert_eq!(h.status, 200);
    l.data(Bytes::from_static(b"ab"), account.hold(2).await)
        .await
        .unwrap();
    assert_eq!(budget.in_use(), 2, "bytes hold the budget while they wait");
    l.hand_over();
    let mut l = p.response.lease().expect("handed over");
    assert_eq!(l.offset(), 2);
    l.data(Bytes::from_static(b"c"), account.hold(1).await)
        .await
        .unwrap();
    l.end(BodyMsg::Trailers(Box::default())).await.unwrap();
    drop(l);
    assert!(p.response.agent_finished());
    let mut got = Vec::new();
    while let Some(d) = rx.recv().await {
        match d.msg {
            BodyMsg::Data(b) => got.extend_from_slice(&b),
            BodyMsg::Trailers(_) => got.push(b'|'),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, b"abc|");
    assert_eq!(budget.in_use(), 0, "taken bytes give their budget back");
}

#[tokio::test]
async fn a_cut_exchange_fails_the_user_response() {
    // Before the head: the user side sees its head sender go (502).
    let (p, head_rx) = request("n", UploadSide::none());
    drop(p.response.lease().expect("free"));
    assert!(head_rx.await.is_err());
    assert!(
        !p.response.agent_finished(),
        "the agent still needs a cancel notice"
    );
    // After the head: the body channel closes without an end (an aborted body).
    let (p, head_rx) = request("n", UploadSide::none());
    let mut l = p.response.lease().expect("free");
    l.head(head(BodyKind::Stream)).unwrap();
    drop(l);
    let Ok(ResponseStart::Head(_, Some(mut rx))) = head_rx.await else {
        panic!("a head with a body channel")
    };
    assert!(rx.recv().await.is_none());
}

#[tokio::test]
async fn protocol_errors_and_aborts() {
    let (p, head_rx) = request("n", UploadSide::none());
    let mut l = p.response.lease().expect("free");
    assert!(l
        .data(
            Bytes::from_static(b"x"),
            Budget::new(1)
                .account("n", [127, 0, 0, 1].into())
                .hold(1)
                .await
        )
        .await
        .is_err());
    l.protocol_error();
    assert!(
        p.response.agent_finished(),
        "the agent broke it: no cancel notice"
    );
    assert!(head_rx.await.is_err());
    let (p, head_rx) = request("n", UploadSide::none());
    let mut l = p.response.lease().expect("free");
    l.end(BodyMsg::Abort("backend down".into())).await.unwrap();
    match head_rx.await {
        Ok(ResponseStart::Abort(why)) => assert_eq!(why, "backend down"),
        _ => panic!("an abort before the head reaches the user handler"),
    }
    // A head without a body ends the response at once.
    let (p, _rx) = request("n", UploadSide::none());
    let mut l = p.response.lease().expect("free");
    assert!(!l.head(head(BodyKind::Empty)).unwrap());
    assert!(p.response.agent_finished());
    let e = AgentCallError::UserGone;
    assert_eq!(e.status().as_u16(), 410);
}

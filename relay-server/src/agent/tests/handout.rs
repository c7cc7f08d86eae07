//! Requests whose delivery to an agent failed go back to the head of their queue, once,
//! with their head; delivered ones never do; a user who left is not handed out again; the
//! user side follows whoever claims the request next.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::{broker, info, request};
use crate::agent::handout::PollAnswerBody;
use crate::agent::upload_side::UploadSide;

const HOLD: Duration = Duration::from_secs(30);

#[tokio::test(start_paused = true)]
async fn an_answer_dropped_before_its_end_puts_its_requests_back_first_in_line() {
    let b = broker(8, 8);
    let first = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let (p1, _rx1) = request("n", UploadSide::none());
    let (p2, _rx2) = request("n", UploadSide::none());
    let (id1, id2) = (p1.id.to_string(), p2.id.to_string());
    let (g1, claimed) = b.enqueue(&backend, p1).unwrap();
    let stop = CancellationToken::new();
    let batch = first.next(1, HOLD, &stop).await;
    assert!(claimed.await.is_ok(), "the user side learns of the claim");
    let (_g2, _) = b.enqueue(&backend, p2).unwrap();
    let mut handout = first.handout();
    for (p, h) in batch.claimed.into_iter().zip(batch.requests) {
        handout.push(0, p, h);
    }
    let body = PollAnswerBody::new("answer".into(), handout);
    drop(body);
    assert_eq!(b.parked(), 2, "it waits for pickup again");

    // Another agent gets it first, with its head; the user side now follows that agent.
    let second = b.begin_poll("n", "a2", None, false, info);
    let batch = second.next(8, HOLD, &stop).await;
    let got: Vec<_> = batch.requests.iter().map(|h| h.id.clone()).collect();
    assert_eq!(got, [id1, id2]);
    let pending = g1.pending().clone();
    assert_eq!(pending.claimed_by().unwrap().id, "a2");
    let watch = tokio::spawn(async move { pending.claimer_gone().await });
    tokio::task::yield_now().await;
    first.agent().gone.cancel();
    tokio::task::yield_now().await;
    assert!(!watch.is_finished(), "the first agent no longer holds it");
    second.agent().gone.cancel();
    watch.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_answer_read_to_its_end_is_delivered_and_a_user_who_left_is_not_put_back() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let stop = CancellationToken::new();
    let (p, _rx) = request("n", UploadSide::none());
    let (_g, _) = b.enqueue(&backend, p).unwrap();
    let batch = poll.next(1, HOLD, &stop).await;
    let mut handout = poll.handout();
    for (p, h) in batch.claimed.into_iter().zip(batch.requests) {
        handout.push(0, p, h);
    }
    let body = PollAnswerBody::new("answer".into(), handout);
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"answer");
    assert_eq!(b.parked(), 0, "delivered: not queued again");

    let (p, _rx) = request("n", UploadSide::none());
    let (g, _) = b.enqueue(&backend, p).unwrap();
    let batch = poll.next(1, HOLD, &stop).await;
    let mut handout = poll.handout();
    for (p, h) in batch.claimed.into_iter().zip(batch.requests) {
        handout.push(7, p, h);
    }
    drop(g);
    handout.put_back_after(0);
    assert_eq!(b.parked(), 0, "its user left: nothing to hand out");
    let batch = poll.next(1, Duration::from_secs(1), &stop).await;
    assert!(batch.requests.is_empty());
}

#[tokio::test(start_paused = true)]
async fn marks_tell_delivered_opens_from_ones_never_written() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let stop = CancellationToken::new();
    let mut guards = Vec::new();
    for _ in 0..3 {
        guards.push(
            b.enqueue(&backend, request("n", UploadSide::none()).0)
                .unwrap(),
        );
    }
    let batch = poll.next(3, HOLD, &stop).await;
    let ids: Vec<_> = batch.requests.iter().map(|h| h.id.clone()).collect();
    let mut handout = poll.handout();
    for ((p, h), mark) in batch
        .claimed
        .into_iter()
        .zip(batch.requests)
        .zip([10, 20, 30])
    {
        handout.push(mark, p, h);
    }
    handout.delivered(20);
    assert_eq!(handout.len(), 1);
    drop(handout);
    let batch = poll.next(3, HOLD, &stop).await;
    let again: Vec<_> = batch.requests.iter().map(|h| h.id.clone()).collect();
    assert_eq!(again, ids[2..], "only the one past the writer's mark");
}

#[tokio::test(start_paused = true)]
async fn a_put_back_request_whose_name_lost_its_agents_fails_its_user() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let (g, _) = b
        .enqueue(&backend, request("n", UploadSide::none()).0)
        .unwrap();
    let batch = poll.next(1, HOLD, &CancellationToken::new()).await;
    let mut handout = poll.handout();
    for (p, h) in batch.claimed.into_iter().zip(batch.requests) {
        handout.push(1, p, h);
    }
    drop(handout);
    let pending = g.pending().clone();
    let watch = tokio::spawn(async move { pending.claimer_gone().await });
    drop(poll);
    b.reap();
    watch.await.unwrap();
    assert_eq!(b.parked(), 0);
}

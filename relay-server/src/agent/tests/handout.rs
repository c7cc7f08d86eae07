//! Requests whose delivery to an agent failed go back to the head of their queue, once,
//! with their head; delivered ones never do; a user who left is not handed out again; the
//! user side follows whoever claims the request next.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::{broker, info, request};
use crate::agent::broker::{Broker, NameQueue, PollBatch};
use crate::agent::handout::{Handout, PollAnswerBody};
use crate::agent::pending::PendingGuard;
use crate::agent::poll::PollHandle;
use crate::agent::upload_side::UploadSide;

const HOLD: Duration = Duration::from_secs(30);

/// The handout of `batch`'s requests, each marked `mark`.
fn handout_of(poll: &PollHandle, batch: PollBatch, mark: u64) -> Handout {
    let mut handout = poll.handout();
    for (p, h) in batch.claimed.into_iter().zip(batch.requests) {
        handout.push(mark, p, h);
    }
    handout
}

/// Queues `n` requests for name "n"; their guards.
fn queue(
    b: &std::sync::Arc<Broker>,
    backend: &std::sync::Arc<NameQueue>,
    n: usize,
) -> Vec<PendingGuard> {
    (0..n)
        .map(|_| {
            b.enqueue(backend, request("n", UploadSide::none()).0, None)
                .unwrap()
        })
        .collect()
}

fn ids(batch: &PollBatch) -> Vec<String> {
    batch.requests.iter().map(|h| h.id.clone()).collect()
}

#[tokio::test(start_paused = true)]
async fn an_answer_dropped_before_its_end_puts_its_requests_back_first_in_line() {
    let b = broker(8, 8);
    let first = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let (p1, _rx1) = request("n", UploadSide::none());
    let (p2, _rx2) = request("n", UploadSide::none());
    let (id1, id2) = (p1.id.to_string(), p2.id.to_string());
    let g1 = b.enqueue(&backend, p1, None).unwrap();
    let stop = CancellationToken::new();
    let batch = first.next(1, HOLD, &stop).await;
    assert!(g1.pending().claimed_by().is_some(), "a1 claimed it");
    let _g2 = b.enqueue(&backend, p2, None).unwrap();
    let handout = handout_of(&first, batch, 0);
    let body = PollAnswerBody::new("answer".into(), handout);
    drop(body);
    assert_eq!(b.parked(), 2, "it waits for pickup again");

    // Another agent gets it first, with its head; the user side now follows that agent.
    let second = b.begin_poll("n", "a2", None, false, info);
    let batch = second.next(8, HOLD, &stop).await;
    let got = ids(&batch);
    assert_eq!(got, [id1, id2]);
    let pending = g1.pending().clone();
    assert_eq!(pending.claimed_by().unwrap().id, "a2");
    let watch = tokio::spawn(async move { pending.claimer_lost().await });
    tokio::task::yield_now().await;
    let a1 = first.agent().clone();
    drop(first);
    b.reap();
    assert!(a1.gone.is_cancelled());
    tokio::task::yield_now().await;
    assert!(!watch.is_finished(), "the first agent no longer holds it");
    drop(second);
    b.reap();
    watch.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_answer_read_to_its_end_is_delivered_and_a_user_who_left_is_not_put_back() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let stop = CancellationToken::new();
    let (p, _rx) = request("n", UploadSide::none());
    let _g = b.enqueue(&backend, p, None).unwrap();
    let batch = poll.next(1, HOLD, &stop).await;
    let handout = handout_of(&poll, batch, 0);
    let body = PollAnswerBody::new("answer".into(), handout);
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"answer");
    assert_eq!(b.parked(), 0, "delivered: not queued again");

    let (p, _rx) = request("n", UploadSide::none());
    let g = b.enqueue(&backend, p, None).unwrap();
    let batch = poll.next(1, HOLD, &stop).await;
    let mut handout = handout_of(&poll, batch, 7);
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
    let _guards = queue(&b, &backend, 3);
    let batch = poll.next(3, HOLD, &stop).await;
    let first_ids = ids(&batch);
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
    let again = ids(&batch);
    assert_eq!(again, first_ids[2..], "only the one past the writer's mark");
}

#[tokio::test(start_paused = true)]
async fn a_put_back_request_whose_name_lost_its_agents_fails_its_user() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let g = b
        .enqueue(&backend, request("n", UploadSide::none()).0, None)
        .unwrap();
    let batch = poll.next(1, HOLD, &CancellationToken::new()).await;
    let handout = handout_of(&poll, batch, 1);
    drop(handout);
    let pending = g.pending().clone();
    let watch = tokio::spawn(async move { pending.claimer_lost().await });
    drop(poll);
    b.reap();
    watch.await.unwrap();
    assert_eq!(b.parked(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_parked_session_puts_back_only_what_the_agent_says_it_never_received() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let stop = CancellationToken::new();
    let _guards = queue(&b, &backend, 3);
    let batch = poll.next(3, HOLD, &stop).await;
    let first_ids = ids(&batch);
    let mut handout = handout_of(&poll, batch, 0);
    // Parked at the session's end; the agent's next session says it received one OPEN,
    // before (resume first) or after the old session was parked: the same.
    let agent = poll.agent().clone();
    agent.resume_session(0, 7, 1);
    agent.park_session(0, 7, handout.park());
    let batch = poll.next(3, HOLD, &stop).await;
    let again = ids(&batch);
    assert_eq!(again, first_ids[1..]);

    // Without a matching resume nothing goes back (the agent may have them).
    let mut handout = handout_of(&poll, batch, 0);
    agent.park_session(0, 8, handout.park());
    agent.resume_session(0, 9, 0);
    let batch = poll.next(3, Duration::from_secs(1), &stop).await;
    assert!(batch.requests.is_empty());
}

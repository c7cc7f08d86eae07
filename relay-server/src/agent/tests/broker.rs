//! The broker: queues bounded per name and in total, polls that claim what is queued,
//! cancel notices, and agents that go.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{broker, info, request, request_by};
use crate::agent::pending::Pickup;
use crate::agent::upload_side::UploadSide;

const HOLD: Duration = Duration::from_secs(30);

#[tokio::test(start_paused = true)]
async fn a_poll_claims_queued_requests_up_to_its_max() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").expect("a poll makes the name live");
    let mut claims = Vec::new();
    let mut ids = Vec::new();
    let mut guards = Vec::new();
    for _ in 0..3 {
        let (p, _rx) = request("n", UploadSide::none());
        ids.push(p.id.to_string());
        let (tx, claimed) = tokio::sync::oneshot::channel();
        let g = b.enqueue(&backend, p, Some(tx)).expect("room");
        guards.push(g);
        claims.push(claimed);
    }
    assert_eq!((b.parked(), b.in_flight()), (3, 3));
    let stop = CancellationToken::new();
    let batch = poll.next(2, HOLD, &stop).await;
    let got: Vec<_> = batch.requests.iter().map(|h| h.id.clone()).collect();
    assert_eq!(got, ids[..2], "oldest first, no more than asked for");
    assert_eq!(b.parked(), 1);
    claims
        .remove(0)
        .await
        .expect("a traced user side learns of the claim");
    let agent = guards[0].pending().claimed_by().expect("claimed");
    assert_eq!(agent.id, "a1");
    assert_eq!(guards[0].pending().pickup(), Pickup::Taken);
    assert_eq!(guards[2].pending().pickup(), Pickup::Waiting);
    let batch = poll.next(8, HOLD, &stop).await;
    assert_eq!(batch.requests.len(), 1);
    assert_eq!(b.parked(), 0);
    // With nothing queued the poll waits out its hold and answers empty.
    let started = tokio::time::Instant::now();
    let batch = poll.next(8, HOLD, &stop).await;
    assert!(batch.requests.is_empty() && batch.cancel.is_empty());
    assert_eq!(started.elapsed(), HOLD);
    drop(guards);
    assert_eq!(
        b.in_flight(),
        0,
        "a request leaves the table with its guard"
    );
}

#[tokio::test(start_paused = true)]
async fn queues_are_bounded_and_a_dropped_request_frees_its_slot() {
    let b = broker(2, 3);
    let _p1 = b.begin_poll("a", "x", None, false, info);
    let _p2 = b.begin_poll("b", "y", None, false, info);
    let (ba, bb) = (b.live_backend("a").unwrap(), b.live_backend("b").unwrap());
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            b.enqueue(&ba, request("a", UploadSide::none()).0, None)
                .expect("room for a"),
        );
    }
    let full = b
        .enqueue(&ba, request("a", UploadSide::none()).0, None)
        .err()
        .expect("a is full");
    assert_eq!(full.0, "a");
    held.push(
        b.enqueue(&bb, request("b", UploadSide::none()).0, None)
            .expect("room for b"),
    );
    assert!(
        b.enqueue(&bb, request("b", UploadSide::none()).0, None)
            .is_err(),
        "3 in all"
    );
    assert_eq!(b.parked(), 3);
    held.remove(0);
    assert_eq!(b.parked(), 2, "an abandoned request leaves the queue");
    assert!(b
        .enqueue(&bb, request("b", UploadSide::none()).0, None)
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_claimed_request_dropped_by_its_user_is_cancelled_at_the_agent() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let (p, _rx) = request("n", UploadSide::none());
    let id = p.id;
    let guard = b.enqueue(&backend, p, None).unwrap();
    let stop = CancellationToken::new();
    assert_eq!(poll.next(1, HOLD, &stop).await.requests.len(), 1);
    drop(guard);
    // A poll at capacity (max 0) still carries cancel notices.
    let batch = poll.next(0, HOLD, &stop).await;
    assert_eq!(batch.cancel, vec![id]);
    assert!(b.lookup(&id.to_string(), |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn lookups_are_bound_to_the_names_a_caller_may_serve() {
    let b = broker(8, 8);
    let _poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let (p, _rx) = request("n", UploadSide::none());
    let id = p.id.to_string();
    let _guard = b.enqueue(&backend, p, None).unwrap();
    assert!(b.lookup(&id, |name| name == "n").is_some());
    assert!(b.lookup(&id, |name| name == "other").is_none());
    assert!(b.lookup("not-an-id", |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn an_agent_without_polls_is_gone_after_its_grace() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let agent = poll.agent().clone();
    b.reap();
    assert!(b.is_connected("n"), "a parked poll keeps the agent");
    drop(poll);
    b.reap();
    assert!(agent.gone.is_cancelled(), "its requests fail at once");
    assert!(
        !b.is_connected("n"),
        "the name is forgotten with its last agent"
    );
    assert!(b.live_backend("n").is_none());
}

#[tokio::test(start_paused = true)]
async fn stop_ends_a_parked_poll() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let stop = CancellationToken::new();
    stop.cancel();
    let batch = poll.next(4, HOLD, &stop).await;
    assert!(batch.requests.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_revoked_agent_is_gone_and_its_parked_poll_ends_without_work() {
    let b = broker(8, 8);
    let (old, kept) = ([1u8; 32], [2u8; 32]);
    let poll = b.begin_poll("n", "a1", Some(&old), false, info);
    let _other = b.begin_poll("n", "a2", Some(&kept), false, info);
    let agent = poll.agent().clone();
    let waiting = tokio::spawn(async move {
        let batch = poll.next(4, HOLD, &CancellationToken::new()).await;
        (batch.requests.len(), tokio::time::Instant::now())
    });
    tokio::task::yield_now().await;
    let before = tokio::time::Instant::now();
    assert_eq!(b.revoke(|t, _| *t != old), 1);
    let (taken, at) = waiting.await.unwrap();
    assert_eq!(taken, 0);
    assert_eq!(
        at, before,
        "the parked poll ends at once, not at its deadline"
    );
    assert!(
        agent.gone.is_cancelled(),
        "its claimed requests fail at once"
    );
    // The agent with a kept token still serves the name; a request queued now is not
    // claimable by the revoked one.
    let backend = b.live_backend("n").expect("a2 still serves");
    let (p, _rx) = request("n", UploadSide::none());
    let _guard = b.enqueue(&backend, p, None).unwrap();
    let mut out = Vec::new();
    backend.take(&agent, 4, &mut out);
    assert!(out.is_empty());
    // The last agent revoked: the name is gone, new requests are refused at once.
    assert_eq!(b.revoke(|_, _| false), 1);
    assert!(b.live_backend("n").is_none() && !b.is_connected("n"));
}

#[tokio::test(start_paused = true)]
async fn an_agent_declared_gone_fails_the_requests_it_holds_and_no_others() {
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let _other = b.begin_poll("n", "a2", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let held = b
        .enqueue(&backend, request("n", UploadSide::none()).0, None)
        .unwrap();
    let batch = poll.next(1, HOLD, &CancellationToken::new()).await;
    assert_eq!(batch.requests.len(), 1);
    let waiting = b
        .enqueue(&backend, request("n", UploadSide::none()).0, None)
        .unwrap();
    let lost = {
        let p = held.pending().clone();
        tokio::spawn(async move { p.claimer_lost().await })
    };
    let (first, second) = (held.pending().clone(), waiting.pending().clone());
    let untouched = tokio::spawn(async move { second.claimer_lost().await });
    tokio::task::yield_now().await;
    drop(poll);
    b.reap();
    tokio::time::timeout(Duration::from_secs(1), lost)
        .await
        .expect("the request a1 held fails at once")
        .unwrap();
    assert_eq!(first.pickup(), Pickup::Taken);
    tokio::task::yield_now().await;
    assert!(
        !untouched.is_finished(),
        "a request no agent took waits for a2"
    );
    // A claim by an agent already declared gone fails at once too (it raced the sweep).
    let gone = first.claimed_by().unwrap();
    let mut out = Vec::new();
    let late = request("n", UploadSide::none()).0;
    late.set_queued(std::sync::Arc::new(Default::default()), None);
    assert!(late.claim(&gone));
    tokio::time::timeout(Duration::from_secs(1), late.claimer_lost())
        .await
        .expect("a claim by a gone agent is lost at once");
    backend.take(&gone, 4, &mut out);
    assert!(out.is_empty(), "a gone agent takes nothing");
    untouched.abort();
}

/// The stop reaches every request in flight through the broker: each user side is
/// interrupted once (a side that has seen the stop waits on), and a lost claimer still
/// interrupts a side that has.
#[tokio::test]
async fn the_stop_interrupts_every_request_in_flight_once() {
    use crate::agent::pending::Interrupt;
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let taken = b
        .enqueue(&backend, request("n", UploadSide::none()).0, None)
        .unwrap();
    assert_eq!(
        poll.next(1, HOLD, &CancellationToken::new())
            .await
            .requests
            .len(),
        1
    );
    let queued = b
        .enqueue(&backend, request("n", UploadSide::none()).0, None)
        .unwrap();
    let waits: Vec<_> = [&taken, &queued]
        .into_iter()
        .map(|g| {
            let p = g.pending().clone();
            tokio::spawn(async move { p.interrupted(false, false).await })
        })
        .collect();
    tokio::task::yield_now().await;
    assert!(
        waits.iter().all(|w| !w.is_finished()),
        "nothing stopped yet"
    );
    b.stop_all();
    for w in waits {
        let why = tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .expect("the stop reached the request")
            .unwrap();
        assert_eq!(why, Interrupt::Stopped);
    }
    assert_eq!(queued.pending().pickup(), Pickup::Waiting);
    assert_eq!(taken.pending().pickup(), Pickup::Taken);
    // Seen once, the stop interrupts no more; the agent's loss still does.
    let p = taken.pending().clone();
    let after = tokio::spawn(async move { p.interrupted(true, false).await });
    tokio::task::yield_now().await;
    assert!(!after.is_finished(), "a seen stop does not interrupt again");
    drop(poll);
    b.reap();
    let why = tokio::time::timeout(Duration::from_secs(1), after)
        .await
        .expect("the lost agent interrupts")
        .unwrap();
    assert_eq!(why, Interrupt::ClaimerLost);
}

/// The deadlines of the waits for an agent, as the broker's sweep sees them: a request no
/// agent took is interrupted once its pickup deadline passed, one taken only once its
/// response deadline passed; the user side takes each mark, and a mark nobody took wakes
/// nobody again.
#[tokio::test]
async fn the_sweep_interrupts_a_request_past_the_deadline_of_its_state() {
    use crate::agent::pending::{Deadlines, Interrupt};
    let b = broker(8, 8);
    let poll = b.begin_poll("n", "a1", None, false, info);
    let backend = b.live_backend("n").unwrap();
    let t0 = std::time::Instant::now();
    let deadlines = Deadlines {
        pickup: t0 + Duration::from_secs(10),
        response: t0 + Duration::from_secs(60),
    };
    let enqueue = || {
        let r = request_by("n", UploadSide::none(), deadlines).0;
        b.enqueue(&backend, r, None).unwrap()
    };
    let taken_guard = enqueue();
    poll.next(1, HOLD, &CancellationToken::new()).await;
    let queued_guard = enqueue();
    let (taken, queued) = (taken_guard.pending(), queued_guard.pending());
    assert_eq!(taken.pickup(), Pickup::Taken);
    assert_eq!(queued.pickup(), Pickup::Waiting);
    let wait = |p: &std::sync::Arc<crate::agent::pending::Pending>| {
        let p = p.clone();
        tokio::spawn(async move { p.interrupted(false, true).await })
    };
    let woken = |w: tokio::task::JoinHandle<Interrupt>| async move {
        tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .expect("the sweep's mark wakes the wait")
            .unwrap()
    };
    let (w_taken, w_queued) = (wait(taken), wait(queued));
    tokio::task::yield_now().await;

    // Before any deadline, and between them for the taken request: nobody is woken.
    for p in [taken, queued] {
        p.check_overdue(t0 + Duration::from_secs(9));
    }
    taken.check_overdue(t0 + Duration::from_secs(30));
    tokio::task::yield_now().await;
    assert!(!w_taken.is_finished() && !w_queued.is_finished());

    // Past the pickup deadline: the request no agent took.
    queued.check_overdue(t0 + Duration::from_secs(10));
    assert_eq!(woken(w_queued).await, Interrupt::Overdue);
    assert!(!w_taken.is_finished());

    // Past the response deadline: the taken one, once. A mark nobody took (a request whose
    // head came, say) stays, and later sweeps wake nobody.
    taken.check_overdue(t0 + Duration::from_secs(60));
    assert_eq!(woken(w_taken).await, Interrupt::Overdue);
    queued.check_overdue(t0 + Duration::from_secs(61));
    let again = wait(queued);
    tokio::task::yield_now().await;
    queued.check_overdue(t0 + Duration::from_secs(62));
    assert_eq!(
        woken(again).await,
        Interrupt::Overdue,
        "the mark left stays"
    );
    // Taken, the mark is gone: a wait that does not watch deadlines never sees one.
    let p = queued.clone();
    let blind = tokio::spawn(async move { p.interrupted(false, false).await });
    queued.check_overdue(t0 + Duration::from_secs(63));
    tokio::task::yield_now().await;
    assert!(
        !blind.is_finished(),
        "claimer_lost and the like ignore deadlines"
    );
    blind.abort();
}

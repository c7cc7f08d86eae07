//! The upload framing of one `/server/requeststream` exchange, decoded with the agent's own
//! decoder ([`FrameReader`]); timings on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_common::codec::{BodyMsg, FrameReader, Message};
use tokio::sync::mpsc;

use super::request;
use crate::agent::pending::Pending;
use crate::agent::upload::{UploadExchange, UploadLimits};
use crate::agent::upload_side::{lease, Phase, UploadEnd, UploadFailure, UploadSide};
use crate::base::body::UserBody;

const IDLE: Duration = Duration::from_secs(5);

fn limits(max_body: Option<u64>) -> UploadLimits {
    UploadLimits {
        max_body,
        inactivity: Duration::from_secs(60),
    }
}

fn upload() -> (mpsc::Sender<Bytes>, Arc<Pending>) {
    let (tx, body) = UserBody::test();
    (tx, Arc::new(request("n", UploadSide::body(body)).0))
}

fn exchange(p: &Arc<Pending>, offset: u64, max: u64, lim: UploadLimits) -> UploadExchange {
    let l = lease(p, Some(offset)).ok().expect("the upload is ready");
    UploadExchange::new(l, max, IDLE, lim)
}

/// The body bytes of one exchange and how it ended.
async fn read(x: UploadExchange) -> (Vec<u8>, Message) {
    let mut r = FrameReader::new(x);
    let mut data = Vec::new();
    loop {
        match r
            .next()
            .await
            .expect("the exchange ends with a final frame")
        {
            Message::Body(BodyMsg::Data(d)) => data.extend_from_slice(&d),
            last => return (data, last),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn chunks_stream_as_frames_and_end_with_end() {
    let (tx, p) = upload();
    for c in [&b"hello "[..], b"", b"world"] {
        tx.send(Bytes::from_static(c)).await.unwrap();
    }
    drop(tx);
    let (data, last) = read(exchange(&p, 0, u64::MAX, limits(None))).await;
    assert_eq!(data, b"hello world");
    assert!(matches!(last, Message::Body(BodyMsg::End)));
    assert_eq!(p.upload.phase(), Phase::Over(UploadEnd::Finished));
    assert_eq!(p.upload.bytes(), 11);
}

#[tokio::test(start_paused = true)]
async fn max_bytes_and_idle_end_the_exchange_with_continue() {
    let (tx, p) = upload();
    tx.send(Bytes::from_static(b"0123")).await.unwrap();
    tx.send(Bytes::from_static(b"4567")).await.unwrap();
    // After `max` bytes (whole chunks: a chunk is never split).
    let (data, last) = read(exchange(&p, 0, 3, limits(None))).await;
    assert_eq!(
        (data.as_slice(), matches!(last, Message::Continue)),
        (&b"0123"[..], true)
    );
    // Nothing more for `IDLE`: CONTINUE, and the next exchange goes on where this one ended.
    let started = tokio::time::Instant::now();
    let (data, last) = read(exchange(&p, 4, u64::MAX, limits(None))).await;
    assert_eq!(data, b"4567");
    assert!(matches!(last, Message::Continue));
    assert_eq!(started.elapsed(), IDLE);
    tx.send(Bytes::from_static(b"89")).await.unwrap();
    drop(tx);
    let (data, last) = read(exchange(&p, 8, u64::MAX, limits(None))).await;
    assert_eq!(data, b"89");
    assert!(matches!(last, Message::Body(BodyMsg::End)));
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_refused_before_its_bytes_leave() {
    let (tx, p) = upload();
    tx.send(Bytes::from_static(b"12345")).await.unwrap();
    tx.send(Bytes::from_static(b"678")).await.unwrap();
    let (data, last) = read(exchange(&p, 0, u64::MAX, limits(Some(6)))).await;
    assert_eq!(data, b"12345");
    assert!(matches!(last, Message::Body(BodyMsg::Abort(_))));
    assert_eq!(p.upload.failed().await, UploadFailure::TooLarge(6));
}

#[tokio::test(start_paused = true)]
async fn a_silent_body_stalls_across_exchanges() {
    let (tx, p) = upload();
    let lim = UploadLimits {
        max_body: None,
        inactivity: Duration::from_secs(12),
    };
    let started = tokio::time::Instant::now();
    // Two idle exchanges (5 s each) pass; the third hits the 12 s inactivity limit at 12 s,
    // counted from the request's arrival, not from the exchange's start.
    let (_, last) = read(exchange(&p, 0, u64::MAX, lim)).await;
    assert!(matches!(last, Message::Continue));
    let (_, last) = read(exchange(&p, 0, u64::MAX, lim)).await;
    assert!(matches!(last, Message::Continue));
    let (_, last) = read(exchange(&p, 0, u64::MAX, lim)).await;
    assert!(matches!(last, Message::Body(BodyMsg::Abort(_))));
    assert_eq!(started.elapsed(), Duration::from_secs(12));
    assert_eq!(
        p.upload.failed().await,
        UploadFailure::Stalled(Duration::from_secs(12))
    );
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn the_user_leaving_aborts_and_a_dropped_exchange_breaks() {
    let (_tx, p) = upload();
    let x = exchange(&p, 0, u64::MAX, limits(None));
    p.done.cancel();
    let (_, last) = read(x).await;
    assert!(matches!(last, Message::Body(BodyMsg::Abort(why)) if why == "the user went away"));
    assert_eq!(p.upload.phase(), Phase::Over(UploadEnd::Broken));
    // The agent's connection drops mid-exchange: the lease goes with the body.
    let (tx, p) = upload();
    tx.send(Bytes::from_static(b"ab")).await.unwrap();
    let mut r = FrameReader::new(exchange(&p, 0, u64::MAX, limits(None)));
    assert!(matches!(
        r.next().await,
        Ok(Message::Body(BodyMsg::Data(_)))
    ));
    drop(r);
    assert_eq!(p.upload.phase(), Phase::Over(UploadEnd::Broken));
}

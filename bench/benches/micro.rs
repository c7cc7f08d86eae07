//! Micro-benchmarks of the hot pure functions: the wire codec (frames, heads, header lists)
//! and the user-side router. `cargo bench -p relay-bench --bench micro`; the test command
//! runs each once with `-- --test` so they cannot rot.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use relay_common::frame::{self, Decoder, Item, Kind};
use relay_common::message::{self, BodyKind, ResponseHead};
use relay_server::user::router;

/// A response body of `frames` DATA frames of `size` bytes, framed as the agent sends it.
fn framed_body(frames: usize, size: usize) -> Bytes {
    let payload = vec![b'x'; size];
    let mut out = BytesMut::new();
    for _ in 0..frames {
        out.extend_from_slice(&frame::header(Kind::Data, size));
        out.extend_from_slice(&payload);
    }
    out.extend_from_slice(&frame::control(Kind::End, b""));
    out.freeze()
}

/// Decodes `input` as it would arrive in reads of `chunk` bytes; returns the body bytes.
fn decode_all(input: &Bytes, chunk: usize) -> usize {
    let mut d = Decoder::default();
    let mut body = 0;
    let mut rest = input.clone();
    while !rest.is_empty() {
        let mut piece = rest.split_to(chunk.min(rest.len()));
        while let Some(item) = d.decode(&mut piece).expect("valid frames") {
            if let Item::Data(b) = item {
                body += b.len();
            }
        }
    }
    body
}

fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json; charset=utf-8"),
        ("cache-control", "no-store"),
        ("date", "Sun, 22 Nov 2026 11:00:00 GMT"),
        ("server", "backend/1.0"),
        ("x-request-id", "6f1c2a9e-8d7b-4c1e-9a55-2b0f3e4d5c6a"),
        ("set-cookie", "a=1; Path=/"),
        ("set-cookie", "b=2; Path=/"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frames");
    let body = framed_body(64, 16 * 1024);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("decode 1 MiB of 16 KiB DATA frames, 64 KiB reads", |b| {
        b.iter(|| decode_all(black_box(&body), 64 * 1024))
    });
    g.bench_function("decode 1 MiB of 16 KiB DATA frames, 1 KiB reads", |b| {
        b.iter(|| decode_all(black_box(&body), 1024))
    });
    g.finish();
    c.bench_function("frame header encode", |b| {
        b.iter(|| frame::header(Kind::Data, black_box(16 * 1024)))
    });
    let headers = typical_headers();
    c.bench_function("response head encode (JSON + HEAD frame)", |b| {
        b.iter(|| {
            let head = ResponseHead {
                status: 200,
                headers: message::encode_headers(black_box(&headers)).into(),
                body: BodyKind::Stream,
                content_length: Some(1234),
            };
            frame::control(
                Kind::Head,
                &serde_json::to_vec(&head).expect("serialisable"),
            )
        })
    });
    let head = serde_json::to_vec(&ResponseHead {
        status: 200,
        headers: message::encode_headers(&headers).into(),
        body: BodyKind::Stream,
        content_length: Some(1234),
    })
    .expect("serialisable");
    c.bench_function("response head decode (JSON → HeaderMap)", |b| {
        b.iter(|| {
            let mut h: ResponseHead = serde_json::from_slice(black_box(&head)).expect("valid");
            h.headers.take_map().expect("valid headers")
        })
    });
}

fn routing(c: &mut Criterion) {
    c.bench_function("route /client/<name>/path?query", |b| {
        b.iter(|| {
            router::route(
                black_box("/client/robot-17/api/v1/items/42"),
                black_box(Some("page=2&sort=name")),
                None,
                None,
            )
            .expect("routable")
        })
    });
    c.bench_function("route X-Server-Name (gRPC)", |b| {
        b.iter(|| {
            router::route(
                black_box("/helloworld.Greeter/SayHello"),
                None,
                Some(black_box(b"robot-17".as_slice())),
                None,
            )
            .expect("routable")
        })
    });
    c.bench_function("host_backend <name>.<domain>", |b| {
        b.iter(|| {
            router::host_backend(
                black_box("robot-17.relay.example.com:443"),
                "relay.example.com",
            )
        })
    });
}

criterion_group!(benches, codec, routing);
criterion_main!(benches);

//! Session frames: both head encodings, the layout, malformed messages, the subprotocol choice.

use super::*;
use crate::message::BodyKind;

fn head(id: &str) -> RequestHead {
    RequestHead {
        id: id.into(),
        method: "GET".into(),
        target: "/a?b=%2F".into(),
        headers: vec![("x-a".into(), "caf\u{e9}".into())].into(),
        body: BodyKind::Empty,
        content_length: None,
        upgrade: None,
    }
}

#[test]
fn frames_round_trip_in_one_message_with_either_head_encoding() {
    for heads in [Heads::Json, Heads::Binary] {
        round_trip(heads);
    }
}

fn round_trip(heads: Heads) {
    let mut b = BytesMut::new();
    put_open(&mut b, heads, &head("00ff"));
    put_cancel(&mut b, "00fe");
    put_credit(&mut b, 7);
    put_ping(&mut b, *b"12345678", false);
    put_ping(&mut b, *b"abcdefgh", true);
    let rh = ResponseHead {
        status: 201,
        headers: vec![("content-type".into(), "text/plain".into())].into(),
        body: BodyKind::Stream,
        content_length: Some(5),
    };
    let t = Trailers {
        headers: vec![("grpc-status".into(), "0".into())],
    };
    put_response(&mut b, heads, "00fd", &rh, b"hello", Some(&t));
    put_response(&mut b, heads, "00fc", &rh, b"", None);
    put_goaway(&mut b, "draining");
    put_ack(&mut b, 1 << 40);
    let frames = decode(b.freeze(), heads).unwrap();
    assert_eq!(frames.len(), 9);
    assert!(
        matches!(&frames[0], Frame::Open(h) if h.id == "00ff" && h.target == "/a?b=%2F"
        && h.headers.to_map().unwrap()["x-a"].as_bytes() == b"caf\xe9")
    );
    assert!(matches!(&frames[1], Frame::Cancel(id) if id == "00fe"));
    assert!(matches!(frames[2], Frame::Credit(7)));
    assert!(matches!(frames[3], Frame::Ping(d) if &d == b"12345678"));
    assert!(matches!(frames[4], Frame::Pong(d) if &d == b"abcdefgh"));
    match &frames[5] {
        Frame::Response(r) => {
            assert_eq!(r.id, "00fd");
            assert_eq!(r.head.status, 201);
            assert_eq!(&r.body[..], b"hello");
            assert_eq!(r.trailers.as_ref().unwrap().headers[0].0, "grpc-status");
        }
        f => panic!("{f:?}"),
    }
    assert!(matches!(&frames[6], Frame::Response(r) if r.body.is_empty() && r.trailers.is_none()));
    assert!(matches!(&frames[7], Frame::GoAway(r) if r == "draining"));
    assert!(matches!(frames[8], Frame::Ack(n) if n == 1 << 40));
}

#[test]
fn golden_bytes_pin_the_layout() {
    let mut b = BytesMut::new();
    put_credit(&mut b, 3);
    put_cancel(&mut b, "ab");
    assert_eq!(&b[..], b"\x04\0\0\0\x04\0\0\0\x03\x02\0\0\0\x02ab");
    let rh = ResponseHead {
        status: 200,
        headers: Default::default(),
        body: BodyKind::Stream,
        content_length: Some(2),
    };
    let mut b = BytesMut::new();
    put_response(&mut b, Heads::Json, "i", &rh, b"ok", None);
    let json = br#"{"status":200,"headers":[],"body":"stream","content_length":2}"#;
    let mut want = vec![3u8];
    want.extend_from_slice(&((1 + 1 + 4 + json.len() + 4 + 2) as u32).to_be_bytes());
    want.extend_from_slice(b"\x01i");
    want.extend_from_slice(&(json.len() as u32).to_be_bytes());
    want.extend_from_slice(json);
    want.extend_from_slice(b"\0\0\0\x02ok");
    assert_eq!(&b[..], &want[..]);
}

#[test]
fn bad_messages_are_refused() {
    assert_eq!(
        decode(Bytes::from_static(b"\x04\0\0"), Heads::Json).unwrap_err(),
        SessionError::Truncated
    );
    assert_eq!(
        decode(Bytes::from_static(b"\x04\0\0\0\x09\0"), Heads::Json).unwrap_err(),
        SessionError::Truncated
    );
    assert_eq!(
        decode(Bytes::from_static(b"\x63\0\0\0\0"), Heads::Json).unwrap_err(),
        SessionError::UnknownKind(0x63)
    );
    assert!(matches!(
        decode(Bytes::from_static(b"\x04\0\0\0\x02\0\0"), Heads::Json).unwrap_err(),
        SessionError::Bad { kind: "CREDIT", .. }
    ));
    assert!(matches!(
        decode(Bytes::from_static(b"\x01\0\0\0\x01{"), Heads::Json).unwrap_err(),
        SessionError::Bad { kind: "OPEN", .. }
    ));
    // A RESPONSE whose body length runs past the frame.
    let json = br#"{"status":200,"headers":[],"body":"empty"}"#;
    let mut p = vec![1u8, b'i'];
    p.extend_from_slice(&(json.len() as u32).to_be_bytes());
    p.extend_from_slice(json);
    p.extend_from_slice(b"\0\0\0\x09x");
    let mut m = vec![3u8];
    m.extend_from_slice(&(p.len() as u32).to_be_bytes());
    m.extend_from_slice(&p);
    assert!(matches!(
        decode(Bytes::from(m), Heads::Json).unwrap_err(),
        SessionError::Bad {
            kind: "RESPONSE",
            ..
        }
    ));
    // An empty message is no frames, not an error.
    assert!(decode(Bytes::new(), Heads::Json).unwrap().is_empty());
}

#[test]
fn the_server_chooses_binary_heads_when_offered() {
    let both = "relay-session.v3, relay-session.v2";
    assert_eq!(
        Heads::choose([both]),
        (Heads::Binary, Some(SESSION_SUBPROTOCOL_BINARY))
    );
    assert_eq!(
        Heads::choose(["x", "relay-session.v2"]),
        (Heads::Json, Some(SESSION_SUBPROTOCOL))
    );
    // An agent that names no subprotocol speaks JSON (the first agents with sessions).
    assert_eq!(Heads::choose([]), (Heads::Json, None));
    assert_eq!(Heads::chosen(Some("relay-session.v3")), Heads::Binary);
    assert_eq!(Heads::chosen(Some("relay-session.v2")), Heads::Json);
    assert_eq!(Heads::chosen(None), Heads::Json);
}

#[test]
fn a_malformed_binary_head_is_refused() {
    // An OPEN whose payload is one byte: not a head.
    assert!(matches!(
        decode(Bytes::from_static(b"\x01\0\0\0\x01\0"), Heads::Binary).unwrap_err(),
        SessionError::Bad { kind: "OPEN", .. }
    ));
    // A RESPONSE whose binary head has trailing bytes inside its length.
    let mut b = BytesMut::new();
    put_response(
        &mut b,
        Heads::Binary,
        "i",
        &ResponseHead {
            status: 200,
            headers: Default::default(),
            body: BodyKind::Empty,
            content_length: None,
        },
        b"",
        None,
    );
    let mut m = b.to_vec();
    // head_len (after kind, length, id_len, id) from 7 to 8, the frame one longer.
    m[7..11].copy_from_slice(&8u32.to_be_bytes());
    m.insert(18, 0);
    let len = (m.len() - FRAME_HEADER_LEN) as u32;
    m[1..5].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode(Bytes::from(m), Heads::Binary).unwrap_err(),
        SessionError::Bad {
            kind: "RESPONSE",
            ..
        }
    ));
}

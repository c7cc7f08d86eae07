use super::*;
use bytes::Bytes;
use http::HeaderMap;

fn head(bytes: &[u8], method: &Method) -> Result<Option<Head>, H1Error> {
    parse_head(&mut BytesMut::from(bytes), method)
}

/// Decodes a whole body fed `step` bytes at a time; the bytes and the trailers.
fn decode_all(
    mut dec: Decoder,
    wire: &[u8],
    step: usize,
) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let (mut data, mut trailers) = (Vec::new(), None);
    loop {
        let eof = fed == wire.len();
        match dec.decode(&mut buf, eof)? {
            Step::Data(d) => data.extend_from_slice(&d),
            Step::Trailers(t) => trailers = Some(t),
            Step::End => return Ok((data, trailers)),
            Step::More => {
                assert!(!eof, "asked for more after the end");
                let n = step.min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
        }
    }
}

#[test]
fn request_heads_carry_one_framing_field_chosen_by_the_body() {
    let req = Request::builder()
        .method("POST")
        .uri("/up?x=1")
        .header("host", "b")
        .header("content-length", "99")
        .header("transfer-encoding", "gzip")
        .header("x-a", "1")
        .body(())
        .unwrap();
    for (framing, field) in [
        (Framing::None, ""),
        (Framing::Length(5), "content-length: 5\r\n"),
        (Framing::Chunked, "transfer-encoding: chunked\r\n"),
    ] {
        let mut b = BytesMut::new();
        put_request_head(&mut b, &req, framing);
        let want = format!("POST /up?x=1 HTTP/1.1\r\nhost: b\r\nx-a: 1\r\n{field}\r\n");
        assert_eq!(std::str::from_utf8(&b).unwrap(), want);
    }
}

#[test]
fn chunk_framing_is_hex_lines_and_a_trailer_section() {
    let mut lines = BytesMut::new();
    assert_eq!(&chunk_line(&mut lines, 255)[..], b"ff\r\n");
    assert_eq!(&chunk_line(&mut lines, 16)[..], b"10\r\n");
    assert_eq!(&last_chunk(None)[..], b"0\r\n\r\n");
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    assert_eq!(&last_chunk(Some(&t))[..], b"0\r\ngrpc-status: 0\r\n\r\n");
}

#[test]
fn response_heads_parse_with_their_delimitation_and_persistence() {
    let get = Method::GET;
    let h = head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        &get,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.status, 200);
    let HeadFields::Encoded {
        mut block,
        content_length,
    } = h.fields
    else {
        panic!("a plain head is encoded at once");
    };
    assert_eq!(content_length, Some(5));
    let map = block.take_map().unwrap();
    assert_eq!(map["x-a"], "1");
    assert!(!map.contains_key("content-length"), "framing goes apart");
    assert_eq!(h.body, Decoder::Length(5));
    assert!(h.keep_alive);
    let cases: [(&[u8], &Method, Decoder, bool); 9] = [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
            Decoder::Chunked(Chunk::Size),
            true,
        ),
        // Both framing fields: chunked wins, and the connection is not reused.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            &get,
            Decoder::Chunked(Chunk::Size),
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            &get,
            Decoder::Close,
            false,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", &get, Decoder::Close, false),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            &get,
            Decoder::Length(5),
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
            &get,
            Decoder::Length(5),
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
            &get,
            Decoder::Length(5),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
            Decoder::Length(0),
            true,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            &get,
            Decoder::Length(0),
            true,
        ),
    ];
    for (wire, method, body, keep) in cases {
        let h = head(wire, method).unwrap().unwrap();
        assert_eq!(
            (h.body, h.keep_alive),
            (body, keep),
            "{}",
            String::from_utf8_lossy(wire)
        );
    }
}

/// The fields of a head, in order, as the session would carry them.
fn carried(h: Head) -> (Vec<(String, String)>, Option<u64>) {
    match h.fields {
        HeadFields::Encoded {
            block,
            content_length,
        } => (block.to_list(), content_length),
        HeadFields::Map(_) => panic!("expected an encoded head"),
    }
}

#[test]
fn encoded_response_heads_drop_hop_by_hop_fields_and_keep_the_rest_in_order() {
    let wire = b"HTTP/1.1 200 OK\r\nX-B: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
        Content-Length: 3\r\nSet-Cookie: a=1\r\nTrailer: x\r\nProxy-Authenticate: Basic\r\n\
        Upgrade: h2c\r\nSet-Cookie: b=2\r\nX-Obs: caf\xe9\r\n\r\n";
    let (fields, length) = carried(head(wire, &Method::GET).unwrap().unwrap());
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("x-b", "2"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("x-obs", "caf\u{e9}"),
        ],
        "names in lower case, order kept, hop-by-hop and framing fields gone"
    );
    assert_eq!(length, Some(3));
    // A HEAD response keeps the length it announces (RFC 9110 §8.6), a bad one is dropped.
    let (_, length) = carried(
        head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap(),
    );
    assert_eq!(length, Some(7));
    let (_, length) = carried(
        head(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap(),
    );
    assert_eq!(length, None);
}

#[test]
fn response_heads_that_need_a_map_get_one() {
    // `Connection` naming a field makes that field hop-by-hop: the map path removes it.
    let h = head(
        b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
        &Method::GET,
    )
    .unwrap()
    .unwrap();
    assert!(matches!(&h.fields, HeadFields::Map(m) if m.contains_key("x-secret")));
    // A 101 keeps every field (the upgrade answer needs them).
    let h = head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        &Method::GET,
    )
    .unwrap()
    .unwrap();
    assert!(matches!(&h.fields, HeadFields::Map(m) if m.contains_key("upgrade")));
    // Conflicting or bad lengths are refused whichever path the fields take.
    for wire in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    ] {
        assert!(
            matches!(head(wire, &Method::GET), Err(H1Error::Head(_))),
            "{}",
            String::from_utf8_lossy(wire)
        );
    }
    // Equal repeated lengths are one length.
    let (_, length) = carried(
        head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap(),
    );
    assert_eq!(length, Some(3));
}

#[test]
fn interim_heads_are_skipped_and_partial_heads_wait() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\nrest"[..]);
    let h = parse_head(&mut buf, &Method::POST).unwrap().unwrap();
    assert_eq!(h.status, 201);
    assert_eq!(&buf[..], b"rest", "the head and only the head was consumed");
    let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
    assert!(parse_head(&mut partial, &Method::GET).unwrap().is_none());
    assert_eq!(partial.len(), 27, "nothing consumed");
}

#[test]
fn bad_heads_are_errors() {
    for wire in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
    ] {
        let e = head(wire, &Method::GET).unwrap_err();
        assert!(
            matches!(e, H1Error::Head(_)),
            "{e} for {}",
            String::from_utf8_lossy(wire)
        );
    }
    // Equal repeated lengths are one length (RFC 9110 §8.6).
    let h = head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
        &Method::GET,
    )
    .unwrap();
    assert_eq!(h.unwrap().body, Decoder::Length(5));
    let mut huge = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    huge.resize(MAX_HEAD + 10, b'a');
    assert!(matches!(
        head(&huge, &Method::GET),
        Err(H1Error::HeadTooLarge)
    ));
}

#[test]
fn bodies_decode_the_same_whatever_the_read_sizes() {
    let chunked: &[u8] =
        b"5\r\nhello\r\n1;ext=1\r\n \r\nb \r\nworld, here\r\n0\r\nGrpc-Status: 0\r\nX-T: a\r\n\r\n";
    for step in [1, 2, 3, 7, 1000] {
        let (d, t) = decode_all(Decoder::Chunked(Chunk::Size), chunked, step).unwrap();
        assert_eq!(d, b"hello world, here", "step {step}");
        let t = t.expect("trailers");
        assert_eq!(
            (t["grpc-status"].as_bytes(), t["x-t"].as_bytes()),
            (&b"0"[..], &b"a"[..])
        );
        let (d, t) = decode_all(Decoder::Chunked(Chunk::Size), b"3\nabc\n0\n\n", step).unwrap();
        assert_eq!(
            (d, t),
            (b"abc".to_vec(), None),
            "bare LF line ends, step {step}"
        );
        let (d, _) = decode_all(Decoder::Length(4), b"abcd", step).unwrap();
        assert_eq!(d, b"abcd");
        let (d, _) = decode_all(Decoder::Close, b"until the end", step).unwrap();
        assert_eq!(d, b"until the end");
    }
}

#[test]
fn a_length_body_never_takes_the_next_response() {
    let mut dec = Decoder::Length(3);
    let mut buf = BytesMut::from(&b"abcHTTP/1.1"[..]);
    let Step::Data(d) = dec.decode(&mut buf, false).unwrap() else {
        panic!("data")
    };
    assert_eq!(&d[..], b"abc");
    assert!(matches!(dec.decode(&mut buf, false).unwrap(), Step::End));
    assert_eq!(&buf[..], b"HTTP/1.1");
}

#[test]
fn truncated_and_malformed_bodies_are_errors() {
    let closed = |dec, wire: &[u8]| decode_all(dec, wire, 4).unwrap_err();
    assert!(matches!(
        closed(Decoder::Length(10), b"short"),
        H1Error::Closed
    ));
    assert!(matches!(
        closed(Decoder::Chunked(Chunk::Size), b"5\r\nhel"),
        H1Error::Closed
    ));
    assert!(matches!(
        closed(Decoder::Chunked(Chunk::Size), b"5\r\nhello\r\n"),
        H1Error::Closed
    ));
    assert!(matches!(
        closed(Decoder::Chunked(Chunk::Size), b"0\r\nX: 1\r\n"),
        H1Error::Closed
    ));
    for bad in [
        &b"zz\r\n"[..],
        b"5\r\nhelloXX",
        b"12345678123456789\r\n",
        b"-1\r\n",
        b"5 x\r\n",
    ] {
        let e = closed(Decoder::Chunked(Chunk::Size), bad);
        assert!(
            matches!(e, H1Error::Chunk(_)),
            "{e} for {}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = vec![b'1'; MAX_CHUNK_LINE + 2];
    let e = decode_all(Decoder::Chunked(Chunk::Size), &long, 1000).unwrap_err();
    assert!(matches!(e, H1Error::Chunk(_)), "{e}");
}

fn block(fields: &[(&str, &str)]) -> Bytes {
    let mut b = relay_common::heads::FieldBlock::with_capacity(fields.len(), 64);
    for (n, v) in fields {
        b.push(n, v.as_bytes());
    }
    match b.finish() {
        relay_common::message::Fields::Encoded(block) => block,
        _ => unreachable!("a FieldBlock is encoded"),
    }
}

#[test]
fn relayed_heads_are_written_from_the_block_without_hop_by_hop_fields() {
    let authority = HeaderValue::from_static("backend:8080");
    let fields = block(&[
        ("host", "relay.example"),
        ("x-forwarded-for", "10.0.0.1"),
        ("Keep-Alive", "timeout=5"),
        ("content-length", "3"),
        ("upgrade", "h2c"),
        ("accept", "*/*"),
    ]);
    let mut b = BytesMut::new();
    let head = ("GET", "/base", "/p?q=1");
    assert!(put_relayed_head(
        &mut b,
        head,
        &fields,
        (None, &authority),
        Framing::None
    ));
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        "GET /base/p?q=1 HTTP/1.1\r\nhost: relay.example\r\nx-forwarded-for: 10.0.0.1\r\n\
         accept: */*\r\n\r\n"
    );
    // --rewrite-host replaces the user's Host; a head without one gets the backend's.
    for (rewrite, fields) in [
        (Some(&authority), &fields),
        (None, &block(&[("accept", "*/*")])),
    ] {
        let mut b = BytesMut::new();
        let post = ("POST", "", "/up");
        assert!(put_relayed_head(
            &mut b,
            post,
            fields,
            (rewrite, &authority),
            Framing::Length(3)
        ));
        let text = std::str::from_utf8(&b).unwrap();
        assert!(text.starts_with("POST /up HTTP/1.1\r\n"), "{text}");
        assert!(
            text.ends_with("host: backend:8080\r\ncontent-length: 3\r\n\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("host:").count(), 1, "{text}");
    }
}

#[test]
fn relayed_heads_that_need_the_general_path_leave_the_buffer_as_it_was() {
    let authority = HeaderValue::from_static("b");
    let plain = block(&[("accept", "*/*")]);
    let cases: [((&str, &str, &str), Bytes); 6] = [
        (
            ("GET", "", "/a"),
            block(&[("accept", "*/*"), ("connection", "x-secret")]),
        ),
        (("GET", "", "/a"), block(&[("te", "trailers")])),
        (("GET", "", "/a b"), plain.clone()),
        (("GET", "", "/a\r\nx: y"), plain.clone()),
        (("GET", "", "*"), plain.clone()),
        (("G T", "", "/a"), plain.clone()),
    ];
    for (head, fields) in cases {
        let mut b = BytesMut::from(&b"kept"[..]);
        assert!(
            !put_relayed_head(&mut b, head, &fields, (None, &authority), Framing::None),
            "{head:?}"
        );
        assert_eq!(&b[..], b"kept", "{head:?}");
    }
}

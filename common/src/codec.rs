//! Typed encoding and decoding of exchange bodies: the one place that says which frames a
//! message becomes and which message a run of frames is. Both binaries go through it, so a
//! protocol fix is made once.
//!
//! Encoding never copies body bytes: a DATA message becomes a 5-byte frame header and the
//! payload buffer itself, sent one after the other. Decoding hands out slices of the input.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Body;

use crate::frame::{self, Decoder, FrameError, Item, Kind};
use crate::message::{decode_headers, encode_headers, ResponseHead, Trailers};

/// One step of a body, in either direction: what a response exchange delivers to the user
/// side and what an upload exchange delivers to the backend.
#[derive(Debug)]
pub enum BodyMsg {
    /// Body bytes.
    Data(Bytes),
    /// Trailer fields; the body ends after them. Boxed: rare, and a `HeaderMap` inline
    /// would triple the size of every message in the body channels.
    Trailers(Box<HeaderMap>),
    /// Clean end of the body.
    End,
    /// The body broke (its reason); the receiver must fail its side, never end it cleanly.
    Abort(String),
}

impl BodyMsg {
    /// Whether the body is over after this message.
    pub fn is_last(&self) -> bool {
        !matches!(self, BodyMsg::Data(_))
    }
}

/// The wire bytes of one message: a frame, and for DATA the payload as a second buffer.
#[derive(Debug)]
pub struct Encoded {
    /// The frame (header only for DATA; header and payload for control frames).
    pub frame: Bytes,
    /// DATA payload, sent right after `frame`.
    pub payload: Option<Bytes>,
}

/// Encodes a body message.
pub fn encode(msg: BodyMsg) -> Encoded {
    let frame = match msg {
        BodyMsg::Data(data) => {
            return Encoded {
                frame: frame::header(Kind::Data, data.len()),
                payload: Some(data),
            }
        }
        BodyMsg::Trailers(t) => {
            let json = serde_json::to_vec(&Trailers {
                headers: encode_headers(&t),
            })
            .expect("bug: trailers always serialise");
            frame::control(Kind::Trailers, &json)
        }
        BodyMsg::End => frame::control(Kind::End, b""),
        BodyMsg::Abort(why) => frame::control(Kind::Abort, why.as_bytes()),
    };
    Encoded {
        frame,
        payload: None,
    }
}

/// Encodes a HEAD frame (the first frame of a response).
pub fn encode_head(head: &ResponseHead) -> Bytes {
    let json = serde_json::to_vec(head).expect("bug: heads always serialise");
    frame::control(Kind::Head, &json)
}

/// Encodes CONTINUE: this exchange is over, the body goes on in the next one.
pub fn encode_continue() -> Bytes {
    frame::control(Kind::Continue, b"")
}

/// A decoded message of an exchange.
#[derive(Debug)]
pub enum Message {
    /// The response head (responses only).
    Head(ResponseHead),
    /// A body step. DATA frames may arrive as several `Data` pieces.
    Body(BodyMsg),
    /// The exchange is over; the body goes on in the next one.
    Continue,
}

/// Why an exchange body could not be read to a clean boundary.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body ended without END, TRAILERS, ABORT or CONTINUE: bytes may be lost.
    #[error("the exchange ended without END, TRAILERS, ABORT or CONTINUE")]
    Cut,
    /// The carrying HTTP body failed.
    #[error("reading the exchange: {0}")]
    Transport(String),
    /// The frames are malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A HEAD or TRAILERS payload is not what the protocol says.
    #[error("bad {frame}: {reason}")]
    Payload {
        /// HEAD or TRAILERS.
        frame: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Reads messages from an HTTP body of frames (a `/server/response` request body on the
/// server, a `/server/requeststream` answer on the agent).
pub struct FrameReader<B> {
    body: B,
    decoder: Decoder,
    input: Bytes,
}

impl<B> FrameReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Reader over `body`.
    pub fn new(body: B) -> Self {
        FrameReader {
            body,
            decoder: Decoder::default(),
            input: Bytes::new(),
        }
    }

    /// The next message. An exchange that ends without a final or CONTINUE frame is
    /// [`ReadError::Cut`], never a clean end.
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        loop {
            if let Some(item) = self.decoder.decode(&mut self.input)? {
                return decode_item(item);
            }
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => return Err(ReadError::Cut),
                Some(Err(e)) => return Err(ReadError::Transport(e.to_string())),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.input = data;
                    }
                }
            }
        }
    }
}

fn decode_item(item: Item) -> Result<Message, ReadError> {
    Ok(match item {
        Item::Head(json) => {
            Message::Head(
                serde_json::from_slice(&json).map_err(|e| ReadError::Payload {
                    frame: "HEAD",
                    reason: e.to_string(),
                })?,
            )
        }
        Item::Data(b) => Message::Body(BodyMsg::Data(b)),
        Item::Trailers(json) => {
            let bad = |reason: String| ReadError::Payload {
                frame: "TRAILERS",
                reason,
            };
            let t: Trailers = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
            Message::Body(BodyMsg::Trailers(Box::new(
                decode_headers(&t.headers).map_err(|e| bad(e.to_string()))?,
            )))
        }
        Item::End => Message::Body(BodyMsg::End),
        Item::Abort(why) => Message::Body(BodyMsg::Abort(why)),
        Item::Continue => Message::Continue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::BodyKind;
    use http::HeaderValue;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    /// An HTTP body handing out `parts` joined and re-split into pieces of `step` bytes.
    struct Pieces(VecDeque<Bytes>);

    impl Body for Pieces {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    fn wire(parts: Vec<Bytes>, step: usize) -> Pieces {
        let all: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
        Pieces(all.chunks(step).map(Bytes::copy_from_slice).collect())
    }

    fn encoded(msg: BodyMsg) -> Vec<Bytes> {
        let e = encode(msg);
        std::iter::once(e.frame).chain(e.payload).collect()
    }

    #[tokio::test]
    async fn messages_round_trip_in_any_split() {
        let head = ResponseHead {
            status: 200,
            headers: vec![("x-a".into(), "b".into())].into(),
            body: BodyKind::Stream,
            content_length: None,
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut parts = vec![encode_head(&head)];
        parts.extend(encoded(BodyMsg::Data(Bytes::from_static(b"hello"))));
        parts.push(encode_continue());
        parts.extend(encoded(BodyMsg::Trailers(Box::new(trailers.clone()))));
        let total: usize = parts.iter().map(|b| b.len()).sum();
        for step in 1..=total {
            let mut r = FrameReader::new(wire(parts.clone(), step));
            let Message::Head(h) = r.next().await.unwrap() else {
                panic!("head first")
            };
            assert_eq!(
                (h.status, h.headers.to_list()),
                (200, head.headers.to_list())
            );
            let mut data = Vec::new();
            let next = loop {
                match r.next().await.unwrap() {
                    Message::Body(BodyMsg::Data(d)) => data.extend_from_slice(&d),
                    other => break other,
                }
            };
            assert_eq!(data, b"hello", "step {step}");
            assert!(matches!(next, Message::Continue));
            match r.next().await.unwrap() {
                Message::Body(BodyMsg::Trailers(t)) => assert_eq!(*t, trailers),
                other => panic!("{other:?}"),
            }
            assert!(matches!(r.next().await, Err(ReadError::Cut)));
        }
    }

    #[tokio::test]
    async fn a_cut_exchange_is_an_error_not_an_end() {
        let mut parts = encoded(BodyMsg::Data(Bytes::from_static(b"abc")));
        parts[1] = parts[1].slice(..2);
        let mut r = FrameReader::new(wire(parts, 3));
        let mut got = Vec::new();
        let err = loop {
            match r.next().await {
                Ok(Message::Body(BodyMsg::Data(d))) => got.extend_from_slice(&d),
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"ab");
        assert!(matches!(err, ReadError::Cut));
    }

    #[tokio::test]
    async fn bad_payloads_name_their_frame() {
        let parts = vec![frame::control(Kind::Head, b"{not json")];
        let mut r = FrameReader::new(wire(parts, 64));
        match r.next().await {
            Err(ReadError::Payload { frame, .. }) => assert_eq!(frame, "HEAD"),
            other => panic!("{other:?}"),
        }
        let bad = br#"{"headers":[["x","\u0100"]]}"#;
        let parts = vec![frame::control(Kind::Trailers, bad)];
        let mut r = FrameReader::new(wire(parts, 64));
        match r.next().await {
            Err(ReadError::Payload { frame, .. }) => assert_eq!(frame, "TRAILERS"),
            other => panic!("{other:?}"),
        }
    }
}

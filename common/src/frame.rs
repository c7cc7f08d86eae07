//! Binary frames: the body format of `/server/response` (agent → server) and of
//! `/server/requeststream` answers (server → agent).
//!
//! ```text
//! frame = kind:u8 length:u32be payload[length]
//! ```
//!
//! | kind | name | payload |
//! |---|---|---|
//! | 1 | HEAD | JSON [`ResponseHead`](crate::message::ResponseHead) (responses only, first frame of offset 0) |
//! | 2 | DATA | body bytes |
//! | 3 | TRAILERS | JSON [`Trailers`](crate::message::Trailers); the body ends after it |
//! | 4 | END | empty; the body is complete |
//! | 5 | ABORT | UTF-8 reason; the body is broken, the receiver aborts its side |
//! | 6 | CONTINUE | empty; this exchange is over, the body goes on in the next one |
//!
//! An exchange that stops without END, TRAILERS, ABORT or CONTINUE was cut: the receiver
//! treats it as an abort, never as a clean end. DATA payloads are never buffered whole by
//! the decoder: it hands out slices of the input as they arrive.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest control payload (HEAD, TRAILERS, ABORT) the decoder accepts.
pub const MAX_CONTROL_LEN: usize = 256 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Response head (JSON).
    Head = 1,
    /// Body bytes.
    Data = 2,
    /// Trailers (JSON), ends the body.
    Trailers = 3,
    /// Clean end of body.
    End = 4,
    /// Broken body.
    Abort = 5,
    /// End of this exchange; more follow.
    Continue = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Head,
            2 => Kind::Data,
            3 => Kind::Trailers,
            4 => Kind::End,
            5 => Kind::Abort,
            6 => Kind::Continue,
            _ => return None,
        })
    }
}

/// Encodes a frame header. DATA payloads are sent as a separate buffer after it, so body
/// bytes are never copied into a frame.
pub fn header(kind: Kind, len: usize) -> Bytes {
    let len = u32::try_from(len).expect("bug: frame payload over 4 GiB");
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN);
    b.put_u8(kind as u8);
    b.put_u32(len);
    b.freeze()
}

/// Encodes a whole control frame (header and payload in one buffer).
pub fn control(kind: Kind, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    b.put_u8(kind as u8);
    b.put_u32(u32::try_from(payload.len()).expect("bug: control frame over 4 GiB"));
    b.put_slice(payload);
    b.freeze()
}

/// A decoded item. DATA frames may arrive as several `Data` pieces.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// HEAD payload.
    Head(Bytes),
    /// A piece of body bytes.
    Data(Bytes),
    /// TRAILERS payload.
    Trailers(Bytes),
    /// END.
    End,
    /// ABORT with its reason.
    Abort(String),
    /// CONTINUE.
    Continue,
}

/// Malformed frame input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Control payload over [`MAX_CONTROL_LEN`].
    #[error("control frame of {0} bytes is too large")]
    TooLarge(usize),
    /// END, CONTINUE with a payload.
    #[error("frame {0:?} must be empty")]
    NotEmpty(Kind),
}

enum State {
    Header,
    Data { remaining: usize },
    Control { kind: Kind, len: usize },
}

/// Incremental decoder: feed input with [`Decoder::decode`] until it returns `Ok(None)`.
pub struct Decoder {
    state: State,
    acc: BytesMut,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Header,
            acc: BytesMut::new(),
        }
    }
}

impl Decoder {
    /// Whether the decoder sits between frames (a clean place for input to end; whether the
    /// end is acceptable depends on the last item seen).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header) && self.acc.is_empty()
    }

    /// Takes what it can from `input` and returns the next item, or `None` when `input` is
    /// used up without completing one.
    pub fn decode(&mut self, input: &mut Bytes) -> Result<Option<Item>, FrameError> {
        loop {
            match self.state {
                State::Header => {
                    if self.acc.is_empty() && input.len() >= FRAME_HEADER_LEN {
                        let kind = input[0];
                        let len = u32::from_be_bytes([input[1], input[2], input[3], input[4]]);
                        input.advance(FRAME_HEADER_LEN);
                        if let Some(item) = self.start(kind, len as usize)? {
                            return Ok(Some(item));
                        }
                        continue;
                    }
                    let need = FRAME_HEADER_LEN - self.acc.len();
                    let take = need.min(input.len());
                    self.acc.extend_from_slice(&input.split_to(take));
                    if self.acc.len() < FRAME_HEADER_LEN {
                        return Ok(None);
                    }
                    let h = self.acc.split().freeze();
                    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                    if let Some(item) = self.start(h[0], len as usize)? {
                        return Ok(Some(item));
                    }
                }
                State::Data { remaining } => {
                    if remaining == 0 {
                        self.state = State::Header;
                        continue;
                    }
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(input.len());
                    let piece = input.split_to(take);
                    self.state = if take == remaining {
                        State::Header
                    } else {
                        State::Data {
                            remaining: remaining - take,
                        }
                    };
                    return Ok(Some(Item::Data(piece)));
                }
                State::Control { kind, len } => {
                    let payload = if self.acc.is_empty() && input.len() >= len {
                        input.split_to(len)
                    } else {
                        let take = (len - self.acc.len()).min(input.len());
                        self.acc.extend_from_slice(&input.split_to(take));
                        if self.acc.len() < len {
                            return Ok(None);
                        }
                        self.acc.split().freeze()
                    };
                    self.state = State::Header;
                    return Ok(Some(match kind {
                        Kind::Head => Item::Head(payload),
                        Kind::Trailers => Item::Trailers(payload),
                        Kind::Abort => Item::Abort(String::from_utf8_lossy(&payload).into_owned()),
                        _ => unreachable!("bug: only payload-carrying control kinds reach here"),
                    }));
                }
            }
        }
    }

    fn start(&mut self, kind: u8, len: usize) -> Result<Option<Item>, FrameError> {
        let kind = Kind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        match kind {
            Kind::Data => {
                self.state = State::Data { remaining: len };
                Ok(None)
            }
            Kind::End | Kind::Continue if len != 0 => Err(FrameError::NotEmpty(kind)),
            Kind::End => Ok(Some(Item::End)),
            Kind::Continue => Ok(Some(Item::Continue)),
            _ if len > MAX_CONTROL_LEN => Err(FrameError::TooLarge(len)),
            _ => {
                self.state = State::Control { kind, len };
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_all() -> (Vec<u8>, Vec<Item>) {
        let mut wire = Vec::new();
        wire.extend_from_slice(&control(Kind::Head, b"{\"status\":200}"));
        wire.extend_from_slice(&header(Kind::Data, 5));
        wire.extend_from_slice(b"hello");
        wire.extend_from_slice(&header(Kind::Data, 0));
        wire.extend_from_slice(&header(Kind::Data, 3));
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&control(Kind::Trailers, b"{}"));
        wire.extend_from_slice(&control(Kind::Continue, b""));
        wire.extend_from_slice(&control(Kind::Abort, b"why"));
        wire.extend_from_slice(&control(Kind::End, b""));
        let items = vec![
            Item::Head(Bytes::from_static(b"{\"status\":200}")),
            Item::Data(Bytes::from_static(b"hello")),
            Item::Data(Bytes::from_static(b"abc")),
            Item::Trailers(Bytes::from_static(b"{}")),
            Item::Continue,
            Item::Abort("why".into()),
            Item::End,
        ];
        (wire, items)
    }

    /// Decodes `wire` split into pieces of `step` bytes, merging adjacent DATA pieces.
    fn decode_in_steps(wire: &[u8], step: usize) -> Vec<Item> {
        let mut d = Decoder::default();
        let mut out: Vec<Item> = Vec::new();
        for chunk in wire.chunks(step) {
            let mut input = Bytes::copy_from_slice(chunk);
            while let Some(item) = d.decode(&mut input).unwrap() {
                match (out.last_mut(), item) {
                    (Some(Item::Data(prev)), Item::Data(more)) => {
                        let mut m = BytesMut::from(&prev[..]);
                        m.extend_from_slice(&more);
                        *prev = m.freeze();
                    }
                    (_, item) => out.push(item),
                }
            }
        }
        assert!(d.at_boundary());
        out
    }

    #[test]
    fn every_split_decodes_the_same() {
        let (wire, items) = encode_all();
        // Data pieces of one frame are merged; the two DATA frames are adjacent too.
        let mut expect = items;
        expect[1] = Item::Data(Bytes::from_static(b"helloabc"));
        expect.remove(2);
        for step in 1..=wire.len() {
            assert_eq!(decode_in_steps(&wire, step), expect, "step {step}");
        }
    }

    #[test]
    fn data_is_not_copied() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&header(Kind::Data, 4));
        wire.extend_from_slice(b"wxyz");
        let mut input = wire.freeze();
        let base = input.as_ptr() as usize;
        let mut d = Decoder::default();
        match d.decode(&mut input).unwrap() {
            Some(Item::Data(b)) => assert_eq!(b.as_ptr() as usize, base + FRAME_HEADER_LEN),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_bad_frames() {
        let mut d = Decoder::default();
        let mut input = Bytes::from_static(&[9, 0, 0, 0, 0]);
        assert_eq!(d.decode(&mut input), Err(FrameError::UnknownKind(9)));
        let mut d = Decoder::default();
        let mut input = header(Kind::Head, MAX_CONTROL_LEN + 1);
        assert!(matches!(d.decode(&mut input), Err(FrameError::TooLarge(_))));
        let mut d = Decoder::default();
        let mut input = control(Kind::End, b"x");
        assert_eq!(d.decode(&mut input), Err(FrameError::NotEmpty(Kind::End)));
    }

    #[test]
    fn partial_frame_is_not_a_boundary() {
        let mut d = Decoder::default();
        let mut input = Bytes::from_static(&[2, 0, 0, 0, 9, b'a']);
        assert_eq!(
            d.decode(&mut input).unwrap(),
            Some(Item::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(d.decode(&mut input).unwrap(), None);
        assert!(!d.at_boundary());
    }
}

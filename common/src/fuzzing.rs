//! Properties the fuzz targets check (`fuzz/`), callable from ordinary tests so the saved
//! corpora are replayed by CI without a fuzzing engine.

use bytes::Bytes;

use crate::frame::{Decoder, FrameError, Item};

/// Decodes `data` (after its first byte) in one piece and in pieces of the size the first
/// byte gives; both must yield the same items (DATA pieces joined) and the same error, and
/// never more body bytes than the input holds.
pub fn frames(data: &[u8]) {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let whole = decode_all(input, input.len().max(1));
    let pieces = decode_all(input, usize::from(step % 16) + 1);
    assert_eq!(whole, pieces, "decoding depends on how the input is split");
    let body: usize = whole
        .0
        .iter()
        .map(|i| match i {
            Item::Data(d) => d.len(),
            _ => 0,
        })
        .sum();
    assert!(body <= input.len());
}

type Decoded = (Vec<Item>, Option<FrameError>, bool);

fn decode_all(input: &[u8], step: usize) -> Decoded {
    let mut d = Decoder::default();
    let mut items: Vec<Item> = Vec::new();
    for chunk in input.chunks(step) {
        let mut b = Bytes::copy_from_slice(chunk);
        loop {
            match d.decode(&mut b) {
                Ok(Some(Item::Data(piece))) => match items.last_mut() {
                    // Pieces of one body are one logical run of bytes.
                    Some(Item::Data(prev)) => {
                        let mut joined = prev.to_vec();
                        joined.extend_from_slice(&piece);
                        *prev = Bytes::from(joined);
                    }
                    _ => items.push(Item::Data(piece)),
                },
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e), false),
            }
        }
    }
    let boundary = d.at_boundary();
    (items, None, boundary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{control, header, Kind};

    #[test]
    fn split_invariance_on_a_real_exchange() {
        let mut input = vec![3u8];
        input.extend_from_slice(&control(Kind::Head, b"{\"status\":200}"));
        input.extend_from_slice(&header(Kind::Data, 5));
        input.extend_from_slice(b"hello");
        input.extend_from_slice(&control(Kind::End, b""));
        frames(&input);
        frames(&[0, 9, 0, 0, 0, 1, 0]);
        frames(&[]);
    }
}

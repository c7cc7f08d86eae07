//! The head of a user request forwarded to another replica: everything but its method and
//! body, as JSON in one header field, in visible ASCII whatever bytes its header values hold.

use http::HeaderValue;
use serde::{Deserialize, Serialize};

/// Header with the prepared request head (JSON [`PeerHead`]).
pub const HEAD_HEADER: &str = "x-relay-cluster-head";

/// What a forwarded user request carries besides its method and body.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerHead {
    /// Backend name.
    pub name: String,
    /// Backend request target.
    pub target: String,
    /// The backend's headers (already stripped and completed by the first replica).
    pub headers: Vec<(String, String)>,
    /// Declared body length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    /// Upgrade protocol of a genuine upgrade request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The user's address (the owner charges the response to its share of the budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<std::net::IpAddr>,
}

impl PeerHead {
    /// The header value carrying this head.
    pub fn encode(&self) -> HeaderValue {
        let json = serde_json::to_string(self).expect("bug: a head always serialises");
        HeaderValue::from_str(&ascii_json(&json)).expect("bug: ascii_json writes visible ASCII")
    }

    /// The head in `value`, if it is one.
    pub fn decode(value: &HeaderValue) -> Option<Self> {
        serde_json::from_slice(value.as_bytes()).ok()
    }
}

/// `json` with every character outside printable ASCII written as a `\uXXXX` escape (RFC 8259
/// §7), so the head fits a header field value (RFC 9110 §5.5: visible ASCII) whatever bytes
/// the user's header values hold: the lossless header encoding carries a byte above 0x7F as
/// the code point of the same number, which JSON would otherwise write as UTF-8.
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use relay_common::message::{decode_headers, encode_headers};

    #[test]
    fn heads_with_any_header_bytes_fit_a_header_value_and_read_back() {
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_bytes(b"n=caf\xc3\xa9; \x80\xff\t").unwrap(),
        );
        let head = PeerHead {
            name: "a".into(),
            target: "/x".into(),
            headers: encode_headers(&h),
            content_length: None,
            upgrade: None,
            client: Some([127, 0, 0, 1].into()),
        };
        let back = PeerHead::decode(&head.encode()).unwrap();
        assert_eq!(decode_headers(&back.headers).unwrap(), h);
        assert_eq!(ascii_json("\u{1F600}"), "\\ud83d\\ude00");
    }
}

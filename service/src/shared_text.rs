//! A message's text as the store's cache of session tails, every prompt
//! and every attempt share it: one allocation per message, holding the
//! text and its JSON string form. A history message is sent again with
//! every later reply of its session: escaping it into the upstream request
//! each time was the largest single item of a reply's instructions
//! (callgrind, with the history window full), and reaching the encoding
//! through an allocation of its own cost a cache miss per message per reply
//! (copying a full window into the request was a tenth of the service's
//! samples at 100 clients, most of it waiting on memory).

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

#[derive(Clone)]
pub struct SharedText {
    /// The JSON string (quoted and escaped), then the text when escaping
    /// changed it; otherwise the text is the JSON string between its quotes.
    encoded: Arc<str>,
    /// Where the JSON string ends in `encoded`.
    json_len: usize,
}

impl SharedText {
    pub fn as_str(&self) -> &str {
        &self.encoded[self.text_range()]
    }

    /// The text's length in bytes, from the handle alone (through `Deref`
    /// the text is sliced, which reads the shared allocation's bytes at
    /// the slice's ends).
    pub fn len(&self) -> usize {
        self.text_range().len()
    }

    /// Where the text is in `encoded`: after the JSON string when escaping
    /// changed it, else the JSON string between its quotes.
    fn text_range(&self) -> Range<usize> {
        if self.encoded.len() > self.json_len {
            self.json_len..self.encoded.len()
        } else {
            1..self.json_len - 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text as a JSON string, quoted and escaped, as bytes: what the
    /// request's encoder copies, without the check that slicing a `str`
    /// makes of the bytes at the slice's ends.
    pub fn json(&self) -> &[u8] {
        &self.encoded.as_bytes()[..self.json_len]
    }

    /// The bytes held for the text and its JSON form.
    pub fn held_bytes(&self) -> usize {
        self.encoded.len()
    }
}

/// Brings the allocations of `texts` into the cache before they are cloned
/// or copied. Each lives in an allocation of its own, most likely out of
/// the cache since the reply before, and a clone's locked increment waits
/// for its miss before the next clone can start: plain loads of every count
/// first let the misses overlap.
pub fn warm<'a>(texts: impl IntoIterator<Item = &'a SharedText>) {
    for text in texts {
        std::hint::black_box(Arc::strong_count(&text.encoded));
    }
}

impl Deref for SharedText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Encoding copies the text into the shared allocation, so an owned text
/// is only read (the `String` and `Cow` conversions borrow it).
impl From<&str> for SharedText {
    fn from(text: &str) -> Self {
        let mut encoded = String::with_capacity(text.len() + 2);
        write_json_string(text, &mut encoded);
        let json_len = encoded.len();
        // Escaping changed the text only if it lengthened it.
        if json_len != text.len() + 2 {
            encoded.push_str(text);
        }
        Self {
            encoded: encoded.into(),
            json_len,
        }
    }
}

impl From<String> for SharedText {
    fn from(text: String) -> Self {
        text.as_str().into()
    }
}

/// Appends `text` to `out` as a JSON string (RFC 8259), escaped as
/// serde_json escapes one: quote, backslash and control characters. Written
/// here because serde_json's writer answers with a `Result` that a string
/// never fails, and a text always has its JSON form.
fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    let mut plain_from = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[plain_from..at]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(HEX_DIGITS[usize::from(byte & 0xf)]));
        } else {
            out.push_str(escape);
        }
        plain_from = at + 1;
    }
    out.push_str(&text[plain_from..]);
    out.push('"');
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

impl From<Cow<'_, str>> for SharedText {
    fn from(text: Cow<'_, str>) -> Self {
        Self::from(&*text)
    }
}

impl PartialEq for SharedText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SharedText {}

impl fmt::Display for SharedText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Debug for SharedText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_is_the_text_as_serde_json_encodes_it() {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        for text in [
            "",
            "plain",
            "quote \" backslash \\ newline \n tab \t",
            "é 🦀 \u{1} \u{7f} \u{2028}",
            "\"",
            "ends with a newline\n",
            every_control.as_str(),
        ] {
            let shared = SharedText::from(text);
            assert_eq!(
                shared.json(),
                serde_json::to_string(text).unwrap().as_bytes()
            );
            assert_eq!(
                serde_json::from_slice::<String>(shared.json()).unwrap(),
                text
            );
            assert_eq!(&*shared, text);
            assert_eq!(shared.len(), text.len());
        }
    }

    #[test]
    fn a_text_escaping_leaves_alone_is_kept_once() {
        let shared = SharedText::from("plain é 🦀");
        assert_eq!(shared.encoded.len(), "plain é 🦀".len() + 2);
        let escaped = SharedText::from("a\nb");
        assert_eq!(&*escaped.encoded, "\"a\\nb\"a\nb");
    }
}

//! A message's text as the store's cache of session tails, every prompt
//! and every attempt share it: a buffer holding the text and its JSON
//! string form, the message's own or (once its history segment is full)
//! the segment's. A history message is sent again with every later reply
//! of its session: escaping it into the upstream request each time was the
//! largest single item of a reply's instructions (callgrind, with the
//! history window full), so its JSON form is kept beside it.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

#[derive(Clone)]
pub struct SharedText {
    /// Holds the JSON string (quoted and escaped) and the text: the text is
    /// the JSON string between its quotes when escaping left it alone, and
    /// elsewhere in the buffer otherwise. A text of its own has a buffer of
    /// its own; a history's texts share their segment's
    /// ([`crate::turns::History`]).
    buffer: Arc<str>,
    json: Span,
    text: Span,
}

/// A range of a shared buffer; `u32`s keep a text's handle at 32 bytes.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl SharedText {
    /// The text at `text` in `buffer`, whose JSON string is at `json`.
    /// `None` when a range is out of the buffer, off a character boundary,
    /// or past `u32`.
    pub fn within(buffer: &Arc<str>, json: Range<usize>, text: Range<usize>) -> Option<Self> {
        buffer.get(json.clone())?;
        buffer.get(text.clone())?;
        let span = |range: Range<usize>| -> Option<Span> {
            Some(Span {
                start: u32::try_from(range.start).ok()?,
                end: u32::try_from(range.end).ok()?,
            })
        };
        Some(Self {
            buffer: Arc::clone(buffer),
            json: span(json)?,
            text: span(text)?,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.buffer[self.text.range()]
    }

    /// The text's length in bytes, from the handle alone (through `Deref`
    /// the text is sliced, which reads the shared buffer's bytes at the
    /// slice's ends).
    pub fn len(&self) -> usize {
        (self.text.end - self.text.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text as a JSON string, quoted and escaped: what a request
    /// carries of it.
    pub fn json(&self) -> &str {
        &self.buffer[self.json.range()]
    }

    /// Whether the JSON string is more than the text in quotes.
    pub fn is_escaped(&self) -> bool {
        self.json.end - self.json.start != self.text.end - self.text.start + 2
    }

    /// The bytes of its text and JSON form (its share of a shared buffer).
    pub fn held_bytes(&self) -> usize {
        let json = (self.json.end - self.json.start) as usize;
        if self.is_escaped() {
            json + self.len()
        } else {
            json
        }
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
        let mut buffer = String::with_capacity(text.len() + 2);
        write_json_string(text, &mut buffer);
        let json_len = buffer.len();
        // Escaping changed the text only if it lengthened it.
        let text_at = if json_len == text.len() + 2 {
            1
        } else {
            buffer.push_str(text);
            json_len
        };
        // A text is bounded by the request body's limit (MiBs), far below
        // `u32::MAX`.
        let span = |start: usize, end: usize| Span {
            start: start as u32,
            end: end as u32,
        };
        Self {
            buffer: buffer.into(),
            json: span(0, json_len),
            text: span(text_at, text_at + text.len()),
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
            assert_eq!(shared.json(), serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<String>(shared.json()).unwrap(), text);
            assert_eq!(&*shared, text);
            assert_eq!(shared.len(), text.len());
        }
    }

    #[test]
    fn a_text_escaping_leaves_alone_is_kept_once() {
        let shared = SharedText::from("plain é 🦀");
        assert_eq!(shared.buffer.len(), "plain é 🦀".len() + 2);
        assert!(!shared.is_escaped());
        let escaped = SharedText::from("a\nb");
        assert_eq!(&*escaped.buffer, "\"a\\nb\"a\nb");
        assert!(escaped.is_escaped());
    }

    #[test]
    fn a_text_within_a_shared_buffer_is_its_range() {
        // A message object, then the text its JSON string escapes.
        let buffer: Arc<str> = concat!(r#",{"content":"a\nb"}"#, "a\nb").into();
        let json = 12..18;
        let shared = SharedText::within(&buffer, json.clone(), 19..22).unwrap();
        assert_eq!(shared.as_str(), "a\nb");
        assert_eq!(shared.json(), r#""a\nb""#);
        assert!(shared.is_escaped());
        assert_eq!(shared.held_bytes(), 6 + 3);
        assert!(SharedText::within(&buffer, json, 19..23).is_none());
        assert!(SharedText::within(&"é".into(), 0..1, 0..2).is_none());
    }
}

//! A streamed chunk's first choice, and a fast path that reads it from the
//! chunks servers actually send.
//!
//! `serde_json` spent about 4,900 instructions on each ~130-byte chunk (every
//! key and string validated as UTF-8 one call at a time, every field matched
//! through the visitor): a fifth of a reply's instructions. A chunk with a
//! token is nearly always one shape: a flat object of plain strings, small
//! integers and `null`s, with `choices` holding one choice whose `delta` has
//! the text. [`scan_first_choice`] reads that shape in one pass and answers
//! `None` for anything else (an escape in a key, a nested object it does not
//! know, a float, `usage` or `error` set, a duplicate field, ...), which is
//! then read by `serde_json` as before. Whenever it answers, its answer is
//! the one `serde_json` gives: the `openai_chunk` fuzz target checks exactly
//! that.

use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct ChunkChoice {
    #[serde(default)]
    pub delta: Option<ChunkDelta>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, PartialEq, Deserialize)]
pub(super) struct ChunkDelta {
    #[serde(default)]
    pub content: Option<String>,
}

/// The chunk's first choice (`Some(None)`: no `choices`, or an empty array)
/// when `data` is a chunk of the common shape with neither `usage` nor
/// `error` set; `None` when it is anything else.
pub(super) fn scan_first_choice(data: &[u8]) -> Option<Option<ChunkChoice>> {
    let mut scanner = Scanner { data, at: 0 };
    let mut choice = None;
    let mut seen = Seen::default();
    scanner.object(|scanner, key| match key {
        b"choices" => {
            seen.first(0)?;
            choice = scanner.choices()?;
            Some(())
        }
        // Set, they are read by serde_json; `null` is the same as absent.
        b"usage" | b"error" => {
            seen.first(if key == b"usage" { 1 } else { 2 })?;
            scanner.null()
        }
        _ => scanner.skip_scalar(),
    })?;
    scanner.whitespace();
    (scanner.at == data.len()).then_some(choice)
}

/// Which of an object's known fields were read: serde refuses a duplicate.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    fn first(&mut self, field: u8) -> Option<()> {
        let bit = 1 << field;
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        Some(())
    }
}

/// Where a string scan stops. A plain string stops at its closing quote and
/// at what needs a closer look: an escape, a control character, a byte of a
/// non-ASCII character. Text stops at its closing quote, an escape and a
/// control character.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Plain,
    Text,
}

/// The index of the first byte of `bytes` that `stop` stops at. Eight
/// bytes at a time: one test per word instead of a few per byte.
fn first_stop(bytes: &[u8], stop: Stop) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of each byte below `n` (n <= 0x80). A borrow only runs
    // towards higher bytes and only from a byte that is below `n`, so the
    // lowest byte flagged is always a true one.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().ok()?);
        let mut found = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if stop == Stop::Plain {
            found |= word & HIGH;
        }
        if found != 0 {
            // Little-endian: the lowest set bit is in the first such byte.
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let rest = words.remainder().iter().position(|&byte| {
        byte == b'"' || byte == b'\\' || byte < 0x20 || (stop == Stop::Plain && byte >= 0x80)
    })?;
    Some(at + rest)
}

struct Scanner<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.data.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Skips whitespace, then takes `byte`.
    fn expect(&mut self, byte: u8) -> Option<()> {
        self.whitespace();
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// Takes `literal` (after whitespace).
    fn literal(&mut self, literal: &[u8]) -> Option<()> {
        self.whitespace();
        let end = self.at.checked_add(literal.len())?;
        (self.data.get(self.at..end) == Some(literal)).then(|| self.at = end)
    }

    fn null(&mut self) -> Option<()> {
        self.literal(b"null")
    }

    /// An object, calling `field` with each key once positioned at its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Some(());
        }
        loop {
            self.whitespace();
            let key = self.plain_string()?;
            self.expect(b':')?;
            field(self, key)?;
            self.whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `[]` or `[choice]`; more than one choice goes to serde_json.
    fn choices(&mut self) -> Option<Option<ChunkChoice>> {
        self.expect(b'[')?;
        self.whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Some(None);
        }
        let choice = self.choice()?;
        self.expect(b']')?;
        Some(Some(choice))
    }

    fn choice(&mut self) -> Option<ChunkChoice> {
        let mut choice = ChunkChoice {
            delta: None,
            finish_reason: None,
        };
        let mut seen = Seen::default();
        self.object(|scanner, key| match key {
            b"delta" => {
                seen.first(0)?;
                choice.delta = scanner.nullable(Self::delta)?;
                Some(())
            }
            b"finish_reason" => {
                seen.first(1)?;
                choice.finish_reason = scanner.nullable(Self::text)?;
                Some(())
            }
            _ => scanner.skip_scalar(),
        })?;
        Some(choice)
    }

    fn delta(&mut self) -> Option<ChunkDelta> {
        let mut delta = ChunkDelta { content: None };
        let mut seen = Seen::default();
        self.object(|scanner, key| match key {
            b"content" => {
                seen.first(0)?;
                delta.content = scanner.nullable(Self::text)?;
                Some(())
            }
            _ => scanner.skip_scalar(),
        })?;
        Some(delta)
    }

    /// `null` as `None`, or a value read by `read`.
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        self.whitespace();
        if self.peek() == Some(b'n') {
            self.null()?;
            Some(None)
        } else {
            read(self).map(Some)
        }
    }

    /// A value of a field nobody reads: a plain string, an integer, `true`,
    /// `false` or `null`. Anything else is left to serde_json.
    fn skip_scalar(&mut self) -> Option<()> {
        self.whitespace();
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'n' => self.null(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)`, ending where JSON lets a value end.
    fn integer(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                while let Some(b'0'..=b'9') = self.peek() {
                    self.at += 1;
                }
            }
            _ => return None,
        }
        // A fraction, an exponent or a leading zero: serde_json's to judge.
        match self.peek() {
            Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') => Some(()),
            _ => None,
        }
    }

    /// A string of printable ASCII without escapes (keys, ids, model names),
    /// borrowed.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let start = self.at + 1;
        let length = first_stop(self.data.get(start..)?, Stop::Plain)?;
        let end = start + length;
        if self.data[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        Some(&self.data[start..end])
    }

    /// A string as text: UTF-8, with the short escapes (`\n`, `\"`, ...)
    /// decoded. `\u` escapes are left to serde_json.
    fn text(&mut self) -> Option<String> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.at += 1;
        let rest = self.data.get(self.at..)?;
        let length = first_stop(rest, Stop::Text)?;
        if rest[length] == b'"' {
            // Nearly every token: no escape, so one allocation of its size.
            self.at += length + 1;
            return std::str::from_utf8(&rest[..length]).ok().map(str::to_owned);
        }
        let mut text = Vec::with_capacity(length + 1);
        let mut length = length;
        loop {
            text.extend_from_slice(self.data.get(self.at..self.at + length)?);
            self.at += length;
            match self.data[self.at] {
                b'"' => {
                    self.at += 1;
                    return String::from_utf8(text).ok();
                }
                b'\\' => {
                    let escaped = match self.data.get(self.at + 1)? {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return None,
                    };
                    text.push(escaped);
                    self.at += 2;
                }
                // A control character: JSON wants it escaped.
                _ => return None,
            }
            length = first_stop(self.data.get(self.at..)?, Stop::Text)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(content: Option<&str>, finish_reason: Option<&str>) -> Option<Option<ChunkChoice>> {
        Some(Some(ChunkChoice {
            delta: Some(ChunkDelta {
                content: content.map(str::to_owned),
            }),
            finish_reason: finish_reason.map(str::to_owned),
        }))
    }

    #[test]
    fn the_chunks_servers_send_are_read_on_the_fast_path() {
        let openai = br#"{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        assert_eq!(scan_first_choice(openai), choice(Some(" Hello"), None));
        let first = br#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}"#;
        assert_eq!(scan_first_choice(first), choice(Some(""), None));
        let last = br#"{"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(
            scan_first_choice(last),
            Some(Some(ChunkChoice {
                delta: Some(ChunkDelta { content: None }),
                finish_reason: Some("stop".into()),
            }))
        );
        let spaced = b"{ \"choices\" : [ { \"delta\" : { \"content\" : \"a\\n\\\"b\\\"\\t\xc3\xa9\" } } ] }\n";
        assert_eq!(
            scan_first_choice(spaced),
            choice(Some("a\n\"b\"\t\u{e9}"), None)
        );
        assert_eq!(scan_first_choice(br#"{"choices":[]}"#), Some(None));
        assert_eq!(scan_first_choice(b"{}"), Some(None));
    }

    #[test]
    fn a_string_scan_stops_at_the_first_byte_of_its_class_wherever_it_is() {
        let naive = |bytes: &[u8], stop: Stop| {
            bytes.iter().position(|&byte| {
                byte == b'"'
                    || byte == b'\\'
                    || byte < 0x20
                    || (stop == Stop::Plain && byte >= 0x80)
            })
        };
        // Every stopping byte, after every prefix length, with bytes around
        // it that sit next to the classes' edges.
        let neighbours = [
            b'!', b'#', b'[', b']', 0x1f, 0x20, 0x7f, 0x80, 0xff, 0x00, 0x01,
        ];
        for length in 0..20 {
            for &filler in &[b'a', 0x7f, 0x21, 0xc3] {
                for &stopper in &neighbours {
                    let mut bytes = vec![filler; length];
                    bytes.push(stopper);
                    bytes.extend_from_slice(&neighbours);
                    for stop in [Stop::Plain, Stop::Text] {
                        assert_eq!(first_stop(&bytes, stop), naive(&bytes, stop));
                        assert_eq!(
                            first_stop(&bytes[..length], stop),
                            naive(&bytes[..length], stop)
                        );
                    }
                }
            }
        }
        // And random bytes, most of them from near the edges.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let length = (state % 40) as usize;
            let bytes: Vec<u8> = (0..length)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let byte = (state >> 32) as u8;
                    if state & 1 == 0 {
                        neighbours[usize::from(byte) % neighbours.len()]
                    } else {
                        byte
                    }
                })
                .collect();
            for stop in [Stop::Plain, Stop::Text] {
                assert_eq!(first_stop(&bytes, stop), naive(&bytes, stop), "{bytes:?}");
            }
        }
    }

    #[test]
    fn other_shapes_are_left_to_serde_json() {
        for data in [
            // usage or error set
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"error":{"message":"overloaded"}}"#,
            // what it does not read itself
            r#"{"choices":[{"delta":{"content":"\u00e9"}}]}"#,
            r#"{"cho\u0069ces":[]}"#,
            r#"{"choices":[{"delta":{"content":"a"},"content_filter_results":{}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
            r#"{"created":1.5,"choices":[]}"#,
            r#"{"model":"modèle","choices":[]}"#,
            // what serde_json refuses
            r#"{"choices":[],"choices":[]}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]} x"#,
            r#"{"choices":[{"delta":{"content":"a"}},]}"#,
            r#"{"created":01,"choices":[]}"#,
            "{\"choices\":[{\"delta\":{\"content\":\"a\u{1}\"}}]}",
            r#"{"choices":null}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]"#,
            r#"["choices"]"#,
        ] {
            assert_eq!(scan_first_choice(data.as_bytes()), None, "{data}");
        }
        assert_eq!(
            scan_first_choice(b"{\"choices\":[{\"delta\":{\"content\":\"\xff\"}}]}"),
            None
        );
    }
}

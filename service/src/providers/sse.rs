//! Reading an upstream's server-sent events: only their `data`, which is
//! all a chat completion stream carries. Events are parsed in place in one
//! buffer that the whole stream reuses, so reading a chunk allocates nothing
//! (a general SSE reader allocates its event, data, id and type per event).
//!
//! As the WHATWG rules for `text/event-stream` say: lines end with CRLF, LF
//! or CR; a blank line ends an event; a line starting with `:` is a
//! comment; `data` lines of one event are joined with LF, each with one
//! leading space removed; other fields (`event`, `id`, `retry`) are read and
//! ignored; an event without data is no event; a leading byte order mark is
//! skipped; data not ended by a blank line when the stream closes is
//! dropped.

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};

const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// The data of each event of `body`, a stream of byte chunks cut anywhere.
pub struct SseData<S> {
    body: S,
    /// Received and not yet read.
    buffer: BytesMut,
    /// The data of the event being read (and, once returned, of the last).
    data: Vec<u8>,
    /// A `data` line was read for the event being read.
    has_data: bool,
    /// `data` was handed out: the next read starts a new event.
    returned: bool,
    /// Whether the byte order mark was looked for.
    started: bool,
    /// The body ended.
    ended: bool,
}

impl<S, B, E> SseData<S>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    pub fn new(body: S) -> Self {
        Self {
            body,
            buffer: BytesMut::new(),
            data: Vec::new(),
            has_data: false,
            returned: false,
            started: false,
            ended: false,
        }
    }

    /// The next event's data; `None` once the body ended, the body's
    /// error when it failed.
    pub async fn next(&mut self) -> Option<Result<&[u8], E>> {
        loop {
            if self.read_event() {
                return Some(Ok(&self.data));
            }
            if self.ended {
                return None;
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(bytes.as_ref()),
                Some(Err(error)) => return Some(Err(error)),
                None => self.ended = true,
            }
        }
    }

    /// Reads the buffer's complete lines up to the end of an event with
    /// data (true) or of what is there (false).
    fn read_event(&mut self) -> bool {
        if !self.started {
            if self.buffer.len() < BYTE_ORDER_MARK.len()
                && BYTE_ORDER_MARK.starts_with(&self.buffer)
                && !self.ended
            {
                return false;
            }
            if self.buffer.starts_with(BYTE_ORDER_MARK) {
                self.buffer.advance(BYTE_ORDER_MARK.len());
            }
            self.started = true;
        }
        if self.returned {
            self.data.clear();
            self.has_data = false;
            self.returned = false;
        }
        let mut read = 0;
        let mut dispatched = false;
        while let Some((length, terminator)) = line_at(&self.buffer[read..], self.ended) {
            let line = &self.buffer[read..read + length];
            read += length + terminator;
            if line.is_empty() {
                if self.has_data {
                    dispatched = true;
                    break;
                }
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (field, value) = match memchr::memchr(b':', line) {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &[][..]),
            };
            if field == b"data" {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
        self.buffer.advance(read);
        // Cleared when the next read starts: the caller borrows it until then.
        self.returned = dispatched;
        dispatched
    }
}

/// The length of the line at the start of `buffer` and of its terminator,
/// when the line is complete. A CR at the end of what arrived may be the
/// first half of a CRLF: the line is complete only once the next byte (or
/// the end of the body) says so.
fn line_at(buffer: &[u8], ended: bool) -> Option<(usize, usize)> {
    let end = memchr::memchr2(b'\n', b'\r', buffer)?;
    match (buffer[end], buffer.get(end + 1)) {
        (b'\r', Some(b'\n')) => Some((end, 2)),
        (b'\r', None) if !ended => None,
        _ => Some((end, 1)),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Every event's data, read from `pieces` as the body's chunks.
    async fn read(pieces: &[&[u8]]) -> Vec<String> {
        let body = futures::stream::iter(
            pieces
                .iter()
                .map(|piece| Ok::<_, Infallible>(piece.to_vec()))
                .collect::<Vec<_>>(),
        );
        let mut events = SseData::new(body);
        let mut data = Vec::new();
        while let Some(event) = events.next().await {
            data.push(String::from_utf8(event.unwrap().to_vec()).unwrap());
        }
        data
    }

    /// A stream with every rule in it: a byte order mark, comments, fields
    /// without a space or a value, other fields, all three line ends, data
    /// over several lines, an event without data, and data left unended.
    const STREAM: &[u8] = b"\xEF\xBB\xBF: hi\n\ndata: {\"a\":1}\n\nevent: x\r\nid: 7\r\ndata:two\r\ndata\r\ndata:  three\r\n\r\nretry: 5\n\n:only a comment\rdata: cr\r\rdata: [DONE]\n\ndata: never ended\n";

    const EXPECTED: [&str; 4] = ["{\"a\":1}", "two\n\n three", "cr", "[DONE]"];

    #[tokio::test]
    async fn events_are_read_by_the_rules_of_text_event_stream() {
        assert_eq!(read(&[STREAM]).await, EXPECTED);
    }

    #[tokio::test]
    async fn the_same_events_come_from_every_split_of_the_stream() {
        for first in 0..=STREAM.len() {
            for second in first..=STREAM.len() {
                let pieces = [&STREAM[..first], &STREAM[first..second], &STREAM[second..]];
                assert_eq!(
                    read(&pieces).await,
                    EXPECTED,
                    "split at {first} and {second}"
                );
            }
        }
    }

    #[tokio::test]
    async fn byte_by_byte_is_the_same() {
        let pieces: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(read(&pieces).await, EXPECTED);
    }

    #[tokio::test]
    async fn a_cr_at_the_end_of_the_body_ends_its_line_and_a_crlf_is_one_line_end() {
        assert_eq!(read(&[b"data: a\r", b"\n", b"\r\n"]).await, ["a"]);
        assert_eq!(read(&[b"data: a\r\r"]).await, ["a"]);
        assert_eq!(read(&[b"data: a\r", b"\r"]).await, ["a"]);
        assert_eq!(read(&[b"data: a\n\r"]).await, ["a"]);
    }

    #[tokio::test]
    async fn a_failing_body_reports_its_error_after_the_events_before_it() {
        let body = futures::stream::iter(vec![Ok(b"data: a\n\n".to_vec()), Err("gone")]);
        let mut events = SseData::new(body);
        assert_eq!(events.next().await.unwrap().unwrap(), b"a");
        assert_eq!(events.next().await.unwrap().unwrap_err(), "gone");
    }
}

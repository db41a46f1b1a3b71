//! SSE frames of a reply. Each event is serialized once into a `Bytes`
//! frame that every subscriber shares.
//!
//! A frame is `id: N`, `event: NAME` and a single `data:` line of JSON.
//! JSON escapes every control character (CR and LF included), so whatever the
//! model writes, the data cannot end its line or frame early.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use super::events::ReplyEvent;
use crate::ledger::Credits;
use crate::ledger::decimal_credits;

/// A comment that keeps idle connections (and proxies) open.
pub const PING: &[u8] = b": ping\n\n";

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelData<'a> {
    pub model: &'a str,
    pub route: &'a str,
    pub fallback_applied: bool,
    /// The caller could not afford the route's first target; the route let
    /// the reply fall to the strongest one they could.
    pub downgraded: bool,
}

/// A chunk's data. Its frames are written by [`chunk_frame`], which must
/// write exactly what serializing this writes (tests and the `sse_frames`
/// fuzz target compare the two).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkData<'a> {
    pub text: &'a str,
    /// Tokens in this chunk (one per provider delta).
    pub tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageData {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompleteData<'a> {
    pub usage: UsageData,
    pub message_id: &'a str,
    /// Absent when the charge could not be settled yet (the hold's lease
    /// settles it later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsData>,
}

/// What the reply cost and the account's available credits after it.
#[derive(Debug, Serialize)]
pub struct CreditsData {
    #[serde(with = "decimal_credits")]
    pub charged: Credits,
    #[serde(with = "decimal_credits")]
    pub remaining: Credits,
}

#[derive(Debug, Serialize)]
pub struct ErrorData<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

/// One SSE frame: `id`, `event` and the JSON `data` of one event.
pub fn frame<T: Serialize>(id: u64, event: &str, data: &T) -> Bytes {
    encode(Some(id), event, data)
}

/// The frame of event `id` of a reply on `route`.
pub fn reply_frame(arena: &mut FrameArena, id: u64, event: &ReplyEvent, route: &str) -> Bytes {
    match event {
        ReplyEvent::Model {
            model,
            fallback_applied,
            downgraded,
        } => frame(
            id,
            "model",
            &ModelData {
                model,
                route,
                fallback_applied: *fallback_applied,
                downgraded: *downgraded,
            },
        ),
        ReplyEvent::Chunk { text, total_tokens } => chunk_frame(arena, id, text, *total_tokens),
        ReplyEvent::Complete {
            usage,
            message_id,
            charge,
            ..
        } => frame(
            id,
            "complete",
            &CompleteData {
                usage: UsageData {
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                },
                message_id: &message_id.to_hex(),
                credits: charge.map(|charge| CreditsData {
                    charged: charge.charged,
                    remaining: charge.remaining,
                }),
            },
        ),
        ReplyEvent::Error { code, message } => frame(id, "error", &ErrorData { code, message }),
    }
}

/// An SSE frame without an `id`: an event about the stream itself (an
/// observer's `observe`, a console's list), which leaves the client's last
/// event id where the reply's events put it.
pub fn unnumbered<T: Serialize>(event: &str, data: &T) -> Bytes {
    encode(None, event, data)
}

/// Room for a chunk's frame with a few words of text: a chunk of a word or
/// two fits 64 bytes, a longer one made the buffer grow.
const FRAME_CAPACITY: usize = 160;

fn encode<T: Serialize>(id: Option<u64>, event: &str, data: &T) -> Bytes {
    let mut buffer = BytesMut::with_capacity(FRAME_CAPACITY);
    put_header(&mut buffer, id, event);
    put_json(&mut buffer, event, data);
    buffer.put_slice(b"\n\n");
    buffer.freeze()
}

/// `data` as JSON at the end of `buffer`. Serializing these plain values
/// into memory cannot fail; a failure would leave a truncated frame, so say
/// so.
fn put_json<T: Serialize + ?Sized>(buffer: &mut BytesMut, event: &str, data: &T) {
    if let Err(error) = serde_json::to_writer(buffer.writer(), data) {
        tracing::error!(%error, event, "serializing an SSE event failed");
    }
}

/// Where a reply's chunk frames are written: each frame is split off one
/// shared buffer, so a reply's frames cost a few allocations in all instead
/// of two each (a buffer and the shared header `freeze` adds). The replay
/// log keeps every frame until the reply ends, so the frames are freed no
/// later than before; what the reply holds more is the unused end of its
/// newest buffer. It starts small, for replies held open with few chunks,
/// and doubles up to [`FRAME_ARENA_MAX`].
#[derive(Debug, Default)]
pub struct FrameArena {
    buffer: BytesMut,
    next_capacity: usize,
}

/// The largest buffer a reply's frames are split off: a page.
const FRAME_ARENA_MAX: usize = 4096;

impl FrameArena {
    /// The buffer, with room for `at_least` more bytes (a frame that turns
    /// out larger still fits: the buffer grows, and frames split off before
    /// keep their bytes).
    fn room(&mut self, at_least: usize) -> &mut BytesMut {
        if self.buffer.capacity() - self.buffer.len() < at_least {
            let capacity = self.next_capacity.max(FRAME_CAPACITY).max(at_least);
            self.next_capacity = (capacity * 2).min(FRAME_ARENA_MAX);
            self.buffer = BytesMut::with_capacity(capacity);
        }
        &mut self.buffer
    }

    /// The frame written since the last one.
    fn take(&mut self) -> Bytes {
        self.buffer.split().freeze()
    }
}

/// The frame of a chunk event: [`ChunkData`] with one token, its fields
/// written by hand around serde_json's encoding of the text. Chunks are
/// nearly all of a reply's frames, and serde's map machinery cost more than
/// the text in them.
pub fn chunk_frame(arena: &mut FrameArena, id: u64, text: &str, total_tokens: u32) -> Bytes {
    // The header, the keys and two numbers of up to 20 digits: under 128.
    let buffer = arena.room(text.len() + 128);
    put_header(buffer, Some(id), "chunk");
    buffer.put_slice(b"{\"text\":");
    put_json(buffer, "chunk", text);
    buffer.put_slice(b",\"tokens\":1,\"totalTokens\":");
    buffer.put_slice(itoa::Buffer::new().format(total_tokens).as_bytes());
    buffer.put_slice(b"}\n\n");
    arena.take()
}

/// The lines before `data: `. Written by hand: `write!`'s formatting
/// machinery cost a chunk's frame more instructions than its JSON.
fn put_header(buffer: &mut BytesMut, id: Option<u64>, event: &str) {
    if let Some(id) = id {
        buffer.put_slice(b"id: ");
        buffer.put_slice(itoa::Buffer::new().format(id).as_bytes());
        buffer.put_u8(b'\n');
    }
    buffer.put_slice(b"event: ");
    buffer.put_slice(event.as_bytes());
    buffer.put_slice(b"\ndata: ");
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    /// Text that broke the old server: line breaks of every kind, escaped
    /// newlines, quotes, an SSE field name, emoji and CJK.
    const TORTURE: &str = "line\nnext\r\nwin\rmac \\n not a newline \"quoted\" data: fake\n\nevent: x\nid: 9\n😀👍🏽 中文字 end";

    /// Every split of the text into two deltas at a char boundary, streamed as
    /// frames cut at every byte position, reassembles to exactly the text.
    #[tokio::test]
    async fn torture_text_survives_every_split() {
        let boundaries: Vec<usize> = (0..=TORTURE.len())
            .filter(|&i| TORTURE.is_char_boundary(i))
            .collect();
        for &split in &boundaries {
            let (first, second) = TORTURE.split_at(split);
            let mut wire = Vec::new();
            for (index, delta) in [first, second].into_iter().enumerate() {
                let data = ChunkData {
                    text: delta,
                    tokens: 1,
                    total_tokens: 1,
                };
                wire.extend_from_slice(&frame(index as u64 + 1, "chunk", &data));
                wire.extend_from_slice(PING);
            }
            // Deliver the wire bytes cut at every byte position (splitting
            // UTF-8 sequences and CRLF pairs too).
            for cut in 0..=wire.len() {
                let pieces = vec![
                    Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(&wire[..cut])),
                    Ok(Bytes::copy_from_slice(&wire[cut..])),
                ];
                let events: Vec<_> = futures::stream::iter(pieces)
                    .eventsource()
                    .collect::<Vec<_>>()
                    .await;
                let mut text = String::new();
                let mut ids = Vec::new();
                for event in events {
                    let event = event.unwrap();
                    assert_eq!(event.event, "chunk");
                    ids.push(event.id);
                    let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
                    text.push_str(data["text"].as_str().unwrap());
                }
                assert_eq!(text, TORTURE, "delta split at {split}, wire cut at {cut}");
                assert_eq!(ids, ["1", "2"]);
            }
        }
    }

    /// The hand-written chunk frame is the serialized [`ChunkData`], byte for
    /// byte: every byte value alone and in text, and random text.
    #[test]
    fn a_chunk_frame_is_its_data_serialized() {
        let serialized = |id: u64, text: &str, total_tokens: u32| {
            let data = ChunkData {
                text,
                tokens: 1,
                total_tokens,
            };
            frame(id, "chunk", &data)
        };
        let mut texts: Vec<String> = (0..=127_u8)
            .map(|byte| char::from(byte).to_string())
            .chain(["".into(), TORTURE.into(), "é\u{7f}\u{80}\u{ffff}".into()])
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2_000 {
            // xorshift: bytes weighted towards ASCII and control characters.
            let length = (state % 40) as usize;
            let text: String = (0..length)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    char::from_u32((state % 300) as u32).unwrap_or('x')
                })
                .collect();
            texts.push(text);
        }
        // One arena for all, as a reply writes them: a frame split off
        // keeps its bytes while later ones are written.
        let numbers = |index: usize| (index as u64 * 7919, index as u32 * 104_729);
        let mut arena = FrameArena::default();
        let written: Vec<Bytes> = (0..texts.len())
            .map(|index| {
                let (id, total) = numbers(index);
                chunk_frame(&mut arena, id, &texts[index], total)
            })
            .collect();
        for (index, text) in texts.iter().enumerate() {
            let (id, total) = numbers(index);
            assert_eq!(written[index], serialized(id, text, total), "{text:?}");
        }
        assert_eq!(
            chunk_frame(&mut arena, u64::MAX, "a", u32::MAX),
            serialized(u64::MAX, "a", u32::MAX)
        );
    }

    /// One frame delivered byte by byte is still one event with the exact text.
    #[tokio::test]
    async fn a_frame_split_at_every_byte_is_one_event() {
        let data = ChunkData {
            text: TORTURE,
            tokens: 1,
            total_tokens: 1,
        };
        let wire = frame(7, "chunk", &data);
        let pieces: Vec<_> = wire
            .iter()
            .map(|byte| Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(&[*byte])))
            .collect();
        let events: Vec<_> = futures::stream::iter(pieces)
            .eventsource()
            .collect::<Vec<_>>()
            .await;
        assert_eq!(events.len(), 1);
        let event = events.into_iter().next().unwrap().unwrap();
        assert_eq!(event.id, "7");
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["text"], TORTURE);
    }
}

//! The turns of a conversation, and a session's history of them as the
//! store's cache of session tails holds it and every prompt shares it.
//!
//! A history is sent again with every reply of its session. Held as one
//! turn per allocation, each reply cloned and dropped every turn's handle
//! (a locked count change, most often a cache miss) and copied each turn's
//! text out of its own allocation into the upstream request: together
//! about 7% of the service's CPU at 100 clients with full windows. A
//! [`History`] keeps its turns in segments of [`SEGMENT_TURNS`], each with
//! its turns already encoded as OpenAI chat messages side by side, so a
//! reply shares a few segments and copies their encodings whole.

use std::sync::Arc;

use parley_crds::{TOKENS_PER_TURN, estimate_tokens_of_bytes};

use crate::shared_text::SharedText;

/// Who said a turn of the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One turn of the conversation sent to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    /// Shared with the stored message it was read from: a prompt copies no text.
    pub text: SharedText,
}

impl ChatTurn {
    pub fn new(role: Role, text: impl Into<SharedText>) -> Self {
        Self {
            role,
            text: text.into(),
        }
    }
}

/// Estimated tokens of one turn: its text and [`TOKENS_PER_TURN`]. From the
/// text's length alone, which a window of turns is measured by without
/// reading each one's text.
pub fn estimate_turn_tokens(turn: &ChatTurn) -> u32 {
    estimate_tokens_of_bytes(turn.text.len()).saturating_add(TOKENS_PER_TURN)
}

/// Estimated input tokens of a conversation.
pub fn estimate_input_tokens<'a>(turns: impl IntoIterator<Item = &'a ChatTurn>) -> u32 {
    turns
        .into_iter()
        .map(estimate_turn_tokens)
        .fold(0, u32::saturating_add)
}

/// `turn` as an OpenAI chat message object, `{"role":…,"content":…}`, in
/// three parts: its text goes in as the JSON string it was encoded to once
/// ([`SharedText::json`]).
pub fn chat_message(turn: &ChatTurn) -> [&str; 3] {
    [role_field(turn.role), turn.text.json(), "}"]
}

/// The message object's opening, up to its content.
fn role_field(role: Role) -> &'static str {
    match role {
        Role::System => r#"{"role":"system","content":"#,
        Role::User => r#"{"role":"user","content":"#,
        Role::Assistant => r#"{"role":"assistant","content":"#,
    }
}

/// Turns per segment: a reply shares a full window (about a hundred turns)
/// in a handful of segments, and an append copies at most this many
/// handles and their encodings when a prompt still shares the last one.
const SEGMENT_TURNS: usize = 16;

/// Counted per turn besides its text and encodings: its handle, its offset
/// and the allocator's share.
const TURN_OVERHEAD_BYTES: usize = 64;

/// Turns, oldest first, shared in segments: a clone shares them, and a
/// change copies at most the one segment it touches while a clone holds it.
#[derive(Clone, Debug, Default)]
pub struct History {
    segments: Vec<Arc<Segment>>,
    /// Turns at the start of the first segment that are not in the history.
    skipped: usize,
    len: usize,
}

/// How much of a window a turn takes, kept beside the turns so that
/// measuring a window reads a few small arrays rather than every turn's
/// handle (which were most of a reply's cache misses in its session's read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TurnSize {
    /// Turns: 1 for a turn, the count for a sum.
    pub turns: u64,
    /// The text's bytes (UTF-8).
    pub text_bytes: u64,
    /// [`estimate_turn_tokens`].
    pub tokens: u64,
}

impl TurnSize {
    fn of(turn: &ChatTurn) -> Self {
        Self {
            turns: 1,
            text_bytes: turn.text.len() as u64,
            tokens: u64::from(estimate_turn_tokens(turn)),
        }
    }

    fn plus(self, other: Self) -> Self {
        Self {
            turns: self.turns + other.turns,
            text_bytes: self.text_bytes + other.text_bytes,
            tokens: self.tokens + other.tokens,
        }
    }

    fn minus(self, other: Self) -> Self {
        Self {
            turns: self.turns - other.turns,
            text_bytes: self.text_bytes - other.text_bytes,
            tokens: self.tokens - other.tokens,
        }
    }
}

#[derive(Debug, Default)]
struct Segment {
    turns: Vec<ChatTurn>,
    sizes: Vec<TurnSize>,
    /// The sum of `sizes`.
    size: TurnSize,
    /// Each turn as a comma and its OpenAI chat message object, while the
    /// segment has room; then in `sealed`.
    messages: String,
    /// A full segment's messages, then the texts of its turns that
    /// escaping changed: one buffer that its turns' texts share.
    sealed: Option<Arc<str>>,
    /// Where the messages end in `sealed`.
    sealed_messages: usize,
    /// Where each turn's comma is in the messages.
    starts: Vec<u32>,
    /// What the turns and their encodings hold, as [`History::held_bytes`]
    /// counts it.
    bytes: usize,
}

/// A copy with room for the two turns of a reply, for a change while a
/// clone of the history holds this one (which is never full: a full
/// segment changes no more). A segment shared by a reply's prompt is copied
/// at that reply's question, so more room would be copied for nothing.
impl Clone for Segment {
    fn clone(&self) -> Self {
        let per_turn = self.messages.len() / self.turns.len().max(1);
        let mut copy =
            Self::with_capacity(self.turns.len() + 2, self.messages.len() + 2 * per_turn);
        copy.turns.extend_from_slice(&self.turns);
        copy.sizes.extend_from_slice(&self.sizes);
        copy.size = self.size;
        copy.messages.push_str(&self.messages);
        copy.sealed.clone_from(&self.sealed);
        copy.sealed_messages = self.sealed_messages;
        copy.starts.extend_from_slice(&self.starts);
        copy.bytes = self.bytes;
        copy
    }
}

impl Segment {
    fn with_capacity(turns: usize, message_bytes: usize) -> Self {
        let turns = turns.min(SEGMENT_TURNS);
        Self {
            turns: Vec::with_capacity(turns),
            sizes: Vec::with_capacity(turns),
            messages: String::with_capacity(message_bytes),
            starts: Vec::with_capacity(turns),
            ..Self::default()
        }
    }

    fn is_full(&self) -> bool {
        self.turns.len() == SEGMENT_TURNS
    }

    fn messages(&self) -> &[u8] {
        match &self.sealed {
            Some(buffer) => &buffer.as_bytes()[..self.sealed_messages],
            None => self.messages.as_bytes(),
        }
    }

    /// Appends `turn` to a segment with room.
    fn push(&mut self, turn: ChatTurn) {
        let start = self.messages.len();
        self.starts.push(start as u32);
        self.messages.push(',');
        self.messages.extend(chat_message(&turn));
        self.bytes += turn.text.held_bytes() + (self.messages.len() - start) + TURN_OVERHEAD_BYTES;
        let size = TurnSize::of(&turn);
        self.size = self.size.plus(size);
        self.sizes.push(size);
        self.turns.push(turn);
    }

    /// Moves the messages, and the texts that escaping changed, into one
    /// buffer that the turns' texts then share: a full segment holds each
    /// text once (twice when escaped), not once more in each turn's own
    /// allocation.
    fn seal(&mut self) {
        let escaped = self.turns.iter().filter(|turn| turn.text.is_escaped());
        let escaped_bytes: usize = escaped.map(|turn| turn.text.len()).sum();
        let mut buffer = String::with_capacity(self.messages.len() + escaped_bytes);
        buffer.push_str(&self.messages);
        let spans: Vec<_> = self
            .turns
            .iter()
            .zip(&self.starts)
            .map(|(turn, start)| {
                let json_start = *start as usize + 1 + role_field(turn.role).len();
                let json = json_start..json_start + turn.text.json().len();
                let text = if turn.text.is_escaped() {
                    let at = buffer.len();
                    buffer.push_str(&turn.text);
                    at..buffer.len()
                } else {
                    json.start + 1..json.end - 1
                };
                (json, text)
            })
            .collect();
        let buffer: Arc<str> = buffer.into();
        for (turn, (json, text)) in self.turns.iter_mut().zip(spans) {
            // Always within the buffer, as written above.
            if let Some(shared) = SharedText::within(&buffer, json, text) {
                turn.text = shared;
            }
        }
        self.sealed_messages = self.messages.len();
        self.messages = String::new();
        self.bytes = buffer.len() + self.turns.len() * TURN_OVERHEAD_BYTES;
        self.sealed = Some(buffer);
    }
}

impl History {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The turns, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &ChatTurn> + Clone + '_ {
        let skipped = self.skipped;
        self.segments
            .iter()
            .enumerate()
            .flat_map(move |(index, segment)| {
                let from = if index == 0 { skipped } else { 0 };
                &segment.turns[from..]
            })
    }

    /// The turns from the one at `index` on, oldest first, found by the
    /// segments' lengths rather than by stepping through the turns before.
    pub fn iter_from(&self, index: usize) -> impl Iterator<Item = &ChatTurn> + '_ {
        let mut from = self.skipped + index;
        let first = self
            .segments
            .iter()
            .position(|segment| {
                let within = from < segment.turns.len();
                if !within {
                    from -= segment.turns.len();
                }
                within
            })
            .unwrap_or(self.segments.len());
        self.segments[first..]
            .iter()
            .enumerate()
            .flat_map(move |(index, segment)| {
                let from = if index == 0 { from } else { 0 };
                &segment.turns[from..]
            })
    }

    /// How many of the newest turns fit: the most, newest first, whose sum
    /// `fits` accepts (`fits` must accept any sum within one it accepts),
    /// and their sum. Whole segments are measured by their sums.
    pub fn newest_fitting(&self, fits: impl Fn(TurnSize) -> bool) -> (usize, TurnSize) {
        let mut taken = TurnSize::default();
        for (index, segment) in self.segments.iter().enumerate().rev() {
            let from = if index == 0 { self.skipped } else { 0 };
            let kept = if from == 0 {
                segment.size
            } else {
                let skipped = segment.sizes[..from]
                    .iter()
                    .fold(TurnSize::default(), |sum, size| sum.plus(*size));
                segment.size.minus(skipped)
            };
            let with_segment = taken.plus(kept);
            if fits(with_segment) {
                taken = with_segment;
                continue;
            }
            for size in segment.sizes[from..].iter().rev() {
                let with_turn = taken.plus(*size);
                if !fits(with_turn) {
                    break;
                }
                taken = with_turn;
            }
            break;
        }
        (taken.turns as usize, taken)
    }

    /// The turns as OpenAI chat message objects, each after a comma, in
    /// order: a few slices, each of many turns.
    pub fn chat_messages(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let skipped = self.skipped;
        self.segments
            .iter()
            .enumerate()
            .map(move |(index, segment)| {
                let from = if index == 0 {
                    segment
                        .starts
                        .get(skipped)
                        .map_or(0, |start| *start as usize)
                } else {
                    0
                };
                &segment.messages()[from..]
            })
    }

    /// The history without its `count` oldest turns, sharing the rest.
    pub fn without_oldest(&self, count: usize) -> Self {
        let mut newer = Self {
            segments: Vec::with_capacity(self.segments.len()),
            skipped: self.skipped,
            len: self.len,
        };
        newer.segments.extend(self.segments.iter().cloned());
        newer.drop_oldest(count);
        newer
    }

    /// Appends `turn`, in place when no clone shares the last segment, and
    /// seals the segment it fills (see [`Segment::seal`]): for a history
    /// that is kept, as the store's cache of session tails keeps each.
    pub fn push(&mut self, turn: ChatTurn) {
        self.append(turn, true);
    }

    fn append(&mut self, turn: ChatTurn, seal: bool) {
        match self.segments.last_mut() {
            Some(last) if !last.is_full() => {
                let last = Arc::make_mut(last);
                last.push(turn);
                if seal && last.is_full() {
                    last.seal();
                }
            }
            last => {
                // After a full segment, room for as much as it holds; a
                // session's first grows as it goes (most sessions are short).
                let mut segment = match last {
                    Some(full) => Segment::with_capacity(SEGMENT_TURNS, full.messages().len()),
                    None => Segment::default(),
                };
                segment.push(turn);
                self.segments.push(Arc::new(segment));
            }
        }
        self.len += 1;
    }

    /// Drops the `count` oldest turns (all of them when there are fewer),
    /// and the segments left without any.
    pub fn drop_oldest(&mut self, count: usize) {
        let count = count.min(self.len);
        self.len -= count;
        self.skipped += count;
        let mut emptied = 0;
        for segment in &self.segments {
            if segment.turns.len() > self.skipped {
                break;
            }
            self.skipped -= segment.turns.len();
            emptied += 1;
        }
        self.segments.drain(..emptied);
    }

    /// Keeps the `count` oldest turns.
    pub fn truncate(&mut self, count: usize) {
        if count < self.len {
            let mut kept = Self::default();
            kept.extend(self.iter().take(count).cloned());
            *self = kept;
        }
    }

    /// What the segments hold for the turns' texts and encodings, counted
    /// whole (a segment's dropped turns are held until all of its are).
    pub fn held_bytes(&self) -> usize {
        self.segments.iter().map(|segment| segment.bytes).sum()
    }
}

/// A history built whole for one reply's prompts (read from MongoDB, or
/// sent by the caller), which is dropped after them: its segments are not
/// sealed, which would copy it once more for nothing.
impl FromIterator<ChatTurn> for History {
    fn from_iter<T: IntoIterator<Item = ChatTurn>>(turns: T) -> Self {
        let mut history = Self::default();
        for turn in turns {
            history.append(turn, false);
        }
        history
    }
}

impl From<Vec<ChatTurn>> for History {
    fn from(turns: Vec<ChatTurn>) -> Self {
        turns.into_iter().collect()
    }
}

/// Appends as [`History::push`] does.
impl Extend<ChatTurn> for History {
    fn extend<T: IntoIterator<Item = ChatTurn>>(&mut self, turns: T) {
        for turn in turns {
            self.push(turn);
        }
    }
}

/// Histories are equal when their turns are, however they are segmented.
impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for History {}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn turn(index: usize) -> ChatTurn {
        let role = if index.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        };
        ChatTurn::new(role, format!("turn {index}: \"quoted\"\n"))
    }

    /// The encodings as one list of messages, as a request carries them.
    fn encoded(history: &History) -> Vec<u8> {
        let mut list: Vec<u8> = history.chat_messages().flatten().copied().collect();
        list.push(b']');
        list[0] = b'[';
        list
    }

    /// Whatever is appended, dropped or cut, and whoever shares the
    /// segments, a history holds exactly its turns and their encodings;
    /// a clone taken before a change keeps what it had.
    #[test]
    fn a_history_holds_its_turns_through_any_changes() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut history = History::default();
        let mut reference: Vec<ChatTurn> = Vec::new();
        let mut next = 0;
        let mut snapshots: Vec<(History, Vec<ChatTurn>)> = Vec::new();
        for step in 0..2_000 {
            match rng.random_range(0..10) {
                0..=5 => {
                    let count = rng.random_range(1..4);
                    let turns: Vec<ChatTurn> = (next..next + count).map(turn).collect();
                    next += count;
                    history.extend(turns.iter().cloned());
                    reference.extend(turns);
                }
                6 | 7 => {
                    let count = rng.random_range(0..6);
                    history.drop_oldest(count);
                    reference.drain(..count.min(reference.len()));
                }
                8 => {
                    let count = rng.random_range(0..=reference.len());
                    history.truncate(count);
                    reference.truncate(count);
                }
                _ => snapshots.push((history.clone(), reference.clone())),
            }
            let (max_turns, max_tokens) = (rng.random_range(0..40), rng.random_range(0..400));
            let fits = |size: TurnSize| size.turns <= max_turns && size.tokens <= max_tokens;
            let mut expected = TurnSize::default();
            for turn in reference.iter().rev() {
                let with_turn = expected.plus(TurnSize::of(turn));
                if !fits(with_turn) {
                    break;
                }
                expected = with_turn;
            }
            assert_eq!(
                history.newest_fitting(fits),
                (expected.turns as usize, expected),
                "step {step}"
            );
            assert_eq!(history.len(), reference.len(), "step {step}");
            assert!(history.iter().eq(reference.iter()), "step {step}");
            assert!(
                history.iter().rev().eq(reference.iter().rev()),
                "step {step}"
            );
            let from = rng.random_range(0..=reference.len() + 1);
            assert!(
                history.iter_from(from).eq(reference.iter().skip(from)),
                "step {step}"
            );
            if !reference.is_empty() {
                let mut expected = Vec::new();
                for turn in &reference {
                    expected.push(b',');
                    expected.extend(chat_message(turn).concat().into_bytes());
                }
                expected.push(b']');
                expected[0] = b'[';
                assert_eq!(encoded(&history), expected, "step {step}");
            }
        }
        for (snapshot, turns) in snapshots {
            assert!(snapshot.iter().eq(turns.iter()));
        }
    }

    /// The encodings are OpenAI chat messages with the texts intact.
    #[test]
    fn the_encodings_are_the_turns_as_chat_messages() {
        let history: History = (0..40).map(turn).collect();
        let history = history.without_oldest(17);
        let sent: serde_json::Value = serde_json::from_slice(&encoded(&history)).unwrap();
        let expected: Vec<serde_json::Value> = (17..40)
            .map(|index| {
                let role = if index % 2 == 0 { "user" } else { "assistant" };
                serde_json::json!({"role": role, "content": turn(index).text.as_str()})
            })
            .collect();
        assert_eq!(sent, serde_json::Value::Array(expected));
    }

    /// A history without its oldest turns shares the segments it keeps, and
    /// an append copies only the last one while a clone holds it.
    #[test]
    fn clones_share_segments_and_an_append_copies_at_most_one() {
        let mut history: History = (0..40).map(turn).collect();
        let prompt = history.without_oldest(20);
        assert_eq!(prompt.segments.len(), 2);
        assert!(Arc::ptr_eq(&prompt.segments[0], &history.segments[1]));
        history.push(turn(40));
        assert!(Arc::ptr_eq(&prompt.segments[0], &history.segments[1]));
        assert!(!Arc::ptr_eq(&prompt.segments[1], &history.segments[2]));
        assert_eq!(prompt.len(), 20);
        assert_eq!(history.len(), 41);
        // Dropping whole segments frees them from the history.
        history.drop_oldest(32);
        assert_eq!(history.segments.len(), 1);
        assert_eq!(history.iter().next(), Some(&turn(32)));
    }

    /// What is held counts each text, its encodings and a turn's overhead.
    #[test]
    fn held_bytes_count_texts_encodings_and_overhead() {
        let one: History = std::iter::once(turn(0)).collect();
        let text = turn(0).text;
        let mut message = Vec::new();
        message.extend(chat_message(&turn(0)).concat().into_bytes());
        assert_eq!(
            one.held_bytes(),
            text.held_bytes() + 1 + message.len() + TURN_OVERHEAD_BYTES
        );
        let two: History = (0..2).map(|_| turn(0)).collect();
        assert_eq!(two.held_bytes(), 2 * one.held_bytes());
    }

    /// A full segment of a kept history holds its messages and its escaped
    /// texts in one buffer that its turns' texts share, and counts each
    /// text once.
    #[test]
    fn a_full_segment_shares_one_buffer_with_its_texts() {
        let turns: Vec<ChatTurn> = (0..SEGMENT_TURNS).map(turn).collect();
        let mut open = History::default();
        open.extend(turns[..SEGMENT_TURNS - 1].iter().cloned());
        let mut full = History::default();
        full.extend(turns.iter().cloned());
        assert!(open.segments[0].sealed.is_none());
        // Built whole for one prompt, a history is not sealed.
        let unsealed: History = turns.iter().cloned().collect();
        assert!(unsealed.segments[0].sealed.is_none());
        assert_eq!(unsealed, full);
        let Some(buffer) = &full.segments[0].sealed else {
            panic!("a full segment is sealed");
        };
        for (held, turn) in full.iter().zip(&turns) {
            assert_eq!(held, turn);
            assert!(held.text.is_escaped());
            assert_eq!(held.text.json(), turn.text.json());
            let text_at = held.text.as_str().as_ptr() as usize - buffer.as_ptr() as usize;
            assert!(text_at < buffer.len());
        }
        assert!(full.segments[0].messages.is_empty());
        assert_eq!(
            full.held_bytes(),
            buffer.len() + SEGMENT_TURNS * TURN_OVERHEAD_BYTES
        );
        assert!(full.held_bytes() < open.held_bytes() + open.held_bytes() / SEGMENT_TURNS);
        // The next turn starts a segment of its own.
        let mut longer = full.clone();
        longer.push(turn(SEGMENT_TURNS));
        assert!(Arc::ptr_eq(&longer.segments[0], &full.segments[0]));
        assert_eq!(longer.segments.len(), 2);
    }
}

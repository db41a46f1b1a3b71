//! The newest messages of recently replied-to sessions, kept in memory so
//! that a reply reads from redb only the session's record and the messages
//! appended since its previous reply, not its whole history window again:
//! decoding that window (JSON rows) was the largest item of the service's
//! own code in the reply path's profile.
//!
//! The cache is checked against what the reply's read transaction sees:
//! messages are only ever appended under increasing sequence numbers and
//! never rewritten, so the messages below the record's `message_count` are
//! the same in every transaction that sees them, and an entry is as good as
//! a read of the sequences it holds. That holds whatever order transactions
//! and cache updates run in, so there is no lock across a transaction. A
//! write that appended messages adds them to its session's entry when the
//! entry ends where they begin (the reply's own two, most of the time), so
//! the next reply does not decode them again; otherwise that reply reads
//! them. Only this process writes the redb file.

use std::sync::{Mutex, PoisonError};

use foldhash::HashMap;

use super::{HistoryBudget, Message, ObjectId};
use crate::error::Error;
use crate::turns::History;

/// What the cache may hold, in bytes of message text and per-message
/// overhead, over all sessions: a few thousand sessions' default windows
/// (8,192 tokens, about 32 KiB of text each).
pub(super) const CAPACITY_BYTES: usize = 64 << 20;

/// Counted per cached session besides its messages: its map slot and tail.
const SESSION_OVERHEAD_BYTES: usize = 128;

pub(super) struct SessionTails {
    capacity_bytes: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_session: HashMap<ObjectId, Tail>,
    bytes: usize,
    /// Advances on every use; an entry's `used` is the value at its last use.
    clock: u64,
}

/// The newest messages of one session, from sequence `first` on, as the
/// turns every prompt of the session shares.
struct Tail {
    first: u32,
    turns: History,
    /// The budget that left out message `first - 1` (none when `first` is
    /// 0): any budget within it leaves that message out too, since the
    /// newest messages only grow.
    cut_by: HistoryBudget,
    bytes: usize,
    used: u64,
}

impl Tail {
    fn end(&self) -> u32 {
        self.first + self.turns.len() as u32
    }

    /// Counts what it holds, after its turns changed.
    fn measure(&mut self) {
        self.bytes = SESSION_OVERHEAD_BYTES + self.turns.held_bytes();
    }
}

/// How far back a read of the cache may go to the store.
#[derive(Clone, Copy)]
enum Reach {
    /// Only the messages appended since what is held.
    HeldOnly,
    /// As far back as the budget reaches.
    AsFarAsNeeded,
}

/// Reads a session's messages from the store, in the transaction whose
/// record said the session has `count` of them.
pub(super) trait ReadMessages {
    /// The messages at sequences `from..count`, oldest first.
    fn read_range(&mut self, from: u32, count: u32) -> Result<Vec<Message>, Error>;

    /// The newest messages within `budget`, oldest first.
    fn read_newest(&mut self, count: u32, budget: HistoryBudget) -> Result<Vec<Message>, Error>;
}

impl SessionTails {
    pub(super) fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            entries: Mutex::default(),
        }
    }

    /// The newest messages of session `id`, which has `count` messages,
    /// within `budget`, oldest first: what the cache holds, and through
    /// `store` only what was appended since, unless the budget reaches back
    /// past what is held.
    pub(super) fn newest(
        &self,
        id: ObjectId,
        count: u32,
        budget: HistoryBudget,
        store: &mut impl ReadMessages,
    ) -> Result<History, Error> {
        let newest = self.newest_within(id, count, budget, store, Reach::AsFarAsNeeded)?;
        // Reading as far as needed always answers.
        Ok(newest.unwrap_or_default())
    }

    /// Whether session `id` has an entry: a read of it will most likely
    /// need only the messages appended since.
    pub(super) fn holds(&self, id: ObjectId) -> bool {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.by_session.contains_key(&id)
    }

    /// [`Self::newest`] when it can answer from what the cache holds and the
    /// messages appended since; `None` (the cache as it was) when the
    /// session has no entry, or `budget` reaches back past it.
    pub(super) fn newest_held(
        &self,
        id: ObjectId,
        count: u32,
        budget: HistoryBudget,
        store: &mut impl ReadMessages,
    ) -> Result<Option<History>, Error> {
        self.newest_within(id, count, budget, store, Reach::HeldOnly)
    }

    fn newest_within(
        &self,
        id: ObjectId,
        count: u32,
        budget: HistoryBudget,
        store: &mut impl ReadMessages,
        reach: Reach,
    ) -> Result<Option<History>, Error> {
        // Taken out while the store is read, so the lock is never held
        // across I/O; a concurrent reply to the same session reads it whole.
        let held = self.take(id);
        let held = match (held, reach) {
            (Some(tail), Reach::HeldOnly) if tail.first > count => {
                self.put(id, tail);
                return Ok(None);
            }
            (None, Reach::HeldOnly) => return Ok(None),
            (held, _) => held.filter(|tail| tail.first <= count),
        };
        let mut tail = match held {
            Some(mut tail) => {
                if tail.end() > count {
                    // Cached from a newer transaction than this one: what
                    // this one sees is a prefix, and what cut it is unknown.
                    tail.turns.truncate((count - tail.first) as usize);
                    tail.cut_by = HistoryBudget::NONE;
                }
                if tail.end() < count {
                    let appended = store.read_range(tail.end(), count)?;
                    tail.turns.extend(appended.iter().map(Message::turn));
                }
                tail
            }
            None => Tail {
                first: count,
                turns: History::default(),
                cut_by: HistoryBudget::NONE,
                bytes: 0,
                used: 0,
            },
        };
        let kept = match (budget_reach(&tail, budget), reach) {
            (Some(kept), _) => kept,
            (None, Reach::HeldOnly) => {
                // What was read since is as good as ever for the next read.
                tail.measure();
                self.put(id, tail);
                return Ok(None);
            }
            (None, Reach::AsFarAsNeeded) => {
                let messages = store.read_newest(count, budget)?;
                tail.first = count.saturating_sub(messages.len() as u32);
                // Extended rather than collected: a kept history seals its
                // full segments (`History::push`).
                tail.turns = History::default();
                tail.turns.extend(messages.iter().map(Message::turn));
                tail.cut_by = HistoryBudget::NONE;
                tail.turns.len()
            }
        };
        let dropped = tail.turns.len() - kept;
        tail.turns.drop_oldest(dropped);
        tail.first += dropped as u32;
        // A wider budget that cut further back says nothing of a newer cut.
        if dropped > 0 || (tail.first > 0 && !budget_within(budget, tail.cut_by)) {
            tail.cut_by = budget;
        }
        tail.measure();
        let newest = tail.turns.clone();
        self.put(id, tail);
        Ok(Some(newest))
    }

    /// Adds `messages`, which a committed write appended to session `id`
    /// at the sequences from `first` on, to its entry when the entry ends
    /// where they begin, so that the next reply need not read them back.
    /// Otherwise (no entry, or one ending elsewhere: taken out by a read
    /// meanwhile, or put back by a read of an older transaction) the next
    /// read finds them in the store.
    pub(super) fn extend<'a>(
        &self,
        id: ObjectId,
        first: u32,
        messages: impl IntoIterator<Item = &'a Message>,
    ) {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = &mut *guard;
        let Some(tail) = entries.by_session.get_mut(&id) else {
            return;
        };
        if tail.end() != first {
            return;
        }
        let held = tail.bytes;
        tail.turns.extend(messages.into_iter().map(Message::turn));
        // Less when the turns filled a segment, which then holds each text once.
        tail.measure();
        entries.bytes = entries.bytes - held + tail.bytes;
        if entries.bytes > self.capacity_bytes {
            entries.evict_to(self.capacity_bytes - self.capacity_bytes / 8);
        }
    }

    /// Forgets session `id` (deleted).
    pub(super) fn forget(&self, id: ObjectId) {
        drop(self.take(id));
    }

    fn take(&self, id: ObjectId) -> Option<Tail> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let tail = entries.by_session.remove(&id)?;
        entries.bytes -= tail.bytes;
        Some(tail)
    }

    fn put(&self, id: ObjectId, mut tail: Tail) {
        // An empty tail saves no read (a reply without history, such as an
        // OpenAI-compatible request naming its session).
        if tail.turns.is_empty() || tail.bytes > self.capacity_bytes {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.clock += 1;
        tail.used = entries.clock;
        entries.bytes += tail.bytes;
        if let Some(replaced) = entries.by_session.insert(id, tail) {
            entries.bytes -= replaced.bytes;
        }
        if entries.bytes > self.capacity_bytes {
            entries.evict_to(self.capacity_bytes - self.capacity_bytes / 8);
        }
    }
}

impl Entries {
    /// Drops the least recently used entries until at most `bytes` are
    /// held: one scan for many entries, so its cost is shared by the puts
    /// that filled the room it makes.
    fn evict_to(&mut self, bytes: usize) {
        let mut by_use: Vec<(u64, ObjectId, usize)> = self
            .by_session
            .iter()
            .map(|(id, tail)| (tail.used, *id, tail.bytes))
            .collect();
        by_use.sort_unstable_by_key(|(used, _, _)| *used);
        for (_, id, size) in by_use {
            if self.bytes <= bytes {
                break;
            }
            self.by_session.remove(&id);
            self.bytes -= size;
        }
    }
}

/// How many of `tail`'s newest messages `budget` keeps, or `None` when it
/// could reach past the oldest one held, to messages that are not.
fn budget_reach(tail: &Tail, budget: HistoryBudget) -> Option<usize> {
    let (kept, _) = tail.turns.newest_fitting(|size| {
        size.turns <= u64::from(budget.max_messages) && size.text_bytes <= budget.max_bytes
    });
    let all = tail.turns.len();
    if kept < all {
        return Some(kept);
    }
    let reaches_no_further = tail.first == 0
        || all as u64 >= u64::from(budget.max_messages)
        || budget_within(budget, tail.cut_by);
    reaches_no_further.then_some(all)
}

fn budget_within(budget: HistoryBudget, wider: HistoryBudget) -> bool {
    budget.max_messages <= wider.max_messages && budget.max_bytes <= wider.max_bytes
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::store::MessageRole;

    /// A session's messages as the store holds them, counting what is read.
    struct Rows {
        messages: Vec<Message>,
        decoded: usize,
    }

    impl ReadMessages for Rows {
        fn read_range(&mut self, from: u32, count: u32) -> Result<Vec<Message>, Error> {
            let read = self.messages[from as usize..count as usize].to_vec();
            self.decoded += read.len();
            Ok(read)
        }

        fn read_newest(
            &mut self,
            count: u32,
            budget: HistoryBudget,
        ) -> Result<Vec<Message>, Error> {
            let newest = newest_messages(&self.messages[..count as usize], budget);
            self.decoded += newest.len();
            Ok(newest)
        }
    }

    /// The newest of `messages` within `budget`, oldest first.
    fn newest_messages(messages: &[Message], budget: HistoryBudget) -> Vec<Message> {
        let mut newest_first = budget
            .take_newest(messages.iter().rev().cloned().map(Ok))
            .unwrap();
        newest_first.reverse();
        newest_first
    }

    /// What a read of the whole session gives.
    fn reference(messages: &[Message], budget: HistoryBudget) -> History {
        newest_messages(messages, budget)
            .iter()
            .map(Message::turn)
            .collect()
    }

    fn message(rng: &mut StdRng) -> Message {
        let length = rng.random_range(0..40);
        Message::new(MessageRole::User, "x".repeat(length))
    }

    /// A session of `count` random messages, none read yet.
    fn random_rows(count: usize, rng: &mut StdRng) -> Rows {
        Rows {
            messages: (0..count).map(|_| message(rng)).collect(),
            decoded: 0,
        }
    }

    fn budget(max_messages: u32, max_bytes: u64) -> HistoryBudget {
        HistoryBudget {
            max_messages,
            max_bytes,
        }
    }

    /// Each reply reads only the two messages appended since the one
    /// before, or nothing when their write added them, and a write's
    /// messages after a gap are not added.
    #[test]
    fn a_growing_session_is_read_once_then_only_what_the_cache_lacks() {
        let tails = SessionTails::new(CAPACITY_BYTES);
        let id = ObjectId::new();
        let mut rng = StdRng::seed_from_u64(7);
        let mut rows = random_rows(300, &mut rng);
        let window = budget(1_000, 2_000);
        let first = tails.newest(id, 300, window, &mut rows).unwrap();
        assert_eq!(first, reference(&rows.messages, window));
        assert_eq!(rows.decoded, first.len());
        for reply in 0..50 {
            let appended_at = rows.messages.len();
            rows.messages.push(message(&mut rng));
            rows.messages.push(message(&mut rng));
            let added_by_write = reply % 2 == 0;
            if added_by_write {
                let appended = rows.messages[appended_at..].iter();
                tails.extend(id, appended_at as u32, appended);
            }
            rows.decoded = 0;
            let count = rows.messages.len() as u32;
            let newest = tails.newest(id, count, window, &mut rows).unwrap();
            assert_eq!(newest, reference(&rows.messages, window), "reply {reply}");
            let lacked = if added_by_write { 0 } else { 2 };
            assert_eq!(rows.decoded, lacked, "reply {reply}");
        }
        // Messages that do not begin where the entry ends are not added:
        // the two before them never were, so all three are read.
        rows.messages.push(message(&mut rng));
        rows.messages.push(message(&mut rng));
        let appended_at = rows.messages.len();
        rows.messages.push(message(&mut rng));
        let appended = rows.messages[appended_at..].iter();
        tails.extend(id, appended_at as u32, appended);
        rows.decoded = 0;
        let count = rows.messages.len() as u32;
        let newest = tails.newest(id, count, window, &mut rows).unwrap();
        assert_eq!(newest, reference(&rows.messages, window));
        assert_eq!(rows.decoded, 3);
    }

    /// Whatever the budgets, the counts seen (older transactions too) and
    /// the eviction, the answer is the one a full read gives.
    #[test]
    fn the_cache_answers_as_a_full_read_would() {
        let mut rng = StdRng::seed_from_u64(11);
        let tails = SessionTails::new(4_000);
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        let mut sessions: Vec<Rows> = (0..4)
            .map(|_| Rows {
                messages: Vec::new(),
                decoded: 0,
            })
            .collect();
        for step in 0..5_000 {
            let which = rng.random_range(0..ids.len());
            let rows = &mut sessions[which];
            let appended_at = rows.messages.len();
            for _ in 0..rng.random_range(0..3) {
                rows.messages.push(message(&mut rng));
            }
            // Half the time the write adds what it appended.
            if rng.random_bool(0.5) {
                let appended = rows.messages[appended_at..].iter();
                tails.extend(ids[which], appended_at as u32, appended);
            }
            let len = rows.messages.len() as u32;
            // Now and then a transaction that began before the newest appends.
            let count = len - rng.random_range(0..=len.min(3));
            let window = budget(rng.random_range(0..30), rng.random_range(0..600));
            // Half the time from what is held alone, when it can answer.
            let held = if rng.random_bool(0.5) {
                tails.newest_held(ids[which], count, window, rows).unwrap()
            } else {
                None
            };
            let newest = match held {
                Some(newest) => newest,
                None => tails.newest(ids[which], count, window, rows).unwrap(),
            };
            assert_eq!(
                newest,
                reference(&rows.messages[..count as usize], window),
                "step {step}"
            );
            let held = tails.entries.lock().unwrap().bytes;
            assert!(held <= 4_000, "step {step}: {held} bytes held");
        }
    }

    #[test]
    fn the_least_recently_used_sessions_are_evicted_first() {
        // Three sessions of three 10-byte messages fit; a fourth does not.
        let message = Message::new(MessageRole::User, "0123456789");
        let held: History = std::iter::repeat_n(message.turn(), 3).collect();
        let session = SESSION_OVERHEAD_BYTES + held.held_bytes();
        let capacity = 3 * session + session / 2;
        let tails = SessionTails::new(capacity);
        let window = budget(100, 10_000);
        let mut rows = Rows {
            messages: vec![message; 3],
            decoded: 0,
        };
        let (first, second, third, fourth) = (
            ObjectId::new(),
            ObjectId::new(),
            ObjectId::new(),
            ObjectId::new(),
        );
        for id in [first, second, third, first] {
            tails.newest(id, 3, window, &mut rows).unwrap();
        }
        tails.newest(fourth, 3, window, &mut rows).unwrap();
        let entries = tails.entries.lock().unwrap();
        assert!(!entries.by_session.contains_key(&second));
        assert!(entries.by_session.contains_key(&first));
        assert!(entries.by_session.contains_key(&fourth));
        assert!(entries.by_session.contains_key(&third));
        assert_eq!(entries.bytes, 3 * session);
    }

    /// A read from the cache alone answers as a full read would, reading
    /// only what was appended, and declines, leaving the cache as good as
    /// before, when the session has no entry or the budget reaches past it.
    #[test]
    fn a_read_of_what_is_held_answers_as_a_full_read_or_declines() {
        let tails = SessionTails::new(CAPACITY_BYTES);
        let id = ObjectId::new();
        let mut rng = StdRng::seed_from_u64(5);
        let mut rows = random_rows(100, &mut rng);
        let window = budget(20, 2_000);
        assert!(!tails.holds(id));
        assert_eq!(tails.newest_held(id, 100, window, &mut rows).unwrap(), None);
        assert_eq!(rows.decoded, 0);
        tails.newest(id, 100, window, &mut rows).unwrap();
        assert!(tails.holds(id));
        rows.messages.push(message(&mut rng));
        rows.messages.push(message(&mut rng));
        rows.decoded = 0;
        let held = tails.newest_held(id, 102, window, &mut rows).unwrap();
        assert_eq!(held, Some(reference(&rows.messages, window)));
        assert_eq!(rows.decoded, 2);
        // A wider budget reaches past what is held: declined, but the
        // messages read meanwhile stay cached.
        rows.messages.push(message(&mut rng));
        rows.decoded = 0;
        let wider = budget(60, 2_000);
        assert_eq!(tails.newest_held(id, 103, wider, &mut rows).unwrap(), None);
        assert_eq!(rows.decoded, 1);
        let held_bytes = tails.entries.lock().unwrap().bytes;
        rows.decoded = 0;
        let full = tails.newest(id, 103, window, &mut rows).unwrap();
        assert_eq!(full, reference(&rows.messages, window));
        assert_eq!(rows.decoded, 0, "the appended message was kept");
        assert!(held_bytes >= tails.entries.lock().unwrap().bytes);
        let all = tails.newest(id, 103, wider, &mut rows).unwrap();
        assert_eq!(all, reference(&rows.messages, wider));
    }

    #[test]
    fn a_read_without_history_caches_nothing() {
        let tails = SessionTails::new(CAPACITY_BYTES);
        let mut rows = Rows {
            messages: vec![Message::new(MessageRole::User, "hello"); 3],
            decoded: 0,
        };
        for _ in 0..100 {
            let newest = tails
                .newest(ObjectId::new(), 3, HistoryBudget::NONE, &mut rows)
                .unwrap();
            assert!(newest.is_empty());
        }
        assert!(tails.entries.lock().unwrap().by_session.is_empty());
    }

    #[test]
    fn a_deleted_session_is_forgotten() {
        let tails = SessionTails::new(CAPACITY_BYTES);
        let id = ObjectId::new();
        let mut rows = Rows {
            messages: vec![Message::new(MessageRole::User, "hello")],
            decoded: 0,
        };
        tails.newest(id, 1, budget(10, 100), &mut rows).unwrap();
        tails.forget(id);
        let entries = tails.entries.lock().unwrap();
        assert!(entries.by_session.is_empty());
        assert_eq!(entries.bytes, 0);
    }
}

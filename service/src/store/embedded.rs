//! The embedded store: one redb database file in the data dir.
//!
//! Why redb: pure Rust (no C toolchain, no cmake), ACID transactions with
//! copy-on-write B-trees that survive a crash or kill mid-write, a single
//! file, and actively maintained. Its write transactions are serialized, which
//! makes a message append a plain read-check-write inside one transaction.
//! Operations run through [`EmbeddedDb`]: reads on the blocking pool, writes
//! on its writer thread, each in one transaction, answered once durable. A
//! reply's read of a session it replied to lately (its record and the
//! messages since, the rest from the session tails) is short and runs on
//! the calling task instead.
//!
//! Layout ([`crate::embedded_tables`], which a write transaction's
//! operations share):
//! - `chat_sessions`: id -> session record (JSON, without messages)
//! - `chat_session_messages`: (id, sequence) -> message (JSON); appends never
//!   rewrite earlier messages
//! - `chat_sessions_by_user`: (user, updatedAt ms, id) -> (); newest first by
//!   iterating backwards
//! - `chat_session_counts`: user -> number of sessions, for pagination totals

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use super::embedded_common::{
    EmbeddedStore, decode, encode, from_millis, millis_key, object_id, storage_error,
};
use super::embedded_tails::{self, ReadMessages, SessionTails};
use super::{
    HistoryBudget, Message, MessageRole, NewSession, ObjectId, PageRequest, Session, SessionPage,
    SessionStore, SessionSummary, SessionTail, TokenTotals, now,
};
use crate::embedded_db::{EmbeddedDb, PendingDurability};
use crate::embedded_tables::{
    MESSAGES, SESSION_COUNTS, SESSIONS, SESSIONS_BY_USER, SessionId, SessionTables, WriteTables,
};
use crate::error::Error;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionRecord {
    user_id: String,
    user_cohorts: Vec<String>,
    title: String,
    route: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    input_tokens: u64,
    output_tokens: u64,
    message_count: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageRecord<'a> {
    #[serde(with = "object_id")]
    id: ObjectId,
    role: MessageRole,
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
    timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
}

impl EmbeddedStore {
    /// Opens (or creates) `path` with a page cache of `cache_bytes`,
    /// creating the tables.
    pub async fn open(path: &Path, cache_bytes: usize) -> Result<Self, Error> {
        Self::new(Arc::new(EmbeddedDb::open(path, cache_bytes).await?)).await
    }

    /// The store in `database`, creating the tables.
    pub async fn new(database: Arc<EmbeddedDb>) -> Result<Self, Error> {
        database
            .write(|tables| {
                session_tables(tables)?;
                super::embedded_keys::create_tables(tables.transaction())?;
                super::embedded_audit::create_tables(tables.transaction())
            })
            .await?;
        Ok(Self {
            database,
            tails: Arc::new(SessionTails::new(embedded_tails::CAPACITY_BYTES)),
        })
    }
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn ping(&self) -> Result<(), Error> {
        self.database
            .read(|transaction| {
                transaction.open_table(SESSIONS).map_err(storage_error)?;
                Ok(())
            })
            .await
    }

    async fn create(&self, new: NewSession) -> Result<Session, Error> {
        // Encoded before the write: the writer thread runs writes one at a time.
        let session = Session::from(new);
        let summary = &session.summary;
        let id = summary.id.bytes();
        let record = SessionRecord {
            user_id: summary.user_id.clone(),
            user_cohorts: summary.user_cohorts.clone(),
            title: summary.title.clone(),
            route: summary.route.clone(),
            created_at_ms: summary.created_at.timestamp_millis(),
            updated_at_ms: summary.updated_at.timestamp_millis(),
            input_tokens: 0,
            output_tokens: 0,
            message_count: sequence(session.messages.len())?,
        };
        let encoded_record = encode(&record)?;
        let encoded_messages = session
            .messages
            .iter()
            .map(|message| encode(&message_record(message)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.database
            .write(move |tables| {
                let tables = session_tables(tables)?;
                tables
                    .sessions
                    .insert(id, encoded_record.as_slice())
                    .map_err(storage_error)?;
                for (index, message) in encoded_messages.iter().enumerate() {
                    tables
                        .messages
                        .insert((id, sequence(index)?), message.as_slice())
                        .map_err(storage_error)?;
                }
                tables
                    .by_user
                    .insert(
                        (
                            record.user_id.as_str(),
                            millis_key(record.updated_at_ms),
                            id,
                        ),
                        (),
                    )
                    .map_err(storage_error)?;
                let count = tables
                    .counts
                    .get(record.user_id.as_str())
                    .map_err(storage_error)?
                    .map_or(0, |count| count.value());
                tables
                    .counts
                    .insert(record.user_id.as_str(), count + 1)
                    .map_err(storage_error)?;
                Ok::<_, Error>(())
            })
            .await?;
        Ok(session)
    }

    async fn get(&self, id: ObjectId) -> Result<Session, Error> {
        self.database
            .read(move |transaction| {
                let summary = read_summary(transaction, id)?;
                let count = sequence(summary.message_count as usize)?;
                let messages = MessageRows::new(transaction, id).read_range(0, count)?;
                Ok(Session { summary, messages })
            })
            .await
    }

    async fn get_tail_applied(
        &self,
        id: ObjectId,
        budget: HistoryBudget,
    ) -> Result<(SessionTail, PendingDurability), Error> {
        // A session replied to lately is read here: its record and the
        // messages since. Any other read may decode a whole history window
        // and goes to the blocking pool.
        if self.tails.holds(id) {
            let (held, pending) = self
                .database
                .read_applied_inline(|transaction| -> Result<_, Error> {
                    let (summary, newest) = read_tail(transaction, id, |count, rows| {
                        self.tails.newest_held(id, count, budget, rows)
                    })?;
                    Ok(newest.map(|newest_turns| SessionTail {
                        summary,
                        newest_turns,
                    }))
                })
                .await?;
            if let Some(session) = held {
                return Ok((session, pending));
            }
        }
        let tails = Arc::clone(&self.tails);
        self.database
            .read_applied(move |transaction| {
                let (summary, newest_turns) = read_tail(transaction, id, |count, rows| {
                    tails.newest(id, count, budget, rows)
                })?;
                Ok(SessionTail {
                    summary,
                    newest_turns,
                })
            })
            .await
    }

    async fn list(&self, user_id: &str, page: PageRequest) -> Result<SessionPage, Error> {
        let user_id = user_id.to_owned();
        self.database
            .read(move |transaction| {
                let total = transaction
                    .open_table(SESSION_COUNTS)
                    .map_err(storage_error)?
                    .get(user_id.as_str())
                    .map_err(storage_error)?
                    .map_or(0, |count| count.value());
                let by_user = transaction
                    .open_table(SESSIONS_BY_USER)
                    .map_err(storage_error)?;
                let sessions_table = transaction.open_table(SESSIONS).map_err(storage_error)?;
                let offset = usize::try_from(page.offset()).unwrap_or(usize::MAX);
                let sessions = by_user
                    .range(
                        (user_id.as_str(), 0, [0; 12])
                            ..=(user_id.as_str(), u64::MAX, [u8::MAX; 12]),
                    )
                    .map_err(storage_error)?
                    .rev()
                    .skip(offset)
                    .take(page.limit as usize)
                    .map(|entry| {
                        let (key, _) = entry.map_err(storage_error)?;
                        let id = ObjectId::from_bytes(key.value().2);
                        let record = sessions_table
                            .get(id.bytes())
                            .map_err(storage_error)?
                            .ok_or_else(|| {
                                Error::Store(format!("index names missing session {id}"))
                            })?;
                        summary(id, decode(record.value())?)
                    })
                    .collect::<Result<Vec<_>, Error>>()?;
                Ok(SessionPage { sessions, total })
            })
            .await
    }

    async fn rename(
        &self,
        id: ObjectId,
        user_id: &str,
        title: &str,
    ) -> Result<SessionSummary, Error> {
        let user_id = user_id.to_owned();
        let title = title.to_owned();
        self.database
            .write(move |tables| {
                let sessions = &mut session_tables(tables)?.sessions;
                let mut record = owned_record(sessions, id, &user_id)?;
                record.title.clone_from(&title);
                sessions
                    .insert(id.bytes(), encode(&record)?.as_slice())
                    .map_err(storage_error)?;
                summary(id, record)
            })
            .await
    }

    async fn delete(&self, id: ObjectId, user_id: &str) -> Result<(), Error> {
        let user_id = user_id.to_owned();
        self.database
            .write(move |tables| {
                let tables = session_tables(tables)?;
                let record = owned_record(&tables.sessions, id, &user_id)?;
                tables.sessions.remove(id.bytes()).map_err(storage_error)?;
                tables
                    .messages
                    .retain_in(session_messages(id), |_, _| false)
                    .map_err(storage_error)?;
                tables
                    .by_user
                    .remove((
                        user_id.as_str(),
                        millis_key(record.updated_at_ms),
                        id.bytes(),
                    ))
                    .map_err(storage_error)?;
                let count = tables
                    .counts
                    .get(user_id.as_str())
                    .map_err(storage_error)?
                    .map_or(0, |count| count.value());
                if count <= 1 {
                    tables
                        .counts
                        .remove(user_id.as_str())
                        .map_err(storage_error)?;
                } else {
                    tables
                        .counts
                        .insert(user_id.as_str(), count - 1)
                        .map_err(storage_error)?;
                }
                Ok::<_, Error>(())
            })
            .await?;
        self.tails.forget(id);
        Ok(())
    }

    async fn append_messages(
        &self,
        id: ObjectId,
        user_id: &str,
        messages: &[Message],
        tokens: TokenTotals,
    ) -> Result<(), Error> {
        let user_id = user_id.to_owned();
        let encoded = messages
            .iter()
            .map(|message| encode(&message_record(message)))
            .collect::<Result<Vec<_>, Error>>()?;
        let first = self
            .database
            .write(move |tables| {
                let SessionTables {
                    sessions,
                    messages: messages_table,
                    by_user,
                    ..
                } = session_tables(tables)?;
                let mut record = owned_record(sessions, id, &user_id)?;
                let first = record.message_count;
                for message in &encoded {
                    messages_table
                        .insert((id.bytes(), record.message_count), message.as_slice())
                        .map_err(storage_error)?;
                    record.message_count = record
                        .message_count
                        .checked_add(1)
                        .ok_or_else(|| Error::Store(format!("session {id} is full")))?;
                }
                by_user
                    .remove((
                        user_id.as_str(),
                        millis_key(record.updated_at_ms),
                        id.bytes(),
                    ))
                    .map_err(storage_error)?;
                record.updated_at_ms = now().timestamp_millis().max(record.updated_at_ms);
                record.input_tokens = record.input_tokens.saturating_add(tokens.input);
                record.output_tokens = record.output_tokens.saturating_add(tokens.output);
                by_user
                    .insert(
                        (
                            user_id.as_str(),
                            millis_key(record.updated_at_ms),
                            id.bytes(),
                        ),
                        (),
                    )
                    .map_err(storage_error)?;
                sessions
                    .insert(id.bytes(), encode(&record)?.as_slice())
                    .map_err(storage_error)?;
                Ok::<_, Error>(first)
            })
            .await?;
        self.tails.extend(id, first, messages);
        Ok(())
    }
}

/// The sessions' tables in `tables`' transaction, opened on its first use.
fn session_tables<'a, 'txn>(
    tables: &'a mut WriteTables<'txn>,
) -> Result<&'a mut SessionTables<'txn>, Error> {
    tables.sessions().map_err(storage_error)
}

/// The record of `user_id`'s session `id`; another user's session is "not found".
fn owned_record(
    sessions: &impl ReadableTable<SessionId, &'static [u8]>,
    id: ObjectId,
    user_id: &str,
) -> Result<SessionRecord, Error> {
    let value = sessions
        .get(id.bytes())
        .map_err(storage_error)?
        .ok_or(Error::SessionNotFound)?;
    let record: SessionRecord = decode(value.value())?;
    if record.user_id == user_id {
        Ok(record)
    } else {
        Err(Error::SessionNotFound)
    }
}

fn message_record(message: &Message) -> MessageRecord<'_> {
    MessageRecord {
        id: message.id,
        role: message.role,
        content: std::borrow::Cow::Borrowed(&message.content),
        timestamp_ms: message.timestamp.timestamp_millis(),
        incomplete: message.incomplete,
    }
}

fn summary(id: ObjectId, record: SessionRecord) -> Result<SessionSummary, Error> {
    Ok(SessionSummary {
        id,
        user_id: record.user_id,
        user_cohorts: record.user_cohorts,
        title: record.title,
        route: record.route,
        created_at: from_millis(record.created_at_ms)?,
        updated_at: from_millis(record.updated_at_ms)?,
        token_totals: TokenTotals {
            input: record.input_tokens,
            output: record.output_tokens,
        },
        message_count: u64::from(record.message_count),
    })
}

/// Session `id`'s record, and what `newest` takes from its messages: the
/// rows as this transaction sees them, given their count from the same
/// record.
fn read_tail<T>(
    transaction: &ReadTransaction,
    id: ObjectId,
    newest: impl FnOnce(u32, &mut MessageRows<'_>) -> Result<T, Error>,
) -> Result<(SessionSummary, T), Error> {
    let summary = read_summary(transaction, id)?;
    let count = sequence(summary.message_count as usize)?;
    let mut messages = MessageRows::new(transaction, id);
    let newest = newest(count, &mut messages)?;
    Ok((summary, newest))
}

/// The record of session `id` as a summary; `SessionNotFound` if there is none.
fn read_summary(transaction: &ReadTransaction, id: ObjectId) -> Result<SessionSummary, Error> {
    let sessions = transaction.open_table(SESSIONS).map_err(storage_error)?;
    let record = sessions
        .get(id.bytes())
        .map_err(storage_error)?
        .ok_or(Error::SessionNotFound)?;
    summary(id, decode(record.value())?)
}

/// The keys of session `id`'s messages, in order.
fn session_messages(id: ObjectId) -> std::ops::RangeInclusive<(SessionId, u32)> {
    (id.bytes(), 0)..=(id.bytes(), u32::MAX)
}

/// Session `id`'s rows of the messages table, as one read transaction sees
/// them. The table opens on the first read: a reply to a session whose tail
/// the cache holds reads no rows, and opening a table costs a lookup in
/// redb's table of tables and a dozen allocations for its type names.
struct MessageRows<'txn> {
    transaction: &'txn ReadTransaction,
    table: Option<ReadOnlyTable<(SessionId, u32), &'static [u8]>>,
    id: ObjectId,
}

impl<'txn> MessageRows<'txn> {
    fn new(transaction: &'txn ReadTransaction, id: ObjectId) -> Self {
        Self {
            transaction,
            table: None,
            id,
        }
    }

    fn table(&mut self) -> Result<&ReadOnlyTable<(SessionId, u32), &'static [u8]>, Error> {
        let table = match self.table.take() {
            Some(table) => table,
            None => self
                .transaction
                .open_table(MESSAGES)
                .map_err(storage_error)?,
        };
        Ok(self.table.insert(table))
    }
}

impl ReadMessages for MessageRows<'_> {
    fn read_range(&mut self, from: u32, count: u32) -> Result<Vec<Message>, Error> {
        let id = self.id.bytes();
        self.table()?
            .range((id, from)..(id, count))
            .map_err(storage_error)?
            .map(|entry| message(entry.map_err(storage_error)?.1.value()))
            .collect()
    }

    fn read_newest(&mut self, count: u32, budget: HistoryBudget) -> Result<Vec<Message>, Error> {
        let id = self.id.bytes();
        // Decoded newest first, and only as many as the budget takes.
        let mut newest_first = budget.take_newest(
            self.table()?
                .range((id, 0)..(id, count))
                .map_err(storage_error)?
                .rev()
                .map(|entry| message(entry.map_err(storage_error)?.1.value())),
        )?;
        newest_first.reverse();
        Ok(newest_first)
    }
}

fn message(encoded: &[u8]) -> Result<Message, Error> {
    let record: MessageRecord<'_> = decode(encoded)?;
    Ok(Message {
        id: record.id,
        role: record.role,
        content: record.content.into(),
        timestamp: from_millis(record.timestamp_ms)?,
        incomplete: record.incomplete,
    })
}

fn sequence(index: usize) -> Result<u32, Error> {
    u32::try_from(index).map_err(|_| Error::Store("too many messages in one session".into()))
}

//! Chat session storage behind one trait, with two implementations that pass
//! the same conformance suite: MongoDB (production) and an embedded redb
//! database (local runs; the default when no MongoDB URI is configured).
//!
//! Session ids are MongoDB ObjectIds (24 hex characters) in both stores, so
//! clients validating ids with `^[0-9a-fA-F]{24}$` work against either.

pub mod audit;
mod embedded;
mod embedded_audit;
mod embedded_common;
mod embedded_keys;
mod embedded_tails;
mod instrumented;
pub mod keys;
mod mongo;
mod mongo_audit;
mod mongo_common;
mod mongo_keys;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

pub use audit::{
    AuditQuery, BlockAudit, BlockDirection, BlockKind, BlockPage, BlockQuery, CohortScope,
    Observation, ObservationAudit, ObservationEnd, ObservationPage, PolicyBlock,
};
pub use embedded_common::EmbeddedStore;
pub use instrumented::InstrumentedStore;
pub use keys::{ApiKey, ApiKeyStore};
pub use mongo_common::MongoStore;
pub use mongodb::bson::oid::ObjectId;

use crate::embedded_db::PendingDurability;
use crate::error::Error;
use crate::shared_text::SharedText;
use crate::turns::{ChatTurn, History, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: ObjectId,
    pub role: MessageRole,
    /// Shared, not copied, by the cache of session tails and the prompts.
    pub content: SharedText,
    pub timestamp: DateTime<Utc>,
    /// A reply cut short (upstream error, cancellation) after some output.
    pub incomplete: bool,
}

impl Message {
    /// The message as a turn of a prompt, sharing its text.
    pub fn turn(&self) -> ChatTurn {
        let role = match self.role {
            MessageRole::System => Role::System,
            MessageRole::User => Role::User,
            MessageRole::Assistant => Role::Assistant,
        };
        ChatTurn::new(role, self.content.clone())
    }

    pub fn new(role: MessageRole, content: impl Into<SharedText>) -> Self {
        Self {
            id: ObjectId::new(),
            role,
            content: content.into(),
            timestamp: now(),
            incomplete: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenTotals {
    pub input: u64,
    pub output: u64,
}

/// A session without its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub id: ObjectId,
    pub user_id: String,
    /// The owner's cohorts at creation, for supervisors' access.
    pub user_cohorts: Vec<String>,
    pub title: String,
    /// The model route (alias) the client asked for.
    pub route: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub token_totals: TokenTotals,
    pub message_count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub summary: SessionSummary,
    pub messages: Vec<Message>,
}

/// A session with only its newest messages, as a reply reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTail {
    pub summary: SessionSummary,
    /// The newest messages within the [`HistoryBudget`] asked for, oldest
    /// first, as the turns of a prompt.
    pub newest_turns: History,
}

/// How much of a session's history a reply may read: the newest messages,
/// newest first, until one more would pass `max_messages` or bring their
/// contents past `max_bytes` (UTF-8). Whatever a prompt can hold is within
/// it, so a reply's read does not grow with the session's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBudget {
    pub max_messages: u32,
    pub max_bytes: u64,
}

impl HistoryBudget {
    /// No history: the session's summary only.
    pub const NONE: Self = Self {
        max_messages: 0,
        max_bytes: 0,
    };

    /// The first messages of `newest_first` (a session's, from its
    /// newest) that fit the budget, newest first; decoding stops there.
    fn take_newest(
        self,
        newest_first: impl Iterator<Item = Result<Message, Error>>,
    ) -> Result<Vec<Message>, Error> {
        let mut bytes: u64 = 0;
        let mut kept = Vec::new();
        for message in newest_first.take(self.max_messages as usize) {
            let message = message?;
            bytes = bytes.saturating_add(message.content.len() as u64);
            if bytes > self.max_bytes {
                break;
            }
            kept.push(message);
        }
        Ok(kept)
    }
}

/// A session about to be created; `Session::from` gives what the store will hold.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: ObjectId,
    pub user_id: String,
    pub user_cohorts: Vec<String>,
    pub title: String,
    pub route: String,
    pub created_at: DateTime<Utc>,
    pub messages: Vec<Message>,
}

impl NewSession {
    pub fn new(
        user_id: String,
        user_cohorts: Vec<String>,
        title: String,
        route: String,
        messages: Vec<Message>,
    ) -> Self {
        Self {
            id: ObjectId::new(),
            user_id,
            user_cohorts,
            title,
            route,
            created_at: now(),
            messages,
        }
    }
}

impl From<NewSession> for Session {
    fn from(new: NewSession) -> Self {
        let updated_at = new
            .messages
            .iter()
            .map(|m| m.timestamp)
            .fold(new.created_at, DateTime::max);
        Self {
            summary: SessionSummary {
                id: new.id,
                user_id: new.user_id,
                user_cohorts: new.user_cohorts,
                title: new.title,
                route: new.route,
                created_at: new.created_at,
                updated_at,
                token_totals: TokenTotals::default(),
                message_count: new.messages.len() as u64,
            },
            messages: new.messages,
        }
    }
}

/// One page of a user's sessions, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub page: u32,
    pub limit: u32,
}

impl PageRequest {
    fn offset(self) -> u64 {
        u64::from(self.page.saturating_sub(1)) * u64::from(self.limit)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    /// Most recently updated first.
    pub sessions: Vec<SessionSummary>,
    /// The user's sessions in all pages.
    pub total: u64,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Succeeds only when the store answers.
    async fn ping(&self) -> Result<(), Error>;

    async fn create(&self, session: NewSession) -> Result<Session, Error>;

    /// Any user's session; callers apply `auth::policy`.
    async fn get(&self, id: ObjectId) -> Result<Session, Error>;

    /// Any user's session with only its newest messages within `budget`
    /// (what a reply may send), without waiting until what it read is
    /// durable (the embedded store commits in groups): the caller waits on
    /// the answer's [`PendingDurability`] before it shows anything resting
    /// on it.
    async fn get_tail_applied(
        &self,
        id: ObjectId,
        budget: HistoryBudget,
    ) -> Result<(SessionTail, PendingDurability), Error>;

    /// `user_id`'s sessions, most recently updated first.
    async fn list(&self, user_id: &str, page: PageRequest) -> Result<SessionPage, Error>;

    /// Sets the title of `user_id`'s session `id` and returns its summary;
    /// `SessionNotFound` if there is none. `updatedAt` is left as it was: it
    /// dates the conversation, so renaming does not reorder the list.
    async fn rename(
        &self,
        id: ObjectId,
        user_id: &str,
        title: &str,
    ) -> Result<SessionSummary, Error>;

    /// Deletes `user_id`'s session `id`; `SessionNotFound` if there is none.
    async fn delete(&self, id: ObjectId, user_id: &str) -> Result<(), Error>;

    /// Appends `messages` to `user_id`'s session `id` and adds `tokens` to its
    /// totals in one atomic step, so concurrent replies never lose an update.
    async fn append_messages(
        &self,
        id: ObjectId,
        user_id: &str,
        messages: &[Message],
        tokens: TokenTotals,
    ) -> Result<(), Error>;
}

/// Now, at the millisecond precision both stores keep.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

//! The MongoDB store (collection `chat_sessions`, like the seed system).
//!
//! Every write is one filtered update or delete on `{_id, userId}`, so
//! ownership is checked by the same atomic operation that changes the
//! document; appends use `$push`/`$inc`/`$set` and never read-modify-write.

use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::mongo_common::{MongoStore, bson_time, count, mongo_error, utc};
use super::{
    HistoryBudget, Message, MessageRole, NewSession, ObjectId, PageRequest, Session, SessionPage,
    SessionStore, SessionSummary, SessionTail, TokenTotals, now,
};
use crate::embedded_db::PendingDurability;
use crate::error::Error;

const COLLECTION: &str = "chat_sessions";
/// Unless the URI says otherwise, fail fast when the server is away, so that
/// requests answer 503 instead of hanging for the driver's 30 s default.
const DEFAULT_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionDocument {
    #[serde(rename = "_id")]
    id: ObjectId,
    user_id: String,
    #[serde(default)]
    user_cohorts: Vec<String>,
    title: String,
    route: String,
    /// Absent when a query projects messages out.
    #[serde(default)]
    messages: Vec<MessageDocument>,
    created_at: bson::DateTime,
    updated_at: bson::DateTime,
    #[serde(default)]
    token_totals: TokenTotalsDocument,
    #[serde(default)]
    message_count: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct MessageDocument {
    id: ObjectId,
    role: MessageRole,
    content: String,
    timestamp: bson::DateTime,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenTotalsDocument {
    input: i64,
    output: i64,
}

impl MongoStore {
    /// Connects and creates the indexes.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, Error> {
        let mut options = ClientOptions::parse(uri).await.map_err(mongo_error)?;
        options
            .app_name
            .get_or_insert_with(|| "parley-service".to_owned());
        options
            .server_selection_timeout
            .get_or_insert(DEFAULT_SERVER_SELECTION_TIMEOUT);
        let client = Client::with_options(options).map_err(mongo_error)?;
        let database = client.database(database);
        let store = Self {
            sessions: database.collection(COLLECTION),
            database,
        };
        store.create_indexes().await?;
        Ok(store)
    }

    /// The sessions collection, typed (a clone of a handle, no I/O).
    fn sessions(&self) -> Collection<SessionDocument> {
        self.sessions.clone_with_type()
    }

    async fn create_indexes(&self) -> Result<(), Error> {
        let by_user = IndexModel::builder()
            .keys(doc! { "userId": 1, "updatedAt": -1, "_id": -1 })
            .options(
                IndexOptions::builder()
                    .name("userId_updatedAt".to_owned())
                    .build(),
            )
            .build();
        self.sessions()
            .create_index(by_user)
            .await
            .map_err(mongo_error)?;
        super::mongo_keys::create_indexes(self).await?;
        super::mongo_audit::create_indexes(self).await
    }
}

#[async_trait]
impl SessionStore for MongoStore {
    async fn ping(&self) -> Result<(), Error> {
        self.database
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    async fn create(&self, new: NewSession) -> Result<Session, Error> {
        let session = Session::from(new);
        let summary = &session.summary;
        let document = SessionDocument {
            id: summary.id,
            user_id: summary.user_id.clone(),
            user_cohorts: summary.user_cohorts.clone(),
            title: summary.title.clone(),
            route: summary.route.clone(),
            messages: session.messages.iter().map(message_document).collect(),
            created_at: bson_time(summary.created_at),
            updated_at: bson_time(summary.updated_at),
            token_totals: TokenTotalsDocument::default(),
            message_count: count(summary.message_count),
        };
        self.sessions()
            .insert_one(document)
            .await
            .map_err(mongo_error)?;
        Ok(session)
    }

    async fn get(&self, id: ObjectId) -> Result<Session, Error> {
        let document = self
            .sessions()
            .find_one(doc! { "_id": id })
            .await
            .map_err(mongo_error)?
            .ok_or(Error::SessionNotFound)?;
        Ok(session(document))
    }

    async fn get_tail_applied(
        &self,
        id: ObjectId,
        budget: HistoryBudget,
    ) -> Result<(SessionTail, PendingDurability), Error> {
        // `$slice` sends only the newest `max_messages`; the byte budget,
        // which the server cannot apply in a projection, is applied here.
        let newest = -i64::from(budget.max_messages);
        let document = self
            .sessions()
            .find_one(doc! { "_id": id })
            .projection(doc! { "messages": { "$slice": newest } })
            .await
            .map_err(mongo_error)?
            .ok_or(Error::SessionNotFound)?;
        let Session { summary, messages } = session(document);
        let newest_first = budget.take_newest(messages.into_iter().rev().map(Ok))?;
        let tail = SessionTail {
            summary,
            newest_turns: newest_first.iter().rev().map(Message::turn).collect(),
        };
        // Acknowledged writes are durable as the deployment's write concern
        // makes them: nothing to wait on.
        Ok((tail, PendingDurability::none()))
    }

    async fn list(&self, user_id: &str, page: PageRequest) -> Result<SessionPage, Error> {
        let filter = doc! { "userId": user_id };
        let total = self
            .sessions()
            .count_documents(filter.clone())
            .await
            .map_err(mongo_error)?;
        let sessions = self
            .sessions()
            .find(filter)
            .sort(doc! { "updatedAt": -1, "_id": -1 })
            .skip(page.offset())
            .limit(i64::from(page.limit))
            .projection(doc! { "messages": 0 })
            .await
            .map_err(mongo_error)?
            .map_ok(|document| session(document).summary)
            .try_collect()
            .await
            .map_err(mongo_error)?;
        Ok(SessionPage { sessions, total })
    }

    async fn rename(
        &self,
        id: ObjectId,
        user_id: &str,
        title: &str,
    ) -> Result<SessionSummary, Error> {
        let document = self
            .sessions()
            .find_one_and_update(
                doc! { "_id": id, "userId": user_id },
                doc! { "$set": { "title": title } },
            )
            .return_document(ReturnDocument::After)
            .projection(doc! { "messages": 0 })
            .await
            .map_err(mongo_error)?
            .ok_or(Error::SessionNotFound)?;
        Ok(session(document).summary)
    }

    async fn delete(&self, id: ObjectId, user_id: &str) -> Result<(), Error> {
        let result = self
            .sessions()
            .delete_one(doc! { "_id": id, "userId": user_id })
            .await
            .map_err(mongo_error)?;
        if result.deleted_count == 0 {
            Err(Error::SessionNotFound)
        } else {
            Ok(())
        }
    }

    async fn append_messages(
        &self,
        id: ObjectId,
        user_id: &str,
        messages: &[Message],
        tokens: TokenTotals,
    ) -> Result<(), Error> {
        let pushed = messages
            .iter()
            .map(|message| bson::to_bson(&message_document(message)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| Error::Store(format!("encoding messages: {error}")))?;
        let update: Document = doc! {
            "$push": { "messages": { "$each": pushed } },
            "$inc": {
                "messageCount": count(messages.len() as u64),
                "tokenTotals.input": count(tokens.input),
                "tokenTotals.output": count(tokens.output),
            },
            "$set": { "updatedAt": bson_time(now()) },
        };
        let result = self
            .sessions()
            .update_one(doc! { "_id": id, "userId": user_id }, update)
            .await
            .map_err(mongo_error)?;
        if result.matched_count == 0 {
            Err(Error::SessionNotFound)
        } else {
            Ok(())
        }
    }
}

fn message_document(message: &Message) -> MessageDocument {
    MessageDocument {
        id: message.id,
        role: message.role,
        content: message.content.to_string(),
        timestamp: bson_time(message.timestamp),
        incomplete: message.incomplete,
    }
}

fn session(document: SessionDocument) -> Session {
    Session {
        summary: SessionSummary {
            id: document.id,
            user_id: document.user_id,
            user_cohorts: document.user_cohorts,
            title: document.title,
            route: document.route,
            created_at: utc(document.created_at),
            updated_at: utc(document.updated_at),
            token_totals: TokenTotals {
                input: u64::try_from(document.token_totals.input).unwrap_or(0),
                output: u64::try_from(document.token_totals.output).unwrap_or(0),
            },
            message_count: u64::try_from(document.message_count).unwrap_or(0),
        },
        messages: document
            .messages
            .into_iter()
            .map(|message| Message {
                id: message.id,
                role: message.role,
                content: message.content.into(),
                timestamp: utc(message.timestamp),
                incomplete: message.incomplete,
            })
            .collect(),
    }
}

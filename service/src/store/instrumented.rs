//! A [`SessionStore`] that times every call of the store it wraps
//! (`parley_store_operation_duration_seconds`).

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    HistoryBudget, Message, NewSession, ObjectId, PageRequest, Session, SessionPage, SessionStore,
    SessionSummary, SessionTail, TokenTotals,
};
use crate::embedded_db::PendingDurability;
use crate::error::Error;
use crate::metrics::OperationMetrics;

pub struct InstrumentedStore {
    inner: Arc<dyn SessionStore>,
    metrics: OperationMetrics,
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn SessionStore>, metrics: OperationMetrics) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl SessionStore for InstrumentedStore {
    async fn ping(&self) -> Result<(), Error> {
        self.metrics.time("ping", self.inner.ping()).await
    }

    async fn create(&self, session: NewSession) -> Result<Session, Error> {
        self.metrics
            .time("create", self.inner.create(session))
            .await
    }

    async fn get(&self, id: ObjectId) -> Result<Session, Error> {
        self.metrics.time("get", self.inner.get(id)).await
    }

    /// Timed to the answer, not to durability (the caller waits for that).
    async fn get_tail_applied(
        &self,
        id: ObjectId,
        budget: HistoryBudget,
    ) -> Result<(SessionTail, PendingDurability), Error> {
        self.metrics
            .time("get_tail", self.inner.get_tail_applied(id, budget))
            .await
    }

    async fn list(&self, user_id: &str, page: PageRequest) -> Result<SessionPage, Error> {
        self.metrics
            .time("list", self.inner.list(user_id, page))
            .await
    }

    async fn rename(
        &self,
        id: ObjectId,
        user_id: &str,
        title: &str,
    ) -> Result<SessionSummary, Error> {
        self.metrics
            .time("rename", self.inner.rename(id, user_id, title))
            .await
    }

    async fn delete(&self, id: ObjectId, user_id: &str) -> Result<(), Error> {
        self.metrics
            .time("delete", self.inner.delete(id, user_id))
            .await
    }

    async fn append_messages(
        &self,
        id: ObjectId,
        user_id: &str,
        messages: &[Message],
        tokens: TokenTotals,
    ) -> Result<(), Error> {
        self.metrics
            .time(
                "append_messages",
                self.inner.append_messages(id, user_id, messages, tokens),
            )
            .await
    }
}

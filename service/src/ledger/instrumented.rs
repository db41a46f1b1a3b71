//! A [`Ledger`] that times every call of the ledger it wraps
//! (`parley_ledger_operation_duration_seconds`).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Balance, Closed, Credits, Hold, HoldRequest, Ledger, LedgerError, Page, PriceSettlement,
    ReapReport, UsageRecord,
};
use crate::embedded_db::PendingDurability;
use crate::metrics::OperationMetrics;

pub struct InstrumentedLedger {
    inner: Arc<dyn Ledger>,
    metrics: OperationMetrics,
}

impl InstrumentedLedger {
    pub fn new(inner: Arc<dyn Ledger>, metrics: OperationMetrics) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Ledger for InstrumentedLedger {
    async fn hold(&self, request: HoldRequest) -> Result<Hold, LedgerError> {
        self.metrics.time("hold", self.inner.hold(request)).await
    }

    /// Timed to the answer, not to durability (the caller waits for that).
    async fn hold_applied(
        &self,
        request: HoldRequest,
    ) -> Result<(Hold, PendingDurability), LedgerError> {
        self.metrics
            .time("hold", self.inner.hold_applied(request))
            .await
    }

    async fn settle(
        &self,
        request_id: &str,
        price: PriceSettlement,
    ) -> Result<Closed, LedgerError> {
        self.metrics
            .time("settle", self.inner.settle(request_id, price))
            .await
    }

    async fn release(&self, request_id: &str) -> Result<Closed, LedgerError> {
        self.metrics
            .time("release", self.inner.release(request_id))
            .await
    }

    async fn balance(&self, user: &str) -> Result<Balance, LedgerError> {
        self.metrics.time("balance", self.inner.balance(user)).await
    }

    async fn grant(&self, user: &str, amount: Credits) -> Result<Balance, LedgerError> {
        self.metrics
            .time("grant", self.inner.grant(user, amount))
            .await
    }

    async fn usage(&self, user: &str, page: Page) -> Result<Vec<UsageRecord>, LedgerError> {
        self.metrics
            .time("usage", self.inner.usage(user, page))
            .await
    }

    async fn reap(&self, now: DateTime<Utc>) -> Result<ReapReport, LedgerError> {
        self.metrics.time("reap", self.inner.reap(now)).await
    }

    async fn open_holds(&self) -> Result<u64, LedgerError> {
        self.metrics
            .time("open_holds", self.inner.open_holds())
            .await
    }
}

//! The credits ledger: every request is paid for, exactly once.
//!
//! # Flow
//!
//! 1. Price the request's worst case ([`price`] of its input tokens plus
//!    the target's max output) and [`Ledger::hold`] it, with the progress
//!    the reaper charges if the replica dies (the prompt). The hold fails
//!    with [`LedgerError::InsufficientCredits`] when the balance minus open
//!    holds is short.
//! 2. While the reply runs, [`Ledger::hold`] again under the same request
//!    id: re-priced for a fallback target, the lease extended, the output so
//!    far recorded — one write.
//! 3. [`Ledger::settle`] with the actual usage, priced from the open hold in
//!    the same write (charges `min(cost, held)`, records the excess as
//!    overage, releases the rest), or [`Ledger::release`] when it failed
//!    before any output.
//! 4. [`Ledger::reap`], run periodically on every replica, closes holds whose
//!    lease expired (their replica died): charged from the recorded progress,
//!    or released and reported when there is none.
//!
//! A hold is "open" while it exists; it becomes "settled" or "released" by
//! being replaced by the request's one [`UsageRecord`] (its `outcome` says
//! which). Closing is exactly once per request id: repeating `settle` or
//! `release`, in any order, returns the first outcome and charges nothing
//! more. Every error is an `Err`; nothing here defaults to allow.
//!
//! # Stores
//!
//! [`EmbeddedLedger`] (redb) runs each operation in one serializable write
//! transaction, answered once durable (group commit, see
//! [`crate::embedded_db`]), so it is atomic and crash-safe by construction.
//!
//! [`MongoLedger`] uses no multi-document transactions (real MongoDB needs a
//! replica set for them). Each user's account is one document holding the
//! balance, the `held` and `available` counters, the open holds and an outbox
//! of usage records not yet copied to the usage collection. Every money
//! movement is one conditional single-document update, so it is atomic:
//! - hold: `$inc` held / `$inc` available by −amount and `$push` the hold,
//!   only if `available >= amount` and no hold with that id is there; held
//!   again, the hold's fields are `$set` and the counters moved by the
//!   difference, only if the hold still has the amount read;
//! - settle/release: `$pull` the hold, `$inc` the counters, and `$push` the
//!   usage record to the outbox, only if the hold (with the amount read) is
//!   still there — so two closers can never both charge;
//! - then the record is inserted into the usage collection (its `_id` is the
//!   request id, so a repeat is a no-op) and `$pull`ed from the outbox.
//!
//! A crash between those two steps leaves the record in the outbox: the
//! charge and its record were written together, and `reap` (or a repeated
//! settle) finishes the copy. A repeated settle finds the hold gone and
//! returns the record from the outbox, or failing that from the usage
//! collection: the record enters the outbox in the same write that removes
//! the hold and leaves it only after it is in the collection, so one of the
//! two always has it.
//!
//! Request ids must be globally unique (the service mints UUIDs); a reused
//! id is refused when it is detected, never merged into another request.

mod embedded;
mod error;
mod instrumented;
mod model;
mod money;
mod mongo;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use embedded::EmbeddedLedger;

use crate::embedded_db::PendingDurability;
pub use error::LedgerError;
pub use instrumented::InstrumentedLedger;
pub use model::{
    Balance, Closed, Hold, HoldRequest, MAX_PAGE_NUMBER, MAX_PAGE_SIZE, Page, PriceSettlement,
    Progress, ReapReport, ReplyOutcome, Settlement, UsageOutcome, UsageRecord,
};
pub use money::{Credits, MICROS_PER_CREDIT, decimal_credits, price};
pub use mongo::MongoLedger;

/// Settings shared by both stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSettings {
    /// Balance of an account the first time its user is seen.
    pub initial_balance: Credits,
}

/// The credits ledger. Object-safe: the service holds an `Arc<dyn Ledger>`.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Reserves `request.amount` for a request. Held again while open, the
    /// hold takes the request's amount (growing needs the difference to be
    /// available), route, target, lease from now and progress, so a repeat
    /// is idempotent; a repeat after the hold was closed fails with
    /// [`LedgerError::HoldClosed`].
    async fn hold(&self, request: HoldRequest) -> Result<Hold, LedgerError>;

    /// [`Ledger::hold`], answered once the hold is applied (later
    /// operations see it) but perhaps before it is durable: the caller may
    /// start the work it pays for, and waits on the [`PendingDurability`]
    /// before showing any of that work's output.
    async fn hold_applied(
        &self,
        request: HoldRequest,
    ) -> Result<(Hold, PendingDurability), LedgerError> {
        Ok((self.hold(request).await?, PendingDurability::none()))
    }

    /// Charges the actual cost (at most the hold), releases the rest and
    /// writes the request's usage record, exactly once. `price` works the
    /// settlement out from the open hold; after the hold closed, the first
    /// outcome is returned and `price` is not called.
    async fn settle(&self, request_id: &str, price: PriceSettlement)
    -> Result<Closed, LedgerError>;

    /// Releases a hold without charging (failure before any output), exactly
    /// once; after a settle it changes nothing and returns the settlement.
    async fn release(&self, request_id: &str) -> Result<Closed, LedgerError>;

    /// A user's balance; an unknown user has the initial balance.
    async fn balance(&self, user: &str) -> Result<Balance, LedgerError>;

    /// Adds credits to a user's balance (admin).
    async fn grant(&self, user: &str, amount: Credits) -> Result<Balance, LedgerError>;

    /// A user's usage records, newest first.
    async fn usage(&self, user: &str, page: Page) -> Result<Vec<UsageRecord>, LedgerError>;

    /// Closes holds whose lease ended before `now`. Safe to run on every
    /// replica at once: each hold is closed by exactly one reaper.
    async fn reap(&self, now: DateTime<Utc>) -> Result<ReapReport, LedgerError>;

    /// How many holds are open across all accounts (for the holds gauge).
    async fn open_holds(&self) -> Result<u64, LedgerError>;
}

/// Logs the holds a reap pass released without any recorded usage.
fn log_reap_report(report: &ReapReport) {
    for record in &report.released_without_usage {
        tracing::warn!(
            request_id = %record.request_id,
            user = %record.user,
            held = %record.held,
            "hold expired without any recorded usage; released"
        );
    }
    if !report.settled.is_empty() || report.completed_settlements > 0 {
        tracing::info!(
            settled = report.settled.len(),
            completed_settlements = report.completed_settlements,
            "reaped expired holds"
        );
    }
}

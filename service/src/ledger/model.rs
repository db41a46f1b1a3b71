//! The ledger's records and the pure rules that close a hold; both stores
//! share these so they cannot disagree on an amount.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Credits, LedgerError};

/// Longest request id or user id the ledger accepts.
const MAX_ID_LEN: usize = 256;

/// Most usage records one page may return.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Highest page number asked of a listing (a million pages is past any
/// account's history; larger numbers are refused, not read).
pub const MAX_PAGE_NUMBER: u32 = 1_000_000;

/// Reserve credits for one request before it runs, or refresh the hold of
/// one that runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    /// Unique per request (the service mints it); the idempotency key of
    /// every later operation on this hold.
    pub request_id: String,
    pub user: String,
    pub session_id: String,
    /// The route and target the amount is priced for (a fallback changes
    /// them).
    pub route: String,
    pub model: String,
    /// The worst case: input tokens plus the target's max output.
    pub amount: Credits,
    /// The hold stays open this long from now unless held again.
    pub lease: Duration,
    /// The usage so far, for the reaper. Recorded progress only grows: a
    /// repeat reporting less output (a late retry) keeps what was recorded.
    pub progress: Option<Progress>,
}

/// An open hold: credits reserved for a running request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub request_id: String,
    pub user: String,
    pub session_id: String,
    pub route: String,
    pub model: String,
    pub amount: Credits,
    pub lease_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The last usage the running request reported; what the reaper charges
    /// if the replica serving it dies.
    pub progress: Option<Progress>,
}

/// Usage so far of a running request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The price of those tokens.
    pub cost: Credits,
}

/// How a reply that produced output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    Completed,
    /// The client went away and generation was cancelled.
    Cancelled,
    /// The provider failed after output had started.
    Failed,
}

/// The end of a request that ran: what it used and what it costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Route and model that actually answered (a fallback may differ from
    /// the hold's).
    pub route: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The actual price. The ledger charges at most the held amount and
    /// records any excess as `overage` (the hold is the request's budget;
    /// an underestimate is a pricing bug to surface, not a debt to collect).
    pub cost: Credits,
    pub outcome: ReplyOutcome,
    /// The token counts are an estimate (the provider reported none).
    pub estimated: bool,
}

/// Works out a request's settlement from its open hold, inside the write
/// that closes it: the hold's route, model and recorded progress stand in
/// for what the caller did not report, without a separate read or renew.
/// The MongoDB store may call it again when the hold changed meanwhile.
pub type PriceSettlement = Box<dyn Fn(&Hold) -> Result<Settlement, LedgerError> + Send + Sync>;

/// How a request's hold was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum UsageOutcome {
    Completed,
    Cancelled,
    Failed,
    /// Released before any output; nothing charged.
    Released,
    /// Lease expired; charged from the last recorded progress (estimated).
    Reaped,
    /// Lease expired with no recorded usage; released, nothing charged.
    Expired,
}

impl From<ReplyOutcome> for UsageOutcome {
    fn from(outcome: ReplyOutcome) -> Self {
        match outcome {
            ReplyOutcome::Completed => UsageOutcome::Completed,
            ReplyOutcome::Cancelled => UsageOutcome::Cancelled,
            ReplyOutcome::Failed => UsageOutcome::Failed,
        }
    }
}

/// Exactly one per request: written when its hold closes, however it closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    pub request_id: String,
    pub user: String,
    pub session_id: String,
    pub route: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The hold's amount when it closed.
    pub held: Credits,
    /// Taken from the balance: min(cost, held).
    pub charged: Credits,
    /// Cost above the hold, not charged.
    pub overage: Credits,
    pub outcome: UsageOutcome,
    /// True when the tokens come from progress reports, not a final count.
    pub estimated: bool,
    pub started_at: DateTime<Utc>,
    pub settled_at: DateTime<Utc>,
}

/// Result of settling or releasing a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The request's one usage record: on a repeated call, the one the
    /// first call wrote.
    pub record: UsageRecord,
    /// True when the hold had already been closed and this call changed
    /// nothing.
    pub replayed: bool,
    /// The account after the hold closed.
    pub balance: Balance,
}

/// An account's money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub balance: Credits,
    /// Sum of open holds.
    pub held: Credits,
    /// `balance - held`: what new holds may take.
    pub available: Credits,
}

impl Balance {
    pub(crate) fn new(balance: Credits, held: Credits) -> Result<Self, LedgerError> {
        let available = balance
            .checked_sub(held)
            .map_err(|_| LedgerError::Corrupt("held exceeds balance".to_owned()))?;
        Ok(Balance {
            balance,
            held,
            available,
        })
    }

    /// Refuses a hold of `required` more than is available.
    pub(crate) fn cover(&self, required: Credits) -> Result<(), LedgerError> {
        if required > self.available {
            return Err(LedgerError::InsufficientCredits {
                balance: self.balance,
                available: self.available,
                required,
            });
        }
        Ok(())
    }
}

/// One page of a user's usage records, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Zero-based page number.
    pub number: u32,
    /// Records per page, 1..=[`MAX_PAGE_SIZE`].
    pub size: u32,
}

impl Page {
    pub(crate) fn skip_and_limit(self) -> Result<(u64, u32), LedgerError> {
        if self.size == 0 || self.size > MAX_PAGE_SIZE {
            return Err(LedgerError::InvalidRequest("page size must be 1..=500"));
        }
        Ok((u64::from(self.number) * u64::from(self.size), self.size))
    }
}

/// What one `reap` pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Expired holds charged from their last recorded progress.
    pub settled: Vec<UsageRecord>,
    /// Expired holds that had no recorded usage and were released: requests
    /// that ran without a usage record, which is a bug to investigate.
    pub released_without_usage: Vec<UsageRecord>,
    /// Settlements a crashed replica had charged but not finished writing
    /// (MongoDB store only; the embedded store commits both at once).
    pub completed_settlements: usize,
}

/// How a hold is being closed.
pub(crate) enum Closing<'a> {
    Settle(&'a Settlement),
    Release,
    /// Lease expired: charge the recorded progress, else release.
    Reap,
}

/// The usage record that closes `hold`; pure, so both stores charge alike.
pub(crate) fn closing_record(
    hold: &Hold,
    closing: &Closing<'_>,
    now: DateTime<Utc>,
) -> UsageRecord {
    let (route, model, input_tokens, output_tokens, cost, outcome, estimated) = match closing {
        Closing::Settle(s) => (
            s.route.as_str(),
            s.model.as_str(),
            s.input_tokens,
            s.output_tokens,
            s.cost,
            UsageOutcome::from(s.outcome),
            s.estimated,
        ),
        Closing::Release => (
            hold.route.as_str(),
            hold.model.as_str(),
            0,
            0,
            Credits::ZERO,
            UsageOutcome::Released,
            false,
        ),
        Closing::Reap => match &hold.progress {
            Some(p) => (
                hold.route.as_str(),
                p.model.as_str(),
                p.input_tokens,
                p.output_tokens,
                p.cost,
                UsageOutcome::Reaped,
                true,
            ),
            None => (
                hold.route.as_str(),
                hold.model.as_str(),
                0,
                0,
                Credits::ZERO,
                UsageOutcome::Expired,
                false,
            ),
        },
    };
    let charged = cost.min(hold.amount);
    UsageRecord {
        request_id: hold.request_id.clone(),
        user: hold.user.clone(),
        session_id: hold.session_id.clone(),
        route: route.to_owned(),
        model: model.to_owned(),
        input_tokens,
        output_tokens,
        held: hold.amount,
        charged,
        overage: cost.saturating_sub(charged),
        outcome,
        estimated,
        started_at: hold.created_at,
        settled_at: now,
    }
}

/// How the service closes a hold.
pub(crate) enum CloseRequest {
    Settle(PriceSettlement),
    Release,
}

impl CloseRequest {
    /// The usage record that closes `hold`.
    pub(crate) fn record(
        &self,
        hold: &Hold,
        now: DateTime<Utc>,
    ) -> Result<UsageRecord, LedgerError> {
        Ok(match self {
            CloseRequest::Settle(price) => {
                closing_record(hold, &Closing::Settle(&price(hold)?), now)
            }
            CloseRequest::Release => closing_record(hold, &Closing::Release, now),
        })
    }
}

/// Builds the hold a request asks for, leased from `now`.
pub(crate) fn new_hold(request: &HoldRequest, now: DateTime<Utc>) -> Result<Hold, LedgerError> {
    validate_id(&request.request_id)?;
    validate_id(&request.user)?;
    Ok(Hold {
        request_id: request.request_id.clone(),
        user: request.user.clone(),
        session_id: request.session_id.clone(),
        route: request.route.clone(),
        model: request.model.clone(),
        amount: request.amount,
        lease_expires_at: lease_end(now, request.lease)?,
        created_at: now,
        progress: request.progress.clone(),
    })
}

/// Applies a repeated hold request to the open hold it names: the new
/// amount, route, target and lease, and the progress when it brings more.
/// Growing the amount needs the difference to be `available`. Returns the
/// amount the hold had.
pub(crate) fn refresh_hold(
    hold: &mut Hold,
    request: &HoldRequest,
    balance: Balance,
    now: DateTime<Utc>,
) -> Result<Credits, LedgerError> {
    if hold.user != request.user {
        return Err(LedgerError::RequestIdConflict {
            request_id: request.request_id.clone(),
        });
    }
    balance.cover(request.amount.saturating_sub(hold.amount))?;
    let previous = hold.amount;
    hold.amount = request.amount;
    hold.route.clone_from(&request.route);
    hold.model.clone_from(&request.model);
    hold.lease_expires_at = lease_end(now, request.lease)?;
    if let Some(progress) = &request.progress
        && hold
            .progress
            .as_ref()
            .is_none_or(|recorded| progress.output_tokens >= recorded.output_tokens)
    {
        hold.progress = Some(progress.clone());
    }
    Ok(previous)
}

pub(crate) fn lease_end(now: DateTime<Utc>, lease: Duration) -> Result<DateTime<Utc>, LedgerError> {
    let lease = chrono::Duration::from_std(lease)
        .map_err(|_| LedgerError::InvalidRequest("lease too long"))?;
    now.checked_add_signed(lease)
        .ok_or(LedgerError::InvalidRequest("lease too long"))
}

pub(crate) fn validate_id(id: &str) -> Result<(), LedgerError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(LedgerError::InvalidRequest(
            "request and user ids must be 1..=256 bytes",
        ));
    }
    Ok(())
}

/// Now, at the millisecond precision both stores keep, so a time read back
/// compares equal to the one written.
pub(crate) fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

//! The ledger in MongoDB, with single-document atomic updates only (see the
//! module docs of `ledger` for the crash-consistency argument).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, DateTime as BsonDateTime, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

use super::model::{
    CloseRequest, Closing, closing_record, new_hold, now_millis, refresh_hold, validate_id,
};
use super::{
    Balance, Closed, Credits, Hold, HoldRequest, Ledger, LedgerError, LedgerSettings, Page,
    PriceSettlement, Progress, ReapReport, UsageOutcome, UsageRecord, log_reap_report,
};

const ACCOUNTS: &str = "ledger_accounts";
const USAGE: &str = "ledger_usage";

/// How many closed request ids an account remembers, so that a `hold`
/// retried while its request is being closed cannot open it again (older
/// ones are refused by the usage-collection check before the update).
const RECENTLY_CLOSED: i32 = 100;

/// Attempts of an optimistic read-then-conditional-update before giving up.
const MAX_ATTEMPTS: usize = 64;

/// Accounts one reap pass examines.
const REAP_BATCH: i64 = 256;

/// E11000: a unique index refused the write.
const DUPLICATE_KEY: i32 = 11000;

/// The credits ledger on MongoDB.
#[derive(Clone)]
pub struct MongoLedger {
    accounts: Collection<AccountDoc>,
    usage: Collection<UsageDoc>,
    settings: LedgerSettings,
}

/// One user's money, open holds and not-yet-copied usage records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountDoc {
    #[serde(rename = "_id")]
    user: String,
    balance: i64,
    held: i64,
    /// Always `balance - held`, kept as a field so that a hold's
    /// availability check is a plain filter.
    available: i64,
    #[serde(default)]
    holds: Vec<HoldDoc>,
    #[serde(default)]
    outbox: Vec<UsageDoc>,
    #[serde(default)]
    recently_closed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HoldDoc {
    request_id: String,
    user: String,
    session_id: String,
    route: String,
    model: String,
    amount: i64,
    lease_expires_at: BsonDateTime,
    created_at: BsonDateTime,
    progress: Option<ProgressDoc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProgressDoc {
    model: String,
    input_tokens: i64,
    output_tokens: i64,
    cost: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageDoc {
    #[serde(rename = "_id")]
    request_id: String,
    user: String,
    session_id: String,
    route: String,
    model: String,
    input_tokens: i64,
    output_tokens: i64,
    held: i64,
    charged: i64,
    overage: i64,
    outcome: UsageOutcome,
    estimated: bool,
    started_at: BsonDateTime,
    settled_at: BsonDateTime,
}

impl MongoLedger {
    /// Uses `db`'s `ledger_accounts` and `ledger_usage` collections. Call
    /// [`MongoLedger::create_indexes`] once at start.
    pub fn new(db: &Database, settings: LedgerSettings) -> Self {
        MongoLedger {
            accounts: db.collection(ACCOUNTS),
            usage: db.collection(USAGE),
            settings,
        }
    }

    /// Creates the indexes the ledger's queries need (idempotent).
    pub async fn create_indexes(&self) -> Result<(), LedgerError> {
        let by_field = |keys: Document| IndexModel::builder().keys(keys).build();
        self.accounts
            .create_indexes([
                by_field(doc! { "holds.requestId": 1 }),
                by_field(doc! { "holds.leaseExpiresAt": 1 }),
                by_field(doc! { "outbox._id": 1 }),
            ])
            .await?;
        self.usage
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "user": 1, "settledAt": -1 })
                    .options(
                        IndexOptions::builder()
                            .name("user_settledAt".to_owned())
                            .build(),
                    )
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// Creates `user`'s account with the initial balance unless it exists.
    async fn ensure_account(&self, user: &str) -> Result<(), LedgerError> {
        let initial = to_i64(self.settings.initial_balance)?;
        let created = self
            .accounts
            .update_one(
                doc! { "_id": user },
                doc! { "$setOnInsert": {
                    "balance": initial, "held": 0_i64, "available": initial,
                    "holds": [], "outbox": [], "recentlyClosed": [],
                } },
            )
            .upsert(true)
            .await;
        match created {
            // Two first requests of a new user may race to insert; one wins.
            Err(error) if is_duplicate_key(&error) => Ok(()),
            other => other.map(drop).map_err(LedgerError::from),
        }
    }

    async fn account_with_hold(&self, request_id: &str) -> Result<Option<AccountDoc>, LedgerError> {
        Ok(self
            .accounts
            .find_one(doc! { "holds.requestId": request_id })
            .await?)
    }

    /// Applies a repeated hold request to `hold`, open in `account` as read:
    /// one conditional update, which matches only while the hold still has
    /// the amount read (and the account the difference, when it grows).
    /// `None` when something changed meanwhile.
    async fn refresh(
        &self,
        account: &AccountDoc,
        mut hold: Hold,
        request: &HoldRequest,
        now: DateTime<Utc>,
    ) -> Result<Option<Hold>, LedgerError> {
        let previous = to_i64(refresh_hold(&mut hold, request, account.balance()?, now)?)?;
        let extra = to_i64(hold.amount)? - previous;
        let mut filter = doc! {
            "_id": &account.user,
            "holds": { "$elemMatch": { "requestId": &hold.request_id, "amount": previous } },
        };
        if extra > 0 {
            filter.insert("available", doc! { "$gte": extra });
        }
        let hold_doc = bson::to_bson(&HoldDoc::from_hold(&hold)?).map_err(corrupt)?;
        let updated = self
            .accounts
            .update_one(
                filter,
                doc! {
                    "$inc": { "held": extra, "available": -extra },
                    "$set": { "holds.$[hold]": hold_doc },
                },
            )
            .array_filters([doc! { "hold.requestId": &hold.request_id }])
            .await?;
        Ok((updated.matched_count == 1).then_some(hold))
    }

    /// Closes the open hold `request_id`: charges, releases the rest and
    /// records its usage, exactly once.
    async fn close(&self, request_id: &str, closing: CloseRequest) -> Result<Closed, LedgerError> {
        validate_id(request_id)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some(account) = self.account_with_hold(request_id).await? else {
                return self.replay_close(request_id).await;
            };
            let hold = find_hold(&account, request_id)?.to_hold()?;
            let record = closing.record(&hold, now_millis())?;
            if let Some(after) = self.close_hold(&hold, None, &record).await? {
                self.flush(&record).await?;
                return Ok(Closed {
                    record,
                    replayed: false,
                    balance: after.balance()?,
                });
            }
            // The hold was re-priced or closed meanwhile: look again.
        }
        Err(LedgerError::Contention {
            request_id: request_id.to_owned(),
        })
    }

    /// The conditional close: moves the money and queues the usage record in
    /// one update, which matches only while the hold is open with the amount
    /// (and lease, for the reaper) that `record` was computed from.
    async fn close_hold(
        &self,
        hold: &Hold,
        lease_expires_at: Option<DateTime<Utc>>,
        record: &UsageRecord,
    ) -> Result<Option<AccountDoc>, LedgerError> {
        let amount = to_i64(hold.amount)?;
        let charged = to_i64(record.charged)?;
        let mut hold_match = doc! { "requestId": &hold.request_id, "amount": amount };
        if let Some(lease) = lease_expires_at {
            hold_match.insert("leaseExpiresAt", to_bson_time(lease));
        }
        let record_doc = bson::to_bson(&UsageDoc::from_record(record)?).map_err(corrupt)?;
        Ok(self
            .accounts
            .find_one_and_update(
                doc! { "_id": &hold.user, "holds": { "$elemMatch": hold_match } },
                doc! {
                    "$pull": { "holds": { "requestId": &hold.request_id } },
                    "$inc": { "balance": -charged, "held": -amount, "available": amount - charged },
                    "$push": {
                        "outbox": record_doc,
                        "recentlyClosed": { "$each": [&hold.request_id], "$slice": -RECENTLY_CLOSED },
                    },
                },
            )
            .return_document(ReturnDocument::After)
            .await?)
    }

    /// The outcome of a hold that is no longer open: its record is in an
    /// outbox (finish copying it) or in the usage collection. Looked up in
    /// that order, which is the order a record moves in, so it cannot be
    /// missed in transit.
    async fn replay_close(&self, request_id: &str) -> Result<Closed, LedgerError> {
        let queued_in = self
            .accounts
            .find_one(doc! { "outbox._id": request_id })
            .await?;
        if let Some(account) = queued_in
            && let Some(queued) = account.outbox.iter().find(|r| r.request_id == request_id)
        {
            let record = queued.to_record()?;
            self.flush(&record).await?;
            return Ok(Closed {
                record,
                replayed: true,
                balance: account.balance()?,
            });
        }
        let Some(stored) = self.usage.find_one(doc! { "_id": request_id }).await? else {
            return Err(LedgerError::HoldNotFound {
                request_id: request_id.to_owned(),
            });
        };
        let record = stored.to_record()?;
        let balance = self.balance(&record.user).await?;
        Ok(Closed {
            record,
            replayed: true,
            balance,
        })
    }

    /// Copies a queued usage record into the usage collection and removes
    /// it from the outbox. Idempotent. Returns whether this call inserted it.
    async fn flush(&self, record: &UsageRecord) -> Result<bool, LedgerError> {
        let inserted = match self.usage.insert_one(UsageDoc::from_record(record)?).await {
            Ok(_) => true,
            Err(error) if is_duplicate_key(&error) => {
                let stored = self
                    .usage
                    .find_one(doc! { "_id": &record.request_id })
                    .await?;
                // The same id used by another request: keep this record queued
                // (the reaper reports it) rather than lose or merge it.
                if stored.is_none_or(|s| {
                    s.user != record.user || s.started_at != to_bson_time(record.started_at)
                }) {
                    return Err(LedgerError::RequestIdConflict {
                        request_id: record.request_id.clone(),
                    });
                }
                false
            }
            Err(error) => return Err(error.into()),
        };
        self.accounts
            .update_one(
                doc! { "_id": &record.user },
                doc! { "$pull": { "outbox": { "_id": &record.request_id } } },
            )
            .await?;
        Ok(inserted)
    }

    /// Finishes settlements whose usage record is still queued (a replica
    /// died between the charge and the copy).
    async fn flush_outboxes(&self) -> Result<usize, LedgerError> {
        let mut accounts = self
            .accounts
            .find(doc! { "outbox._id": { "$exists": true } })
            .limit(REAP_BATCH)
            .await?;
        let mut completed = 0;
        while let Some(account) = accounts.try_next().await? {
            for queued in &account.outbox {
                if self.flush_in_reaper(&queued.to_record()?).await? {
                    completed += 1;
                }
            }
        }
        Ok(completed)
    }

    /// [`MongoLedger::flush`] for the reaper: a record whose request id
    /// collides with another request's stays queued and is logged, without
    /// stopping the reaper from closing everything else.
    async fn flush_in_reaper(&self, record: &UsageRecord) -> Result<bool, LedgerError> {
        match self.flush(record).await {
            Err(LedgerError::RequestIdConflict { request_id }) => {
                tracing::error!(%request_id, user = %record.user, "usage record collides with another request's; left queued");
                Ok(false)
            }
            other => other,
        }
    }
}

#[async_trait]
impl Ledger for MongoLedger {
    async fn hold(&self, request: HoldRequest) -> Result<Hold, LedgerError> {
        let now = now_millis();
        let hold = new_hold(&request, now)?;
        let amount = to_i64(hold.amount)?;
        let request_id = hold.request_id.as_str();
        let hold_doc = bson::to_bson(&HoldDoc::from_hold(&hold)?).map_err(corrupt)?;
        let mut closed_long_ago_checked = false;
        for _ in 0..MAX_ATTEMPTS {
            // Read first: a refusal is then one read, not a failed update
            // (far dearer on a large account document), and the refusal
            // needs the amounts anyway. The updates below stay conditional,
            // so a change between the two is caught and retried.
            let Some(account) = self.accounts.find_one(doc! { "_id": &hold.user }).await? else {
                self.ensure_account(&hold.user).await?;
                continue;
            };
            if let Some(open) = account.holds.iter().find(|h| h.request_id == request_id) {
                match self
                    .refresh(&account, open.to_hold()?, &request, now)
                    .await?
                {
                    Some(refreshed) => return Ok(refreshed),
                    None => continue,
                }
            }
            if account.outbox.iter().any(|r| r.request_id == request_id)
                || account.recently_closed.iter().any(|id| id == request_id)
            {
                return Err(LedgerError::HoldClosed {
                    request_id: request_id.to_owned(),
                });
            }
            account.balance()?.cover(hold.amount)?;
            // A request closed long ago: its record is in the usage
            // collection. (One closed since is refused by the filter below.)
            if !closed_long_ago_checked {
                if self
                    .usage
                    .find_one(doc! { "_id": request_id })
                    .await?
                    .is_some()
                {
                    return Err(LedgerError::HoldClosed {
                        request_id: request_id.to_owned(),
                    });
                }
                closed_long_ago_checked = true;
            }
            let taken = self
                .accounts
                .find_one_and_update(
                    doc! {
                        "_id": &hold.user,
                        "available": { "$gte": amount },
                        "holds.requestId": { "$ne": request_id },
                        "outbox._id": { "$ne": request_id },
                        "recentlyClosed": { "$ne": request_id },
                    },
                    doc! {
                        "$inc": { "held": amount, "available": -amount },
                        "$push": { "holds": hold_doc.clone() },
                    },
                )
                .await?;
            if taken.is_some() {
                return Ok(hold);
            }
            // The account changed between the read and the update: read again.
        }
        Err(LedgerError::Contention {
            request_id: request_id.to_owned(),
        })
    }

    async fn settle(
        &self,
        request_id: &str,
        price: PriceSettlement,
    ) -> Result<Closed, LedgerError> {
        self.close(request_id, CloseRequest::Settle(price)).await
    }

    async fn release(&self, request_id: &str) -> Result<Closed, LedgerError> {
        self.close(request_id, CloseRequest::Release).await
    }

    async fn balance(&self, user: &str) -> Result<Balance, LedgerError> {
        validate_id(user)?;
        match self.accounts.find_one(doc! { "_id": user }).await? {
            Some(account) => account.balance(),
            None => Balance::new(self.settings.initial_balance, Credits::ZERO),
        }
    }

    async fn open_holds(&self) -> Result<u64, LedgerError> {
        let pipeline = [
            doc! { "$match": { "holds.0": { "$exists": true } } },
            doc! { "$project": { "count": { "$size": "$holds" } } },
            doc! { "$group": { "_id": null, "count": { "$sum": "$count" } } },
        ];
        let mut cursor = self.accounts.aggregate(pipeline).await?;
        let Some(total) = cursor.try_next().await? else {
            return Ok(0);
        };
        let count = match total.get("count") {
            Some(bson::Bson::Int32(count)) => i64::from(*count),
            Some(bson::Bson::Int64(count)) => *count,
            other => {
                return Err(LedgerError::Corrupt(format!(
                    "open hold count is {other:?}"
                )));
            }
        };
        u64::try_from(count).map_err(|_| LedgerError::Corrupt("negative hold count".into()))
    }

    async fn grant(&self, user: &str, amount: Credits) -> Result<Balance, LedgerError> {
        validate_id(user)?;
        let amount = to_i64(amount)?;
        self.ensure_account(user).await?;
        let updated = self
            .accounts
            .find_one_and_update(
                doc! { "_id": user, "balance": { "$lte": i64::MAX - amount } },
                doc! { "$inc": { "balance": amount, "available": amount } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        updated.ok_or(LedgerError::AmountOutOfRange)?.balance()
    }

    async fn usage(&self, user: &str, page: Page) -> Result<Vec<UsageRecord>, LedgerError> {
        validate_id(user)?;
        let (skip, limit) = page.skip_and_limit()?;
        let records: Vec<UsageDoc> = self
            .usage
            .find(doc! { "user": user })
            .sort(doc! { "settledAt": -1, "_id": 1 })
            .skip(skip)
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        records.iter().map(UsageDoc::to_record).collect()
    }

    async fn reap(&self, now: DateTime<Utc>) -> Result<ReapReport, LedgerError> {
        let now_bson = to_bson_time(now);
        let mut report = ReapReport::default();
        let mut accounts = self
            .accounts
            .find(doc! { "holds": { "$elemMatch": { "leaseExpiresAt": { "$lte": now_bson } } } })
            .limit(REAP_BATCH)
            .await?;
        while let Some(account) = accounts.try_next().await? {
            for expired in account
                .holds
                .iter()
                .filter(|h| h.lease_expires_at <= now_bson)
            {
                let hold = expired.to_hold()?;
                let record = closing_record(&hold, &Closing::Reap, now_millis());
                // Matches only if the lease is still the expired one: a
                // renew or another reaper wins instead.
                if self
                    .close_hold(&hold, Some(hold.lease_expires_at), &record)
                    .await?
                    .is_none()
                {
                    continue;
                }
                self.flush_in_reaper(&record).await?;
                if record.outcome == UsageOutcome::Expired {
                    report.released_without_usage.push(record);
                } else {
                    report.settled.push(record);
                }
            }
        }
        report.completed_settlements = self.flush_outboxes().await?;
        log_reap_report(&report);
        Ok(report)
    }
}

impl AccountDoc {
    fn balance(&self) -> Result<Balance, LedgerError> {
        Balance::new(from_i64(self.balance)?, from_i64(self.held)?)
    }
}

fn find_hold<'a>(account: &'a AccountDoc, request_id: &str) -> Result<&'a HoldDoc, LedgerError> {
    account
        .holds
        .iter()
        .find(|h| h.request_id == request_id)
        .ok_or_else(|| {
            LedgerError::Corrupt(format!("account matched hold {request_id} without it"))
        })
}

impl HoldDoc {
    fn from_hold(hold: &Hold) -> Result<Self, LedgerError> {
        Ok(HoldDoc {
            request_id: hold.request_id.clone(),
            user: hold.user.clone(),
            session_id: hold.session_id.clone(),
            route: hold.route.clone(),
            model: hold.model.clone(),
            amount: to_i64(hold.amount)?,
            lease_expires_at: to_bson_time(hold.lease_expires_at),
            created_at: to_bson_time(hold.created_at),
            progress: hold
                .progress
                .as_ref()
                .map(ProgressDoc::from_progress)
                .transpose()?,
        })
    }

    fn to_hold(&self) -> Result<Hold, LedgerError> {
        Ok(Hold {
            request_id: self.request_id.clone(),
            user: self.user.clone(),
            session_id: self.session_id.clone(),
            route: self.route.clone(),
            model: self.model.clone(),
            amount: from_i64(self.amount)?,
            lease_expires_at: from_bson_time(self.lease_expires_at)?,
            created_at: from_bson_time(self.created_at)?,
            progress: self
                .progress
                .as_ref()
                .map(ProgressDoc::to_progress)
                .transpose()?,
        })
    }
}

impl ProgressDoc {
    fn from_progress(progress: &Progress) -> Result<Self, LedgerError> {
        Ok(ProgressDoc {
            model: progress.model.clone(),
            input_tokens: tokens_to_i64(progress.input_tokens)?,
            output_tokens: tokens_to_i64(progress.output_tokens)?,
            cost: to_i64(progress.cost)?,
        })
    }

    fn to_progress(&self) -> Result<Progress, LedgerError> {
        Ok(Progress {
            model: self.model.clone(),
            input_tokens: tokens_from_i64(self.input_tokens)?,
            output_tokens: tokens_from_i64(self.output_tokens)?,
            cost: from_i64(self.cost)?,
        })
    }
}

impl UsageDoc {
    fn from_record(record: &UsageRecord) -> Result<Self, LedgerError> {
        Ok(UsageDoc {
            request_id: record.request_id.clone(),
            user: record.user.clone(),
            session_id: record.session_id.clone(),
            route: record.route.clone(),
            model: record.model.clone(),
            input_tokens: tokens_to_i64(record.input_tokens)?,
            output_tokens: tokens_to_i64(record.output_tokens)?,
            held: to_i64(record.held)?,
            charged: to_i64(record.charged)?,
            overage: to_i64(record.overage)?,
            outcome: record.outcome,
            estimated: record.estimated,
            started_at: to_bson_time(record.started_at),
            settled_at: to_bson_time(record.settled_at),
        })
    }

    fn to_record(&self) -> Result<UsageRecord, LedgerError> {
        Ok(UsageRecord {
            request_id: self.request_id.clone(),
            user: self.user.clone(),
            session_id: self.session_id.clone(),
            route: self.route.clone(),
            model: self.model.clone(),
            input_tokens: tokens_from_i64(self.input_tokens)?,
            output_tokens: tokens_from_i64(self.output_tokens)?,
            held: from_i64(self.held)?,
            charged: from_i64(self.charged)?,
            overage: from_i64(self.overage)?,
            outcome: self.outcome,
            estimated: self.estimated,
            started_at: from_bson_time(self.started_at)?,
            settled_at: from_bson_time(self.settled_at)?,
        })
    }
}

/// BSON has no unsigned integers; amounts above `i64::MAX` µcredits are refused.
fn to_i64(credits: Credits) -> Result<i64, LedgerError> {
    i64::try_from(credits.micros()).map_err(|_| LedgerError::AmountOutOfRange)
}

fn from_i64(micros: i64) -> Result<Credits, LedgerError> {
    u64::try_from(micros)
        .map(Credits::from_micros)
        .map_err(|_| LedgerError::Corrupt(format!("negative amount {micros}")))
}

fn tokens_to_i64(tokens: u64) -> Result<i64, LedgerError> {
    i64::try_from(tokens).map_err(|_| LedgerError::InvalidRequest("token count out of range"))
}

fn tokens_from_i64(tokens: i64) -> Result<u64, LedgerError> {
    u64::try_from(tokens)
        .map_err(|_| LedgerError::Corrupt(format!("negative token count {tokens}")))
}

fn corrupt(error: bson::ser::Error) -> LedgerError {
    LedgerError::Corrupt(error.to_string())
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == DUPLICATE_KEY,
        ErrorKind::Command(command) => command.code == DUPLICATE_KEY,
        _ => false,
    }
}

fn to_bson_time(time: DateTime<Utc>) -> BsonDateTime {
    BsonDateTime::from_millis(time.timestamp_millis())
}

fn from_bson_time(time: BsonDateTime) -> Result<DateTime<Utc>, LedgerError> {
    DateTime::from_timestamp_millis(time.timestamp_millis())
        .ok_or_else(|| LedgerError::Corrupt(format!("time out of range: {time}")))
}

//! The ledger in an embedded redb database. Each operation is one write
//! transaction (redb serializes writers), run through [`EmbeddedDb`] and
//! answered once durable.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::embedded_db::EmbeddedDb;

use super::model::{Closing, closing_record, lease_end, new_hold, now_millis, validate_id};
use super::{
    Balance, Closed, Credits, Hold, HoldRequest, Ledger, LedgerError, LedgerSettings, Page,
    Progress, ReapReport, Settlement, UsageOutcome, UsageRecord, log_reap_report,
};

/// user → [`AccountRow`] (JSON).
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_accounts");
/// request id → open [`Hold`] (JSON).
const HOLDS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_holds");
/// request id → [`UsageRecord`] (JSON): closed holds.
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_usage");
/// (user, i64::MAX − settled-at ms, request id): a user's records, newest first.
const USAGE_BY_USER: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("ledger_usage_by_user");

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct AccountRow {
    balance: Credits,
    held: Credits,
}

/// The credits ledger on redb, sharing the service's database file.
#[derive(Clone)]
pub struct EmbeddedLedger {
    db: Arc<EmbeddedDb>,
    settings: LedgerSettings,
}

impl EmbeddedLedger {
    /// Creates the ledger's tables if they are missing.
    pub async fn new(db: Arc<EmbeddedDb>, settings: LedgerSettings) -> Result<Self, LedgerError> {
        let ledger = EmbeddedLedger { db, settings };
        ledger
            .write(|txn, _| {
                txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
                txn.open_table(HOLDS).map_err(redb::Error::from)?;
                txn.open_table(USAGE).map_err(redb::Error::from)?;
                txn.open_table(USAGE_BY_USER).map_err(redb::Error::from)?;
                Ok(())
            })
            .await?;
        Ok(ledger)
    }

    /// Runs `operation` in one write transaction and commits it only when it
    /// succeeds; answers once the commit is durable.
    async fn write<T, F>(&self, operation: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction, &LedgerSettings) -> Result<T, LedgerError> + Send + 'static,
    {
        let settings = self.settings;
        self.db.write(move |txn| operation(txn, &settings)).await
    }

    async fn close(&self, request_id: &str, closing: OwnedClosing) -> Result<Closed, LedgerError> {
        validate_id(request_id)?;
        let request_id = request_id.to_owned();
        self.write(move |txn, settings| {
            let mut holds = txn.open_table(HOLDS).map_err(redb::Error::from)?;
            let mut accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
            let mut usage = txn.open_table(USAGE).map_err(redb::Error::from)?;
            let Some(hold) = get_json::<Hold>(&holds, &request_id)? else {
                let Some(record) = get_json::<UsageRecord>(&usage, &request_id)? else {
                    return Err(LedgerError::HoldNotFound { request_id });
                };
                let account = account_or_initial(&accounts, &record.user, settings)?;
                return Ok(Closed {
                    balance: Balance::new(account.balance, account.held)?,
                    record,
                    replayed: true,
                });
            };
            let closing = match &closing {
                OwnedClosing::Settle(settlement) => Closing::Settle(settlement),
                OwnedClosing::Release => Closing::Release,
            };
            let record = closing_record(&hold, &closing, now_millis());
            let mut by_user = txn.open_table(USAGE_BY_USER).map_err(redb::Error::from)?;
            let account = close_hold(
                &mut holds,
                &mut accounts,
                &mut usage,
                &mut by_user,
                &hold,
                &record,
                settings,
            )?;
            Ok(Closed {
                balance: Balance::new(account.balance, account.held)?,
                record,
                replayed: false,
            })
        })
        .await
    }

    /// Applies `change` to an open hold and saves it.
    async fn update_hold<F>(&self, request_id: &str, change: F) -> Result<Hold, LedgerError>
    where
        F: FnOnce(&mut Hold, &mut AccountRow) -> Result<(), LedgerError> + Send + 'static,
    {
        validate_id(request_id)?;
        let request_id = request_id.to_owned();
        self.write(move |txn, settings| {
            let mut holds = txn.open_table(HOLDS).map_err(redb::Error::from)?;
            let mut accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
            let Some(mut hold) = get_json::<Hold>(&holds, &request_id)? else {
                let usage = txn.open_table(USAGE).map_err(redb::Error::from)?;
                return Err(closed_or_missing(&usage, request_id)?);
            };
            let mut account = account_or_initial(&accounts, &hold.user, settings)?;
            change(&mut hold, &mut account)?;
            put_json(&mut holds, &request_id, &hold)?;
            put_json(&mut accounts, &hold.user, &account)?;
            Ok(hold)
        })
        .await
    }
}

enum OwnedClosing {
    Settle(Settlement),
    Release,
}

#[async_trait]
impl Ledger for EmbeddedLedger {
    async fn hold(&self, request: HoldRequest) -> Result<Hold, LedgerError> {
        let hold = new_hold(&request, now_millis())?;
        self.write(move |txn, settings| {
            let mut holds = txn.open_table(HOLDS).map_err(redb::Error::from)?;
            if let Some(existing) = get_json::<Hold>(&holds, &hold.request_id)? {
                if existing.user != hold.user {
                    return Err(LedgerError::RequestIdConflict {
                        request_id: hold.request_id,
                    });
                }
                return Ok(existing);
            }
            let usage = txn.open_table(USAGE).map_err(redb::Error::from)?;
            if usage
                .get(hold.request_id.as_str())
                .map_err(redb::Error::from)?
                .is_some()
            {
                return Err(LedgerError::HoldClosed {
                    request_id: hold.request_id,
                });
            }
            let mut accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
            let mut account = account_or_initial(&accounts, &hold.user, settings)?;
            let balance = Balance::new(account.balance, account.held)?;
            if balance.available < hold.amount {
                return Err(LedgerError::InsufficientCredits {
                    balance: balance.balance,
                    available: balance.available,
                    required: hold.amount,
                });
            }
            account.held = account.held.checked_add(hold.amount)?;
            put_json(&mut accounts, &hold.user, &account)?;
            put_json(&mut holds, &hold.request_id, &hold)?;
            Ok(hold)
        })
        .await
    }

    async fn reprice(&self, request_id: &str, amount: Credits) -> Result<Hold, LedgerError> {
        self.update_hold(request_id, move |hold, account| {
            let balance = Balance::new(account.balance, account.held)?;
            let extra = amount.saturating_sub(hold.amount);
            if extra > balance.available {
                return Err(LedgerError::InsufficientCredits {
                    balance: balance.balance,
                    available: balance.available,
                    required: extra,
                });
            }
            account.held = account.held.checked_sub(hold.amount)?.checked_add(amount)?;
            hold.amount = amount;
            Ok(())
        })
        .await
    }

    async fn renew(&self, request_id: &str, lease: Duration) -> Result<Hold, LedgerError> {
        let lease_expires_at = lease_end(now_millis(), lease)?;
        self.update_hold(request_id, move |hold, _| {
            hold.lease_expires_at = lease_expires_at;
            Ok(())
        })
        .await
    }

    async fn record_progress(
        &self,
        request_id: &str,
        progress: Progress,
    ) -> Result<(), LedgerError> {
        self.update_hold(request_id, move |hold, _| {
            hold.progress = Some(progress);
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn settle(&self, settlement: Settlement) -> Result<Closed, LedgerError> {
        let request_id = settlement.request_id.clone();
        self.close(&request_id, OwnedClosing::Settle(settlement))
            .await
    }

    async fn release(&self, request_id: &str) -> Result<Closed, LedgerError> {
        self.close(request_id, OwnedClosing::Release).await
    }

    async fn balance(&self, user: &str) -> Result<Balance, LedgerError> {
        validate_id(user)?;
        let user = user.to_owned();
        let settings = self.settings;
        self.db
            .read(move |txn| {
                let accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
                let account = account_or_initial(&accounts, &user, &settings)?;
                Balance::new(account.balance, account.held)
            })
            .await
    }

    async fn open_holds(&self) -> Result<u64, LedgerError> {
        self.db
            .read(|txn| {
                let holds = txn.open_table(HOLDS).map_err(redb::Error::from)?;
                Ok(holds.len().map_err(redb::Error::from)?)
            })
            .await
    }

    async fn grant(&self, user: &str, amount: Credits) -> Result<Balance, LedgerError> {
        validate_id(user)?;
        let user = user.to_owned();
        self.write(move |txn, settings| {
            let mut accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
            let mut account = account_or_initial(&accounts, &user, settings)?;
            account.balance = account.balance.checked_add(amount)?;
            put_json(&mut accounts, &user, &account)?;
            Balance::new(account.balance, account.held)
        })
        .await
    }

    async fn usage(&self, user: &str, page: Page) -> Result<Vec<UsageRecord>, LedgerError> {
        validate_id(user)?;
        let (skip, limit) = page.skip_and_limit()?;
        let skip =
            usize::try_from(skip).map_err(|_| LedgerError::InvalidRequest("page out of range"))?;
        let user = user.to_owned();
        self.db
            .read(move |txn| {
                let by_user = txn.open_table(USAGE_BY_USER).map_err(redb::Error::from)?;
                let usage = txn.open_table(USAGE).map_err(redb::Error::from)?;
                let mut records = Vec::with_capacity(limit as usize);
                let entries = by_user
                    .range((user.as_str(), i64::MIN, "")..)
                    .map_err(redb::Error::from)?;
                for entry in entries.skip(skip) {
                    let (key, _) = entry.map_err(redb::Error::from)?;
                    let (owner, _, request_id) = key.value();
                    if owner != user || records.len() >= limit as usize {
                        break;
                    }
                    let record = get_json::<UsageRecord>(&usage, request_id)?.ok_or_else(|| {
                        LedgerError::Corrupt(format!(
                            "usage index names missing record {request_id}"
                        ))
                    })?;
                    records.push(record);
                }
                Ok(records)
            })
            .await
    }

    async fn reap(&self, now: DateTime<Utc>) -> Result<ReapReport, LedgerError> {
        let report = self
            .write(move |txn, settings| {
                let mut holds = txn.open_table(HOLDS).map_err(redb::Error::from)?;
                let mut expired = Vec::new();
                for entry in holds.iter().map_err(redb::Error::from)? {
                    let (_, value) = entry.map_err(redb::Error::from)?;
                    let hold: Hold = decode(value.value())?;
                    if hold.lease_expires_at <= now {
                        expired.push(hold);
                    }
                }
                let mut accounts = txn.open_table(ACCOUNTS).map_err(redb::Error::from)?;
                let mut usage = txn.open_table(USAGE).map_err(redb::Error::from)?;
                let mut by_user = txn.open_table(USAGE_BY_USER).map_err(redb::Error::from)?;
                let mut report = ReapReport::default();
                let settled_at = now_millis();
                for hold in expired {
                    let record = closing_record(&hold, &Closing::Reap, settled_at);
                    close_hold(
                        &mut holds,
                        &mut accounts,
                        &mut usage,
                        &mut by_user,
                        &hold,
                        &record,
                        settings,
                    )?;
                    if record.outcome == UsageOutcome::Expired {
                        report.released_without_usage.push(record);
                    } else {
                        report.settled.push(record);
                    }
                }
                Ok(report)
            })
            .await?;
        log_reap_report(&report);
        Ok(report)
    }
}

/// Replaces an open hold by its usage record and moves the money; returns
/// the account after.
fn close_hold(
    holds: &mut Table<'_, &'static str, &'static [u8]>,
    accounts: &mut Table<'_, &'static str, &'static [u8]>,
    usage: &mut Table<'_, &'static str, &'static [u8]>,
    by_user: &mut Table<'_, (&'static str, i64, &'static str), ()>,
    hold: &Hold,
    record: &UsageRecord,
    settings: &LedgerSettings,
) -> Result<AccountRow, LedgerError> {
    let mut account = account_or_initial(accounts, &hold.user, settings)?;
    account.held = account.held.checked_sub(hold.amount)?;
    account.balance = account.balance.checked_sub(record.charged)?;
    put_json(accounts, &hold.user, &account)?;
    holds
        .remove(hold.request_id.as_str())
        .map_err(redb::Error::from)?;
    put_json(usage, &record.request_id, record)?;
    let newest_first = i64::MAX - record.settled_at.timestamp_millis();
    by_user
        .insert(
            (
                record.user.as_str(),
                newest_first,
                record.request_id.as_str(),
            ),
            (),
        )
        .map_err(redb::Error::from)?;
    Ok(account)
}

fn closed_or_missing(
    usage: &impl ReadableTable<&'static str, &'static [u8]>,
    request_id: String,
) -> Result<LedgerError, LedgerError> {
    if usage
        .get(request_id.as_str())
        .map_err(redb::Error::from)?
        .is_some()
    {
        Ok(LedgerError::HoldClosed { request_id })
    } else {
        Ok(LedgerError::HoldNotFound { request_id })
    }
}

fn account_or_initial(
    accounts: &impl ReadableTable<&'static str, &'static [u8]>,
    user: &str,
    settings: &LedgerSettings,
) -> Result<AccountRow, LedgerError> {
    Ok(get_json(accounts, user)?.unwrap_or(AccountRow {
        balance: settings.initial_balance,
        held: Credits::ZERO,
    }))
}

fn get_json<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, LedgerError> {
    match table.get(key).map_err(redb::Error::from)? {
        Some(value) => decode(value.value()).map(Some),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(
    table: &mut Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<(), LedgerError> {
    let bytes = serde_json::to_vec(value).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    table
        .insert(key, bytes.as_slice())
        .map_err(redb::Error::from)?;
    Ok(())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt(e.to_string()))
}

//! The ledger in an embedded redb database. Each operation is atomic and
//! isolated: it runs through [`EmbeddedDb`], which may share a write
//! transaction among several operations (and their open tables,
//! [`LedgerTables`]), and is answered once durable.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadableTable, ReadableTableMetadata, Table};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::embedded_db::{EmbeddedDb, PendingDurability};
use crate::embedded_tables::{ACCOUNTS, HOLDS, LedgerTables, USAGE, USAGE_BY_USER, WriteTables};

use super::model::{
    CloseRequest, Closing, closing_record, new_hold, now_millis, refresh_hold, validate_id,
};
use super::{
    Balance, Closed, Credits, Hold, HoldRequest, Ledger, LedgerError, LedgerSettings, Page,
    PriceSettlement, ReapReport, UsageOutcome, UsageRecord, log_reap_report,
};

/// An account's row in [`ACCOUNTS`].
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
        // Lending an operation the ledger's tables creates them.
        ledger.write(|_, _| Ok(())).await?;
        Ok(ledger)
    }

    /// Runs `operation` on the ledger's tables in one write transaction and
    /// commits it only when it succeeds; answers once the commit is
    /// durable. It may run more than once ([`EmbeddedDb::write`]).
    async fn write<T, F>(&self, operation: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&mut LedgerTables<'_>, &LedgerSettings) -> Result<T, LedgerError> + Send + 'static,
    {
        let settings = self.settings;
        self.db
            .write(move |tables| operation(ledger_tables(tables)?, &settings))
            .await
    }

    async fn close(&self, request_id: &str, closing: CloseRequest) -> Result<Closed, LedgerError> {
        validate_id(request_id)?;
        let request_id = request_id.to_owned();
        self.write(move |tables, settings| {
            let Some(hold) = get_json::<Hold>(&tables.holds, &request_id)? else {
                let Some(record) = get_json::<UsageRecord>(&tables.usage, &request_id)? else {
                    return Err(LedgerError::HoldNotFound {
                        request_id: request_id.clone(),
                    });
                };
                let account = account_or_initial(&tables.accounts, &record.user, settings)?;
                return Ok(Closed {
                    balance: Balance::new(account.balance, account.held)?,
                    record,
                    replayed: true,
                });
            };
            let record = closing.record(&hold, now_millis())?;
            let account = close_hold(tables, &hold, &record, settings)?;
            Ok(Closed {
                balance: Balance::new(account.balance, account.held)?,
                record,
                replayed: false,
            })
        })
        .await
    }
}

#[async_trait]
impl Ledger for EmbeddedLedger {
    async fn hold(&self, request: HoldRequest) -> Result<Hold, LedgerError> {
        let (hold, pending) = self.hold_applied(request).await?;
        pending.wait::<LedgerError>().await?;
        Ok(hold)
    }

    async fn hold_applied(
        &self,
        request: HoldRequest,
    ) -> Result<(Hold, PendingDurability), LedgerError> {
        let now = now_millis();
        let hold = new_hold(&request, now)?;
        let settings = self.settings;
        self.db
            .write_applied(move |tables| {
                let settings = &settings;
                let LedgerTables {
                    accounts,
                    holds,
                    usage,
                    ..
                } = ledger_tables(tables)?;
                let mut account = account_or_initial(accounts, &hold.user, settings)?;
                let balance = Balance::new(account.balance, account.held)?;
                if let Some(mut open) = get_json::<Hold>(holds, &hold.request_id)? {
                    let previous = refresh_hold(&mut open, &request, balance, now)?;
                    account.held = account
                        .held
                        .checked_sub(previous)?
                        .checked_add(open.amount)?;
                    put_json(accounts, &open.user, &account)?;
                    put_json(holds, &open.request_id, &open)?;
                    return Ok(open);
                }
                if usage
                    .get(hold.request_id.as_str())
                    .map_err(redb::Error::from)?
                    .is_some()
                {
                    return Err(LedgerError::HoldClosed {
                        request_id: hold.request_id.clone(),
                    });
                }
                balance.cover(hold.amount)?;
                account.held = account.held.checked_add(hold.amount)?;
                put_json(accounts, &hold.user, &account)?;
                put_json(holds, &hold.request_id, &hold)?;
                Ok(hold.clone())
            })
            .await
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
        self.write(move |tables, settings| {
            let mut account = account_or_initial(&tables.accounts, &user, settings)?;
            account.balance = account.balance.checked_add(amount)?;
            put_json(&mut tables.accounts, &user, &account)?;
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
            .write(move |tables, settings| {
                let mut expired = Vec::new();
                for entry in tables.holds.iter().map_err(redb::Error::from)? {
                    let (_, value) = entry.map_err(redb::Error::from)?;
                    let hold: Hold = decode(value.value())?;
                    if hold.lease_expires_at <= now {
                        expired.push(hold);
                    }
                }
                let mut report = ReapReport::default();
                let settled_at = now_millis();
                for hold in expired {
                    let record = closing_record(&hold, &Closing::Reap, settled_at);
                    close_hold(tables, &hold, &record, settings)?;
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
    tables: &mut LedgerTables<'_>,
    hold: &Hold,
    record: &UsageRecord,
    settings: &LedgerSettings,
) -> Result<AccountRow, LedgerError> {
    let LedgerTables {
        accounts,
        holds,
        usage,
        usage_by_user,
    } = tables;
    let mut account = account_or_initial(accounts, &hold.user, settings)?;
    account.held = account.held.checked_sub(hold.amount)?;
    account.balance = account.balance.checked_sub(record.charged)?;
    put_json(accounts, &hold.user, &account)?;
    holds
        .remove(hold.request_id.as_str())
        .map_err(redb::Error::from)?;
    put_json(usage, &record.request_id, record)?;
    let newest_first = i64::MAX - record.settled_at.timestamp_millis();
    usage_by_user
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

/// The ledger's tables in `tables`' transaction, opened on its first use.
fn ledger_tables<'a, 'txn>(
    tables: &'a mut WriteTables<'txn>,
) -> Result<&'a mut LedgerTables<'txn>, LedgerError> {
    Ok(tables.ledger().map_err(redb::Error::from)?)
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

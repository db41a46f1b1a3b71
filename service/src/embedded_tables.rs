//! The tables of the embedded database that every reply writes, and a write
//! transaction's handles on them.
//!
//! Opening a table in a redb write transaction looks it up in the table
//! tree by name and checks its types; dropping the handle stages its new
//! root. A reply's four writes (its hold, its question, its settlement, its
//! answer) opened 14 tables this way: 2.7% of the service's CPU at 100
//! clients. The writer runs a score of operations in one transaction
//! ([`crate::embedded_db`]), so each group below is opened once per
//! transaction, on first use, and lent to every operation after it
//! ([`WriteTables`]). Tables outside these groups (API keys, audit) are
//! written rarely and opened by their operations through
//! [`WriteTables::transaction`]; nothing opens a grouped table that way,
//! since redb refuses a second handle on a table in one transaction.

use redb::{Table, TableDefinition, TableError, WriteTransaction};

/// A chat session's id: an ObjectId's 12 bytes.
pub type SessionId = [u8; 12];

/// user → account (JSON): balance and held credits.
pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_accounts");
/// request id → open hold (JSON).
pub const HOLDS: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_holds");
/// request id → usage record (JSON): closed holds.
pub const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_usage");
/// (user, i64::MAX − settled-at ms, request id): a user's records, newest first.
pub const USAGE_BY_USER: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("ledger_usage_by_user");

/// id → session record (JSON, without messages).
pub const SESSIONS: TableDefinition<SessionId, &[u8]> = TableDefinition::new("chat_sessions");
/// (id, sequence) → message (JSON); appends never rewrite earlier messages.
pub const MESSAGES: TableDefinition<(SessionId, u32), &[u8]> =
    TableDefinition::new("chat_session_messages");
/// (user, updatedAt ms, id) → (): a user's sessions, newest last.
pub const SESSIONS_BY_USER: TableDefinition<(&str, u64, SessionId), ()> =
    TableDefinition::new("chat_sessions_by_user");
/// user → number of sessions, for pagination totals.
pub const SESSION_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("chat_session_counts");

/// The credits ledger's tables, open in one write transaction.
pub struct LedgerTables<'txn> {
    pub accounts: Table<'txn, &'static str, &'static [u8]>,
    pub holds: Table<'txn, &'static str, &'static [u8]>,
    pub usage: Table<'txn, &'static str, &'static [u8]>,
    pub usage_by_user: Table<'txn, (&'static str, i64, &'static str), ()>,
}

/// The chat sessions' tables, open in one write transaction.
pub struct SessionTables<'txn> {
    pub sessions: Table<'txn, SessionId, &'static [u8]>,
    pub messages: Table<'txn, (SessionId, u32), &'static [u8]>,
    pub by_user: Table<'txn, (&'static str, u64, SessionId), ()>,
    pub counts: Table<'txn, &'static str, u64>,
}

/// A write transaction with the groups its operations opened so far. The
/// handles close (and stage their roots) when it is dropped, before the
/// transaction commits.
pub struct WriteTables<'txn> {
    transaction: &'txn WriteTransaction,
    ledger: Option<LedgerTables<'txn>>,
    sessions: Option<SessionTables<'txn>>,
}

impl<'txn> WriteTables<'txn> {
    pub fn new(transaction: &'txn WriteTransaction) -> Self {
        Self {
            transaction,
            ledger: None,
            sessions: None,
        }
    }

    /// The transaction, for the tables outside the groups.
    pub fn transaction(&self) -> &'txn WriteTransaction {
        self.transaction
    }

    /// The ledger's tables, created if they are missing.
    pub fn ledger(&mut self) -> Result<&mut LedgerTables<'txn>, TableError> {
        let transaction = self.transaction;
        open_once(&mut self.ledger, || {
            Ok(LedgerTables {
                accounts: transaction.open_table(ACCOUNTS)?,
                holds: transaction.open_table(HOLDS)?,
                usage: transaction.open_table(USAGE)?,
                usage_by_user: transaction.open_table(USAGE_BY_USER)?,
            })
        })
    }

    /// The sessions' tables, created if they are missing.
    pub fn sessions(&mut self) -> Result<&mut SessionTables<'txn>, TableError> {
        let transaction = self.transaction;
        open_once(&mut self.sessions, || {
            Ok(SessionTables {
                sessions: transaction.open_table(SESSIONS)?,
                messages: transaction.open_table(MESSAGES)?,
                by_user: transaction.open_table(SESSIONS_BY_USER)?,
                counts: transaction.open_table(SESSION_COUNTS)?,
            })
        })
    }
}

/// The group in `slot`, opened by `open` when it is not open yet.
fn open_once<T>(
    slot: &mut Option<T>,
    open: impl FnOnce() -> Result<T, TableError>,
) -> Result<&mut T, TableError> {
    match slot {
        Some(group) => Ok(group),
        empty => Ok(empty.insert(open()?)),
    }
}

use super::Credits;

/// Why a ledger operation failed. Every variant denies the request that
/// asked: callers never turn a ledger error into "allow".
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits: {required} required, {available} available (balance {balance})")]
    InsufficientCredits {
        balance: Credits,
        available: Credits,
        required: Credits,
    },
    #[error("no hold for request {request_id}")]
    HoldNotFound { request_id: String },
    #[error("the hold for request {request_id} is already settled or released")]
    HoldClosed { request_id: String },
    #[error("request id {request_id} is already used by another user's hold")]
    RequestIdConflict { request_id: String },
    #[error("invalid ledger request: {0}")]
    InvalidRequest(&'static str),
    #[error("invalid credit amount {0:?}")]
    InvalidAmount(String),
    #[error("credit amount out of range")]
    AmountOutOfRange,
    #[error("request {request_id} kept changing under concurrent updates; gave up")]
    Contention { request_id: String },
    #[error("ledger data is corrupt: {0}")]
    Corrupt(String),
    #[error("MongoDB ledger store: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("embedded ledger store: {0}")]
    Embedded(#[from] redb::Error),
}

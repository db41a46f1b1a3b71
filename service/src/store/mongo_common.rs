//! What every collection of the MongoDB store shares: the store's handle
//! (one database) and how timestamps, counts and driver errors map. The
//! collections' own modules (sessions, audit, API keys) build on it.

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Document};
use mongodb::{Collection, Database};

use crate::error::Error;

#[derive(Clone)]
pub struct MongoStore {
    pub(super) database: Database,
    /// `chat_sessions`, untyped here: its documents belong to the sessions
    /// module.
    pub(super) sessions: Collection<Document>,
}

impl MongoStore {
    /// The database, shared with other MongoDB-backed stores.
    pub fn database(&self) -> &Database {
        &self.database
    }
}

pub(super) fn bson_time(timestamp: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(timestamp.timestamp_millis())
}

/// BSON dates span more than chrono's range; out-of-range ones clamp.
pub(super) fn utc(timestamp: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(timestamp.timestamp_millis())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// BSON has no unsigned integers; counts beyond i64 saturate.
pub(super) fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Connection-level failures are outages (503, retryable); anything else is internal.
pub(super) fn mongo_error(error: mongodb::error::Error) -> Error {
    use mongodb::error::ErrorKind;
    match *error.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => Error::StoreUnavailable(error.to_string()),
        _ => Error::Store(error.to_string()),
    }
}

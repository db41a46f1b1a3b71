//! What every table of the embedded store shares: the store's handle (one
//! redb file) and how records and timestamps are encoded. The tables' own
//! modules (sessions, audit, API keys) build on it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::embedded_tails::SessionTails;
use crate::embedded_db::EmbeddedDb;
use crate::error::Error;

#[derive(Clone)]
pub struct EmbeddedStore {
    pub(super) database: Arc<EmbeddedDb>,
    /// The newest messages of recently replied-to sessions.
    pub(super) tails: Arc<SessionTails>,
}

impl EmbeddedStore {
    /// The database file, shared with other embedded stores (redb allows one
    /// open handle per file).
    pub fn database(&self) -> &Arc<EmbeddedDb> {
        &self.database
    }
}

/// Index key for a timestamp; timestamps before 1970 sort first.
pub(super) fn millis_key(millis: i64) -> u64 {
    u64::try_from(millis).unwrap_or(0)
}

pub(super) fn from_millis(millis: i64) -> Result<DateTime<Utc>, Error> {
    DateTime::from_timestamp_millis(millis)
        .ok_or_else(|| Error::Store(format!("timestamp {millis} out of range")))
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|error| Error::Store(format!("encoding a record: {error}")))
}

pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes)
        .map_err(|error| Error::Store(format!("decoding a record: {error}")))
}

/// An ObjectId field of a record, in the form its `Serialize` writes to JSON
/// (`{"$oid": "<24 hex digits>"}`), read without allocating: the generic
/// BSON visitor builds a document for every id and `ObjectId::parse_str` a
/// vector (a session's history read decodes one per message).
pub(super) mod object_id {
    use std::borrow::Cow;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::store::ObjectId;

    #[derive(Deserialize)]
    struct Extended<'a> {
        #[serde(rename = "$oid", borrow)]
        hex: Cow<'a, str>,
    }

    pub fn serialize<S: Serializer>(id: &ObjectId, serializer: S) -> Result<S::Ok, S::Error> {
        id.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectId, D::Error> {
        let extended = Extended::deserialize(deserializer)?;
        parse_hex(extended.hex.as_bytes())
            .map(ObjectId::from_bytes)
            .ok_or_else(|| serde::de::Error::custom("an ObjectId is 24 hex digits"))
    }

    fn parse_hex(hex: &[u8]) -> Option<[u8; 12]> {
        let digit = |byte: u8| char::from(byte).to_digit(16);
        let mut bytes = [0; 12];
        if hex.len() != 2 * bytes.len() {
            return None;
        }
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            // Two hex digits: at most 0xff.
            *byte = u8::try_from(digit(pair[0])? << 4 | digit(pair[1])?).ok()?;
        }
        Some(bytes)
    }
}

impl From<redb::Error> for Error {
    fn from(error: redb::Error) -> Self {
        storage_error(error)
    }
}

/// I/O failures are outages (503, retryable); anything else is an internal error.
pub(super) fn storage_error(error: impl Into<redb::Error>) -> Error {
    match error.into() {
        redb::Error::Io(error) => Error::StoreUnavailable(format!("embedded store I/O: {error}")),
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
            Error::StoreUnavailable("embedded store closed after an I/O error".into())
        }
        other => Error::Store(format!("embedded store: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::object_id;
    use crate::store::ObjectId;

    /// A record as rows were written before the codec: the id through its
    /// own `Serialize`.
    #[derive(Serialize, Deserialize)]
    struct Plain {
        id: ObjectId,
    }

    #[derive(Serialize, Deserialize)]
    struct Coded {
        #[serde(with = "object_id")]
        id: ObjectId,
    }

    #[test]
    fn the_object_id_codec_reads_and_writes_the_rows_format() {
        let id = ObjectId::new();
        let row = serde_json::to_vec(&Plain { id }).unwrap();
        assert_eq!(
            String::from_utf8(row.clone()).unwrap(),
            format!(r#"{{"id":{{"$oid":"{}"}}}}"#, id.to_hex())
        );
        assert_eq!(serde_json::from_slice::<Coded>(&row).unwrap().id, id);
        assert_eq!(serde_json::to_vec(&Coded { id }).unwrap(), row);
        assert!(serde_json::from_slice::<Coded>(br#"{"id":{"$oid":"not hex"}}"#).is_err());
        assert!(
            serde_json::from_slice::<Coded>(br#"{"id":{"$oid":"0123456789abcdef0123456g"}}"#)
                .is_err()
        );
        assert!(
            serde_json::from_slice::<Coded>(br#"{"id":{"$oid":"0123456789abcdef012345678"}}"#)
                .is_err()
        );
        let upper = format!(r#"{{"id":{{"$oid":"{}"}}}}"#, id.to_hex().to_uppercase());
        assert_eq!(serde_json::from_str::<Coded>(&upper).unwrap().id, id);
        assert!(serde_json::from_slice::<Coded>(br#"{"id":"0123456789abcdef01234567"}"#).is_err());
    }
}

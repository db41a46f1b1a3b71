//! API keys in the embedded database.
//!
//! Layout:
//! - `api_keys`: id -> record (JSON)
//! - `api_keys_by_user`: (user, createdAt ms, id) -> (); newest first backwards

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::ObjectId;
use super::embedded_common::{
    EmbeddedStore, decode, encode, from_millis, millis_key, storage_error,
};
use super::keys::{ApiKey, ApiKeyStore, digest_from_hex, digest_hex};
use crate::error::Error;
use crate::identity::Role;

type Id = [u8; 12];

const KEYS: TableDefinition<Id, &[u8]> = TableDefinition::new("api_keys");
const BY_USER: TableDefinition<(&str, u64, Id), ()> = TableDefinition::new("api_keys_by_user");

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyRecord {
    user_id: String,
    name: String,
    role: Role,
    cohorts: Vec<String>,
    secret_sha256: String,
    created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<i64>,
}

/// Creates the key tables (part of opening the embedded store).
pub(super) fn create_tables(transaction: &WriteTransaction) -> Result<(), Error> {
    transaction.open_table(KEYS).map_err(storage_error)?;
    transaction.open_table(BY_USER).map_err(storage_error)?;
    Ok(())
}

#[async_trait]
impl ApiKeyStore for EmbeddedStore {
    async fn create_key(&self, key: &ApiKey) -> Result<(), Error> {
        let id = key.id.bytes();
        let user = key.user_id.clone();
        let created = millis_key(key.created_at.timestamp_millis());
        let encoded = encode(&KeyRecord {
            user_id: key.user_id.clone(),
            name: key.name.clone(),
            role: key.role,
            cohorts: key.cohorts.clone(),
            secret_sha256: digest_hex(&key.secret_sha256),
            created_at_ms: key.created_at.timestamp_millis(),
            expires_at_ms: key.expires_at.map(|at| at.timestamp_millis()),
        })?;
        self.database()
            .write(move |tables| {
                let transaction = tables.transaction();
                let mut keys = transaction.open_table(KEYS).map_err(storage_error)?;
                keys.insert(id, encoded.as_slice()).map_err(storage_error)?;
                let mut by_user = transaction.open_table(BY_USER).map_err(storage_error)?;
                by_user
                    .insert((user.as_str(), created, id), ())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await
    }

    async fn key(&self, id: ObjectId) -> Result<Option<ApiKey>, Error> {
        self.database()
            .read(move |transaction| {
                let keys = transaction.open_table(KEYS).map_err(storage_error)?;
                load(&keys, id.bytes())
            })
            .await
    }

    async fn keys_of(&self, user_id: &str) -> Result<Vec<ApiKey>, Error> {
        let user = user_id.to_owned();
        self.database()
            .read(move |transaction| {
                let keys = transaction.open_table(KEYS).map_err(storage_error)?;
                let by_user = transaction.open_table(BY_USER).map_err(storage_error)?;
                let mut found = Vec::new();
                let range = by_user
                    .range((user.as_str(), 0, [0; 12])..=(user.as_str(), u64::MAX, [u8::MAX; 12]))
                    .map_err(storage_error)?;
                for entry in range.rev() {
                    let (index, _) = entry.map_err(storage_error)?;
                    let key = load(&keys, index.value().2)?
                        .ok_or_else(|| Error::Store("the key index names a missing key".into()))?;
                    found.push(key);
                }
                Ok(found)
            })
            .await
    }

    async fn delete_key(&self, id: ObjectId, owner: Option<&str>) -> Result<bool, Error> {
        let owner = owner.map(str::to_owned);
        self.database()
            .write(move |tables| {
                let transaction = tables.transaction();
                let mut keys = transaction.open_table(KEYS).map_err(storage_error)?;
                let Some(key) = load(&keys, id.bytes())? else {
                    return Ok(false);
                };
                if owner.as_ref().is_some_and(|owner| *owner != key.user_id) {
                    return Ok(false);
                }
                keys.remove(id.bytes()).map_err(storage_error)?;
                let mut by_user = transaction.open_table(BY_USER).map_err(storage_error)?;
                let created = millis_key(key.created_at.timestamp_millis());
                by_user
                    .remove((key.user_id.as_str(), created, id.bytes()))
                    .map_err(storage_error)?;
                Ok(true)
            })
            .await
    }
}

fn load(table: &impl ReadableTable<Id, &'static [u8]>, id: Id) -> Result<Option<ApiKey>, Error> {
    let Some(value) = table.get(id).map_err(storage_error)? else {
        return Ok(None);
    };
    let record: KeyRecord = decode(value.value())?;
    Ok(Some(ApiKey {
        id: ObjectId::from_bytes(id),
        user_id: record.user_id,
        name: record.name,
        role: record.role,
        cohorts: record.cohorts,
        secret_sha256: digest_from_hex(&record.secret_sha256)?,
        created_at: from_millis(record.created_at_ms)?,
        expires_at: record.expires_at_ms.map(from_millis).transpose()?,
    }))
}

//! API keys in MongoDB (collection `api_keys`).

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::ObjectId;
use super::keys::{ApiKey, ApiKeyStore, digest_from_hex, digest_hex};
use super::mongo_common::{MongoStore, bson_time, mongo_error, utc};
use crate::error::Error;
use crate::identity::Role;

const COLLECTION: &str = "api_keys";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyDocument {
    #[serde(rename = "_id")]
    id: ObjectId,
    user_id: String,
    name: String,
    role: Role,
    cohorts: Vec<String>,
    secret_sha256: String,
    created_at: bson::DateTime,
    #[serde(default)]
    expires_at: Option<bson::DateTime>,
}

fn collection(store: &MongoStore) -> Collection<KeyDocument> {
    store.database().collection(COLLECTION)
}

/// A user's keys are listed newest first; lookups go by `_id`.
pub(super) async fn create_indexes(store: &MongoStore) -> Result<(), Error> {
    let by_user = IndexModel::builder()
        .keys(doc! { "userId": 1, "createdAt": -1, "_id": -1 })
        .options(
            IndexOptions::builder()
                .name("userId_createdAt".to_owned())
                .build(),
        )
        .build();
    collection(store)
        .create_index(by_user)
        .await
        .map_err(mongo_error)?;
    Ok(())
}

#[async_trait]
impl ApiKeyStore for MongoStore {
    async fn create_key(&self, key: &ApiKey) -> Result<(), Error> {
        collection(self)
            .insert_one(KeyDocument {
                id: key.id,
                user_id: key.user_id.clone(),
                name: key.name.clone(),
                role: key.role,
                cohorts: key.cohorts.clone(),
                secret_sha256: digest_hex(&key.secret_sha256),
                created_at: bson_time(key.created_at),
                expires_at: key.expires_at.map(bson_time),
            })
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    async fn key(&self, id: ObjectId) -> Result<Option<ApiKey>, Error> {
        collection(self)
            .find_one(doc! { "_id": id })
            .await
            .map_err(mongo_error)?
            .map(api_key)
            .transpose()
    }

    async fn keys_of(&self, user_id: &str) -> Result<Vec<ApiKey>, Error> {
        let documents: Vec<KeyDocument> = collection(self)
            .find(doc! { "userId": user_id })
            .sort(doc! { "createdAt": -1, "_id": -1 })
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        documents.into_iter().map(api_key).collect()
    }

    async fn delete_key(&self, id: ObjectId, owner: Option<&str>) -> Result<bool, Error> {
        let mut filter = Document::new();
        filter.insert("_id", id);
        if let Some(owner) = owner {
            filter.insert("userId", owner);
        }
        let deleted = collection(self)
            .delete_one(filter)
            .await
            .map_err(mongo_error)?;
        Ok(deleted.deleted_count > 0)
    }
}

fn api_key(document: KeyDocument) -> Result<ApiKey, Error> {
    Ok(ApiKey {
        id: document.id,
        user_id: document.user_id,
        name: document.name,
        role: document.role,
        cohorts: document.cohorts,
        secret_sha256: digest_from_hex(&document.secret_sha256)?,
        created_at: utc(document.created_at),
        expires_at: document.expires_at.map(utc),
    })
}

//! The audits in MongoDB: observations (collection `observation_audit`) and
//! content-policy blocks (collection `policy_blocks`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::audit::{
    AuditQuery, BlockAudit, BlockDirection, BlockKind, BlockPage, BlockQuery, CohortScope,
    Observation, ObservationAudit, ObservationEnd, ObservationPage, PolicyBlock,
};
use super::mongo_common::{MongoStore, bson_time, mongo_error, utc};
use super::{ObjectId, PageRequest};
use crate::error::Error;

const COLLECTION: &str = "observation_audit";
const BLOCKS_COLLECTION: &str = "policy_blocks";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObservationDocument {
    #[serde(rename = "_id")]
    id: ObjectId,
    observer_id: String,
    observer_role: String,
    observed_user_id: String,
    observed_cohorts: Vec<String>,
    session_id: ObjectId,
    started_at: bson::DateTime,
    #[serde(default)]
    ended_at: Option<bson::DateTime>,
    #[serde(default)]
    outcome: Option<String>,
}

fn collection(store: &MongoStore) -> Collection<ObservationDocument> {
    store.database().collection(COLLECTION)
}

fn index(name: &str, keys: Document) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

/// The audits' indexes: one per way each is listed, newest first.
pub(super) async fn create_indexes(store: &MongoStore) -> Result<(), Error> {
    collection(store)
        .create_indexes([
            index("startedAt", doc! { "startedAt": -1, "_id": -1 }),
            index(
                "observedUserId_startedAt",
                doc! { "observedUserId": 1, "startedAt": -1, "_id": -1 },
            ),
            index(
                "observedCohorts_startedAt",
                doc! { "observedCohorts": 1, "startedAt": -1, "_id": -1 },
            ),
            index(
                "sessionId_startedAt",
                doc! { "sessionId": 1, "startedAt": -1, "_id": -1 },
            ),
        ])
        .await
        .map_err(mongo_error)?;
    blocks_collection(store)
        .create_indexes([
            index("at", doc! { "at": -1, "_id": -1 }),
            index("userId_at", doc! { "userId": 1, "at": -1, "_id": -1 }),
            index(
                "userCohorts_at",
                doc! { "userCohorts": 1, "at": -1, "_id": -1 },
            ),
        ])
        .await
        .map_err(mongo_error)?;
    Ok(())
}

/// The filter of a listing: one user's, within the cohorts the scope allows.
fn listing_filter(
    user_field: &str,
    user: Option<&String>,
    cohorts_field: &str,
    scope: &CohortScope,
) -> Document {
    let mut filter = Document::new();
    if let Some(user) = user {
        filter.insert(user_field, user);
    }
    if let CohortScope::AnyOf(cohorts) = scope {
        filter.insert(cohorts_field, doc! { "$in": cohorts });
    }
    filter
}

/// One page of a collection, newest first by `time_field`, and the total.
async fn newest_first_page<T>(
    collection: &Collection<T>,
    filter: Document,
    time_field: &str,
    page: PageRequest,
) -> Result<(Vec<T>, u64), Error>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let total = collection
        .count_documents(filter.clone())
        .await
        .map_err(mongo_error)?;
    let found = collection
        .find(filter)
        .sort(doc! { time_field: -1, "_id": -1 })
        .skip(page.offset())
        .limit(i64::from(page.limit))
        .await
        .map_err(mongo_error)?
        .try_collect()
        .await
        .map_err(mongo_error)?;
    Ok((found, total))
}

#[async_trait]
impl ObservationAudit for MongoStore {
    async fn observation_started(&self, observation: &Observation) -> Result<(), Error> {
        collection(self)
            .insert_one(document(observation))
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    async fn observation_ended(
        &self,
        id: ObjectId,
        ended_at: DateTime<Utc>,
        outcome: ObservationEnd,
    ) -> Result<(), Error> {
        let result = collection(self)
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "endedAt": bson_time(ended_at), "outcome": outcome.as_str() } },
            )
            .await
            .map_err(mongo_error)?;
        if result.matched_count == 0 {
            return Err(Error::Store(format!("no observation {id} to end")));
        }
        Ok(())
    }

    async fn observations(&self, query: &AuditQuery) -> Result<ObservationPage, Error> {
        let filter = listing_filter(
            "observedUserId",
            query.observed_user.as_ref(),
            "observedCohorts",
            &query.scope,
        );
        let (documents, total) =
            newest_first_page(&collection(self), filter, "startedAt", query.page).await?;
        Ok(ObservationPage {
            observations: documents.into_iter().map(observation).collect(),
            total,
        })
    }

    async fn observations_of_session(
        &self,
        session: ObjectId,
        limit: u32,
    ) -> Result<Vec<Observation>, Error> {
        collection(self)
            .find(doc! { "sessionId": session })
            .sort(doc! { "startedAt": -1, "_id": -1 })
            .limit(i64::from(limit))
            .await
            .map_err(mongo_error)?
            .map_ok(observation)
            .try_collect()
            .await
            .map_err(mongo_error)
    }
}

fn document(observation: &Observation) -> ObservationDocument {
    ObservationDocument {
        id: observation.id,
        observer_id: observation.observer_id.clone(),
        observer_role: observation.observer_role.clone(),
        observed_user_id: observation.observed_user_id.clone(),
        observed_cohorts: observation.observed_cohorts.clone(),
        session_id: observation.session_id,
        started_at: bson_time(observation.started_at),
        ended_at: observation.ended_at.map(bson_time),
        outcome: observation.outcome.map(|end| end.as_str().to_owned()),
    }
}

fn observation(document: ObservationDocument) -> Observation {
    Observation {
        id: document.id,
        observer_id: document.observer_id,
        observer_role: document.observer_role,
        observed_user_id: document.observed_user_id,
        observed_cohorts: document.observed_cohorts,
        session_id: document.session_id,
        started_at: utc(document.started_at),
        ended_at: document.ended_at.map(utc),
        outcome: document.outcome.as_deref().and_then(ObservationEnd::parse),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockDocument {
    #[serde(rename = "_id")]
    id: ObjectId,
    at: bson::DateTime,
    direction: String,
    kind: String,
    rule: String,
    user_id: String,
    user_cohorts: Vec<String>,
    #[serde(default)]
    session_id: Option<ObjectId>,
    route: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    excerpt: Option<String>,
}

fn blocks_collection(store: &MongoStore) -> Collection<BlockDocument> {
    store.database().collection(BLOCKS_COLLECTION)
}

#[async_trait]
impl BlockAudit for MongoStore {
    async fn block_recorded(&self, block: &PolicyBlock) -> Result<(), Error> {
        let document = BlockDocument {
            id: block.id,
            at: bson_time(block.at),
            direction: block.direction.as_str().to_owned(),
            kind: block.kind.as_str().to_owned(),
            rule: block.rule.clone(),
            user_id: block.user_id.clone(),
            user_cohorts: block.user_cohorts.clone(),
            session_id: block.session_id,
            route: block.route.clone(),
            model: block.model.clone(),
            excerpt: block.excerpt.clone(),
        };
        blocks_collection(self)
            .insert_one(document)
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    async fn blocks(&self, query: &BlockQuery) -> Result<BlockPage, Error> {
        let filter = listing_filter("userId", query.user.as_ref(), "userCohorts", &query.scope);
        let (documents, total) =
            newest_first_page(&blocks_collection(self), filter, "at", query.page).await?;
        Ok(BlockPage {
            blocks: documents
                .into_iter()
                .map(policy_block)
                .collect::<Result<_, _>>()?,
            total,
        })
    }
}

fn policy_block(document: BlockDocument) -> Result<PolicyBlock, Error> {
    Ok(PolicyBlock {
        id: document.id,
        at: utc(document.at),
        direction: BlockDirection::parse(&document.direction).ok_or_else(|| {
            Error::Store(format!("unknown block direction {}", document.direction))
        })?,
        kind: BlockKind::parse(&document.kind)
            .ok_or_else(|| Error::Store(format!("unknown block kind {}", document.kind)))?,
        rule: document.rule,
        user_id: document.user_id,
        user_cohorts: document.user_cohorts,
        session_id: document.session_id,
        route: document.route,
        model: document.model,
        excerpt: document.excerpt,
    })
}

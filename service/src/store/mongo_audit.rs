//! The observation audit in MongoDB (collection `observation_audit`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::ObjectId;
use super::audit::{
    AuditQuery, CohortScope, Observation, ObservationAudit, ObservationEnd, ObservationPage,
};
use super::mongo_common::{MongoStore, bson_time, mongo_error, utc};
use crate::error::Error;

const COLLECTION: &str = "observation_audit";

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

/// The audit's indexes: one per way it is listed, newest first.
pub(super) async fn create_indexes(store: &MongoStore) -> Result<(), Error> {
    let index = |name: &str, keys: Document| {
        IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_owned()).build())
            .build()
    };
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
    Ok(())
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
        let mut filter = Document::new();
        if let Some(user) = &query.observed_user {
            filter.insert("observedUserId", user);
        }
        if let CohortScope::AnyOf(cohorts) = &query.scope {
            filter.insert("observedCohorts", doc! { "$in": cohorts });
        }
        let collection = collection(self);
        let total = collection
            .count_documents(filter.clone())
            .await
            .map_err(mongo_error)?;
        let observations = collection
            .find(filter)
            .sort(doc! { "startedAt": -1, "_id": -1 })
            .skip(query.page.offset())
            .limit(i64::from(query.page.limit))
            .await
            .map_err(mongo_error)?
            .map_ok(observation)
            .try_collect()
            .await
            .map_err(mongo_error)?;
        Ok(ObservationPage {
            observations,
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

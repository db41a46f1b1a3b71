//! The observation audit in the embedded database.
//!
//! Layout:
//! - `observations`: id -> record (JSON)
//! - `observations_by_time`: (startedAt ms, id) -> (); newest first backwards
//! - `observations_by_user`: (observed user, startedAt ms, id) -> ()
//! - `observations_by_session`: (session id, startedAt ms, id) -> ()
//!
//! A supervisor's listing filters by cohort while it scans: the embedded
//! store serves one replica in development, where the audit stays small.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::ObjectId;
use super::audit::{AuditQuery, Observation, ObservationAudit, ObservationEnd, ObservationPage};
use super::embedded_common::{
    EmbeddedStore, decode, encode, from_millis, millis_key, storage_error,
};
use crate::error::Error;

type Id = [u8; 12];

const OBSERVATIONS: TableDefinition<Id, &[u8]> = TableDefinition::new("observations");
const BY_TIME: TableDefinition<(u64, Id), ()> = TableDefinition::new("observations_by_time");
const BY_USER: TableDefinition<(&str, u64, Id), ()> = TableDefinition::new("observations_by_user");
const BY_SESSION: TableDefinition<(Id, u64, Id), ()> =
    TableDefinition::new("observations_by_session");

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObservationRecord {
    observer_id: String,
    observer_role: String,
    observed_user_id: String,
    observed_cohorts: Vec<String>,
    session_id: ObjectId,
    started_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ended_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
}

/// Creates the audit tables (part of opening the embedded store).
pub(super) fn create_tables(transaction: &WriteTransaction) -> Result<(), Error> {
    transaction
        .open_table(OBSERVATIONS)
        .map_err(storage_error)?;
    transaction.open_table(BY_TIME).map_err(storage_error)?;
    transaction.open_table(BY_USER).map_err(storage_error)?;
    transaction.open_table(BY_SESSION).map_err(storage_error)?;
    Ok(())
}

#[async_trait]
impl ObservationAudit for EmbeddedStore {
    async fn observation_started(&self, observation: &Observation) -> Result<(), Error> {
        let id = observation.id.bytes();
        let started = millis_key(observation.started_at.timestamp_millis());
        let user = observation.observed_user_id.clone();
        let session = observation.session_id.bytes();
        let encoded = encode(&record(observation))?;
        self.database()
            .write(move |transaction| {
                let mut table = transaction
                    .open_table(OBSERVATIONS)
                    .map_err(storage_error)?;
                table
                    .insert(id, encoded.as_slice())
                    .map_err(storage_error)?;
                let mut by_time = transaction.open_table(BY_TIME).map_err(storage_error)?;
                by_time.insert((started, id), ()).map_err(storage_error)?;
                let mut by_user = transaction.open_table(BY_USER).map_err(storage_error)?;
                by_user
                    .insert((user.as_str(), started, id), ())
                    .map_err(storage_error)?;
                let mut by_session = transaction.open_table(BY_SESSION).map_err(storage_error)?;
                by_session
                    .insert((session, started, id), ())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await
    }

    async fn observation_ended(
        &self,
        id: ObjectId,
        ended_at: DateTime<Utc>,
        outcome: ObservationEnd,
    ) -> Result<(), Error> {
        self.database()
            .write(move |transaction| {
                let mut table = transaction
                    .open_table(OBSERVATIONS)
                    .map_err(storage_error)?;
                let mut record: ObservationRecord = {
                    let value = table
                        .get(id.bytes())
                        .map_err(storage_error)?
                        .ok_or_else(|| Error::Store(format!("no observation {id} to end")))?;
                    decode(value.value())?
                };
                record.ended_at_ms = Some(ended_at.timestamp_millis());
                record.outcome = Some(outcome.as_str().to_owned());
                table
                    .insert(id.bytes(), encode(&record)?.as_slice())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await
    }

    async fn observations(&self, query: &AuditQuery) -> Result<ObservationPage, Error> {
        let query = query.clone();
        self.database()
            .read(move |transaction| {
                let ids = match &query.observed_user {
                    Some(user) => newest_first_by_user(transaction, user)?,
                    None => newest_first(transaction)?,
                };
                let table = transaction
                    .open_table(OBSERVATIONS)
                    .map_err(storage_error)?;
                let offset = usize::try_from(query.page.offset()).unwrap_or(usize::MAX);
                let mut total = 0u64;
                let mut observations = Vec::new();
                for id in ids {
                    let observation = load(&table, id)?;
                    if !query.scope.admits(&observation.observed_cohorts) {
                        continue;
                    }
                    let position = usize::try_from(total).unwrap_or(usize::MAX);
                    if position >= offset && observations.len() < query.page.limit as usize {
                        observations.push(observation);
                    }
                    total += 1;
                }
                Ok(ObservationPage {
                    observations,
                    total,
                })
            })
            .await
    }

    async fn observations_of_session(
        &self,
        session: ObjectId,
        limit: u32,
    ) -> Result<Vec<Observation>, Error> {
        self.database()
            .read(move |transaction| {
                let by_session = transaction.open_table(BY_SESSION).map_err(storage_error)?;
                let table = transaction
                    .open_table(OBSERVATIONS)
                    .map_err(storage_error)?;
                let session = session.bytes();
                by_session
                    .range((session, 0, [0; 12])..=(session, u64::MAX, [u8::MAX; 12]))
                    .map_err(storage_error)?
                    .rev()
                    .take(limit as usize)
                    .map(|entry| {
                        let (key, _) = entry.map_err(storage_error)?;
                        load(&table, key.value().2)
                    })
                    .collect()
            })
            .await
    }
}

fn newest_first(transaction: &ReadTransaction) -> Result<Vec<Id>, Error> {
    let by_time = transaction.open_table(BY_TIME).map_err(storage_error)?;
    by_time
        .iter()
        .map_err(storage_error)?
        .rev()
        .map(|entry| Ok(entry.map_err(storage_error)?.0.value().1))
        .collect()
}

fn newest_first_by_user(transaction: &ReadTransaction, user: &str) -> Result<Vec<Id>, Error> {
    let by_user = transaction.open_table(BY_USER).map_err(storage_error)?;
    by_user
        .range((user, 0, [0; 12])..=(user, u64::MAX, [u8::MAX; 12]))
        .map_err(storage_error)?
        .rev()
        .map(|entry| Ok(entry.map_err(storage_error)?.0.value().2))
        .collect()
}

fn load(table: &impl ReadableTable<Id, &'static [u8]>, id: Id) -> Result<Observation, Error> {
    let value = table
        .get(id)
        .map_err(storage_error)?
        .ok_or_else(|| Error::Store("an audit index names a missing observation".into()))?;
    let record: ObservationRecord = decode(value.value())?;
    Ok(Observation {
        id: ObjectId::from_bytes(id),
        observer_id: record.observer_id,
        observer_role: record.observer_role,
        observed_user_id: record.observed_user_id,
        observed_cohorts: record.observed_cohorts,
        session_id: record.session_id,
        started_at: from_millis(record.started_at_ms)?,
        ended_at: record.ended_at_ms.map(from_millis).transpose()?,
        outcome: record.outcome.as_deref().and_then(ObservationEnd::parse),
    })
}

fn record(observation: &Observation) -> ObservationRecord {
    ObservationRecord {
        observer_id: observation.observer_id.clone(),
        observer_role: observation.observer_role.clone(),
        observed_user_id: observation.observed_user_id.clone(),
        observed_cohorts: observation.observed_cohorts.clone(),
        session_id: observation.session_id,
        started_at_ms: observation.started_at.timestamp_millis(),
        ended_at_ms: observation.ended_at.map(|at| at.timestamp_millis()),
        outcome: observation.outcome.map(|end| end.as_str().to_owned()),
    }
}

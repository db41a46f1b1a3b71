//! The observation audit in the embedded database.
//!
//! Layout:
//! - `observations`: id -> record (JSON)
//! - `observations_by_time`: (startedAt ms, id) -> (); newest first backwards
//! - `observations_by_user`: (observed user, startedAt ms, id) -> ()
//! - `observations_by_session`: (session id, startedAt ms, id) -> ()
//! - `policy_blocks`: id -> record (JSON)
//! - `policy_blocks_by_time`: (at ms, id) -> (); newest first backwards
//! - `policy_blocks_by_user`: (user, at ms, id) -> ()
//!
//! A supervisor's listing filters by cohort while it scans: the embedded
//! store serves one replica in development, where the audits stay small.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::audit::{
    AuditQuery, BlockAudit, BlockDirection, BlockKind, BlockPage, BlockQuery, Observation,
    ObservationAudit, ObservationEnd, ObservationPage, PolicyBlock,
};
use super::embedded_common::{
    EmbeddedStore, decode, encode, from_millis, millis_key, storage_error,
};
use super::{CohortScope, ObjectId, PageRequest};
use crate::error::Error;

type Id = [u8; 12];

const OBSERVATIONS: TableDefinition<Id, &[u8]> = TableDefinition::new("observations");
const BY_TIME: TableDefinition<(u64, Id), ()> = TableDefinition::new("observations_by_time");
const BY_USER: TableDefinition<(&str, u64, Id), ()> = TableDefinition::new("observations_by_user");
const BY_SESSION: TableDefinition<(Id, u64, Id), ()> =
    TableDefinition::new("observations_by_session");
const BLOCKS: TableDefinition<Id, &[u8]> = TableDefinition::new("policy_blocks");
const BLOCKS_BY_TIME: TableDefinition<(u64, Id), ()> =
    TableDefinition::new("policy_blocks_by_time");
const BLOCKS_BY_USER: TableDefinition<(&str, u64, Id), ()> =
    TableDefinition::new("policy_blocks_by_user");

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
    transaction.open_table(BLOCKS).map_err(storage_error)?;
    transaction
        .open_table(BLOCKS_BY_TIME)
        .map_err(storage_error)?;
    transaction
        .open_table(BLOCKS_BY_USER)
        .map_err(storage_error)?;
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
            .write(move |tables| {
                let transaction = tables.transaction();
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
            .write(move |tables| {
                let transaction = tables.transaction();
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
                    Some(user) => newest_first_of_user(transaction, BY_USER, user)?,
                    None => newest_first(transaction, BY_TIME)?,
                };
                let table = transaction
                    .open_table(OBSERVATIONS)
                    .map_err(storage_error)?;
                let (observations, total) = page_in_scope(
                    ids,
                    &query.scope,
                    query.page,
                    |id| load(&table, id),
                    |observation| &observation.observed_cohorts,
                )?;
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

/// Ids of an index keyed by (time, id), newest first.
fn newest_first(
    transaction: &ReadTransaction,
    index: TableDefinition<'static, (u64, Id), ()>,
) -> Result<Vec<Id>, Error> {
    let by_time = transaction.open_table(index).map_err(storage_error)?;
    by_time
        .iter()
        .map_err(storage_error)?
        .rev()
        .map(|entry| Ok(entry.map_err(storage_error)?.0.value().1))
        .collect()
}

/// Ids of `user` in an index keyed by (user, time, id), newest first.
fn newest_first_of_user(
    transaction: &ReadTransaction,
    index: TableDefinition<'static, (&'static str, u64, Id), ()>,
    user: &str,
) -> Result<Vec<Id>, Error> {
    let by_user = transaction.open_table(index).map_err(storage_error)?;
    by_user
        .range((user, 0, [0; 12])..=(user, u64::MAX, [u8::MAX; 12]))
        .map_err(storage_error)?
        .rev()
        .map(|entry| Ok(entry.map_err(storage_error)?.0.value().2))
        .collect()
}

/// One page of the records of `ids` (newest first) whose cohorts `scope`
/// admits, and how many it admits in all.
fn page_in_scope<T>(
    ids: Vec<Id>,
    scope: &CohortScope,
    page: PageRequest,
    mut load: impl FnMut(Id) -> Result<T, Error>,
    cohorts: impl Fn(&T) -> &[String],
) -> Result<(Vec<T>, u64), Error> {
    let offset = usize::try_from(page.offset()).unwrap_or(usize::MAX);
    let mut total = 0u64;
    let mut found = Vec::new();
    for id in ids {
        let record = load(id)?;
        if !scope.admits(cohorts(&record)) {
            continue;
        }
        let position = usize::try_from(total).unwrap_or(usize::MAX);
        if position >= offset && found.len() < page.limit as usize {
            found.push(record);
        }
        total += 1;
    }
    Ok((found, total))
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockRecord {
    at_ms: i64,
    direction: String,
    kind: String,
    rule: String,
    user_id: String,
    user_cohorts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_id: Option<ObjectId>,
    route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    excerpt: Option<String>,
}

#[async_trait]
impl BlockAudit for EmbeddedStore {
    async fn block_recorded(&self, block: &PolicyBlock) -> Result<(), Error> {
        let id = block.id.bytes();
        let at = millis_key(block.at.timestamp_millis());
        let user = block.user_id.clone();
        let encoded = encode(&BlockRecord {
            at_ms: block.at.timestamp_millis(),
            direction: block.direction.as_str().to_owned(),
            kind: block.kind.as_str().to_owned(),
            rule: block.rule.clone(),
            user_id: block.user_id.clone(),
            user_cohorts: block.user_cohorts.clone(),
            session_id: block.session_id,
            route: block.route.clone(),
            model: block.model.clone(),
            excerpt: block.excerpt.clone(),
        })?;
        self.database()
            .write(move |tables| {
                let transaction = tables.transaction();
                let mut table = transaction.open_table(BLOCKS).map_err(storage_error)?;
                table
                    .insert(id, encoded.as_slice())
                    .map_err(storage_error)?;
                let mut by_time = transaction
                    .open_table(BLOCKS_BY_TIME)
                    .map_err(storage_error)?;
                by_time.insert((at, id), ()).map_err(storage_error)?;
                let mut by_user = transaction
                    .open_table(BLOCKS_BY_USER)
                    .map_err(storage_error)?;
                by_user
                    .insert((user.as_str(), at, id), ())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await
    }

    async fn blocks(&self, query: &BlockQuery) -> Result<BlockPage, Error> {
        let query = query.clone();
        self.database()
            .read(move |transaction| {
                let ids = match &query.user {
                    Some(user) => newest_first_of_user(transaction, BLOCKS_BY_USER, user)?,
                    None => newest_first(transaction, BLOCKS_BY_TIME)?,
                };
                let table = transaction.open_table(BLOCKS).map_err(storage_error)?;
                let (blocks, total) = page_in_scope(
                    ids,
                    &query.scope,
                    query.page,
                    |id| load_block(&table, id),
                    |block| &block.user_cohorts,
                )?;
                Ok(BlockPage { blocks, total })
            })
            .await
    }
}

fn load_block(table: &impl ReadableTable<Id, &'static [u8]>, id: Id) -> Result<PolicyBlock, Error> {
    let value = table
        .get(id)
        .map_err(storage_error)?
        .ok_or_else(|| Error::Store("a block index names a missing block".into()))?;
    let record: BlockRecord = decode(value.value())?;
    Ok(PolicyBlock {
        id: ObjectId::from_bytes(id),
        at: from_millis(record.at_ms)?,
        direction: BlockDirection::parse(&record.direction)
            .ok_or_else(|| Error::Store(format!("unknown block direction {}", record.direction)))?,
        kind: BlockKind::parse(&record.kind)
            .ok_or_else(|| Error::Store(format!("unknown block kind {}", record.kind)))?,
        rule: record.rule,
        user_id: record.user_id,
        user_cohorts: record.user_cohorts,
        session_id: record.session_id,
        route: record.route,
        model: record.model,
        excerpt: record.excerpt,
    })
}

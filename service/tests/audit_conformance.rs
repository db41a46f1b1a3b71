//! One conformance suite for every `ObservationAudit`: each case runs against
//! the embedded store and against the real MongoDB-wire server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::Duration;
use parley_service::store::{
    AuditQuery, CohortScope, ObjectId, Observation, ObservationAudit, ObservationEnd, PageRequest,
    now,
};

store_conformance!(
    an_observation_is_open_until_it_ends,
    listings_are_newest_first_paginated_and_scoped,
    ending_an_unknown_observation_fails,
);

/// An observation of `user` (in `cohorts`) by `observer`, started `minutes_ago`.
fn observation(observer: &str, user: &str, cohorts: &[&str], minutes_ago: i64) -> Observation {
    Observation {
        id: ObjectId::new(),
        observer_id: observer.into(),
        observer_role: "supervisor".into(),
        observed_user_id: user.into(),
        observed_cohorts: cohorts.iter().map(|cohort| (*cohort).to_owned()).collect(),
        session_id: ObjectId::new(),
        started_at: now() - Duration::minutes(minutes_ago),
        ended_at: None,
        outcome: None,
    }
}

async fn an_observation_is_open_until_it_ends(audit: Arc<dyn ObservationAudit>) {
    let started = observation("sam", "alice", &["c1"], 1);
    audit.observation_started(&started).await.unwrap();
    let of_session = audit
        .observations_of_session(started.session_id, 10)
        .await
        .unwrap();
    assert_eq!(of_session, std::slice::from_ref(&started));

    let ended_at = now();
    audit
        .observation_ended(started.id, ended_at, ObservationEnd::TooSlow)
        .await
        .unwrap();
    let of_session = audit
        .observations_of_session(started.session_id, 10)
        .await
        .unwrap();
    assert_eq!(
        of_session,
        [Observation {
            ended_at: Some(ended_at),
            outcome: Some(ObservationEnd::TooSlow),
            ..started
        }]
    );
    assert!(
        audit
            .observations_of_session(ObjectId::new(), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn listings_are_newest_first_paginated_and_scoped(audit: Arc<dyn ObservationAudit>) {
    // Oldest first: alice (c1) three times, bob (c2), carol (c1 and c3).
    let records = [
        observation("sam", "alice", &["c1"], 50),
        observation("sam", "alice", &["c1"], 40),
        observation("ada", "bob", &["c2"], 30),
        observation("sam", "alice", &["c1"], 20),
        observation("ada", "carol", &["c1", "c3"], 10),
    ];
    for record in &records {
        audit.observation_started(record).await.unwrap();
    }
    let list = |observed_user: Option<&str>, scope: CohortScope, page: u32, limit: u32| {
        let audit = Arc::clone(&audit);
        let query = AuditQuery {
            observed_user: observed_user.map(str::to_owned),
            scope,
            page: PageRequest { page, limit },
        };
        async move {
            let found = audit.observations(&query).await.unwrap();
            let ids: Vec<ObjectId> = found.observations.iter().map(|o| o.id).collect();
            (ids, found.total)
        }
    };
    let id = |index: usize| records[index].id;

    assert_eq!(
        list(None, CohortScope::All, 1, 10).await,
        (vec![id(4), id(3), id(2), id(1), id(0)], 5)
    );
    assert_eq!(
        list(None, CohortScope::All, 2, 2).await,
        (vec![id(2), id(1)], 5)
    );
    let c1 = || CohortScope::AnyOf(vec!["c1".into()]);
    assert_eq!(
        list(None, c1(), 1, 10).await,
        (vec![id(4), id(3), id(1), id(0)], 4)
    );
    assert_eq!(list(None, c1(), 2, 3).await, (vec![id(0)], 4));
    assert_eq!(
        list(
            None,
            CohortScope::AnyOf(vec!["c2".into(), "c3".into()]),
            1,
            10
        )
        .await,
        (vec![id(4), id(2)], 2)
    );
    assert_eq!(
        list(Some("alice"), CohortScope::All, 1, 2).await,
        (vec![id(3), id(1)], 3)
    );
    // A supervisor asking for a user outside its cohorts learns nothing.
    assert_eq!(list(Some("bob"), c1(), 1, 10).await, (Vec::new(), 0));
    assert_eq!(
        list(None, CohortScope::AnyOf(vec!["c9".into()]), 1, 10).await,
        (Vec::new(), 0)
    );
}

async fn ending_an_unknown_observation_fails(audit: Arc<dyn ObservationAudit>) {
    assert!(
        audit
            .observation_ended(ObjectId::new(), now(), ObservationEnd::Left)
            .await
            .is_err()
    );
}

//! The observation audit: who watched whose replies, when, and how it ended.
//! Kept by the same stores as the sessions (embedded and MongoDB), through
//! one trait with one conformance suite.
//!
//! A record is written when an observation starts and completed when it
//! ends, so an observation cut short by a crash still leaves its start.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{ObjectId, PageRequest};
use crate::error::Error;

/// How an observation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservationEnd {
    /// The observer went away (closed the page, lost the connection).
    Left,
    /// The observer read too slowly and was cut (`OBSERVER_TOO_SLOW`).
    TooSlow,
    /// The replica shut down.
    Shutdown,
}

impl ObservationEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::TooSlow => "too_slow",
            Self::Shutdown => "shutdown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Left, Self::TooSlow, Self::Shutdown]
            .into_iter()
            .find(|end| end.as_str() == text)
    }
}

/// One observation of one chat session by a supervisor or an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub id: ObjectId,
    pub observer_id: String,
    /// `supervisor` or `admin`.
    pub observer_role: String,
    pub observed_user_id: String,
    /// The observed user's cohorts (as their session records them), so
    /// supervisors list only the observations of their cohorts.
    pub observed_cohorts: Vec<String>,
    pub session_id: ObjectId,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: Option<ObservationEnd>,
}

/// Which observations a listing may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CohortScope {
    /// Admins: every observation.
    All,
    /// Supervisors: observations of users in any of these cohorts.
    AnyOf(Vec<String>),
}

impl CohortScope {
    pub fn admits(&self, cohorts: &[String]) -> bool {
        match self {
            Self::All => true,
            Self::AnyOf(allowed) => cohorts.iter().any(|cohort| allowed.contains(cohort)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only observations of this user.
    pub observed_user: Option<String>,
    pub scope: CohortScope,
    pub page: PageRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationPage {
    /// Newest first.
    pub observations: Vec<Observation>,
    /// Matching observations in all pages.
    pub total: u64,
}

#[async_trait]
pub trait ObservationAudit: Send + Sync {
    /// Records an observation that starts now (its end still open).
    async fn observation_started(&self, observation: &Observation) -> Result<(), Error>;

    /// Completes the record of observation `id`.
    async fn observation_ended(
        &self,
        id: ObjectId,
        ended_at: DateTime<Utc>,
        outcome: ObservationEnd,
    ) -> Result<(), Error>;

    /// Observations matching `query`, newest first.
    async fn observations(&self, query: &AuditQuery) -> Result<ObservationPage, Error>;

    /// The newest `limit` observations of one session.
    async fn observations_of_session(
        &self,
        session: ObjectId,
        limit: u32,
    ) -> Result<Vec<Observation>, Error>;
}

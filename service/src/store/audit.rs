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

/// Which way blocked content was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDirection {
    /// A user's message, refused before any model saw it.
    Input,
    /// A model's reply, ended at the block.
    Output,
}

impl BlockDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Input, Self::Output]
            .into_iter()
            .find(|direction| direction.as_str() == text)
    }
}

/// What blocked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// A rule of the route's content policy.
    RouteRule,
    /// A rule of a cohort policy of the deployment.
    CohortRule,
    /// A Bedrock Guardrail of the answering target.
    Guardrail,
}

impl BlockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RouteRule => "route_rule",
            Self::CohortRule => "cohort_rule",
            Self::Guardrail => "guardrail",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::RouteRule, Self::CohortRule, Self::Guardrail]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// One message or reply blocked by a content policy. Never the blocked
/// text: at most a short excerpt with the match masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyBlock {
    pub id: ObjectId,
    pub at: DateTime<Utc>,
    pub direction: BlockDirection,
    pub kind: BlockKind,
    /// The rule's name, or the guardrail and what it flagged.
    pub rule: String,
    pub user_id: String,
    /// The user's cohorts (from their token), so supervisors list only the
    /// blocks of their cohorts.
    pub user_cohorts: Vec<String>,
    /// `None` for the first message of a session refused at its creation.
    pub session_id: Option<ObjectId>,
    pub route: String,
    /// The target that was answering, for replies.
    pub model: Option<String>,
    pub excerpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockQuery {
    /// Only blocks of this user.
    pub user: Option<String>,
    pub scope: CohortScope,
    pub page: PageRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPage {
    /// Newest first.
    pub blocks: Vec<PolicyBlock>,
    /// Matching blocks in all pages.
    pub total: u64,
}

/// The audit of content-policy blocks, kept next to the observation audit.
#[async_trait]
pub trait BlockAudit: Send + Sync {
    async fn block_recorded(&self, block: &PolicyBlock) -> Result<(), Error>;

    /// Blocks matching `query`, newest first.
    async fn blocks(&self, query: &BlockQuery) -> Result<BlockPage, Error>;
}

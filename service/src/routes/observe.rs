//! Live observation for supervisors and admins: one session's replies, the
//! replies in flight in the caller's cohorts, and the audit of observations.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::event_stream;
use super::sessions::{Pagination, page_request, session_id};
use crate::auth::Principal;
use crate::auth::policy::{Owner, may_observe};
use crate::error::{Error, ErrorBody};
use crate::identity::Role;
use crate::state::AppState;
use crate::store::{AuditQuery, CohortScope, ObjectId, Observation, now};
use crate::stream::observe::{ObservationContext, live_replies, watch_session};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditParams {
    /// Only observations of this user.
    user_id: Option<String>,
    /// 1-based page number (default 1).
    #[param(minimum = 1)]
    page: Option<u32>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// One observation of one session.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationView {
    id: String,
    observer_id: String,
    /// `supervisor` or `admin`.
    observer_role: String,
    observed_user_id: String,
    session_id: String,
    started_at: DateTime<Utc>,
    /// Absent while the observation goes on (or when its replica died).
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_at: Option<DateTime<Utc>>,
    /// `left`, `too_slow` or `shutdown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    /// Newest first.
    observations: Vec<ObservationView>,
    pagination: Pagination,
}

impl From<Observation> for ObservationView {
    fn from(observation: Observation) -> Self {
        Self {
            id: observation.id.to_hex(),
            observer_id: observation.observer_id,
            observer_role: observation.observer_role,
            observed_user_id: observation.observed_user_id,
            session_id: observation.session_id.to_hex(),
            started_at: observation.started_at,
            ended_at: observation.ended_at,
            outcome: observation.outcome.map(|end| end.as_str()),
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/chat/sessions/{id}/observe",
    tag = "observation",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    responses(
        (status = 200, description = "SSE: the running reply's events from its first (`model`, `chunk`, `complete`/`error`, with the owner's ids) framed by `observe` {sessionId, userId, replyId, state: started|ended, message (on started: the question), outcome (on ended)}; between replies the stream waits for the next; `error` `OBSERVER_TOO_SLOW` ends an observer that falls behind", content_type = "text/event-stream"),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Observation is turned off in this deployment", body = ErrorBody),
        (status = 404, description = "No such session the caller may observe (admins, and supervisors of the owner's cohorts)", body = ErrorBody),
        (status = 503, description = "Store or reply hub unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn observe_session(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    observation_enabled(&state)?;
    let id = session_id(id)?;
    let session = state.sessions.get(id).await?;
    let summary = session.summary;
    let owner = Owner {
        user_id: &summary.user_id,
        cohorts: &summary.user_cohorts,
    };
    if !may_observe(&caller, owner) {
        return Err(Error::SessionNotFound);
    }
    let observation = Observation {
        id: ObjectId::new(),
        observer_id: caller.sub,
        observer_role: role_name(caller.role).to_owned(),
        observed_user_id: summary.user_id,
        observed_cohorts: summary.user_cohorts,
        session_id: id,
        started_at: now(),
        ended_at: None,
        outcome: None,
    };
    let frames = watch_session(context(&state), observation).await?;
    Ok(event_stream(frames))
}

#[utoipa::path(
    get,
    path = "/api/observe/live",
    tag = "observation",
    responses(
        (status = 200, description = "SSE: `replies` {replies: [{replyId, sessionId, userId, userCohorts, route, message, startedAt}]} (the replies in flight in the caller's cohorts; admins: all), then `started` {reply} and `ended` {reply, outcome} as they happen; a new `replies` list replaces the old one", content_type = "text/event-stream"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a supervisor or admin, or observation is turned off", body = ErrorBody),
        (status = 503, description = "Reply hub unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn live(State(state): State<AppState>, caller: Principal) -> Result<Response, Error> {
    observation_enabled(&state)?;
    let scope = observer_scope(&caller, OBSERVERS_ONLY)?;
    let frames = live_replies(context(&state), scope).await?;
    Ok(event_stream(frames))
}

#[utoipa::path(
    get,
    path = "/api/observe/audit",
    tag = "observation",
    params(AuditParams),
    responses(
        (status = 200, description = "Observations of users in the caller's cohorts (admins: all), newest first", body = AuditView),
        (status = 400, description = "Malformed or unknown query parameter", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a supervisor or admin", body = ErrorBody),
        (status = 422, description = "Page or limit out of range", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn audit(
    State(state): State<AppState>,
    caller: Principal,
    query: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<AuditView>, Error> {
    let scope = observer_scope(&caller, OBSERVERS_ONLY)?;
    let Query(params) = query.map_err(|rejection| Error::InvalidQuery(rejection.body_text()))?;
    let page = page_request(params.page, params.limit)?;
    let found = state
        .audit
        .observations(&AuditQuery {
            observed_user: params.user_id,
            scope,
            page,
        })
        .await?;
    Ok(Json(AuditView {
        pagination: Pagination::new(found.total, page),
        observations: found
            .observations
            .into_iter()
            .map(ObservationView::from)
            .collect(),
    }))
}

fn observation_enabled(state: &AppState) -> Result<(), Error> {
    if state.replies.settings.observation {
        Ok(())
    } else {
        Err(Error::ObservationDisabled)
    }
}

const OBSERVERS_ONLY: &str = "only supervisors and admins observe replies";

/// Whose records the caller may see: admins all, supervisors their cohorts;
/// users are refused with `refusal`.
pub(super) fn observer_scope(
    caller: &Principal,
    refusal: &'static str,
) -> Result<CohortScope, Error> {
    match caller.role {
        Role::Admin => Ok(CohortScope::All),
        Role::Supervisor => Ok(CohortScope::AnyOf(caller.cohorts.clone())),
        Role::User => Err(Error::Forbidden(refusal)),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Supervisor => "supervisor",
        Role::Admin => "admin",
    }
}

fn context(state: &AppState) -> ObservationContext {
    ObservationContext {
        hub: std::sync::Arc::clone(&state.replies.hub),
        audit: std::sync::Arc::clone(&state.audit),
        shutdown: state.replies.draining.clone(),
    }
}

//! The audit of content-policy blocks: supervisors list the blocks of users
//! in their cohorts, admins all. A row never holds the blocked text, at most
//! a short excerpt with the match masked.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::observe::observer_scope;
use super::sessions::{Pagination, page_request};
use crate::auth::Principal;
use crate::error::{Error, ErrorBody};
use crate::state::AppState;
use crate::store::{BlockQuery, PolicyBlock};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BlocksParams {
    /// Only blocks of this user.
    user_id: Option<String>,
    /// 1-based page number (default 1).
    #[param(minimum = 1)]
    page: Option<u32>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// One message or reply a content policy blocked.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockView {
    id: String,
    at: DateTime<Utc>,
    /// `input` (the user's message, refused before any model saw it) or
    /// `output` (a model's reply, ended at the block).
    direction: &'static str,
    /// `route_rule`, `cohort_rule` or `guardrail`.
    kind: &'static str,
    /// The rule's name, or `guardrail:<identifier>`.
    rule: String,
    user_id: String,
    user_cohorts: Vec<String>,
    /// Absent for the first message of a session refused at its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    route: String,
    /// The target that was answering, for replies.
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// A little context around the match, the match itself masked (`***`);
    /// for a guardrail, what it flagged. Never the blocked text.
    #[serde(skip_serializing_if = "Option::is_none")]
    excerpt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BlocksView {
    /// Newest first.
    blocks: Vec<BlockView>,
    pagination: Pagination,
}

impl From<PolicyBlock> for BlockView {
    fn from(block: PolicyBlock) -> Self {
        Self {
            id: block.id.to_hex(),
            at: block.at,
            direction: block.direction.as_str(),
            kind: block.kind.as_str(),
            rule: block.rule,
            user_id: block.user_id,
            user_cohorts: block.user_cohorts,
            session_id: block.session_id.map(|id| id.to_hex()),
            route: block.route,
            model: block.model,
            excerpt: block.excerpt,
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/policy/blocks",
    tag = "policy",
    params(BlocksParams),
    responses(
        (status = 200, description = "Blocks of users in the caller's cohorts (admins: all), newest first", body = BlocksView),
        (status = 400, description = "Malformed or unknown query parameter", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a supervisor or admin", body = ErrorBody),
        (status = 422, description = "Page or limit out of range", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn blocks(
    State(state): State<AppState>,
    caller: Principal,
    query: Result<Query<BlocksParams>, QueryRejection>,
) -> Result<Json<BlocksView>, Error> {
    let scope = observer_scope(
        &caller,
        "only supervisors and admins list content-policy blocks",
    )?;
    let Query(params) = query.map_err(|rejection| Error::InvalidQuery(rejection.body_text()))?;
    let page = page_request(params.page, params.limit)?;
    let found = state
        .blocks
        .audit()
        .blocks(&BlockQuery {
            user: params.user_id,
            scope,
            page,
        })
        .await?;
    Ok(Json(BlocksView {
        pagination: Pagination::new(found.total, page),
        blocks: found.blocks.into_iter().map(BlockView::from).collect(),
    }))
}

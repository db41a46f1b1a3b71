//! Chat session endpoints (seed-compatible paths and field names).

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::RefOr;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};

use super::ApiJson;
use crate::auth::Principal;
use crate::auth::policy::{Access, Owner, may_access};
use crate::error::{Error, ErrorBody};
use crate::ledger::MAX_PAGE_NUMBER;
use crate::state::AppState;
use crate::store::{
    Message, MessageRole, NewSession, ObjectId, PageRequest, Session, SessionSummary, TokenTotals,
};

const DEFAULT_TITLE: &str = "New Chat";
const MAX_TITLE_CHARS: usize = 200;
const MAX_ROUTE_CHARS: usize = 128;
const DEFAULT_PAGE_LIMIT: u32 = 20;
const MAX_PAGE_LIMIT: u32 = 100;
/// Observations listed with a session.
const MAX_OBSERVERS_SHOWN: u32 = 20;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateSessionRequest {
    /// Defaults to "New Chat"; not blank.
    #[schema(min_length = 1, max_length = 200)]
    title: Option<String>,
    /// Model route alias; defaults to `default`.
    #[schema(pattern = r"^[A-Za-z0-9._:/-]{1,128}$")]
    route: Option<String>,
    /// The seed API's name for `route`; when both are given they must agree.
    #[schema(pattern = r"^[A-Za-z0-9._:/-]{1,128}$")]
    model_id: Option<String>,
    /// A first user message stored with the session; not blank, and at most
    /// the configured number of characters.
    #[schema(min_length = 1)]
    initial_message: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameSessionRequest {
    /// The new title: 1 to 200 characters, surrounding whitespace trimmed.
    #[schema(max_length = 200)]
    title: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1-based page number (default 1), at most a million.
    #[param(minimum = 1, maximum = 1_000_000)]
    page: Option<u32>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenTotalsView {
    input: u64,
    output: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummaryView {
    /// 24 hexadecimal characters.
    session_id: String,
    user_id: String,
    title: String,
    route: String,
    /// Same as `route`, under the seed API's name.
    model_id: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    token_totals: TokenTotalsView,
    message_count: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    id: String,
    role: MessageRole,
    content: String,
    timestamp: DateTime<Utc>,
    /// Present (true) on a reply cut short after some output.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    #[serde(flatten)]
    summary: SessionSummaryView,
    messages: Vec<MessageView>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionWithObserversView {
    #[serde(flatten)]
    session: SessionView,
    /// Who observed this session's replies, newest first (at most 20).
    observed_by: Vec<ObserverView>,
}

/// One observation of the session, as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObserverView {
    observer_id: String,
    /// `supervisor` or `admin`.
    observer_role: String,
    started_at: DateTime<Utc>,
    /// Absent while the observation goes on.
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Pagination {
    total: u64,
    page: u32,
    limit: u32,
    pages: u64,
}

impl Pagination {
    pub(super) fn new(total: u64, page: PageRequest) -> Self {
        Self {
            total,
            page: page.page,
            limit: page.limit,
            pages: total.div_ceil(u64::from(page.limit)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionListView {
    /// Most recently updated first.
    sessions: Vec<SessionSummaryView>,
    pagination: Pagination,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesView {
    session_id: String,
    messages: Vec<MessageView>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedView {
    message: &'static str,
    session_id: String,
}

#[utoipa::path(
    post,
    path = "/api/chat/sessions",
    tag = "sessions",
    request_body = CreateSessionRequest,
    responses(
        (status = 201, description = "Created", body = SessionView),
        (status = 409, description = "`TOO_MANY_SESSIONS`: the caller keeps the most sessions allowed", body = ErrorBody),
        (status = 422, description = "Invalid fields", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_session(
    State(state): State<AppState>,
    caller: Principal,
    ApiJson(request): ApiJson<CreateSessionRequest>,
) -> Result<(StatusCode, Json<SessionView>), Error> {
    let title = match request.title {
        None => DEFAULT_TITLE.to_owned(),
        Some(title) => validate_title(title)?,
    };
    let route = match validate_route(request.route, request.model_id)? {
        Some(route) => route,
        // The deployment's default route when the session is created.
        None => state.replies.routes.snapshot().default_alias().to_owned(),
    };
    let messages = match request.initial_message {
        None => Vec::new(),
        Some(text) => {
            validate_message(&text, state.limits.max_message_chars, "initialMessage")?;
            vec![Message::new(MessageRole::User, text)]
        }
    };
    ensure_below_session_limit(&state, &caller.sub).await?;
    let new = NewSession::new(caller.sub, caller.cohorts, title, route, messages);
    let session = state.sessions.create(new).await?;
    Ok((StatusCode::CREATED, Json(session_view(session))))
}

#[utoipa::path(
    get,
    path = "/api/chat/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, description = "The caller's sessions", body = SessionListView),
        (status = 422, description = "Page or limit out of range", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_sessions(
    State(state): State<AppState>,
    caller: Principal,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<SessionListView>, Error> {
    let Query(query) = query.map_err(|rejection| Error::InvalidQuery(rejection.body_text()))?;
    let page = page_request(query.page, query.limit)?;
    let found = state.sessions.list(&caller.sub, page).await?;
    Ok(Json(SessionListView {
        sessions: found.sessions.into_iter().map(summary_view).collect(),
        pagination: Pagination::new(found.total, page),
    }))
}

/// A page of a listing from its query parameters (page 1 and 20 items by default).
pub(super) fn page_request(page: Option<u32>, limit: Option<u32>) -> Result<PageRequest, Error> {
    let page = page.unwrap_or(1);
    if !(1..=MAX_PAGE_NUMBER).contains(&page) {
        return Err(Error::Validation {
            field: "page",
            message: format!("must be between 1 and {MAX_PAGE_NUMBER}"),
        });
    }
    let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
        return Err(Error::Validation {
            field: "limit",
            message: format!("must be between 1 and {MAX_PAGE_LIMIT}"),
        });
    }
    Ok(PageRequest { page, limit })
}

#[utoipa::path(
    get,
    path = "/api/chat/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    responses(
        (status = 200, description = "The session with its messages and who observed it", body = SessionWithObserversView),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 404, description = "No such session visible to the caller", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_session(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SessionWithObserversView>, Error> {
    let id = session_id(id)?;
    let (session, observations) = tokio::try_join!(
        readable_session(&state, &caller, id),
        state.audit.observations_of_session(id, MAX_OBSERVERS_SHOWN),
    )?;
    Ok(Json(SessionWithObserversView {
        session: session_view(session),
        observed_by: observations
            .into_iter()
            .map(|observation| ObserverView {
                observer_id: observation.observer_id,
                observer_role: observation.observer_role,
                started_at: observation.started_at,
                ended_at: observation.ended_at,
            })
            .collect(),
    }))
}

#[utoipa::path(
    patch,
    path = "/api/chat/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    request_body = RenameSessionRequest,
    responses(
        (status = 200, description = "Renamed; the session without its messages (`updatedAt` unchanged)", body = SessionSummaryView),
        (status = 400, description = "Invalid session id or malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such session owned by the caller", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Blank or too long title, or unknown fields", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn rename_session(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<RenameSessionRequest>,
) -> Result<Json<SessionSummaryView>, Error> {
    let id = session_id(id)?;
    let title = validate_title(request.title)?;
    // Only owners modify (see auth::policy); the store's filter enforces it atomically.
    let summary = state.sessions.rename(id, &caller.sub, &title).await?;
    Ok(Json(summary_view(summary)))
}

#[utoipa::path(
    delete,
    path = "/api/chat/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    responses(
        (status = 200, description = "Deleted", body = DeletedView),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 404, description = "No such session owned by the caller", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_session(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeletedView>, Error> {
    let id = session_id(id)?;
    // Only owners modify (see auth::policy); the store's filter enforces it atomically.
    state.sessions.delete(id, &caller.sub).await?;
    Ok(Json(DeletedView {
        message: "Chat session deleted",
        session_id: id.to_hex(),
    }))
}

#[utoipa::path(
    get,
    path = "/api/chat/sessions/{id}/messages",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    responses(
        (status = 200, description = "The session's messages, oldest first", body = MessagesView),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 404, description = "No such session visible to the caller", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_messages(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<MessagesView>, Error> {
    let session = readable_session(&state, &caller, session_id(id)?).await?;
    Ok(Json(MessagesView {
        session_id: session.summary.id.to_hex(),
        messages: session.messages.into_iter().map(message_view).collect(),
    }))
}

/// Refuses a new session to a user who keeps the most allowed. Two creates
/// at once may both pass: the limit bounds storage, it is not an exact quota.
async fn ensure_below_session_limit(state: &AppState, user_id: &str) -> Result<(), Error> {
    let limit = state.limits.max_sessions_per_user;
    if limit == 0 {
        return Ok(());
    }
    let kept = state
        .sessions
        .list(user_id, PageRequest { page: 1, limit: 1 })
        .await?
        .total;
    if kept >= limit {
        return Err(Error::TooManySessions { limit });
    }
    Ok(())
}

/// The session if `caller` may read it; "not found" otherwise, so ids of
/// other users' sessions cannot be probed.
async fn readable_session(
    state: &AppState,
    caller: &Principal,
    id: ObjectId,
) -> Result<Session, Error> {
    let session = state.sessions.get(id).await?;
    let owner = Owner {
        user_id: &session.summary.user_id,
        cohorts: &session.summary.user_cohorts,
    };
    if may_access(caller, owner, Access::Read) {
        Ok(session)
    } else {
        Err(Error::SessionNotFound)
    }
}

/// What [`session_id`] accepts, as the document says it.
const SESSION_ID_PATTERN: &str = "^[0-9a-fA-F]{24}$";

pub(super) fn session_id(path: Result<Path<String>, PathRejection>) -> Result<ObjectId, Error> {
    let Path(text) = path.map_err(|_| Error::InvalidSessionId)?;
    if text.len() != 24 {
        return Err(Error::InvalidSessionId);
    }
    ObjectId::parse_str(&text).map_err(|_| Error::InvalidSessionId)
}

fn validate_title(title: String) -> Result<String, Error> {
    let trimmed = title.trim();
    if trimmed.is_empty() {
        return Err(Error::Validation {
            field: "title",
            message: "must not be blank".into(),
        });
    }
    // Counted before trimming, as the document's maxLength counts.
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(Error::Validation {
            field: "title",
            message: format!("must be at most {MAX_TITLE_CHARS} characters"),
        });
    }
    Ok(if trimmed.len() == title.len() {
        title
    } else {
        trimmed.to_owned()
    })
}

fn validate_route(
    route: Option<String>,
    model_id: Option<String>,
) -> Result<Option<String>, Error> {
    let (field, value) = match (route, model_id) {
        (None, None) => return Ok(None),
        (Some(route), None) => ("route", route),
        (None, Some(model_id)) => ("modelId", model_id),
        (Some(route), Some(model_id)) if route == model_id => ("route", route),
        (Some(_), Some(_)) => {
            return Err(Error::Validation {
                field: "modelId",
                message: "route and modelId name the same thing and must agree".into(),
            });
        }
    };
    let valid_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/');
    if value.is_empty() || value.len() > MAX_ROUTE_CHARS || !value.chars().all(valid_char) {
        return Err(Error::Validation {
            field,
            message: format!(
                "must be 1 to {MAX_ROUTE_CHARS} characters of letters, digits, and . _ - : /"
            ),
        });
    }
    Ok(Some(value))
}

pub(super) fn validate_message(
    text: &str,
    max_chars: usize,
    field: &'static str,
) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::Validation {
            field,
            message: "must not be blank".into(),
        });
    }
    // Byte length bounds the char count from above, so most texts skip the count.
    if text.len() > max_chars && text.chars().count() > max_chars {
        return Err(Error::Validation {
            field,
            message: format!("must be at most {max_chars} characters"),
        });
    }
    Ok(())
}

fn summary_view(summary: SessionSummary) -> SessionSummaryView {
    let TokenTotals { input, output } = summary.token_totals;
    SessionSummaryView {
        session_id: summary.id.to_hex(),
        user_id: summary.user_id,
        model_id: summary.route.clone(),
        route: summary.route,
        title: summary.title,
        created_at: summary.created_at,
        updated_at: summary.updated_at,
        token_totals: TokenTotalsView { input, output },
        message_count: summary.message_count,
    }
}

fn message_view(message: Message) -> MessageView {
    MessageView {
        id: message.id.to_hex(),
        role: message.role,
        content: message.content.to_string(),
        timestamp: message.timestamp,
        incomplete: message.incomplete,
    }
}

fn session_view(session: Session) -> SessionView {
    SessionView {
        summary: summary_view(session.summary),
        messages: session.messages.into_iter().map(message_view).collect(),
    }
}

/// Every operation on `/api/chat/sessions/{id}…`: its `id` parameter is
/// documented as [`session_id`] checks it, and a created session
/// (`sessionId`) links to it, so clients and API fuzzers can chain them.
pub(super) fn document_session_operations(openapi: &mut utoipa::openapi::OpenApi) {
    const SESSION_PATH: &str = "/api/chat/sessions/{id}";
    let id_schema = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(SESSION_ID_PATTERN))
        .build();
    let mut links = Vec::new();
    for (path, item) in &mut openapi.paths.paths {
        if !path.starts_with(SESSION_PATH) {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                if let RefOr::T(parameter) = parameter
                    && parameter.name == "id"
                    && parameter.parameter_in == ParameterIn::Path
                {
                    parameter.schema = Some(RefOr::T(id_schema.clone().into()));
                }
            }
            if let Some(id) = &operation.operation_id {
                let link = LinkBuilder::new()
                    .operation_id(id)
                    .parameter("id", "$response.body#/sessionId")
                    .build();
                links.push((id.clone(), link));
            }
        }
    }
    let created = openapi
        .paths
        .paths
        .get_mut("/api/chat/sessions")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.responses.responses.get_mut("201"));
    if let Some(RefOr::T(response)) = created {
        for (name, link) in links {
            response.links.insert(name, RefOr::T(link));
        }
    }
}

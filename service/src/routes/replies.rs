//! Replies: whole (`POST …/messages`), streamed (`POST …/stream`, the
//! response is the SSE stream) and re-attached (`GET …/stream` with
//! `Last-Event-ID`) and stopped (`DELETE …/stream`).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use utoipa::ToSchema;

use super::sessions::{session_id, validate_message};
use super::{ApiJson, event_stream, posted_event_stream};
use crate::accounting::Caller;
use crate::auth::Principal;
use crate::context_window::{Conversation, history_budget};
use crate::embedded_db::PendingDurability;
use crate::error::{Error, ErrorBody};
use crate::ledger::Credits as Amount;
use crate::ledger::decimal_credits;
use crate::policy::{BlockContext, ReplyPolicy};
use crate::providers::{ChatTurn, Role as TurnRole, Sampling};
use crate::ratelimit::Scope;
use crate::state::AppState;
use crate::store::{HistoryBudget, Message, MessageRole, ObjectId, SessionTail};
use crate::stream::billing::{Charge, ReplyBill};
use crate::stream::reply;
use crate::stream::{
    Api, Audience, ContentCheck, FinishedReply, Paid, ReplyInfo, ReplyRequest, ReplyStream,
    SessionRecord,
};

/// Header of a whole (JSON) reply: the caller's available credits after it.
pub const CREDITS_REMAINING_HEADER: &str = "x-parley-credits-remaining";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SendMessageRequest {
    /// The user's message; not blank, and at most the configured number of
    /// characters.
    #[schema(min_length = 1)]
    message: String,
    /// Model route alias for this reply; defaults to the session's route.
    route: Option<String>,
    /// The seed API's name for `route`; when both are given they must agree.
    model_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    input_tokens: u32,
    output_tokens: u32,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyView {
    session_id: String,
    message_id: String,
    role: MessageRole,
    content: String,
    timestamp: DateTime<Utc>,
    usage: UsageView,
    model: String,
    route: String,
    fallback_applied: bool,
    /// What the reply cost; absent when its charge is not settled yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<CreditsView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreditsView {
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    charged: Amount,
    /// Available credits after this reply.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    remaining: Amount,
}

#[utoipa::path(
    post,
    path = "/api/chat/sessions/{id}/messages",
    tag = "replies",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    request_body = SendMessageRequest,
    responses(
        (status = 200, description = "The whole reply, stored with the message; header `x-parley-credits-remaining` has the available credits after it", body = ReplyView),
        (status = 400, description = "Invalid id or unknown route (with the allowed list)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 402, description = "The caller cannot afford the reply's worst case (balance and price in the body)", body = ErrorBody),
        (status = 404, description = "No such session owned by the caller", body = ErrorBody),
        (status = 409, description = "A reply is already in progress", body = ErrorBody),
        (status = 422, description = "Invalid fields, or `MESSAGE_TOO_LONG_FOR_MODEL`: the message with the route's system prompt and room for the reply fits no target's context window (refused before any credit is held)", body = ErrorBody),
        (status = 429, description = "A per-user limit was hit, or every target was throttled", body = ErrorBody),
        (status = 502, description = "The model failed", body = ErrorBody),
        (status = 503, description = "Model, store, ledger or rate limiter unavailable, or shutting down", body = ErrorBody),
        (status = 504, description = "The model timed out", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send_message(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<SendMessageRequest>,
) -> Result<Response, Error> {
    let id = session_id(id)?;
    let (_, task) = start_reply(&state, caller, id, request).await?;
    let finished = task
        .await
        .map_err(|error| Error::Store(format!("the reply task failed: {error}")))??;
    let remaining = finished.charge.map(|charge| charge.remaining);
    let mut response = Json(reply_view(id, finished)).into_response();
    if let Some(remaining) = remaining
        && let Ok(value) = HeaderValue::from_str(&remaining.to_string())
    {
        response
            .headers_mut()
            .insert(CREDITS_REMAINING_HEADER, value);
    }
    Ok(response)
}

#[utoipa::path(
    post,
    path = "/api/chat/sessions/{id}/stream",
    tag = "replies",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    request_body = SendMessageRequest,
    responses(
        (status = 200, description = "SSE: `model`, `chunk`…, then `complete` (usage and credits charged/remaining) or `error`; every event has an `id`", content_type = "text/event-stream"),
        (status = 400, description = "Invalid id or unknown route (with the allowed list)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 402, description = "The caller cannot afford the reply's worst case (balance and price in the body)", body = ErrorBody),
        (status = 404, description = "No such session owned by the caller", body = ErrorBody),
        (status = 409, description = "A reply is already in progress", body = ErrorBody),
        (status = 422, description = "Invalid fields, or `MESSAGE_TOO_LONG_FOR_MODEL`: the message with the route's system prompt and room for the reply fits no target's context window (refused before any credit is held)", body = ErrorBody),
        (status = 429, description = "A per-user limit was hit", body = ErrorBody),
        (status = 503, description = "Store, ledger or rate limiter unavailable, or shutting down", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn stream_reply(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<SendMessageRequest>,
) -> Result<Response, Error> {
    let id = session_id(id)?;
    let (reply, _task) = start_reply(&state, caller, id, request).await?;
    Ok(posted_event_stream(reply.subscribe(0, true)))
}

#[utoipa::path(
    get,
    path = "/api/chat/sessions/{id}/stream",
    tag = "replies",
    params(
        ("id" = String, Path, description = "Session id, 24 hexadecimal characters"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "SSE: the events after `Last-Event-ID`, then the live ones", content_type = "text/event-stream"),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No reply of the caller in progress for this session", body = ErrorBody),
        (status = 422, description = "`VALIDATION_FAILED`: a Last-Event-ID that is not an event id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn reattach(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let id = session_id(id)?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Validation {
                field: "Last-Event-ID",
                message: "must be an event id from this stream".into(),
            })?,
    };
    let reply = state
        .replies
        .hub
        .latest(id)
        .await?
        .filter(|reply| reply.info.user_id == caller.sub)
        .ok_or(Error::NoActiveReply)?;
    Ok(event_stream(reply.subscribe(after, true)))
}

/// The task generating a reply; it ends with the reply.
pub(super) type ReplyTask = JoinHandle<Result<FinishedReply, Error>>;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoppedView {
    message: &'static str,
    session_id: String,
}

#[utoipa::path(
    delete,
    path = "/api/chat/sessions/{id}/stream",
    tag = "replies",
    params(("id" = String, Path, description = "Session id, 24 hexadecimal characters")),
    responses(
        (status = 200, description = "The reply was stopped: its stream ended with an `error` event `CANCELLED`, and what was generated is stored (`incomplete`) and charged", body = StoppedView),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No reply of the caller in progress for this session", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn stop_reply(
    State(state): State<AppState>,
    caller: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<StoppedView>, Error> {
    let id = session_id(id)?;
    let hub = &state.replies.hub;
    let reply = hub
        .running(id)
        .await?
        .filter(|reply| reply.info.user_id == caller.sub)
        .ok_or(Error::NoActiveReply)?;
    hub.stop(&reply).await?;
    // Answered once the partial reply is stored, so a client may reload the
    // session right away.
    reply.finished().await;
    Ok(Json(StoppedView {
        message: "Reply stopped",
        session_id: id.to_hex(),
    }))
}

/// Validates, resolves the route, registers the reply in the hub, and starts
/// it through [`launch`].
async fn start_reply(
    state: &AppState,
    caller: Caller,
    id: ObjectId,
    request: SendMessageRequest,
) -> Result<(Arc<ReplyStream>, ReplyTask), Error> {
    let replies = &state.replies;
    refuse_when_shutting_down(state)?;
    validate_message(&request.message, state.limits.max_message_chars, "message")?;
    let requested = match (request.route, request.model_id) {
        (Some(route), Some(model_id)) if route != model_id => {
            return Err(Error::Validation {
                field: "modelId",
                message: "route and modelId name the same thing and must agree".into(),
            });
        }
        (route, model_id) => route.or(model_id),
    };
    let principal = &caller.principal;
    let routes = replies.routes.snapshot();
    let new_turn = ChatTurn::new(TurnRole::User, request.message.as_str());
    // The session names the route unless the request does, so the session
    // is read as far back as the named route, or else any route the caller
    // may use, could send (an unknown route is refused below, once the
    // session's owner is checked).
    let named_route = requested
        .as_deref()
        .and_then(|alias| routes.resolve(Some(alias), principal.role).ok());
    let budget = match named_route {
        Some(route) => history_budget([route], &new_turn, None),
        None => history_budget(routes.usable_by(principal.role), &new_turn, None),
    };
    // Waited on before the reply's first event, overlapping the model call.
    let (session, read) = owned_session(state, id, principal, budget).await?;
    let alias = requested.as_deref().unwrap_or(&session.summary.route);
    let route = routes.resolve_shared(Some(alias), principal.role)?;
    let policy = routes.policy_for(&route.alias, &principal.cohorts);
    let masked = check_message(
        state,
        principal,
        &policy,
        &route.alias,
        Some(id),
        &request.message,
    )
    .await?;
    let user_message = Message::new(MessageRole::User, masked.unwrap_or(request.message));
    let new_turn = ChatTurn::new(TurnRole::User, user_message.content.clone());
    let conversation = Conversation::new(
        route.system_prompt.as_deref(),
        Vec::new(),
        session.newest_turns,
        new_turn,
    );
    let prompts = conversation.prompts(&route, None)?;
    let user_id = principal.sub.clone();
    let reply = replies
        .hub
        .begin(ReplyInfo::new(
            id,
            user_id.clone(),
            session.summary.user_cohorts,
            route.alias.clone(),
            user_message.content.to_string(),
        ))
        .await?;
    let request = ReplyRequest {
        api: Api::Chat,
        user_id,
        route,
        prompts,
        max_output_tokens: None,
        sampling: Sampling::default(),
        record: Some(SessionRecord {
            session_id: id,
            user_message,
        }),
        content: content_check(state, principal, policy),
    };
    let audience = Audience {
        hub: Some(Arc::clone(&reply)),
        connection: None,
    };
    let task = launch(state, caller, request, read, audience).await?;
    Ok((reply, task))
}

/// The message as the content policy lets it be sent and stored: masked
/// (`None`: as it is), or `CONTENT_BLOCKED` — recorded in the audit —
/// before any credit is held or model called.
pub(super) async fn check_message(
    state: &AppState,
    principal: &Principal,
    policy: &ReplyPolicy,
    route: &str,
    session_id: Option<ObjectId>,
    text: &str,
) -> Result<Option<String>, Error> {
    match policy.check_input(text) {
        Ok(allowed) => Ok(allowed),
        Err(block) => {
            let context = BlockContext {
                user_id: principal.sub.clone(),
                user_cohorts: principal.cohorts.clone(),
                session_id,
                route: route.to_owned(),
                model: None,
            };
            state.blocks.record(&block, &context).await;
            Err(Error::ContentBlocked {
                rule: block.rule,
                reason: block.reason,
            })
        }
    }
}

/// What the reply's output must pass, and where a block is recorded.
pub(super) fn content_check(
    state: &AppState,
    principal: &Principal,
    policy: ReplyPolicy,
) -> ContentCheck {
    ContentCheck {
        policy,
        recorder: Arc::clone(&state.blocks),
        user_cohorts: principal.cohorts.clone(),
    }
}

/// Session `id` with its newest messages within `budget`, as read for a
/// new reply, if `principal` owns it: only owners add to a session, and
/// anyone else learns nothing about it. What was read may not be durable
/// yet (see [`launch`]).
pub(super) async fn owned_session(
    state: &AppState,
    id: ObjectId,
    principal: &Principal,
    budget: HistoryBudget,
) -> Result<(SessionTail, PendingDurability), Error> {
    let (session, read) = state.sessions.get_tail_applied(id, budget).await?;
    if session.summary.user_id != principal.sub {
        return Err(Error::SessionNotFound);
    }
    Ok((session, read))
}

/// From SIGTERM on, running replies finish but no new one starts.
pub(super) fn refuse_when_shutting_down(state: &AppState) -> Result<(), Error> {
    if state.replies.draining.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    Ok(())
}

/// Starts a reply either API has validated and routed (and, when it has a
/// session, registered in the hub): takes the stream slots and holds the
/// worst case — every refusal is an error before any provider is called,
/// and takes the hub entry back — then generates in a task of its own.
pub(super) async fn launch(
    state: &AppState,
    caller: Caller,
    request: ReplyRequest,
    read: PendingDurability,
    audience: Audience,
) -> Result<ReplyTask, Error> {
    let origin = match &request.record {
        Some(record) => record.session_id.to_hex(),
        None => request.api.as_str().to_owned(),
    };
    let paid = pay_upfront(
        state,
        caller,
        &origin,
        &request.route,
        &request.input_tokens(),
        request.max_output_tokens,
    )
    .await;
    let paid = match paid {
        Ok(paid) => paid,
        Err(error) => {
            if let Some(reply) = &audience.hub {
                state.replies.hub.withdraw(reply).await;
            }
            return Err(error);
        }
    };
    Ok(reply::spawn(
        Arc::clone(&state.replies),
        Arc::clone(&state.sessions),
        audience,
        request,
        read,
        paid,
    ))
}

/// A stream slot of the user's, and when the route sets limits a slot and a
/// request on the route, then the hold of the reply's worst case.
async fn pay_upfront(
    state: &AppState,
    caller: Caller,
    origin: &str,
    route: &parley_crds::ModelRouteSpec,
    input_tokens: &[Option<u64>],
    max_output_tokens: Option<u32>,
) -> Result<Paid, Error> {
    let limiter = &state.rate_limiter;
    let user = caller.principal.sub.as_str();
    let mut stream_slot = limiter.acquire_stream(Scope::User(user)).await?;
    if let Some(on_route) = Scope::on_route(user, route) {
        stream_slot = stream_slot.and(limiter.acquire_stream(on_route).await?);
        // Counted last, so a reply refused a slot does not use up a request.
        limiter.admit_request(on_route).await?;
    }
    let opened = ReplyBill::open(
        Arc::clone(&state.accounting),
        caller,
        origin,
        route,
        input_tokens,
        max_output_tokens,
    )
    .await?;
    Ok(Paid {
        opened,
        stream_slot,
        rate_limiter: Arc::clone(&state.rate_limiter),
    })
}

fn reply_view(session: ObjectId, finished: FinishedReply) -> ReplyView {
    ReplyView {
        session_id: session.to_hex(),
        message_id: finished.message.id.to_hex(),
        role: finished.message.role,
        content: finished.message.content.to_string(),
        timestamp: finished.message.timestamp,
        usage: UsageView {
            input_tokens: finished.usage.input_tokens,
            output_tokens: finished.usage.output_tokens,
        },
        model: finished.model,
        route: finished.route,
        fallback_applied: finished.fallback_applied,
        credits: finished
            .charge
            .map(|Charge { charged, remaining }| CreditsView { charged, remaining }),
    }
}

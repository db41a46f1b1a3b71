//! The OpenAI-compatible API: `POST /v1/chat/completions` (whole or
//! streamed) and `GET /v1/models`, for the SDKs, CLIs and tools that speak
//! that protocol. A completion takes the same path as a chat reply (route
//! and role rules, limits, the hold before the model, fallback before the
//! first token, settling once, durability before the first event, metrics
//! with `api="openai"`); what differs is how it is asked and answered:
//!
//! - the request's own connection reads the reply's typed events and gets
//!   protocol chunks encoded from them; it cannot re-attach, so the reply is
//!   cancelled upstream as soon as it is gone (no grace period) and what was
//!   generated is paid for;
//! - with `X-Parley-Session: <id>` (the caller's session) the exchange is
//!   stored in that session and its reply goes through the hub like a chat
//!   reply (one at a time per session, observable); without it, nothing but
//!   the usage record is kept and nobody can follow the reply;
//! - errors have the protocol's shape ([`OpenAiError`]).

mod error;
mod request;
mod wire;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::OpenAiError;
use error::OpenAiErrorBody;
use request::ChatCompletionRequest;
use wire::{ChatCompletion, ChatCompletionChunk, ChunkEncoder, Completion, ModelList, ModelObject};

use super::posted_event_stream;
use super::replies::{
    CREDITS_REMAINING_HEADER, ReplyTask, check_message, content_check, launch, owned_session,
    refuse_when_shutting_down,
};
use crate::accounting::Caller;
use crate::auth::Principal;
use crate::embedded_db::PendingDurability;
use crate::error::Error;
use crate::state::AppState;
use crate::store::{HistoryBudget, Message, MessageRole, ObjectId};
use crate::stream::frames::PING;
use crate::stream::{Api, Audience, ReplyEvent, ReplyInfo, ReplyRequest, SessionRecord};

/// The header naming the chat session a completion is stored in.
pub const SESSION_HEADER: &str = "x-parley-session";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chat_completions))
        .routes(routes!(list_models))
        .routes(routes!(retrieve_model))
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    params(("X-Parley-Session" = Option<String>, Header, description = "A chat session of the caller's to store the exchange in (its last user message and the reply); its reply can then be observed. Without it nothing but the usage record is kept.")),
    responses(
        (status = 200, description = "The completion; streamed (`stream: true`): `data:` chunks, then `data: [DONE]`, or a `data: {\"error\": …}` event if the reply fails after its first token. Header `x-parley-credits-remaining` (whole completions) has the available credits after it.", content(
            (ChatCompletion = "application/json"),
            (ChatCompletionChunk = "text/event-stream"),
        )),
        (status = 400, description = "Invalid body or field, or an unsupported field (`param` names it); `context_length_exceeded` (`param`: `messages`) when the system messages and the last message, with room for the reply, fit no target's context window", body = OpenAiErrorBody),
        (status = 401, description = "Missing or invalid token or API key", body = OpenAiErrorBody),
        (status = 402, description = "The caller cannot afford the reply's worst case (`insufficient_credits`)", body = OpenAiErrorBody),
        (status = 404, description = "No such model the caller may use (`model_not_found`), or no such session of the caller's", body = OpenAiErrorBody),
        (status = 409, description = "The session already has a reply in progress", body = OpenAiErrorBody),
        (status = 413, description = "Body too large", body = OpenAiErrorBody),
        (status = 429, description = "A per-user limit was hit, or every target was throttled; `Retry-After` says when to retry", body = OpenAiErrorBody),
        (status = 502, description = "The model failed", body = OpenAiErrorBody),
        (status = 503, description = "Model, store, ledger or rate limiter unavailable, or shutting down", body = OpenAiErrorBody),
        (status = 504, description = "The model timed out", body = OpenAiErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Result<Caller, Error>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let caller = caller?;
    refuse_when_shutting_down(&state)?;
    let body = body.map_err(|rejection| body_error(&state, &rejection))?;
    let asked = ChatCompletionRequest::parse(&body, state.limits.max_message_chars)?;
    let session = session_header(&headers)?;
    let routes = state.replies.routes.snapshot();
    let principal = &caller.principal;
    let route = routes.resolve_model_shared(&asked.model, principal.role)?;
    // Refused before any session, credit or model is touched.
    let mut turns = asked.turns();
    let policy = routes.policy_for(&route.alias, &principal.cohorts);
    for text in turns.user_texts_mut() {
        if let Some(masked) =
            check_message(&state, principal, &policy, &route.alias, session, text).await?
        {
            *text = masked.into();
        }
    }
    // What the session stores of the request, kept before the prompts take it.
    let stored_message = session.map(|_| turns.message_text().to_owned());
    let prompts = turns
        .into_conversation(route.system_prompt.as_deref())
        .prompts(&route, asked.max_output_tokens())?;
    let (record, read, hub) = match session.zip(stored_message) {
        None => (None, PendingDurability::none(), None),
        Some((id, stored_message)) => {
            // The request carries the conversation: the session is only
            // checked and appended to.
            let (session, read) = owned_session(&state, id, principal, HistoryBudget::NONE).await?;
            let user_message = Message::new(MessageRole::User, stored_message);
            let reply = state
                .replies
                .hub
                .begin(ReplyInfo::new(
                    id,
                    principal.sub.clone(),
                    session.summary.user_cohorts,
                    route.alias.clone(),
                    user_message.content.to_string(),
                ))
                .await?;
            let record = SessionRecord {
                session_id: id,
                user_message,
            };
            (Some(record), read, Some(reply))
        }
    };
    let request = ReplyRequest {
        api: Api::OpenAi,
        user_id: principal.sub.clone(),
        route,
        prompts,
        max_output_tokens: asked.max_output_tokens(),
        sampling: asked.sampling(),
        record,
        content: content_check(&state, principal, policy),
    };
    let (connection, events) = mpsc::unbounded_channel();
    let audience = Audience {
        hub,
        connection: Some(connection),
    };
    let task = launch(&state, caller, request, read, audience).await?;
    if asked.is_streamed() {
        streamed(
            events,
            task,
            asked.includes_usage(),
            state.replies.settings.ping,
        )
        .await
    } else {
        whole(events, task).await
    }
}

/// A whole completion, collected from the reply's events. Dropping this
/// future (the client left) drops the events' receiver, which cancels the
/// reply.
async fn whole(
    mut events: mpsc::UnboundedReceiver<ReplyEvent>,
    task: ReplyTask,
) -> Result<Response, OpenAiError> {
    let mut model = String::new();
    let mut content = String::new();
    while let Some(event) = events.recv().await {
        match event {
            ReplyEvent::Model {
                model: answering, ..
            } => model = answering,
            ReplyEvent::Chunk { text, .. } => content.push_str(&text),
            ReplyEvent::Complete {
                usage,
                stop_reason,
                charge,
                ..
            } => {
                let completion = Completion::new(model).whole(content, &stop_reason, usage);
                let mut response = Json(completion).into_response();
                if let Some(charge) = charge
                    && let Ok(value) = HeaderValue::from_str(&charge.remaining.to_string())
                {
                    response
                        .headers_mut()
                        .insert(CREDITS_REMAINING_HEADER, value);
                }
                return Ok(response);
            }
            ReplyEvent::Error { .. } => break,
        }
    }
    Err(failure(task).await)
}

/// A streamed completion. The response starts with the reply's first
/// output, so a reply refused or failed before any (every target throttled,
/// say) is an HTTP error the client maps to its own exception.
async fn streamed(
    mut events: mpsc::UnboundedReceiver<ReplyEvent>,
    task: ReplyTask,
    include_usage: bool,
    ping: Duration,
) -> Result<Response, OpenAiError> {
    let Some(ReplyEvent::Model { model, .. }) = events.recv().await else {
        return Err(failure(task).await);
    };
    let encoder = ChunkEncoder::new(Completion::new(model), include_usage);
    let chunks = Chunks {
        pending: VecDeque::from([encoder.role()]),
        encoder,
        events,
        ping: tokio::time::interval_at(tokio::time::Instant::now() + ping, ping),
        ended: false,
    };
    Ok(posted_event_stream(futures::stream::unfold(
        chunks,
        |mut chunks| async move {
            chunks
                .next()
                .await
                .map(|frame| (Ok::<_, Infallible>(frame), chunks))
        },
    )))
}

/// Why a reply ended without completing, from its task.
async fn failure(task: ReplyTask) -> OpenAiError {
    let error = match task.await {
        Ok(Err(error)) => error,
        Ok(Ok(_)) => Error::Store("the reply ended without its last event".into()),
        Err(error) => Error::Store(format!("the reply task failed: {error}")),
    };
    error.into()
}

/// The chunks of a streamed completion, encoded from the reply's events,
/// with `: ping` comments while it is idle. Dropping it (the client left)
/// drops the events' receiver, which cancels the reply.
struct Chunks {
    encoder: ChunkEncoder,
    events: mpsc::UnboundedReceiver<ReplyEvent>,
    pending: VecDeque<Bytes>,
    ping: tokio::time::Interval,
    ended: bool,
}

impl Chunks {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.ended {
                return None;
            }
            tokio::select! {
                event = self.events.recv() => self.encode(event),
                _ = self.ping.tick() => return Some(Bytes::from_static(PING)),
            }
        }
    }

    fn encode(&mut self, event: Option<ReplyEvent>) {
        match event {
            Some(ReplyEvent::Chunk { text, .. }) => {
                self.pending.push_back(self.encoder.text(&text))
            }
            Some(ReplyEvent::Complete {
                usage, stop_reason, ..
            }) => {
                self.pending.push_back(self.encoder.finish(&stop_reason));
                self.pending.extend(self.encoder.usage(usage));
                self.pending.push_back(Bytes::from_static(wire::DONE));
                self.ended = true;
            }
            Some(ReplyEvent::Error { code, message }) => {
                let error = OpenAiError::mid_stream(code, message);
                self.pending.push_back(wire::error_event(&error.body()));
                self.ended = true;
            }
            // Announced once, before the first chunk.
            Some(ReplyEvent::Model { .. }) => {}
            None => self.ended = true,
        }
    }
}

fn session_header(headers: &HeaderMap) -> Result<Option<ObjectId>, OpenAiError> {
    let Some(value) = headers.get(SESSION_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| ObjectId::parse_str(text.trim()).ok())
        .map(Some)
        .ok_or_else(|| {
            OpenAiError::invalid_param(
                "X-Parley-Session".into(),
                "X-Parley-Session must be a chat session id, 24 hexadecimal characters".into(),
            )
        })
}

fn body_error(state: &AppState, rejection: &BytesRejection) -> OpenAiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge {
            limit: state.limits.max_body_bytes,
        }
        .into()
    } else {
        Error::MalformedJson(rejection.body_text()).into()
    }
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The route aliases the caller may use", body = ModelList),
        (status = 401, description = "Missing or invalid token or API key", body = OpenAiErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_models(
    State(state): State<AppState>,
    caller: Result<Principal, Error>,
) -> Result<Json<ModelList>, OpenAiError> {
    let caller = caller?;
    let routes = state.replies.routes.snapshot();
    let models = routes
        .usable_by(caller.role)
        .map(|route| ModelObject::new(route.alias.clone()))
        .collect();
    Ok(Json(ModelList::new(models)))
}

#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "A route alias, or the model id of a route's first target")),
    responses(
        (status = 200, description = "The model, if the caller may use it", body = ModelObject),
        (status = 401, description = "Missing or invalid token or API key", body = OpenAiErrorBody),
        (status = 404, description = "No such model the caller may use", body = OpenAiErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retrieve_model(
    State(state): State<AppState>,
    caller: Result<Principal, Error>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, OpenAiError> {
    let caller = caller?;
    let Path(model) = model.map_err(|rejection| Error::InvalidQuery(rejection.body_text()))?;
    let routes = state.replies.routes.snapshot();
    routes.resolve_model(&model, caller.role)?;
    Ok(Json(ModelObject::new(model)))
}

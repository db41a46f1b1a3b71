//! The crate's one error type. It is also the API's error: every variant maps
//! to one HTTP status and one stable code, and answers `{"code","message"}`.
//! Internal details (store errors, I/O) are logged, never returned.

use std::time::Duration;

use axum::Json;
use axum::http::header::{CONNECTION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::ledger::decimal_credits;
use crate::ledger::{Credits, LedgerError};
use crate::providers::ProviderErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("invalid bearer token: {0}")]
    InvalidToken(&'static str),
    #[error("identity provider unavailable: {0}")]
    AuthUnavailable(String),
    #[error("chat session not found")]
    SessionNotFound,
    #[error("no such endpoint")]
    EndpointNotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("session ids are 24 hexadecimal characters")]
    InvalidSessionId,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("expected a JSON body with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("invalid body: {0}")]
    InvalidBody(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("{field}: {message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive within {} s", .0.as_secs())]
    RequestTimeout(Duration),
    #[error("you have {limit} chat sessions, the most one user may keep; delete one first")]
    TooManySessions { limit: u64 },
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("store error: {0}")]
    Store(String),
    #[error("unknown model route `{requested}`")]
    UnknownRoute {
        requested: String,
        allowed: Vec<String>,
    },
    #[error("this chat session already has a reply in progress")]
    ReplyInProgress,
    #[error("this chat session has no reply in progress")]
    NoActiveReply,
    #[error("the model failed: {0}")]
    Upstream(crate::providers::ProviderError),
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error("the reply ran longer than this deployment allows")]
    ReplyTooLong,
    /// The message (with the route's instructions and room for the reply)
    /// fits no target's context window; the closest window is reported.
    #[error(
        "the message needs about {needed_tokens} tokens with the route's instructions and room \
         for the reply, more than the model's context window of {context_tokens} tokens; \
         shorten it"
    )]
    MessageTooLongForModel {
        needed_tokens: u32,
        context_tokens: u32,
    },
    #[error("configuration error: {0}")]
    Config(String),
    /// A body of the accounting API with missing, unknown or mistyped fields.
    #[error("{message}")]
    InvalidFields {
        message: String,
        fields: Vec<String>,
    },
    #[error("unknown model `{model}`")]
    UnknownModel { model: String, allowed: Vec<String> },
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("no streaming session {0} is open or closed for this account")]
    StreamingSessionNotFound(String),
    #[error("accounting service unavailable: {0}")]
    AccountingUnavailable(String),
    #[error("{limit} rate limit exceeded; retry in {} s", retry_after.as_secs())]
    RateLimited {
        limit: &'static str,
        retry_after: Duration,
    },
    #[error("rate limiter unavailable: {0}")]
    RateLimiterUnavailable(String),
    /// Redis, which carries replies across replicas, did not answer.
    #[error("reply hub unavailable: {0}")]
    HubUnavailable(String),
    #[error("observation is turned off in this deployment")]
    ObservationDisabled,
    /// A content policy rule (or a guardrail) blocked a message or a reply;
    /// the message is the rule's public reason.
    #[error("{reason}")]
    ContentBlocked { rule: String, reason: String },
    #[error("no such API key of yours")]
    ApiKeyNotFound,
    /// Every target of every route the caller may use has its circuit
    /// breaker open: no reply could be answered now.
    #[error("every route you may use is unavailable for now; retry later")]
    NoRouteAvailable,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    EmbeddedDb(#[from] crate::embedded_db::OpenError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code, e.g. `SESSION_NOT_FOUND`.
    pub code: &'static str,
    /// Human-readable explanation; never contains internal details.
    pub message: String,
    /// The offending field, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    /// The offending fields of an `INVALID_FIELDS` body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// What may be asked for instead: model ids and aliases for `UNKNOWN_MODEL`,
    /// the caller's routes for `UNKNOWN_ROUTE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    /// `INSUFFICIENT_CREDITS`: the account's balance, in credits.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "decimal_credits::option"
    )]
    #[schema(value_type = Option<f64>)]
    pub balance: Option<Credits>,
    /// `INSUFFICIENT_CREDITS`: balance minus open holds, in credits.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "decimal_credits::option"
    )]
    #[schema(value_type = Option<f64>)]
    pub available: Option<Credits>,
    /// `INSUFFICIENT_CREDITS`: the price of the request, in credits.
    #[serde(
        rename = "requiredCredits",
        skip_serializing_if = "Option::is_none",
        with = "decimal_credits::option"
    )]
    #[schema(value_type = Option<f64>)]
    pub required_credits: Option<Credits>,
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Ledger(error) => ledger_status(error),
            Self::InvalidFields { .. } | Self::UnknownModel { .. } => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::StreamingSessionNotFound(_) => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::AccountingUnavailable(_)
            | Self::RateLimiterUnavailable(_)
            | Self::HubUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ObservationDisabled => StatusCode::FORBIDDEN,
            Self::ContentBlocked { .. } => StatusCode::BAD_REQUEST,
            Self::NoRouteAvailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::MissingToken | Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::SessionNotFound | Self::EndpointNotFound | Self::ApiKeyNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidSessionId
            | Self::MalformedJson(_)
            | Self::InvalidQuery(_)
            | Self::UnknownRoute { .. } => StatusCode::BAD_REQUEST,
            Self::ReplyInProgress => StatusCode::CONFLICT,
            Self::NoActiveReply => StatusCode::NOT_FOUND,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            // Only ever an `error` event of a reply already under way.
            Self::ReplyTooLong => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(error) => upstream_status(error.kind),
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidBody(_)
            | Self::Validation { .. }
            | Self::MessageTooLongForModel { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooManySessions { .. } => StatusCode::CONFLICT,
            Self::AuthUnavailable(_) | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) | Self::Config(_) | Self::Io { .. } | Self::EmbeddedDb(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A dependency did not answer (503): worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Ledger(error) => ledger_code(error),
            Self::InvalidFields { .. } => "INVALID_FIELDS",
            Self::UnknownModel { .. } => "UNKNOWN_MODEL",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::StreamingSessionNotFound(_) => "STREAMING_SESSION_NOT_FOUND",
            Self::AccountingUnavailable(_) => "ACCOUNTING_UNAVAILABLE",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::RateLimiterUnavailable(_) => "RATE_LIMITER_UNAVAILABLE",
            Self::HubUnavailable(_) => "HUB_UNAVAILABLE",
            Self::ObservationDisabled => "OBSERVATION_DISABLED",
            Self::ContentBlocked { .. } => "CONTENT_BLOCKED",
            Self::NoRouteAvailable => "NO_ROUTE_AVAILABLE",
            Self::MissingToken => "MISSING_TOKEN",
            Self::InvalidToken(_) => "INVALID_TOKEN",
            Self::AuthUnavailable(_) => "AUTH_UNAVAILABLE",
            Self::SessionNotFound => "SESSION_NOT_FOUND",
            Self::ApiKeyNotFound => "API_KEY_NOT_FOUND",
            Self::EndpointNotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::InvalidSessionId => "INVALID_SESSION_ID",
            Self::MalformedJson(_) => "MALFORMED_JSON",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::InvalidBody(_) => "INVALID_BODY",
            Self::InvalidQuery(_) => "INVALID_QUERY",
            Self::Validation { .. } => "VALIDATION_FAILED",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::RequestTimeout(_) => "REQUEST_TIMEOUT",
            Self::TooManySessions { .. } => "TOO_MANY_SESSIONS",
            Self::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            Self::UnknownRoute { .. } => "UNKNOWN_ROUTE",
            Self::ReplyInProgress => "REPLY_IN_PROGRESS",
            Self::NoActiveReply => "NO_ACTIVE_REPLY",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::ReplyTooLong => "MAX_DURATION",
            Self::MessageTooLongForModel { .. } => "MESSAGE_TOO_LONG_FOR_MODEL",
            Self::Upstream(error) => upstream_code(error.kind),
            Self::Store(_) | Self::Config(_) | Self::Io { .. } | Self::EmbeddedDb(_) => "INTERNAL",
        }
    }

    /// What the client is told: the full text for client errors, a fixed
    /// sentence for server-side failures whose details stay in the log.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Self::AuthUnavailable(_) => "the identity provider is unavailable; retry later".into(),
            Self::StoreUnavailable(_) => "the session store is unavailable; retry later".into(),
            Self::Store(_) | Self::Config(_) | Self::Io { .. } | Self::EmbeddedDb(_) => {
                "internal error".into()
            }
            Self::AccountingUnavailable(_) => {
                "the accounting service is unavailable; retry later".into()
            }
            Self::RateLimiterUnavailable(_) => {
                "the rate limiter is unavailable; requests are refused until it is back".into()
            }
            Self::HubUnavailable(_) => "the reply hub is unavailable; retry later".into(),
            Self::Ledger(error) => ledger_public_message(error),
            Self::UnknownRoute { requested, allowed } => format!(
                "unknown model route `{requested}`; you may use: {}",
                allowed.join(", ")
            ),
            // Upstream messages may carry provider internals; the code says enough.
            Self::Upstream(error) => format!("the model failed ({})", error.kind),
            Self::InvalidFields { .. }
            | Self::UnknownModel { .. }
            | Self::Forbidden(_)
            | Self::StreamingSessionNotFound(_)
            | Self::RateLimited { .. }
            | Self::MissingToken
            | Self::InvalidToken(_)
            | Self::ReplyInProgress
            | Self::ObservationDisabled
            | Self::ContentBlocked { .. }
            | Self::NoRouteAvailable
            | Self::NoActiveReply
            | Self::ShuttingDown
            | Self::ReplyTooLong
            | Self::MessageTooLongForModel { .. }
            | Self::SessionNotFound
            | Self::ApiKeyNotFound
            | Self::EndpointNotFound
            | Self::MethodNotAllowed
            | Self::InvalidSessionId
            | Self::MalformedJson(_)
            | Self::UnsupportedMediaType
            | Self::InvalidBody(_)
            | Self::InvalidQuery(_)
            | Self::Validation { .. }
            | Self::PayloadTooLarge { .. }
            | Self::RequestTimeout(_)
            | Self::TooManySessions { .. } => self.to_string(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request rejected");
        }
        let mut body = ErrorBody {
            code: self.code(),
            message: self.public_message(),
            field: None,
            fields: None,
            allowed: None,
            balance: None,
            available: None,
            required_credits: None,
        };
        let mut retry_after = None;
        match self {
            Self::Validation { field, .. } => body.field = Some(field),
            Self::InvalidFields { fields, .. } => body.fields = Some(fields),
            Self::UnknownModel { allowed, .. } => body.allowed = Some(allowed),
            Self::UnknownRoute { allowed, .. } => body.allowed = Some(allowed),
            Self::Ledger(LedgerError::InsufficientCredits {
                balance,
                available,
                required,
            }) => {
                body.balance = Some(balance);
                body.available = Some(available);
                body.required_credits = Some(required);
            }
            Self::RateLimited {
                retry_after: wait, ..
            } => retry_after = Some(retry_after_header(wait)),
            _ => {}
        }
        let mut response = (status, Json(body)).into_response();
        if let Some(value) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, value);
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A `Retry-After` of whole seconds, rounded up: retrying earlier would be
/// refused again.
pub(crate) fn retry_after_header(wait: Duration) -> HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

/// Every ledger failure denies: client mistakes are 4xx, an unreachable or
/// failing store is 503 (retryable), corruption is 500. None of them allows.
fn ledger_status(error: &LedgerError) -> StatusCode {
    match error {
        LedgerError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
        LedgerError::HoldNotFound { .. } => StatusCode::NOT_FOUND,
        LedgerError::HoldClosed { .. } | LedgerError::RequestIdConflict { .. } => {
            StatusCode::CONFLICT
        }
        LedgerError::InvalidRequest(_)
        | LedgerError::InvalidAmount(_)
        | LedgerError::AmountOutOfRange => StatusCode::BAD_REQUEST,
        LedgerError::Contention { .. } | LedgerError::Mongo(_) | LedgerError::Embedded(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LedgerError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn ledger_code(error: &LedgerError) -> &'static str {
    match error {
        LedgerError::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
        LedgerError::HoldNotFound { .. } => "STREAMING_SESSION_NOT_FOUND",
        LedgerError::HoldClosed { .. } => "STREAMING_SESSION_CLOSED",
        LedgerError::RequestIdConflict { .. } => "STREAMING_SESSION_CONFLICT",
        LedgerError::InvalidRequest(_) => "INVALID_LEDGER_REQUEST",
        LedgerError::InvalidAmount(_) | LedgerError::AmountOutOfRange => "INVALID_AMOUNT",
        LedgerError::Contention { .. } => "LEDGER_BUSY",
        LedgerError::Mongo(_) | LedgerError::Embedded(_) => "LEDGER_UNAVAILABLE",
        LedgerError::Corrupt(_) => "INTERNAL",
    }
}

fn ledger_public_message(error: &LedgerError) -> String {
    match error {
        LedgerError::Mongo(_) | LedgerError::Embedded(_) => {
            "the credits ledger is unavailable; retry later".into()
        }
        LedgerError::Contention { .. } => "the account is busy; retry".into(),
        LedgerError::Corrupt(_) => "internal error".into(),
        LedgerError::InsufficientCredits { .. }
        | LedgerError::HoldNotFound { .. }
        | LedgerError::HoldClosed { .. }
        | LedgerError::RequestIdConflict { .. }
        | LedgerError::InvalidRequest(_)
        | LedgerError::InvalidAmount(_)
        | LedgerError::AmountOutOfRange => error.to_string(),
    }
}

/// HTTP status of a reply that failed upstream before any output.
fn upstream_status(kind: ProviderErrorKind) -> StatusCode {
    match kind {
        ProviderErrorKind::Throttled => StatusCode::TOO_MANY_REQUESTS,
        ProviderErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ProviderErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ProviderErrorKind::ContextWindow => StatusCode::UNPROCESSABLE_ENTITY,
        ProviderErrorKind::InvalidRequest | ProviderErrorKind::Auth | ProviderErrorKind::Other => {
            StatusCode::BAD_GATEWAY
        }
    }
}

/// Stable code of an upstream failure, in HTTP errors and SSE `error` events.
pub fn upstream_code(kind: ProviderErrorKind) -> &'static str {
    match kind {
        ProviderErrorKind::Throttled => "MODEL_THROTTLED",
        ProviderErrorKind::Unavailable => "MODEL_UNAVAILABLE",
        ProviderErrorKind::Timeout => "MODEL_TIMEOUT",
        ProviderErrorKind::ContextWindow => "CONTEXT_WINDOW_EXCEEDED",
        ProviderErrorKind::InvalidRequest => "MODEL_REJECTED_REQUEST",
        ProviderErrorKind::Auth => "MODEL_AUTH_FAILED",
        ProviderErrorKind::Other => "MODEL_ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_details_are_not_returned() {
        let error = Error::Store("E11000 duplicate key in collection secret_things".into());
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.public_message(), "internal error");
        let error = Error::StoreUnavailable("connection refused 10.0.0.7:27017".into());
        assert_eq!(error.code(), "STORE_UNAVAILABLE");
        assert!(!error.public_message().contains("10.0.0.7"));
    }
}

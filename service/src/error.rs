//! The crate's one error type. It is also the API's error: every variant maps
//! to one HTTP status and one stable code, and answers `{"code","message"}`.
//! Internal details (store errors, I/O) are logged, never returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

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
    #[error("configuration error: {0}")]
    Config(String),
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
    /// The routes the caller may use, when the requested one is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
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
            Self::MissingToken | Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::SessionNotFound | Self::EndpointNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidSessionId
            | Self::MalformedJson(_)
            | Self::InvalidQuery(_)
            | Self::UnknownRoute { .. } => StatusCode::BAD_REQUEST,
            Self::ReplyInProgress => StatusCode::CONFLICT,
            Self::NoActiveReply => StatusCode::NOT_FOUND,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(error) => upstream_status(error.kind),
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidBody(_) | Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::AuthUnavailable(_) | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) | Self::Config(_) | Self::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "MISSING_TOKEN",
            Self::InvalidToken(_) => "INVALID_TOKEN",
            Self::AuthUnavailable(_) => "AUTH_UNAVAILABLE",
            Self::SessionNotFound => "SESSION_NOT_FOUND",
            Self::EndpointNotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::InvalidSessionId => "INVALID_SESSION_ID",
            Self::MalformedJson(_) => "MALFORMED_JSON",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::InvalidBody(_) => "INVALID_BODY",
            Self::InvalidQuery(_) => "INVALID_QUERY",
            Self::Validation { .. } => "VALIDATION_FAILED",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            Self::UnknownRoute { .. } => "UNKNOWN_ROUTE",
            Self::ReplyInProgress => "REPLY_IN_PROGRESS",
            Self::NoActiveReply => "NO_ACTIVE_REPLY",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::Upstream(error) => upstream_code(error.kind),
            Self::Store(_) | Self::Config(_) | Self::Io { .. } => "INTERNAL",
        }
    }

    /// What the client is told: the full text for client errors, a fixed
    /// sentence for server-side failures whose details stay in the log.
    fn public_message(&self) -> String {
        match self {
            Self::AuthUnavailable(_) => "the identity provider is unavailable; retry later".into(),
            Self::StoreUnavailable(_) => "the session store is unavailable; retry later".into(),
            Self::Store(_) | Self::Config(_) | Self::Io { .. } => "internal error".into(),
            Self::UnknownRoute { requested, allowed } => format!(
                "unknown model route `{requested}`; you may use: {}",
                allowed.join(", ")
            ),
            // Upstream messages may carry provider internals; the code says enough.
            Self::Upstream(error) => format!("the model failed ({})", error.kind),
            Self::MissingToken
            | Self::InvalidToken(_)
            | Self::ReplyInProgress
            | Self::NoActiveReply
            | Self::ShuttingDown
            | Self::SessionNotFound
            | Self::EndpointNotFound
            | Self::MethodNotAllowed
            | Self::InvalidSessionId
            | Self::MalformedJson(_)
            | Self::UnsupportedMediaType
            | Self::InvalidBody(_)
            | Self::InvalidQuery(_)
            | Self::Validation { .. }
            | Self::PayloadTooLarge { .. } => self.to_string(),
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
        let field = match &self {
            Self::Validation { field, .. } => Some(*field),
            _ => None,
        };
        let body = ErrorBody {
            code: self.code(),
            message: self.public_message(),
            field,
            allowed: match &self {
                Self::UnknownRoute { allowed, .. } => Some(allowed.clone()),
                _ => None,
            },
        };
        (status, Json(body)).into_response()
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

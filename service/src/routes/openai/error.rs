//! Errors of the OpenAI-compatible API, in the protocol's shape:
//! `{"error": {"message", "type", "param", "code"}}` with the status the
//! official clients map to their exception types. The chat API keeps its
//! own shape; both are made from the same [`Error`].

use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, retry_after_header};
use crate::ledger::LedgerError;
use crate::providers::ProviderErrorKind;

/// What a client is told to wait after the model was throttled upstream:
/// the model gives no figure, and a second is the usual scale of a burst.
const UPSTREAM_THROTTLE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum OpenAiError {
    /// A failure shared with the chat API.
    Api(Error),
    /// A request the protocol allows but this service does not take.
    InvalidRequest {
        param: Option<String>,
        code: &'static str,
        message: String,
    },
    /// A reply that failed after its first token (its `error` event).
    Streamed { code: &'static str, message: String },
}

impl From<Error> for OpenAiError {
    fn from(error: Error) -> Self {
        Self::Api(error)
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    error: ErrorObject,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    message: String,
    /// `invalid_request_error`, `authentication_error`, `insufficient_credits`,
    /// `permission_error`, `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// The request field (or header) at fault, when one is.
    param: Option<String>,
    /// `invalid_api_key`, `insufficient_credits`, `model_not_found`,
    /// `rate_limit_exceeded`, `context_length_exceeded`,
    /// `unsupported_parameter`, `unknown_parameter`, `invalid_value`, or the
    /// chat API's code in lower case (`store_unavailable`, …).
    code: Option<String>,
}

impl OpenAiError {
    /// A bad value (or a missing one) of `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            param: param.map(str::to_owned),
            code: "invalid_value",
            message: message.into(),
        }
    }

    /// A bad value of a parameter named at run time (`messages[2]`), or a
    /// parameter the protocol does not have.
    pub fn invalid_param(param: String, message: String) -> Self {
        let code = if message.starts_with("unrecognized") {
            "unknown_parameter"
        } else {
            "invalid_value"
        };
        Self::InvalidRequest {
            param: Some(param),
            code,
            message,
        }
    }

    /// A parameter of the protocol this service does not support.
    pub fn unsupported(param: &str, why: &str) -> Self {
        Self::InvalidRequest {
            param: Some(param.to_owned()),
            code: "unsupported_parameter",
            message: format!("unsupported parameter `{param}`: {why}"),
        }
    }

    /// A reply's `error` event after the stream began, in the protocol's shape.
    pub fn mid_stream(code: &'static str, message: String) -> Self {
        Self::Streamed { code, message }
    }

    #[cfg(test)]
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::Api(_) | Self::Streamed { .. } => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        let error = match self {
            Self::Api(error) => error,
            Self::InvalidRequest { .. } => return StatusCode::BAD_REQUEST,
            // Sent with a 200 already under way; the type says server-side.
            Self::Streamed { .. } => return StatusCode::INTERNAL_SERVER_ERROR,
        };
        match error {
            // The official clients expect a missing model to be a 404.
            Error::UnknownRoute { .. } | Error::UnknownModel { .. } => StatusCode::NOT_FOUND,
            // The protocol answers every invalid request with a 400.
            Error::InvalidBody(_)
            | Error::Validation { .. }
            | Error::InvalidQuery(_)
            | Error::MessageTooLongForModel { .. } => StatusCode::BAD_REQUEST,
            Error::Upstream(upstream) if upstream.kind == ProviderErrorKind::ContextWindow => {
                StatusCode::BAD_REQUEST
            }
            other => other.status(),
        }
    }

    /// The protocol's error object: the message and code as the chat API
    /// would say them, and the kind of error its status means.
    pub fn body(&self) -> OpenAiErrorBody {
        let status = self.status();
        let (message, param, code) = match self {
            Self::InvalidRequest {
                param,
                code,
                message,
            } => (message.clone(), param.clone(), (*code).to_owned()),
            Self::Streamed { code, message } => (message.clone(), None, code.to_ascii_lowercase()),
            Self::Api(error) => (error.public_message(), api_param(error), api_code(error)),
        };
        OpenAiErrorBody {
            error: ErrorObject {
                message,
                kind: kind_of(status),
                param,
                code: Some(code),
            },
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api(Error::RateLimited { retry_after, .. }) => Some(*retry_after),
            Self::Api(Error::Upstream(upstream))
                if upstream.kind == ProviderErrorKind::Throttled =>
            {
                Some(UPSTREAM_THROTTLE_RETRY)
            }
            _ => None,
        }
    }
}

fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::PAYMENT_REQUIRED => "insufficient_credits",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        status if status.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

fn api_code(error: &Error) -> String {
    let code = match error {
        Error::MissingToken | Error::InvalidToken(_) => "invalid_api_key",
        Error::UnknownRoute { .. } | Error::UnknownModel { .. } => "model_not_found",
        Error::RateLimited { .. } => "rate_limit_exceeded",
        Error::Ledger(LedgerError::InsufficientCredits { .. }) => "insufficient_credits",
        Error::Upstream(upstream) if upstream.kind == ProviderErrorKind::ContextWindow => {
            "context_length_exceeded"
        }
        Error::MessageTooLongForModel { .. } => "context_length_exceeded",
        Error::ContentBlocked { .. } => "content_policy_violation",
        other => return other.code().to_ascii_lowercase(),
    };
    code.to_owned()
}

fn api_param(error: &Error) -> Option<String> {
    match error {
        Error::UnknownRoute { .. } | Error::UnknownModel { .. } => Some("model".to_owned()),
        Error::Validation { field, .. } => Some((*field).to_owned()),
        Error::MessageTooLongForModel { .. } | Error::ContentBlocked { .. } => {
            Some("messages".to_owned())
        }
        _ => None,
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Api(error) if status.is_server_error() => {
                tracing::error!(code = error.code(), %error, "request failed");
            }
            Self::Api(error) => tracing::debug!(code = error.code(), %error, "request rejected"),
            Self::InvalidRequest { message, .. } | Self::Streamed { message, .. } => {
                tracing::debug!(%message, "request rejected");
            }
        }
        let mut response = (status, Json(self.body())).into_response();
        if let Some(wait) = self.retry_after() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, retry_after_header(wait));
        }
        response
    }
}

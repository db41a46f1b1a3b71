//! A stand-in for an OpenAI-compatible `/v1/chat/completions` server on
//! loopback (what vLLM, Ollama and llama.cpp's server expose).
//!
//! Non-streaming calls get a `chat.completion` object; `stream: true` calls get
//! `text/event-stream` chunks (`data: {...}`), a usage chunk when
//! `stream_options.include_usage` is set, and `data: [DONE]`. What it answers
//! is scripted per model id ([`Script`]).

use std::io;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::script::{
    Fault, RecordedCall, Rejection, Script, ScriptedUsage, Scripts, Stop, StreamFailure,
    count_words,
};
use crate::serve::{Performance, Server, StandIn, WireFormat, streamed_body};

/// A running OpenAI-compatible stand-in; dropping it stops the server.
pub struct OpenAiStandIn {
    stand_in: StandIn,
}

impl std::ops::Deref for OpenAiStandIn {
    type Target = StandIn;

    fn deref(&self) -> &StandIn {
        &self.stand_in
    }
}

#[derive(Clone)]
struct AppState {
    scripts: Scripts,
    shutdown: CancellationToken,
}

impl OpenAiStandIn {
    /// Starts a stand-in on 127.0.0.1 at a free port.
    pub async fn start() -> io::Result<Self> {
        Self::start_until(CancellationToken::new()).await
    }

    /// Starts a stand-in that stops when `shutdown` is cancelled (or when
    /// the handle is dropped).
    pub async fn start_until(shutdown: CancellationToken) -> io::Result<Self> {
        let scripts = Scripts::new();
        let state = AppState {
            scripts: scripts.clone(),
            shutdown: shutdown.clone(),
        };
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(state);
        let server = Server::start(router, shutdown).await?;
        Ok(Self {
            stand_in: StandIn { server, scripts },
        })
    }

    /// `http://127.0.0.1:PORT/v1`: the base URL as OpenAI clients take it,
    /// ending in the API version.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr())
    }
}

/// Words in the messages' contents (a string, or a list of text parts).
fn request_words(body: &Value) -> u32 {
    let messages = body.get("messages").and_then(Value::as_array);
    let texts = messages
        .into_iter()
        .flatten()
        .filter_map(|message| message.get("content"))
        .flat_map(|content| match content {
            Value::Array(parts) => parts.iter().filter_map(|p| p.get("text")).collect(),
            text => vec![text],
        })
        .filter_map(Value::as_str);
    count_words(texts)
}

fn finish_reason(stop: Stop) -> &'static str {
    match stop {
        Stop::EndTurn => "stop",
        Stop::MaxTokens => "length",
    }
}

fn usage_json(usage: ScriptedUsage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens.saturating_add(usage.output_tokens),
    })
}

fn error_json(kind: &str, code: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

fn error_response(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (status, axum::Json(error_json(kind, code, message))).into_response()
}

fn rejection_response(rejection: Rejection) -> Response {
    let (status, kind, code, message) = match rejection {
        Rejection::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached, please try again later.",
        ),
        Rejection::ServiceUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "service_unavailable",
            "The server is overloaded or not ready yet.",
        ),
        Rejection::InternalError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "The server had an error while processing your request.",
        ),
        Rejection::AccessDenied => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        ),
        Rejection::ContextWindowExceeded => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "context_length_exceeded",
            "This model's maximum context length is 4096 tokens; your messages are longer.",
        ),
        Rejection::InvalidRequest => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            "The request is not valid.",
        ),
    };
    error_response(status, kind, code, message)
}

fn stream_failure_json(failure: StreamFailure) -> Value {
    match failure {
        StreamFailure::Throttled => error_json(
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached during generation.",
        ),
        StreamFailure::ModelStreamError => error_json(
            "server_error",
            "model_error",
            "The model failed while generating the response.",
        ),
        StreamFailure::InternalError => error_json(
            "server_error",
            "internal_error",
            "The server had an error while generating the response.",
        ),
        StreamFailure::ServiceUnavailable => error_json(
            "server_error",
            "service_unavailable",
            "The server became unavailable during generation.",
        ),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                &format!("request body is not JSON: {e}"),
            );
        }
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_model",
            "`model` is required.",
        );
    };
    let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let words = request_words(&body);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let call = RecordedCall {
        model: model.clone(),
        streaming,
        body,
        authorization,
        guardrail: None,
    };
    let Some(script) = state.scripts.take(call) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!("the stand-in has no script for model {model}"),
        );
    };
    if let Some(Fault::Reject(rejection)) = script.fault {
        return rejection_response(rejection);
    }
    if streaming {
        let format = Sse {
            model,
            include_usage,
        };
        let body = streamed_body(
            Performance::new(script, words),
            format,
            state.scripts.clone(),
            state.shutdown.clone(),
        );
        let headers = [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ];
        (StatusCode::OK, headers, body).into_response()
    } else {
        complete(&state, script, &model, words).await
    }
}

async fn complete(state: &AppState, script: Script, model: &str, words: u32) -> Response {
    let sent = script.deltas_before_fault();
    // Non-streaming: the whole reply takes as long as its deltas would.
    let generation = script
        .delta_delay
        .saturating_mul(u32::try_from(sent.len()).unwrap_or(u32::MAX));
    tokio::select! {
        () = tokio::time::sleep(generation) => {}
        () = state.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
    match script.fault {
        Some(Fault::StreamError { failure, .. }) => {
            let status = match failure {
                StreamFailure::Throttled => StatusCode::TOO_MANY_REQUESTS,
                StreamFailure::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                StreamFailure::ModelStreamError | StreamFailure::InternalError => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            (status, axum::Json(stream_failure_json(failure))).into_response()
        }
        Some(Fault::Stall { .. }) => {
            // No answer at all until the server shuts down.
            state.shutdown.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Some(Fault::Disconnect { .. }) => {
            let abort = io::Error::new(io::ErrorKind::ConnectionAborted, "scripted disconnect");
            let body =
                Body::from_stream(futures::stream::once(async move { Err::<Bytes, _>(abort) }));
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        None | Some(Fault::Reject(_)) => {
            let reply = json!({
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": sent.concat() },
                    "finish_reason": finish_reason(script.stop),
                }],
                "usage": usage_json(script.usage_for(words)),
            });
            axum::Json(reply).into_response()
        }
    }
}

/// `text/event-stream` chat completion chunks.
struct Sse {
    model: String,
    include_usage: bool,
}

fn data_event(payload: &Value) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

impl Sse {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": "chatcmpl-standin",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        data_event(&chunk)
    }
}

impl WireFormat for Sse {
    fn opening(&self) -> io::Result<Vec<Bytes>> {
        Ok(vec![self.chunk(
            json!({ "role": "assistant", "content": "" }),
            None,
        )])
    }

    fn delta(&self, text: &str) -> io::Result<Bytes> {
        Ok(self.chunk(json!({ "content": text }), None))
    }

    fn ending(
        &self,
        stop: Stop,
        usage: ScriptedUsage,
        _elapsed: Duration,
    ) -> io::Result<Vec<Bytes>> {
        let mut frames = vec![self.chunk(json!({}), Some(finish_reason(stop)))];
        if self.include_usage {
            frames.push(data_event(&json!({
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.model,
                "choices": [],
                "usage": usage_json(usage),
            })));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Ok(frames)
    }

    fn stream_error(&self, failure: StreamFailure) -> io::Result<Bytes> {
        Ok(data_event(&stream_failure_json(failure)))
    }
}

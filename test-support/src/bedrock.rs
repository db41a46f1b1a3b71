//! A stand-in for the Bedrock Runtime Converse API on loopback.
//!
//! It speaks the wire protocol the real `aws-sdk-bedrockruntime` client
//! expects: REST-JSON for `Converse`, `application/vnd.amazon.eventstream`
//! frames for `ConverseStream`, errors as HTTP statuses with
//! `x-amzn-ErrorType` or as exception frames inside the stream. What it answers
//! is scripted per model id ([`Script`]).

use std::io;
use std::time::{Duration, Instant};

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
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

/// A running Bedrock Runtime stand-in; dropping it stops the server.
pub struct BedrockStandIn {
    stand_in: StandIn,
}

impl std::ops::Deref for BedrockStandIn {
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

impl BedrockStandIn {
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
            .route("/model/{model_id}/converse", post(converse))
            .route("/model/{model_id}/converse-stream", post(converse_stream))
            .with_state(state);
        let server = Server::start(router, shutdown).await?;
        Ok(Self {
            stand_in: StandIn { server, scripts },
        })
    }

    /// `http://127.0.0.1:PORT`, the SDK's `endpoint_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

/// The text of a Converse request's messages and system prompts.
fn request_words(body: &Value) -> u32 {
    let texts = ["messages", "system"]
        .into_iter()
        .filter_map(|key| body.get(key).and_then(Value::as_array))
        .flatten()
        .flat_map(
            |entry| match entry.get("content").and_then(Value::as_array) {
                // A message: {role, content: [{text}]}; a system block: {text}.
                Some(blocks) => blocks.iter().collect::<Vec<_>>(),
                None => vec![entry],
            },
        )
        .filter_map(|block| block.get("text").and_then(Value::as_str));
    count_words(texts)
}

fn stop_reason(stop: Stop) -> &'static str {
    match stop {
        Stop::EndTurn => "end_turn",
        Stop::MaxTokens => "max_tokens",
    }
}

fn usage_json(usage: ScriptedUsage) -> Value {
    json!({
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "totalTokens": usage.input_tokens.saturating_add(usage.output_tokens),
    })
}

fn latency_ms(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// An error response as Bedrock sends it: the type in `x-amzn-ErrorType`,
/// the message in a JSON body.
fn error_response(status: StatusCode, error_type: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-ErrorType", error_type),
            (header::CONTENT_TYPE.as_str(), "application/json"),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

fn rejection_response(rejection: Rejection) -> Response {
    let (status, error_type, message) = match rejection {
        Rejection::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        Rejection::ServiceUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "The service is temporarily unavailable.",
        ),
        Rejection::InternalError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            "The server encountered an internal error.",
        ),
        Rejection::AccessDenied => (
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
        ),
        Rejection::ContextWindowExceeded => (
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "Input is too long for requested model.",
        ),
        Rejection::InvalidRequest => (
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "Malformed input request, please reformat your input and try again.",
        ),
    };
    error_response(status, error_type, message)
}

/// Reads the call, records it and picks its script, or answers with the
/// error Bedrock would send.
fn accept_call(
    state: &AppState,
    model: String,
    streaming: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Script, u32), Box<Response>> {
    let body: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            &format!("request body is not JSON: {e}"),
        ))
    })?;
    let words = request_words(&body);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let call = RecordedCall {
        model,
        streaming,
        body,
        authorization,
    };
    let model = call.model.clone();
    match state.scripts.take(call) {
        Some(script) => match script.fault {
            Some(Fault::Reject(rejection)) => Err(Box::new(rejection_response(rejection))),
            _ => Ok((script, words)),
        },
        None => Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("the stand-in has no script for model {model}"),
        ))),
    }
}

async fn converse(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (script, words) = match accept_call(&state, model, false, &headers, &body) {
        Ok(accepted) => accepted,
        Err(response) => return *response,
    };
    let started = Instant::now();
    // Non-streaming: the whole reply takes as long as its deltas would.
    let sent = script.deltas_before_fault();
    let generation = script
        .delta_delay
        .saturating_mul(u32::try_from(sent.len()).unwrap_or(u32::MAX));
    tokio::select! {
        () = tokio::time::sleep(generation) => {}
        () = state.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
    match script.fault {
        Some(Fault::StreamError { failure, .. }) => {
            let (status, error_type) = match failure {
                StreamFailure::Throttled => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
                StreamFailure::ModelStreamError => {
                    (StatusCode::FAILED_DEPENDENCY, "ModelErrorException")
                }
                StreamFailure::InternalError => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException")
                }
                StreamFailure::ServiceUnavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                ),
            };
            error_response(status, error_type, "scripted failure during generation")
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
                "output": { "message": { "role": "assistant", "content": [{ "text": sent.concat() }] } },
                "stopReason": stop_reason(script.stop),
                "usage": usage_json(script.usage_for(words)),
                "metrics": { "latencyMs": latency_ms(started.elapsed()) },
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                reply.to_string(),
            )
                .into_response()
        }
    }
}

async fn converse_stream(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (script, words) = match accept_call(&state, model, true, &headers, &body) {
        Ok(accepted) => accepted,
        Err(response) => return *response,
    };
    let body = streamed_body(
        Performance::new(script, words),
        EventStream,
        state.scripts.clone(),
        state.shutdown.clone(),
    );
    let content_type = [(header::CONTENT_TYPE, "application/vnd.amazon.eventstream")];
    (StatusCode::OK, content_type, body).into_response()
}

/// ConverseStream's `application/vnd.amazon.eventstream` frames.
struct EventStream;

fn string_header(name: &'static str, value: &'static str) -> Header {
    Header::new(name, HeaderValue::String(value.into()))
}

fn encode(message: &Message) -> io::Result<Bytes> {
    let mut frame = Vec::new();
    write_message_to(message, &mut frame).map_err(io::Error::other)?;
    Ok(Bytes::from(frame))
}

fn event(event_type: &'static str, payload: &Value) -> io::Result<Bytes> {
    let message = Message::new(Bytes::from(payload.to_string()))
        .add_header(string_header(":event-type", event_type))
        .add_header(string_header(":content-type", "application/json"))
        .add_header(string_header(":message-type", "event"));
    encode(&message)
}

impl WireFormat for EventStream {
    fn opening(&self) -> io::Result<Vec<Bytes>> {
        Ok(vec![event(
            "messageStart",
            &json!({ "role": "assistant" }),
        )?])
    }

    fn delta(&self, text: &str) -> io::Result<Bytes> {
        event(
            "contentBlockDelta",
            &json!({ "delta": { "text": text }, "contentBlockIndex": 0 }),
        )
    }

    fn ending(
        &self,
        stop: Stop,
        usage: ScriptedUsage,
        elapsed: Duration,
    ) -> io::Result<Vec<Bytes>> {
        Ok(vec![
            event("contentBlockStop", &json!({ "contentBlockIndex": 0 }))?,
            event("messageStop", &json!({ "stopReason": stop_reason(stop) }))?,
            event(
                "metadata",
                &json!({
                    "usage": usage_json(usage),
                    "metrics": { "latencyMs": latency_ms(elapsed) },
                }),
            )?,
        ])
    }

    fn stream_error(&self, failure: StreamFailure) -> io::Result<Bytes> {
        let (exception_type, text) = match failure {
            StreamFailure::Throttled => (
                "throttlingException",
                "Too many requests, please wait before trying again.",
            ),
            StreamFailure::ModelStreamError => (
                "modelStreamErrorException",
                "The model stream failed while generating the response.",
            ),
            StreamFailure::InternalError => (
                "internalServerException",
                "The server encountered an internal error.",
            ),
            StreamFailure::ServiceUnavailable => (
                "serviceUnavailableException",
                "The service is temporarily unavailable.",
            ),
        };
        let message = Message::new(Bytes::from(json!({ "message": text }).to_string()))
            .add_header(string_header(":exception-type", exception_type))
            .add_header(string_header(":content-type", "application/json"))
            .add_header(string_header(":message-type", "exception"));
        encode(&message)
    }
}

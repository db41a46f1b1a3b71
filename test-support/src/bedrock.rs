//! A stand-in for the Bedrock Runtime Converse API on loopback.
//!
//! It speaks the wire protocol the real `aws-sdk-bedrockruntime` client
//! expects: REST-JSON for `Converse`, `application/vnd.amazon.eventstream`
//! frames for `ConverseStream`, errors as HTTP statuses with
//! `x-amzn-ErrorType` or as exception frames inside the stream. What it answers
//! is scripted per model id ([`Script`]), a guardrail's intervention included
//! ([`GuardrailIntervention`]).

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
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::script::{
    Fault, GuardrailChecked, GuardrailFinding, GuardrailIntervention, RecordedCall,
    RecordedGuardrail, Rejection, Script, ScriptedUsage, Scripts, Stop, StreamFailure, count_words,
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

const GUARDRAIL_INTERVENED: &str = "guardrail_intervened";

/// The request's `guardrailConfig`, if it carries one.
fn guardrail_config(body: &Value) -> Option<RecordedGuardrail> {
    let config = body.get("guardrailConfig")?;
    let field = |name: &str| config.get(name).and_then(Value::as_str).map(str::to_owned);
    Some(RecordedGuardrail {
        identifier: field("guardrailIdentifier")?,
        version: field("guardrailVersion")?,
        trace: field("trace"),
    })
}

/// A guardrail's intervention on one call, as the client is told of it.
struct Blocked {
    /// The guardrail's blocked message, sent as the reply's content.
    message: String,
    /// The `trace.guardrail` object, when the request enabled the trace.
    trace: Option<Value>,
}

/// The call's script as its guardrail leaves it. When the request carries a
/// guardrail and the script says it intervenes: only the model's deltas
/// before the intervention (they are its output tokens), no fault, and what
/// the client is told instead of the rest.
fn apply_guardrail(
    script: Script,
    config: Option<&RecordedGuardrail>,
) -> (Script, Option<Blocked>) {
    let (Some(config), Some(intervention)) = (config, script.guardrail.clone()) else {
        return (script, None);
    };
    let mut deltas = script.deltas;
    deltas.truncate(intervention.deltas_before());
    let generated = Script {
        deltas,
        fault: None,
        guardrail: None,
        ..script
    };
    let traced = matches!(config.trace.as_deref(), Some("enabled" | "enabled_full"));
    let blocked = Blocked {
        trace: traced.then(|| guardrail_trace(&config.identifier, &intervention)),
        message: intervention.blocked_message,
    };
    (generated, Some(blocked))
}

/// `GuardrailTraceAssessment`: assessments keyed by guardrail identifier.
/// A blocked output comes with the (passed) assessment of the input.
fn guardrail_trace(identifier: &str, intervention: &GuardrailIntervention) -> Value {
    let keyed = |value: Value| Value::Object(Map::from_iter([(identifier.to_owned(), value)]));
    let assessment = guardrail_assessment(&intervention.findings);
    match intervention.checked {
        GuardrailChecked::Input => json!({ "inputAssessment": keyed(assessment) }),
        GuardrailChecked::Output { .. } => json!({
            "inputAssessment": keyed(json!({})),
            "outputAssessments": keyed(json!([assessment])),
        }),
    }
}

/// `GuardrailAssessment`: each finding under its policy, as blocked.
fn guardrail_assessment(findings: &[GuardrailFinding]) -> Value {
    let mut topics = Vec::new();
    let mut filters = Vec::new();
    let mut custom_words = Vec::new();
    let mut managed_word_lists = Vec::new();
    let mut pii_entities = Vec::new();
    let mut regexes = Vec::new();
    for finding in findings {
        match finding {
            GuardrailFinding::Topic(name) => topics.push(json!({
                "name": name, "type": "DENY", "action": "BLOCKED", "detected": true,
            })),
            GuardrailFinding::Content(filter) => filters.push(json!({
                "type": filter, "confidence": "HIGH", "filterStrength": "HIGH",
                "action": "BLOCKED", "detected": true,
            })),
            GuardrailFinding::CustomWord(word) => custom_words.push(json!({
                "match": word, "action": "BLOCKED", "detected": true,
            })),
            GuardrailFinding::ManagedWords { list, matched } => managed_word_lists.push(json!({
                "match": matched, "type": list, "action": "BLOCKED", "detected": true,
            })),
            GuardrailFinding::Pii { entity, matched } => pii_entities.push(json!({
                "match": matched, "type": entity, "action": "BLOCKED", "detected": true,
            })),
            GuardrailFinding::Regex { name, matched } => regexes.push(json!({
                "name": name, "match": matched, "action": "BLOCKED", "detected": true,
            })),
        }
    }
    // Bedrock leaves out the policies that detected nothing.
    let mut assessment = Map::new();
    if !topics.is_empty() {
        assessment.insert("topicPolicy".into(), json!({ "topics": topics }));
    }
    if !filters.is_empty() {
        assessment.insert("contentPolicy".into(), json!({ "filters": filters }));
    }
    if !custom_words.is_empty() || !managed_word_lists.is_empty() {
        assessment.insert(
            "wordPolicy".into(),
            json!({ "customWords": custom_words, "managedWordLists": managed_word_lists }),
        );
    }
    if !pii_entities.is_empty() || !regexes.is_empty() {
        assessment.insert(
            "sensitiveInformationPolicy".into(),
            json!({ "piiEntities": pii_entities, "regexes": regexes }),
        );
    }
    Value::Object(assessment)
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

/// A call the stand-in answers.
struct Accepted {
    /// The script as the request's guardrail leaves it ([`apply_guardrail`]).
    script: Script,
    request_words: u32,
    blocked: Option<Blocked>,
}

/// Reads the call, records it and picks its script, or answers with the
/// error Bedrock would send.
fn accept_call(
    state: &AppState,
    model: String,
    streaming: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Accepted, Box<Response>> {
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
    let guardrail = guardrail_config(&body);
    let call = RecordedCall {
        model,
        streaming,
        body,
        authorization,
        guardrail: guardrail.clone(),
    };
    let model = call.model.clone();
    match state.scripts.take(call) {
        Some(script) => match script.fault {
            Some(Fault::Reject(rejection)) => Err(Box::new(rejection_response(rejection))),
            _ => {
                let (script, blocked) = apply_guardrail(script, guardrail.as_ref());
                Ok(Accepted {
                    script,
                    request_words: words,
                    blocked,
                })
            }
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
    let Accepted {
        script,
        request_words,
        blocked,
    } = match accept_call(&state, model, false, &headers, &body) {
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
            // A blocked reply is replaced whole by the guardrail's message.
            let (text, stop) = match &blocked {
                Some(blocked) => (blocked.message.clone(), GUARDRAIL_INTERVENED),
                None => (sent.concat(), stop_reason(script.stop)),
            };
            let mut reply = json!({
                "output": { "message": { "role": "assistant", "content": [{ "text": text }] } },
                "stopReason": stop,
                "usage": usage_json(script.usage_for(request_words)),
                "metrics": { "latencyMs": latency_ms(started.elapsed()) },
            });
            if let Some(trace) = blocked.and_then(|b| b.trace) {
                reply["trace"] = json!({ "guardrail": trace });
            }
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
    let Accepted {
        script,
        request_words,
        blocked,
    } = match accept_call(&state, model, true, &headers, &body) {
        Ok(accepted) => accepted,
        Err(response) => return *response,
    };
    let mut performance = Performance::new(script, request_words);
    if let Some(blocked) = &blocked {
        // The deltas already sent stay; the guardrail's message follows.
        performance.deltas.push(blocked.message.clone());
    }
    let body = streamed_body(
        performance,
        EventStream { blocked },
        state.scripts.clone(),
        state.shutdown.clone(),
    );
    let content_type = [(header::CONTENT_TYPE, "application/vnd.amazon.eventstream")];
    (StatusCode::OK, content_type, body).into_response()
}

/// ConverseStream's `application/vnd.amazon.eventstream` frames.
struct EventStream {
    /// The guardrail's intervention, which ends the reply.
    blocked: Option<Blocked>,
}

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
        let stop = match &self.blocked {
            Some(_) => GUARDRAIL_INTERVENED,
            None => stop_reason(stop),
        };
        let mut metadata = json!({
            "usage": usage_json(usage),
            "metrics": { "latencyMs": latency_ms(elapsed) },
        });
        if let Some(trace) = self.blocked.as_ref().and_then(|b| b.trace.clone()) {
            metadata["trace"] = json!({ "guardrail": trace });
        }
        Ok(vec![
            event("contentBlockStop", &json!({ "contentBlockIndex": 0 }))?,
            event("messageStop", &json!({ "stopReason": stop }))?,
            event("metadata", &metadata)?,
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

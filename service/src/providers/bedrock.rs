//! Amazon Bedrock through the Converse API: one request shape for every model
//! family, so no per-family prompt bodies.

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::StalledStreamProtectionConfig;
use aws_sdk_bedrockruntime::config::retry::RetryConfig;
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseOutput, ConverseStreamOutput,
    GuardrailAssessment, GuardrailConfiguration, GuardrailStreamConfiguration, GuardrailTrace,
    GuardrailTraceAssessment, InferenceConfiguration, Message, StopReason as BedrockStopReason,
    SystemContentBlock, TokenUsage,
};

use super::reply::{ReplySource, ReplyStep, reply_stream};
use super::{
    Completion, CompletionRequest, Guardrail, Intervention, PromptTurns, Provider, ProviderError,
    ProviderErrorKind, ProviderStream, Role, StopReason, TokenDeadline, Usage,
    mentions_context_window, tokens,
};

pub struct BedrockProvider {
    client: Client,
}

impl BedrockProvider {
    /// Region and credentials from the standard AWS chain (environment,
    /// profile, web identity for IRSA, container and instance metadata).
    pub async fn from_environment(endpoint_url: Option<&str>) -> Self {
        let sdk_config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Self::new(&sdk_config, endpoint_url)
    }

    /// A provider on the given AWS configuration; `endpoint_url` replaces
    /// the regional Bedrock Runtime endpoint (tests, VPC endpoints).
    pub fn new(sdk_config: &SdkConfig, endpoint_url: Option<&str>) -> Self {
        let mut config = aws_sdk_bedrockruntime::config::Builder::from(sdk_config)
            // The route's fallback chain decides what happens after a
            // failure; SDK retries would spend the target's time budget.
            .retry_config(RetryConfig::disabled())
            // The request's own timeout bounds stalls, per target.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(endpoint_url) = endpoint_url {
            config = config.endpoint_url(endpoint_url);
        }
        Self {
            client: Client::from_conf(config.build()),
        }
    }
}

/// The Converse form of the conversation: system prompts apart, the other
/// turns as messages.
fn conversation(
    turns: &PromptTurns,
) -> Result<(Vec<SystemContentBlock>, Vec<Message>), ProviderError> {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for turn in turns.iter() {
        let role = match turn.role {
            Role::System => {
                system.push(SystemContentBlock::Text(turn.text.to_string()));
                continue;
            }
            Role::User => ConversationRole::User,
            Role::Assistant => ConversationRole::Assistant,
        };
        let message = Message::builder()
            .role(role)
            .content(ContentBlock::Text(turn.text.to_string()))
            .build()
            .map_err(|e| ProviderError::new(ProviderErrorKind::InvalidRequest, e.to_string()))?;
        messages.push(message);
    }
    Ok((system, messages))
}

/// Converse's `inferenceConfig`: the token limit, and the sampling the caller
/// asked for (absent fields leave the model's defaults).
fn inference_config(request: &CompletionRequest) -> InferenceConfiguration {
    let sampling = &request.sampling;
    InferenceConfiguration::builder()
        .max_tokens(i32::try_from(request.max_output_tokens).unwrap_or(i32::MAX))
        .set_temperature(sampling.temperature)
        .set_top_p(sampling.top_p)
        .set_stop_sequences((!sampling.stop.is_empty()).then(|| sampling.stop.clone()))
        .build()
}

fn system_prompts(system: Vec<SystemContentBlock>) -> Option<Vec<SystemContentBlock>> {
    (!system.is_empty()).then_some(system)
}

/// The guardrail of a streamed call, with its trace on so that an
/// intervention says what it flagged. Synchronous processing (the default):
/// Bedrock checks each chunk before sending it.
fn stream_guardrail(guardrail: Guardrail) -> GuardrailStreamConfiguration {
    GuardrailStreamConfiguration::builder()
        .guardrail_identifier(guardrail.identifier)
        .guardrail_version(guardrail.version)
        .trace(GuardrailTrace::Enabled)
        .build()
}

fn call_guardrail(guardrail: Guardrail) -> GuardrailConfiguration {
    GuardrailConfiguration::builder()
        .guardrail_identifier(guardrail.identifier)
        .guardrail_version(guardrail.version)
        .trace(GuardrailTrace::Enabled)
        .build()
}

#[async_trait]
impl Provider for BedrockProvider {
    async fn stream(&self, request: CompletionRequest) -> Result<ProviderStream, ProviderError> {
        let mut deadline = TokenDeadline::start(request.timeout);
        let inference = inference_config(&request);
        let (system, messages) = conversation(&request.turns)?;
        let call = self
            .client
            .converse_stream()
            .model_id(request.model)
            .set_system(system_prompts(system))
            .set_messages(Some(messages))
            .inference_config(inference)
            .set_guardrail_config(request.guardrail.map(stream_guardrail))
            .send();
        let output = deadline
            .bound(call)
            .await?
            .map_err(|e| classify(e, |e| e.code()))?;
        let reply = ConverseReply {
            events: output.stream,
            stop_reason: None,
            usage: None,
            trace: None,
        };
        Ok(reply_stream(reply, deadline))
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError> {
        let mut deadline = TokenDeadline::start(request.timeout);
        let inference = inference_config(&request);
        let (system, messages) = conversation(&request.turns)?;
        let call = self
            .client
            .converse()
            .model_id(request.model)
            .set_system(system_prompts(system))
            .set_messages(Some(messages))
            .inference_config(inference)
            .set_guardrail_config(request.guardrail.map(call_guardrail))
            .send();
        let output = deadline
            .bound(call)
            .await?
            .map_err(|e| classify(e, |e| e.code()))?;
        let trace = output.trace.as_ref().and_then(|t| t.guardrail.as_ref());
        let text = match output.output {
            Some(ConverseOutput::Message(message)) => message
                .content
                .into_iter()
                .filter_map(|block| match block {
                    ContentBlock::Text(text) => Some(text),
                    _ => None,
                })
                .collect(),
            _ => String::new(),
        };
        Ok(Completion {
            text,
            usage: output.usage.as_ref().map(usage),
            stop_reason: stop_reason(&output.stop_reason, trace),
        })
    }
}

/// A ConverseStream reply being read.
struct ConverseReply {
    events: EventReceiver<ConverseStreamOutput, ConverseStreamOutputError>,
    stop_reason: Option<BedrockStopReason>,
    usage: Option<Usage>,
    /// The guardrail's trace, from the metadata after `messageStop`.
    trace: Option<GuardrailTraceAssessment>,
}

impl ReplySource for ConverseReply {
    async fn step(&mut self) -> ReplyStep {
        match self.events.recv().await {
            Err(error) => ReplyStep::Failed(classify(error, stream_error_code)),
            Ok(None) => match self.stop_reason.take() {
                Some(reason) => ReplyStep::Finished {
                    stop_reason: stop_reason(&reason, self.trace.as_ref()),
                    usage: self.usage.take(),
                },
                None => ReplyStep::Failed(ProviderError::new(
                    ProviderErrorKind::Unavailable,
                    "the Bedrock stream ended before messageStop",
                )),
            },
            Ok(Some(ConverseStreamOutput::ContentBlockDelta(delta))) => match delta.delta {
                Some(ContentBlockDelta::Text(text)) if !text.is_empty() => ReplyStep::Delta(text),
                _ => ReplyStep::Nothing,
            },
            Ok(Some(ConverseStreamOutput::MessageStop(stop))) => {
                self.stop_reason = Some(stop.stop_reason);
                ReplyStep::Nothing
            }
            Ok(Some(ConverseStreamOutput::Metadata(metadata))) => {
                self.usage = metadata.usage.as_ref().map(usage);
                self.trace = metadata.trace.and_then(|trace| trace.guardrail);
                ReplyStep::Nothing
            }
            // Message and block boundaries carry nothing for a text reply.
            Ok(Some(_)) => ReplyStep::Nothing,
        }
    }
}

fn usage(usage: &TokenUsage) -> Usage {
    Usage {
        input_tokens: tokens(usage.input_tokens),
        output_tokens: tokens(usage.output_tokens),
    }
}

fn stop_reason(reason: &BedrockStopReason, trace: Option<&GuardrailTraceAssessment>) -> StopReason {
    match reason {
        BedrockStopReason::EndTurn => StopReason::EndTurn,
        BedrockStopReason::MaxTokens => StopReason::MaxTokens,
        BedrockStopReason::StopSequence => StopReason::StopSequence,
        BedrockStopReason::ContentFiltered => StopReason::ContentFiltered,
        BedrockStopReason::GuardrailIntervened => {
            StopReason::GuardrailIntervened(trace.map(intervention).unwrap_or_default())
        }
        other => StopReason::Other(other.as_str().to_owned()),
    }
}

/// What a guardrail's trace says it flagged: the names and types of the
/// policies that detected something, never the text they matched.
fn intervention(trace: &GuardrailTraceAssessment) -> Intervention {
    let input: Vec<&GuardrailAssessment> = trace
        .input_assessment
        .iter()
        .flat_map(|by_guardrail| by_guardrail.values())
        .collect();
    let output: Vec<&GuardrailAssessment> = trace
        .output_assessments
        .iter()
        .flat_map(|by_guardrail| by_guardrail.values().flatten())
        .collect();
    let mut flagged: Vec<String> = input
        .iter()
        .chain(output.iter())
        .flat_map(|assessment| flagged_policies(assessment))
        .collect();
    flagged.sort();
    flagged.dedup();
    Intervention {
        on_input: output.is_empty() && !input.is_empty(),
        flagged,
    }
}

fn flagged_policies(assessment: &GuardrailAssessment) -> Vec<String> {
    let mut flagged = Vec::new();
    if let Some(topics) = &assessment.topic_policy {
        flagged.extend(topics.topics.iter().map(|t| format!("topic:{}", t.name)));
    }
    if let Some(content) = &assessment.content_policy {
        flagged.extend(
            content
                .filters
                .iter()
                .map(|f| format!("content:{}", f.r#type.as_str())),
        );
    }
    if let Some(words) = &assessment.word_policy {
        if !words.custom_words.is_empty() {
            flagged.push("word:CUSTOM".to_owned());
        }
        flagged.extend(
            words
                .managed_word_lists
                .iter()
                .map(|w| format!("word:{}", w.r#type.as_str())),
        );
    }
    if let Some(sensitive) = &assessment.sensitive_information_policy {
        flagged.extend(
            sensitive
                .pii_entities
                .iter()
                .map(|p| format!("pii:{}", p.r#type.as_str())),
        );
        flagged.extend(
            sensitive
                .regexes
                .iter()
                .map(|r| format!("regex:{}", r.name.as_deref().unwrap_or("unnamed"))),
        );
    }
    flagged
}

/// Exceptions inside an event stream carry their type only in the frame's
/// `:exception-type` header, which the SDK turns into the variant, not into
/// the error code; this names them like their HTTP counterparts.
fn stream_error_code(error: &ConverseStreamOutputError) -> Option<&str> {
    match error {
        ConverseStreamOutputError::ThrottlingException(_) => Some("ThrottlingException"),
        ConverseStreamOutputError::ServiceUnavailableException(_) => {
            Some("ServiceUnavailableException")
        }
        ConverseStreamOutputError::InternalServerException(_) => Some("InternalServerException"),
        ConverseStreamOutputError::ModelStreamErrorException(_) => {
            Some("ModelStreamErrorException")
        }
        ConverseStreamOutputError::ValidationException(_) => Some("ValidationException"),
        other => other.code(),
    }
}

fn classify<E, R>(error: SdkError<E, R>, code_of: impl FnOnce(&E) -> Option<&str>) -> ProviderError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let kind = match &error {
        SdkError::ServiceError(context) => {
            let service_error = context.err();
            let message = service_error.message().unwrap_or_default();
            classify_code(code_of(service_error), message)
        }
        SdkError::TimeoutError(_) => ProviderErrorKind::Timeout,
        SdkError::DispatchFailure(failure) if failure.is_timeout() => ProviderErrorKind::Timeout,
        // Connection failures and broken or malformed responses.
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => ProviderErrorKind::Unavailable,
        _ => ProviderErrorKind::Other,
    };
    ProviderError::new(kind, DisplayErrorContext(&error).to_string())
}

fn classify_code(code: Option<&str>, message: &str) -> ProviderErrorKind {
    match code.unwrap_or_default() {
        "ThrottlingException" | "ServiceQuotaExceededException" => ProviderErrorKind::Throttled,
        "ServiceUnavailableException"
        | "InternalServerException"
        | "ModelNotReadyException"
        | "ModelErrorException"
        | "ModelStreamErrorException" => ProviderErrorKind::Unavailable,
        "ModelTimeoutException" => ProviderErrorKind::Timeout,
        "ValidationException" if mentions_context_window(message) => {
            ProviderErrorKind::ContextWindow
        }
        "ValidationException" | "ResourceNotFoundException" => ProviderErrorKind::InvalidRequest,
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "ExpiredTokenException"
        | "InvalidSignatureException" => ProviderErrorKind::Auth,
        _ => ProviderErrorKind::Other,
    }
}

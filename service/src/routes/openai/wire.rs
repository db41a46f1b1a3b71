//! What the OpenAI-compatible API answers: whole completions, the chunks of
//! a streamed one, and models, as the protocol names their fields.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::OpenAiErrorBody;
use crate::providers::{StopReason, Usage};

/// The end of a streamed completion.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-…`
    id: String,
    /// `chat.completion`
    object: &'static str,
    /// Unix seconds.
    created: i64,
    /// The model that answered (after a fallback, the fallback's).
    model: String,
    choices: Vec<CompletionChoice>,
    usage: WireUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    index: u32,
    message: AssistantMessage,
    /// `stop`, `length` or `content_filter`.
    finish_reason: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`
    role: &'static str,
    content: String,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for WireUsage {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.input_tokens,
            completion_tokens: usage.output_tokens,
            total_tokens: usage.input_tokens.saturating_add(usage.output_tokens),
        }
    }
}

/// One `data:` event of a streamed completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk<'a> {
    /// The same for every chunk of a completion.
    id: &'a str,
    /// `chat.completion.chunk`
    object: &'static str,
    created: i64,
    model: &'a str,
    /// One choice; none in the last chunk of `include_usage`.
    choices: Vec<ChunkChoice<'a>>,
    /// With `stream_options.include_usage`: `null`, except in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WireUsage>)]
    usage: Option<Option<WireUsage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    /// `null` until the chunk that ends the choice.
    finish_reason: Option<&'static str>,
}

/// The first chunk carries the role, the following ones text.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`
    object: &'static str,
    data: Vec<ModelObject>,
}

/// A route the caller may use, by its alias (or a model id asked for).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    id: String,
    /// `model`
    object: &'static str,
    /// Routes carry no creation time: 0.
    created: i64,
    /// `parley`
    owned_by: &'static str,
}

impl ModelObject {
    pub fn new(id: String) -> Self {
        Self {
            id,
            object: "model",
            created: 0,
            owned_by: "parley",
        }
    }
}

impl ModelList {
    pub fn new(data: Vec<ModelObject>) -> Self {
        Self {
            object: "list",
            data,
        }
    }
}

/// The protocol's name of why a reply ended.
pub fn finish_reason(stop: &StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens => "length",
        StopReason::ContentFiltered | StopReason::GuardrailIntervened(_) => "content_filter",
        StopReason::EndTurn | StopReason::StopSequence | StopReason::Other(_) => "stop",
    }
}

/// What every chunk and the whole completion of one reply share.
pub struct Completion {
    pub id: String,
    pub created: i64,
    pub model: String,
}

impl Completion {
    pub fn new(model: String) -> Self {
        Self {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: chrono::Utc::now().timestamp(),
            model,
        }
    }

    pub fn whole(self, content: String, stop: &StopReason, usage: Usage) -> ChatCompletion {
        ChatCompletion {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            choices: vec![CompletionChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                },
                finish_reason: finish_reason(stop),
            }],
            usage: usage.into(),
        }
    }
}

/// Encodes the `data:` events of one streamed completion.
pub struct ChunkEncoder {
    completion: Completion,
    include_usage: bool,
}

impl ChunkEncoder {
    pub fn new(completion: Completion, include_usage: bool) -> Self {
        Self {
            completion,
            include_usage,
        }
    }

    /// The first chunk: the assistant's role, no text yet.
    pub fn role(&self) -> Bytes {
        self.choice(
            Delta {
                role: Some("assistant"),
                content: Some(""),
            },
            None,
        )
    }

    pub fn text(&self, text: &str) -> Bytes {
        self.choice(
            Delta {
                role: None,
                content: Some(text),
            },
            None,
        )
    }

    /// The chunk ending the choice.
    pub fn finish(&self, stop: &StopReason) -> Bytes {
        self.choice(Delta::default(), Some(finish_reason(stop)))
    }

    /// The usage chunk, when asked for.
    pub fn usage(&self, usage: Usage) -> Option<Bytes> {
        self.include_usage
            .then(|| self.chunk(Vec::new(), Some(Some(usage.into()))))
    }

    fn choice(&self, delta: Delta<'_>, finish_reason: Option<&'static str>) -> Bytes {
        let usage = self.include_usage.then_some(None);
        self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
            }],
            usage,
        )
    }

    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Option<WireUsage>>) -> Bytes {
        data(&ChatCompletionChunk {
            id: &self.completion.id,
            object: "chat.completion.chunk",
            created: self.completion.created,
            model: &self.completion.model,
            choices,
            usage,
        })
    }
}

/// An error after the stream began, as the official clients read it.
pub fn error_event(body: &OpenAiErrorBody) -> Bytes {
    data(body)
}

/// `data: <json>` and the blank line ending the event. JSON escapes every
/// line break, so no text can end the event early.
fn data<T: Serialize>(value: &T) -> Bytes {
    let mut buffer = BytesMut::with_capacity(256);
    buffer.put_slice(b"data: ");
    let mut writer = buffer.writer();
    if let Err(error) = serde_json::to_writer(&mut writer, value) {
        // Plain structs of strings and numbers do not fail to serialize.
        tracing::error!(%error, "serializing a completion chunk failed");
    }
    let mut buffer = writer.into_inner();
    buffer.put_slice(b"\n\n");
    buffer.freeze()
}

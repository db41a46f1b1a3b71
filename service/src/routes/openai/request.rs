//! Reading a `POST /v1/chat/completions` body. Every field of the protocol
//! is either supported, accepted and ignored (`user`, `safety_identifier`:
//! the token decides who asks), accepted only at its neutral value (a
//! setting that would change nothing, such as `n: 1` or `tools: []`), or
//! refused with a 400 naming it, so nothing asked for is silently dropped.
//! A field given as `null` counts as absent.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::OpenAiError;
use crate::context_window::Conversation;
use crate::providers::{ChatTurn, Role, Sampling};
use crate::shared_text::SharedText;

/// Stop sequences a request may give, as the protocol allows.
const MAX_STOP_SEQUENCES: usize = 4;

/// The supported fields of a chat completion request.
#[derive(Debug, ToSchema)]
pub struct ChatCompletionRequest {
    /// A route alias the caller may use (`GET /v1/models`), or the model id
    /// of such a route's first target.
    pub model: String,
    /// The conversation, ending with a user message.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// The most output tokens; capped by the route's targets, whose hold is
    /// priced for the capped value.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// The older name of `max_completion_tokens`; when both are given they
    /// must agree.
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Up to 4 sequences that end the reply (not part of it).
    pub stop: Option<StopSequences>,
    /// Only 1.
    pub n: Option<u32>,
    /// Server-sent `chat.completion.chunk` events, then `data: [DONE]`.
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    pub stream_options: Option<StreamOptions>,
    /// Accepted and ignored: the token says who asks.
    #[schema(rename = "user")]
    _user: Option<String>,
    /// Accepted and ignored, like `user`.
    #[schema(rename = "safety_identifier")]
    _safety_identifier: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// A last chunk with the usage of the whole reply and no choices.
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted; no obfuscation field is added.
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

/// One message of the conversation; `name` is accepted and ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: MessageRole,
    pub content: MessageContent,
    /// A participant's name: accepted and ignored.
    #[serde(default, rename = "name")]
    _name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    System,
    /// What newer clients send for `system`; treated the same.
    Developer,
    User,
    Assistant,
}

/// Text, or text parts (joined with line breaks); no images, audio or files.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    Text { text: String },
}

impl ChatMessage {
    pub fn text(&self) -> String {
        match &self.content {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|ContentPart::Text { text }| text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    fn turn(&self) -> ChatTurn {
        let role = match self.role {
            MessageRole::System | MessageRole::Developer => Role::System,
            MessageRole::User => Role::User,
            MessageRole::Assistant => Role::Assistant,
        };
        ChatTurn::new(role, self.text())
    }
}

impl ChatCompletionRequest {
    /// Reads and checks `body` (a JSON object); `max_message_chars` bounds
    /// each message.
    pub fn parse(body: &[u8], max_message_chars: usize) -> Result<Self, OpenAiError> {
        let value: Value = serde_json::from_slice(body).map_err(|error| {
            OpenAiError::invalid(None, format!("the body is not valid JSON: {error}"))
        })?;
        let Value::Object(mut fields) = value else {
            return Err(OpenAiError::invalid(None, "the body must be a JSON object"));
        };
        fields.retain(|_, value| !value.is_null());
        let request = Self {
            model: take(&mut fields, "model")?
                .ok_or_else(|| OpenAiError::invalid(Some("model"), "`model` is required"))?,
            messages: messages(&mut fields, max_message_chars)?,
            max_completion_tokens: take(&mut fields, "max_completion_tokens")?,
            max_tokens: take(&mut fields, "max_tokens")?,
            temperature: take(&mut fields, "temperature")?,
            top_p: take(&mut fields, "top_p")?,
            stop: take(&mut fields, "stop")?,
            n: take(&mut fields, "n")?,
            stream: take(&mut fields, "stream")?,
            stream_options: take(&mut fields, "stream_options")?,
            _user: take(&mut fields, "user")?,
            _safety_identifier: take(&mut fields, "safety_identifier")?,
        };
        refuse_the_rest(fields)?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), OpenAiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(OpenAiError::unsupported(
                "n",
                "only one choice (`n: 1`) is generated",
            ));
        }
        let positive = |name: &'static str, value: Option<u32>| match value {
            Some(0) => Err(OpenAiError::invalid(
                Some(name),
                format!("`{name}` must be at least 1"),
            )),
            _ => Ok(()),
        };
        positive("max_tokens", self.max_tokens)?;
        positive("max_completion_tokens", self.max_completion_tokens)?;
        if let (Some(old), Some(new)) = (self.max_tokens, self.max_completion_tokens)
            && old != new
        {
            return Err(OpenAiError::invalid(
                Some("max_completion_tokens"),
                "`max_tokens` and `max_completion_tokens` disagree; give one",
            ));
        }
        let within = |name: &'static str, value: Option<f32>, max: f32| match value {
            Some(value) if !(0.0..=max).contains(&value) => Err(OpenAiError::invalid(
                Some(name),
                format!("`{name}` must be between 0 and {max}"),
            )),
            _ => Ok(()),
        };
        within("temperature", self.temperature, 2.0)?;
        within("top_p", self.top_p, 1.0)?;
        let stop = self.stop_sequences();
        if stop.len() > MAX_STOP_SEQUENCES || stop.iter().any(String::is_empty) {
            return Err(OpenAiError::invalid(
                Some("stop"),
                format!("`stop` is up to {MAX_STOP_SEQUENCES} non-empty strings"),
            ));
        }
        if self.stream_options.is_some() && !self.is_streamed() {
            return Err(OpenAiError::invalid(
                Some("stream_options"),
                "`stream_options` is only allowed with `stream: true`",
            ));
        }
        Ok(())
    }

    pub fn is_streamed(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn includes_usage(&self) -> bool {
        self.stream_options
            .is_some_and(|options| options.include_usage)
    }

    /// The most output tokens asked for, under either name.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(StopSequences::One(stop)) => vec![stop.clone()],
            Some(StopSequences::Many(stops)) => stops.clone(),
        }
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop_sequences(),
        }
    }

    /// The conversation's turns: the leading system (and developer)
    /// messages are instructions, always sent; the messages after them up
    /// to the last (the user's, checked by `parse`) are history, sent as far
    /// back as a target's context window allows.
    pub fn turns(&self) -> RequestTurns {
        let mut turns: Vec<ChatTurn> = self.messages.iter().map(ChatMessage::turn).collect();
        let message = turns
            .pop()
            .unwrap_or_else(|| ChatTurn::new(Role::User, String::new()));
        let leading = turns
            .iter()
            .take_while(|turn| turn.role == Role::System)
            .count();
        let history = turns.split_off(leading);
        RequestTurns {
            instructions: turns,
            history,
            message,
        }
    }
}

/// A request's turns, before the content policy checks them.
pub struct RequestTurns {
    instructions: Vec<ChatTurn>,
    history: Vec<ChatTurn>,
    message: ChatTurn,
}

impl RequestTurns {
    /// Every user turn's text, the new message last: what the content
    /// policy checks and masks.
    pub fn user_texts_mut(&mut self) -> impl Iterator<Item = &mut SharedText> {
        self.history
            .iter_mut()
            .filter(|turn| turn.role == Role::User)
            .chain(std::iter::once(&mut self.message))
            .map(|turn| &mut turn.text)
    }

    /// The new user message.
    pub fn message_text(&self) -> &str {
        &self.message.text
    }

    /// The conversation as the providers take it, after the route's
    /// `system_prompt`.
    pub fn into_conversation(self, system_prompt: Option<&str>) -> Conversation {
        Conversation::new(
            system_prompt,
            self.instructions,
            self.history.into(),
            self.message,
        )
    }
}

fn take<T: DeserializeOwned>(
    fields: &mut Map<String, Value>,
    name: &'static str,
) -> Result<Option<T>, OpenAiError> {
    fields
        .remove(name)
        .map(|value| {
            serde_json::from_value(value).map_err(|error| {
                OpenAiError::invalid(Some(name), format!("invalid `{name}`: {error}"))
            })
        })
        .transpose()
}

fn messages(
    fields: &mut Map<String, Value>,
    max_message_chars: usize,
) -> Result<Vec<ChatMessage>, OpenAiError> {
    let Some(value) = fields.remove("messages") else {
        return Err(OpenAiError::invalid(
            Some("messages"),
            "`messages` is required",
        ));
    };
    let Value::Array(values) = value else {
        return Err(OpenAiError::invalid(
            Some("messages"),
            "`messages` must be an array",
        ));
    };
    let mut messages = Vec::with_capacity(values.len());
    for (index, mut value) in values.into_iter().enumerate() {
        let param = format!("messages[{index}]");
        if let Value::Object(message) = &mut value {
            message.retain(|_, value| !value.is_null());
        }
        let message: ChatMessage = serde_json::from_value(value).map_err(|error| {
            OpenAiError::invalid_param(
                param.clone(),
                format!(
                    "{param}: {error} (roles system, developer, user and assistant; text content)"
                ),
            )
        })?;
        let text = message.text();
        if text.len() > max_message_chars && text.chars().count() > max_message_chars {
            return Err(OpenAiError::invalid_param(
                format!("{param}.content"),
                format!("{param}.content must be at most {max_message_chars} characters"),
            ));
        }
        messages.push(message);
    }
    match messages.last() {
        Some(last) if last.role == MessageRole::User && !last.text().trim().is_empty() => {
            Ok(messages)
        }
        _ => Err(OpenAiError::invalid(
            Some("messages"),
            "`messages` must end with a user message that is not blank",
        )),
    }
}

/// What a field may be given as without being supported: its neutral value,
/// the one that asks for nothing.
fn is_neutral(name: &str, value: &Value) -> bool {
    match name {
        "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => value == "none",
        // Without tools it has nothing to parallelize.
        "parallel_tool_calls" => value.is_boolean(),
        "logprobs" | "store" => value == false,
        "top_logprobs" => value == 0,
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" | "metadata" => value.as_object().is_some_and(Map::is_empty),
        "response_format" => value.get("type").is_some_and(|kind| kind == "text"),
        "modalities" => value
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m == "text")),
        "service_tier" => value == "auto" || value == "default",
        _ => false,
    }
}

/// Fields of the protocol this service does not support (beyond their
/// neutral values).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("tools", "tools are not supported"),
    ("tool_choice", "tools are not supported"),
    ("parallel_tool_calls", "tools are not supported"),
    ("functions", "functions are not supported"),
    ("function_call", "functions are not supported"),
    ("audio", "audio output is not supported"),
    ("modalities", "only text output is supported"),
    ("response_format", "only text responses are supported"),
    ("logprobs", "log probabilities are not returned"),
    ("top_logprobs", "log probabilities are not returned"),
    ("logit_bias", "logit bias is not supported"),
    ("presence_penalty", "presence penalty is not supported"),
    ("frequency_penalty", "frequency penalty is not supported"),
    ("seed", "seeded sampling is not supported"),
    ("prediction", "predicted outputs are not supported"),
    ("reasoning_effort", "reasoning effort is not supported"),
    ("verbosity", "verbosity is not supported"),
    ("web_search_options", "web search is not supported"),
    (
        "store",
        "completions are stored only in a chat session (X-Parley-Session)",
    ),
    ("metadata", "metadata is not supported"),
    ("prompt_cache_key", "prompt caching hints are not supported"),
    ("service_tier", "service tiers are not supported"),
];

fn refuse_the_rest(fields: Map<String, Value>) -> Result<(), OpenAiError> {
    for (name, value) in fields {
        match UNSUPPORTED.iter().find(|(field, _)| *field == name) {
            Some(_) if is_neutral(&name, &value) => {}
            Some((field, why)) => return Err(OpenAiError::unsupported(field, why)),
            None => {
                return Err(OpenAiError::invalid_param(
                    name.clone(),
                    format!("unrecognized request argument supplied: {name}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<ChatCompletionRequest, OpenAiError> {
        ChatCompletionRequest::parse(body.to_string().as_bytes(), 100)
    }

    fn minimal() -> Value {
        json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut body = minimal();
        body[field] = value;
        body
    }

    #[track_caller]
    fn refused_naming(body: Value, param: &str) {
        match parse(body) {
            Err(error) => assert_eq!(error.param(), Some(param), "{error:?}"),
            Ok(request) => panic!("accepted: {request:?}"),
        }
    }

    #[test]
    fn every_supported_field_is_read() {
        let request = parse(json!({
            "model": "fast",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Really."}]},
                {"role": "assistant", "content": "Hello", "name": "bot", "tool_calls": null},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            ],
            "max_tokens": 7, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
            "stop": "END", "n": 1, "stream": true, "stream_options": {"include_usage": true},
            "user": "u-1", "safety_identifier": "s", "presence_penalty": 0, "tools": [],
            "logprobs": false, "seed": null,
        }))
        .unwrap();
        assert_eq!(request.max_output_tokens(), Some(7));
        assert!(request.is_streamed() && request.includes_usage());
        assert_eq!(
            request.sampling(),
            Sampling {
                temperature: Some(0.5),
                top_p: Some(0.9),
                stop: vec!["END".into()]
            }
        );
        let prompt = request
            .turns()
            .into_conversation(Some("route rules"))
            .fit(u32::MAX, 0)
            .unwrap();
        let roles: Vec<Role> = prompt.turns.iter().map(|turn| turn.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::System,
                Role::System,
                Role::Assistant,
                Role::User
            ]
        );
        let texts: Vec<&str> = prompt.turns.iter().map(|turn| &*turn.text).collect();
        assert_eq!(texts[0], "route rules");
        assert_eq!(texts[4], "one\ntwo");
    }

    #[test]
    fn unsupported_and_unknown_fields_are_refused_by_name() {
        refused_naming(with("tools", json!([{"type": "function"}])), "tools");
        refused_naming(with("tool_choice", json!("auto")), "tool_choice");
        refused_naming(with("n", json!(2)), "n");
        refused_naming(with("audio", json!({"voice": "alloy"})), "audio");
        refused_naming(with("modalities", json!(["text", "audio"])), "modalities");
        refused_naming(
            with("response_format", json!({"type": "json_object"})),
            "response_format",
        );
        refused_naming(with("logprobs", json!(true)), "logprobs");
        refused_naming(with("seed", json!(7)), "seed");
        refused_naming(with("frequency_penalty", json!(0.5)), "frequency_penalty");
        refused_naming(with("store", json!(true)), "store");
        refused_naming(with("frobnicate", json!(1)), "frobnicate");
        refused_naming(
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            "messages[0]",
        );
        refused_naming(
            with(
                "messages",
                json!([{"role": "user", "content": "a"}, {"role": "tool", "content": "b", "tool_call_id": "t"}]),
            ),
            "messages[1]",
        );
        refused_naming(
            with(
                "messages",
                json!([{"role": "user", "content": "x".repeat(101)}]),
            ),
            "messages[0].content",
        );
    }

    #[test]
    fn values_are_checked() {
        refused_naming(with("messages", json!([])), "messages");
        refused_naming(
            with(
                "messages",
                json!([{"role": "assistant", "content": "last"}]),
            ),
            "messages",
        );
        refused_naming(
            with("messages", json!([{"role": "user", "content": "  "}])),
            "messages",
        );
        refused_naming(with("temperature", json!(2.5)), "temperature");
        refused_naming(with("temperature", json!("hot")), "temperature");
        refused_naming(with("top_p", json!(-0.1)), "top_p");
        refused_naming(with("max_tokens", json!(0)), "max_tokens");
        refused_naming(with("max_tokens", json!(-1)), "max_tokens");
        refused_naming(with("stop", json!(["a", "b", "c", "d", "e"])), "stop");
        refused_naming(with("stop", json!([""])), "stop");
        refused_naming(
            with("stream_options", json!({"include_usage": true})),
            "stream_options",
        );
        let mut both = with("max_tokens", json!(5));
        both["max_completion_tokens"] = json!(6);
        refused_naming(both, "max_completion_tokens");
        let mut no_model = minimal();
        no_model.as_object_mut().unwrap().remove("model");
        refused_naming(no_model, "model");
        assert!(ChatCompletionRequest::parse(b"[1]", 100).is_err());
        assert!(ChatCompletionRequest::parse(b"{", 100).is_err());
    }
}

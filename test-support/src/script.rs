//! What the upstream stand-ins answer, and what they saw.
//!
//! Both stand-ins ([`crate::bedrock`], [`crate::openai`]) share this: a book of
//! scripted replies per model id, a log of the calls they received, and a
//! tracker of streaming responses that notices when a client goes away.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// One scripted answer to one call.
#[derive(Clone, Debug, PartialEq)]
pub struct Script {
    /// The reply text, split exactly as it is sent: one delta per element.
    pub deltas: Vec<String>,
    /// Pause before each delta (so also the time to the first one).
    pub delta_delay: Duration,
    /// Why the reply ended, sent when the reply runs to its end.
    pub stop: Stop,
    /// Reported usage; when `None`, input tokens are the number of
    /// whitespace-separated words in the request's messages and output tokens
    /// the number of deltas.
    pub usage: Option<ScriptedUsage>,
    /// Something going wrong instead of (or in the middle of) the reply.
    pub fault: Option<Fault>,
    /// A Bedrock Guardrail stepping in (Bedrock stand-in only).
    pub guardrail: Option<GuardrailIntervention>,
}

impl Script {
    /// A reply sent as these deltas, without pauses or faults.
    pub fn reply<I, S>(deltas: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            deltas: deltas.into_iter().map(Into::into).collect(),
            delta_delay: Duration::ZERO,
            stop: Stop::EndTurn,
            usage: None,
            fault: None,
            guardrail: None,
        }
    }

    /// A call that is rejected with an HTTP error before any output.
    pub fn rejected(rejection: Rejection) -> Self {
        Self::reply(Vec::<String>::new()).with_fault(Fault::Reject(rejection))
    }

    pub fn with_delta_delay(mut self, delay: Duration) -> Self {
        self.delta_delay = delay;
        self
    }

    pub fn with_stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    pub fn with_usage(mut self, input_tokens: u32, output_tokens: u32) -> Self {
        self.usage = Some(ScriptedUsage {
            input_tokens,
            output_tokens,
        });
        self
    }

    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    pub fn with_guardrail(mut self, guardrail: GuardrailIntervention) -> Self {
        self.guardrail = Some(guardrail);
        self
    }

    /// The whole reply text.
    pub fn text(&self) -> String {
        self.deltas.concat()
    }

    /// The deltas sent before the fault (all of them without one).
    pub(crate) fn deltas_before_fault(&self) -> &[String] {
        let sent = match &self.fault {
            None => self.deltas.len(),
            Some(Fault::Reject(_)) => 0,
            Some(
                Fault::StreamError { after_deltas, .. }
                | Fault::Stall { after_deltas }
                | Fault::Disconnect { after_deltas },
            ) => *after_deltas,
        };
        &self.deltas[..sent.min(self.deltas.len())]
    }

    pub(crate) fn usage_for(&self, request_text_words: u32) -> ScriptedUsage {
        self.usage.unwrap_or(ScriptedUsage {
            input_tokens: request_text_words,
            output_tokens: u32::try_from(self.deltas.len()).unwrap_or(u32::MAX),
        })
    }
}

/// Why a scripted reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    EndTurn,
    MaxTokens,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScriptedUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// An injected failure. Each stand-in renders it in its own wire format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP error status instead of a reply.
    Reject(Rejection),
    /// After `after_deltas` deltas, an error inside the stream
    /// (Bedrock: an exception frame; OpenAI: an `error` data event).
    StreamError {
        after_deltas: usize,
        failure: StreamFailure,
    },
    /// After `after_deltas` deltas, nothing more, with the connection kept
    /// open until the client leaves or the stand-in shuts down.
    Stall { after_deltas: usize },
    /// After `after_deltas` deltas, the server aborts the connection.
    Disconnect { after_deltas: usize },
}

/// Why a call is rejected before any output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Throttled,
    ServiceUnavailable,
    InternalError,
    AccessDenied,
    ContextWindowExceeded,
    InvalidRequest,
}

/// An error reported inside an already started stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFailure {
    Throttled,
    ModelStreamError,
    InternalError,
    ServiceUnavailable,
}

/// A Bedrock Guardrail that steps in on a call. As on Bedrock, it acts only
/// on requests that carry a `guardrailConfig`; others are answered as if the
/// script had no guardrail. Its intervention replaces the rest of the reply,
/// a scripted fault included; a rejected call is rejected before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardrailIntervention {
    pub checked: GuardrailChecked,
    /// What its policies detected, in the trace.
    pub findings: Vec<GuardrailFinding>,
    /// The guardrail's configured blocked-input or blocked-output message,
    /// which Bedrock sends as the reply's content.
    pub blocked_message: String,
}

impl GuardrailIntervention {
    /// Bedrock's default blocked message for a guardrail made in the console.
    pub const DEFAULT_BLOCKED_MESSAGE: &str = "Sorry, the model cannot answer this question.";

    /// Blocks the request before the model runs: no model output at all.
    pub fn on_input<I: IntoIterator<Item = GuardrailFinding>>(findings: I) -> Self {
        Self::new(GuardrailChecked::Input, findings)
    }

    /// Blocks the reply after the model's first `after_deltas` deltas. A
    /// stream has sent those already; a non-streamed reply is replaced whole.
    pub fn on_output<I: IntoIterator<Item = GuardrailFinding>>(
        after_deltas: usize,
        findings: I,
    ) -> Self {
        Self::new(GuardrailChecked::Output { after_deltas }, findings)
    }

    fn new<I: IntoIterator<Item = GuardrailFinding>>(
        checked: GuardrailChecked,
        findings: I,
    ) -> Self {
        Self {
            checked,
            findings: findings.into_iter().collect(),
            blocked_message: Self::DEFAULT_BLOCKED_MESSAGE.to_owned(),
        }
    }

    pub fn with_blocked_message(mut self, message: impl Into<String>) -> Self {
        self.blocked_message = message.into();
        self
    }

    /// How many of the model's deltas come before the intervention.
    pub(crate) fn deltas_before(&self) -> usize {
        match self.checked {
            GuardrailChecked::Input => 0,
            GuardrailChecked::Output { after_deltas } => after_deltas,
        }
    }
}

/// Which side of the conversation a guardrail blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardrailChecked {
    /// The user's input, before the model runs.
    Input,
    /// The model's output, after `after_deltas` deltas.
    Output { after_deltas: usize },
}

/// One detection of a guardrail policy, named as Bedrock's trace names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardrailFinding {
    /// A denied topic, by its name in the guardrail.
    Topic(String),
    /// A content filter, by type: `VIOLENCE`, `HATE`, `INSULTS`, `SEXUAL`,
    /// `MISCONDUCT`, `PROMPT_ATTACK`.
    Content(String),
    /// A managed word list, by type (`PROFANITY`), and the word matched.
    ManagedWords { list: String, matched: String },
    /// A custom word of the guardrail, the word matched.
    CustomWord(String),
    /// A PII entity: its type (`EMAIL`, `PHONE`, `NAME`, ...) and the text
    /// it matched.
    Pii { entity: String, matched: String },
    /// A custom regex filter: its name and the text it matched.
    Regex { name: String, matched: String },
}

/// One call a stand-in received.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedCall {
    pub model: String,
    pub streaming: bool,
    /// The request body as sent.
    pub body: serde_json::Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The Bedrock `guardrailConfig` the request carried (never for OpenAI).
    pub guardrail: Option<RecordedGuardrail>,
}

/// A Bedrock request's `guardrailConfig`, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedGuardrail {
    pub identifier: String,
    pub version: String,
    /// `enabled`, `enabled_full` or `disabled`; absent means disabled.
    pub trace: Option<String>,
}

/// How many streaming responses were started, ran to their end (including a
/// scripted fault), or were left by their client before the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub started: usize,
    pub finished: usize,
    pub dropped_by_client: usize,
}

#[derive(Default)]
struct Book {
    /// One-shot scripts, used before the standing script of the model.
    queued: HashMap<String, VecDeque<Script>>,
    standing: HashMap<String, Script>,
    calls: Vec<RecordedCall>,
}

/// State shared by a stand-in's handlers and its handle.
#[derive(Clone)]
pub(crate) struct Scripts {
    book: Arc<Mutex<Book>>,
    streams: Arc<watch::Sender<StreamCounts>>,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            book: Arc::default(),
            streams: Arc::new(watch::Sender::new(StreamCounts::default())),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A test that panicked while holding the lock leaves usable data.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set(&self, model: &str, script: Script) {
        self.book().standing.insert(model.to_owned(), script);
    }

    pub(crate) fn push(&self, model: &str, script: Script) {
        self.book()
            .queued
            .entry(model.to_owned())
            .or_default()
            .push_back(script);
    }

    /// Records the call and picks its script (`None`: nothing scripted).
    pub(crate) fn take(&self, call: RecordedCall) -> Option<Script> {
        let mut book = self.book();
        let script = book
            .queued
            .get_mut(&call.model)
            .and_then(VecDeque::pop_front)
            .or_else(|| book.standing.get(&call.model).cloned());
        book.calls.push(call);
        script
    }

    pub(crate) fn calls(&self) -> Vec<RecordedCall> {
        self.book().calls.clone()
    }

    pub(crate) fn stream_counts(&self) -> StreamCounts {
        *self.streams.borrow()
    }

    pub(crate) async fn wait_for_streams(&self, done: impl FnMut(&StreamCounts) -> bool) {
        let mut counts = self.streams.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = counts.wait_for(done).await;
    }

    pub(crate) fn stream_started(&self) {
        self.streams.send_modify(|c| c.started += 1);
    }

    pub(crate) fn stream_ended(&self, end: StreamEnd) {
        self.streams.send_modify(|c| match end {
            StreamEnd::Finished => c.finished += 1,
            StreamEnd::DroppedByClient => c.dropped_by_client += 1,
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    Finished,
    DroppedByClient,
}

/// Words in the given texts, the stand-ins' default input token count.
pub(crate) fn count_words<'a>(texts: impl Iterator<Item = &'a str>) -> u32 {
    let words: usize = texts.map(|t| t.split_whitespace().count()).sum();
    u32::try_from(words).unwrap_or(u32::MAX)
}

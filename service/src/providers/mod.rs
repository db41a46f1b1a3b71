//! LLM providers behind one trait: a stream of text deltas, then usage and
//! the stop reason; failures classified so that a route can decide whether to
//! fall back to its next target.
//!
//! Every provider stream is a plain future-driven stream without background
//! tasks: dropping it drops the upstream request.

pub mod bedrock;
pub mod openai;
mod reply;
pub mod simulated;
mod sse;

use std::fmt;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{Future, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::turns::History;

pub use bedrock::BedrockProvider;
pub use openai::OpenAiProvider;
pub use simulated::{SimulatedProvider, SimulatedSettings};

pub use crate::turns::{ChatTurn, Role, estimate_input_tokens, estimate_turn_tokens};
pub use parley_crds::{BYTES_PER_TOKEN, TOKENS_PER_TURN, estimate_tokens};

/// The turns of one prompt: the route's instructions, the history that fits
/// the target's window, and the new message. Every target's prompt and
/// every attempt share them: sending a prompt copies no turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTurns {
    instructions: Arc<[ChatTurn]>,
    history: History,
    message: ChatTurn,
}

impl PromptTurns {
    pub fn new(instructions: Arc<[ChatTurn]>, history: History, message: ChatTurn) -> Self {
        Self {
            instructions,
            history,
            message,
        }
    }

    /// The turns sent, in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &ChatTurn> + '_ {
        self.instructions
            .iter()
            .chain(self.history.iter())
            .chain(std::iter::once(&self.message))
    }

    pub fn instructions(&self) -> &[ChatTurn] {
        &self.instructions
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn message(&self) -> &ChatTurn {
        &self.message
    }
}

/// One request to one target of a route.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// The provider's model id, e.g. `amazon.nova-micro-v1:0`.
    pub model: String,
    pub turns: PromptTurns,
    pub max_output_tokens: u32,
    /// The target's timeout: bounds the time to the first token and every
    /// gap between tokens (for `complete`, the whole call).
    pub timeout: Duration,
    /// A Bedrock Guardrail to apply (only ever set on `bedrock` targets).
    pub guardrail: Option<Guardrail>,
    pub sampling: Sampling,
}

/// A Bedrock Guardrail, by identifier and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guardrail {
    pub identifier: String,
    pub version: String,
}

/// What a guardrail's trace says about an intervention.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intervention {
    /// The guardrail acted on the user's input (the model never ran).
    pub on_input: bool,
    /// What it flagged, as policy labels (`topic:Homework`, `content:VIOLENCE`,
    /// `word:PROFANITY`, `pii:EMAIL`, …), never the matched text.
    pub flagged: Vec<String>,
}

/// How the model picks its tokens, as the caller asked; `None` and no stop
/// sequences leave the model's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Texts that end the reply when generated (not part of the reply).
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// Why the model stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ContentFiltered,
    /// A Bedrock Guardrail intervened: the reply ends blocked.
    GuardrailIntervened(Intervention),
    /// A provider-specific reason, as the provider names it.
    Other(String),
}

/// One item of a provider stream. A successful stream is deltas, then
/// `Usage` when the provider reported it, then `Finished`, always last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderEvent {
    Delta(String),
    Usage(Usage),
    Finished { stop_reason: StopReason },
}

/// A whole reply from `complete`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    /// `None` when the provider did not report usage.
    pub usage: Option<Usage>,
    pub stop_reason: StopReason,
}

/// How a provider call failed; drives the route's fallback decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderErrorKind {
    Throttled,
    Unavailable,
    Timeout,
    InvalidRequest,
    ContextWindow,
    Auth,
    Other,
}

impl ProviderErrorKind {
    /// The stable name used in routes files (`fallbackOn`) and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::InvalidRequest => "invalid_request",
            Self::ContextWindow => "context_window",
            Self::Auth => "auth",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for ProviderErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    pub message: String,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    fn timed_out(timeout: Duration) -> Self {
        Self::new(
            ProviderErrorKind::Timeout,
            format!("no output from the model within {timeout:?}"),
        )
    }
}

pub type ProviderStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;

#[async_trait]
pub trait Provider: Send + Sync {
    /// Starts a streamed reply. Errors before the stream exists (rejections,
    /// connection failures) come from this call; later ones as stream items,
    /// after which the stream ends.
    async fn stream(&self, request: CompletionRequest) -> Result<ProviderStream, ProviderError>;

    /// A whole reply in one call.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError>;
}

/// Collects a provider stream into a [`Completion`].
pub async fn collect(mut stream: ProviderStream) -> Result<Completion, ProviderError> {
    let mut text = String::new();
    let mut usage = None;
    while let Some(event) = stream.next().await {
        match event? {
            ProviderEvent::Delta(delta) => text.push_str(&delta),
            ProviderEvent::Usage(reported) => usage = Some(reported),
            ProviderEvent::Finished { stop_reason } => {
                return Ok(Completion {
                    text,
                    usage,
                    stop_reason,
                });
            }
        }
    }
    Err(ProviderError::new(
        ProviderErrorKind::Unavailable,
        "the reply stream ended before it finished",
    ))
}

/// The deadline for the next token: the first one within `timeout` of the
/// start, every later one within `timeout` of the previous one. One timer
/// serves the whole reply: a token only moves `at` forward, and the timer,
/// when it fires before `at`, is re-armed for it. That is a timer-wheel
/// operation per timeout period instead of a timer registered and removed
/// for every chunk the reply waits on. Nor is the clock read for every
/// token: a token only marks that `at` moves, and `at` is set when the
/// reader next has to wait. The tokens of one upstream read then cost one
/// reading (a reply's 64 tokens read 64 times were half of its clock
/// readings), and a deadline counts from the end of the burst that
/// brought the last token instead of from the token, later by the
/// microseconds the burst took to pass on.
struct TokenDeadline {
    timeout: Duration,
    at: Instant,
    /// A token arrived since `at` was set.
    token_since: bool,
    /// Never later than `at`; made the first time the work has to wait, so
    /// a reply whose chunks are always ready needs no timer (and a stream
    /// may be made outside the runtime that reads it).
    timer: Option<Pin<Box<Sleep>>>,
}

impl TokenDeadline {
    fn start(timeout: Duration) -> Self {
        Self {
            timeout,
            at: Instant::now() + timeout,
            token_since: false,
            timer: None,
        }
    }

    /// A token arrived: the next one has `timeout` from the next wait.
    fn token_arrived(&mut self) {
        self.token_since = true;
    }

    async fn bound<F: Future>(&mut self, work: F) -> Result<F::Output, ProviderError> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            if self.token_since {
                self.at = Instant::now() + self.timeout;
                self.token_since = false;
            }
            let at = self.at;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            loop {
                ready!(timer.as_mut().poll(cx));
                if timer.deadline() >= at {
                    return Poll::Ready(Err(ProviderError::timed_out(self.timeout)));
                }
                timer.as_mut().reset(at);
            }
        })
        .await
    }
}

/// Whether an upstream error message says the input exceeds the model's
/// context window (providers signal it only in prose or in a code).
fn mentions_context_window(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "context length",
        "context_length",
        "context window",
        "maximum context",
        "too long",
        "too many input tokens",
        "too many tokens",
    ]
    .iter()
    .any(|wording| message.contains(wording))
}

/// Whole-token counts from the SDKs' signed counters (never negative in
/// practice; a negative one counts as zero).
fn tokens(count: i32) -> u32 {
    u32::try_from(count).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_token_deadline_moves_with_each_token() {
        let timeout = Duration::from_millis(400);
        let mut deadline = TokenDeadline::start(timeout);
        // Each wait is well within the timeout, all of them together past it:
        // the timer armed at the start fires and is re-armed, not obeyed.
        for _ in 0..6 {
            deadline
                .bound(tokio::time::sleep(Duration::from_millis(100)))
                .await
                .unwrap();
            deadline.token_arrived();
        }
        let started = Instant::now();
        let error = deadline
            .bound(std::future::pending::<()>())
            .await
            .unwrap_err();
        assert_eq!(error.kind, ProviderErrorKind::Timeout);
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    }

    #[test]
    fn context_window_wording_is_recognised() {
        assert!(mentions_context_window(
            "Input is too long for requested model."
        ));
        assert!(mentions_context_window(
            "This model's maximum context length is 4096 tokens"
        ));
        assert!(!mentions_context_window("Malformed input request"));
    }

    #[tokio::test]
    async fn collect_needs_a_finished_event() {
        let events = vec![Ok(ProviderEvent::Delta("partial".into()))];
        let error = collect(futures::stream::iter(events).boxed())
            .await
            .unwrap_err();
        assert_eq!(error.kind, ProviderErrorKind::Unavailable);

        let events = vec![
            Ok(ProviderEvent::Delta("a".into())),
            Ok(ProviderEvent::Delta("b".into())),
            Ok(ProviderEvent::Usage(Usage {
                input_tokens: 1,
                output_tokens: 2,
            })),
            Ok(ProviderEvent::Finished {
                stop_reason: StopReason::EndTurn,
            }),
        ];
        let completion = collect(futures::stream::iter(events).boxed())
            .await
            .unwrap();
        assert_eq!(completion.text, "ab");
        assert_eq!(completion.usage.map(|u| u.output_tokens), Some(2));
    }
}

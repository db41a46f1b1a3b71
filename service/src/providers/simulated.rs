//! A deterministic built-in model: the default for local runs, demos and load
//! tests. It answers by echoing the words of the last user turn at a
//! configured pace: one output token per whitespace-separated word, input
//! tokens as [`estimate_input_tokens`] counts them. A stop sequence ends the
//! reply where it would first appear (what was streamed before stays); the
//! temperature and top-p are accepted and change nothing.

use std::num::NonZeroU32;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;

use super::{
    Completion, CompletionRequest, Provider, ProviderError, ProviderEvent, ProviderStream, Role,
    StopReason, Usage, collect, estimate_input_tokens,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimulatedSettings {
    /// Time from the request to the first token.
    pub first_token_latency: Duration,
    /// Pace of the later tokens; `None` sends them as fast as they are read.
    pub tokens_per_second: Option<NonZeroU32>,
    /// Reply length in tokens (the prompt's words repeated as needed);
    /// `None` echoes the prompt once. Capped by the request's maximum.
    pub reply_tokens: Option<u32>,
}

pub struct SimulatedProvider {
    settings: SimulatedSettings,
}

/// What the model says when the prompt has no words.
const SILENT_PROMPT_REPLY: &str = "…";

impl SimulatedProvider {
    pub fn new(settings: SimulatedSettings) -> Self {
        Self { settings }
    }
}

/// Tokens in `text` as the simulated model counts them.
pub fn count_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// A reply being generated: it borrows its words from the prompt by range,
/// so each token costs one small `String` and nothing else.
struct Generation {
    source: String,
    words: Vec<Range<usize>>,
    reply_tokens: u32,
    sent: u32,
    stop_reason: StopReason,
    input_tokens: u32,
    first_token_at: Instant,
    interval: Duration,
    timeout: Duration,
    last_token_at: Instant,
    ending: Vec<ProviderEvent>,
    done: bool,
    stop: Vec<String>,
    /// The reply so far, kept only to find stop sequences.
    written: String,
}

impl Generation {
    fn new(settings: SimulatedSettings, request: CompletionRequest) -> Self {
        let started = Instant::now();
        // Input is counted the way holds estimate it, so a simulated reply
        // costs exactly what was priced.
        let input_tokens = estimate_input_tokens(&request.turns);
        let last_user_text = request
            .turns
            .iter()
            .rev()
            .find(|turn| turn.role == Role::User && count_tokens(&turn.text) > 0)
            .map_or_else(
                || SILENT_PROMPT_REPLY.to_owned(),
                |turn| turn.text.to_string(),
            );
        let words = word_ranges(&last_user_text);
        let natural_length = settings
            .reply_tokens
            .unwrap_or_else(|| u32::try_from(words.len()).unwrap_or(u32::MAX));
        let (reply_tokens, stop_reason) = if natural_length > request.max_output_tokens {
            (request.max_output_tokens, StopReason::MaxTokens)
        } else {
            (natural_length, StopReason::EndTurn)
        };
        let interval = settings
            .tokens_per_second
            .map_or(Duration::ZERO, |rate| Duration::from_secs(1) / rate.get());
        Self {
            source: last_user_text,
            words,
            reply_tokens,
            sent: 0,
            stop_reason,
            input_tokens,
            first_token_at: started + settings.first_token_latency,
            interval,
            timeout: request.timeout,
            last_token_at: started,
            ending: Vec::new(),
            done: false,
            stop: request.sampling.stop,
            written: String::new(),
        }
    }

    async fn next(&mut self) -> Option<Result<ProviderEvent, ProviderError>> {
        if let Some(event) = self.ending.pop() {
            return Some(Ok(event));
        }
        if self.done {
            return None;
        }
        if self.sent == self.reply_tokens {
            return Some(Ok(self.finish(self.stop_reason.clone())));
        }
        let due = self.first_token_at + self.interval * self.sent;
        let give_up_at = self.last_token_at + self.timeout;
        if due > give_up_at {
            // A real model this slow would hit the target's timeout too.
            tokio::time::sleep_until(give_up_at).await;
            self.done = true;
            return Some(Err(ProviderError::timed_out(self.timeout)));
        }
        tokio::time::sleep_until(due).await;
        self.last_token_at = Instant::now();
        let index = usize::try_from(self.sent).unwrap_or_default() % self.words.len();
        let word = &self.source[self.words[index].clone()];
        let mut delta = if self.sent == 0 {
            word.to_owned()
        } else {
            let mut delta = String::with_capacity(word.len() + 1);
            delta.push(' ');
            delta.push_str(word);
            delta
        };
        if !self.stop.is_empty() && self.truncate_at_stop(&mut delta) {
            if delta.is_empty() {
                return Some(Ok(self.finish(StopReason::StopSequence)));
            }
            self.reply_tokens = self.sent + 1;
            self.stop_reason = StopReason::StopSequence;
        }
        self.sent += 1;
        Some(Ok(ProviderEvent::Delta(delta)))
    }

    /// Cuts `delta` where a stop sequence first appears in the reply with it;
    /// whether one did.
    fn truncate_at_stop(&mut self, delta: &mut String) -> bool {
        let before = self.written.len();
        self.written.push_str(delta);
        let Some(at) = self
            .stop
            .iter()
            .filter_map(|stop| self.written.find(stop.as_str()))
            .min()
        else {
            return false;
        };
        delta.truncate(at.saturating_sub(before));
        true
    }

    /// The usage event, with `Finished` queued after it.
    fn finish(&mut self, stop_reason: StopReason) -> ProviderEvent {
        self.done = true;
        self.ending.push(ProviderEvent::Finished { stop_reason });
        ProviderEvent::Usage(Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.sent,
        })
    }
}

fn word_ranges(text: &str) -> Vec<Range<usize>> {
    let mut words = Vec::new();
    let mut start = None;
    for (at, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(from)) => {
                words.push(from..at);
                start = None;
            }
            (false, None) => start = Some(at),
            _ => {}
        }
    }
    if let Some(from) = start {
        words.push(from..text.len());
    }
    words
}

#[async_trait]
impl Provider for SimulatedProvider {
    async fn stream(&self, request: CompletionRequest) -> Result<ProviderStream, ProviderError> {
        let generation = Generation::new(self.settings, request);
        Ok(
            futures::stream::unfold(generation, |mut generation| async move {
                let item = generation.next().await?;
                Some((item, generation))
            })
            .boxed(),
        )
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError> {
        collect(self.stream(request).await?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_found_like_split_whitespace() {
        for text in ["", "  ", "one", " two  words ", "emoji 😀 中文\tand\nlines"] {
            let ranges: Vec<&str> = word_ranges(text).into_iter().map(|r| &text[r]).collect();
            let expected: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(ranges, expected, "{text:?}");
        }
    }
}

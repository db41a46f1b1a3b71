//! A deterministic built-in model: the default for local runs, demos and load
//! tests. It answers by echoing the words of the last user turn at a
//! configured pace: one output token per whitespace-separated word, input
//! tokens as [`estimate_input_tokens`] counts them. A stop sequence ends the
//! reply where it would first appear (what was streamed before stays); the
//! temperature and top-p are accepted and change nothing.

use std::num::NonZeroU32;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio::time::{Instant, Sleep};

use super::{
    Completion, CompletionRequest, Provider, ProviderError, ProviderEvent, ProviderStream, Role,
    StopReason, Usage, collect, estimate_input_tokens,
};
use crate::shared_text::SharedText;

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

pin_project_lite::pin_project! {
    /// A reply being generated, polled as the provider's stream itself: it
    /// shares the prompt's text, finds each word from a cursor, and waits on
    /// one timer, reset for each token.
    struct Generation {
        text: SharedText,
        // Where the search for the next word starts, in `text`.
        cursor: usize,
        reply_tokens: u32,
        sent: u32,
        input_tokens: u32,
        // Why the reply ends, as its `Finished` event will say.
        stop_reason: StopReason,
        phase: Phase,
        // When the next token is due.
        due: Instant,
        interval: Duration,
        timeout: Duration,
        last_token_at: Instant,
        stop: Vec<String>,
        // The reply so far, kept only to find stop sequences.
        written: String,
        #[pin]
        pace: Sleep,
    }
}

impl Generation {
    fn new(settings: SimulatedSettings, request: CompletionRequest) -> Self {
        let started = Instant::now();
        // Input is counted the way holds estimate it, so a simulated reply
        // costs exactly what was priced.
        let input_tokens = estimate_input_tokens(request.turns.iter());
        let (text, words) = request
            .turns
            .iter()
            .rev()
            .filter(|turn| turn.role == Role::User)
            .map(|turn| (turn.text.clone(), count_tokens(&turn.text)))
            .find(|(_, words)| *words > 0)
            .unwrap_or_else(|| (SharedText::from(SILENT_PROMPT_REPLY), 1));
        let natural_length = settings.reply_tokens.unwrap_or(words);
        let (reply_tokens, stop_reason) = if natural_length > request.max_output_tokens {
            (request.max_output_tokens, StopReason::MaxTokens)
        } else {
            (natural_length, StopReason::EndTurn)
        };
        let interval = settings
            .tokens_per_second
            .map_or(Duration::ZERO, |rate| Duration::from_secs(1) / rate.get());
        let due = started + settings.first_token_latency;
        Self {
            text,
            cursor: 0,
            reply_tokens,
            sent: 0,
            input_tokens,
            stop_reason,
            phase: Phase::Streaming,
            due,
            interval,
            timeout: request.timeout,
            last_token_at: started,
            stop: request.sampling.stop,
            written: String::new(),
            pace: tokio::time::sleep_until(due),
        }
    }
}

impl Stream for Generation {
    type Item = Result<ProviderEvent, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        match this.phase {
            Phase::Streaming => {}
            Phase::Finishing => {
                *this.phase = Phase::Done;
                let stop_reason = this.stop_reason.clone();
                return Poll::Ready(Some(Ok(ProviderEvent::Finished { stop_reason })));
            }
            Phase::Done => return Poll::Ready(None),
        }
        if this.sent == this.reply_tokens {
            *this.phase = Phase::Finishing;
            return Poll::Ready(Some(Ok(usage(*this.input_tokens, *this.sent))));
        }
        let give_up_at = *this.last_token_at + *this.timeout;
        // A real model this slow would hit the target's timeout too.
        let times_out = *this.due > give_up_at;
        let wake_at = if times_out { give_up_at } else { *this.due };
        if this.pace.deadline() != wake_at {
            this.pace.as_mut().reset(wake_at);
        }
        ready!(this.pace.poll(cx));
        if times_out {
            *this.phase = Phase::Done;
            return Poll::Ready(Some(Err(ProviderError::timed_out(*this.timeout))));
        }
        *this.last_token_at = Instant::now();
        *this.due += *this.interval;
        let word = next_word(this.text, *this.cursor);
        *this.cursor = word.end;
        let word = &this.text[word];
        let mut delta = if *this.sent == 0 {
            word.to_owned()
        } else {
            let mut delta = String::with_capacity(word.len() + 1);
            delta.push(' ');
            delta.push_str(word);
            delta
        };
        if !this.stop.is_empty() && truncate_at_stop(this.written, this.stop, &mut delta) {
            *this.stop_reason = StopReason::StopSequence;
            if delta.is_empty() {
                *this.phase = Phase::Finishing;
                return Poll::Ready(Some(Ok(usage(*this.input_tokens, *this.sent))));
            }
            *this.reply_tokens = *this.sent + 1;
        }
        *this.sent += 1;
        Poll::Ready(Some(Ok(ProviderEvent::Delta(delta))))
    }
}

/// Cuts `delta` where a stop sequence first appears in the reply with it
/// (`written` so far); whether one did.
fn truncate_at_stop(written: &mut String, stop: &[String], delta: &mut String) -> bool {
    let before = written.len();
    written.push_str(delta);
    let Some(at) = stop
        .iter()
        .filter_map(|stop| written.find(stop.as_str()))
        .min()
    else {
        return false;
    };
    delta.truncate(at.saturating_sub(before));
    true
}

/// Where a reply is in its ending: its usage, then `Finished`.
enum Phase {
    Streaming,
    /// The usage was sent; `Finished` is next.
    Finishing,
    Done,
}

fn usage(input_tokens: u32, output_tokens: u32) -> ProviderEvent {
    ProviderEvent::Usage(Usage {
        input_tokens,
        output_tokens,
    })
}

/// The first word of `text` at or after byte `from`, or its first word when
/// none is left: a text's words in turn, over and over. `text` has a word.
fn next_word(text: &str, from: usize) -> Range<usize> {
    let word_after = |from: usize| {
        let rest = text.get(from..)?;
        let start = from + rest.find(|c: char| !c.is_whitespace())?;
        let end = text[start..]
            .find(char::is_whitespace)
            .map_or(text.len(), |length| start + length);
        Some(start..end)
    };
    word_after(from).or_else(|| word_after(0)).unwrap_or(0..0)
}

#[async_trait]
impl Provider for SimulatedProvider {
    async fn stream(&self, request: CompletionRequest) -> Result<ProviderStream, ProviderError> {
        Ok(Box::pin(Generation::new(self.settings, request)))
    }

    async fn complete(&self, request: CompletionRequest) -> Result<Completion, ProviderError> {
        collect(self.stream(request).await?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_come_in_turn_like_split_whitespace_and_start_over() {
        for text in [" one ", " two  words ", "emoji 😀 中文\tand\nlines", "…"] {
            let expected: Vec<&str> = text.split_whitespace().collect();
            let mut cursor = 0;
            let mut words = Vec::new();
            for _ in 0..expected.len() * 2 + 1 {
                let word = next_word(text, cursor);
                cursor = word.end;
                words.push(&text[word]);
            }
            let cycled: Vec<&str> = expected.iter().cycle().take(words.len()).copied().collect();
            assert_eq!(words, cycled, "{text:?}");
        }
    }
}

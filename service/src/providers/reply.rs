//! Reading a streamed reply from an upstream API, the same for every real
//! provider: each token within the target's timeout, usage and the stop
//! reason passed on once the reply ends, nothing after an error.

use std::future::Future;

use futures::StreamExt;

use super::{ProviderError, ProviderEvent, ProviderStream, StopReason, TokenDeadline, Usage};

/// What one upstream event means for the reply.
pub(super) enum ReplyStep {
    /// Nothing to pass on (bookkeeping, boundaries, empty text).
    Nothing,
    Delta(String),
    Finished {
        stop_reason: StopReason,
        usage: Option<Usage>,
    },
    Failed(ProviderError),
}

/// A provider's upstream reply, read one event at a time.
pub(super) trait ReplySource: Send + 'static {
    /// Waits for the next upstream event and says what it means.
    fn step(&mut self) -> impl Future<Output = ReplyStep> + Send;
}

/// The provider stream of `source`: deltas, then `Usage` when reported and
/// `Finished`, or one error, after which the stream ends.
pub(super) fn reply_stream(source: impl ReplySource, deadline: TokenDeadline) -> ProviderStream {
    // Boxed: each event moves the reader in and out of the stream's state,
    // which would copy it whole (about 200 bytes) twice per token.
    let reader = Box::new(ReplyReader {
        source,
        deadline,
        ending: Vec::new(),
        done: false,
    });
    futures::stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    })
    .boxed()
}

struct ReplyReader<S> {
    source: S,
    deadline: TokenDeadline,
    /// The final events, last one first, once the reply finished.
    ending: Vec<ProviderEvent>,
    done: bool,
}

impl<S: ReplySource> ReplyReader<S> {
    async fn next(&mut self) -> Option<Result<ProviderEvent, ProviderError>> {
        if let Some(event) = self.ending.pop() {
            return Some(Ok(event));
        }
        if self.done {
            return None;
        }
        loop {
            let step = self
                .deadline
                .bound(self.source.step())
                .await
                .unwrap_or_else(ReplyStep::Failed);
            match step {
                ReplyStep::Nothing => {}
                ReplyStep::Delta(text) => {
                    self.deadline.token_arrived();
                    return Some(Ok(ProviderEvent::Delta(text)));
                }
                ReplyStep::Finished { stop_reason, usage } => {
                    self.done = true;
                    self.ending.push(ProviderEvent::Finished { stop_reason });
                    if let Some(usage) = usage {
                        self.ending.push(ProviderEvent::Usage(usage));
                    }
                    return self.ending.pop().map(Ok);
                }
                ReplyStep::Failed(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
    }
}

//! Generating one reply: try the route's targets in order until one produces
//! output (fallback happens only before the first chunk), publish every
//! event to the hub, accumulate the text from the typed deltas, and store
//! the user message with the reply in one append.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parley_crds::{FallbackCondition, ModelRouteSpec, RouteTarget};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Replies;
use super::frames::{ChunkData, CompleteData, ErrorData, ModelData, UsageData, frame};
use super::hub::ReplyStream;
use super::metrics::{FallbackLabels, StreamLabels, TokenLabels};
use crate::error::{Error, upstream_code};
use crate::providers::simulated::count_tokens;
use crate::providers::{
    ChatTurn, CompletionRequest, ProviderError, ProviderErrorKind, ProviderEvent, Usage,
};
use crate::store::{Message, MessageRole, ObjectId, SessionStore, TokenTotals};

/// What a reply needs, all owned: the task outlives the request.
pub struct ReplyRequest {
    pub session_id: ObjectId,
    pub user_id: String,
    /// The route as it was when the request arrived (reloads do not touch it).
    pub route: ModelRouteSpec,
    /// The conversation so far, ending with the new user turn.
    pub turns: Vec<ChatTurn>,
    pub user_message: Message,
}

/// A reply that ran to its end and was stored.
#[derive(Debug, Clone)]
pub struct FinishedReply {
    pub message: Message,
    pub usage: Usage,
    pub model: String,
    pub route: String,
    pub fallback_applied: bool,
}

/// Starts generating in a task of its own, decoupled from any connection.
pub fn spawn(
    replies: Arc<Replies>,
    sessions: Arc<dyn SessionStore>,
    reply: Arc<ReplyStream>,
    request: ReplyRequest,
) -> JoinHandle<Result<FinishedReply, Error>> {
    tokio::spawn(async move {
        replies.metrics.active.inc();
        let session_id = request.session_id;
        let mut generation = Generation {
            replies: &replies,
            sessions: sessions.as_ref(),
            reply: &reply,
            request: &request,
            next_id: 1,
            started: Instant::now(),
        };
        let result = generation.run().await;
        reply.finish();
        replies.metrics.active.dec();
        replies
            .hub
            .retire(session_id, &reply, replies.settings.grace);
        result
    })
}

struct Generation<'a> {
    replies: &'a Replies,
    sessions: &'a dyn SessionStore,
    reply: &'a ReplyStream,
    request: &'a ReplyRequest,
    next_id: u64,
    started: Instant,
}

/// How one target's attempt ended.
enum Attempt {
    Done(Result<FinishedReply, Error>),
    /// Failed before any output with an error the route falls back on.
    FallBack(ProviderError),
}

/// Why generation stopped early.
enum Stop {
    Abandoned,
    ShuttingDown,
}

impl Generation<'_> {
    async fn run(&mut self) -> Result<FinishedReply, Error> {
        let route = &self.request.route;
        for (index, target) in route.targets.iter().enumerate() {
            match self.attempt(target, index > 0).await {
                Attempt::Done(result) => return result,
                Attempt::FallBack(error) => {
                    let next = &route.targets[index + 1];
                    tracing::warn!(
                        route = %route.alias, from = %target.model, to = %next.model,
                        %error, "falling back to the next target"
                    );
                    self.replies
                        .metrics
                        .fallbacks
                        .get_or_create(&FallbackLabels {
                            from: target.model.clone(),
                            to: next.model.clone(),
                            reason: error.kind.as_str(),
                        })
                        .inc();
                }
            }
        }
        // `attempt` only falls back when a next target exists.
        Err(Error::Upstream(ProviderError::new(
            ProviderErrorKind::Unavailable,
            "the route has no targets",
        )))
    }

    async fn attempt(&mut self, target: &RouteTarget, fallback_applied: bool) -> Attempt {
        let provider = match self.replies.providers.for_target(target).await {
            Ok(provider) => provider,
            Err(error) => return self.failed_before_output(target, error),
        };
        let request = CompletionRequest {
            model: target.model.clone(),
            turns: self.request.turns.clone(),
            max_output_tokens: target.max_output_tokens,
            timeout: Duration::from_secs(u64::from(target.timeout_seconds)),
        };
        let opened = tokio::select! {
            opened = provider.stream(request) => opened,
            stop = self.stop() => return Attempt::Done(self.stopped(target, stop, "", 0, None).await),
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) => return self.failed_before_output(target, error),
        };
        let mut text = String::new();
        let mut deltas: u32 = 0;
        let mut usage = None;
        let mut announced = false;
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                stop = self.stop() => {
                    // Dropping the stream drops the upstream request.
                    drop(stream);
                    return Attempt::Done(self.stopped(target, stop, &text, deltas, usage).await);
                }
            };
            match item {
                Some(Ok(ProviderEvent::Delta(delta))) => {
                    if !announced {
                        self.announce(target, fallback_applied);
                        announced = true;
                    }
                    deltas = deltas.saturating_add(1);
                    let chunk = ChunkData {
                        text: &delta,
                        tokens: 1,
                        total_tokens: deltas,
                    };
                    self.publish("chunk", &chunk);
                    text.push_str(&delta);
                }
                Some(Ok(ProviderEvent::Usage(reported))) => usage = Some(reported),
                Some(Ok(ProviderEvent::Finished { .. })) => {
                    if !announced {
                        self.announce(target, fallback_applied);
                    }
                    let usage = self.usage(usage, deltas);
                    return Attempt::Done(
                        self.store(target, text, usage, false, fallback_applied, "completed")
                            .await,
                    );
                }
                Some(Err(error)) if !announced => {
                    return self.failed_before_output(target, error);
                }
                None if !announced => {
                    return self.failed_before_output(target, ended_early());
                }
                Some(Err(error)) => {
                    return Attempt::Done(
                        self.interrupted(target, error, text, deltas, usage).await,
                    );
                }
                None => {
                    return Attempt::Done(
                        self.interrupted(target, ended_early(), text, deltas, usage)
                            .await,
                    );
                }
            }
        }
    }

    /// Resolves when the reply must stop: owner gone past the grace period,
    /// or the shutdown drain is over.
    async fn stop(&self) -> Stop {
        tokio::select! {
            () = self.reply.abandoned() => Stop::Abandoned,
            () = self.replies.shutdown.cancelled() => Stop::ShuttingDown,
        }
    }

    fn failed_before_output(&mut self, target: &RouteTarget, error: ProviderError) -> Attempt {
        let is_last = self
            .request
            .route
            .targets
            .last()
            .is_none_or(|last| std::ptr::eq(last, target));
        if !is_last && falls_back_on(&self.request.route, error.kind) {
            return Attempt::FallBack(error);
        }
        tracing::warn!(route = %self.request.route.alias, model = %target.model, %error, "reply failed before any output");
        self.publish(
            "error",
            &ErrorData {
                code: upstream_code(error.kind),
                message: &format!("the model failed ({})", error.kind),
            },
        );
        self.count(target, "failed");
        Attempt::Done(Err(Error::Upstream(error)))
    }

    async fn interrupted(
        &mut self,
        target: &RouteTarget,
        error: ProviderError,
        text: String,
        deltas: u32,
        usage: Option<Usage>,
    ) -> Result<FinishedReply, Error> {
        tracing::warn!(route = %self.request.route.alias, model = %target.model, %error, "reply interrupted after output");
        let usage = self.usage(usage, deltas);
        let stored = self.store_quietly(target, text, usage, "interrupted").await;
        self.publish(
            "error",
            &ErrorData {
                code: upstream_code(error.kind),
                message: &format!(
                    "the model failed mid-reply ({}); the partial reply was saved",
                    error.kind
                ),
            },
        );
        stored?;
        Err(Error::Upstream(error))
    }

    async fn stopped(
        &mut self,
        target: &RouteTarget,
        stop: Stop,
        text: &str,
        deltas: u32,
        usage: Option<Usage>,
    ) -> Result<FinishedReply, Error> {
        let (outcome, error, code, message) = match stop {
            Stop::Abandoned => (
                "abandoned",
                Error::NoActiveReply,
                "CANCELLED",
                "the client left and did not come back",
            ),
            Stop::ShuttingDown => (
                "shutdown",
                Error::ShuttingDown,
                "SHUTTING_DOWN",
                "the service is shutting down; the partial reply was saved",
            ),
        };
        if deltas > 0 {
            let usage = self.usage(usage, deltas);
            // Best effort: the stop itself is what the caller hears about.
            let _ = self
                .store_quietly(target, text.to_owned(), usage, outcome)
                .await;
        } else {
            self.count(target, outcome);
        }
        self.publish("error", &ErrorData { code, message });
        Err(error)
    }

    /// Stores a cut-short reply marked incomplete; a store failure is logged.
    async fn store_quietly(
        &mut self,
        target: &RouteTarget,
        text: String,
        usage: Usage,
        outcome: &'static str,
    ) -> Result<FinishedReply, Error> {
        let stored = self.store(target, text, usage, true, false, outcome).await;
        if let Err(error) = &stored {
            tracing::error!(%error, "storing a partial reply failed");
        }
        stored
    }

    /// Appends the user message and the reply in one step, counts the
    /// outcome and, for a whole reply, publishes `complete`.
    async fn store(
        &mut self,
        target: &RouteTarget,
        text: String,
        usage: Usage,
        incomplete: bool,
        fallback_applied: bool,
        outcome: &'static str,
    ) -> Result<FinishedReply, Error> {
        let mut message = Message::new(MessageRole::Assistant, text);
        message.incomplete = incomplete;
        let totals = TokenTotals {
            input: u64::from(usage.input_tokens),
            output: u64::from(usage.output_tokens),
        };
        let appended = self
            .sessions
            .append_messages(
                self.request.session_id,
                &self.request.user_id,
                &[self.request.user_message.clone(), message.clone()],
                totals,
            )
            .await;
        self.count(target, outcome);
        self.count_tokens(target, usage);
        if let Err(error) = appended {
            if !incomplete {
                self.publish(
                    "error",
                    &ErrorData {
                        code: error.code(),
                        message: "the reply could not be saved",
                    },
                );
            }
            return Err(error);
        }
        if !incomplete {
            let message_id = message.id.to_hex();
            self.publish(
                "complete",
                &CompleteData {
                    usage: UsageData {
                        input_tokens: usage.input_tokens,
                        output_tokens: usage.output_tokens,
                    },
                    message_id: &message_id,
                },
            );
        }
        Ok(FinishedReply {
            message,
            usage,
            model: target.model.clone(),
            route: self.request.route.alias.clone(),
            fallback_applied,
        })
    }

    fn announce(&mut self, target: &RouteTarget, fallback_applied: bool) {
        self.replies
            .metrics
            .time_to_first_token
            .observe(self.started.elapsed().as_secs_f64());
        let model = ModelData {
            model: &target.model,
            route: &self.request.route.alias,
            fallback_applied,
        };
        self.publish("model", &model);
    }

    fn publish<T: serde::Serialize>(&mut self, event: &str, data: &T) {
        self.reply.publish(frame(self.next_id, event, data));
        self.next_id += 1;
    }

    /// Reported usage, or an estimate when the provider reported none
    /// (input: words of the conversation; output: one token per delta).
    fn usage(&self, reported: Option<Usage>, deltas: u32) -> Usage {
        reported.unwrap_or_else(|| Usage {
            input_tokens: self
                .request
                .turns
                .iter()
                .map(|turn| count_tokens(&turn.text))
                .fold(0, u32::saturating_add),
            output_tokens: deltas,
        })
    }

    fn count(&self, target: &RouteTarget, outcome: &'static str) {
        self.replies
            .metrics
            .streams
            .get_or_create(&StreamLabels {
                route: self.request.route.alias.clone(),
                model: target.model.clone(),
                outcome,
            })
            .inc();
    }

    fn count_tokens(&self, target: &RouteTarget, usage: Usage) {
        for (direction, tokens) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            self.replies
                .metrics
                .tokens
                .get_or_create(&TokenLabels {
                    direction,
                    model: target.model.clone(),
                })
                .inc_by(u64::from(tokens));
        }
    }
}

fn ended_early() -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Unavailable,
        "the reply stream ended before it finished",
    )
}

fn falls_back_on(route: &ModelRouteSpec, kind: ProviderErrorKind) -> bool {
    let condition = match kind {
        ProviderErrorKind::Throttled => FallbackCondition::Throttled,
        ProviderErrorKind::Unavailable => FallbackCondition::Unavailable,
        ProviderErrorKind::Timeout => FallbackCondition::Timeout,
        ProviderErrorKind::ContextWindow => FallbackCondition::ContextWindow,
        ProviderErrorKind::Auth => FallbackCondition::Auth,
        ProviderErrorKind::InvalidRequest | ProviderErrorKind::Other => return false,
    };
    route.fallback_on.contains(&condition)
}

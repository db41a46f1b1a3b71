//! Generating one reply, for either API: try the route's targets in order
//! until one produces output (fallback happens only before the first chunk,
//! re-pricing the hold; a target whose circuit breaker is open is skipped
//! at once), pass the output through the content policy, publish every
//! event (to the hub as SSE frames, to the request's own connection as
//! typed events), accumulate the text shown, store the user message with
//! the reply in one append when the reply has a session, and pay: settle
//! what was used, or release the hold when nothing was produced.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use parley_crds::{FallbackCondition, ModelRouteSpec, RouteTarget};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Replies;
use super::billing::{Charge, Ending, Opened, ReplyBill};
use super::events::ReplyEvent;
use super::frames::{FrameArena, reply_frame};
use super::hub::ReplyStream;
use super::metrics::{FallbackLabels, StreamLabels, TokenLabels};
use crate::context_window::{Prompt, output_tokens};
use crate::embedded_db::PendingDurability;
use crate::error::{Error, upstream_code};
use crate::model_routes::SharedRoute;
use crate::policy::{
    Block, BlockContext, BlockRecorder, Filtered, OutputFilter, REDACTION_MARK, ReplyPolicy,
};
use crate::providers::{
    CompletionRequest, Guardrail, Provider, ProviderError, ProviderErrorKind, ProviderEvent,
    Sampling, StopReason, Usage,
};
use crate::ratelimit::{RateLimiter, Scope, StreamGuard};
use crate::routing::Admission;
use crate::store::{BlockDirection, Message, MessageRole, ObjectId, SessionStore, TokenTotals};

/// Renewal attempts after a failed one come at most this far apart.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// Longest time between renewals, whatever the lease: each renewal records
/// the output so far, which is what the reaper charges if this replica dies.
const MAX_RENEW_INTERVAL: Duration = Duration::from_secs(15);

/// Which API asked for a reply (the `api` label of its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `/api/chat/sessions/{id}/…`
    Chat,
    /// `/v1/chat/completions`
    OpenAi,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::OpenAi => "openai",
        }
    }
}

/// What a reply needs, all owned: the task outlives the request.
pub struct ReplyRequest {
    pub api: Api,
    pub user_id: String,
    /// The route as it was when the request arrived (reloads do not touch it).
    pub route: SharedRoute,
    /// The prompt of each of the route's targets, fitted to its context
    /// window and ending with the new user turn; `None` for a target the
    /// prompt cannot fit, which the reply skips.
    pub prompts: Vec<Option<Prompt>>,
    /// The most output tokens the caller asked for; each target's own
    /// maximum applies too.
    pub max_output_tokens: Option<u32>,
    pub sampling: Sampling,
    /// Where the exchange is stored; `None`: nowhere (the usage record is
    /// all that is kept).
    pub record: Option<SessionRecord>,
    /// What the reply's output must pass.
    pub content: ContentCheck,
}

/// The content policy a reply's output passes (its input passed it before
/// the reply was paid for), and where a block is recorded.
pub struct ContentCheck {
    pub policy: ReplyPolicy,
    pub recorder: Arc<BlockRecorder>,
    /// The user's cohorts, for the audit row of a block.
    pub user_cohorts: Vec<String>,
}

impl ReplyRequest {
    /// The first target after `index` that the prompt fits.
    fn next_target_after(&self, index: usize) -> Option<usize> {
        (index + 1..self.prompts.len()).find(|&next| self.prompt(next).is_some())
    }

    /// Estimated input tokens of each target's prompt, for the hold.
    pub fn input_tokens(&self) -> Vec<Option<u64>> {
        self.prompts
            .iter()
            .map(|prompt| prompt.as_ref().map(|prompt| u64::from(prompt.input_tokens)))
            .collect()
    }

    fn prompt(&self, index: usize) -> Option<&Prompt> {
        self.prompts.get(index).and_then(Option::as_ref)
    }
}

/// The chat session a reply is stored in, with the message it answers.
pub struct SessionRecord {
    pub session_id: ObjectId,
    pub user_message: Message,
}

/// Who receives a reply's events.
pub struct Audience {
    /// The session's hub entry: the chat API's owner connections and
    /// observers read its frames. `None`: nobody can follow the reply.
    pub hub: Option<Arc<ReplyStream>>,
    /// The request's own connection (OpenAI-compatible API), which gets the
    /// typed events. It cannot re-attach, so the reply is cancelled as soon
    /// as it is gone; without one, the reply ends when the hub's owners have
    /// been gone for the grace period.
    pub connection: Option<mpsc::UnboundedSender<ReplyEvent>>,
}

/// A reply that ran to its end (and was stored, when it has a session).
#[derive(Debug, Clone)]
pub struct FinishedReply {
    pub message: Message,
    pub usage: Usage,
    pub stop_reason: StopReason,
    pub model: String,
    pub route: String,
    pub fallback_applied: bool,
    /// What it cost; `None` when settling failed (the reaper settles it).
    pub charge: Option<Charge>,
}

/// What a reply task needs besides the request: the hold paid for before
/// it started, and the user's stream slots (the route's too, when it sets
/// limits), held until it ends.
pub struct Paid {
    pub opened: Opened,
    pub stream_slot: StreamGuard,
    pub rate_limiter: Arc<dyn RateLimiter>,
}

/// Starts generating in a task of its own, decoupled from any connection.
/// The session as read (`read`) and the hold may rest on commits not yet
/// durable: both are waited on before the first event is shown, so the model
/// call overlaps the fsync.
pub fn spawn(
    replies: Arc<Replies>,
    sessions: Arc<dyn SessionStore>,
    audience: Audience,
    request: ReplyRequest,
    read: PendingDurability,
    paid: Paid,
) -> JoinHandle<Result<FinishedReply, Error>> {
    let Paid {
        opened,
        stream_slot,
        rate_limiter,
    } = paid;
    // The task's size is every open stream's, and a value moved out of a
    // captured one is a second copy of it in the task: the bill and what
    // the reply rests on are captured once, and the generation borrows them.
    let mut bill = Some(opened.bill);
    let mut unconfirmed = Some(read.and(opened.pending));
    let (first_target, downgraded) = (opened.first_target, opened.downgraded);
    let generating = replies.generating.clone();
    generating.spawn(async move {
        replies.metrics.active.inc();
        if let Some(reply) = &audience.hub {
            replies.hub.start(reply);
        }
        // The generation ends with its block, so the slot's release below
        // is awaited without it.
        let (result, outcome) = {
            let mut generation = Generation {
                replies: &replies,
                sessions: sessions.as_ref(),
                audience: &audience,
                request: &request,
                rate_limiter: rate_limiter.as_ref(),
                bill: &mut bill,
                unconfirmed: &mut unconfirmed,
                first_target,
                current_target: first_target,
                admission: Admission::Closed,
                downgraded,
                next_id: 1,
                frames: FrameArena::default(),
                started: Instant::now(),
                outcome: "failed",
            };
            (generation.run().await, generation.outcome)
        };
        if let Some(reply) = &audience.hub {
            replies.hub.finish(reply, outcome);
        }
        replies.metrics.active.dec();
        stream_slot.release().await;
        result
    })
}

struct Generation<'a> {
    replies: &'a Replies,
    sessions: &'a dyn SessionStore,
    audience: &'a Audience,
    request: &'a ReplyRequest,
    rate_limiter: &'a dyn RateLimiter,
    /// The reply's hold; taken when it is settled or released.
    bill: &'a mut Option<ReplyBill>,
    /// What the reply rests on (its session read, its hold) until it is
    /// known durable; taken before the first event is shown.
    unconfirmed: &'a mut Option<PendingDurability>,
    first_target: usize,
    /// The target being tried now.
    current_target: usize,
    /// What the current target's circuit breaker said about trying it.
    admission: Admission,
    downgraded: bool,
    next_id: u64,
    /// Where the hub's frames of this reply are written.
    frames: FrameArena,
    started: Instant,
    /// How the reply ended, as counted in `parley_streams_total`.
    outcome: &'static str,
}

/// How one target's attempt ends, not yet awaited.
type AttemptEnding<'a> = Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;

/// An ending that ends the reply, as the attempt's ending.
fn finishing<'a>(
    ending: impl Future<Output = Result<FinishedReply, Error>> + Send + 'a,
) -> AttemptEnding<'a> {
    Box::pin(ending.map(Attempt::Done))
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
    /// The reply ran longer than the deployment allows.
    MaxDuration,
    /// The hold could not be renewed before its lease ran out: going on
    /// would generate tokens nobody holds credits for.
    Unpaid(Error),
}

/// A reply the model finished.
struct Completed {
    text: String,
    used: Used,
    stop_reason: StopReason,
    fallback_applied: bool,
}

/// What a reply used, and whether the provider reported it.
#[derive(Debug, Clone, Copy)]
struct Used {
    usage: Usage,
    estimated: bool,
}

impl Generation<'_> {
    async fn run(&mut self) -> Result<FinishedReply, Error> {
        let request = self.request;
        let route = &request.route;
        let mut next = Some(self.first_target);
        while let Some(index) = next
            && let (Some(target), Some(prompt)) = (route.targets.get(index), request.prompt(index))
        {
            self.current_target = index;
            self.admission = self.replies.breakers.admit(&route.alias, target).await;
            // An open target is skipped while another is left; the last one
            // is tried anyway, as failing at once would gain nothing.
            if self.admission == Admission::Open
                && let Some(after_index) = request.next_target_after(index)
                && let Some(after) = route.targets.get(after_index)
            {
                self.skipped_open(target, after);
                next = Some(after_index);
                continue;
            }
            let fallback_applied = index > self.first_target;
            if fallback_applied && let Err(error) = Box::pin(self.reprice(target, prompt)).await {
                return Box::pin(self.unaffordable_fallback(target, error)).await;
            }
            // The provider is looked up here, not in `attempt`: the lookup's
            // await would be laid out beside the attempt's streaming state.
            let attempt = match self.replies.providers.for_target(target).await {
                Ok(provider) => {
                    self.attempt(provider.as_ref(), target, prompt, fallback_applied)
                        .await
                }
                Err(error) => Box::pin(self.failed_before_output(target, error)).await,
            };
            match attempt {
                Attempt::Done(result) => return result,
                Attempt::FallBack(error) => {
                    next = request.next_target_after(index);
                    let next = next
                        .and_then(|index| route.targets.get(index))
                        .map_or("", |next| next.model.as_str());
                    tracing::warn!(
                        route = %route.alias, from = %target.model, to = %next,
                        %error, "falling back to the next target"
                    );
                    self.replies
                        .metrics
                        .fallbacks
                        .get_or_create(&FallbackLabels {
                            from: target.model.clone(),
                            to: next.to_owned(),
                            reason: error.kind.as_str(),
                        })
                        .inc();
                }
            }
        }
        // `attempt` only falls back when a next target exists.
        Box::pin(self.release("the route has no targets")).await;
        Err(Error::Upstream(ProviderError::new(
            ProviderErrorKind::Unavailable,
            "the route has no targets",
        )))
    }

    /// An open target is skipped without a call: the next one answers now,
    /// not after another timeout.
    fn skipped_open(&self, target: &RouteTarget, next: &RouteTarget) {
        tracing::info!(
            route = %self.request.route.alias, from = %target.model, to = %next.model,
            "circuit breaker open; skipping to the next target"
        );
        self.replies
            .metrics
            .fallbacks
            .get_or_create(&FallbackLabels {
                from: target.model.clone(),
                to: next.model.clone(),
                reason: "circuit_open",
            })
            .inc();
    }

    async fn reprice(&mut self, target: &RouteTarget, prompt: &Prompt) -> Result<(), Error> {
        match self.bill.as_mut() {
            Some(bill) => bill.reprice(target, u64::from(prompt.input_tokens)).await,
            None => Ok(()),
        }
    }

    /// The fallback target could not be held: the reply ends before any
    /// output, releasing the hold.
    async fn unaffordable_fallback(
        &mut self,
        target: &RouteTarget,
        error: Error,
    ) -> Result<FinishedReply, Error> {
        tracing::warn!(route = %self.request.route.alias, model = %target.model, %error, "the fallback target could not be held");
        self.release("the fallback target could not be held").await;
        self.publish(ReplyEvent::Error {
            code: error.code(),
            message: "the fallback model could not be paid for".into(),
        });
        self.ended(target, "unpaid");
        Err(error)
    }

    /// One target's attempt. The reply task lives as long as its stream and
    /// is as large as its largest await, so every ending (and the rarely
    /// reached renewal and announcement) is boxed: an open stream then keeps
    /// only the streaming loop's state, not the ending's store-and-pay. The
    /// loop breaks out with its ending, unpolled, and the ending is awaited
    /// once, after the loop's state is dropped: each ending awaited where it
    /// arises gave its temporaries a place of their own beside that state.
    async fn attempt(
        &mut self,
        provider: &dyn Provider,
        target: &RouteTarget,
        prompt: &Prompt,
        fallback_applied: bool,
    ) -> Attempt {
        let request = CompletionRequest {
            model: target.model.clone(),
            turns: prompt.turns.clone(),
            max_output_tokens: output_tokens(target, self.request.max_output_tokens),
            timeout: Duration::from_secs(u64::from(target.timeout_seconds)),
            sampling: self.request.sampling.clone(),
            guardrail: guardrail(target),
        };
        let mut text = String::new();
        let ending: AttemptEnding<'_> = 'attempt: {
            let stop = self.stop();
            tokio::pin!(stop);
            let opened = tokio::select! {
                opened = provider.stream(request) => opened,
                stop = &mut stop => break 'attempt finishing(self.stopped(target, stop, "", 0, None)),
            };
            // Leaving the block drops the stream, and with it the upstream
            // request, before the ending is awaited.
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(error) => break 'attempt Box::pin(self.failed_before_output(target, error)),
            };
            let mut filter = OutputFilter::new(&self.request.content.policy);
            let mut deltas: u32 = 0;
            let mut usage = None;
            let mut announced = false;
            let renewal = tokio::time::sleep_until(self.next_renewal(false));
            tokio::pin!(renewal);
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    stop = &mut stop => {
                        break 'attempt finishing(self.stopped(target, stop, &text, deltas, usage));
                    }
                    () = &mut renewal => {
                        match Box::pin(self.renew(target, deltas)).await {
                            Ok(next) => renewal.as_mut().reset(next),
                            Err(error) => {
                                let stop = Stop::Unpaid(error);
                                break 'attempt finishing(self.stopped(target, stop, &text, deltas, usage));
                            }
                        }
                        continue;
                    }
                };
                match item {
                    Some(Ok(ProviderEvent::Delta(delta))) => {
                        let first = !announced;
                        if first {
                            if let Err(error) =
                                Box::pin(self.announce(target, fallback_applied)).await
                            {
                                let stop = Stop::Unpaid(error);
                                break 'attempt finishing(self.stopped(target, stop, "", 0, None));
                            }
                            announced = true;
                        }
                        deltas = deltas.saturating_add(1);
                        match filter.push(delta) {
                            Filtered::Text(shown) => self.show(&mut text, shown, deltas),
                            Filtered::Blocked { shown, block } => {
                                self.show(&mut text, shown, deltas);
                                let used = self.used(usage, deltas);
                                break 'attempt finishing(self.blocked(target, block, text, used));
                            }
                        }
                        if first && self.steps_aside_for_the_first_token() {
                            tokio::task::yield_now().await;
                        }
                    }
                    Some(Ok(ProviderEvent::Usage(reported))) => usage = Some(reported),
                    Some(Ok(ProviderEvent::Finished { stop_reason })) => {
                        if !announced
                            && let Err(error) =
                                Box::pin(self.announce(target, fallback_applied)).await
                        {
                            let stop = Stop::Unpaid(error);
                            break 'attempt finishing(self.stopped(target, stop, "", 0, None));
                        }
                        let used = self.used(usage, deltas);
                        match filter.finish() {
                            Filtered::Text(shown) => self.show(&mut text, shown, deltas),
                            Filtered::Blocked { shown, block } => {
                                self.show(&mut text, shown, deltas);
                                break 'attempt finishing(self.blocked(target, block, text, used));
                            }
                        }
                        if let StopReason::GuardrailIntervened(intervention) = &stop_reason {
                            let block = Block::by_guardrail(target, intervention);
                            break 'attempt finishing(self.blocked(target, block, text, used));
                        }
                        let ending = Completed {
                            text,
                            used,
                            stop_reason,
                            fallback_applied,
                        };
                        break 'attempt finishing(self.complete(target, ending));
                    }
                    Some(Err(error)) if !announced => {
                        break 'attempt Box::pin(self.failed_before_output(target, error));
                    }
                    None if !announced => {
                        break 'attempt Box::pin(self.failed_before_output(target, ended_early()));
                    }
                    Some(Err(error)) => {
                        break 'attempt finishing(
                            self.interrupted(target, error, text, deltas, usage),
                        );
                    }
                    None => {
                        break 'attempt finishing(self.interrupted(
                            target,
                            ended_early(),
                            text,
                            deltas,
                            usage,
                        ));
                    }
                }
            }
        };
        ending.await
    }

    /// When to renew the hold next: a third of the way to the end of its
    /// lease, so two renewals can fail before it lapses, and at least every
    /// [`MAX_RENEW_INTERVAL`] (sooner after a failure).
    fn next_renewal(&self, after_failure: bool) -> Instant {
        let remaining = self
            .bill
            .as_ref()
            .map(ReplyBill::lease_left)
            .unwrap_or_default();
        let wait = if after_failure {
            (remaining / 3).min(RENEW_RETRY)
        } else {
            (remaining / 3).min(MAX_RENEW_INTERVAL)
        };
        Instant::now() + wait
    }

    /// Renews the hold with the output so far; returns when to renew next,
    /// or the error once the lease is about to lapse.
    async fn renew(&mut self, target: &RouteTarget, deltas: u32) -> Result<Instant, Error> {
        let Some(bill) = self.bill.as_mut() else {
            return Ok(Instant::now() + Duration::from_secs(3600));
        };
        match bill.renew(target, u64::from(deltas)).await {
            Ok(()) => Ok(self.next_renewal(false)),
            Err(error) => {
                let left = bill.lease_left();
                if left <= RENEW_RETRY || !error.is_unavailable() {
                    return Err(error);
                }
                tracing::warn!(%error, left_seconds = left.as_secs(), "renewing a reply's hold failed; retrying");
                Ok(self.next_renewal(true))
            }
        }
    }

    /// Resolves when the reply must stop: its connection gone, or its
    /// owners gone past the grace period; the shutdown drain is over; or the
    /// reply ran its longest. An attempt makes it once and polls it for
    /// every chunk: making it registers a timer and two token waiters, each
    /// under a lock.
    fn stop(&self) -> impl Future<Output = Stop> + Send + 'static {
        let deadline = self
            .replies
            .settings
            .max_duration
            .map(|longest| self.started + longest);
        let connection = self.audience.connection.clone();
        let hub = self.audience.hub.clone();
        let shutdown = self.replies.shutdown.clone();
        async move {
            let too_long = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            let abandoned = async {
                match (&connection, &hub) {
                    (Some(connection), _) => connection.closed().await,
                    (None, Some(reply)) => reply.abandoned().await,
                    (None, None) => std::future::pending().await,
                }
            };
            tokio::select! {
                () = abandoned => Stop::Abandoned,
                () = shutdown.cancelled() => Stop::ShuttingDown,
                () = too_long => Stop::MaxDuration,
            }
        }
    }

    async fn failed_before_output(
        &mut self,
        target: &RouteTarget,
        error: ProviderError,
    ) -> Attempt {
        self.breaker_failed(target, error.kind).await;
        let is_last = self
            .request
            .next_target_after(self.current_target)
            .is_none();
        if !is_last && falls_back_on(&self.request.route, error.kind) {
            return Attempt::FallBack(error);
        }
        tracing::warn!(route = %self.request.route.alias, model = %target.model, %error, "reply failed before any output");
        self.release("the model failed before any output").await;
        self.publish(ReplyEvent::Error {
            code: upstream_code(error.kind),
            message: format!("the model failed ({})", error.kind),
        });
        self.ended(target, "failed");
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
        self.breaker_failed(target, error.kind).await;
        let used = self.used(usage, deltas);
        let stored = self
            .store_partial(target, text, used, "interrupted", Ending::Failed)
            .await;
        self.publish(ReplyEvent::Error {
            code: upstream_code(error.kind),
            message: format!(
                "the model failed mid-reply ({}); the partial reply was saved",
                error.kind
            ),
        });
        stored?;
        Err(Error::Upstream(error))
    }

    /// Throttling, outages and timeouts count against the target's breaker;
    /// other errors (a bad request, a refused key) say nothing of its health.
    async fn breaker_failed(&self, target: &RouteTarget, kind: ProviderErrorKind) {
        if matches!(
            kind,
            ProviderErrorKind::Throttled
                | ProviderErrorKind::Unavailable
                | ProviderErrorKind::Timeout
        ) {
            self.replies
                .breakers
                .failed(&self.request.route.alias, target, self.admission)
                .await;
        }
    }

    /// A content rule or the target's guardrail blocked the reply: what was
    /// shown is stored marked redacted and paid for (its tokens were
    /// generated), the block is recorded, and the reply ends with
    /// `CONTENT_BLOCKED`. A guardrail that blocked the user's message keeps
    /// nothing of the exchange in the session (with no output generated,
    /// settling releases the hold).
    async fn blocked(
        &mut self,
        target: &RouteTarget,
        block: Block,
        text: String,
        used: Used,
    ) -> Result<FinishedReply, Error> {
        let content = &self.request.content;
        let context = BlockContext {
            user_id: self.request.user_id.clone(),
            user_cohorts: content.user_cohorts.clone(),
            session_id: self.request.record.as_ref().map(|record| record.session_id),
            route: self.request.route.alias.clone(),
            model: Some(target.model.clone()),
        };
        content.recorder.record(&block, &context).await;
        let stored = if block.direction == BlockDirection::Input {
            let bill = self.bill.take();
            self.ended(target, "blocked");
            self.count_tokens(target, used.usage);
            self.pay(bill, Ending::Failed, used).await;
            Ok(())
        } else {
            let redacted = if text.is_empty() {
                REDACTION_MARK.to_owned()
            } else {
                format!("{text}\n\n{REDACTION_MARK}")
            };
            self.store_partial(target, redacted, used, "blocked", Ending::Failed)
                .await
        };
        let error = Error::ContentBlocked {
            rule: block.rule,
            reason: block.reason,
        };
        self.publish(ReplyEvent::Error {
            code: error.code(),
            message: error.to_string(),
        });
        stored?;
        Err(error)
    }

    async fn stopped(
        &mut self,
        target: &RouteTarget,
        stop: Stop,
        text: &str,
        deltas: u32,
        usage: Option<Usage>,
    ) -> Result<FinishedReply, Error> {
        let (outcome, error, message) = match stop {
            Stop::Abandoned => ("abandoned", Error::NoActiveReply, "the client left"),
            Stop::ShuttingDown => (
                "shutdown",
                Error::ShuttingDown,
                "the service is shutting down; the partial reply was saved",
            ),
            Stop::MaxDuration => (
                "max_duration",
                Error::ReplyTooLong,
                "the reply ran longer than this deployment allows; the partial reply was saved",
            ),
            Stop::Unpaid(error) => (
                "unpaid",
                error,
                "the credits for this reply could not be kept; the partial reply was saved",
            ),
        };
        let code = match &error {
            Error::NoActiveReply => "CANCELLED",
            other => other.code(),
        };
        if deltas > 0 {
            let used = self.used(usage, deltas);
            // Best effort: the stop itself is what the caller hears about.
            let _ = self
                .store_partial(target, text.to_owned(), used, outcome, Ending::Cancelled)
                .await;
        } else {
            self.release("the reply stopped before any output").await;
            self.ended(target, outcome);
        }
        self.publish(ReplyEvent::Error {
            code,
            message: message.to_owned(),
        });
        Err(error)
    }

    /// Stores a whole reply, pays for it and publishes `complete`.
    async fn complete(
        &mut self,
        target: &RouteTarget,
        completed: Completed,
    ) -> Result<FinishedReply, Error> {
        let Completed {
            text,
            used,
            stop_reason,
            fallback_applied,
        } = completed;
        let message = Message::new(MessageRole::Assistant, text);
        // The tokens were generated whether or not the store took them.
        let (stored, charge) = self
            .store_and_pay(target, &message, used, "completed", Ending::Completed)
            .await;
        if let Err(error) = stored {
            self.publish(ReplyEvent::Error {
                code: error.code(),
                message: "the reply could not be saved".into(),
            });
            return Err(error);
        }
        self.publish(ReplyEvent::Complete {
            usage: used.usage,
            stop_reason: stop_reason.clone(),
            message_id: message.id,
            charge,
        });
        Ok(FinishedReply {
            message,
            usage: used.usage,
            stop_reason,
            model: target.model.clone(),
            route: self.request.route.alias.clone(),
            fallback_applied,
            charge,
        })
    }

    /// Stores a cut-short reply marked incomplete and pays for it; a store
    /// failure is logged.
    async fn store_partial(
        &mut self,
        target: &RouteTarget,
        text: String,
        used: Used,
        outcome: &'static str,
        ending: Ending,
    ) -> Result<(), Error> {
        let mut message = Message::new(MessageRole::Assistant, text);
        message.incomplete = true;
        let (stored, _) = self
            .store_and_pay(target, &message, used, outcome, ending)
            .await;
        if let Err(error) = &stored {
            tracing::error!(%error, "storing a partial reply failed");
        }
        stored
    }

    /// Stores the reply and pays for it at the same time, so that their
    /// commits can share one fsync.
    async fn store_and_pay(
        &mut self,
        target: &RouteTarget,
        message: &Message,
        used: Used,
        outcome: &'static str,
        ending: Ending,
    ) -> (Result<(), Error>, Option<Charge>) {
        let bill = self.bill.take();
        self.outcome = outcome;
        let this = &*self;
        tokio::join!(
            this.store(target, message, used.usage, outcome),
            this.pay(bill, ending, used)
        )
    }

    /// Appends the user message and the reply in one step, when the reply
    /// has a session, and counts the outcome.
    async fn store(
        &self,
        target: &RouteTarget,
        message: &Message,
        usage: Usage,
        outcome: &'static str,
    ) -> Result<(), Error> {
        let appended = match &self.request.record {
            Some(record) => {
                let totals = TokenTotals {
                    input: u64::from(usage.input_tokens),
                    output: u64::from(usage.output_tokens),
                };
                self.sessions
                    .append_messages(
                        record.session_id,
                        &self.request.user_id,
                        &[record.user_message.clone(), message.clone()],
                        totals,
                    )
                    .await
            }
            None => Ok(()),
        };
        self.count(target, outcome);
        self.count_tokens(target, usage);
        appended
    }

    /// Settles the hold for what was used and counts the tokens against the
    /// user's per-minute budgets: the deployment's, and the route's if it has one.
    async fn pay(&self, bill: Option<ReplyBill>, ending: Ending, used: Used) -> Option<Charge> {
        let tokens =
            u64::from(used.usage.input_tokens).saturating_add(u64::from(used.usage.output_tokens));
        let user = self.request.user_id.as_str();
        let on_route = Scope::on_route(user, &self.request.route);
        for scope in std::iter::once(Scope::User(user)).chain(on_route) {
            // Over budget only means the next request is refused by the limiter.
            if let Err(error) = self.rate_limiter.charge_tokens(scope, tokens).await {
                tracing::debug!(%error, ?scope, "this reply used up a token budget");
            }
        }
        bill?.settle(ending, used.usage, used.estimated).await.ok()
    }

    /// Releases the hold: nothing was generated.
    async fn release(&mut self, why: &str) {
        if let Some(bill) = self.bill.take() {
            bill.release(why).await;
        }
    }

    /// Shows the `model` event, once what the reply rests on (its session
    /// read, its hold) is durable: nothing is shown that a crash could undo.
    async fn announce(
        &mut self,
        target: &RouteTarget,
        fallback_applied: bool,
    ) -> Result<(), Error> {
        if let Some(unconfirmed) = self.unconfirmed.take() {
            unconfirmed.wait::<Error>().await?;
        }
        // The target answered: a probe closes its breaker.
        self.replies
            .breakers
            .answered(&self.request.route.alias, target, self.admission)
            .await;
        self.replies
            .metrics
            .time_to_first_token
            .observe(self.started.elapsed().as_secs_f64());
        self.publish(ReplyEvent::Model {
            model: target.model.clone(),
            fallback_applied,
            downgraded: self.downgraded,
        });
        Ok(())
    }

    /// Whether the reply steps aside after its first delta. Deltas that
    /// arrived together are read in one go, so stepping aside lets the
    /// connection write the first token before the rest of the burst is
    /// read, at the cost of a write of its own. That pays while no more
    /// replies generate than the runtime has workers; beyond that the first
    /// token mostly waits for the queue of other replies' work, and the
    /// extra write per reply is throughput lost.
    fn steps_aside_for_the_first_token(&self) -> bool {
        let workers = tokio::runtime::Handle::try_current()
            .map_or(1, |runtime| runtime.metrics().num_workers());
        usize::try_from(self.replies.metrics.active.get()).is_ok_and(|active| active <= workers)
    }

    /// Shows output that passed the content policy (nothing when it is
    /// all held back for now).
    fn show(&mut self, text: &mut String, shown: String, deltas: u32) {
        if shown.is_empty() {
            return;
        }
        text.push_str(&shown);
        self.publish(ReplyEvent::Chunk {
            text: shown,
            total_tokens: deltas,
        });
    }

    /// Gives the next event to the hub, as a frame, and to the connection.
    fn publish(&mut self, event: ReplyEvent) {
        if let Some(reply) = &self.audience.hub {
            let frame = reply_frame(
                &mut self.frames,
                self.next_id,
                &event,
                &self.request.route.alias,
            );
            reply.publish(self.next_id, frame);
        }
        self.next_id += 1;
        if let Some(connection) = &self.audience.connection {
            // A connection that is gone stops the reply through `stop`.
            let _ = connection.send(event);
        }
    }

    /// Reported usage, or an estimate when the provider reported none
    /// (input: the estimate of the prompt sent; output: one token per delta).
    fn used(&self, reported: Option<Usage>, deltas: u32) -> Used {
        match reported {
            Some(usage) => Used {
                usage,
                estimated: false,
            },
            None => Used {
                usage: Usage {
                    input_tokens: self
                        .request
                        .prompt(self.current_target)
                        .map_or(0, |prompt| prompt.input_tokens),
                    output_tokens: deltas,
                },
                estimated: true,
            },
        }
    }

    /// Records and counts how a reply that stores nothing ended.
    fn ended(&mut self, target: &RouteTarget, outcome: &'static str) {
        self.outcome = outcome;
        self.count(target, outcome);
    }

    fn count(&self, target: &RouteTarget, outcome: &'static str) {
        self.replies
            .metrics
            .streams
            .get_or_create(&StreamLabels {
                route: self.request.route.alias.clone(),
                model: target.model.clone(),
                outcome,
                api: self.request.api.as_str(),
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
                    api: self.request.api.as_str(),
                })
                .inc_by(u64::from(tokens));
        }
    }
}

/// The target's Bedrock Guardrail, when it declares one (validation makes
/// sure only `bedrock` targets do, always with a version).
fn guardrail(target: &RouteTarget) -> Option<Guardrail> {
    Some(Guardrail {
        identifier: target.guardrail_identifier.clone()?,
        version: target.guardrail_version.clone()?,
    })
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

//! Live observation, for supervisors and admins.
//!
//! - [`watch_session`]: one session's replies. The reply running now is
//!   replayed from its first event, then followed live; between replies the
//!   observer waits (it may connect before any reply starts) and follows the
//!   next one. Each reply is framed by `observe` events (`started`, `ended`).
//!   An observer that falls behind is cut with `OBSERVER_TOO_SLOW`.
//! - [`live_replies`]: the replies in flight in the caller's cohorts, then
//!   each one starting and ending, so a console lists them without polling.
//!
//! Every observation is audited: its start is recorded before the first
//! event, its end when the stream ends however it ends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::frames::{ErrorData, PING, unnumbered};
use super::hub::{Fed, Hub, ObserverFeed, ReplyStream};
use super::metrics::OutcomeLabels;
use super::shared::{Announcement, ReplyInfo};
use crate::error::Error;
use crate::store::{CohortScope, ObjectId, Observation, ObservationAudit, ObservationEnd, now};

/// What an observer sees when a reply starts or ends.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ObserveData<'a> {
    session_id: String,
    user_id: &'a str,
    reply_id: &'a str,
    state: &'static str,
    /// On `started`: the user's message the reply answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    /// On `ended`: how the reply ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
}

/// What observation streams need.
#[derive(Clone)]
pub struct ObservationContext {
    pub hub: Arc<Hub>,
    pub audit: Arc<dyn ObservationAudit>,
    /// Cancelled when the service begins to shut down.
    pub shutdown: CancellationToken,
}

/// Records `observation` and returns its stream: the session's current
/// reply (if any) from its first event, and every later one.
pub async fn watch_session(
    context: ObservationContext,
    observation: Observation,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, Error> {
    // Subscribed before looking for a running reply: one starting in
    // between is announced, not missed.
    let announcements = context.hub.announcements();
    let running = context.hub.running(observation.session_id).await?;
    context.audit.observation_started(&observation).await?;
    let guard = AuditGuard::new(&context, &observation);
    let mut watch = Watch {
        session: observation.session_id,
        context,
        announcements,
        following: None,
        last_followed: None,
        pending: VecDeque::new(),
        guard,
        ended: false,
    };
    if let Some(reply) = running {
        watch.follow(reply);
    }
    Ok(futures::stream::unfold(watch, |mut watch| async move {
        watch.next().await.map(|frame| (Ok(frame), watch))
    }))
}

struct Watch {
    context: ObservationContext,
    session: ObjectId,
    announcements: broadcast::Receiver<Announcement>,
    following: Option<Following>,
    /// The reply followed last, so its late announcement is not followed twice.
    last_followed: Option<String>,
    /// Frames to give before anything else.
    pending: VecDeque<Bytes>,
    guard: AuditGuard,
    ended: bool,
}

struct Following {
    reply: Arc<ReplyStream>,
    feed: ObserverFeed,
    /// Whether `observe started` was given (only once the reply has events:
    /// a reply withdrawn before it started shows nothing).
    announced: bool,
}

impl Watch {
    fn follow(&mut self, reply: Arc<ReplyStream>) {
        self.last_followed = Some(reply.info.reply_id.clone());
        let feed = reply.observe(self.context.hub.settings().observer_buffer);
        self.following = Some(Following {
            reply,
            feed,
            announced: false,
        });
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.ended {
                return None;
            }
            match self.following.as_mut() {
                Some(following) => {
                    tokio::select! {
                        () = self.context.shutdown.cancelled() => {
                            self.guard.end = ObservationEnd::Shutdown;
                            self.ended = true;
                        }
                        fed = following.feed.next() => match fed {
                            Fed::Frame(frame, lag) => {
                                if !following.announced {
                                    following.announced = true;
                                    self.pending.push_back(observe_event(&following.reply, "started"));
                                }
                                if let Some(lag) = lag {
                                    self.context.hub.metrics.delivery_lag.observe(lag.as_secs_f64());
                                }
                                self.pending.push_back(frame);
                            }
                            Fed::End => {
                                if following.announced {
                                    self.pending.push_back(observe_event(&following.reply, "ended"));
                                }
                                self.following = None;
                            }
                            Fed::TooSlow => {
                                self.pending.push_back(unnumbered("error", &ErrorData {
                                    code: "OBSERVER_TOO_SLOW",
                                    message: "this observer fell too far behind the reply and was disconnected",
                                }));
                                self.guard.end = ObservationEnd::TooSlow;
                                self.ended = true;
                            }
                        },
                        () = self.context.hub.pings().tick() => return Some(Bytes::from_static(PING)),
                    }
                }
                None => {
                    tokio::select! {
                        () = self.context.shutdown.cancelled() => {
                            self.guard.end = ObservationEnd::Shutdown;
                            self.ended = true;
                        }
                        announced = self.announcements.recv() => match announced {
                            Ok(Announcement::Started(info))
                                if info.session_id == self.session
                                    && self.last_followed.as_deref() != Some(info.reply_id.as_str()) =>
                            {
                                let reply = self.context.hub.announced(&info);
                                self.follow(reply);
                            }
                            Ok(_) => {}
                            // Announcements were missed: look again.
                            Err(RecvError::Lagged(_)) => self.look_again().await,
                            Err(RecvError::Closed) => self.ended = true,
                        },
                        () = self.context.hub.pings().tick() => {
                            // Announcements from other replicas travel over
                            // Redis and may be lost: look again now and then.
                            if self.context.hub.is_shared() {
                                self.look_again().await;
                            }
                            return Some(Bytes::from_static(PING));
                        }
                    }
                }
            }
        }
    }

    async fn look_again(&mut self) {
        match self.context.hub.running(self.session).await {
            Ok(Some(reply))
                if self.last_followed.as_deref() != Some(reply.info.reply_id.as_str()) =>
            {
                self.follow(reply);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "an observer could not look for a running reply"),
        }
    }
}

fn observe_event(reply: &ReplyStream, state: &'static str) -> Bytes {
    let started = state == "started";
    unnumbered(
        "observe",
        &ObserveData {
            session_id: reply.info.session_id.to_hex(),
            user_id: &reply.info.user_id,
            reply_id: &reply.info.reply_id,
            state,
            message: started.then_some(reply.info.message.as_str()),
            outcome: (!started).then(|| reply.outcome()).flatten(),
        },
    )
}

/// Ends an observation's audit record and metrics when its stream is
/// dropped (the observer left) or ends (cut, shutdown).
struct AuditGuard {
    context: ObservationContext,
    id: ObjectId,
    end: ObservationEnd,
}

impl AuditGuard {
    fn new(context: &ObservationContext, observation: &Observation) -> Self {
        context.hub.metrics.observers.inc();
        Self {
            context: context.clone(),
            id: observation.id,
            end: ObservationEnd::Left,
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let metrics = &self.context.hub.metrics;
        metrics.observers.dec();
        metrics
            .observations
            .get_or_create(&OutcomeLabels {
                outcome: self.end.as_str(),
            })
            .inc();
        let audit = Arc::clone(&self.context.audit);
        let (id, end, ended_at) = (self.id, self.end, now());
        self.context.hub.track(async move {
            if let Err(error) = audit.observation_ended(id, ended_at, end).await {
                tracing::error!(%error, observation = %id, "recording the end of an observation failed");
            }
        });
    }
}

/// A console's view: every reply in flight the caller may observe, then each
/// one starting and ending (`replies`, `started`, `ended` events).
pub async fn live_replies(
    context: ObservationContext,
    scope: CohortScope,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, Error> {
    let announcements = context.hub.announcements();
    let first = snapshot(&context.hub, &scope).await?;
    let live = Live {
        context,
        scope,
        announcements,
        pending: VecDeque::from([first]),
    };
    Ok(futures::stream::unfold(live, |mut live| async move {
        live.next().await.map(|frame| (Ok(frame), live))
    }))
}

#[derive(Serialize)]
struct RepliesData<'a> {
    replies: Vec<&'a ReplyInfo>,
}

#[derive(Serialize)]
struct StartedData<'a> {
    reply: &'a ReplyInfo,
}

#[derive(Serialize)]
struct EndedData<'a> {
    reply: &'a ReplyInfo,
    outcome: &'a str,
}

async fn snapshot(hub: &Hub, scope: &CohortScope) -> Result<Bytes, Error> {
    let mut replies = hub.in_flight().await?;
    replies.retain(|reply| scope.admits(&reply.user_cohorts));
    replies.sort_by_key(|reply| reply.started_at);
    Ok(unnumbered(
        "replies",
        &RepliesData {
            replies: replies.iter().map(AsRef::as_ref).collect(),
        },
    ))
}

struct Live {
    context: ObservationContext,
    scope: CohortScope,
    announcements: broadcast::Receiver<Announcement>,
    pending: VecDeque<Bytes>,
}

impl Live {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            tokio::select! {
                () = self.context.shutdown.cancelled() => return None,
                announced = self.announcements.recv() => match announced {
                    Ok(announcement) if self.scope.admits(&announcement.reply().user_cohorts) => {
                        self.pending.push_back(match &announcement {
                            Announcement::Started(reply) => unnumbered("started", &StartedData { reply }),
                            Announcement::Ended { reply, outcome } => {
                                unnumbered("ended", &EndedData { reply, outcome })
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => match snapshot(&self.context.hub, &self.scope).await {
                        Ok(frame) => self.pending.push_back(frame),
                        Err(error) => tracing::warn!(%error, "a console's list of replies could not be refreshed"),
                    },
                    Err(RecvError::Closed) => return None,
                },
                () = self.context.hub.pings().tick() => return Some(Bytes::from_static(PING)),
            }
        }
    }
}

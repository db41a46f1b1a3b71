//! Per-user quotas: API requests per minute, model tokens per minute and
//! concurrent reply streams, counted in two kinds of [`Scope`]: a user across
//! the deployment (every API request, under the deployment's limits) and a
//! user on one route (the replies on a route that sets `limits`, under that
//! route's limits). A reply on such a route counts in both.
//!
//! Windows are fixed, one minute long, and start at a user's first request
//! (or first charged token) after the previous window ended — not at
//! wall-clock minute boundaries, so a burst cannot straddle a boundary to get
//! twice the limit. A refused request does not count.
//!
//! [`LocalRateLimiter`] keeps the counters in this process (a sharded map:
//! no global lock, no lock held across an await). [`RedisRateLimiter`] keeps
//! them in Redis, each decision one Lua script (atomic on the server), so the
//! limits hold across replicas. If Redis cannot be reached the limiter fails
//! closed: requests are refused with 503 `RATE_LIMITER_UNAVAILABLE` until it
//! answers again.

mod local;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use self::local::LocalRateLimiter;
pub use self::redis::RedisRateLimiter;
use crate::error::Error;

/// Length of a rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Per-user limits of a deployment; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    pub concurrent_streams: u64,
}

impl From<parley_crds::RouteLimits> for RateLimits {
    fn from(limits: parley_crds::RouteLimits) -> Self {
        RateLimits {
            requests_per_minute: limits.requests_per_minute.into(),
            tokens_per_minute: limits.tokens_per_minute.into(),
            concurrent_streams: limits.concurrent_streams.into(),
        }
    }
}

/// Whose counters a decision uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A user across the deployment, under the deployment's limits.
    User(&'a str),
    /// A user on one route, under that route's limits.
    Route {
        user: &'a str,
        route: &'a str,
        limits: RateLimits,
    },
}

impl<'a> Scope<'a> {
    /// `user`'s scope on `route`; `None` when the route sets no limits.
    pub fn on_route(user: &'a str, route: &'a parley_crds::ModelRouteSpec) -> Option<Self> {
        route.limits.map(|limits| Scope::Route {
            user,
            route: &route.alias,
            limits: limits.into(),
        })
    }

    /// The scope's counter key and limits. Keys start with the kind of
    /// scope, and a route key gives the alias's length, so no user id (any
    /// string) can name another user's or another route's counters.
    fn quota(self, deployment: RateLimits) -> Quota {
        match self {
            Scope::User(user) => Quota {
                key: ["user:", user].concat(),
                limits: deployment,
            },
            Scope::Route {
                user,
                route,
                limits,
            } => Quota {
                key: format!("route:{}:{route}:{user}", route.len()),
                limits,
            },
        }
    }
}

/// A scope resolved for an implementation: which counters, which limits.
struct Quota {
    key: String,
    limits: RateLimits,
}

/// The limit a refusal names (`limit` label and `RATE_LIMITED` message).
pub mod limit {
    pub const REQUESTS: &str = "requests";
    pub const TOKENS: &str = "tokens";
    pub const STREAMS: &str = "streams";
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one request in `scope`. Refused when this minute's requests
    /// are used up, or its token budget is spent.
    async fn admit_request(&self, scope: Scope<'_>) -> Result<(), Error>;

    /// Takes one of `scope`'s concurrent-stream slots until the guard drops.
    async fn acquire_stream(&self, scope: Scope<'_>) -> Result<StreamGuard, Error>;

    /// Adds tokens a reply used in `scope`. They always count (they were
    /// spent); the answer is `RATE_LIMITED` once this minute's budget is
    /// exceeded, so the reply path can stop generating.
    async fn charge_tokens(&self, scope: Scope<'_>, tokens: u64) -> Result<(), Error>;
}

/// A concurrent-stream slot. [`StreamGuard::release`] frees it and returns
/// when it is free; dropping the guard frees it too (in the background when
/// that needs I/O), so a slot is never leaked by an early return or a panic.
#[must_use = "the stream slot is freed when the guard drops"]
pub struct StreamGuard {
    release: Option<BoxFuture<'static, ()>>,
}

impl StreamGuard {
    fn new(release: BoxFuture<'static, ()>) -> Self {
        StreamGuard {
            release: Some(release),
        }
    }

    /// A slot that frees nothing (no stream limit configured).
    fn unlimited() -> Self {
        StreamGuard { release: None }
    }

    /// One guard for both slots: releasing or dropping it frees both.
    pub fn and(mut self, mut other: StreamGuard) -> StreamGuard {
        match (self.release.take(), other.release.take()) {
            (None, None) => StreamGuard::unlimited(),
            (Some(release), None) | (None, Some(release)) => StreamGuard::new(release),
            (Some(first), Some(second)) => StreamGuard::new(Box::pin(async move {
                first.await;
                second.await;
            })),
        }
    }

    /// Frees the slot; returns once another stream may take it.
    pub async fn release(mut self) {
        if let Some(release) = self.release.take() {
            release.await;
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Some(mut release) = self.release.take() else {
            return;
        };
        // In-process releases finish on the first poll, without a task.
        let waker = futures::task::noop_waker();
        let mut context = std::task::Context::from_waker(&waker);
        if release.as_mut().poll(&mut context).is_ready() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release);
            }
            Err(_) => tracing::warn!("no runtime to free a stream slot; it expires by itself"),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Default)]
pub struct RateLimitMetrics {
    limited: Family<LimitLabels, Counter>,
    unavailable: Counter,
}

impl RateLimitMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = RateLimitMetrics::default();
        registry.register(
            "parley_rate_limited",
            "Requests refused by a per-user limit, by limit",
            metrics.limited.clone(),
        );
        registry.register(
            "parley_rate_limiter_unavailable",
            "Decisions the shared rate limiter (Redis) could not make; requests fail closed",
            metrics.unavailable.clone(),
        );
        metrics
    }

    /// Counts a decision the shared limiter could not make and builds its error.
    fn unavailable(&self, cause: impl std::fmt::Display) -> Error {
        self.unavailable.inc();
        Error::RateLimiterUnavailable(cause.to_string())
    }

    /// Counts a refusal and builds its error.
    fn refuse(&self, limit: &'static str, retry_after: Duration) -> Error {
        self.limited.get_or_create(&LimitLabels { limit }).inc();
        Error::RateLimited { limit, retry_after }
    }
}

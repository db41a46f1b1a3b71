//! In-process limits: counters in a map split into shards by user, each
//! shard behind its own short-held mutex.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{RateLimitMetrics, RateLimiter, RateLimits, StreamGuard, WINDOW, limit};
use crate::error::Error;

const SHARDS: usize = 64;
/// A shard this large drops its idle users when it next grows.
const SHARD_PRUNE_AT: usize = 4096;

#[derive(Debug, Default)]
struct UserCounters {
    /// Start of the current window; `None` before the first request.
    window_start: Option<Instant>,
    requests: u64,
    tokens: u64,
    streams: u64,
}

impl UserCounters {
    /// Starts a new window when the current one has ended.
    fn roll(&mut self, now: Instant) {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            self.window_start = Some(now);
            self.requests = 0;
            self.tokens = 0;
        }
    }

    fn retry_after(&self, now: Instant) -> Duration {
        self.window_start.map_or(Duration::ZERO, |start| {
            (start + WINDOW).saturating_duration_since(now)
        })
    }

    fn idle(&self, now: Instant) -> bool {
        self.streams == 0
            && self
                .window_start
                .is_none_or(|start| now.duration_since(start) >= WINDOW)
    }
}

type Shard = Mutex<HashMap<String, UserCounters>>;

#[derive(Clone)]
pub struct LocalRateLimiter {
    limits: RateLimits,
    shards: Arc<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    metrics: RateLimitMetrics,
}

impl LocalRateLimiter {
    pub fn new(limits: RateLimits, metrics: RateLimitMetrics) -> Self {
        let shards: Vec<Shard> = (0..SHARDS).map(|_| Mutex::default()).collect();
        LocalRateLimiter {
            limits,
            shards: shards.into(),
            hasher: std::collections::hash_map::RandomState::new(),
            metrics,
        }
    }

    fn shard_index(&self, user: &str) -> usize {
        // The modulo keeps the value below SHARDS, so the cast cannot truncate.
        (self.hasher.hash_one(user) % SHARDS as u64) as usize
    }

    /// Runs `update` on `user`'s counters under its shard's lock (never
    /// across an await).
    fn with_user<T>(&self, user: &str, update: impl FnOnce(&mut UserCounters, Instant) -> T) -> T {
        let now = Instant::now();
        let mut shard = lock(&self.shards[self.shard_index(user)]);
        if let Some(counters) = shard.get_mut(user) {
            return update(counters, now);
        }
        if shard.len() >= SHARD_PRUNE_AT {
            shard.retain(|_, counters| !counters.idle(now));
        }
        update(shard.entry(user.to_owned()).or_default(), now)
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<String, UserCounters>> {
    // Counters stay consistent even if a holder panicked: every update is a
    // few integer writes.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl RateLimiter for LocalRateLimiter {
    async fn admit_request(&self, user: &str) -> Result<(), Error> {
        let limits = self.limits;
        self.with_user(user, |counters, now| {
            counters.roll(now);
            if limits.tokens_per_minute > 0 && counters.tokens >= limits.tokens_per_minute {
                return Err(self
                    .metrics
                    .refuse(limit::TOKENS, counters.retry_after(now)));
            }
            if limits.requests_per_minute > 0 && counters.requests >= limits.requests_per_minute {
                return Err(self
                    .metrics
                    .refuse(limit::REQUESTS, counters.retry_after(now)));
            }
            counters.requests += 1;
            Ok(())
        })
    }

    async fn acquire_stream(&self, user: &str) -> Result<StreamGuard, Error> {
        let max = self.limits.concurrent_streams;
        if max == 0 {
            return Ok(StreamGuard::unlimited());
        }
        self.with_user(user, |counters, _| {
            if counters.streams >= max {
                // No window to wait for: a slot frees when a stream ends.
                return Err(self.metrics.refuse(limit::STREAMS, Duration::from_secs(1)));
            }
            counters.streams += 1;
            Ok(())
        })?;
        let shards = Arc::clone(&self.shards);
        let index = self.shard_index(user);
        let user = user.to_owned();
        Ok(StreamGuard::new(Box::pin(async move {
            if let Some(counters) = lock(&shards[index]).get_mut(&user) {
                counters.streams = counters.streams.saturating_sub(1);
            }
        })))
    }

    async fn charge_tokens(&self, user: &str, tokens: u64) -> Result<(), Error> {
        let budget = self.limits.tokens_per_minute;
        self.with_user(user, |counters, now| {
            counters.roll(now);
            counters.tokens = counters.tokens.saturating_add(tokens);
            if budget > 0 && counters.tokens > budget {
                return Err(self
                    .metrics
                    .refuse(limit::TOKENS, counters.retry_after(now)));
            }
            Ok(())
        })
    }
}

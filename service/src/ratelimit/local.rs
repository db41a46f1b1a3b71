//! In-process limits: counters in a map split into shards by scope key, each
//! shard behind its own short-held mutex.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::HashMap;
use tokio::time::Instant;

use super::{Quota, RateLimitMetrics, RateLimiter, RateLimits, Scope, StreamGuard, WINDOW, limit};
use crate::error::Error;

const SHARDS: usize = 64;
/// A shard this large drops its idle scopes when it next grows.
const SHARD_PRUNE_AT: usize = 4096;

#[derive(Debug, Default)]
struct Counters {
    /// Start of the current window; `None` before the first request.
    window_start: Option<Instant>,
    requests: u64,
    tokens: u64,
    streams: u64,
}

impl Counters {
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

type Shard = Mutex<HashMap<String, Counters>>;

#[derive(Clone)]
pub struct LocalRateLimiter {
    limits: RateLimits,
    shards: Arc<[Shard]>,
    hasher: foldhash::fast::RandomState,
    metrics: RateLimitMetrics,
}

impl LocalRateLimiter {
    pub fn new(limits: RateLimits, metrics: RateLimitMetrics) -> Self {
        let shards: Vec<Shard> = (0..SHARDS).map(|_| Mutex::default()).collect();
        LocalRateLimiter {
            limits,
            shards: shards.into(),
            hasher: foldhash::fast::RandomState::default(),
            metrics,
        }
    }

    fn shard_index(&self, key: &str) -> usize {
        // The modulo keeps the value below SHARDS, so the cast cannot truncate.
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }

    /// Runs `update` on the counters under `key` under its shard's lock
    /// (never across an await).
    fn with_counters<T>(&self, key: &str, update: impl FnOnce(&mut Counters, Instant) -> T) -> T {
        let now = Instant::now();
        let mut shard = lock(&self.shards[self.shard_index(key)]);
        if let Some(counters) = shard.get_mut(key) {
            return update(counters, now);
        }
        if shard.len() >= SHARD_PRUNE_AT {
            shard.retain(|_, counters| !counters.idle(now));
        }
        update(shard.entry(key.to_owned()).or_default(), now)
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<String, Counters>> {
    // Counters stay consistent even if a holder panicked: every update is a
    // few integer writes.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl RateLimiter for LocalRateLimiter {
    async fn admit_request(&self, scope: Scope<'_>) -> Result<(), Error> {
        let Quota { key, limits } = scope.quota(self.limits);
        if limits.requests_per_minute == 0 && limits.tokens_per_minute == 0 {
            return Ok(());
        }
        self.with_counters(&key, |counters, now| {
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

    async fn acquire_stream(&self, scope: Scope<'_>) -> Result<StreamGuard, Error> {
        let Quota { key, limits } = scope.quota(self.limits);
        let max = limits.concurrent_streams;
        if max == 0 {
            return Ok(StreamGuard::unlimited());
        }
        self.with_counters(&key, |counters, _| {
            if counters.streams >= max {
                // No window to wait for: a slot frees when a stream ends.
                return Err(self.metrics.refuse(limit::STREAMS, Duration::from_secs(1)));
            }
            counters.streams += 1;
            Ok(())
        })?;
        let shards = Arc::clone(&self.shards);
        let index = self.shard_index(&key);
        Ok(StreamGuard::new(Box::pin(async move {
            if let Some(counters) = lock(&shards[index]).get_mut(&key) {
                counters.streams = counters.streams.saturating_sub(1);
            }
        })))
    }

    async fn charge_tokens(&self, scope: Scope<'_>, tokens: u64) -> Result<(), Error> {
        let Quota { key, limits } = scope.quota(self.limits);
        let budget = limits.tokens_per_minute;
        self.with_counters(&key, |counters, now| {
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

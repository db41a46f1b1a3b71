//! Limits shared by every replica through Redis. Each decision is one Lua
//! script, so check-and-count is atomic on the server; windows are keys that
//! expire one minute after their first count.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};

use super::{Quota, RateLimitMetrics, RateLimiter, RateLimits, Scope, StreamGuard, WINDOW, limit};
use crate::error::Error;
use crate::shared_redis;

/// A replica that dies with open streams leaks its slots; they vanish this
/// long after the scope's last stream started.
const STREAM_SLOT_TTL: Duration = Duration::from_secs(15 * 60);

/// KEYS: requests window, tokens window. ARGV: requests limit, tokens limit
/// (0: none), window ms. Returns {0} when admitted, {1, ms} when the
/// requests limit is reached, {2, ms} when the tokens budget is spent.
const ADMIT: &str = r"
local token_limit = tonumber(ARGV[2])
if token_limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= token_limit then
    return {2, redis.call('PTTL', KEYS[2])}
  end
end
local limit = tonumber(ARGV[1])
if limit > 0 then
  local count = tonumber(redis.call('GET', KEYS[1]) or '0')
  if count >= limit then
    return {1, redis.call('PTTL', KEYS[1])}
  end
  redis.call('INCR', KEYS[1])
  if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end
return {0, 0}
";

/// KEYS: tokens window. ARGV: tokens, budget (0: none), window ms.
const CHARGE_TOKENS: &str = r"
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local budget = tonumber(ARGV[2])
if budget > 0 and used > budget then
  return {1, redis.call('PTTL', KEYS[1])}
end
return {0, 0}
";

/// KEYS: stream slots. ARGV: max, slot ttl ms. Returns 1 when a slot was taken.
const ACQUIRE_STREAM: &str = r"
local open = redis.call('INCR', KEYS[1])
if open > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// KEYS: stream slots.
const RELEASE_STREAM: &str = r"
if redis.call('DECR', KEYS[1]) <= 0 then
  redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Clone)]
pub struct RedisRateLimiter {
    limits: RateLimits,
    connection: ConnectionManager,
    key_prefix: String,
    metrics: RateLimitMetrics,
    admit: Script,
    charge: Script,
    acquire: Script,
    release: Script,
}

impl RedisRateLimiter {
    /// Connects to `url`; fails when Redis cannot be reached now.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        limits: RateLimits,
        metrics: RateLimitMetrics,
    ) -> Result<Self, Error> {
        let client = shared_redis::client(url)?;
        let connection = shared_redis::connect(&client)
            .await
            .map_err(|error| Error::RateLimiterUnavailable(error.to_string()))?;
        Ok(RedisRateLimiter {
            limits,
            connection,
            key_prefix: key_prefix.to_owned(),
            metrics,
            admit: Script::new(ADMIT),
            charge: Script::new(CHARGE_TOKENS),
            acquire: Script::new(ACQUIRE_STREAM),
            release: Script::new(RELEASE_STREAM),
        })
    }

    /// The Redis key of one of `quota`'s counters.
    fn key(&self, quota: &Quota, counter: &str) -> String {
        format!("{}:{counter}:{}", self.key_prefix, quota.key)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A PTTL answer as a wait; a key without expiry (never left so) waits a window.
fn wait(pttl_ms: i64) -> Duration {
    u64::try_from(pttl_ms).map_or(WINDOW, Duration::from_millis)
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn admit_request(&self, scope: Scope<'_>) -> Result<(), Error> {
        let quota = scope.quota(self.limits);
        if quota.limits.requests_per_minute == 0 && quota.limits.tokens_per_minute == 0 {
            return Ok(());
        }
        let (verdict, pttl): (i64, i64) = self
            .admit
            .key(self.key(&quota, "requests"))
            .key(self.key(&quota, "tokens"))
            .arg(quota.limits.requests_per_minute)
            .arg(quota.limits.tokens_per_minute)
            .arg(millis(WINDOW))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.metrics.unavailable(error))?;
        match verdict {
            0 => Ok(()),
            1 => Err(self.metrics.refuse(limit::REQUESTS, wait(pttl))),
            _ => Err(self.metrics.refuse(limit::TOKENS, wait(pttl))),
        }
    }

    async fn acquire_stream(&self, scope: Scope<'_>) -> Result<StreamGuard, Error> {
        let quota = scope.quota(self.limits);
        let max = quota.limits.concurrent_streams;
        if max == 0 {
            return Ok(StreamGuard::unlimited());
        }
        let key = self.key(&quota, "streams");
        let taken: i64 = self
            .acquire
            .key(&key)
            .arg(max)
            .arg(millis(STREAM_SLOT_TTL))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.metrics.unavailable(error))?;
        if taken != 1 {
            return Err(self.metrics.refuse(limit::STREAMS, Duration::from_secs(1)));
        }
        let mut connection = self.connection.clone();
        let release = self.release.clone();
        Ok(StreamGuard::new(Box::pin(async move {
            let released: Result<i64, RedisError> =
                release.key(&key).invoke_async(&mut connection).await;
            if let Err(error) = released {
                // The slot expires with STREAM_SLOT_TTL.
                tracing::warn!(%key, %error, "freeing a stream slot failed; it expires by itself");
            }
        })))
    }

    async fn charge_tokens(&self, scope: Scope<'_>, tokens: u64) -> Result<(), Error> {
        if tokens == 0 {
            return Ok(());
        }
        let quota = scope.quota(self.limits);
        let (verdict, pttl): (i64, i64) = self
            .charge
            .key(self.key(&quota, "tokens"))
            .arg(tokens)
            .arg(quota.limits.tokens_per_minute)
            .arg(millis(WINDOW))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.metrics.unavailable(error))?;
        match verdict {
            0 => Ok(()),
            _ => Err(self.metrics.refuse(limit::TOKENS, wait(pttl))),
        }
    }
}

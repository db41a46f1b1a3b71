//! Circuit breakers shared by every replica through Redis: the state machine
//! of [`super::breaker_store::LocalBreakers`], one Lua script per decision.
//!
//! Keys, under the deployment's prefix `p` and a breaker's key `k` (the
//! route alias's length, the alias and the model):
//! - `p:{k}:state`: hash `s` (0 closed, 1 half-open, 2 open) and `u` (open:
//!   end of the cooldown; half-open: end of the probe's lease), in ms;
//! - `p:{k}:failures`: sorted set of failure times within the window.
//!
//! Both expire a while after their last change; an expired breaker is closed.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::breaker_store::{Admission, BreakerState, BreakerStore, Settings};
use crate::error::Error;

/// The breaker sits on every reply's path: a Redis that does not answer
/// this fast is treated as down for that decision.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);

/// KEYS: state. ARGV: now, probe lease, keep. Returns {admission (0 closed,
/// 1 probe, 2 open), 1 when it moved the breaker from open to half-open}.
const ADMIT: &str = r"
local state = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if state == 0 then return {0, 0} end
local now = tonumber(ARGV[1])
if now < tonumber(redis.call('HGET', KEYS[1], 'u') or '0') then return {2, 0} end
redis.call('HSET', KEYS[1], 's', 1, 'u', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if state == 2 then return {1, 1} end
return {1, 0}
";

/// KEYS: state, failures. ARGV: now, window, threshold, cooldown, keep,
/// unique member, probe (1 or 0). Returns the new state, or -1 if unchanged.
const FAILED: &str = r"
local state = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local now = tonumber(ARGV[1])
if state == 2 or (state == 1 and ARGV[7] ~= '1') then return -1 end
if state == 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[3]) then return -1 end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 's', 2, 'u', now + tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 2
";

/// KEYS: state, failures. Returns 0 when a half-open breaker closed, else -1.
const PROBE_SUCCEEDED: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 's') or '0') == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
return -1
";

pub struct RedisBreakers {
    connection: ConnectionManager,
    prefix: String,
    admit: Script,
    failed: Script,
    probe_succeeded: Script,
}

impl RedisBreakers {
    /// Connects to `url`; fails when Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url)
            .map_err(|error| Error::Config(format!("invalid PARLEY_REDIS_URL: {error}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|error| Error::Config(format!("PARLEY_REDIS_URL: {error}")))?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            admit: Script::new(ADMIT),
            failed: Script::new(FAILED),
            probe_succeeded: Script::new(PROBE_SUCCEEDED),
        })
    }

    /// Both keys of a breaker share one hash slot (`{…}`).
    fn keys(&self, key: &str) -> (String, String) {
        (
            format!("{}:{{{key}}}:state", self.prefix),
            format!("{}:{{{key}}}:failures", self.prefix),
        )
    }
}

fn unavailable(error: RedisError) -> Error {
    Error::HubUnavailable(format!("circuit breakers: {error}"))
}

fn changed(code: i64) -> Option<BreakerState> {
    (code >= 0).then(|| BreakerState::from_code(code))
}

#[async_trait]
impl BreakerStore for RedisBreakers {
    async fn admit(
        &self,
        key: &str,
        settings: &Settings,
        now: u64,
    ) -> Result<(Admission, bool), Error> {
        let (state, _) = self.keys(key);
        let (admission, reopened): (i64, i64) = self
            .admit
            .key(state)
            .arg(now)
            .arg(settings.probe_lease_ms)
            .arg(settings.keep_ms())
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        let admission = match admission {
            0 => Admission::Closed,
            1 => Admission::Probe,
            _ => Admission::Open,
        };
        Ok((admission, reopened == 1))
    }

    async fn failed(
        &self,
        key: &str,
        settings: &Settings,
        probe: bool,
        now: u64,
    ) -> Result<Option<BreakerState>, Error> {
        let (state, failures) = self.keys(key);
        let code: i64 = self
            .failed
            .key(state)
            .key(failures)
            .arg(now)
            .arg(settings.window_ms)
            .arg(settings.threshold)
            .arg(settings.cooldown_ms)
            .arg(settings.keep_ms())
            .arg(format!("{now}-{}", uuid::Uuid::new_v4()))
            .arg(u8::from(probe))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed(code))
    }

    async fn probe_succeeded(&self, key: &str) -> Result<Option<BreakerState>, Error> {
        let (state, failures) = self.keys(key);
        let code: i64 = self
            .probe_succeeded
            .key(state)
            .key(failures)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed(code))
    }

    async fn state(&self, key: &str, now: u64) -> Result<BreakerState, Error> {
        let (state, _) = self.keys(key);
        let (code, until): (Option<i64>, Option<u64>) = redis::cmd("HMGET")
            .arg(state)
            .arg("s")
            .arg("u")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(match BreakerState::from_code(code.unwrap_or(0)) {
            BreakerState::Open if now >= until.unwrap_or(0) => BreakerState::HalfOpen,
            state => state,
        })
    }
}

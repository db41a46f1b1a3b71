//! Where circuit breakers keep their state, and the state machine they run:
//! the store of one process ([`LocalBreakers`]); Redis, shared by every
//! replica, follows the same machine in `breaker_redis`.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use foldhash::HashMap;
use parley_crds::RouteTarget;

use crate::error::Error;

/// How long a probe may take to report beyond the target's own timeout
/// before another request may probe instead.
const PROBE_MARGIN: Duration = Duration::from_secs(5);

/// A breaker's state; the number is the `parley_target_state` gauge's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerState {
    #[default]
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    pub(super) fn from_code(code: i64) -> Self {
        match code {
            1 => Self::HalfOpen,
            2 => Self::Open,
            _ => Self::Closed,
        }
    }
}

/// What a breaker says about trying its target now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Admission {
    /// Closed (or disabled): try it.
    #[default]
    Closed,
    /// Half-open: this request is the one probe.
    Probe,
    /// Open: skip the target.
    Open,
}

/// One breaker's settings, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub threshold: u32,
    pub window_ms: u64,
    pub cooldown_ms: u64,
    pub probe_lease_ms: u64,
}

impl Settings {
    pub fn of(target: &RouteTarget) -> Self {
        let breaker = target.circuit_breaker;
        let seconds = |s: u32| u64::from(s) * 1000;
        Self {
            threshold: breaker.failure_threshold.max(1),
            window_ms: seconds(breaker.window_seconds),
            cooldown_ms: seconds(breaker.cooldown_seconds),
            probe_lease_ms: seconds(target.timeout_seconds) + millis(PROBE_MARGIN),
        }
    }

    /// How long shared state is kept after its last change: past the window
    /// and past an open breaker's cooldown and probe.
    pub fn keep_ms(&self) -> u64 {
        self.window_ms
            .max(self.cooldown_ms + self.probe_lease_ms)
            .saturating_add(60_000)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch: replicas sharing breakers compare
/// their clocks through it (cluster nodes keep them within milliseconds).
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// Where breakers keep their state. Both implementations run the same state
/// machine; `service/tests/breakers.rs` runs one scenario against each.
#[async_trait]
pub trait BreakerStore: Send + Sync {
    /// The admission of a request at `now`, and whether it moved the
    /// breaker from open to half-open.
    async fn admit(
        &self,
        key: &str,
        settings: &Settings,
        now: u64,
    ) -> Result<(Admission, bool), Error>;

    /// Counts a failure; the new state when it changed the state.
    async fn failed(
        &self,
        key: &str,
        settings: &Settings,
        probe: bool,
        now: u64,
    ) -> Result<Option<BreakerState>, Error>;

    /// A probe succeeded; `Closed` when that closed the breaker.
    async fn probe_succeeded(&self, key: &str) -> Result<Option<BreakerState>, Error>;

    /// The state as a reader at `now` sees it (an open breaker whose
    /// cooldown is over is half-open: the next request probes).
    async fn state(&self, key: &str, now: u64) -> Result<BreakerState, Error>;
}

/// One breaker in this process.
#[derive(Debug, Default)]
struct Cell {
    state: Option<BreakerState>,
    /// Open: the end of the cooldown. Half-open: the end of the probe's lease.
    until: u64,
    /// Failure times within the window, oldest first.
    failures: VecDeque<u64>,
}

impl Cell {
    fn state(&self) -> BreakerState {
        self.state.unwrap_or(BreakerState::Closed)
    }

    fn open(&mut self, settings: &Settings, now: u64) -> Option<BreakerState> {
        self.state = Some(BreakerState::Open);
        self.until = now + settings.cooldown_ms;
        self.failures.clear();
        Some(BreakerState::Open)
    }
}

/// Breakers kept in this process.
#[derive(Debug, Default)]
pub struct LocalBreakers {
    cells: Mutex<HashMap<String, Cell>>,
}

impl LocalBreakers {
    fn with_cell<T>(&self, key: &str, act: impl FnOnce(&mut Cell) -> T) -> T {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        // Every reply asks: the key is copied only the first time it is seen.
        if let Some(cell) = cells.get_mut(key) {
            return act(cell);
        }
        act(cells.entry(key.to_owned()).or_default())
    }
}

#[async_trait]
impl BreakerStore for LocalBreakers {
    async fn admit(
        &self,
        key: &str,
        settings: &Settings,
        now: u64,
    ) -> Result<(Admission, bool), Error> {
        Ok(self.with_cell(key, |cell| match cell.state() {
            BreakerState::Closed => (Admission::Closed, false),
            _ if now < cell.until => (Admission::Open, false),
            before => {
                cell.state = Some(BreakerState::HalfOpen);
                cell.until = now + settings.probe_lease_ms;
                (Admission::Probe, before == BreakerState::Open)
            }
        }))
    }

    async fn failed(
        &self,
        key: &str,
        settings: &Settings,
        probe: bool,
        now: u64,
    ) -> Result<Option<BreakerState>, Error> {
        Ok(self.with_cell(key, |cell| match cell.state() {
            BreakerState::Open => None,
            // Only the probe decides a half-open breaker.
            BreakerState::HalfOpen if !probe => None,
            BreakerState::HalfOpen => cell.open(settings, now),
            BreakerState::Closed => {
                cell.failures.push_back(now);
                let window_start = now.saturating_sub(settings.window_ms);
                while cell.failures.front().is_some_and(|&at| at <= window_start) {
                    cell.failures.pop_front();
                }
                if cell.failures.len() >= settings.threshold as usize {
                    cell.open(settings, now)
                } else {
                    None
                }
            }
        }))
    }

    async fn probe_succeeded(&self, key: &str) -> Result<Option<BreakerState>, Error> {
        Ok(self.with_cell(key, |cell| {
            if cell.state() == BreakerState::HalfOpen {
                *cell = Cell::default();
                Some(BreakerState::Closed)
            } else {
                None
            }
        }))
    }

    async fn state(&self, key: &str, now: u64) -> Result<BreakerState, Error> {
        Ok(self.with_cell(key, |cell| match cell.state() {
            BreakerState::Open if now >= cell.until => BreakerState::HalfOpen,
            state => state,
        }))
    }
}

//! Per-target circuit breakers.
//!
//! Each (route, target model) has a breaker. Throttled, unavailable and
//! timed-out calls are failures; `failureThreshold` of them within the
//! sliding `windowSeconds` open it. An open target is skipped at once — the
//! route's next target answers without waiting for another timeout — until
//! `cooldownSeconds` have passed; then exactly one request is let through as
//! a probe (half-open): its first token closes the breaker, its failure opens
//! it again. A probe that never reports (its client left, its replica died)
//! holds the half-open state only for the target's timeout plus a margin;
//! then another request probes.
//!
//! With Redis every replica shares each breaker (one Lua script per
//! decision, atomic on the server); otherwise each process keeps its own. A
//! breaker that cannot reach Redis must not stop replies: that decision is
//! taken on this process's own state instead, and counted in
//! `parley_breaker_redis_failures_total`.

use parley_crds::RouteTarget;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::breaker_redis::RedisBreakers;
use super::breaker_store::{
    Admission, BreakerState, BreakerStore, LocalBreakers, Settings, now_ms,
};
use crate::error::Error;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    route: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    route: String,
    model: String,
    /// `open`, `half_open` or `closed`.
    to: &'static str,
}

#[derive(Clone)]
struct BreakerMetrics {
    state: Family<TargetLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    redis_failures: Counter,
}

impl BreakerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            state: Family::default(),
            transitions: Family::default(),
            redis_failures: Counter::default(),
        };
        registry.register(
            "parley_target_state",
            "Circuit breaker of a route's target as this replica last saw it: 0 closed, 1 half-open, 2 open",
            metrics.state.clone(),
        );
        registry.register(
            "parley_breaker_transitions",
            "Circuit breaker state changes made by this replica, by the state entered",
            metrics.transitions.clone(),
        );
        registry.register(
            "parley_breaker_redis_failures",
            "Breaker decisions taken on this replica's own state because Redis did not answer",
            metrics.redis_failures.clone(),
        );
        metrics
    }
}

/// The breakers of every route's targets, shared through Redis or not.
pub struct Breakers {
    local: LocalBreakers,
    shared: Option<RedisBreakers>,
    metrics: BreakerMetrics,
}

/// The breaker of one target of one route.
struct Target<'a> {
    route: &'a str,
    target: &'a RouteTarget,
    key: String,
    settings: Settings,
}

impl<'a> Target<'a> {
    fn new(route: &'a str, target: &'a RouteTarget) -> Self {
        // The alias's length first, so no (route, model) pair can spell another's key.
        let key = format!("{}:{route}:{}", route.len(), target.model);
        Self {
            route,
            target,
            key,
            settings: Settings::of(target),
        }
    }

    fn labels(&self) -> TargetLabels {
        TargetLabels {
            route: self.route.to_owned(),
            model: self.target.model.clone(),
        }
    }
}

impl Breakers {
    /// Breakers kept in this process only.
    pub fn local(registry: &mut Registry) -> Self {
        Self {
            local: LocalBreakers::default(),
            shared: None,
            metrics: BreakerMetrics::register(registry),
        }
    }

    /// Breakers shared by every replica through Redis at `url`, under `prefix`.
    pub async fn shared(url: &str, prefix: &str, registry: &mut Registry) -> Result<Self, Error> {
        Ok(Self {
            shared: Some(RedisBreakers::connect(url, prefix).await?),
            ..Self::local(registry)
        })
    }

    /// Runs `operation` on the shared store, or on this process's own when
    /// there is none or it fails (counted).
    async fn run<'a, T>(
        &'a self,
        operation: impl Fn(&'a dyn BreakerStore) -> futures::future::BoxFuture<'a, Result<T, Error>>,
    ) -> T
    where
        T: Default,
    {
        if let Some(shared) = &self.shared {
            match operation(shared).await {
                Ok(answer) => return answer,
                Err(error) => {
                    self.metrics.redis_failures.inc();
                    tracing::warn!(%error, "the shared circuit breakers did not answer; deciding on this replica's own");
                }
            }
        }
        operation(&self.local).await.unwrap_or_default()
    }

    /// Whether to try `target` of `route` now.
    pub async fn admit(&self, route: &str, target: &RouteTarget) -> Admission {
        if !target.circuit_breaker.enabled {
            return Admission::Closed;
        }
        let target = Target::new(route, target);
        let now = now_ms();
        let (admission, reopened) = self
            .run(|store| store.admit(&target.key, &target.settings, now))
            .await;
        let seen = match admission {
            Admission::Closed => BreakerState::Closed,
            Admission::Probe => BreakerState::HalfOpen,
            Admission::Open => BreakerState::Open,
        };
        self.saw(&target, seen, reopened.then_some(BreakerState::HalfOpen));
        admission
    }

    /// A throttled, unavailable or timed-out call of a target admitted with
    /// `admission`.
    pub async fn failed(&self, route: &str, target: &RouteTarget, admission: Admission) {
        if !target.circuit_breaker.enabled {
            return;
        }
        let target = Target::new(route, target);
        let probe = admission == Admission::Probe;
        let now = now_ms();
        let changed = self
            .run(|store| store.failed(&target.key, &target.settings, probe, now))
            .await;
        if let Some(state) = changed {
            tracing::warn!(route = target.route, model = %target.target.model, to = state.as_str(), "circuit breaker changed state");
            self.saw(&target, state, Some(state));
        }
    }

    /// The target produced its first token: a probe closes the breaker.
    pub async fn answered(&self, route: &str, target: &RouteTarget, admission: Admission) {
        if admission != Admission::Probe {
            return;
        }
        let target = Target::new(route, target);
        let changed = self.run(|store| store.probe_succeeded(&target.key)).await;
        if let Some(state) = changed {
            tracing::info!(route = target.route, model = %target.target.model, "circuit breaker closed by a successful probe");
            self.saw(&target, state, Some(state));
        }
    }

    /// The breaker's state now, for `GET /api/models`.
    pub async fn state(&self, route: &str, target: &RouteTarget) -> BreakerState {
        if !target.circuit_breaker.enabled {
            return BreakerState::Closed;
        }
        let target = Target::new(route, target);
        let now = now_ms();
        let state = self.run(|store| store.state(&target.key, now)).await;
        self.saw(&target, state, None);
        state
    }

    fn saw(&self, target: &Target<'_>, state: BreakerState, transition: Option<BreakerState>) {
        self.metrics
            .state
            .get_or_create(&target.labels())
            .set(state as i64);
        if let Some(to) = transition {
            self.metrics
                .transitions
                .get_or_create(&TransitionLabels {
                    route: target.route.to_owned(),
                    model: target.target.model.clone(),
                    to: to.as_str(),
                })
                .inc();
        }
    }
}

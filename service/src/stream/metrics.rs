//! Reply metrics on the injected registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub route: String,
    pub model: String,
    /// completed, failed (before output), interrupted (error after output),
    /// abandoned (client gone), shutdown.
    pub outcome: &'static str,
    /// Which API asked: `chat` or `openai`.
    pub api: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub direction: &'static str,
    pub model: String,
    /// Which API asked: `chat` or `openai`.
    pub api: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub from: String,
    pub to: String,
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct ReplyMetrics {
    pub streams: Family<StreamLabels, Counter>,
    pub active: Gauge,
    pub time_to_first_token: Histogram,
    pub tokens: Family<TokenLabels, Counter>,
    pub fallbacks: Family<FallbackLabels, Counter>,
}

impl ReplyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            streams: Family::default(),
            active: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            tokens: Family::default(),
            fallbacks: Family::default(),
        };
        registry.register(
            "parley_streams",
            "Replies by route, model, outcome and API (chat, openai)",
            metrics.streams.clone(),
        );
        registry.register(
            "parley_active_streams",
            "Replies being generated",
            metrics.active.clone(),
        );
        registry.register(
            "parley_time_to_first_token_seconds",
            "Time from the request to the first output token",
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "parley_tokens",
            "Tokens by direction (input, output), model and API (chat, openai)",
            metrics.tokens.clone(),
        );
        registry.register(
            "parley_fallbacks",
            "Moves to the next target of a route, by reason",
            metrics.fallbacks.clone(),
        );
        metrics
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// left, too_slow, shutdown.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

/// Observation and cross-replica hub metrics.
#[derive(Clone)]
pub struct HubMetrics {
    pub observers: Gauge,
    pub observations: Family<OutcomeLabels, Counter>,
    pub delivery_lag: Histogram,
    relay_failures: Family<OperationLabels, Counter>,
}

impl HubMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            observers: Gauge::default(),
            observations: Family::default(),
            // 100 µs to about 6.5 s.
            delivery_lag: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            relay_failures: Family::default(),
        };
        registry.register(
            "parley_observers",
            "Observers connected to this replica",
            metrics.observers.clone(),
        );
        registry.register(
            "parley_observations",
            "Ended observations, by how they ended",
            metrics.observations.clone(),
        );
        registry.register(
            "parley_hub_delivery_lag_seconds",
            "Time from a reply event's production to its hand-over to an observer's connection",
            metrics.delivery_lag.clone(),
        );
        registry.register(
            "parley_hub_relay_failures",
            "Failed Redis operations of the cross-replica reply hub, by operation",
            metrics.relay_failures.clone(),
        );
        metrics
    }

    pub(super) fn relay_failed(&self, operation: &'static str) {
        self.relay_failures
            .get_or_create(&OperationLabels { operation })
            .inc();
    }
}

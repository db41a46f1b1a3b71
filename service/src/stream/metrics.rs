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
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub direction: &'static str,
    pub model: String,
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
            "Replies by route, model and outcome",
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
            "Tokens by direction (input, output) and model",
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
